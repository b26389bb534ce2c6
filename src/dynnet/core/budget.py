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
    """

    how: str
    knob: str = "gate logit offset"
    reachable: tuple[float, float] = (0.05, 1.0)
    derives: str = ""

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
    """

    name: str
    get: Callable[[], float]
    set: Callable[[float], None]
    lo: float
    hi: float
    increasing: bool = True
    integer: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lo) and math.isfinite(self.hi) and self.lo < self.hi):
            raise ValueError(f"knob {self.name!r}: need finite lo < hi, got [{self.lo}, {self.hi}]")


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
        """The :class:`Knob` of this shift (MACs grow with the shift of the open logit)."""
        return Knob(name, self.get, self.set, lo, hi, increasing=True)


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
    model: torch.nn.Module, knob: Knob, batches: Sequence[Tensor], budget: float, tolerance: float, *, iters: int = 40
) -> tuple[float, float, int]:
    """Set ``knob`` so that the mean MAC fraction of ``model`` on ``batches`` equals ``budget`` (bisection).

    The fraction is a monotone step function of the knob; the search stops within ``tolerance / 2`` of the budget,
    or when the interval is exhausted (the closest value found is kept).

    Returns:
        ``(value, mac_fraction, evaluations)``.

    Raises:
        ValueError: the budget lies outside the range of fractions the knob reaches on these batches (one line,
            naming the range).
    """

    def at(v: float) -> float:
        knob.set(round(v) if knob.integer else v)
        return mean_mac_fraction(model, batches)

    start = knob.get()
    f_lo, f_hi = at(knob.lo), at(knob.hi)
    evaluations = 2
    low, high = (knob.lo, knob.hi) if knob.increasing else (knob.hi, knob.lo)
    f_low, f_high = (f_lo, f_hi) if knob.increasing else (f_hi, f_lo)
    if not f_low - tolerance <= budget <= f_high + tolerance:
        knob.set(start)
        recipe = getattr(model, "recipe", type(model).__name__)
        raise ValueError(
            f"budget {budget:.3f} is outside the MAC fractions [{f_low:.3f}, {f_high:.3f}] that {recipe}'s "
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
