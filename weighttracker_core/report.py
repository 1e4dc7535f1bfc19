"""Renders the CLI's JSON output and the demo's HTML report from plain data (placeholder)."""
