"""Where a residual block's gated channels are, and how its branch runs with only the kept ones.

One rule for every block kind: **one gate vector per block, over one inner width** — the channels that a block
computes channel by channel and that one convolution then reads. A layout splits the branch into

* ``head``: the stages computing the gated channels. ``head[0]`` is output-sliced (it computes only the kept
  channels); later head stages are depthwise (per channel), so slicing them is exact;
* the gate's multipliers ``scale`` Tensor[N, C], applied after the last head stage's activation;
* ``tail``: ``tail[0]`` is input-sliced (it reads only the kept channels); later tail stages run in full.

The branch's MACs are ``fixed + k · per`` with ``k`` the kept channels: the head and ``tail[0]`` are linear in
``k`` and the rest of the tail (``fixed``) does not depend on it.

Kinds:

* ``"basic"`` (``conv1 → bn1 → relu → conv2 → bn2``; timm's ``act1`` for ``relu``): head ``conv1``, tail ``conv2``;
  ``fixed = 0``;
* ``"bottleneck"`` (torchvision or timm ``Bottleneck``: ``conv1 1×1 → conv2 3×3 → conv3 1×1``): the gated width is
  ``conv1``'s outputs = ``conv2``'s inputs; ``conv1`` is output-sliced, ``conv2`` input-sliced, ``conv3`` runs in
  full (``fixed``: about 4/17 of a ResNet-50 bottleneck's MACs). ``conv2`` must be dense: ResNeXt's grouped
  ``conv2`` is refused;
* ``"inverted"`` (torchvision MobileNetV2 / V3 ``InvertedResidual``, EfficientNet's ``MBConv``: ``expand 1×1 →
  depthwise k×k → [squeeze-excitation] → project 1×1``): the gated width is the expanded channels; the expansion is
  output-sliced, the depthwise convolution computes only the kept channels, a squeeze-excitation (``se``) reads and
  scales only them and the projection reads only them; ``fixed = 0``. The mask sits after the depthwise activation
  (a switched-off channel's depthwise output would otherwise be ``act(bias)``, not 0) and before the
  squeeze-excitation, whose pooling then sees a switched-off channel as 0. MBConv's stochastic depth (``drop``)
  ends the branch in training; it is the identity at inference.
* ``"mlp"`` (torchvision ConvNeXt ``CNBlock``: ``depthwise 7×7 → LayerNorm → Linear C→4C → GELU → Linear 4C→C``,
  channels last, times ``layer_scale``; :class:`MLPLayout`): the gated width is the MLP's hidden channels; the first
  linear layer is output-sliced and the second input-sliced for every position
  (:func:`~dynnet.kernels.channel.sliced_mlp`); the depthwise convolution and the norm run in full (``fixed``).

Stage modules are found by dotted path on the wrapper, which adopts the block's children under their own names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dynnet.convert.residual import plain_timm_branch
from dynnet.kernels.channel import (
    ConvSpec,
    ExpandedConvs,
    SqueezeExcite,
    fold_bn,
    sliced_conv_in,
    sliced_expanded,
    sliced_mlp,
    sliced_pair,
)

__all__ = ["LAYOUTS", "GatedLayout", "MLPLayout", "Stage", "describe_block", "gated_layout"]

LAYOUTS = ("basic", "bottleneck", "inverted", "mlp")
"""The block kinds whose inner width a channel-gated block can switch (see the module docstring)."""

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.Hardswish, nn.GELU)  # element-wise: sliceable


@dataclass(frozen=True)
class Stage:
    """One ``act(bn(conv(x)))`` of a branch, by the dotted paths of its modules (``act`` ``None``: no activation, or
    the one inside timm's ``BatchNormAct2d``)."""

    conv: str
    bn: str
    act: str | None = None

    def run(self, m: nn.Module, x: Tensor) -> Tensor:
        """This stage of block ``m`` on x Tensor[N, C_in, H, W]."""
        y = m.get_submodule(self.bn)(m.get_submodule(self.conv)(x))
        return y if self.act is None else m.get_submodule(self.act)(y)


@dataclass(frozen=True)
class GatedLayout:
    """A block's gated width: ``head`` stages compute it, ``tail`` stages read it (see the module docstring); ``se``
    the dotted path of a squeeze-excitation between them and ``drop`` of a stochastic depth after the tail, if
    any."""

    kind: str
    head: tuple[Stage, ...]
    tail: tuple[Stage, ...]
    se: str | None = None
    drop: str | None = None

    def channels(self, m: nn.Module) -> int:
        """C: the gated width of block ``m``."""
        return m.get_submodule(self.head[-1].conv).out_channels

    def inner(self, m: nn.Module, x: Tensor) -> Tensor:
        """The head: Tensor[N, C_in, H, W] → the gated channels Tensor[N, C, H', W']."""
        for stage in self.head:
            x = stage.run(m, x)
        return x

    def outer(self, m: nn.Module, h: Tensor) -> Tensor:
        """The tail: the (scaled) gated channels Tensor[N, C, H', W'] → Tensor[N, C_out, H'', W'']."""
        h = self.excite(m, h)
        for stage in self.tail:
            h = stage.run(m, h)
        return h if self.drop is None else m.get_submodule(self.drop)(h)

    def excite(self, m: nn.Module, h: Tensor) -> Tensor:
        """The squeeze-excitation on the gated channels Tensor[N, C, H', W'] (``h`` itself without one)."""
        return h if self.se is None else m.get_submodule(self.se)(h)

    def gated(self, m: nn.Module, x: Tensor) -> Tensor:
        """The part of the branch whose MACs are linear in the kept channels: the head, the squeeze-excitation and
        ``tail[0]``."""
        return self.tail[0].run(m, self.excite(m, self.inner(m, x)))

    def squeeze(self, m: nn.Module) -> SqueezeExcite | None:
        """The squeeze-excitation's weights for the sliced kernel (``None`` without one)."""
        if self.se is None:
            return None
        fc1, act, fc2, gate = _squeeze_parts(m.get_submodule(self.se))  # type: ignore[misc]
        r, c = fc1.out_channels, fc1.in_channels
        return SqueezeExcite(fc1.weight.view(r, c), fc1.bias, fc2.weight.view(c, r), fc2.bias, act, gate)

    def importance(self, m: nn.Module) -> Tensor:
        """A data-free estimate of each gated channel's contribution to the block output, Tensor[C]:
        ``E[act(bn(conv x))_c] · Σ_o |γ_o / σ_o| · ‖W[o, c]‖₁`` with the last head stage's batch norm and the reading
        stage's (``tail[0]``) convolution and batch norm: the expected ReLU activation of channel ``c`` when its
        normalised pre-activation is standard normal (``E[relu(γz + β)] = β Φ(β/γ) + |γ| φ(β/γ)``) times the L1 norm
        of what the reading stage makes of it."""
        with torch.no_grad():
            last, nxt = self.head[-1], self.tail[0]
            bn1, bn2, conv2 = m.get_submodule(last.bn), m.get_submodule(nxt.bn), m.get_submodule(nxt.conv)
            gamma1 = bn1.weight if bn1.weight is not None else torch.ones_like(bn1.running_var)
            beta1 = bn1.bias if bn1.bias is not None else torch.zeros_like(bn1.running_var)
            scale = gamma1.abs().clamp_min(1e-12)
            ratio = beta1 / scale
            normal = torch.distributions.Normal(torch.zeros_like(ratio), torch.ones_like(ratio))
            activation = beta1 * normal.cdf(ratio) + scale * normal.log_prob(ratio).exp()
            gamma2 = bn2.weight if bn2.weight is not None else torch.ones_like(bn2.running_var)
            out_scale = gamma2.abs() / (bn2.running_var + bn2.eps).sqrt()
            reach = (conv2.weight.abs().sum((2, 3)) * out_scale[:, None]).sum(0)
            return (activation.clamp_min(0) * reach).float()

    def activation(self, m: nn.Module) -> nn.Module:
        """The element-wise activation of the gated channels: the last head stage's (inside the batch norm of
        timm's ``BatchNormAct2d``)."""
        last = self.head[-1]
        return m.get_submodule(last.act) if last.act is not None else m.get_submodule(last.bn).act

    def sources(self, m: nn.Module) -> list[Tensor | None]:
        """The tensors the folded weights derive from, stage by stage."""
        tensors: list[Tensor | None] = []
        for stage in (*self.head, *self.tail):
            conv, bn = m.get_submodule(stage.conv), m.get_submodule(stage.bn)
            tensors += [conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var]
        return tensors

    def eps(self, m: nn.Module) -> tuple:
        """What else the folds read: every batch norm's ``eps`` and mode."""
        return tuple((m.get_submodule(s.bn).eps, m.get_submodule(s.bn).training) for s in (*self.head, *self.tail))

    def fold(self, m: nn.Module) -> tuple:
        """Every stage's convolution with its batch norm folded, in the form :meth:`sparse_branch` reads."""
        folds = []
        for stage in (*self.head, *self.tail):
            conv = m.get_submodule(stage.conv)
            w, b = fold_bn(conv, m.get_submodule(stage.bn))
            spec = ConvSpec(tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation))  # type: ignore[arg-type]
            folds.append((w, b.contiguous(), spec))
        if self.kind == "inverted":
            expand = folds[0] if len(self.head) == 2 else (None, None, None)
            dw, project = folds[-2], folds[-1]
            return (ExpandedConvs(expand[0], expand[1], dw[0], dw[1], project[0], project[1], expand[2], dw[2],
                                  project[2]),)  # fmt: skip
        return tuple(folds)

    def sparse_branch(
        self, m: nn.Module, folded: tuple, x: Tensor, scale: Tensor, binary: bool, strategy: str
    ) -> tuple[Tensor, Tensor]:
        """The branch computing only the kept channels (eval, batch norms folded).

        Args:
            m: the block.
            folded: :meth:`fold`'s value.
            x: Tensor[N, C_in, H, W].
            scale: Tensor[N, C] multipliers (0 = off).
            binary: only the positions of the non-zeros of ``scale`` matter.
            strategy: the batch strategy (:data:`~dynnet.kernels.channel.STRATEGIES`).

        Returns:
            ``(y, executed)``: Tensor[N, C_out, H', W'] and Tensor[N] float64, the gated channels computed per sample.
        """
        if self.kind == "inverted":
            act = self.activation(m)
            return sliced_expanded(x, folded[0], scale, act, binary=binary, strategy=strategy, se=self.squeeze(m))
        (w1, b1, s1), (w2, b2, s2) = folded[0], folded[1]
        y, executed = sliced_pair(x, w1, b1, w2, b2, scale, s1, s2, binary=binary, strategy=strategy)
        return self._rest(m, folded, y), executed

    def sparse_tail(
        self, m: nn.Module, folded: tuple, h: Tensor, active: Tensor, strategy: str
    ) -> tuple[Tensor, Tensor]:
        """The tail reading only the active gated channels of ``h`` (computed in full; instance sparsity's rule).

        Args:
            m: the block.
            folded: :meth:`fold`'s value.
            h: the gated channels Tensor[N, C, H', W'].
            active: Tensor[N, C] bool, the channels each sample keeps.
            strategy: the batch strategy.

        Returns:
            ``(y, executed)``: Tensor[N, C_out, H'', W''] and Tensor[N] float64, the channels ``tail[0]`` read.
        """
        if self.kind == "inverted":
            convs = folded[0]
            return sliced_conv_in(self.excite(m, h), convs.wp, convs.bp, active, convs.spec_p, strategy=strategy)
        w, b, spec = folded[len(self.head)]
        y, executed = sliced_conv_in(h, w, b, active, spec, strategy=strategy)
        return self._rest(m, folded, y), executed

    def _rest(self, m: nn.Module, folded: tuple, y: Tensor) -> Tensor:
        """``tail[0]``'s activation and the later tail stages (in full) on ``tail[0]``'s folded output ``y``."""
        if self.tail[0].act is not None:
            y = m.get_submodule(self.tail[0].act)(y)
        for stage, (w, b, spec) in zip(self.tail[1:], folded[len(self.head) + 1 :], strict=True):
            y = spec.conv(y, w, b)
            if stage.act is not None:
                y = m.get_submodule(stage.act)(y)
        return y


@dataclass(frozen=True)
class MLPLayout:
    """ConvNeXt's block: its MLP's hidden channels are the gated width (see the module docstring). The modules are
    ``block.0`` (depthwise), ``block.2`` (norm), ``block.3`` / ``block.5`` (linear layers), ``block.4`` (activation);
    ``layer_scale`` and ``stochastic_depth`` are the block's."""

    kind: str = "mlp"
    drop: str | None = "stochastic_depth"

    def _part(self, m: nn.Module, i: int) -> nn.Module:
        return m.get_submodule(f"block.{i}")

    def channels(self, m: nn.Module) -> int:
        """D: the hidden width."""
        return self._part(m, 3).out_features

    def tokens(self, m: nn.Module, x: Tensor) -> Tensor:
        """Depthwise convolution and norm: Tensor[N, C, H, W] → channels-last Tensor[N, H, W, C]."""
        return self._part(m, 2)(self._part(m, 0)(x).permute(0, 2, 3, 1))

    def inner(self, m: nn.Module, x: Tensor) -> Tensor:
        """Tensor[N, C, H, W] → the hidden channels Tensor[N, D, H, W] (a channels-first view)."""
        return self._part(m, 4)(self._part(m, 3)(self.tokens(m, x))).permute(0, 3, 1, 2)

    def outer(self, m: nn.Module, h: Tensor) -> Tensor:
        """The (scaled) hidden channels Tensor[N, D, H, W] → the branch output Tensor[N, C, H, W]."""
        return self._finish(m, self._part(m, 5)(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))

    def _finish(self, m: nn.Module, y: Tensor) -> Tensor:
        y = m.layer_scale * y
        return y if self.drop is None else m.get_submodule(self.drop)(y)

    def gated(self, m: nn.Module, x: Tensor) -> Tensor:
        """The part whose MACs are linear in the kept channels: the two linear layers, here on the positions of
        ``x`` (the depthwise convolution keeps the shape; its MACs are the fixed part)."""
        return self._part(m, 5)(self._part(m, 4)(self._part(m, 3)(x.permute(0, 2, 3, 1))))

    def sources(self, m: nn.Module) -> list[Tensor | None]:
        fc1, fc2 = self._part(m, 3), self._part(m, 5)
        return [fc1.weight, fc1.bias, fc2.weight, fc2.bias]

    def eps(self, m: nn.Module) -> tuple:
        return ()

    def fold(self, m: nn.Module) -> tuple:
        """The linear layers' ``(w1, b1, w2, b2)`` (nothing to fold)."""
        return tuple(self.sources(m))

    def importance(self, m: nn.Module) -> Tensor:
        """A data-free estimate of each hidden channel's contribution, Tensor[D]: the norm of its row of the first
        layer times the L1 norm of its column of the second (the pruning criterion's kind)."""
        with torch.no_grad():
            fc1, fc2 = self._part(m, 3), self._part(m, 5)
            return (fc1.weight.norm(dim=1) * fc2.weight.abs().sum(0)).float()

    def sparse_branch(
        self, m: nn.Module, folded: tuple, x: Tensor, scale: Tensor, binary: bool, strategy: str
    ) -> tuple[Tensor, Tensor]:
        """The branch computing only the kept hidden channels: ``(y Tensor[N, C, H, W], executed Tensor[N])``."""
        t = self.tokens(m, x)
        n, hh, ww, c = t.shape
        w1, b1, w2, b2 = folded
        y, executed = sliced_mlp(t.reshape(n, hh * ww, c), w1, b1, w2, b2, scale, self._part(m, 4), binary=binary,
                                 strategy=strategy)  # fmt: skip
        return self._finish(m, y.view(n, hh, ww, -1).permute(0, 3, 1, 2)), executed


def _describe_convnext(block: nn.Module, seq: nn.Sequential) -> tuple[MLPLayout | None, str]:
    """torchvision's ``CNBlock``: ``block`` = depthwise conv, permute, LayerNorm, Linear, activation, Linear,
    permute."""
    parts = list(seq)
    if len(parts) != 7:
        return None, "its block is not depthwise conv, permute, norm, linear, activation, linear, permute"
    dw, norm, fc1, act, fc2 = parts[0], parts[2], parts[3], parts[4], parts[5]
    if type(dw) is not nn.Conv2d or dw.groups != dw.in_channels or dw.out_channels != dw.in_channels:
        return None, "its first convolution is not depthwise"
    if dw.stride != (1, 1) or 2 * dw.padding[0] != dw.kernel_size[0] - 1:
        return None, "its depthwise convolution changes the resolution"
    if not (type(fc1) is nn.Linear and type(fc2) is nn.Linear and isinstance(act, _ACTIVATIONS)):
        return None, "its MLP is not linear, element-wise activation, linear"
    if not isinstance(norm, nn.LayerNorm) or fc1.in_features != dw.out_channels or fc2.in_features != fc1.out_features:
        return None, "its norm or MLP widths do not chain"
    if list(getattr(parts[1], "dims", ())) != [0, 2, 3, 1] or list(getattr(parts[6], "dims", ())) != [0, 3, 1, 2]:
        return None, "its block does not permute to channels last and back"
    return MLPLayout(drop="stochastic_depth" if hasattr(block, "stochastic_depth") else None), ""


def gated_layout(block: nn.Module, supported: tuple[str, ...] = LAYOUTS) -> GatedLayout:
    """The layout of ``block`` (a basic block, a torchvision ``Bottleneck`` or ``InvertedResidual``).

    Raises:
        ValueError: in one line, what the block is and which kinds are supported.
    """
    layout, why = describe_block(block)
    if layout is None or layout.kind not in supported:
        why = why if layout is None else f"it is {_KIND_WORDS[layout.kind].split(' (')[0]} block"
        raise ValueError(
            f"this recipe gates {' or '.join(_KIND_WORDS[k] for k in supported)} block; "
            f"{type(block).__name__} is not one ({why})"
        )
    return layout


_KIND_WORDS = {
    "basic": "a basic residual (conv1, bn1, relu, conv2, bn2)",
    "bottleneck": "a Bottleneck (conv1, conv2 dense, conv3)",
    "inverted": "an inverted residual (expand, depthwise, [squeeze-excitation], project)",
    "mlp": "a ConvNeXt block (depthwise, norm, MLP)",
}


def describe_block(block: nn.Module) -> tuple[GatedLayout | None, str]:
    """``(layout, "")`` of a block a channel-gated block can wrap, or ``(None, why not)``."""
    names = dict(block.named_children())
    if isinstance(names.get("conv"), nn.Sequential):
        return _describe_inverted(names["conv"])
    if "conv_dw" in names and ("conv_pwl" in names or "conv_pw" in names):
        return _describe_timm_inverted(block, names)
    if isinstance(names.get("block"), nn.Sequential) and isinstance(getattr(block, "layer_scale", None), Tensor):
        return _describe_convnext(block, names["block"])
    if isinstance(names.get("block"), nn.Sequential):
        return _describe_block_sequence(names["block"], "stochastic_depth" if "stochastic_depth" in names else None)
    if "act1" in names and "relu" not in names:
        return _describe_timm(block, names)
    bottleneck = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu")
    basic = ("conv1", "bn1", "conv2", "bn2", "relu")
    if "conv3" in names:
        missing = [a for a in bottleneck if a not in names]
        extra = sorted(set(names) - {*bottleneck, "downsample"})
        if missing or extra:
            return None, f"bottleneck lacks {missing}" if missing else f"bottleneck with extra parts {extra}"
        if type(names["relu"]) is not nn.ReLU:
            return None, "its activation is not an nn.ReLU"
        for conv in ("conv1", "conv2"):
            if names[conv].groups != 1:
                return None, f"{conv} is grouped (groups={names[conv].groups}, ResNeXt); conv2 must be dense"
        head = (Stage("conv1", "bn1", "relu"),)
        return GatedLayout("bottleneck", head, (Stage("conv2", "bn2", "relu"), Stage("conv3", "bn3"))), ""
    missing = [a for a in basic if not hasattr(block, a)]
    if missing:
        return None, f"lacks {missing}"
    for conv in ("conv1", "conv2"):
        if getattr(block, conv).groups != 1:
            return None, f"{conv} is grouped"
    return GatedLayout("basic", (Stage("conv1", "bn1", "relu"),), (Stage("conv2", "bn2"),)), ""


def _describe_timm(block: nn.Module, names: dict[str, nn.Module]) -> tuple[GatedLayout | None, str]:
    """timm's ResNet ``BasicBlock`` / ``Bottleneck`` (activations ``act1``, ``act2`` [, ``act3``]) when its branch is
    the plain chain of torchvision's: no squeeze-excitation or stochastic depth, DropBlock and anti-aliasing the
    identity (timm's defaults), ReLU activations and dense convolutions."""
    convs = ("conv1", "conv2", "conv3") if "conv3" in names else ("conv1", "conv2")
    acts = ("act1", "act2") if "conv3" in names else ("act1",)
    missing = [a for a in (*convs, *(f"bn{i + 1}" for i in range(len(convs))), *acts) if a not in names]
    if missing:
        return None, f"lacks {missing}"
    if not plain_timm_branch(block):
        return None, "its branch has squeeze-excitation, DropBlock, anti-aliasing or stochastic depth"
    if any(type(names[a]) is not nn.ReLU for a in acts):
        return None, "its activations are not nn.ReLU"
    if any(names[c].groups != 1 for c in convs[:2]):
        return None, "conv2 is grouped; it must be dense"
    if "conv3" in names:
        tail = (Stage("conv2", "bn2", "act2"), Stage("conv3", "bn3"))
        return GatedLayout("bottleneck", (Stage("conv1", "bn1", "act1"),), tail), ""
    return GatedLayout("basic", (Stage("conv1", "bn1", "act1"),), (Stage("conv2", "bn2"),)), ""


def _describe_inverted(seq: nn.Sequential) -> tuple[GatedLayout | None, str]:
    """MobileNetV2's ``conv``: ``[Conv2dNormActivation(expand)], Conv2dNormActivation(depthwise), Conv2d, BN``."""
    parts = list(seq)
    if len(parts) not in (3, 4) or type(parts[-2]) is not nn.Conv2d or not isinstance(parts[-1], nn.BatchNorm2d):
        return None, "its conv is not [expand], depthwise, project conv, batch norm"
    stages = []
    for i, stage in enumerate(parts[:-2]):
        if not (isinstance(stage, nn.Sequential) and len(stage) == 3 and type(stage[0]) is nn.Conv2d):
            return None, f"conv.{i} is not a conv, batch norm, activation sequence"
        if not isinstance(stage[1], nn.BatchNorm2d) or not isinstance(stage[2], _ACTIVATIONS):
            return None, f"conv.{i} is not conv → batch norm → element-wise activation"
        stages.append(Stage(f"conv.{i}.0", f"conv.{i}.1", f"conv.{i}.2"))
    dw = parts[-3][0]
    if dw.groups != dw.in_channels or dw.out_channels != dw.in_channels:
        return None, "its middle convolution is not depthwise"
    if len(stages) == 2:
        expand = parts[0][0]
        if expand.groups != 1 or expand.kernel_size != (1, 1) or type(parts[0][2]) is not type(parts[1][2]):
            return None, "its expansion is not a dense 1×1 convolution with the depthwise stage's activation"
    n = len(parts)
    return GatedLayout("inverted", tuple(stages), (Stage(f"conv.{n - 2}", f"conv.{n - 1}"),)), ""


_SQUEEZE_NAMES = (
    (("fc1", "activation", "fc2", "scale_activation"), {"avgpool"}, set()),  # torchvision's SqueezeExcitation
    (("conv_reduce", "act1", "conv_expand", "gate"), set(), {"bn"}),  # timm's SqueezeExcite (bn: the identity)
)
"""Each squeeze-excitation's ``(reduce, activation, expand, gate)`` names, its other required and optional parts."""


def _squeeze_parts(m: nn.Module) -> tuple[nn.Conv2d, nn.Module, nn.Conv2d, nn.Module] | None:
    """``(reduce, activation, expand, gate)`` of a squeeze-excitation ``x · gate(expand(act(reduce(mean x))))`` —
    torchvision's ``SqueezeExcitation`` or timm's ``SqueezeExcite``, recognised by their parts: 1×1 convolutions,
    element-wise activations, a (hard) sigmoid gate, a global average pooling or an identity norm — or ``None``."""
    parts = dict(m.named_children())
    for names, required, optional in _SQUEEZE_NAMES:
        if not {*names, *required} <= set(parts) <= {*names, *required, *optional}:
            continue
        pool = parts.get("avgpool")
        if pool is not None and not (isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size in (1, (1, 1))):
            return None
        if not isinstance(parts.get("bn", nn.Identity()), nn.Identity):
            return None
        fc1, act, fc2, gate = (parts[n] for n in names)
        convs = all(type(c) is nn.Conv2d and c.kernel_size == (1, 1) and c.groups == 1 for c in (fc1, fc2))
        if convs and isinstance(gate, nn.Sigmoid | nn.Hardsigmoid) and isinstance(act, _ACTIVATIONS):
            return fc1, act, fc2, gate  # type: ignore[return-value]
        return None
    return None


def _describe_block_sequence(seq: nn.Sequential, drop: str | None) -> tuple[GatedLayout | None, str]:
    """torchvision's MobileNetV3 ``InvertedResidual`` and EfficientNet's ``MBConv`` (``block``: [expand], depthwise,
    [squeeze-excitation], project as ``Conv2dNormActivation``s; MBConv's ``stochastic_depth`` is ``drop``)."""
    parts = list(seq)
    if len(parts) == 1:  # EfficientNetV2's FusedMBConv without expansion
        return None, "its block is one convolution stage: no inner width to gate"
    last = parts[-1] if parts else None
    if not (isinstance(last, nn.Sequential) and len(last) == 2 and type(last[0]) is nn.Conv2d
            and isinstance(last[1], nn.BatchNorm2d)):  # fmt: skip
        return None, "its block does not end with a projection convolution and batch norm"
    if last[0].kernel_size != (1, 1) or last[0].groups != 1:
        return None, "its projection is not a dense 1×1 convolution"
    n, body, se = len(parts), parts[:-1], None
    if body and _squeeze_parts(body[-1]) is not None:
        se, body = f"block.{len(body) - 1}", body[:-1]
    stages = []
    for i, stage in enumerate(body):
        if not (isinstance(stage, nn.Sequential) and len(stage) == 3 and type(stage[0]) is nn.Conv2d):
            return None, f"block.{i} is not a conv, batch norm, activation sequence"
        if not isinstance(stage[1], nn.BatchNorm2d) or not isinstance(stage[2], _ACTIVATIONS):
            return None, f"block.{i} is not conv → batch norm → element-wise activation"
        stages.append(Stage(f"block.{i}.0", f"block.{i}.1", f"block.{i}.2"))
    if len(body) not in (1, 2):
        return None, "its block is not [expand], depthwise, [squeeze-excitation], project"
    dw = body[-1][0]
    if dw.groups != dw.in_channels or dw.out_channels != dw.in_channels:
        if len(body) == 1:  # EfficientNetV2's FusedMBConv: a dense k×k expansion, then the projection
            return None, "it expands with a dense convolution (FusedMBConv), not a depthwise stage"
        return None, "its middle convolution is not depthwise"
    if len(body) == 2:
        expand = body[0][0]
        if expand.groups != 1 or expand.kernel_size != (1, 1) or type(body[0][2]) is not type(body[1][2]):
            return None, "its expansion is not a dense 1×1 convolution with the depthwise stage's activation"
    tail = (Stage(f"block.{n - 1}.0", f"block.{n - 1}.1"),)
    return GatedLayout("inverted", tuple(stages), tail, se=se, drop=drop), ""


def _describe_timm_inverted(block: nn.Module, names: dict[str, nn.Module]) -> tuple[GatedLayout | None, str]:
    """timm's EfficientNet / MobileNetV3 ``InvertedResidual`` (``conv_pw, bn1, conv_dw, bn2, se, conv_pwl, bn3``) and
    ``DepthwiseSeparableConv`` (``conv_dw, bn1, se, conv_pw, bn2``: the depthwise stage reads the gated input
    channels), whose batch norms carry their activation (``BatchNormAct2d``); ``drop_path`` is the stochastic depth."""
    if "conv_pwl" in names:
        head, tail = (("conv_pw", "bn1"), ("conv_dw", "bn2")), ("conv_pwl", "bn3")
    else:
        head, tail = (("conv_dw", "bn1"),), ("conv_pw", "bn2")
    missing = [a for pair in (*head, tail) for a in pair if a not in names]
    if missing:
        return None, f"lacks {missing}"
    if getattr(block, "conv_s2d", None) is not None or not isinstance(names.get("aa", nn.Identity()), nn.Identity):
        return None, "it has space-to-depth or anti-aliasing"
    for conv, bn in (*head, tail):
        if type(names[conv]) is not nn.Conv2d:
            return None, f"{conv} is a {type(names[conv]).__name__}, not an nn.Conv2d"
        norm = names[bn]
        act = getattr(norm, "act", None)
        if not isinstance(norm, nn.BatchNorm2d) or not isinstance(getattr(norm, "drop", nn.Identity()), nn.Identity):
            return None, f"{bn} is not a batch norm (with an activation)"
        if (conv, bn) == tail and not isinstance(act, nn.Identity | None):
            return None, f"{bn} has an activation after the projection"
        if (conv, bn) != tail and not isinstance(act, _ACTIVATIONS):
            return None, f"{bn} has no element-wise activation"
    dw = names[head[-1][0]]
    if dw.groups != dw.in_channels or dw.out_channels != dw.in_channels:
        return None, "its middle convolution is not depthwise"
    if len(head) == 2:
        expand = names["conv_pw"]
        if expand.groups != 1 or expand.kernel_size != (1, 1) or type(names["bn1"].act) is not type(names["bn2"].act):
            return None, "its expansion is not a dense 1×1 convolution with the depthwise stage's activation"
    if names[tail[0]].kernel_size != (1, 1) or names[tail[0]].groups != 1:
        return None, "its projection is not a dense 1×1 convolution"
    se = names.get("se")
    if se is not None and not isinstance(se, nn.Identity) and _squeeze_parts(se) is None:
        return None, f"its se is a {type(se).__name__}, not timm's SqueezeExcite"
    stages = tuple(Stage(conv, bn) for conv, bn in head)
    return GatedLayout(
        "inverted", stages, (Stage(*tail),), se="se" if se is not None and not isinstance(se, nn.Identity) else None,
        drop="drop_path" if "drop_path" in names else None,
    ), ""  # fmt: skip
