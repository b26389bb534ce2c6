"""Family: glimpse (recipes register on import)."""
