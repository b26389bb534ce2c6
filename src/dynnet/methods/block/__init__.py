"""Block family: decisions per spatial tile, executed block-sparse (recipes register on import)."""

from dynnet.methods.block import sbnet

__all__ = ["sbnet"]
