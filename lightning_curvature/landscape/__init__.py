"""landscape layer (under construction)."""
