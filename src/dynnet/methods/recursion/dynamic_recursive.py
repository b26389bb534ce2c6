"""Dynamic Recursive Neural Network — Guo, Yu, Wu, Liang, Qin & Yan, "Dynamic Recursive Neural Network",
CVPR 2019. https://openaccess.thecvf.com/content_CVPR_2019/papers/Guo_Dynamic_Recursive_Neural_Network_CVPR_2019_paper.pdf

Every residual block whose input and output shapes agree is applied a per-input number of times, from 0 to
``1 + max_recursions``: before each application a learned controller (global average pool → FC → BN → ReLU → FC to
stop/apply logits) looks at the current state and decides, per sample, whether to apply the block (once more).
Stopping is final. Decisions are trained with Gumbel-Softmax (straight-through hard samples) and the objective is
cross-entropy plus the global MAC-budget loss (expected MACs over the base network's). In sparse mode only the
samples that go on enter the block again (batch compaction).

Departures from the paper:
* the paper replaces stacked blocks by fewer recursive blocks trained from scratch, and its gates choose how often
  each runs; we convert a trained network: every eligible block keeps its weights and its controllers choose how
  often it runs — 0 times (the identity shortcut alone), once (the base network) or up to ``max_recursions`` extra
  times. Open controllers (apply once, then stop) reproduce the base;
* one controller per application (the paper's gate design), trained with Gumbel-Softmax and the global
  MAC-budget loss instead of the paper's resource loss;
* no Loopy Variable Batch Normalization: every application uses the block's own batch norms.

Budget: trained and calibrated. ``budget`` is the target mean fraction of the base network's MACs per image (the
controllers included): the target of the MAC-budget loss, so extra recursions on some inputs are paid for by
applications skipped on others; calibration then shifts the "apply" logit of every controller by one offset
(``calibration[0]``) until the mean MAC fraction on held-out images equals the budget. The reachable range is from
no eligible block applied (about 0.19 of ResNet-20, whose identity blocks are 7 of 9; 0.63 of ResNet-8, whose only
identity block is ``layer1.0``) to beyond the base network (every block applied ``1 + max_recursions`` times); the
declared range is 0.25-1.0.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dynnet.blocks.residual import adopt_children
from dynnet.convert import ResidualAdapter, Targets, first_conv_in_channels, replace_module, residual_blocks
from dynnet.core import Decision, DynamicBlock, DynamicModel, current_trace
from dynnet.core.budget import BudgetPolicy, Knob, LogitShift
from dynnet.core.recipe import recipe
from dynnet.estimators import gumbel_softmax
from dynnet.gates import PooledMLPGate
from dynnet.kernels import compact_add

__all__ = ["DynamicRecursive", "DynamicRecursiveConfig", "RecursiveBlock"]

STOP, APPLY = 0, 1  # the controllers' logits


@dataclass(frozen=True)
class DynamicRecursiveConfig:
    """Settings of the Dynamic Recursive Neural Network.

    Attributes:
        budget: target mean fraction of the base network's MACs per image (controllers included): the target of the
            MAC-budget loss and of calibration (the controllers' "apply" logit offset).
        max_recursions: extra applications a block may get after its first (each decided by its own controller).
        hidden: hidden width of the controllers.
        tau: Gumbel-Softmax temperature.
        budget_weight: weight of the MAC-budget loss.
    """

    budget: float = 0.75
    max_recursions: int = 2
    hidden: int = 16
    tau: float = 1.0
    budget_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.max_recursions < 1:
            raise ValueError(f"max_recursions must be >= 1, got {self.max_recursions!r}")
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {self.hidden!r}")
        if not self.tau > 0:
            raise ValueError(f"tau must be positive, got {self.tau!r}")


class RecursiveBlock(DynamicBlock):
    """A shape-preserving residual block applied 0 to ``1 + max_recursions`` times, as its controllers say.

    Controller ``s`` looks at the state after ``s`` applications and decides whether to apply the block once more
    (logit ``APPLY``) or to stop (``STOP``). Controller 0 starts open on "apply" and the others on "stop", so a fresh
    block runs exactly once (the base network).

    Args:
        block: the original block (its children are reused under their own names).
        adapter: how to split it into body, shortcut and post-op (0 applications give ``post(shortcut(x))``).
        channels: its input (= output) channels.
        max_recursions: extra applications after the first.
        hidden: controller hidden width.
    """

    granularity = "recursion"

    def __init__(
        self, block: nn.Module, adapter: ResidualAdapter, channels: int, max_recursions: int, hidden: int
    ) -> None:
        super().__init__()
        adopt_children(self, block)
        self.adapter = adapter
        self.controller = nn.ModuleList(
            PooledMLPGate(channels, 2, hidden, open_index=APPLY if s == 0 else STOP) for s in range(max_recursions + 1)
        )

    def apply_block(self, x: Tensor) -> Tensor:
        """One application of the original block, Tensor[N, C, H, W] → Tensor[N, C, H, W]."""
        return self._block(x)

    def body(self, x: Tensor) -> Tensor:
        """The block's residual branch (what one application costs)."""
        return self.adapter.body(self._block, x)

    def first(self, x: Tensor, keep: Tensor) -> Tensor:
        """The first application for the kept samples, ``post(shortcut(x))`` (0 applications) for the others.

        Args:
            x: Tensor[N, C, H, W].
            keep: Tensor[N] exactly 0/1 (sparse mode: the body runs on the kept samples only).
        """
        out = compact_add(self.body, x, keep, self.adapter.shortcut(self._block, x))
        if out is x:  # nobody applies the block and the shortcut is the identity: the post-op never edits the input
            out = out.clone()
        return self.adapter.post(self._block, out)

    def _decide(self, step: int, y: Tensor) -> tuple[Tensor, Tensor]:
        """Tensor[N] hard "apply" decision (straight-through in training) and Tensor[N] its probability."""
        sample, probs = gumbel_softmax(self.controller[step](y), self.tau, hard=True, noise=self.training)
        return sample[:, APPLY], probs[:, APPLY]

    def forward_dense(self, x: Tensor) -> Tensor:
        return self.apply_block(x)

    def forward_masked(self, x: Tensor) -> Tensor:
        y = x
        alive = x.new_ones(x.shape[0])
        alive_steps, probs = [], []
        for step in range(len(self.controller)):
            z, p = self._decide(step, y)
            alive = alive * z
            a = alive.view(-1, 1, 1, 1)
            if step == 0:  # post(shortcut(x) + a * body(x)): the block itself where a = 1, its skip where a = 0
                y = self.adapter.post(self._block, self.adapter.shortcut(self._block, x) + a * self.body(x))
            else:  # exactly apply_block(y) where a = 1, y where a = 0
                y = a * self.apply_block(y) + (1 - a) * y
            alive_steps.append(alive)
            probs.append(p)
        self._record(x, alive_steps, probs, sparse=False)
        return y

    def forward_sparse(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        z, p = self._decide(0, x)
        alive, prob = z.detach().clone(), p
        y = self.first(x, alive)
        idx = alive.nonzero().squeeze(1)
        alive_steps, probs = [alive], [prob]
        for step in range(1, len(self.controller)):
            alive = x.new_zeros(n)
            prob = x.new_zeros(n)
            if idx.numel():
                z, p = self._decide(step, y if idx.numel() == n else y.index_select(0, idx))
                prob[idx] = p
                idx = idx[z > 0.5]
                alive[idx] = 1.0
                if idx.numel() == n:
                    y = self.apply_block(y)
                elif idx.numel():
                    y = y.index_copy(0, idx, self.apply_block(y.index_select(0, idx)))
            alive_steps.append(alive)
            probs.append(prob)
        self._record(x, alive_steps, probs, sparse=True)
        return y

    def _record(self, x: Tensor, alive_steps: list[Tensor], probs: list[Tensor], *, sparse: bool) -> None:
        t = current_trace()
        if t is None:
            return
        n = x.shape[0]
        body = float(self.cost("block", lambda m, inp: m.apply_block(inp), x))
        evaluated = torch.ones(n, dtype=torch.float64)  # who runs the controller of this step
        for step, (alive, prob) in enumerate(zip(alive_steps, probs, strict=True)):
            g = float(self.cost(f"controller{step}", lambda m, inp, s=step: m.controller[s](inp), x))
            t.record_macs(
                f"{self.block_name}/controller{step}",
                evaluated * g,
                executed=evaluated * g if sparse else g,
                minimum=g if step == 0 else 0.0,
                maximum=g,
            )
            z = alive.double()
            name = f"{self.block_name}/block" if step == 0 else f"{self.block_name}/recursion{step}"
            t.record_macs(
                name,
                z * body,
                executed=z.detach() * body if sparse else body,
                minimum=0.0,
                maximum=body,
                dense=body if step == 0 else 0.0,
            )
            t.record_decision(name, Decision(alive, prob, "recursion"))
            evaluated = z.detach()


class DynamicRecursive(DynamicModel):
    """The converted network; objective: cross-entropy + ``budget_weight`` × MAC-budget loss."""

    def budget_knob(self) -> Knob:
        """One offset added to the "apply" logit of every controller: the larger, the more applications."""
        entries = [(c.fc2.bias, APPLY, 1.0) for _, b in self.blocks() for c in b.controller]
        return LogitShift(self.calibration[0], entries).knob(name="controller apply-logit offset")


def _recursive_capable(block: nn.Module, in_channels: int) -> bool:
    """Whether the block maps its input to the same shape through an identity shortcut (its last convolution keeps
    the width, none strides, no projection), so that the block can be applied again to its own output."""
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    same_width = bool(convs) and convs[-1].out_channels == in_channels
    stride_one = all(s == 1 for m in convs for s in m.stride)
    projection = getattr(block, "downsample", None) is not None or getattr(block, "proj", None) is not None
    return same_width and stride_one and not projection


@recipe(
    "dynamic_recursive",
    paper="Dynamic Recursive Neural Network (CVPR 2019), "
    "https://openaccess.thecvf.com/content_CVPR_2019/papers/Guo_Dynamic_Recursive_Neural_Network_CVPR_2019_paper.pdf",
    budget=BudgetPolicy("trained+calibrated", knob="controller apply-logit offset", reachable=(0.25, 1.0),
                        derives="MAC-budget loss target = budget"),
    test_base="cifar_resnet20",
)  # fmt: skip
def convert(model: nn.Module, config: DynamicRecursiveConfig, targets: Targets = "auto") -> DynamicRecursive:
    """Make every target residual block with an identity shortcut recursive (in place)."""
    converted = 0
    for name, block, adapter in residual_blocks(model, targets):
        channels = adapter.in_channels(block)
        if not _recursive_capable(block, channels):
            continue
        new = RecursiveBlock(block, adapter, channels, config.max_recursions, config.hidden)
        new.block_name, new.tau = name, config.tau
        replace_module(model, name, new)
        converted += 1
    if not converted:
        raise ValueError("dynamic_recursive needs residual blocks with an identity shortcut; none found")
    return DynamicRecursive(
        model, recipe="dynamic_recursive", config=copy.copy(config), in_channels=first_conv_in_channels(model)
    )
