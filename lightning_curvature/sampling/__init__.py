"""sampling layer (under construction)."""
