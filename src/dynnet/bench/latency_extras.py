"""The latency-budget measurements of a recipe job (extras ``latency_model`` and ``latency_budget``; the ``latency``
profiles run them): the evidence for latency as a budget (``docs/latency.md``).

* ``latency_model`` — :func:`dynnet.profile_latency` on the job's model (its per-block latency table on this machine)
  and its held-out prediction error; dense and sparse latency measured on labelled test images;
  ``calibrate(budget_ms=t)`` to each target ``t`` of :data:`TARGETS` (fractions of the model's measured sparse
  latency as trained) with a second, independent measurement of the result; and each block's kept fraction beside
  its measured cost per dense MAC (where the policy spends its work);
* ``latency_budget`` — the same, and a comparison of training with a MAC budget and with a latency budget of the same
  target: two copies of the job's model fine-tuned :data:`FINE_TUNE_STEPS` steps on the job's training data, one with
  ``budget=profile budget`` and one with ``budget_ms = budget × dense predicted ms``, each tested and calibrated to
  the same measured latencies (accuracy vs measured latency), with its blocks' kept fractions (does the
  latency-trained policy keep the blocks where work is cheap?).

The registry entries are made in :mod:`dynnet.bench.extras` (this module does not import it: no cycle).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from dynnet.bench.extras import ExtraContext
    from dynnet.core.latency import LatencyModel

__all__ = ["FINE_TUNE_STEPS", "IMAGES", "LATENCY_EXTRAS", "TARGETS", "latency_budget", "latency_extra", "latency_model"]

LATENCY_EXTRAS = ("latency_budget", "latency_model")
"""The names these measurements are registered under (:data:`dynnet.bench.extras.EXTRAS`)."""

IMAGES = 256
"""Labelled test images used for profiling, calibration and timing (at most; the profile's test subset bounds it)."""

TARGETS = (0.8, 0.9, 1.1)
"""Latency targets of the calibration, as fractions of the model's measured sparse latency as trained."""

_SAMPLES = 64  # images per operating point while profiling
_REPEATS = 3
_LR = 0.01  # fine-tuning a trained policy: a tenth of the standard profile's peak rate
FINE_TUNE_STEPS = 100
"""Optimiser steps of each of :func:`latency_budget`'s two fine-tunes (MAC budget, latency budget): at most one
epoch of the job's training data."""


def _labelled(ctx: ExtraContext, n: int = IMAGES) -> tuple[Tensor, Tensor]:
    """The first ``n`` test images of the job with their labels (Tensor[n, C, H, W], Tensor[n]), on the model's
    device (fewer when the job's test set is smaller)."""
    device = ctx.images.device
    if ctx.data is None:
        raise ValueError("the latency extras need the job's test loader (ExtraContext.data)")
    xs, ys, got = [], [], 0
    for x, y in ctx.data.test:
        xs.append(x)
        ys.append(y)
        got += x.shape[0]
        if got >= n:
            break
    return torch.cat(xs)[:n].to(device), torch.cat(ys)[:n].to(device)


def _block_costs(model: torch.nn.Module, lm: LatencyModel, images: Tensor) -> list[dict[str, Any]]:
    """Each block's kept fraction (sparse, on ``images``) and measured cost: ms of its full work per dense MAC."""
    import dynnet
    from dynnet.core.latency import REST, part_fractions

    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as t:
        model(images)
    parts = lm.parts[lm.serve_batch]
    fractions = part_fractions(t, {n: p.entries for n, p in parts.items()})
    entries = {e.name: e for e in t.entries}
    rows = []
    for name, p in parts.items():
        if name == REST:
            continue
        peak = sum(entries[e].maximum for e in p.entries if e in entries)
        full = float(p.table(torch.tensor([1.0])).item() - p.table(torch.tensor([0.0])).item())
        rows.append({
            "block": name, "kept": round(float(fractions[name].mean()), 4), "ms_full": round(full, 4),
            "ns_per_mac": round(1e6 * full / peak, 4) if peak else None,
        })  # fmt: skip
    return rows


def _calibrations(
    model: torch.nn.Module, images: Tensor, labels: Tensor, targets_ms: list[float], timer: Any
) -> list[dict[str, Any]]:
    """``calibrate(budget_ms=t)`` for each target (from the same starting weights), with a second measurement."""
    import dynnet

    rows = []
    state = copy.deepcopy(model.state_dict())
    data = list(zip(images.split(64), labels.split(64), strict=True))
    for target in targets_ms:
        model.load_state_dict(state)
        try:
            r = dynnet.calibrate(model, data, budget_ms=target, timer=timer)
        except ValueError as err:
            rows.append({"target_ms": target, "error": str(err).splitlines()[0]})
            continue
        check = timer(model.eval(), list(images.split(64)))  # a second, independent measurement
        rows.append({
            "target_ms": target, "measured_ms": r.latency_ms, "recheck_ms": check,
            "rel_error": abs(r.latency_ms - target) / target, "recheck_rel_error": abs(check - target) / target,
            "within_3pct": r.within_tolerance, "mac_fraction": r.mac_fraction, "accuracy": r.accuracy,
        })  # fmt: skip
    model.load_state_dict(state)
    return rows


def _measure(ctx: ExtraContext) -> tuple[dict[str, Any], LatencyModel, Any, Tensor, Tensor]:
    import dynnet
    from dynnet.calibration import measured_latency
    from dynnet.core import kept_modes

    model, p = ctx.model, ctx.profile
    images, labels = _labelled(ctx)
    batch = p.batch_sizes[0] if p.batch_sizes else 1
    timer = measured_latency(batch, repeats=_REPEATS)
    lm = dynnet.profile_latency(
        model, tuple(images.shape[1:]), (batch,), p.threads, images=images, samples=_SAMPLES, repeats=_REPEATS
    )
    with kept_modes(model):
        dynnet.set_mode(model.eval(), "dense")
        dense_ms = timer(model, list(images.split(64)))
        dynnet.sparse(model)
        sparse_ms = timer(model, list(images.split(64)))
        out = {
            "batch": batch, "images": images.shape[0], "dense_measured_ms": dense_ms,
            "dense_predicted_ms": lm.dense_ms(), "sparse_measured_ms": sparse_ms,
            "prediction_error": {str(b): e for b, e in lm.error.items()},
            "calibration": _calibrations(model, images, labels, [f * sparse_ms for f in TARGETS], timer),
            "blocks": _block_costs(model, lm, images),
        }  # fmt: skip
    return out, lm, timer, images, labels


def latency_model(ctx: ExtraContext) -> dict[str, Any]:
    """The latency model of the job's model, its prediction error and calibrations to measured latency targets.

    Returns:
        ``{"batch", "images", "dense_measured_ms", "dense_predicted_ms", "sparse_measured_ms", "prediction_error":
        {batch: {"median", "p90", ...}}, "calibration": [{"target_ms", "measured_ms", "recheck_ms", "rel_error",
        "recheck_rel_error", "within_3pct", "mac_fraction", "accuracy"}], "blocks": [{"block", "kept", "ms_full",
        "ns_per_mac"}]}``.
    """
    return _measure(ctx)[0]


def latency_budget(ctx: ExtraContext) -> dict[str, Any]:
    """:func:`latency_model`, and a MAC-budget vs latency-budget fine-tune of the job's model
    (:data:`FINE_TUNE_STEPS` steps each).

    Returns:
        :func:`latency_model`'s dict with ``"training": {"mac" | "latency": {"accuracy", "mac_fraction", "blocks",
        "curve": calibrations to the same targets}}``.
    """
    from dynnet.train import TrainConfig, evaluate, fit

    if ctx.data is None or ctx.job.budget is None:
        raise ValueError("latency_budget fine-tunes the job's model: it needs the job's loaders and budget")
    out, lm, timer, images, labels = _measure(ctx)
    budget, sparse_ms = float(ctx.job.budget), out["sparse_measured_ms"]
    training: dict[str, Any] = {}
    for kind in ("mac", "latency"):
        m = copy.deepcopy(ctx.model)
        config = TrainConfig(
            epochs=1, max_steps=FINE_TUNE_STEPS, lr=_LR, seed=ctx.job.seed, budget=budget if kind == "mac" else None,
            calibrate=False, progress=False, device=str(images.device),
        )  # fmt: skip
        kw = {"budget_ms": budget * lm.dense_ms(), "latency_model": lm} if kind == "latency" else {}
        fit(m, ctx.data.train, config, **kw)
        test = evaluate(m, ctx.data.test, mode="sparse")
        training[kind] = {
            "accuracy": test.accuracy, "mac_fraction": test.mac_fraction, "blocks": _block_costs(m, lm, images),
            "curve": _calibrations(m, images, labels, [f * sparse_ms for f in TARGETS], timer),
        }  # fmt: skip
    out["training"] = training
    return out


def latency_extra(row: dict[str, Any]) -> dict[str, Any] | None:
    """A suite row's latency measurement (either of :data:`LATENCY_EXTRAS`), or ``None``."""
    extras = row.get("extras") or {}
    return next((extras[k] for k in LATENCY_EXTRAS if isinstance(extras.get(k), dict)), None)
