"""Family: channel (recipes register on import)."""
