"""Placeholder (filled in later)."""
