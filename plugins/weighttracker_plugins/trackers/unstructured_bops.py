"""Placeholder plugin module (no hooks yet); see the entry point of the same name."""
