"""Pytest fixtures for plugin authors (placeholder)."""
