"""Family: block (recipes register on import)."""
