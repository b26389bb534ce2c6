"""`calibrate`: set a converted model's decision thresholds so that it spends the budget it was asked for.

A budget is the target mean fraction of the dense base network's MACs per image (gates and policy networks
included). Training with a budget loss lands near it, not on it; calibration moves the recipe's declared knob — a
gate logit offset, exit thresholds, a mask threshold, a halting threshold, ``k``, a capacity — on held-out images
until the mean theoretical MAC fraction, measured in sparse mode, equals the budget within a tolerance. The knob's
value is model state: it round-trips through ``state_dict``, checkpoints and export.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dynnet.core import RECIPES, DynamicModel, dynamic_blocks, set_mode, trace
from dynnet.core.budget import check_budget_in_range, mean_mac_fraction
from dynnet.core.trace import _check_budget

__all__ = ["CalibrationReport", "calibrate", "collect_batches"]


@dataclass(frozen=True)
class CalibrationReport:
    """What :func:`calibrate` did.

    Attributes:
        budget: the target mean MAC fraction.
        mac_fraction: the mean theoretical MAC fraction on the calibration images after calibration (sparse mode).
        before: the same fraction before calibration.
        thresholds: the values the recipe's knob(s) got, by name.
        images: how many images calibration used.
        tolerance: the tolerance asked for.
        accuracy: accuracy on the calibration images after calibration (``None`` without labels).
    """

    budget: float
    mac_fraction: float
    before: float
    thresholds: dict[str, float] = field(default_factory=dict)
    images: int = 0
    tolerance: float = 0.01
    accuracy: float | None = None

    @property
    def within_tolerance(self) -> bool:
        """Whether the achieved fraction is within ``tolerance`` of the budget."""
        return abs(self.mac_fraction - self.budget) <= self.tolerance + 1e-12

    def summary(self) -> str:
        """One line: ``budget 0.50 → achieved 0.50 (gate logit offset = -0.41, 2,048 images)``."""
        knobs = ", ".join(f"{k} = {v:.4g}" for k, v in self.thresholds.items())
        acc = "" if self.accuracy is None else f", accuracy {100 * self.accuracy:.2f} %"
        return (
            f"budget {self.budget:.2f} → achieved {self.mac_fraction:.3f} (was {self.before:.3f}; {knobs}; "
            f"{self.images:,} images{acc})"
        )


def collect_batches(
    data: Tensor | Iterable[Any], *, max_images: int | None = None, batch_size: int = 256
) -> tuple[list[Tensor], list[Tensor] | None]:
    """Normalise calibration data into batches of images (and labels when there are any).

    Args:
        data: a Tensor[N, C, H, W], a DataLoader of ``(x, y)`` or an iterable of batches (tensors or ``(x, y)``).
        max_images: stop after this many images (``None``: all).
        batch_size: the batch size a tensor is split into.

    Returns:
        ``(images, labels)``: lists of Tensor[B, C, H, W] and Tensor[B] (``labels`` is ``None`` when ``data`` has
        none).

    Raises:
        TypeError: ``data`` is none of these. ValueError: it holds no image.
    """
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    labelled = True
    got = 0
    if isinstance(data, Tensor):
        items: Iterable[Any] = data.split(batch_size)
        labelled = False
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        items = data
    else:
        raise TypeError(
            f"calibration data must be a Tensor[N, C, H, W], a DataLoader of (x, y) or an iterable of batches, "
            f"got {type(data).__name__}"
        )
    for item in items:
        if isinstance(item, Tensor):
            x, y = item, None
        elif isinstance(item, (tuple, list)) and item and isinstance(item[0], Tensor):
            x, y = item[0], item[1] if len(item) > 1 and isinstance(item[1], Tensor) else None
        else:
            raise TypeError(f"calibration batches must be tensors or (x, y) pairs, got {type(item).__name__}")
        if x.dim() != 4:
            raise ValueError(f"calibration images must be Tensor[N, C, H, W], got shape {tuple(x.shape)}")
        if max_images is not None and got + x.shape[0] > max_images:
            x = x[: max_images - got]
            y = None if y is None else y[: x.shape[0]]
        if x.shape[0] == 0:
            break
        xs.append(x)
        if y is None:
            labelled = False
        else:
            ys.append(y)
        got += x.shape[0]
        if max_images is not None and got >= max_images:
            break
    if not xs:
        raise ValueError("calibration data holds no image")
    return xs, (ys if labelled and len(ys) == len(xs) else None)


def calibrate(
    model: nn.Module,
    data: Tensor | Iterable[Any],
    budget: float | None = None,
    *,
    tolerance: float = 0.01,
    max_images: int | None = 4096,
    batch_size: int = 256,
) -> CalibrationReport:
    """Move ``model``'s decision thresholds so that its mean MAC fraction on ``data`` equals ``budget``.

    The model runs in eval and sparse mode (what inference really decides); its modes and training flag are
    restored afterwards. Which thresholds move is the recipe's declaration (``RecipeSpec.budget.knob``).

    Args:
        model: a converted model (:class:`~dynnet.DynamicModel`).
        data: held-out images: a Tensor[N, C, H, W], a DataLoader of ``(x, y)`` or an iterable of batches.
        budget: target mean fraction of the dense MACs per image; default: the model's configured budget.
        tolerance: how close the fraction on ``data`` must come to ``budget``.
        max_images: use at most this many images of ``data`` (``None``: all).
        batch_size: batch size when ``data`` is one tensor.

    Returns:
        :class:`CalibrationReport` (``mac_fraction``, ``budget``, ``thresholds``, ``accuracy`` with labels).

    Raises:
        TypeError: ``model`` is not a converted model, or ``data`` has the wrong type.
        ValueError: the budget is not a fraction in (0, 1], the recipe cannot be calibrated, or the budget lies
            outside the range of MAC fractions the recipe reaches on ``data`` (the message names the range).
    """
    if not isinstance(model, DynamicModel):
        raise TypeError(f"calibrate needs a converted model (dynnet.convert), got {type(model).__name__}")
    budget = model.budget if budget is None else budget
    if budget is None:
        raise ValueError(f"recipe {model.recipe!r} has no budget: pass budget=")
    _check_budget(budget)
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance!r}")
    if model.recipe in RECIPES:
        policy = RECIPES.get(model.recipe).budget
        if not policy.calibrated:
            raise ValueError(
                f"recipe {model.recipe!r} cannot be calibrated: its budget is {policy.how} "
                f"(reachable {policy.reachable[0]:.2f}-{policy.reachable[1]:.2f}); convert again with budget={budget}"
            )
        check_budget_in_range(model.recipe, float(budget), policy)
    xs, ys = collect_batches(data, max_images=max_images, batch_size=batch_size)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    xs = [x.to(device) for x in xs]
    was_training = model.training
    modes = {name: block.mode for name, block in dynamic_blocks(model)}
    try:
        set_mode(model.eval(), "sparse")
        before = mean_mac_fraction(model, xs)
        thresholds = model.calibrate_to_(xs, float(budget), float(tolerance))
        with torch.no_grad():
            model.calibration[1] = float(budget)
        achieved, correct = _measure(model, xs, ys)
    finally:
        for name, block in dynamic_blocks(model):
            block.mode = modes.get(name, block.mode)
        model.train(was_training)
    images = sum(x.shape[0] for x in xs)
    return CalibrationReport(
        budget=float(budget), mac_fraction=achieved, before=before, thresholds=dict(thresholds), images=images,
        tolerance=float(tolerance), accuracy=None if correct is None else correct / images,
    )  # fmt: skip


def _measure(model: nn.Module, xs: list[Tensor], ys: list[Tensor] | None) -> tuple[float, int | None]:
    """Mean MAC fraction on ``xs`` and, with labels, the number of correct predictions."""
    total, count, dense, correct = 0.0, 0, 1.0, 0
    with torch.no_grad():
        for i, x in enumerate(xs):
            with trace() as t:
                logits = model(x)
            total += float(t.macs().sum())
            count += x.shape[0]
            dense = t.dense_macs()
            if ys is not None:
                correct += int((logits.argmax(1) == ys[i].to(logits.device)).sum())
    return total / count / dense, None if ys is None else correct
