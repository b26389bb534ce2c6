"""`calibrate`: set a converted model's decision thresholds so that it spends the budget it was asked for.

A budget is the target mean fraction of the dense base network's MACs per image (gates and policy networks
included). Training with a budget loss lands near it, not on it; calibration moves the recipe's declared knob — a
gate logit offset, exit thresholds, a mask threshold, a halting threshold, ``k``, a capacity — on held-out images
until the mean theoretical MAC fraction, measured in sparse mode, equals the budget within a tolerance. The knob's
value is model state: it round-trips through ``state_dict``, checkpoints and export.

With ``budget_ms`` the same knob is moved until the *measured* mean latency per image (sparse mode, on this machine,
at the serving batch size) is within ``latency_tolerance`` (3 %) of the target: the clock, not a prediction, decides.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dynnet.core import RECIPES, DynamicModel, kept_modes, set_mode, trace
from dynnet.core.budget import Knob, check_budget_in_range, mean_mac_fraction, search_knob
from dynnet.core.trace import _check_budget

__all__ = [
    "CalibrationReport",
    "average_batch_norm_statistics",
    "calibrate",
    "collect_batches",
    "measured_latency",
    "reestimate_batch_norm",
]

Timer = Callable[[nn.Module, Sequence[Tensor]], float]
"""``timer(model, batches) -> ms``: the mean latency per image of ``model`` over ``batches``, as it runs now."""


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
        budget_ms: the latency target (``calibrate(..., budget_ms=...)``; ``None``: a MAC budget). ``budget`` is
            then the MAC fraction calibration arrived at.
        latency_ms: the measured mean latency per image after calibration (with ``budget_ms``).
        latency_before_ms: the same before calibration.
        latency_tolerance: the relative tolerance of the latency asked for.
        batch_norms: how many batch norms of the base network had their statistics re-estimated under the new
            decisions (``calibrate(..., bn_data=...)``; 0: none).
    """

    budget: float
    mac_fraction: float
    before: float
    thresholds: dict[str, float] = field(default_factory=dict)
    images: int = 0
    tolerance: float = 0.01
    accuracy: float | None = None
    budget_ms: float | None = None
    latency_ms: float | None = None
    latency_before_ms: float | None = None
    latency_tolerance: float = 0.03
    batch_norms: int = 0

    @property
    def within_tolerance(self) -> bool:
        """Whether the MAC fraction (with ``budget_ms``: the measured latency) is within tolerance of the target."""
        if self.budget_ms is not None and self.latency_ms is not None:
            return abs(self.latency_ms - self.budget_ms) <= self.latency_tolerance * self.budget_ms + 1e-12
        return abs(self.mac_fraction - self.budget) <= self.tolerance + 1e-12

    def summary(self) -> str:
        """One line: ``budget 0.50 → achieved 0.50 (gate logit offset = -0.41, 2,048 images)``."""
        knobs = ", ".join(f"{k} = {v:.4g}" for k, v in self.thresholds.items())
        acc = "" if self.accuracy is None else f", accuracy {100 * self.accuracy:.2f} %"
        if self.budget_ms is not None:
            return (
                f"budget {self.budget_ms:.3g} ms → measured {self.latency_ms:.3g} ms "
                f"(was {self.latency_before_ms:.3g}; MAC fraction {self.mac_fraction:.3f}; {knobs}; "
                f"{self.images:,} images{acc})"
            )
        norms = f"; {self.batch_norms} batch norms re-estimated" if self.batch_norms else ""
        return (
            f"budget {self.budget:.2f} → achieved {self.mac_fraction:.3f} (was {self.before:.3f}; {knobs}; "
            f"{self.images:,} images{norms}{acc})"
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
    budget_ms: float | None = None,
    latency_tolerance: float = 0.03,
    latency_batch_size: int | None = None,
    timer: Timer | None = None,
    bn_data: Tensor | Iterable[Any] | None = None,
    bn_images: int = 2048,
) -> CalibrationReport:
    """Move ``model``'s decision thresholds so that its mean MAC fraction on ``data`` equals ``budget``.

    The model runs in eval and sparse mode (what inference really decides); its modes and training flag are
    restored afterwards. Which thresholds move is the recipe's declaration (``RecipeSpec.budget.knob``).

    A model trained at one budget and calibrated to another computes other units than it was trained with, and
    the running statistics of the base network's batch norms no longer match what reaches them (a model trained
    at 0.5 and moved to 0.75 can collapse). With ``bn_data`` (training images) the statistics are re-estimated under
    the calibrated decisions (:func:`reestimate_batch_norm`) and the thresholds calibrated again, since the
    decisions read the features the statistics normalise.

    Args:
        model: a converted model (:class:`~dynnet.DynamicModel`).
        data: held-out images: a Tensor[N, C, H, W], a DataLoader of ``(x, y)`` or an iterable of batches.
        budget: target mean fraction of the dense MACs per image; default: the model's configured budget.
        tolerance: how close the fraction on ``data`` must come to ``budget``.
        max_images: use at most this many images of ``data`` (``None``: all).
        batch_size: batch size when ``data`` is one tensor.
        budget_ms: a latency target instead of ``budget``: the mean measured latency per image in ms.
        latency_tolerance: how close, relatively, the measured latency must come to ``budget_ms`` (0.03: 3 %).
        latency_batch_size: the batch size latency is measured at (default: the serving batch of the model's latency
            model, else 1).
        timer: ``timer(model, batches) -> ms per image`` (default :func:`measured_latency`; tests pass a fake one).
        bn_data: images to re-estimate the batch-norm statistics on after calibrating (``None``: keep them).
        bn_images: use at most this many images of ``bn_data``.

    Returns:
        :class:`CalibrationReport` (``mac_fraction``, ``budget``, ``thresholds``, ``accuracy`` with labels).

    Raises:
        TypeError: ``model`` is not a converted model, or ``data`` has the wrong type.
        ValueError: the budget is not a fraction in (0, 1], the recipe cannot be calibrated, or the budget lies
            outside the range of MAC fractions the recipe reaches on ``data`` (the message names the range).
    """
    if not isinstance(model, DynamicModel):
        raise TypeError(f"calibrate needs a converted model (dynnet.convert), got {type(model).__name__}")
    if budget_ms is not None:
        if budget is not None:
            raise ValueError("pass a MAC budget or budget_ms, not both")
        return _calibrate_latency(
            model, data, float(budget_ms), latency_tolerance, max_images, batch_size, latency_batch_size, timer
        )
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
    xs, ys = _batches_on(model, data, max_images, batch_size)
    norms = 0
    with kept_modes(model):
        set_mode(model.eval(), "sparse")
        before = mean_mac_fraction(model, xs)
        thresholds = model.calibrate_to_(xs, float(budget), float(tolerance))
        if bn_data is not None:
            norms = reestimate_batch_norm(model, bn_data, max_images=bn_images, batch_size=batch_size)
            thresholds = model.calibrate_to_(xs, float(budget), float(tolerance))
        with torch.no_grad():
            model.calibration[1] = float(budget)
        achieved, correct = _measure(model, xs, ys)
    images = sum(x.shape[0] for x in xs)
    return CalibrationReport(
        budget=float(budget), mac_fraction=achieved, before=before, thresholds=dict(thresholds), images=images,
        tolerance=float(tolerance), accuracy=None if correct is None else correct / images, batch_norms=norms,
    )  # fmt: skip


def average_batch_norm_statistics(norms: Sequence[nn.modules.batchnorm._BatchNorm], run: Callable[[], Any]) -> None:
    """Reset the running statistics of ``norms`` and average them over what ``run()`` feeds them (cumulative average,
    no momentum, the norms alone in training mode, no gradients); their momentum and eval mode are set back after,
    also when ``run`` raises."""
    momenta = [m.momentum for m in norms]
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            run()
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
            m.eval()


def reestimate_batch_norm(
    model: DynamicModel, data: Tensor | Iterable[Any], *, max_images: int | None = 2048, batch_size: int = 256
) -> int:
    """Re-estimate the running statistics of the base network's batch norms under the model's current decisions
    (in place; returns how many).

    The statistics are reset and averaged over ``data`` (cumulative average, no momentum) with the model in masked
    eval mode — the decisions taken at inference, the features each batch norm sees when they are executed — and
    only the batch norms switched to training mode. Batch norms inside decision modules (a gate's normalisation
    of its own input) keep theirs: they set the decisions, which calibration has just tuned. The AutoSlim / slimmable
    networks remedy for a network whose executed width changed after training (Yu & Huang, 2019).

    Args:
        model: a converted model.
        data: training images (a Tensor[N, C, H, W], a DataLoader of ``(x, y)`` or an iterable of batches).
        max_images: use at most this many images (``None``: all).
        batch_size: batch size when ``data`` is one tensor.
    """
    from dynnet.core.model import _is_dynamic_param

    norms = [
        m
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and not _is_dynamic_param(name)
    ]
    if not norms:
        return 0
    xs, _ = _batches_on(model, data, max_images, batch_size)
    with kept_modes(model):
        set_mode(model.eval(), "masked")

        def run() -> None:
            for x in xs:
                model(x)

        average_batch_norm_statistics(norms, run)
    return len(norms)


def _batches_on(
    model: nn.Module, data: Tensor | Iterable[Any], max_images: int | None, batch_size: int
) -> tuple[list[Tensor], list[Tensor] | None]:
    """:func:`collect_batches` of ``data``, the images moved to ``model``'s device (labels stay where they are)."""
    xs, ys = collect_batches(data, max_images=max_images, batch_size=batch_size)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return [x.to(device) for x in xs], ys


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


def measured_latency(batch_size: int = 1, *, repeats: int = 3, clock: Callable[[], float] = time.perf_counter) -> Timer:
    """A :data:`Timer` that runs the images at ``batch_size`` under ``torch.inference_mode`` and returns the mean ms
    per image of the median of ``repeats`` passes (one untimed pass first: caches, allocator, autotuning)."""

    def timer(model: nn.Module, batches: Sequence[Tensor]) -> float:
        xs = [c for x in batches for c in x.split(batch_size)]
        images = sum(x.shape[0] for x in xs)
        passes = []
        with torch.inference_mode():
            for x in xs:
                model(x)
            for _ in range(repeats):
                start = clock()
                for x in xs:
                    model(x)
                passes.append(clock() - start)
        return 1e3 * sorted(passes)[(len(passes) - 1) // 2] / images

    return timer


def _calibrate_latency(
    model: DynamicModel,
    data: Tensor | Iterable[Any],
    budget_ms: float,
    tolerance: float,
    max_images: int | None,
    batch_size: int,
    latency_batch: int | None,
    timer: Timer | None,
) -> CalibrationReport:
    """:func:`calibrate` to a measured latency: bisect the recipe's knob on ``timer``'s milliseconds."""
    if not budget_ms > 0:
        raise ValueError(f"budget_ms must be a positive number of milliseconds, got {budget_ms!r}")
    if not 0 < tolerance < 1:
        raise ValueError(f"latency_tolerance must be in (0, 1), got {tolerance!r}")
    policy = RECIPES.get(model.recipe).budget if model.recipe in RECIPES else None
    if policy is not None and not policy.calibrated:
        raise ValueError(f"recipe {model.recipe!r} cannot be calibrated: its budget is {policy.how}")
    if latency_batch is None:
        latency_batch = model.latency_model.serve_batch if model.latency_model is not None else 1
    timer = measured_latency(latency_batch) if timer is None else timer
    xs, ys = _batches_on(model, data, max_images, batch_size)
    with kept_modes(model):
        set_mode(model.eval(), "sparse")
        before, fraction_before = timer(model, xs), mean_mac_fraction(model, xs)
        own = model.budget_knob()
        knob = own or _fraction_knob(model, xs, policy.reachable if policy else (0.05, 1.0))
        # 20 halvings of a ±30 (or wider) knob reach ~1e-4: below that the timing noise, not the knob, decides
        value, _, _ = search_knob(
            model, knob, xs, budget_ms, tolerance * budget_ms, measure=timer, unit="latencies (ms)", iters=20
        )
        achieved, correct = _measure(model, xs, ys)
        with torch.no_grad():
            if own is not None:
                model.calibration[0] = value
            model.calibration[1] = achieved
        latency = timer(model, xs)  # a fresh measurement of the final setting, not the search's
    images = sum(x.shape[0] for x in xs)
    return CalibrationReport(
        budget=achieved, mac_fraction=achieved, before=fraction_before, thresholds={knob.name: value}, images=images,
        accuracy=None if correct is None else correct / images, budget_ms=budget_ms, latency_ms=latency,
        latency_before_ms=before, latency_tolerance=tolerance,
    )  # fmt: skip


def _fraction_knob(model: DynamicModel, xs: list[Tensor], reachable: tuple[float, float]) -> Knob:
    """A knob for recipes with their own calibration (early exits' exit profile): the MAC fraction they are
    calibrated to with :meth:`DynamicModel.calibrate_to_`."""
    state = {"value": mean_mac_fraction(model, xs)}

    def set_fraction(f: float) -> None:
        try:
            model.calibrate_to_(xs, float(f), 0.01)
        except ValueError:  # beyond what these images reach (the declared range is the recipe's, not the data's)
            model.calibrate_to_(xs, float(f), 1.0)  # the wide tolerance clamps to the nearest end
        state["value"] = float(f)

    return Knob("MAC fraction", lambda: state["value"], set_fraction, reachable[0], reachable[1])
