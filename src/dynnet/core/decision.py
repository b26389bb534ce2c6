"""`Decision`: what a gate decided for each input of a batch."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["GRANULARITIES", "Decision"]

GRANULARITIES = ("layer", "exit", "channel", "spatial", "block", "resolution", "glimpse", "expert", "recursion")


@dataclass(frozen=True)
class Decision:
    """The result of a gate for one batch.

    Attributes:
        hard: Tensor[N, ...] — the executed decision (0/1 values or indices). In training this is the
            straight-through tensor of the estimator: its forward value is hard, its gradient is the
            soft one, so ``hard`` may carry gradients.
        soft: Tensor[N, ...] — probabilities of the decision (same shape as ``hard`` for binary gates),
            or ``None`` when the estimator has none (e.g. a deterministic threshold).
        granularity: what the decision switches, one of ``GRANULARITIES``.
    """

    hard: Tensor
    soft: Tensor | None
    granularity: str

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.soft is not None and self.soft.shape[0] != self.hard.shape[0]:
            raise ValueError(f"hard and soft disagree on batch size: {self.hard.shape[0]} vs {self.soft.shape[0]}")

    @property
    def batch_size(self) -> int:
        return self.hard.shape[0]

    def rate(self) -> Tensor:
        """Per-sample fraction of units switched on: Tensor[N] (binary decisions only)."""
        return self.hard.detach().float().flatten(1).mean(1) if self.hard.dim() > 1 else self.hard.detach().float()
