"""optim layer (under construction)."""
