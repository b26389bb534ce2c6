"""Model surgery and adapters that find the blocks of torchvision, timm and dynnet networks."""

from dynnet.convert.layout import NetworkLayout, network_layout, register_layout
from dynnet.convert.residual import ResidualAdapter, find_adapter, register_residual_adapter
from dynnet.convert.surgery import (
    Targets,
    classifier_of,
    first_conv_in_channels,
    num_classes_of,
    replace_module,
    residual_blocks,
)  # fmt: skip

__all__ = [
    "NetworkLayout",
    "ResidualAdapter",
    "Targets",
    "classifier_of",
    "find_adapter",
    "first_conv_in_channels",
    "network_layout",
    "num_classes_of",
    "register_layout",
    "register_residual_adapter",
    "replace_module",
    "residual_blocks",
]
