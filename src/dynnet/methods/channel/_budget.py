"""Budgets of the channel family: from a target MAC fraction to the channel family's own knobs.

A budget is the target mean fraction of the dense MACs per image. The gated MACs of a channel-gated block are linear
in its kept channels, so the recipes whose paper knob is a kept fraction (FBS's k-WTA density, dynamic channel
execution's ``k``, batch shaping's prior mean, the channels instance sparsity's feature decay spares) derive it
from the budget with the helpers here:

* :func:`variable_rate` — from a trace: the fraction ``ρ`` of every dynamic part's variable MACs (between its
  ``minimum`` and ``maximum``) at which the network spends the budget, ``(b·D − Σ min) / (Σ max − Σ min)``;
* :func:`gated_profile` / :func:`derive_fraction` — at conversion, without data: the MACs of the blocks' gated parts
  probed on meta tensors at a nominal input, and the kept fraction whose MAC fraction is closest to the budget;
* :func:`kept_channels` — the per-block rounding of a kept fraction. Each block rounds with its own phase, so the
  blocks' one-channel steps interleave instead of falling on the same fraction (a finer step function for
  calibration);
* :func:`top_k_keep` — which ``k`` channels: the ``k`` highest scores, ties to the lowest index (FBS's
  k-winners-take-all, dynamic channel execution's bandit).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from dynnet.core import DynamicModel, Trace
from dynnet.core.block import probe_macs

__all__ = [
    "NOMINAL_SIZE",
    "ROUNDING_SLACK",
    "block_phases",
    "derive_fraction",
    "gated_profile",
    "kept_channels",
    "top_k_keep",
    "variable_rate",
]

# Spatial size of the nominal input the conversion-time derivations probe (the CIFAR / Fashion-MNIST scale). The
# fraction of the MACs in the gated blocks barely depends on it (the convolutions all scale with H·W); calibration
# on real data then sets the exact value.
NOMINAL_SIZE = 32
# Added to ``fraction · C + phase`` before rounding down, so that a fraction stored in float32 (or computed as j / C)
# that should give exactly j channels does not give j - 1.
ROUNDING_SLACK = 1e-6


def variable_rate(t: Trace, budget: float) -> float:
    """The fraction of the variable MACs at which a network spends ``budget``, clamped to [0, 1].

    Every part recorded in ``t`` costs between its ``minimum`` and ``maximum`` MACs per sample (gates and the static
    part: ``minimum = maximum``); spending ``ρ`` of every part's range gives the MAC fraction
    ``(Σ min + ρ (Σ max − Σ min)) / D``. For channel-gated blocks ``ρ`` is the kept-channel rate.
    """
    lo, hi, dense = t.min_macs(), t.max_macs(), t.dense_macs()
    if hi - lo <= 0:
        return 1.0
    return min(1.0, max(0.0, (budget * dense - lo) / (hi - lo)))


def block_phases(n: int) -> list[float]:
    """Rounding phases of ``n`` blocks, ``(i + 1/2) / n``: spread over [0, 1) so that their steps interleave."""
    return [(i + 0.5) / n for i in range(n)]


def kept_channels(fraction: float, channels: int, phase: float) -> int:
    """``clamp(floor(fraction · C + phase), 1, C)``: a kept fraction rounded to channels (``phase`` in [0, 1): 1/2
    rounds to the nearest; just below 1, up). Monotone in ``fraction``; every channel at ``fraction = 1``."""
    return min(channels, max(1, math.floor(fraction * channels + (phase + ROUNDING_SLACK))))


def top_k_keep(scores: Tensor, k: int | Tensor) -> Tensor:
    """Tensor[..., C] bool: the ``k`` highest scores along the last dimension (ties: the lowest index).

    ``k`` (in ``[1, C]``) may be a 0-dim tensor (computed from a buffer): no value leaves the device, so tracing,
    export and meta-tensor cost probes run it too.
    """
    # Not topk: its choice among equal values is unspecified (and differs from the compiled kernel's), and FBS's
    # predictor starts with every saliency equal. Keep what beats the k-th highest score, then the scores equal to it
    # from the lowest index on until k are kept: sorted values, comparisons and a cumsum, which every exporter takes
    # (ranking by the indices of a stable sort does not export to ONNX: it has no stable sort).
    k = torch.as_tensor(k, device=scores.device).to(torch.long)
    kth = torch.sort(scores, dim=-1, descending=True).values.index_select(-1, (k - 1).view(1))  # Tensor[..., 1]
    above, tied = scores > kth, scores == kth
    return above | (tied & (tied.cumsum(-1) <= k - above.sum(-1, keepdim=True)))


def gated_profile(
    model: DynamicModel, blocks: Sequence[nn.Module], gate_parts: Sequence[str] = ()
) -> tuple[float, float, list[float]]:
    """``(dense, fixed, bodies)``: per-sample MACs of ``model``'s dense network, of what does not depend on the
    blocks' kept channels (static part, gates ``gate_parts`` of each block), and of each block's gated part, probed
    on meta tensors (nothing is computed) at a nominal ``C × 32 × 32`` input.

    Args:
        model: the converted model (its ``run`` walks the blocks).
        blocks: channel-gated blocks (with ``gated_body(x)``, else ``body(x)``); their ``cost`` caches keep the
            probes.
        gate_parts: names of the blocks' decision submodules whose cost is added per block (``"saliency"``).
    """
    shapes: dict[int, tuple[int, ...]] = {}

    def record(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:  # returns None: the block's input is left as it is
            shapes.setdefault(i, tuple(args[0].shape[1:]))

        return hook

    hooks = [b.register_forward_pre_hook(record(i)) for i, b in enumerate(blocks)]
    x = torch.empty((1, model.in_channels or 3, NOMINAL_SIZE, NOMINAL_SIZE), device="meta")
    try:
        dense = float(probe_macs(model, lambda m, inp: m.run(inp), x))
    finally:
        for h in hooks:
            h.remove()
    bodies, gates = [], 0.0
    for i, b in enumerate(blocks):
        if i not in shapes:
            raise ValueError(f"block {getattr(b, 'block_name', i)!r} did not run on the nominal input")
        inp = torch.empty((1, *shapes[i]), device="meta")
        # The part linear in the kept channels (a Bottleneck's conv3 is not: it counts with the fixed MACs).
        bodies.append(
            float(b.cost("gated", lambda m, v: m.gated_body(v) if hasattr(m, "gated_body") else m.body(v), inp))
        )
        for part in gate_parts:
            gates += float(b.cost(part, lambda m, v, p=part: getattr(m, p)(v), inp))
    return dense, dense - sum(bodies) + gates, bodies


def derive_fraction(
    model: DynamicModel, blocks: Sequence[nn.Module], budget: float, channels: Callable[[float, int], int],
    gate_parts: Sequence[str] = (),
) -> float:  # fmt: skip
    """The kept fraction whose MAC fraction on the nominal input is closest to ``budget`` (bisection on the
    monotone step function; ``budget >= 1``: every channel).

    Args:
        model: the converted model.
        blocks: its channel-gated blocks (``channels`` attribute: C), in execution order.
        budget: target MAC fraction.
        channels: ``channels(fraction, i)`` — block ``i``'s kept channels at a kept fraction.
        gate_parts: the blocks' decision submodules whose MACs count (see :func:`gated_profile`).
    """
    if budget >= 1.0 - 1e-9:
        return 1.0
    dense, fixed, bodies = gated_profile(model, blocks, gate_parts)

    def fraction(f: float) -> float:
        return (
            fixed
            + sum(channels(f, i) / b.channels * body for i, (b, body) in enumerate(zip(blocks, bodies, strict=True)))
        ) / dense

    low, high = 0.0, 1.0
    best = min((low, high), key=lambda f: abs(fraction(f) - budget))
    for _ in range(40):
        mid = 0.5 * (low + high)
        f_mid = fraction(mid)
        if abs(f_mid - budget) < abs(fraction(best) - budget):
            best = mid
        if f_mid < budget:
            low = mid
        else:
            high = mid
    return best
