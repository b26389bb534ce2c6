"""Family: spatial (recipes register on import)."""
