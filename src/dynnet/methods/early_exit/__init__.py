"""Family: early_exit (recipes register on import)."""
