"""GaterNet — Chen, Li, Bengio & Si, "You Look Twice: GaterNet for Dynamic Filter Selection in
CNNs", CVPR 2019. https://arxiv.org/abs/1811.11205

A separate *gater* network looks at the image once and emits one gate per filter of the whole backbone; the
backbone then runs with those filters switched on or off. The gater is a small CNN (feature extractor) followed by
a fully connected bottleneck and a fully connected layer with one output per gated filter; the gates are trained
end to end with improved semantic hashing (:func:`dynnet.estimators.semhash.improved_semhash`), and a sparsity
loss on the gates pushes filters off.

The gated filters are the inner channels of every basic residual block (``conv1`` outputs = ``conv2`` inputs);
sparse mode computes only the kept filters of both convolutions.

Departures from the paper:
* the gater is a two-convolution CNN (the paper uses a ResNet-18/ResNet-50 gater for ResNet backbones);
* the sparsity term is the mean gate probability ``sigmoid(a)`` plus the library's MAC-budget loss (the paper
  uses an L1 loss on the gates with a weight chosen per target);
* only the inner filters of residual blocks are gated (the block outputs feed the residual stream);
* the gater's last layer starts open (bias trick) so a fresh conversion reproduces the base network.

Budget: trained and calibrated. ``budget`` is the target fraction of the dense MACs (the gater network included): the
target of the MAC-budget loss; calibration shifts every gate logit by one offset (``calibration[0]``, an edit of the
gater's last bias, which its folded and compiled inference paths read too) until the mean MAC fraction on held-out
images equals the budget. Reachable (declared): 0.1 to 1; every filter off costs 0.09 of a ResNet-8 and 0.02 of
a ResNet-20 (the stem, the shortcuts, the head and the gater).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.blocks import DecisionMaker
from dynnet.convert import Targets, first_conv_in_channels
from dynnet.core import Decision, DynamicModel, LossOutput, Trace, current_trace
from dynnet.core.budget import BudgetPolicy, Knob
from dynnet.core.cache import structure_generation, tracing_or_compiling, version_key
from dynnet.core.recipe import recipe
from dynnet.estimators.semhash import improved_semhash
from dynnet.gates import GateBatchNorm1d, open_bias_
from dynnet.kernels import native
from dynnet.kernels.channel import GATE_GIVEN, ConvSpec, fold_bn, native_conv3x3_in
from dynnet.methods.channel._block import ChannelGatedBlock, convert_blocks
from dynnet.methods.channel._resnet import (
    block_compiled_ok,
    compiled_loop_ok,
    iter_blocks,
    resnet_head,
    resnet_stem,
)

__all__ = ["GaterNet", "GaterNetConfig", "GaterNetwork"]


@dataclass(frozen=True)
class GaterNetConfig:
    """Settings of GaterNet.

    Attributes:
        budget: target mean fraction of the dense MACs per image (the gater included): the MAC-budget loss's target
            and the calibration's.
        gater_width: channels of the gater's first convolution (the second has twice as many). Not ``width``: that
            name is the base network's width multiplier (``create_model(..., width=0.5)``), which it shadowed, so that
            GaterNet could not be built on a base of a given width.
        bottleneck: width of the gater's fully connected bottleneck.
        noise_std: improved-semhash noise in training.
        sparsity_weight: weight of the mean gate probability.
        budget_weight: weight of the MAC-budget loss.
        strategy: sparse-mode batch strategy.
    """

    budget: float = 0.5
    gater_width: int = 16
    bottleneck: int = 64
    noise_std: float = 1.0
    sparsity_weight: float = 0.1
    budget_weight: float = 1.0
    strategy: str = "auto"


def _conv3x3(x: Tensor, w: Tensor, b: Tensor, stride: tuple[int, int]) -> Tensor:
    """A 3×3 / padding 1 convolution: the compiled direct kernel for one sample where it applies, else PyTorch's."""
    spec = ConvSpec(stride, (1, 1), (1, 1))
    out = native_conv3x3_in(x, w, b, None, spec)
    return spec.conv(x, w, b) if out is None else out[0]


def _gater_op():
    """``torch.ops.dynnet.gater_logits`` with its MAC rule (the two convolutions and the two products, as the counter
    counts the Python path's ``conv2d`` and ``addmm``) registered on first use."""
    from dynnet.macs import MAC_RULES, register_mac_rule

    op = torch.ops.dynnet.gater_logits
    if op not in MAC_RULES:

        @register_mac_rule(op)
        def _rule(args: tuple, kwargs: dict, out: object) -> int:
            x, w1, s1, w2, s2, wl, wf = args[0], args[1], args[3], args[4], args[6], args[7], args[9]
            h1 = ((x.shape[2] - 1) // s1 + 1, (x.shape[3] - 1) // s1 + 1)
            h2 = ((h1[0] - 1) // s2 + 1, (h1[1] - 1) // s2 + 1)
            return w1.numel() * h1[0] * h1[1] + w2.numel() * h2[0] * h2[1] + wl.numel() + wf.numel()

    return op


class GaterNetwork(DecisionMaker):
    """Image Tensor[N, C, H, W] → gate values Tensor[N, F] and probabilities for the F gated filters."""

    granularity = "channel"

    def __init__(self, in_channels: int, filters: int, width: int, bottleneck: int, noise_std: float) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 2, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, bottleneck, bias=False),
            GateBatchNorm1d(bottleneck),
            nn.ReLU(inplace=True),
        )
        self.fc = open_bias_(nn.Linear(bottleneck, filters))
        self.noise_std = noise_std
        self.block_name = "gater"
        self._folded: tuple | None = None  # (generation, freshness check, folded layers) of inference_logits

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state["_folded"] = None  # may hold a compiled-extension object that cannot be copied or pickled; refolded
        return state

    def logits(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))

    def inference_logits(self, x: Tensor) -> Tensor:
        """``logits(x)`` for inference (eval mode, no gradients) with every batch norm folded into the layer before
        it: two convolutions (+ ReLU), a pooling and two ``addmm`` instead of eleven module calls, which cost more
        than the gater's MACs at batch 1 — for one float32 CPU sample one compiled call
        (``torch.ops.dynnet.gater_logits``). Same MACs; falls back to :meth:`logits` when the layers were changed."""
        folded = self._inference_weights()
        if folded is None:
            return self.logits(x)
        (w1, b1, s1), (w2, b2, s2), (wl, bl), (wf, bf) = folded
        if (
            x.shape[0] == 1
            and type(x) is Tensor
            and x.dtype == torch.float32
            and x.is_cpu
            and w1.dtype == torch.float32
            and w1.is_cpu
            and s1 in ((1, 1), (2, 2))
            and s2 in ((1, 1), (2, 2))
            and not native.disabled()
            and native.load(warn=False) is not None
        ):
            op = _gater_op() if native.observed() else native.direct("gater_logits")
            return op(x.contiguous(), w1, b1, s1[0], w2, b2, s2[0], wl, bl, wf, bf)
        h = _conv3x3(x, w1, b1, s1).relu_()
        h = _conv3x3(h, w2, b2, s2).relu_()
        z = torch.addmm(bl, h.mean((2, 3)), wl.t()).relu_()
        return torch.addmm(bf, z, wf.t())

    def _inference_weights(self) -> tuple | None:
        """The folded layers, cached until a parameter or buffer is edited or re-pointed (a ``Stamp`` of the compiled
        extension, else version keys) or any module's tensors or layers are replaced
        (:func:`~dynnet.core.cache.structure_generation`); ``None`` when ``features`` is not the structure built in
        ``__init__``. Nothing is cached while tracing (it would be baked into the graph)."""
        cached = self._folded
        generation = structure_generation()
        if cached is not None and cached[0] == generation and not tracing_or_compiling() and cached[1]():
            return cached[2]
        f = self.features
        kinds = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.BatchNorm2d, nn.ReLU)
        kinds += (nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear, GateBatchNorm1d, nn.ReLU)
        folded = None
        if len(f) == len(kinds) and all(type(m) is k for m, k in zip(f, kinds, strict=True)):
            folded = self._fold(f)
        tensors = [*self.parameters(), *self.buffers()]
        fresh = None
        if not tracing_or_compiling():
            ext = native.load(warn=False)
            if ext is not None and not any(t.is_inference() for t in tensors):
                fresh = ext.Stamp(tensors).fresh
            elif (key := version_key(*tensors)) is not None:
                fresh = lambda: version_key(*tensors) == key  # noqa: E731
        if folded is None and fresh is None:  # a structure that cannot be folded is remembered as such
            fresh = lambda: True  # noqa: E731
        self._folded = None if fresh is None else (generation, fresh, folded)
        return folded

    def _fold(self, f: nn.Sequential) -> tuple | None:
        c1, n1, c2, n2, lin, n3 = f[0], f[1], f[3], f[4], f[8], f[9]
        for c in (c1, c2):
            if c.kernel_size != (3, 3) or c.padding != (1, 1) or c.groups != 1 or c.dilation != (1, 1):
                return None
        if f[6].output_size not in (1, (1, 1)) or lin.bias is not None:
            return None
        with torch.inference_mode(False), torch.no_grad():
            w1, b1 = fold_bn(c1, n1)
            w2, b2 = fold_bn(c2, n2)
            wl, bl = fold_bn(lin, n3)
            return (  # NCHW-contiguous whatever the model's memory format: the compiled gater reads them so
                (w1.contiguous(), b1.contiguous(), c1.stride),
                (w2.contiguous(), b2.contiguous(), c2.stride),
                (wl.contiguous(), bl),
                (self.fc.weight.detach(), self.fc.bias.detach()),
            )

    def decide(self, x: Tensor) -> tuple[Tensor, Tensor]:
        t = current_trace()
        fast = not self.training and t is None and not torch.is_grad_enabled()
        logits = self.inference_logits(x) if fast else self.logits(x)
        value, prob = improved_semhash(logits, sample=self.training, noise_std=self.noise_std)
        if t is not None:
            g = self.cost("gater", lambda m, inp: m.logits(inp), x)
            t.record_macs("gater", float(g), batch_size=x.shape[0], minimum=g, maximum=g)
        return value, prob


class GaterNet(DynamicModel):
    """The converted network: the gater decides for every block, then the backbone runs block by block."""

    def budget_knob(self) -> Knob:
        """One offset added to every gate logit (the gater's last bias)."""
        return self.logit_shift_knob([(self.gate.fc.bias, None, 1.0)])

    def _run_compiled(self, x: Tensor) -> Tensor | None:
        """Batch-1 inference without a trace as compiled calls: the gater (BNs folded), then each block with its
        slice of the gater's 0/1 values (``gated_pair3x3``), with no module call or decision object between them;
        ``None`` (nothing computed) when the gater or a block is not in sparse eval mode, has hooks or has no
        compiled form, or the input is not one float32 CPU sample."""
        if not compiled_loop_ok(x, self.gate):
            return None
        steps: list[tuple] = []  # (block, None, 0) for an ungated block, else (block, plan, binary)
        for block in iter_blocks(self.net):
            if not isinstance(block, ChannelGatedBlock):
                steps.append((block, None, 0))
                continue
            plan = block.valid_plan() if block_compiled_ok(block) else None
            if plan is None:
                return None
            steps.append((block, plan, int(block.binary_scale())))
        value = improved_semhash(self.gate.inference_logits(x), sample=False)[0].reshape(-1)
        h = resnet_stem(self.net, x)
        offset = 0
        for block, plan, binary in steps:
            if plan is None:
                h = block(h)
                continue
            c = plan[3][0].shape[0]
            s = value[offset : offset + c]
            offset += c
            h = block.run_plan(plan, h, (GATE_GIVEN, s, s, s, s, binary))
        return resnet_head(self.net, h)

    def run(self, x: Tensor) -> Tensor:
        if current_trace() is None:
            out = self._run_compiled(x)
            if out is not None:
                return out
        out = self.gate(x)
        if out is None:  # dense mode / static cost probe: the base network
            return self.net(x)
        value, prob = out
        h = resnet_stem(self.net, x)
        offset = 0
        for block in iter_blocks(self.net):
            if isinstance(block, ChannelGatedBlock):
                c = block.channels
                v, p = value[:, offset : offset + c], prob[:, offset : offset + c]
                offset += c
                # hard: the unit's binary sample [a + noise > 0] (a relaxed value s(a + noise) is above 1/2 exactly
                # when it is), with the gradient of the gate values; at inference the values are already 0/1
                # (improved semantic hashing thresholds a at 0). Counting a relaxed value as on whenever it is above
                # 0 (a + noise > -2.4) counted ~all filters as spent in training while inference switched most off:
                # the standard profile's GaterNet trained at a MAC fraction of 1.0 and scored 25 % at 0.5.
                hard = (v.detach() > 0.5).to(v.dtype) + (v - v.detach()) if self.training else v
                h = block(h, Decision(hard=hard, soft=p, granularity="channel"), v)
            else:
                h = block(h)
        return resnet_head(self.net, h)

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        cfg = self.config
        budget = cfg.budget if budget is None else budget
        task = F.cross_entropy(logits, target)
        decisions = list(t.decisions_of("channel").values())
        sparsity = sum(d.soft.mean() for d in decisions) / len(decisions)
        total = task + cfg.sparsity_weight * sparsity
        parts = {"task": float(task.detach()), "sparsity": float(sparsity.detach())}
        if cfg.budget_weight:
            b = t.budget_loss(budget)
            total = total + cfg.budget_weight * b
            parts["budget"] = float(b.detach())
        return LossOutput(total, parts)


class _GatedBlock(ChannelGatedBlock):
    """A block whose gates come from the gater network (values in [0, 1]; binary at inference)."""

    def binary_scale(self) -> bool:
        return not self.training


@recipe(
    "gaternet",
    paper="You Look Twice: GaterNet for Dynamic Filter Selection in CNNs (CVPR 2019), arXiv:1811.11205",
    budget=BudgetPolicy("trained+calibrated", knob="gate logit offset", reachable=(0.1, 1.0),
                        derives="MAC-budget loss target = budget",
                        # standard profile, 2026-12-07: trained at 0.5 (93.06 %), calibrated to 0.25: 70.47 %
                        transfers=False),
    # 1: a filter counts as spent in training when its noisy logit is positive; 2: builds on the profile's base
    revision=2,
)  # fmt: skip
def convert(model: nn.Module, config: GaterNetConfig, targets: Targets = "auto") -> GaterNet:
    """Gate the inner filters of every target residual block (basic or Bottleneck) of a ResNet-style ``model`` (in
    place) from one gater network."""
    in_channels = first_conv_in_channels(model)
    blocks = convert_blocks(model, targets, lambda n, b, a: _GatedBlock(b, a, None, strategy=config.strategy))
    total = sum(b.channels for b in blocks)
    net = GaterNet(model, recipe="gaternet", config=copy.copy(config), in_channels=in_channels)
    net.gate = GaterNetwork(in_channels or 3, total, config.gater_width, config.bottleneck, config.noise_std)
    if [b for b in iter_blocks(model) if isinstance(b, ChannelGatedBlock)] != blocks:
        raise ValueError("gaternet gates blocks inside the stages (layer1, layer2, ...) of a ResNet-style network")
    return net
