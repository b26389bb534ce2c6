"""Family: moe (recipes register on import)."""
