"""Family: recursion (recipes register on import)."""
