"""The base of dynamic blocks that wrap an existing residual block through its :class:`ResidualAdapter`."""

from __future__ import annotations

from torch import Tensor, nn

from dynnet.convert.residual import ResidualAdapter
from dynnet.core import DynamicBlock

__all__ = ["AdaptedResidual", "adopt_children"]


def adopt_children(wrapper: nn.Module, block: nn.Module) -> None:
    """Register ``block``'s children, and its own parameters and buffers (ConvNeXt's ``layer_scale``), on ``wrapper``
    under their own names (state_dict keys stay the base network's) and keep ``block`` itself, unregistered, as
    ``wrapper._block`` (adapter functions read its attributes: the same tensor objects)."""
    for child_name, child in block.named_children():
        wrapper.add_module(child_name, child)
    for param_name, param in block.named_parameters(recurse=False):
        wrapper.register_parameter(param_name, param)
    for buffer_name, buffer in block.named_buffers(recurse=False):
        wrapper.register_buffer(buffer_name, buffer, persistent=buffer_name not in block._non_persistent_buffers_set)
    if block._parameters or block._buffers:
        # The block reads its own tensors through the wrapper's tables, so that what replaces them on the wrapper
        # (functional_call's meta tensors in a MAC probe, load_state_dict(assign=True)) is what the adapter sees.
        object.__setattr__(block, "_parameters", wrapper._parameters)
        object.__setattr__(block, "_buffers", wrapper._buffers)
    object.__setattr__(wrapper, "_block", block)


class AdaptedResidual(DynamicBlock):
    """A dynamic block around an existing residual block ``post(shortcut(x) + body(x))``.

    The block's children are re-registered under their own names (state_dict keys are unchanged) and the block
    object is kept unregistered for the adapter's functions, which read its attributes.

    Args:
        block: the original residual block (torchvision/timm/dynnet); its submodules are reused.
        adapter: how to split ``block`` into body, shortcut and post-op.
    """

    def __init__(self, block: nn.Module, adapter: ResidualAdapter) -> None:
        super().__init__()
        adopt_children(self, block)
        self.adapter = adapter

    def body(self, x: Tensor) -> Tensor:
        """The residual branch: Tensor[N, C_in, H, W] → Tensor[N, C_out, H', W']."""
        return self.adapter.body(self._block, x)

    def shortcut(self, x: Tensor) -> Tensor:
        """Identity or projection of the block input."""
        return self.adapter.shortcut(self._block, x)

    def post(self, y: Tensor) -> Tensor:
        """What follows the addition (ReLU for ResNets, identity for MobileNetV2)."""
        return self.adapter.post(self._block, y)
