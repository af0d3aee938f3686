"""data layer (under construction)."""
