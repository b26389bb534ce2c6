"""Channel-sliced execution of a gated conv → ReLU → conv pair: the batch strategies and the batch-1 path.

:func:`sliced_pair` runs a batch with one of the strategies of :mod:`dynnet.kernels.channel` (``dense``,
``groups``, ``padded``, ``per_sample``, ``auto``); :func:`sliced_pair_single` runs one sample with as few kernel
launches as possible, on the compiled pair kernel when it applies; :func:`sliced_conv_in` reads only the active
input channels of one convolution. Imports :mod:`~dynnet.kernels.channel._spec` and
:mod:`~dynnet.kernels.channel._compiled`, within the package.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._ops import OpOverloadPacket

from dynnet.kernels import autotune
from dynnet.kernels.channel._compiled import compiled_op, native_conv3x3_in, pair_operands_ok, residual_ok
from dynnet.kernels.channel._spec import ConvSpec, conv_out_size, pair_out_hw

__all__ = [
    "STRATEGIES",
    "choose_strategy",
    "gated_pair_reference",
    "padded_slots",
    "sliced_conv_in",
    "sliced_pair",
    "sliced_pair_single",
    "timed_strategy",
]

STRATEGIES = ("auto", "dense", "groups", "padded", "per_sample")


def gated_pair_reference(
    x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, scale: Tensor, spec1: ConvSpec, spec2: ConvSpec
) -> Tensor:
    """Dense reference: ``conv2(relu(conv1(x)) * scale) + b2`` computing every channel.

    Args:
        x: Tensor[N, C_in, H, W].
        w1, b1: Tensor[C, C_in, k, k], Tensor[C] (first convolution, BN folded).
        w2, b2: Tensor[C_out, C, k, k], Tensor[C_out] (second convolution, BN folded).
        scale: Tensor[N, C] per-sample channel multipliers; 0 switches a channel off.
    """
    h = F.relu(spec1.conv(x, w1, b1)) * scale[:, :, None, None]
    return spec2.conv(h, w2, b2)


def choose_strategy(active: Tensor, strategy: str = "auto") -> str:
    """Resolve ``"auto"`` for a Tensor[N, C] bool mask of kept channels (see :mod:`dynnet.kernels.channel`)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy != "auto":
        return strategy
    n = active.shape[0]
    if bool(active.all()):
        return "dense"
    if n == 1:
        return "groups"
    distinct = torch.unique(active, dim=0).shape[0]
    if distinct <= max(1, n // 8):
        return "groups"
    return "padded"


def timed_strategy(active: Tensor, strategy: str, key: tuple, run: Callable[[str], object]) -> str:
    """Resolve ``strategy`` for the kept channels ``active`` Tensor[N, C] bool (:func:`choose_strategy`); under
    ``"auto"`` a sliced choice at batch > 1 is then timed once against ``"dense"`` for ``key`` (the caller's shapes,
    dtype, memory format, weights) and the decisions' density bucket (:mod:`dynnet.kernels.autotune`), and the faster
    one is returned. ``run(how)`` computes the kernel's result with strategy ``how``."""
    how = choose_strategy(active, strategy)
    if strategy != "auto" or how == "dense" or active.shape[0] == 1:
        return how
    sliced, density = how, float(active.sum()) / active.numel()
    candidates = {sliced: lambda: run(sliced), "dense": lambda: run("dense")}
    return autotune.choose((*key, sliced, autotune.density_bucket(density)), candidates) or sliced


def padded_slots(active: Tensor, scale: Tensor, binary: bool) -> tuple[Tensor, Tensor, int]:
    """Each sample's kept channels first (stable order), padded to the batch's largest kept count ``k_max``:
    ``(order Tensor[N, k_max] long, slot_scale Tensor[N, k_max], k_max)``; a padding slot's multiplier is 0, a kept
    one's is its ``scale`` (1 when ``binary``)."""
    counts = active.sum(1)
    kmax = int(counts.max())
    order = torch.sort((~active).to(torch.int8), dim=1, stable=True).indices[:, :kmax]
    valid = torch.arange(kmax, device=active.device) < counts[:, None]
    slot_scale = valid.to(scale.dtype) if binary else torch.gather(scale, 1, order) * valid
    return order, slot_scale, kmax


def run_groups(
    x: Tensor,
    active: Tensor,
    how: str,
    mult: Tensor | None,
    empty: Tensor,
    run_slice: Callable[[Tensor, Tensor | None, Tensor], Tensor],
) -> tuple[Tensor, Tensor]:
    """The ``"groups"`` and ``"per_sample"`` strategies: ``run_slice(x_s, mult_s, channels)`` once per group of
    samples that keep the same channels (:func:`sample_groups`), its output copied into ``empty`` (the output of a
    sample that keeps nothing: the folded bias, Tensor[N, ...], written in place).

    Args:
        x: Tensor[N, ...] the input.
        active: Tensor[N, C] bool, the kept channels.
        how: ``"groups"`` or ``"per_sample"``.
        mult: Tensor[N, C] multipliers, or ``None`` (binary).
        empty: the output where nothing is kept.
        run_slice: the kernel for some samples ``x_s`` Tensor[M, ...], their multipliers Tensor[M, C] (or
            ``None``) and one channel slice Tensor[k] long.

    Returns:
        ``(y, executed)``: the output and Tensor[N] float64, the channels each sample kept.
    """
    n, counts = x.shape[0], active.sum(1).double()
    for samples, mask in sample_groups(active, how):
        channels = mask.nonzero().squeeze(1)
        if channels.numel() == 0:
            continue  # the output is the folded bias alone: no MACs
        if samples.numel() == n:
            return run_slice(x, mult, channels), counts
        ms = None if mult is None else mult.index_select(0, samples)
        empty.index_copy_(0, samples, run_slice(x.index_select(0, samples), ms, channels))
    return empty, counts


def sample_groups(active: Tensor, how: str) -> list[tuple[Tensor, Tensor]]:
    """The samples that run one channel slice together: ``(sample indices Tensor[S], mask Tensor[C])`` per group.

    Args:
        active: Tensor[N, C] bool, each sample's kept channels.
        how: ``"per_sample"`` (one group per sample) or ``"groups"`` (one per distinct mask).
    """
    if how == "per_sample":
        return [(torch.tensor([i], device=active.device), active[i]) for i in range(active.shape[0])]
    if how == "groups":
        masks, inverse = torch.unique(active, dim=0, return_inverse=True)
        return [((inverse == g).nonzero().squeeze(1), masks[g]) for g in range(masks.shape[0])]
    raise ValueError(f"unknown strategy {how!r}")


def _run_slice(
    x: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    scale: Tensor | None,
    channels: Tensor,
    spec1: ConvSpec,
    spec2: ConvSpec,
) -> Tensor:
    """One weight slice for every sample of ``x`` (Tensor[M, C_in, H, W]); ``channels`` Tensor[k] long."""
    h = F.relu(spec1.conv(x, w1.index_select(0, channels), b1.index_select(0, channels)))
    if scale is not None:
        h = h * scale.index_select(1, channels)[:, :, None, None]
    return spec2.conv(h, w2.index_select(1, channels), b2)


def _pair_macs(args: tuple, kwargs: dict, out: object) -> int:
    """MAC rule of ``torch.ops.dynnet.sliced_pair3x3``: ``k · (C_in + C_out) · 9 · H_out · W_out`` (``k`` the inner
    channels kept)."""
    x, w2 = args[0], args[3]
    y, kept = out  # type: ignore[misc]
    return int(kept) * (x.shape[1] + w2.shape[0]) * 9 * y.shape[2] * y.shape[3]


def _native_pair(
    x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, s: Tensor, spec1: ConvSpec, spec2: ConvSpec
) -> OpOverloadPacket | None:
    """The compiled pair op (``torch.ops.dynnet.sliced_pair3x3``) when it can run this batch-1 pair (see
    :func:`~dynnet.kernels.channel._compiled.pair_operands_ok`; ``s`` Tensor[C] float32 multipliers), else
    ``None``."""
    if s.dtype != torch.float32 or not pair_operands_ok(x, w1, b1, w2, b2, spec1, spec2):
        return None
    return compiled_op("sliced_pair3x3", _pair_macs)


def sliced_pair_single(
    x: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    scale: Tensor,
    spec1: ConvSpec,
    spec2: ConvSpec,
    *,
    binary: bool = False,
    residual: Tensor | None = None,
    relu: bool = False,
) -> tuple[Tensor, int]:
    """:func:`sliced_pair` for one sample, with as few kernel launches as possible (the batch-1 inference path).

    At batch 1 a ResNet-20 block's convolutions take tens of microseconds, so every extra op (mask comparison,
    ``all()``, ``sum()``, a count tensor) costs a visible fraction of the saving. Here the kept channels come from
    one ``nonzero`` on ``scale`` itself; every channel kept → the plain convolutions (no slicing); none kept →
    the folded bias ``b2`` (no MACs); otherwise one weight slice.

    Args:
        x: Tensor[1, C_in, H, W].
        w1, b1, w2, b2, spec1, spec2: as :func:`sliced_pair` (BN folded).
        scale: Tensor[1, C] or Tensor[C] channel multipliers (0 = off).
        binary: the kept channels are multiplied by 1 (only the non-zero positions of ``scale`` matter).
        residual: Tensor[1, C_out, H', W'] added to the result (the block's shortcut), or ``None``.
        relu: apply a ReLU at the end (after the residual): with both, the whole basic block's output, which the
            compiled kernel computes in its epilogue.

    Returns:
        ``(y, k)``: Tensor[1, C_out, H', W'] and the number of inner channels computed.
    """
    s = scale.reshape(-1)
    op = _native_pair(x, w1, b1, w2, b2, s, spec1, spec2)
    if op is not None and (residual is None or residual_ok(residual)):
        res = None if residual is None else residual.contiguous()
        return op(x.contiguous(), w1, b1, w2, b2, s.contiguous(), binary, spec1.stride[0], res, relu)
    y, k = _sliced_pair_single_torch(x, w1, b1, w2, b2, s, spec1, spec2, binary)
    if residual is not None:
        y = residual + y
    return (y.relu() if relu else y), k


def _sliced_pair_single_torch(
    x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, s: Tensor, spec1: ConvSpec, spec2: ConvSpec, binary: bool
) -> tuple[Tensor, int]:
    """The PyTorch path of :func:`sliced_pair_single` (``s``: Tensor[C] multipliers)."""
    channels = s.nonzero().squeeze(1)
    k, c = channels.shape[0], s.shape[0]
    if k == c:  # all on: no slicing
        h = spec1.conv(x, w1, b1).relu_()
        if not binary:
            h = h * s[None, :, None, None]
        return spec2.conv(h, w2, b2), k
    if k == 0:
        ho, wo = pair_out_hw(spec1, spec2, x, w1, w2)
        return b2.view(1, -1, 1, 1).expand(x.shape[0], -1, ho, wo), 0
    h = spec1.conv(x, w1.index_select(0, channels), b1.index_select(0, channels)).relu_()
    if not binary:
        h = h * s.index_select(0, channels)[None, :, None, None]
    return spec2.conv(h, w2.index_select(1, channels), b2), k


def sliced_pair(
    x: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    scale: Tensor,
    spec1: ConvSpec,
    spec2: ConvSpec,
    *,
    binary: bool = False,
    strategy: str = "auto",
) -> tuple[Tensor, Tensor]:
    """``conv2(relu(conv1(x)) * scale) + b2`` computing only the channels with ``scale != 0``.

    Args:
        x: Tensor[N, C_in, H, W].
        w1, b1: Tensor[C, C_in, k, k], Tensor[C] first convolution (BN folded).
        w2, b2: Tensor[C_out, C, k, k], Tensor[C_out] second convolution (BN folded).
        scale: Tensor[N, C] channel multipliers (0 = off).
        spec1, spec2: geometry of the two convolutions.
        binary: the kept channels are multiplied by 1: only the positions of the non-zeros of ``scale`` matter
            (its values are ignored), and the multiplication is skipped.
        strategy: one of :data:`STRATEGIES`.

    Returns:
        ``(y, executed)``: Tensor[N, C_out, H', W'] and Tensor[N] float64 — the number of inner channels the
        kernels really computed for each sample (``k_n``, ``k_max`` for ``"padded"``, ``C`` for ``"dense"``).
    """
    n, c = scale.shape
    if x.shape[0] != n or w1.shape[0] != c or w2.shape[1] != c:
        raise ValueError(
            f"shapes disagree: x {tuple(x.shape)}, scale {tuple(scale.shape)}, "
            f"w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}"
        )
    if n == 1 and strategy in ("auto", "groups", "per_sample"):  # one slice, no grouping work
        y, k = sliced_pair_single(x, w1, b1, w2, b2, scale, spec1, spec2, binary=binary)
        return y, torch.full((1,), float(k), dtype=torch.float64, device=x.device)
    active = scale != 0
    key = ("sliced_pair", tuple(x.shape), x.dtype, x.is_contiguous(memory_format=torch.channels_last),
           tuple(w1.shape), tuple(w2.shape), spec1, spec2, binary)  # fmt: skip
    run = lambda how: _run_pair(how, x, w1, b1, w2, b2, scale, active, spec1, spec2, binary)  # noqa: E731
    return run(timed_strategy(active, strategy, key, run))


def _run_pair(
    how: str,
    x: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    scale: Tensor,
    active: Tensor,
    spec1: ConvSpec,
    spec2: ConvSpec,
    binary: bool,
) -> tuple[Tensor, Tensor]:
    """:func:`sliced_pair` with a resolved strategy ``how`` (not ``"auto"``); ``active``: Tensor[N, C] bool,
    ``scale != 0``."""
    n, c = scale.shape
    mult = None if binary else scale
    if how == "dense":
        h = F.relu(spec1.conv(x, w1, b1))
        if mult is not None:
            h = h * scale[:, :, None, None]
        elif not bool(active.all()):
            h = h * active.to(h.dtype)[:, :, None, None]
        return spec2.conv(h, w2, b2), torch.full((n,), float(c), dtype=torch.float64, device=x.device)
    ho, wo = pair_out_hw(spec1, spec2, x, w1, w2)
    if how == "padded":
        return _padded(x, w1, b1, w2, b2, scale, active, active.sum(1), spec1, spec2, (ho, wo), binary)
    empty = b2.view(1, -1, 1, 1).expand(n, -1, ho, wo).contiguous()  # the block's branch with nothing kept
    return run_groups(
        x, active, how, mult, empty, lambda xs, ms, ch: _run_slice(xs, w1, b1, w2, b2, ms, ch, spec1, spec2)
    )


def _padded(
    x: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    scale: Tensor,
    active: Tensor,
    counts: Tensor,
    spec1: ConvSpec,
    spec2: ConvSpec,
    out_hw: tuple[int, int],
    binary: bool,
) -> tuple[Tensor, Tensor]:
    """Every sample's own slice in one grouped convolution (``groups = N``), padded to ``k_max`` channels."""
    n = scale.shape[0]
    kmax = int(counts.max())
    executed = torch.full((n,), float(kmax), dtype=torch.float64, device=x.device)
    if kmax == 0:
        return b2.view(1, -1, 1, 1).expand(n, -1, *out_hw).contiguous(), executed
    order, slot_scale, _ = padded_slots(active, scale, binary)  # kept channels first, then padding slots (0)
    flat = order.reshape(-1)
    cin, hh, ww = x.shape[1:]
    h = spec1.conv(x.reshape(1, n * cin, hh, ww), w1.index_select(0, flat), b1.index_select(0, flat), groups=n)
    h = F.relu(h) * slot_scale.reshape(1, -1, 1, 1)
    cout = w2.shape[0]
    # Tensor[N, C_out, k_max, kh, kw] → Tensor[N·C_out, k_max, kh, kw]: sample n's conv2 reads its own slots.
    w2n = (
        w2.index_select(1, flat)
        .view(cout, n, kmax, *w2.shape[2:])
        .transpose(0, 1)
        .reshape(n * cout, kmax, *w2.shape[2:])
    )
    y = spec2.conv(h, w2n, b2.repeat(n), groups=n)
    return y.view(n, cout, *y.shape[2:]), executed


def sliced_conv_in(
    h: Tensor, w: Tensor, b: Tensor, active: Tensor, spec: ConvSpec, *, strategy: str = "auto"
) -> tuple[Tensor, Tensor]:
    """``conv(h * active; w) + b`` reading only the active input channels of each sample (input-side skipping).

    Args:
        h: Tensor[N, C, H, W] the convolution's input.
        w, b: Tensor[C_out, C, k, k], Tensor[C_out] (BN folded).
        active: Tensor[N, C] bool, the input channels each sample keeps.
        spec: the convolution's geometry.
        strategy: one of :data:`STRATEGIES`.

    Returns:
        ``(y, executed)``: Tensor[N, C_out, H', W'] and Tensor[N] float64, the input channels really read.
    """
    n, c = active.shape
    if n == 1 and strategy in ("auto", "groups", "per_sample"):  # one slice: no strategy choice, one nonzero
        fast = native_conv3x3_in(h, w, b, active, spec)
        if fast is not None:
            y, k = fast
            return y, torch.full((1,), float(k), dtype=torch.float64, device=h.device)
        channels = active.reshape(-1).nonzero().squeeze(1)
        k = channels.shape[0]
        executed = torch.full((1,), float(k), dtype=torch.float64, device=h.device)
        if k == c:
            return spec.conv(h, w, b), executed
        if k == 0:
            ho, wo = (conv_out_size(h.shape[2 + d], w.shape[2 + d], spec, d) for d in range(2))
            return b.view(1, -1, 1, 1).expand(1, -1, ho, wo), executed
        return spec.conv(h.index_select(1, channels), w.index_select(1, channels), b), executed
    how = choose_strategy(active, strategy)
    counts = active.sum(1)
    if how == "dense":
        if not bool(active.all()):
            h = h * active.to(h.dtype)[:, :, None, None]
        return spec.conv(h, w, b), torch.full((n,), float(c), dtype=torch.float64, device=h.device)
    if how == "padded":
        kmax = int(counts.max())
        if kmax > 0:
            order = torch.sort((~active).to(torch.int8), dim=1, stable=True).indices[:, :kmax]  # Tensor[N, k_max]
            valid = (torch.arange(kmax, device=h.device) < counts[:, None]).to(h.dtype)
            hs = torch.gather(h, 1, order[:, :, None, None].expand(-1, -1, *h.shape[2:])) * valid[:, :, None, None]
            cout = w.shape[0]
            wn = w.index_select(1, order.reshape(-1)).view(cout, n, kmax, *w.shape[2:]).transpose(0, 1)
            y = spec.conv(
                hs.reshape(1, n * kmax, *h.shape[2:]), wn.reshape(n * cout, kmax, *w.shape[2:]), b.repeat(n), n
            )
            return y.view(n, cout, *y.shape[2:]), torch.full((n,), float(kmax), dtype=torch.float64, device=h.device)
        how = "groups"
    ho, wo = (conv_out_size(h.shape[2 + d], w.shape[2 + d], spec, d) for d in range(2))
    out = b.view(1, -1, 1, 1).expand(n, -1, ho, wo).contiguous()
    if how == "per_sample":
        groups = [(torch.tensor([i], device=h.device), active[i]) for i in range(n)]
    else:
        masks, inverse = torch.unique(active, dim=0, return_inverse=True)
        groups = [((inverse == g).nonzero().squeeze(1), masks[g]) for g in range(masks.shape[0])]
    for samples, mask in groups:
        channels = mask.nonzero().squeeze(1)
        if channels.numel() == 0:
            continue
        hs = h.index_select(0, samples).index_select(1, channels)
        out.index_copy_(0, samples, spec.conv(hs, w.index_select(1, channels), b))
    return out, counts.double()
