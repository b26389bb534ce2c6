"""Anytime evaluation and budget calibration of early-exit networks.

* :func:`collect_exits` runs a model in masked mode once over a loader (``(x, y)`` batches, or unlabelled image
  batches) and keeps, for every sample, each exit's score (and prediction and correctness when there are labels),
  plus the MACs a sample pays to stop at each exit (:class:`ExitProfile`).
* :func:`anytime_curve` — accuracy and MACs when every sample leaves at exit ``k`` (the anytime setting).
* :func:`calibrate_thresholds` — the budgeted-batch setting of MSDNet (Huang et al., ICLR 2018, §4): exit
  proportions follow a geometric profile ``q_k ∝ p^k``; on the validation profile each exit's threshold is set
  so that a fraction ``q_k`` of the samples stops there (most confident first), and ``p`` is searched so that
  the mean MACs meet the target.
* :func:`calibrate_` does it for a model and a validation loader and sets the thresholds;
  :func:`budgeted_curve` calibrates on validation and reports accuracy and MACs on the test split.

:func:`dynnet.calibrate` runs the same calibration (``EarlyExitModel.calibrate_to_``): only the scores and the
costs enter the search, so unlabelled images are enough.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dynnet.core import set_mode, trace
from dynnet.methods.early_exit._common import NEVER
from dynnet.methods.early_exit._model import EarlyExitModel

__all__ = [
    "Calibration",
    "ExitProfile",
    "anytime_curve",
    "apply_thresholds",
    "budgeted_curve",
    "calibrate_",
    "calibrate_thresholds",
    "calibrate_to_budget_",
    "collect_exits",
    "operating_points",
]


@dataclass(frozen=True)
class ExitProfile:
    """Every exit's verdict on every sample of a split.

    Attributes:
        scores: Tensor[N, K - 1] exit scores of the early exits (exit when ``score >= threshold``).
        correct: Tensor[N, K] bool, whether exit ``k`` classifies sample ``n`` correctly (``None``: no labels).
        predictions: Tensor[N, K] long, each exit's predicted class.
        costs: Tensor[K] float64 MACs per sample of stopping at exit ``k`` (segments, heads and decisions).
        dense_macs: MACs per sample of the static base network.
    """

    scores: Tensor
    correct: Tensor | None
    predictions: Tensor
    costs: Tensor
    dense_macs: float

    @property
    def num_exits(self) -> int:
        return self.costs.numel()

    @property
    def reachable(self) -> tuple[float, float]:
        """Mean MAC fractions reachable by thresholds: every sample at the first exit, every sample at the last."""
        return float(self.costs[0]) / self.dense_macs, float(self.costs[-1]) / self.dense_macs


@dataclass(frozen=True)
class Calibration:
    """Thresholds for a budget and what they achieve on the split they were fitted on (``accuracy`` is ``None``
    without labels; ``p`` is the geometric profile's parameter)."""

    thresholds: Tensor
    target_fraction: float
    achieved_fraction: float
    accuracy: float | None
    exit_rates: Tensor
    p: float


def collect_exits(model: EarlyExitModel, loader: Iterable[Any], *, max_batches: int | None = None) -> ExitProfile:
    """Run ``model`` (eval, masked mode: every exit computed) over ``loader``; see :class:`ExitProfile`.

    Args:
        model: an early-exit model.
        loader: ``(Tensor[B, C, H, W], Tensor[B])`` batches, or unlabelled Tensor[B, C, H, W] batches (then
            :attr:`ExitProfile.correct` is ``None``).
        max_batches: use only this many batches.

    The model is left in eval mode and masked execution.
    """
    model.eval()
    set_mode(model, "masked")
    device = next(model.parameters()).device
    scores, correct, preds = [], [], []
    labelled = True
    costs, dense = None, None
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = (batch, None) if isinstance(batch, Tensor) else (batch[0], batch[1] if len(batch) > 1 else None)
            x = x.to(device)
            with trace() as t:
                model(x)
            exits = model.exit_outputs(t)
            k = len(exits)
            scores.append(torch.stack([t.outputs[f"exit{j}/score"].float() for j in range(k - 1)], 1).cpu())
            p = torch.stack([z.argmax(1) for z in exits], 1).cpu()
            preds.append(p)
            if y is None:
                labelled = False
            else:
                correct.append(p == y.cpu().view(-1, 1))
            if costs is None:
                costs = model.cascade.cumulative_costs(x)
                dense = t.dense_macs()
    if costs is None:
        raise ValueError("collect_exits: the loader yielded no batch")
    return ExitProfile(
        torch.cat(scores), torch.cat(correct) if labelled else None, torch.cat(preds), costs, float(dense)
    )


def apply_thresholds(scores: Tensor, thresholds: Tensor) -> Tensor:
    """Tensor[N] long: the first exit whose score reaches its threshold (``K - 1`` when none does)."""
    hit = scores >= thresholds.view(1, -1).to(scores.dtype)
    k_last = scores.shape[1]
    first = torch.where(hit, torch.arange(k_last).view(1, -1), k_last)
    return first.amin(1) if k_last else torch.zeros(scores.shape[0], dtype=torch.long)


def _evaluate(profile: ExitProfile, exit_index: Tensor) -> tuple[float | None, float, Tensor]:
    """(accuracy or ``None`` without labels, mean MAC fraction, exit rates) of a given exit assignment."""
    correct = profile.correct
    acc = None if correct is None else float(correct.gather(1, exit_index.view(-1, 1)).float().mean())
    frac = float(profile.costs[exit_index].mean()) / profile.dense_macs
    rates = torch.bincount(exit_index, minlength=profile.num_exits).double() / exit_index.numel()
    return acc, frac, rates


def anytime_curve(profile: ExitProfile) -> list[dict[str, float]]:
    """Accuracy (``None`` without labels) and MACs when every sample stops at exit ``k``, for each ``k``."""
    return [
        {
            "exit": k,
            "accuracy": None if profile.correct is None else float(profile.correct[:, k].float().mean()),
            "macs": float(profile.costs[k]),
            "mac_fraction": float(profile.costs[k]) / profile.dense_macs,
        }
        for k in range(profile.num_exits)
    ]


def _geometric_thresholds(scores: Tensor, p: float) -> Tensor:
    """MSDNet's thresholds: exit k takes the ``q_k N`` most confident remaining samples, ``q_k ∝ p^k``."""
    n, k_early = scores.shape
    k_all = k_early + 1
    q = torch.tensor([p**k for k in range(k_all)], dtype=torch.float64)
    q = q / q.sum()
    remaining = torch.ones(n, dtype=torch.bool)
    thresholds = torch.full((k_early,), NEVER)
    for k in range(k_early):
        count = int(torch.floor(q[k] * n))
        cand = remaining.nonzero().squeeze(1)
        if count <= 0 or cand.numel() == 0:
            continue
        count = min(count, cand.numel())
        s = scores[cand, k]
        order = s.argsort(descending=True)
        thresholds[k] = float(s[order[count - 1]])
        remaining &= ~(scores[:, k] >= thresholds[k])
    return thresholds


def calibrate_thresholds(profile: ExitProfile, target_fraction: float, *, iters: int = 60) -> Calibration:
    """Thresholds whose mean MACs on ``profile`` meet ``target_fraction`` of the dense network's.

    Searches the geometric profile parameter ``log p`` by bisection (the mean cost grows with ``p``). A target
    below the cheapest reachable cost (everyone stops at the first exit) or above the most expensive one is
    clamped; :attr:`Calibration.achieved_fraction` says what was reached.

    Args:
        profile: the validation split's :class:`ExitProfile`.
        target_fraction: mean MACs as a fraction of the dense network, > 0.
        iters: bisection steps.
    """
    if not target_fraction > 0:
        raise ValueError(f"target_fraction must be positive, got {target_fraction}")
    scores = profile.scores.float()

    def cost_of(log_p: float) -> tuple[Tensor, float]:
        thr = _geometric_thresholds(scores, float(torch.tensor(log_p).exp()))
        return thr, _evaluate(profile, apply_thresholds(scores, thr))[1]

    lo, hi = -12.0, 12.0
    best = None
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        thr, frac = cost_of(mid)
        if best is None or abs(frac - target_fraction) < abs(best[1] - target_fraction):
            best = (thr, frac, mid)
        if frac > target_fraction:
            hi = mid
        else:
            lo = mid
    thr, _, log_p = best
    acc, frac, rates = _evaluate(profile, apply_thresholds(scores, thr))
    return Calibration(thr, float(target_fraction), frac, acc, rates, float(torch.tensor(log_p).exp()))


def calibrate_to_budget_(
    model: Any, profile: ExitProfile, budget: float, tolerance: float, *, extremes: str, label: str = "exit"
) -> dict[str, float]:
    """The body of an exit model's ``calibrate_to_`` (what :func:`dynnet.calibrate` calls): calibrate ``profile`` to
    ``budget``, set the model's thresholds and its ``calibration[0]`` (the geometric profile's ``p``).

    Args:
        model: a model with ``set_thresholds`` and a ``calibration`` buffer (an early-exit model, DT-RAM).
        profile: the exits' scores on the calibration images.
        budget: the target mean MAC fraction.
        tolerance: how far outside the reachable range a budget may lie and still be accepted (clamped).
        extremes: what the two ends of the range are, for the error (``"every image at the first exit … at the
            last"``).
        label: the name of one threshold in the returned dict (``"exit"`` → ``"exit0 threshold"``).

    Returns:
        ``{"exit profile p": p, "<label>0 threshold": ..., ...}``.

    Raises:
        ValueError: ``budget`` lies outside the MAC fractions the thresholds reach on these images.
    """
    lo, hi = profile.reachable
    if not lo - tolerance <= budget <= hi + tolerance:
        raise ValueError(
            f"budget {budget:.3f} is outside the MAC fractions [{lo:.3f}, {hi:.3f}] that {model.recipe}'s thresholds "
            f"reach on these images ({extremes}): choose a budget in that range"
        )
    cal = calibrate_thresholds(profile, budget)
    model.set_thresholds(cal.thresholds)
    with torch.no_grad():
        model.calibration[0] = cal.p
    return {"exit profile p": cal.p, **{f"{label}{k} threshold": float(v) for k, v in enumerate(cal.thresholds)}}


def calibrate_(
    model: EarlyExitModel,
    val_loader: Iterable[tuple[Tensor, Tensor]],
    budget: float | None = None,
    *,
    max_batches: int | None = None,
) -> Calibration:
    """Calibrate ``model``'s thresholds on a validation loader for a mean-MAC budget and set them.

    Args:
        model: an early-exit model.
        val_loader: validation batches.
        budget: target mean MACs as a fraction of the dense network (default: ``model.config.budget``).
        max_batches: use only this many batches.
    """
    budget = model.config.budget if budget is None else budget
    cal = calibrate_thresholds(collect_exits(model, val_loader, max_batches=max_batches), budget)
    model.set_thresholds(cal.thresholds)
    return cal


def budgeted_curve(val: ExitProfile, test: ExitProfile, budgets: Sequence[float]) -> list[dict[str, float]]:
    """For each budget: calibrate on ``val``, then accuracy and mean MAC fraction on ``test``."""
    rows = []
    for b in budgets:
        cal = calibrate_thresholds(val, b)
        acc, frac, rates = _evaluate(test, apply_thresholds(test.scores.float(), cal.thresholds))
        rows.append(
            {
                "budget": float(b),
                "val_fraction": cal.achieved_fraction,
                "val_accuracy": cal.accuracy,
                "test_fraction": frac,
                "test_accuracy": acc,
                "test_macs": frac * test.dense_macs,
                "exit_rates": [round(float(r), 4) for r in rates],
                "thresholds": [float(t) for t in cal.thresholds],
            }
        )
    return rows


OPERATING_BUDGETS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""The budgets of :func:`operating_points` (clamped to what the exits reach; a repeated point is kept once)."""


def operating_points(
    model: EarlyExitModel, val: Iterable[Any] | None, test: Iterable[Any], budgets: Sequence[float] = OPERATING_BUDGETS
) -> dict[str, Any]:
    """The benchmark suite's measurement of an exit cascade (``RecipeSpec.bench_metrics``): every exit's accuracy
    and MACs on ``test`` (the anytime curve), and the operating points of the trained model without retraining —
    thresholds calibrated on ``val`` for each budget (MSDNet's budgeted batch classification), accuracy and MAC
    fraction on ``test``. One masked pass over each split; the model's own thresholds are left as they are.

    Args:
        model: a trained early-exit model.
        val: ``(Tensor[B, C, H, W], Tensor[B])`` validation batches (``None``: no operating points).
        test: test batches, the same shape.
        budgets: MAC fractions of the operating points.

    Returns:
        ``{"anytime": [{"exit", "accuracy", "macs", "mac_fraction"}...], "operating_points": [{"budget",
        "val_fraction", "test_fraction", "test_accuracy", "exit_rates", ...}...]}``.
    """
    tested = collect_exits(model, test)
    out: dict[str, Any] = {"anytime": anytime_curve(tested), "operating_points": []}
    if val is not None:
        profile = collect_exits(model, val)
        lo, hi = profile.reachable
        reachable = sorted({round(min(max(b, lo), hi), 4) for b in budgets})
        out["operating_points"] = budgeted_curve(profile, tested, reachable)
    return out
