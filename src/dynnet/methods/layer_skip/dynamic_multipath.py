"""Dynamic Multi-path — Su, Zhou, Wu, Su, Liang, Liu, Zheng, Wang, Yan & Hu, "Dynamic Multi-path Neural
Network", arXiv 2019. https://arxiv.org/abs/1902.10949

Each residual block is split into ``paths`` parallel sub-layers: path ``p`` is the block's first
convolution restricted to the ``p``-th group of its output channels, followed (after BN and ReLU) by the
second convolution restricted to the same group of *input* channels. The sum of all paths is exactly the
original body, so with every path on the block is the original block. A gate on the block's input
(global average pool → FC → BN → ReLU → FC, one logit per path, Gumbel-Sigmoid with straight-through
hard decisions) chooses, per sample, which paths run; a block whose paths are all off keeps only its
shortcut (plus the second BN's shift). The objective is cross-entropy plus the global MAC-budget loss.

Execution: masked mode multiplies the hidden channels by the path mask; sparse mode runs each path only
on the samples that chose it (batch compaction per path, ``index_add`` into the block's pre-BN sum), with
a dense fast path when every sample keeps every path and no work for a path nobody chose.

Departures from the paper:
* the paths are channel groups of the pretrained block (the paper designs the sub-layers and trains from
  scratch), so a converted network starts as the base network (gates open, bias trick);
* the paper's gate sees the previous layer's gate state as well (a recurrent controller); ours sees the
  block input only; decisions use Gumbel-Sigmoid with a MAC-budget loss instead of the paper's
  computation-cost regulariser;
* implemented for basic blocks (``conv1``/``bn1``/``relu``/``conv2``/``bn2`` — dynnet CIFAR and torchvision
  ResNet ``BasicBlock``); other blocks are left unchanged.

Budget: trained and calibrated. ``budget`` (the target mean fraction of the dense MACs per image) is the target of
the MAC-budget loss; calibration then shifts every path logit of every gate by one offset (``calibration[0]``) until
the mean MAC fraction on held-out images equals the budget.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.blocks.residual import adopt_children
from dynnet.convert import Targets, first_conv_in_channels, replace_module, residual_blocks
from dynnet.convert.residual import ResidualAdapter
from dynnet.core import Decision, DynamicBlock, DynamicModel, current_trace
from dynnet.core.budget import BudgetPolicy, Knob
from dynnet.core.recipe import recipe
from dynnet.estimators import gumbel_sigmoid
from dynnet.gates import PooledMLPGate
from dynnet.methods.layer_skip._resnet import LogitEntry, gate_logit_knob

__all__ = ["DynamicMultipath", "DynamicMultipathConfig", "MultiPathBlock"]


@dataclass(frozen=True)
class DynamicMultipathConfig:
    """Settings of Dynamic Multi-path.

    Attributes:
        budget: target mean fraction of the dense MACs per image (gates included): the target of the MAC-budget loss
            and of calibration.
        paths: parallel paths per block (the hidden channels are split into this many groups).
        hidden: hidden width of each gate.
        tau: Gumbel-Sigmoid temperature.
        budget_weight: weight of the MAC-budget loss.
    """

    budget: float = 0.5
    paths: int = 2
    hidden: int = 16
    tau: float = 1.0
    budget_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.paths < 2:
            raise ValueError(f"paths must be >= 2, got {self.paths!r}")


def _bn(bn: nn.BatchNorm2d, x: Tensor, lo: int, hi: int) -> Tensor:
    """Batch norm of channels ``lo:hi`` of ``bn`` applied to ``x`` (eval statistics; used in sparse mode only)."""
    return F.batch_norm(
        x, bn.running_mean[lo:hi], bn.running_var[lo:hi], bn.weight[lo:hi], bn.bias[lo:hi], False, 0.0, bn.eps
    )


class MultiPathBlock(DynamicBlock):
    """A basic residual block whose body is ``paths`` parallel channel-group sub-layers, each gated per sample.

    Args:
        block: the original block (children reused under their own names: ``conv1``, ``bn1``, ...).
        adapter: its residual adapter (shortcut and post-op).
        gate: module mapping the block input Tensor[N, C, H, W] to path logits Tensor[N, P].
        paths: P.
    """

    granularity = "layer"

    def __init__(self, block: nn.Module, adapter: ResidualAdapter, gate: nn.Module, paths: int) -> None:
        super().__init__()
        adopt_children(self, block)
        self.adapter = adapter
        self.gate = gate
        hidden = block.conv1.out_channels
        bounds = torch.linspace(0, hidden, paths + 1).round().long().tolist()
        self.groups = [(bounds[i], bounds[i + 1]) for i in range(paths)]

    # -- pieces ---------------------------------------------------------------------------------
    def hidden(self, x: Tensor) -> Tensor:
        return self.relu(self.bn1(self.conv1(x)))

    def body(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(self.hidden(x)))

    def path(self, x: Tensor, p: int) -> Tensor:
        """Path ``p``'s contribution to ``conv2``'s output (before ``bn2``), eval-mode BN; Tensor[M, C', H', W']."""
        lo, hi = self.groups[p]
        c1, c2 = self.conv1, self.conv2
        h = F.conv2d(x, c1.weight[lo:hi], None, c1.stride, c1.padding, c1.dilation)
        h = self.relu(_bn(self.bn1, h, lo, hi))
        return F.conv2d(h, c2.weight[:, lo:hi], None, c2.stride, c2.padding, c2.dilation)

    def open_logits(self) -> list[LogitEntry]:
        """Every path's keep logit is an output of the gate's last linear layer: shift that layer's bias."""
        return [(self.gate.fc2.bias, None, 1.0)]

    def decide(self, x: Tensor) -> Decision:
        hard, prob = gumbel_sigmoid(self.gate(x), self.tau, hard=True, noise=self.training)
        return Decision(hard, prob, self.granularity)

    # -- modes ----------------------------------------------------------------------------------
    def forward_dense(self, x: Tensor) -> Tensor:
        return self.adapter.post(self._block, self.adapter.shortcut(self._block, x) + self.body(x))

    def forward_masked(self, x: Tensor) -> Tensor:
        d = self.decide(x)
        sizes = [hi - lo for lo, hi in self.groups]
        mask = torch.repeat_interleave(d.hard, torch.tensor(sizes, device=x.device), dim=1).to(x.dtype)
        y = self.bn2(self.conv2(self.hidden(x) * mask[:, :, None, None]))
        out = self.adapter.post(self._block, self.adapter.shortcut(self._block, x) + y)
        self._record(x, d, sparse=False)
        return out

    def forward_sparse(self, x: Tensor) -> Tensor:
        d = self.decide(x)
        keep = d.hard > 0.5
        shortcut = self.adapter.shortcut(self._block, x)
        if bool(keep.all()):  # fast path: the original block
            y = self.body(x)
        else:
            acc = x.new_zeros((x.shape[0], self.conv2.out_channels, *shortcut.shape[2:]))
            for p in range(len(self.groups)):
                idx = keep[:, p].nonzero().squeeze(1)
                if idx.numel() == x.shape[0]:
                    acc = acc + self.path(x, p)
                elif idx.numel():
                    acc = acc.index_add(0, idx, self.path(x.index_select(0, idx), p))
            y = self.bn2(acc)
        out = self.adapter.post(self._block, shortcut + y)
        self._record(x, d, sparse=True)
        return out

    def _record(self, x: Tensor, d: Decision, *, sparse: bool) -> None:
        t = current_trace()
        if t is None:
            return
        t.record_decision(self.block_name, d)
        n = x.shape[0]
        hard = d.hard.double()
        for p in range(len(self.groups)):
            cost = float(self.cost(f"path{p}", lambda m, inp, q=p: m.path(inp, q), x))
            executed = hard[:, p].detach() * cost if sparse else cost
            t.record_macs(
                f"{self.block_name}/path{p}",
                hard[:, p] * cost,
                executed=executed,
                minimum=0.0,
                maximum=cost,
                dense=cost,
            )
        g = self.cost("gate", lambda m, inp: m.gate(inp), x)
        t.record_macs(f"{self.block_name}/gate", float(g), batch_size=n)


class DynamicMultipath(DynamicModel):
    """The converted network; its objective is the default one (cross-entropy + ``budget_weight`` × MAC budget)."""

    def budget_knob(self) -> Knob:
        """One offset added to every path logit of every gate."""
        return gate_logit_knob(self)


def _is_basic(block: nn.Module) -> bool:
    names = {"conv1", "bn1", "relu", "conv2", "bn2"}
    return names <= {n for n, _ in block.named_children()} and not hasattr(block, "conv3")


@recipe(
    "dynamic_multipath",
    paper="Dynamic Multi-path Neural Network (arXiv 2019), arXiv:1902.10949",
    budget=BudgetPolicy("trained+calibrated", knob="gate logit offset", reachable=(0.1, 1.0),
                        derives="target of the MAC-budget loss = budget"),
)  # fmt: skip
def convert(model: nn.Module, config: DynamicMultipathConfig, targets: Targets = "auto") -> DynamicMultipath:
    """Split every target basic block of ``model`` into gated parallel paths (in place)."""
    converted = 0
    for name, block, adapter in residual_blocks(model, targets):
        if not _is_basic(block) or block.conv1.out_channels < config.paths:
            continue
        gate = PooledMLPGate(adapter.in_channels(block), config.paths, config.hidden, open_index=None)
        new = MultiPathBlock(block, adapter, gate, config.paths)
        new.block_name, new.tau = name, config.tau
        replace_module(model, name, new)
        converted += 1
    if not converted:
        raise ValueError("dynamic_multipath needs basic residual blocks (conv1/bn1/relu/conv2/bn2); none found")
    return DynamicMultipath(
        model, recipe="dynamic_multipath", config=copy.copy(config), in_channels=first_conv_in_channels(model)
    )
