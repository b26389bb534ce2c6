"""Running a ResNet-style network block by block, for recipes whose channel decisions come from outside the blocks.

RNP's recurrent controller and GaterNet's gater network decide for every block; their models override
:meth:`DynamicModel.run` and walk ``stem → stages → pool → fc`` themselves, passing each block its decision.
:class:`Controller` is the base of those decision makers: a :class:`~dynnet.core.DynamicBlock` whose dense path
returns ``None``, so under ``force_dense()`` (static MAC probes) and in dense mode no decision is evaluated and the
base network runs.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from dynnet.core import DynamicBlock

__all__ = ["Controller", "iter_blocks", "resnet_head", "resnet_stem"]


def _stages(net: nn.Module) -> list[nn.Sequential]:
    needed = ("conv1", "bn1", "fc", "avgpool", "layer1")
    missing = [a for a in needed if not hasattr(net, a)]
    if missing:
        raise ValueError(
            f"this recipe runs ResNet-style networks (conv1, bn1, layer1.., avgpool, fc); {type(net).__name__} "
            f"lacks {missing}"
        )
    stages, k = [], 1
    while isinstance(getattr(net, f"layer{k}", None), nn.Sequential):
        stages.append(getattr(net, f"layer{k}"))
        k += 1
    return stages


def resnet_stem(net: nn.Module, x: Tensor) -> Tensor:
    """``conv1 → bn1 → relu (→ maxpool)``: the first stage's input."""
    _stages(net)
    x = net.relu(net.bn1(net.conv1(x)))
    maxpool = getattr(net, "maxpool", None)
    return maxpool(x) if isinstance(maxpool, nn.Module) else x


def iter_blocks(net: nn.Module) -> Iterator[nn.Module]:
    """The blocks of every stage, in execution order."""
    for stage in _stages(net):
        yield from stage


def resnet_head(net: nn.Module, x: Tensor) -> Tensor:
    """``avgpool → flatten → fc``: logits Tensor[N, K]."""
    return net.fc(torch.flatten(net.avgpool(x), 1))


class Controller(DynamicBlock):
    """A decision maker outside the blocks; :meth:`forward` returns ``None`` in dense mode.

    Subclasses implement :meth:`decide` with whatever arguments they need; ``forward_masked`` and
    ``forward_sparse`` both call it (a controller's own computation is the same in both modes).
    """

    granularity = "channel"

    def decide(self, *args):
        raise NotImplementedError

    def forward_dense(self, *args):  # type: ignore[override]
        return None

    def forward_masked(self, *args):  # type: ignore[override]
        return self.decide(*args)

    def forward_sparse(self, *args):  # type: ignore[override]
        return self.decide(*args)
