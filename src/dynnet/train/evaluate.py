"""`evaluate`: accuracy, loss and per-sample MACs of a model on a data loader, in a chosen execution mode."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DistributedSampler

from dynnet.core import Trace, dynamic_blocks, set_mode, trace
from dynnet.macs import count_macs
from dynnet.train.distributed import all_gather_cat

__all__ = ["EvalResult", "decision_rates", "evaluate"]


@dataclass
class EvalResult:
    """What :func:`evaluate` measured, per sample and in aggregate.

    Attributes:
        accuracy: top-1 accuracy in [0, 1].
        loss: mean cross-entropy.
        macs: Tensor[N] float64 theoretical MACs of each sample (decisions' cost, gates included).
        executed: Tensor[N] float64 MACs the kernels really ran for each sample in this mode.
        dense_macs: per-sample MACs of the static network.
        mac_fraction: ``mean(macs) / dense_macs``.
        correct: Tensor[N] bool.
        logits: Tensor[N, K].
        targets: Tensor[N] int64.
        decision_rates: per gate, the fraction of samples (or units) it switched on, for binary decisions.
        mode: the execution mode used (``"sparse"``, ``"masked"`` or ``"dense"``).
    """

    accuracy: float
    loss: float
    macs: Tensor
    executed: Tensor
    dense_macs: float
    mac_fraction: float
    correct: Tensor
    logits: Tensor
    targets: Tensor
    decision_rates: dict[str, float] = field(default_factory=dict)
    mode: str = "sparse"

    @property
    def num_samples(self) -> int:
        return int(self.correct.numel())

    def summary(self) -> dict[str, float | int | str]:
        """Scalars only (for logs and CSV rows)."""
        return {
            "accuracy": self.accuracy,
            "loss": self.loss,
            "mean_macs": float(self.macs.mean()),
            "mean_executed_macs": float(self.executed.mean()),
            "dense_macs": self.dense_macs,
            "mac_fraction": self.mac_fraction,
            "num_samples": self.num_samples,
            "mode": self.mode,
        }


def decision_rates(t: Trace) -> dict[str, tuple[float, int]]:
    """Per recorded binary decision: (sum over samples of the per-sample on-rate, number of samples).

    Decisions whose values are not all 0/1 (expert or resolution indices) are left out.
    """
    out: dict[str, tuple[float, int]] = {}
    for name, d in t.decisions.items():
        hard = d.hard.detach()
        if hard.numel() == 0 or not bool(((hard == 0) | (hard == 1)).all()):
            continue
        out[name] = (float(d.rate().sum()), hard.shape[0])
    return out


def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    *,
    mode: str = "sparse",
    max_batches: int | None = None,
    device: str | torch.device | None = None,
) -> EvalResult:
    """Run ``model`` over ``loader`` without gradients and collect accuracy and per-sample MACs.

    The model is put in eval mode and, for a model with dynamic blocks, in execution ``mode``
    (:func:`dynnet.set_mode`); **it is left that way** — nothing is restored behind the caller's back
    (call ``model.train()`` / ``set_mode(model, "masked")`` to continue training). A static ``nn.Module``
    ignores ``mode``; its per-sample MACs are its dense cost (counted once with :func:`dynnet.count_macs`).

    When the loader is sharded by a ``DistributedSampler``, the per-sample results of every rank are gathered,
    so every rank returns the metrics of the whole split.

    Args:
        model: a ``DynamicModel`` or any classifier ``Tensor[N, C, H, W] -> Tensor[N, K]``.
        loader: batches ``(Tensor[B, C, H, W], Tensor[B])``.
        mode: ``"sparse"`` (real skipping), ``"masked"`` or ``"dense"``.
        max_batches: stop after this many batches (quick checks).
        device: move batches there (default: the device of the model's first parameter).

    Returns:
        :class:`EvalResult`.
    """
    if mode not in ("sparse", "masked", "dense"):
        raise ValueError(f"mode must be 'sparse', 'masked' or 'dense', got {mode!r}")
    model.eval()
    dynamic = any(True for _ in dynamic_blocks(model))
    if dynamic:
        set_mode(model, mode)
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    batches = loader if max_batches is None else itertools.islice(loader, max_batches)

    logits_all, targets_all, macs_all, exec_all = [], [], [], []
    rate_sums: dict[str, list[float]] = {}
    dense: float | None = None
    static_cost: float | None = None
    with torch.no_grad():
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with trace() as t:
                logits = model(x)
            n = x.shape[0]
            if t.entries:
                macs_all.append(t.macs().detach().cpu())
                exec_all.append(t.executed_macs().cpu())
                dense = t.dense_macs()
                for name, (s, count) in decision_rates(t).items():
                    acc = rate_sums.setdefault(name, [0.0, 0])
                    acc[0] += s
                    acc[1] += count
            else:
                if static_cost is None:
                    static_cost = float(count_macs(model, x[:1]).per_sample[0])
                macs_all.append(torch.full((n,), static_cost, dtype=torch.float64))
                exec_all.append(macs_all[-1].clone())
                dense = static_cost
            logits_all.append(logits.float().cpu())
            targets_all.append(y.cpu())
    if not logits_all:
        raise ValueError("evaluate: the loader yielded no batch")

    sharded = isinstance(getattr(loader, "sampler", None), DistributedSampler)
    logits_cat, targets, macs, executed = (torch.cat(v) for v in (logits_all, targets_all, macs_all, exec_all))
    if sharded:
        logits_cat, targets, macs, executed = (all_gather_cat(v) for v in (logits_cat, targets, macs, executed))
    correct = logits_cat.argmax(1) == targets
    loss = float(F.cross_entropy(logits_cat, targets))
    assert dense is not None
    return EvalResult(
        accuracy=float(correct.double().mean()),
        loss=loss,
        macs=macs,
        executed=executed,
        dense_macs=float(dense),
        mac_fraction=float(macs.mean()) / float(dense),
        correct=correct,
        logits=logits_cat,
        targets=targets,
        decision_rates={k: s / c for k, (s, c) in rate_sums.items()},
        mode=mode,
    )
