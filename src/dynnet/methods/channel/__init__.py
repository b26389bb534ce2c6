"""Channel gating: per-input decisions over the channels of residual blocks, executed channel-sliced."""

from dynnet.methods.channel import (
    batch_shaping,
    channel_gating,
    dynamic_channel_exec,
    fbs,
    gaternet,
    instance_sparsity,
    rnp,
    runtime_routing,
    stochastic_neurons,
)
from dynnet.methods.channel._block import ChannelGatedBlock
from dynnet.methods.channel._layout import describe_block

__all__ = [
    "ChannelGatedBlock",
    "batch_shaping",
    "channel_gating",
    "describe_block",
    "dynamic_channel_exec",
    "fbs",
    "gaternet",
    "instance_sparsity",
    "rnp",
    "runtime_routing",
    "stochastic_neurons",
]
