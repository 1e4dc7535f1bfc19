"""Placeholder plugin module (no hooks yet)."""
