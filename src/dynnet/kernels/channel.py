"""Channel-sliced execution of a conv → ReLU → conv pair whose inner channels are gated per input.

A residual block's inner channels (the outputs of ``conv1``, the inputs of ``conv2``) can be switched off per
input without changing the block's output width. For a sample whose kept inner channels are ``S`` (|S| = k of C)
the kernels below run

    ``y = conv2(relu(conv1(x; W1[S], b1[S])) * scale[S]; W2[:, S]) + b2``

i.e. ``conv1`` computes only the kept output channels and ``conv2`` reads only the kept input channels: both cost
``k / C`` of their dense MACs and nothing is computed for the gated-off channels. Batch norms are folded into the
convolutions first (:func:`fold_bn`, inference only), so slicing the folded weight slices the normalisation
consistently.

Strategies for a batch (each returns the same values; they differ in speed and in executed MACs):

* ``"dense"``  — every channel of every sample is on: the plain convolutions (the all-on fast path);
* ``"groups"`` — samples with identical masks are gathered and run with one weight slice per distinct mask
  (executed MACs = theoretical MACs). Best when masks repeat (nested widths, RNP, batch 1);
* ``"padded"`` — one grouped convolution (``groups = N``) with every sample's own weight slice, padded to the
  largest kept count ``k_max`` of the batch (executed MACs = ``k_max`` per sample; exact when all samples keep
  the same number of channels, as k-winners-take-all does);
* ``"per_sample"`` — a loop over samples (executed = theoretical; the reference for the other two);
* ``"auto"`` — ``dense`` when everything is on, otherwise ``groups`` when there are few distinct masks
  (at most ``max(1, N // 8)``), otherwise ``padded``: on the shared 2-core CPU of
  ``benchmarks/channel_strategies.py`` (very noisy timings) one padded grouped convolution beat a loop over
  ~N distinct masks by 3-10× at batch 64, even with 30-40 % padding waste.

All functions are pure: per-batch masks are arguments, never module state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "STRATEGIES",
    "ConvSpec",
    "choose_strategy",
    "fold_bn",
    "gated_pair_reference",
    "gated_rest_conv",
    "sliced_conv_in",
    "sliced_pair",
]

STRATEGIES = ("auto", "dense", "groups", "padded", "per_sample")


@dataclass(frozen=True)
class ConvSpec:
    """Geometry of a 2-D convolution with ``groups == 1`` (taken from an ``nn.Conv2d``)."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @classmethod
    def of(cls, conv: nn.Conv2d) -> ConvSpec:
        if conv.groups != 1 or not isinstance(conv.padding, tuple):
            raise ValueError(f"channel slicing needs a dense convolution with numeric padding, got {conv}")
        return cls(tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation))  # type: ignore[arg-type]

    def conv(self, x: Tensor, w: Tensor, b: Tensor | None = None, groups: int = 1) -> Tensor:
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, groups)


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode batch norm into the preceding convolution.

    Returns:
        ``(weight, bias)``: Tensor[C_out, C_in, kh, kw] and Tensor[C_out] with ``bn(conv(x)) == conv(x; weight, bias)``.
    """
    if bn.training or bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_bn needs a batch norm in eval mode with running statistics")
    inv = torch.rsqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(inv)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(inv)
    w = conv.weight * (gamma * inv).view(-1, 1, 1, 1)
    b = beta - bn.running_mean * gamma * inv
    if conv.bias is not None:
        b = b + conv.bias * gamma * inv
    return w, b


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
    """Resolve ``"auto"`` for a Tensor[N, C] bool mask of kept channels (see the module docstring)."""
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


def _out_hw(spec1: ConvSpec, spec2: ConvSpec, x: Tensor, w1: Tensor, w2: Tensor) -> tuple[int, int]:
    size = []
    for d in range(2):
        s = x.shape[2 + d]
        for spec, w in ((spec1, w1), (spec2, w2)):
            k = w.shape[2 + d]
            s = (s + 2 * spec.padding[d] - spec.dilation[d] * (k - 1) - 1) // spec.stride[d] + 1
        size.append(s)
    return size[0], size[1]


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
        binary: ``scale`` holds only 0/1 values, so the multiplication is skipped.
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
    active = scale != 0
    mult = None if binary else scale
    how = choose_strategy(active, strategy)
    if how == "dense":
        h = F.relu(spec1.conv(x, w1, b1))
        if mult is not None or not bool(active.all()):
            h = h * scale[:, :, None, None]
        return spec2.conv(h, w2, b2), torch.full((n,), float(c), dtype=torch.float64, device=x.device)
    ho, wo = _out_hw(spec1, spec2, x, w1, w2)
    counts = active.sum(1)
    if how == "padded":
        return _padded(x, w1, b1, w2, b2, scale, active, counts, spec1, spec2, (ho, wo))
    if n == 1 and how in ("groups", "per_sample"):  # batch 1: one slice, no grouping work
        channels = active[0].nonzero().squeeze(1)
        if channels.numel() == 0:
            return b2.view(1, -1, 1, 1).expand(1, -1, ho, wo).contiguous(), counts.double()
        return _run_slice(x, w1, b1, w2, b2, mult, channels, spec1, spec2), counts.double()
    out = b2.view(1, -1, 1, 1).expand(n, -1, ho, wo).contiguous()
    if how == "per_sample":
        groups = [(torch.tensor([i], device=x.device), active[i]) for i in range(n)]
    elif how == "groups":
        masks, inverse = torch.unique(active, dim=0, return_inverse=True)
        groups = [((inverse == g).nonzero().squeeze(1), masks[g]) for g in range(masks.shape[0])]
    else:
        raise ValueError(f"unknown strategy {how!r}")
    for samples, mask in groups:
        channels = mask.nonzero().squeeze(1)
        if channels.numel() == 0:
            continue  # the block's branch is the folded BN bias alone: no MACs
        if samples.numel() == n:
            return _run_slice(x, w1, b1, w2, b2, mult, channels, spec1, spec2), counts.double()
        xs = x.index_select(0, samples)
        ms = None if mult is None else mult.index_select(0, samples)
        out.index_copy_(0, samples, _run_slice(xs, w1, b1, w2, b2, ms, channels, spec1, spec2))
    return out, counts.double()


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
) -> tuple[Tensor, Tensor]:
    """Every sample's own slice in one grouped convolution (``groups = N``), padded to ``k_max`` channels."""
    n = scale.shape[0]
    kmax = int(counts.max())
    executed = torch.full((n,), float(kmax), dtype=torch.float64, device=x.device)
    if kmax == 0:
        return b2.view(1, -1, 1, 1).expand(n, -1, *out_hw).contiguous(), executed
    # Kept channels first (stable order), then padding slots whose multiplier is 0.
    order = torch.sort((~active).to(torch.int8), dim=1, stable=True).indices[:, :kmax]  # Tensor[N, k_max]
    slot_scale = torch.gather(scale, 1, order) * (torch.arange(kmax, device=x.device) < counts[:, None])
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
    # Output geometry from a zero-channel probe would cost nothing, but computing it directly is clearer.
    ho = (h.shape[2] + 2 * spec.padding[0] - spec.dilation[0] * (w.shape[2] - 1) - 1) // spec.stride[0] + 1
    wo = (h.shape[3] + 2 * spec.padding[1] - spec.dilation[1] * (w.shape[3] - 1) - 1) // spec.stride[1] + 1
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


def gated_rest_conv(x_rest: Tensor, w_rest: Tensor, gate: Tensor, spec: ConvSpec) -> Tensor:
    """The rest of a convolution's partial sum, computed only at the gated-on (output channel, position) entries.

    Used by channel gating (Hua et al.): ``y = p + gate · conv(x_rest; w_rest)``. For each output channel ``o``
    the input patches of its active positions are gathered from the unfolded input and multiplied by ``w_rest[o]``
    in one matrix product, so exactly ``C_rest · k · k`` MACs are spent per active entry.

    Args:
        x_rest: Tensor[N, C_rest, H, W] the input channels outside the base group.
        w_rest: Tensor[C_out, C_rest, k, k].
        gate: Tensor[N, C_out, H', W'] bool, where the rest is computed.
        spec: the convolution's geometry.

    Returns:
        Tensor[N, C_out, H', W']: ``conv(x_rest; w_rest)`` where ``gate``, 0 elsewhere.
    """
    n, cout, ho, wo = gate.shape
    out = x_rest.new_zeros(n * ho * wo, cout)
    if not bool(gate.any()):
        return out.view(n, ho, wo, cout).permute(0, 3, 1, 2)
    cols = F.unfold(x_rest, w_rest.shape[2:], spec.dilation, spec.padding, spec.stride)  # Tensor[N, K, L]
    cols = cols.transpose(1, 2).reshape(n * ho * wo, -1)  # Tensor[N·L, K], row = (sample, position)
    flat_gate = gate.permute(0, 2, 3, 1).reshape(n * ho * wo, cout)
    w = w_rest.reshape(cout, -1)
    for o in range(cout):
        rows = flat_gate[:, o].nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        out[rows, o] = torch.mm(cols.index_select(0, rows), w[o : o + 1].t()).squeeze(1)
    return out.view(n, ho, wo, cout).permute(0, 3, 1, 2)
