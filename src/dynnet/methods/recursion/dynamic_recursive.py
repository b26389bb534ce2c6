"""Dynamic Recursive Neural Network — Guo, Yu, Wu, Liang, Qin & Yan, "Dynamic Recursive Neural Network",
CVPR 2019. https://openaccess.thecvf.com/content_CVPR_2019/papers/Guo_Dynamic_Recursive_Neural_Network_CVPR_2019_paper.pdf

Every residual block whose input and output shapes agree may be applied again to its own output, up to
``max_recursions`` extra times; before each extra application a learned controller (global average pool →
FC → BN → ReLU → FC to stop/recurse logits) looks at the current state and decides, per sample, whether to
recurse once more. Decisions are trained with Gumbel-Softmax (straight-through hard samples) and the
objective is cross-entropy plus the global MAC-budget loss (expected MACs over the base network's).
In sparse mode only the samples that recurse enter the block again (batch compaction); once a sample
stops it never re-enters.

Departures from the paper:
* the paper replaces stacked blocks by fewer recursive blocks trained from scratch; we convert a trained
  network: every eligible block keeps its weights, runs once as in the base network, and the controller
  adds *extra* recursions (cost ``dense = 0``), so open controllers (stop at once) reproduce the base;
* one controller per recursion step (the paper's gate design), trained with Gumbel-Softmax and the global
  MAC-budget loss instead of the paper's resource loss;
* the default budget is 1.0: extra recursions on some inputs must be paid for by fewer on others
  (the budget loss is two-sided).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dynnet.convert import Targets, first_conv_in_channels, replace_module, residual_blocks
from dynnet.core import Decision, DynamicBlock, DynamicModel, RecipeSpec, current_trace, register_recipe
from dynnet.estimators import gumbel_softmax
from dynnet.gates import PooledMLPGate

__all__ = ["DynamicRecursiveConfig", "RecursiveBlock"]


@dataclass(frozen=True)
class DynamicRecursiveConfig:
    """Settings of the Dynamic Recursive Neural Network.

    Attributes:
        budget: target of the MAC-budget loss, as a fraction of the base network's MACs.
        max_recursions: extra applications a block may get (each decided by its own controller).
        hidden: hidden width of the controllers.
        tau: Gumbel-Softmax temperature.
        budget_weight: weight of the MAC-budget loss.
    """

    budget: float = 1.0
    max_recursions: int = 2
    hidden: int = 16
    tau: float = 1.0
    budget_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.max_recursions < 1:
            raise ValueError(f"max_recursions must be >= 1, got {self.max_recursions!r}")


class RecursiveBlock(DynamicBlock):
    """A shape-preserving residual block applied once, then again while its controller says so.

    Args:
        block: the original block (its children are reused under their own names).
        channels: its input (= output) channels.
        max_recursions: extra applications.
        hidden: controller hidden width.
    """

    granularity = "recursion"

    def __init__(self, block: nn.Module, channels: int, max_recursions: int, hidden: int) -> None:
        super().__init__()
        for child_name, child in block.named_children():
            self.add_module(child_name, child)
        object.__setattr__(self, "_block", block)
        # Index 0 = stop is the open class: a fresh controller never recurses (the base network).
        self.controller = nn.ModuleList(PooledMLPGate(channels, 2, hidden, open_index=0) for _ in range(max_recursions))

    def apply_block(self, x: Tensor) -> Tensor:
        """One application of the original block, Tensor[N, C, H, W] → Tensor[N, C, H, W]."""
        return self._block(x)

    def _decide(self, step: int, y: Tensor) -> tuple[Tensor, Tensor]:
        sample, probs = gumbel_softmax(self.controller[step](y), self.tau, hard=True, noise=self.training)
        return sample[:, 1], probs[:, 1]

    def forward_dense(self, x: Tensor) -> Tensor:
        return self.apply_block(x)

    def forward_masked(self, x: Tensor) -> Tensor:
        y = self.apply_block(x)
        alive = y.new_ones(y.shape[0])
        alive_steps, probs = [], []
        for step in range(len(self.controller)):
            z, p = self._decide(step, y)
            alive = alive * z
            y = y + alive.view(-1, 1, 1, 1) * (self.apply_block(y) - y)
            alive_steps.append(alive)
            probs.append(p)
        self._record(x, alive_steps, probs, sparse=False)
        return y

    def forward_sparse(self, x: Tensor) -> Tensor:
        y = self.apply_block(x)
        n = y.shape[0]
        idx = torch.arange(n, device=y.device)
        alive_steps, probs = [], []
        for step in range(len(self.controller)):
            alive = y.new_zeros(n)
            prob = y.new_zeros(n)
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
        t.record_macs(f"{self.block_name}/block", body, batch_size=n, dense=body)
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
            t.record_macs(
                f"{self.block_name}/recursion{step + 1}",
                z * body,
                executed=z.detach() * body if sparse else body,
                minimum=0.0,
                maximum=body,
            )
            t.record_decision(f"{self.block_name}/recursion{step + 1}", Decision(alive, prob, "recursion"))
            evaluated = z.detach()


def _recursive_capable(block: nn.Module, in_channels: int) -> bool:
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    same_width = bool(convs) and max(m.out_channels for m in convs) == in_channels
    stride_one = all(s == 1 for m in convs for s in m.stride)
    return same_width and stride_one and getattr(block, "downsample", None) is None


def convert(model: nn.Module, config: DynamicRecursiveConfig, targets: Targets = "auto") -> DynamicModel:
    """Make every target residual block with an identity shortcut recursive (in place)."""
    converted = 0
    for name, block, adapter in residual_blocks(model, targets):
        channels = adapter.in_channels(block)
        if not _recursive_capable(block, channels):
            continue
        new = RecursiveBlock(block, channels, config.max_recursions, config.hidden)
        new.block_name, new.tau = name, config.tau
        replace_module(model, name, new)
        converted += 1
    if not converted:
        raise ValueError("dynamic_recursive needs residual blocks with an identity shortcut; none found")
    return DynamicModel(
        model, recipe="dynamic_recursive", config=copy.copy(config), in_channels=first_conv_in_channels(model)
    )


SPEC = register_recipe(
    RecipeSpec(
        name="dynamic_recursive",
        family="recursion",
        config_cls=DynamicRecursiveConfig,
        convert=convert,
        paper="Dynamic Recursive Neural Network (CVPR 2019), "
        "https://openaccess.thecvf.com/content_CVPR_2019/papers/Guo_Dynamic_Recursive_Neural_Network_CVPR_2019_paper.pdf",
    )
)
