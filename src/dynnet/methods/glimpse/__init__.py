"""Glimpses and crops: look at a few chosen regions of the image instead of all of it."""

from dynnet.methods.glimpse import dcn, gfnet, lsts, ram, visual_attention_action

__all__ = ["dcn", "gfnet", "lsts", "ram", "visual_attention_action"]
