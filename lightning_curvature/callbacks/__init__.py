"""callbacks layer (under construction)."""
