"""`count_macs`: per-sample MACs of any model, static or dynamic."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dynnet.core.trace import trace
from dynnet.macs.counter import MacCounter
from dynnet.macs.report import format_module_table

__all__ = ["MacReport", "count_macs"]


@dataclass
class MacReport:
    """MACs of one forward pass.

    Attributes:
        per_sample: Tensor[N] theoretical MACs of each input (the decisions' cost, gates included).
        executed: Tensor[N] MACs the kernels performed for each input (equals ``per_sample`` for static
            models; in masked mode a dynamic model executes dense work).
        total: MACs counted by the aten-level counter over the whole batch (what really ran).
        dense: per-sample MACs of the static network (for a static model, its own cost).
        ops: MACs by aten op; ``uncounted``: ops seen that have no counting rule (call counts).
    """

    per_sample: Tensor
    executed: Tensor
    total: int
    dense: float
    module_macs: dict[str, int] = field(repr=False, default_factory=dict)
    ops: dict[str, int] = field(default_factory=dict)
    uncounted: dict[str, int] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        """Mean theoretical MACs per sample."""
        return float(self.per_sample.float().mean())

    @property
    def fraction(self) -> float:
        """Mean theoretical MACs as a fraction of the static network's."""
        return self.mean / self.dense

    def by_module(self) -> dict[str, int]:
        """Executed MACs of each module over the batch (inclusive of children), by dotted path."""
        return dict(self.module_macs)

    def table(self, max_depth: int = 2) -> str:
        """Per-module table, per sample (total / N)."""
        return format_module_table(self.module_macs, self.total, max_depth, per_sample_divisor=len(self.per_sample))


def count_macs(model: nn.Module, x: Tensor) -> MacReport:
    """Count the MACs of ``model(x)`` (1 MAC = one fused multiply-add; FLOPs = 2 × MACs).

    Static parts are counted by the aten-op rule table of :mod:`dynnet.macs.rules` from what actually
    executes; dynamic blocks report decision-aware per-sample MACs into the trace. The model runs in
    its current train/eval state and execution mode, under ``torch.no_grad()``.

    Args:
        model: any ``nn.Module`` taking one Tensor[N, C, H, W].
        x: the batch.

    Returns:
        A :class:`MacReport`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"count_macs expects an nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"count_macs needs a non-empty batch tensor, got {getattr(x, 'shape', type(x).__name__)}")
    n = x.shape[0]
    with torch.no_grad(), trace() as t, MacCounter(model) as counter:
        model(x)
    total = counter.total
    if t.entries:
        per_sample, executed, dense = t.macs().detach(), t.executed_macs(), t.dense_macs()
    else:
        if total % n:
            raise RuntimeError(f"static model MACs {total} do not divide evenly over a batch of {n}")
        per_sample = torch.full((n,), float(total // n))
        executed, dense = per_sample.clone(), float(total // n)
    return MacReport(
        per_sample=per_sample,
        executed=executed,
        total=total,
        dense=dense,
        module_macs=counter.by_module(),
        ops=counter.by_op(),
        uncounted=counter.uncounted_ops(),
    )
