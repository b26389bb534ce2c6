"""Method families of the reading list; importing this package registers every recipe."""

from dynnet.methods import (  # noqa: F401
    block,
    channel,
    early_exit,
    glimpse,
    layer_skip,
    moe,
    recursion,
    resolution,
    spatial,
)
