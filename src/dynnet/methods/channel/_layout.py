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
* ``"inverted"`` (torchvision ``InvertedResidual``: ``expand 1×1 → depthwise 3×3 → project 1×1``): the gated
  width is the expanded channels; the expansion is output-sliced, the depthwise convolution computes only the kept
  channels and the projection reads only them; ``fixed = 0``. The mask sits after the depthwise activation (a
  switched-off channel's depthwise output would otherwise be ``act(bias)``, not 0).

Stage modules are found by dotted path on the wrapper, which adopts the block's children under their own names.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from dynnet.convert.residual import plain_timm_branch
from dynnet.kernels.channel import ConvSpec, ExpandedConvs, fold_bn, sliced_conv_in, sliced_expanded, sliced_pair

__all__ = ["LAYOUTS", "GatedLayout", "Stage", "describe_block", "gated_layout"]

LAYOUTS = ("basic", "bottleneck", "inverted")
"""The block kinds whose inner width a channel-gated block can switch (see the module docstring)."""

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.Hardswish, nn.GELU)  # element-wise: sliceable


@dataclass(frozen=True)
class Stage:
    """One ``act(bn(conv(x)))`` of a branch, by the dotted paths of its modules (``act`` ``None``: no activation)."""

    conv: str
    bn: str
    act: str | None = None

    def run(self, m: nn.Module, x: Tensor) -> Tensor:
        """This stage of block ``m`` on x Tensor[N, C_in, H, W]."""
        y = m.get_submodule(self.bn)(m.get_submodule(self.conv)(x))
        return y if self.act is None else m.get_submodule(self.act)(y)


@dataclass(frozen=True)
class GatedLayout:
    """A block's gated width: ``head`` stages compute it, ``tail`` stages read it (see the module docstring)."""

    kind: str
    head: tuple[Stage, ...]
    tail: tuple[Stage, ...]

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
        for stage in self.tail:
            h = stage.run(m, h)
        return h

    def gated(self, m: nn.Module, x: Tensor) -> Tensor:
        """The part of the branch whose MACs are linear in the kept channels: the head and ``tail[0]``."""
        return self.tail[0].run(m, self.inner(m, x))

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
            act = m.get_submodule(self.head[-1].act)
            return sliced_expanded(x, folded[0], scale, act, binary=binary, strategy=strategy)
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
            return sliced_conv_in(h, convs.wp, convs.bp, active, convs.spec_p, strategy=strategy)
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
    "inverted": "an inverted residual (expand, depthwise, project)",
}


def describe_block(block: nn.Module) -> tuple[GatedLayout | None, str]:
    """``(layout, "")`` of a block a channel-gated block can wrap, or ``(None, why not)``."""
    names = dict(block.named_children())
    if isinstance(names.get("conv"), nn.Sequential):
        return _describe_inverted(names["conv"])
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
