"""wt-example: a third-party weighttracker plugin package (test fixture)."""
