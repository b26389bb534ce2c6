"""What a budget means, how each recipe honours it, and the knob that calibration moves.

A **budget** is one number for every recipe: the target mean fraction of the dense base network's MACs per image,
the gates and policy networks included (``Trace.macs().mean() / Trace.dense_macs()``). A paper's own knob
(execution rate, density, keep fraction, energy, number of glimpses, capacity, exit thresholds) keeps its own
name in the recipe's config and is derived from the budget where the recipe is built from one.

Each recipe declares a :class:`BudgetPolicy` at registration:

* ``how`` — ``"trained"`` (a budget loss pulls the MAC fraction to the budget during training),
  ``"calibrated"`` (a decision threshold is set on data so that the mean MAC fraction equals the budget),
  ``"trained+calibrated"`` (both), or ``"fixed"`` (the budget is built into the structure at conversion);
* ``reachable`` — the range of MAC fractions a conversion can reach; ``convert(..., budget=b)`` refuses a budget
  outside it with a clear error;
* ``knob`` — the name of the decision threshold that :func:`dynnet.calibrate` moves.

A model exposes its knob with :meth:`DynamicModel.budget_knob` (a :class:`Knob`): a scalar whose value moves the
MAC fraction monotonically. The value lives in the model's state (parameters or buffers), so it round-trips through
``state_dict``, checkpoints and export.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "BUDGET_HOWS",
    "BudgetPolicy",
    "Knob",
    "LogitShift",
    "check_budget_in_range",
    "mean_mac_fraction",
    "search_knob",
]

BUDGET_HOWS = ("trained", "calibrated", "trained+calibrated", "fixed")


@dataclass(frozen=True)
class BudgetPolicy:
    """How a recipe honours ``budget`` (the target mean fraction of the dense MACs per image).

    Attributes:
        how: one of :data:`BUDGET_HOWS`.
        knob: what :func:`dynnet.calibrate` moves (``"gate logit offset"``, ``"exit thresholds"``, ...);
            ``""`` for ``how="fixed"`` recipes that have none.
        reachable: ``(lo, hi)`` MAC fractions a conversion can reach (on the recipe's usual base networks).
        derives: the paper's own settings the budget is translated into at conversion (documentation).
        transfers: whether a model trained at one budget keeps its accuracy when calibrated to a distant one (0.5 to
            0.25 or 0.75). ``False`` where measured otherwise (FBS trained at 0.5 and calibrated to 0.25: 94.0 % →
            32.2 %): benchmarks then train such a recipe at every budget instead of calibrating one trained model.
    """

    how: str
    knob: str = "gate logit offset"
    reachable: tuple[float, float] = (0.05, 1.0)
    derives: str = ""
    transfers: bool = True

    def __post_init__(self) -> None:
        if self.how not in BUDGET_HOWS:
            raise ValueError(f"BudgetPolicy.how must be one of {BUDGET_HOWS}, got {self.how!r}")
        lo, hi = self.reachable
        if not 0.0 < lo <= hi <= 1.0 + 1e-9:
            raise ValueError(f"BudgetPolicy.reachable must satisfy 0 < lo <= hi <= 1, got {self.reachable}")
        if self.how != "fixed" and not self.knob:
            raise ValueError(f"a {self.how!r} budget needs a knob to calibrate")

    @property
    def calibrated(self) -> bool:
        """Whether :func:`dynnet.calibrate` can move this recipe's MAC fraction."""
        return self.how in ("calibrated", "trained+calibrated")

    @property
    def trained(self) -> bool:
        """Whether a budget loss takes part in training."""
        return self.how in ("trained", "trained+calibrated")


def check_budget_in_range(recipe: str, budget: float, policy: BudgetPolicy) -> None:
    """Raise a one-line ``ValueError`` when ``budget`` lies outside the recipe's declared reachable range."""
    lo, hi = policy.reachable
    if not lo - 1e-9 <= budget <= hi + 1e-9:
        raise ValueError(
            f"recipe {recipe!r} reaches MAC fractions in [{lo:.2f}, {hi:.2f}] ({policy.how}); "
            f"budget {budget} is outside: choose a budget in that range"
        )


@dataclass
class Knob:
    """A scalar decision threshold that moves a model's mean MAC fraction monotonically.

    Attributes:
        name: what it is (``"gate logit offset"``, ``"exit threshold shift"``, ``"halting threshold"``).
        get: reads the current value from the model's state.
        set: writes a value into the model's state (buffers or parameters: it round-trips through ``state_dict``).
        lo: smallest value searched.
        hi: largest value searched.
        increasing: the MAC fraction grows with the value (``False``: it shrinks).
        integer: only integer values are meaningful (a number of glimpses, steps, experts).
        limit: for an unbounded knob (a logit offset), the widest ``[-limit, limit]`` the search may widen
            ``[lo, hi]`` to when the budget lies outside the fractions ``[lo, hi]`` reach (gates trained with a
            straight-through or Gumbel estimator can grow logits far beyond the usual range); ``None``: ``[lo, hi]``
            is the whole range.
    """

    name: str
    get: Callable[[], float]
    set: Callable[[float], None]
    lo: float
    hi: float
    increasing: bool = True
    integer: bool = False
    limit: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lo) and math.isfinite(self.hi) and self.lo < self.hi):
            raise ValueError(f"knob {self.name!r}: need finite lo < hi, got [{self.lo}, {self.hi}]")
        if self.limit is not None and not (math.isfinite(self.limit) and self.limit >= max(-self.lo, self.hi)):
            raise ValueError(f"knob {self.name!r}: limit must be finite and cover [lo, hi], got {self.limit}")


# How far a logit-offset search may widen its range: ConvNet-AIG's Gumbel gates grew logits above 27 in a 2-epoch
# fine-tune with budget tracking, out of reach of the usual ±30 (2026-12-07); a logit of 1e3 is saturated in float32.
LOGIT_SHIFT_LIMIT = 1e3


class LogitShift:
    """Shift the decision logits of a set of gates by one value, by editing their final biases in place.

    The biases are what the gates' inference paths (compiled kernels and folded caches included) already read, so a
    shift needs no change to any decision path; the applied value is kept in a 0-d buffer of the model so that it
    round-trips with the biases through ``state_dict``.

    Args:
        value: the model's 0-d buffer that holds the applied shift.
        entries: ``(bias, index, sign)``: ``bias[index] += sign * delta`` (``index=None``: every element).
            For an off/on softmax gate pass the open logit with ``+1`` (or the off logit with ``-1``).
    """

    def __init__(self, value: Tensor, entries: Sequence[tuple[Tensor, int | None, float]]) -> None:
        if not entries:
            raise ValueError("LogitShift needs at least one gate bias")
        self.value = value
        self.entries = list(entries)

    def get(self) -> float:
        return float(self.value)

    def set(self, v: float) -> None:
        delta = float(v) - float(self.value)
        if delta == 0.0:
            return
        with torch.no_grad():
            for bias, index, sign in self.entries:
                if index is None:
                    bias.add_(sign * delta)
                else:
                    bias[index] += sign * delta
            self.value.fill_(float(v))

    def knob(self, *, lo: float = -30.0, hi: float = 30.0, name: str = "gate logit offset") -> Knob:
        """The :class:`Knob` of this shift (MACs grow with the shift of the open logit); the search may widen
        ``[lo, hi]`` up to ±``LOGIT_SHIFT_LIMIT`` where the gates' logits outgrew it."""
        return Knob(name, self.get, self.set, lo, hi, increasing=True, limit=max(LOGIT_SHIFT_LIMIT, -lo, hi))


def mean_mac_fraction(model: torch.nn.Module, batches: Sequence[Tensor]) -> float:
    """Mean theoretical MAC fraction (``Trace.macs() / Trace.dense_macs()``) of ``model`` over ``batches``, as the
    model runs now (call it in eval mode, sparse, for what inference really decides)."""
    from dynnet.core.trace import trace

    total, count, dense = 0.0, 0, None
    with torch.no_grad():
        for x in batches:
            with trace() as t:
                model(x)
            total += float(t.macs().sum())
            count += x.shape[0]
            dense = t.dense_macs()
    if not count or not dense:
        raise ValueError("calibration needs at least one image")
    return total / count / dense


def search_knob(
    model: torch.nn.Module,
    knob: Knob,
    batches: Sequence[Tensor],
    budget: float,
    tolerance: float,
    *,
    iters: int = 40,
    measure: Callable[[torch.nn.Module, Sequence[Tensor]], float] | None = None,
    unit: str = "MAC fractions",
) -> tuple[float, float, int]:
    """Set ``knob`` so that the mean MAC fraction of ``model`` on ``batches`` equals ``budget`` (bisection).

    The fraction is a monotone step function of the knob; the search stops within ``tolerance / 2`` of the budget,
    or when the interval is exhausted (the closest value found is kept).

    Args:
        measure: what is brought to ``budget`` instead of the MAC fraction (a measured latency), a function of the
            model and the batches that grows with the MAC fraction; ``unit`` names it in errors.

    Returns:
        ``(value, measured, evaluations)``.

    Raises:
        ValueError: the budget lies outside the range of fractions the knob reaches on these batches (one line,
            naming the range).
    """
    measure = mean_mac_fraction if measure is None else measure

    def at(v: float) -> float:
        knob.set(round(v) if knob.integer else v)
        return measure(model, batches)

    start = knob.get()
    lo, hi = knob.lo, knob.hi
    f_lo, f_hi = at(lo), at(hi)
    evaluations = 2
    reach = (min(f_lo, f_hi), max(f_lo, f_hi))
    if knob.limit is not None:  # widen an unbounded knob geometrically until the budget is bracketed
        f_min, f_max = (f_lo, f_hi) if knob.increasing else (f_hi, f_lo)
        while budget < f_min - tolerance or budget > f_max + tolerance:
            low_side = (budget < f_min) == knob.increasing  # the budget lies beyond the lower end of the knob
            if (low_side and lo <= -knob.limit) or (not low_side and hi >= knob.limit):
                break
            if low_side:
                hi, f_hi = lo, f_lo  # the old end becomes the other end of the bracket
                lo = max(-knob.limit, 2 * lo if lo < 0 else -abs(hi - lo))
                f_lo = at(lo)
            else:
                lo, f_lo = hi, f_hi
                hi = min(knob.limit, 2 * hi if hi > 0 else abs(hi - lo))
                f_hi = at(hi)
            evaluations += 1
            reach = (min(reach[0], f_lo, f_hi), max(reach[1], f_lo, f_hi))
            f_min, f_max = (f_lo, f_hi) if knob.increasing else (f_hi, f_lo)
    low, high = (lo, hi) if knob.increasing else (hi, lo)
    f_low, f_high = (f_lo, f_hi) if knob.increasing else (f_hi, f_lo)
    if not f_low - tolerance <= budget <= f_high + tolerance:
        knob.set(start)
        recipe = getattr(model, "recipe", type(model).__name__)
        raise ValueError(
            f"budget {budget:.3f} is outside the {unit} [{reach[0]:.3f}, {reach[1]:.3f}] that {recipe}'s "
            f"{knob.name} reaches on these images: choose a budget in that range"
        )
    best = min(((low, f_low), (high, f_high)), key=lambda p: abs(p[1] - budget))
    for _ in range(iters):
        if abs(best[1] - budget) <= tolerance / 2:
            break
        mid = 0.5 * (low + high)
        if knob.integer:
            mid = float(round(mid))
            if mid in (round(low), round(high)):
                break
        f_mid = at(mid)
        evaluations += 1
        if abs(f_mid - budget) < abs(best[1] - budget):
            best = (mid, f_mid)
        if f_mid < budget:
            low = mid
        else:
            high = mid
    knob.set(best[0])
    return float(best[0]), float(best[1]), evaluations
