"""Glimpses and crops: look at a few chosen regions of the image instead of all of it."""

from dynnet.methods.glimpse import dcn, gfnet, ram

__all__ = ["dcn", "gfnet", "ram"]
