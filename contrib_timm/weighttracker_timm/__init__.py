"""weighttracker-timm: timm integration for weighttracker (SPEC §9)."""
