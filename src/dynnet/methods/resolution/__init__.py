"""Adaptive resolution: cheap low-resolution processing first, high resolution only where needed."""

from dynnet.methods.resolution import ranet, rs_nets

__all__ = ["ranet", "rs_nets"]
