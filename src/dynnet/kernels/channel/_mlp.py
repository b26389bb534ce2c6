"""Channel-sliced execution of a gated token MLP: linear → activation → linear over each position's channels.

ConvNeXt's block ends in such an MLP (``C → 4C → C`` on every position, channels last). Its gated channels are the
hidden ones: for a sample whose kept hidden channels are ``S`` (|S| = k of the hidden width D)

    ``y = (act(t W1[S]ᵀ + b1[S]) * scale[S]) W2[:, S]ᵀ + b2``

for every token ``t`` (Tensor[C]) of the sample, so both linear layers cost ``k / D`` of their dense MACs.

Strategies as :func:`~dynnet.kernels.channel.sliced_pair` (``dense``, ``groups``, ``padded``, ``per_sample``,
``auto``): ``padded`` gathers each sample's own rows of ``W1`` and columns of ``W2`` (padded to the batch's largest
``k``) and runs two batched matrix products; ``auto`` is timed against ``dense`` (:mod:`dynnet.kernels.autotune`).
Imports :mod:`~dynnet.kernels.channel._sliced` (for the strategy choice).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dynnet.kernels.channel._sliced import padded_slots, run_groups, timed_strategy

__all__ = ["mlp_reference", "sliced_mlp"]

Activation = Callable[[Tensor], Tensor]


def mlp_reference(t: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, scale: Tensor,
                  act: Activation) -> Tensor:  # fmt: skip
    """Dense reference computing every hidden channel: tokens t Tensor[N, P, C], w1 Tensor[D, C], w2 Tensor[C_out, D],
    scale Tensor[N, D] → Tensor[N, P, C_out]."""
    return F.linear(act(F.linear(t, w1, b1)) * scale[:, None, :], w2, b2)


def _slice(t: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, mult: Tensor | None,
           channels: Tensor, act: Activation) -> Tensor:  # fmt: skip
    """One hidden-channel slice (Tensor[k] long) for every sample of t Tensor[M, P, C]; ``mult`` Tensor[M, D] or
    ``None`` (binary)."""
    h = act(F.linear(t, w1.index_select(0, channels), None if b1 is None else b1.index_select(0, channels)))
    if mult is not None:
        h = h * mult.index_select(1, channels)[:, None, :]
    return F.linear(h, w2.index_select(1, channels), b2)


def _padded(t: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, scale: Tensor, active: Tensor,
            binary: bool, act: Activation) -> Tensor:  # fmt: skip
    """Every sample's own slice, padded to the batch's largest kept count ``k_max`` (> 0): two batched products."""
    order, slot_scale, _ = padded_slots(active, scale, binary)  # kept first, Tensor[N, k_max]
    h = torch.bmm(t, w1[order].transpose(1, 2))  # Tensor[N, P, k_max]
    if b1 is not None:
        h = h + b1[order][:, None, :]
    h = act(h) * slot_scale[:, None, :]
    y = torch.bmm(h, w2.t()[order])  # Tensor[N, P, C_out]
    return y if b2 is None else y + b2


def _run(how: str, t: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, scale: Tensor,
         active: Tensor, binary: bool, act: Activation) -> tuple[Tensor, Tensor]:  # fmt: skip
    """:func:`sliced_mlp` with a resolved strategy ``how``: ``(y, executed)``."""
    n, d = scale.shape
    counts = active.sum(1)
    bias = (t.new_zeros(w2.shape[0]) if b2 is None else b2).view(1, 1, -1)
    if how == "dense":
        s = active.to(t.dtype) if binary else scale
        executed = torch.full((n,), float(d), dtype=torch.float64, device=t.device)
        return mlp_reference(t, w1, b1, w2, b2, s, act), executed
    if how == "padded":
        kmax = int(counts.max())
        executed = torch.full((n,), float(kmax), dtype=torch.float64, device=t.device)
        if kmax > 0:
            return _padded(t, w1, b1, w2, b2, scale, active, binary, act), executed
        return bias.expand(n, t.shape[1], -1).contiguous(), executed
    mult = None if binary else scale
    empty = bias.expand(n, t.shape[1], -1).contiguous()  # the second layer's bias
    return run_groups(t, active, how, mult, empty, lambda ts, ms, ch: _slice(ts, w1, b1, w2, b2, ms, ch, act))


def sliced_mlp(
    t: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    scale: Tensor,
    act: Activation,
    *,
    binary: bool = False,
    strategy: str = "auto",
) -> tuple[Tensor, Tensor]:
    """A token MLP computing only the hidden channels with ``scale != 0``.

    Args:
        t: Tensor[N, P, C] tokens (``P`` positions per sample).
        w1, b1: first linear layer Tensor[D, C], Tensor[D] (or ``None``).
        w2, b2: second linear layer Tensor[C_out, D], Tensor[C_out] (or ``None``).
        scale: Tensor[N, D] multipliers of the hidden channels after the activation (0 = off).
        act: the element-wise activation between the layers (GELU in ConvNeXt).
        binary: the kept channels are multiplied by 1 (only the positions of the non-zeros of ``scale`` matter).
        strategy: one of :data:`~dynnet.kernels.channel.STRATEGIES`.

    Returns:
        ``(y, executed)``: Tensor[N, P, C_out] and Tensor[N] float64 — the hidden channels the kernels really
        computed for each sample (``k_n``, ``k_max`` for ``"padded"``, ``D`` for ``"dense"``).
    """
    n, d = scale.shape
    if t.dim() != 3 or t.shape[0] != n or w1.shape != (d, t.shape[2]) or w2.shape[1] != d:
        raise ValueError(
            f"shapes disagree: tokens {tuple(t.shape)}, scale {tuple(scale.shape)}, w1 {tuple(w1.shape)}, "
            f"w2 {tuple(w2.shape)}"
        )
    active = scale != 0
    key = ("sliced_mlp", tuple(t.shape), t.dtype, tuple(w1.shape), tuple(w2.shape), binary)
    run = lambda how: _run(how, t, w1, b1, w2, b2, scale, active, binary, act)  # noqa: E731
    return run(timed_strategy(active, strategy, key, run))
