"""Trunks and exit placement: a base network cut into units, the MACs of each unit, and where the exits go.

:func:`trunk_of` cuts a network (a registered class, :func:`register_trunk`, one with an ``exit_trunk()``
method, or one whose :func:`dynnet.convert.network_layout` is known: stem, every block, head) into units;
:func:`plan_exits` probes each unit's MACs on meta tensors and puts one early exit per cumulative-MAC fraction
(:func:`place_exits`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.core import run_on_meta
from dynnet.core.registry import TypeRegistry
from dynnet.methods.early_exit._common import State, count_per_sample

__all__ = ["ExitPlan", "Trunk", "place_exits", "plan_exits", "register_trunk", "trunk_of", "unit_profile"]


# ---------------------------------------------------------------------------------------------- trunks
@dataclass(frozen=True)
class Trunk:
    """A base network cut into units: ``base(x) == head(units[-1](... units[0](x)))``.

    Attributes:
        units: callables state → state, in execution order (the stem is the first unit).
        head: the base classifier, final state → logits Tensor[N, K].
        names: a name per unit (for reports).
        exit_heads: heads the base network already has after some units (MSDNet), by unit index.
    """

    units: tuple[Callable[[State], State], ...]
    head: Callable[[State], Tensor]
    names: tuple[str, ...]
    exit_heads: dict[int, nn.Module] | None = None


_TRUNKS: TypeRegistry[Callable[[nn.Module], Trunk]] = TypeRegistry("trunk")


def register_trunk(cls: type, fn: Callable[[nn.Module], Trunk]) -> None:
    """Teach the early-exit recipes how to cut a network class (and its subclasses) into units; raises on a
    duplicate."""
    _TRUNKS.register(cls, fn)


def trunk_of(base: nn.Module) -> Trunk:
    """The :class:`Trunk` of ``base``: a registered class, a network with an ``exit_trunk()`` method, or one whose
    :func:`dynnet.convert.network_layout` is known (units: the stem, then every block; exits may follow any block).

    Raises:
        TypeError: the network's class is unknown.
    """
    from dynnet.convert import network_layout

    if hasattr(base, "exit_trunk"):
        return base.exit_trunk()
    fn = _TRUNKS.lookup(base)
    if fn is not None:
        return fn(base)
    try:
        layout = network_layout(base)
    except ValueError:
        layout = None
    if layout is not None:
        blocks = list(layout.blocks(base))
        return Trunk(
            units=(partial(layout.stem, base), *(b for _, b in blocks)),
            head=partial(layout.head, base),
            names=("stem", *(n for n, _ in blocks)),
        )
    known = ", ".join(_TRUNKS.names())
    raise TypeError(
        f"cannot attach exits to a {type(base).__name__}: known networks are {known} and every network "
        "dynnet.convert.network_layout knows; register one with dynnet.methods.early_exit.register_trunk or give the "
        "network an exit_trunk() method"
    )


def _blocks(*layers: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f"{i}.{j}", b) for i, layer in enumerate(layers) for j, b in enumerate(layer)]


def _resnet_like(stem: Callable[[Tensor], Tensor], layers: Sequence[nn.Module], head: Callable) -> Trunk:
    blocks = _blocks(*layers)
    return Trunk(
        units=(stem, *(b for _, b in blocks)),
        head=head,
        names=("stem", *(f"layer{n}" for n, _ in blocks)),
    )


def _vgg(b: nn.Module) -> Trunk:
    """VGG: one unit per stage of ``features`` (the convolutions up to and including each max pooling)."""
    cuts = [i + 1 for i, m in enumerate(b.features) if isinstance(m, nn.MaxPool2d)]
    cuts = [0, *cuts] if cuts and cuts[-1] == len(b.features) else [0, *cuts, len(b.features)]
    return Trunk(
        units=tuple(b.features[lo:hi] for lo, hi in itertools.pairwise(cuts)),
        head=lambda h: b.classifier(torch.flatten(b.avgpool(h), 1)),
        names=tuple(f"features.{lo}-{hi - 1}" for lo, hi in itertools.pairwise(cuts)),
    )


def _register_builtin_trunks() -> None:
    from torchvision.models import VGG, MobileNetV2, ResNet

    from dynnet.models.cifar_resnet import CifarResNet

    register_trunk(
        CifarResNet,
        lambda b: _resnet_like(
            lambda x: b.relu(b.bn1(b.conv1(x))),
            (b.layer1, b.layer2, b.layer3),
            lambda h: b.fc(b.avgpool(h).flatten(1)),
        ),
    )
    register_trunk(
        ResNet,
        lambda b: _resnet_like(
            lambda x: b.maxpool(b.relu(b.bn1(b.conv1(x)))),
            (b.layer1, b.layer2, b.layer3, b.layer4),
            lambda h: b.fc(torch.flatten(b.avgpool(h), 1)),
        ),
    )

    def mobilenet(b: nn.Module) -> Trunk:
        return Trunk(
            units=tuple(b.features),
            head=lambda h: b.classifier(torch.flatten(F.adaptive_avg_pool2d(h, (1, 1)), 1)),
            names=tuple(f"features.{i}" for i in range(len(b.features))),
        )

    register_trunk(MobileNetV2, mobilenet)
    register_trunk(VGG, _vgg)
    try:
        from timm.models.resnet import ResNet as TimmResNet
    except ImportError:  # timm is optional
        return
    register_trunk(
        TimmResNet,
        lambda b: _resnet_like(
            lambda x: b.maxpool(b.act1(b.bn1(b.conv1(x)))),
            (b.layer1, b.layer2, b.layer3, b.layer4),
            lambda h: b.forward_head(h),
        ),
    )


_register_builtin_trunks()


# ----------------------------------------------------------------------------------- unit costs, placement
def unit_profile(base: nn.Module, trunk: Trunk, input_shape: tuple[int, int, int]) -> list[tuple[State, int]]:
    """For each unit: its output (a meta tensor or tuple of them, batch 2) and its MACs per sample."""

    def run(m: nn.Module, x: Tensor) -> list[tuple[State, int]]:
        rows, h = [], x
        for unit in trunk.units:
            h, macs = count_per_sample(lambda u=unit, s=h: u(s))
            rows.append((h, macs))
        return rows

    return run_on_meta(base, run, torch.empty((1, *input_shape)))


def place_exits(unit_macs: Sequence[float], fractions: Sequence[float]) -> list[int]:
    """Unit indices after which early exits go, one per cumulative-MAC fraction (duplicates removed).

    Args:
        unit_macs: MACs of each unit of the trunk.
        fractions: increasing fractions in (0, 1) of the trunk's MACs.

    Returns:
        Sorted unit indices ``i`` (an exit after unit ``i``), never the last unit (that is the final exit).
        Each exit goes after the first unit whose cumulative cost reaches the fraction.
    """
    total = float(sum(unit_macs))
    cum = torch.tensor(list(unit_macs), dtype=torch.float64).cumsum(0) / total
    last = len(unit_macs) - 1
    positions = []
    for f in fractions:
        if not 0.0 < f < 1.0:
            raise ValueError(f"exit fractions must be in (0, 1), got {f}")
        i = int(torch.searchsorted(cum, torch.tensor(f - 1e-12, dtype=torch.float64)))
        if i < last and i not in positions:
            positions.append(i)
    if not positions:
        raise ValueError(f"no early exit fits the fractions {list(fractions)} on a trunk of {len(unit_macs)} units")
    return sorted(positions)


# ------------------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class ExitPlan:
    """Where the exits of a network go, and what they see.

    Attributes:
        trunk: the network cut into units.
        positions: unit indices after which the early exits sit.
        channels: channels of the feature map each early exit receives (the last tensor for multi-scale states).
        num_classes: outputs of the base classifier.
        unit_macs: MACs per sample of each unit at the probe resolution.
        in_channels: input channels of the network.
    """

    trunk: Trunk
    positions: list[int]
    channels: list[int]
    num_classes: int
    unit_macs: list[int]
    in_channels: int


def plan_exits(base: nn.Module, fractions: Sequence[float], *, probe_size: int = 32) -> ExitPlan:
    """Cut ``base`` into units and place one early exit per cumulative-MAC fraction (see :func:`place_exits`).

    The unit costs are probed on meta tensors at ``probe_size``×``probe_size``: relative costs, which fix the
    placement, barely depend on the resolution for convolutional networks.
    """
    from dynnet.convert import first_conv_in_channels

    in_channels = first_conv_in_channels(base) or 3
    trunk = trunk_of(base)
    profile = unit_profile(base, trunk, (in_channels, probe_size, probe_size))
    unit_macs = [m for _, m in profile]
    positions = place_exits(unit_macs, fractions)

    def last(s: State) -> Tensor:
        return s if isinstance(s, Tensor) else s[-1]

    channels = [last(profile[p][0]).shape[1] for p in positions]
    final = profile[-1][0]
    num_classes = run_on_meta(base, lambda m, *s: trunk.head(s[0] if len(s) == 1 else tuple(s)), *_as_tuple(final))
    return ExitPlan(trunk, positions, channels, int(num_classes.shape[1]), unit_macs, in_channels)


def _as_tuple(state: State) -> tuple[Tensor, ...]:
    return (state,) if isinstance(state, Tensor) else tuple(state)
