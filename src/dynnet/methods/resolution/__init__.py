"""Family: resolution (recipes register on import)."""
