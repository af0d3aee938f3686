"""models layer (under construction)."""
