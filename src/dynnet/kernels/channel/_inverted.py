"""Channel-sliced execution of an inverted residual's gated expansion: expand 1×1 → depthwise → [squeeze-excitation]
→ project 1×1.

The gated channels are the expanded ones (the outputs of the expansion, which the depthwise convolution maps
channel by channel to the inputs of the projection). For a sample whose kept channels are ``S`` (|S| = k of C)

    ``y = project(act(dw(act(expand(x; We[S], be[S])); Wd[S], bd[S])) * scale[S]; Wp[:, S]) + bp``

so the expansion computes only the kept output channels, the depthwise convolution only the kept channels (it is
per channel, so the slice is exact) and the projection reads only the kept input channels: all three cost ``k / C``
of their dense MACs. Without an expansion (MobileNetV2's expansion ratio 1) the depthwise convolution reads the kept
input channels directly. Batch norms are folded first (:func:`~dynnet.kernels.channel.fold_bn`).

A squeeze-excitation between the depthwise stage and the projection (MobileNetV3, EfficientNet's MBConv:
:class:`SqueezeExcite`) runs on the scaled kept channels: its pooling sees a switched-off channel as 0, so its
reduction reads only the kept channels' columns and its expansion computes only their rows, ``2 · R · k`` MACs
(``R`` squeezed channels), again ``k / C`` of the dense cost.

Strategies as :func:`~dynnet.kernels.channel.sliced_pair` (``dense``, ``groups``, ``padded``, ``per_sample``,
``auto``); ``auto`` is timed against ``dense`` (:mod:`dynnet.kernels.autotune`). Imports
:mod:`~dynnet.kernels.channel._spec` and :mod:`~dynnet.kernels.channel._sliced` (for the strategy choice).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from dynnet.kernels.channel._sliced import padded_slots, run_groups, timed_strategy
from dynnet.kernels.channel._spec import ConvSpec, conv_out_size

__all__ = ["ExpandedConvs", "SqueezeExcite", "expanded_reference", "sliced_expanded"]

Activation = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class ExpandedConvs:
    """The BN-folded convolutions of an inverted residual's branch (see the module docstring).

    Attributes:
        we, be: expansion Tensor[C, C_in, 1, 1], Tensor[C], or ``None`` without an expansion (then C = C_in).
        wd, bd: depthwise Tensor[C, 1, kh, kw], Tensor[C].
        wp, bp: projection Tensor[C_out, C, 1, 1], Tensor[C_out].
        spec_e, spec_d, spec_p: the three geometries (``spec_e`` ``None`` without an expansion).
    """

    we: Tensor | None
    be: Tensor | None
    wd: Tensor
    bd: Tensor
    wp: Tensor
    bp: Tensor
    spec_e: ConvSpec | None
    spec_d: ConvSpec
    spec_p: ConvSpec

    @property
    def channels(self) -> int:
        """C: the gated (expanded) width."""
        return self.wd.shape[0]

    def out_hw(self, x: Tensor) -> tuple[int, int]:
        """``(H', W')`` of the branch's output for x Tensor[N, C_in, H, W]."""
        size = []
        for d in range(2):
            s = x.shape[2 + d]
            if self.spec_e is not None:
                s = conv_out_size(s, self.we.shape[2 + d], self.spec_e, d)
            s = conv_out_size(s, self.wd.shape[2 + d], self.spec_d, d)
            size.append(conv_out_size(s, self.wp.shape[2 + d], self.spec_p, d))
        return size[0], size[1]


@dataclass(frozen=True)
class SqueezeExcite:
    """A squeeze-excitation on the expanded channels: ``h · gate(W2 act(W1 mean(h) + b1) + b2)``.

    Attributes:
        w1, b1: reduction Tensor[R, C], Tensor[R] (or ``None``).
        w2, b2: expansion Tensor[C, R], Tensor[C] (or ``None``).
        act: the activation between them (ReLU in MobileNetV3, SiLU in EfficientNet).
        gate: the scale activation (hard or plain sigmoid).
    """

    w1: Tensor
    b1: Tensor | None
    w2: Tensor
    b2: Tensor | None
    act: Activation
    gate: Activation

    def scale(self, h: Tensor, channels: Tensor | None = None) -> Tensor:
        """The excitation of h Tensor[M, k, H, W]: Tensor[M, k], for the channels ``channels`` Tensor[k] long (all
        C when ``None``)."""
        w1, w2, b2 = self.w1, self.w2, self.b2
        if channels is not None:
            w1, w2 = w1.index_select(1, channels), w2.index_select(0, channels)
            b2 = None if b2 is None else b2.index_select(0, channels)
        z = self.act(torch.nn.functional.linear(h.mean((2, 3)), w1, self.b1))
        return self.gate(torch.nn.functional.linear(z, w2, b2))

    def scale_slots(self, h: Tensor, order: Tensor) -> Tensor:
        """The excitation when every sample has its own channel slots: h Tensor[N, k_max, H, W] (padding slots 0),
        order Tensor[N, k_max] long, the channel of each slot → Tensor[N, k_max]."""
        pooled = h.mean((2, 3))  # Tensor[N, k_max]
        w1 = self.w1.t()[order]  # Tensor[N, k_max, R]
        z = torch.bmm(pooled.unsqueeze(1), w1).squeeze(1)
        z = self.act(z if self.b1 is None else z + self.b1)
        s = torch.bmm(self.w2[order], z.unsqueeze(2)).squeeze(2)  # Tensor[N, k_max]
        return self.gate(s if self.b2 is None else s + self.b2[order])


def expanded_reference(
    x: Tensor, convs: ExpandedConvs, scale: Tensor, act: Activation, se: SqueezeExcite | None = None
) -> Tensor:
    """Dense reference computing every channel: x Tensor[N, C_in, H, W], scale Tensor[N, C] → Tensor[N, C_out,
    H', W'] (the squeeze-excitation ``se``, if any, on the scaled channels)."""
    h = x if convs.we is None else act(convs.spec_e.conv(x, convs.we, convs.be))
    h = act(convs.spec_d.conv(h, convs.wd, convs.bd, groups=convs.channels)) * scale[:, :, None, None]
    if se is not None:
        h = h * se.scale(h)[:, :, None, None]
    return convs.spec_p.conv(h, convs.wp, convs.bp)


def _run_slice(
    x: Tensor, convs: ExpandedConvs, mult: Tensor | None, channels: Tensor, act: Activation, se: SqueezeExcite | None
) -> Tensor:
    """One channel slice (Tensor[k] long) for every sample of x Tensor[M, C_in, H, W]; ``mult`` Tensor[M, C] or
    ``None`` (binary)."""
    k = channels.shape[0]
    if convs.we is None:
        h = x.index_select(1, channels)
    else:
        h = act(convs.spec_e.conv(x, convs.we.index_select(0, channels), convs.be.index_select(0, channels)))
    h = act(convs.spec_d.conv(h, convs.wd.index_select(0, channels), convs.bd.index_select(0, channels), groups=k))
    if mult is not None:
        h = h * mult.index_select(1, channels)[:, :, None, None]
    if se is not None:
        h = h * se.scale(h, channels)[:, :, None, None]
    return convs.spec_p.conv(h, convs.wp.index_select(1, channels), convs.bp)


def _padded(
    x: Tensor,
    convs: ExpandedConvs,
    scale: Tensor,
    active: Tensor,
    binary: bool,
    act: Activation,
    se: SqueezeExcite | None,
) -> Tensor:
    """Every sample's own slice in grouped convolutions, padded to the batch's largest kept count ``k_max`` (> 0):
    the expansion and projection with ``groups = N``, the depthwise convolution with ``groups = N · k_max``."""
    n = scale.shape[0]
    order, slot_scale, kmax = padded_slots(active, scale, binary)  # kept first, Tensor[N, k_max]
    flat = order.reshape(-1)
    cin, hh, ww = x.shape[1:]
    if convs.we is None:
        h = torch.gather(x, 1, order[:, :, None, None].expand(-1, -1, hh, ww)).reshape(1, n * kmax, hh, ww)
    else:
        flat_x = x.reshape(1, n * cin, hh, ww)
        h = act(convs.spec_e.conv(flat_x, convs.we.index_select(0, flat), convs.be.index_select(0, flat), groups=n))
    h = act(convs.spec_d.conv(h, convs.wd.index_select(0, flat), convs.bd.index_select(0, flat), groups=n * kmax))
    h = h * slot_scale.reshape(1, -1, 1, 1)
    if se is not None:  # padding slots are 0: they add nothing to the pooling and stay 0
        h = h * se.scale_slots(h.view(n, kmax, *h.shape[2:]), order).reshape(1, -1, 1, 1)
    wp, cout = convs.wp, convs.wp.shape[0]
    # Tensor[C_out, N·k_max, kh, kw] → Tensor[N·C_out, k_max, kh, kw]: sample n's projection reads its own slots.
    wpn = wp.index_select(1, flat).view(cout, n, kmax, *wp.shape[2:]).transpose(0, 1).reshape(n * cout, kmax, 1, 1)
    y = convs.spec_p.conv(h, wpn, convs.bp.repeat(n), groups=n)
    return y.view(n, cout, *y.shape[2:])


def _run(
    how: str,
    x: Tensor,
    convs: ExpandedConvs,
    scale: Tensor,
    active: Tensor,
    binary: bool,
    act: Activation,
    se: SqueezeExcite | None,
) -> tuple[Tensor, Tensor]:
    """:func:`sliced_expanded` with a resolved strategy ``how``: ``(y, executed)``."""
    n, c = scale.shape
    mult = None if binary else scale
    counts = active.sum(1)
    if how == "dense":
        s = scale if mult is not None else active.to(x.dtype)
        y = expanded_reference(x, convs, s, act, se)
        return y, torch.full((n,), float(c), dtype=torch.float64, device=x.device)
    if how == "padded":
        kmax = int(counts.max())
        executed = torch.full((n,), float(kmax), dtype=torch.float64, device=x.device)
        if kmax > 0:
            return _padded(x, convs, scale, active, binary, act, se), executed
        return convs.bp.view(1, -1, 1, 1).expand(n, -1, *convs.out_hw(x)).contiguous(), executed
    empty = convs.bp.view(1, -1, 1, 1).expand(n, -1, *convs.out_hw(x)).contiguous()  # the projection's bias
    return run_groups(x, active, how, mult, empty, lambda xs, ms, ch: _run_slice(xs, convs, ms, ch, act, se))


def sliced_expanded(
    x: Tensor,
    convs: ExpandedConvs,
    scale: Tensor,
    act: Activation,
    *,
    binary: bool = False,
    strategy: str = "auto",
    se: SqueezeExcite | None = None,
) -> tuple[Tensor, Tensor]:
    """An inverted residual's branch computing only the expanded channels with ``scale != 0``.

    Args:
        x: Tensor[N, C_in, H, W].
        convs: the BN-folded convolutions.
        scale: Tensor[N, C] multipliers of the expanded channels after the depthwise activation (0 = off).
        act: the element-wise activation after the expansion and the depthwise convolution (ReLU6 in MobileNetV2);
            it must map each channel on its own.
        binary: the kept channels are multiplied by 1 (only the positions of the non-zeros of ``scale`` matter).
        strategy: one of :data:`~dynnet.kernels.channel.STRATEGIES`.
        se: the squeeze-excitation between the depthwise stage and the projection, if any (on the scaled
            channels).

    Returns:
        ``(y, executed)``: Tensor[N, C_out, H', W'] and Tensor[N] float64 — the expanded channels the kernels really
        computed for each sample (``k_n``, ``k_max`` for ``"padded"``, ``C`` for ``"dense"``).
    """
    n, c = scale.shape
    if x.shape[0] != n or c != convs.channels or convs.wp.shape[1] != c:
        raise ValueError(
            f"shapes disagree: x {tuple(x.shape)}, scale {tuple(scale.shape)}, depthwise {tuple(convs.wd.shape)}, "
            f"projection {tuple(convs.wp.shape)}"
        )
    active = scale != 0
    channels_last = x.is_contiguous(memory_format=torch.channels_last)
    key = ("sliced_expanded", tuple(x.shape), x.dtype, channels_last, tuple(convs.wd.shape), tuple(convs.wp.shape),
           convs.spec_e, convs.spec_d, binary, se is not None)  # fmt: skip
    run = lambda how: _run(how, x, convs, scale, active, binary, act, se)  # noqa: E731
    return run(timed_strategy(active, strategy, key, run))
