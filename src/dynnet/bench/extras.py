"""Measurements a benchmark profile adds to its recipe jobs (:attr:`BenchProfile.extras`), beside the ones every job
makes and the recipe's own (``RecipeSpec.bench_metrics``).

Each extra is ``fn(context) -> dict`` (JSON-ready) registered by name in :data:`EXTRAS`; the job runner calls it
after the timing and stores the result in the row's ``extras[name]``. Built in:

* ``scrambled_timing`` — the realized speedup of the sparse engine at mixed decisions, whatever training did: a copy
  of the model with random gates (:func:`dynnet.testing.scramble_gates`) timed like the model itself (the layer-skip
  and ConvNet-AIG profiles; training that leaves the gates open says nothing about the engine);
* ``engine_ratio`` — the channel family's engine against itself: the job's base network run by the channel kernels
  with every channel kept (``dynamic_channel_exec`` at budget 1), timed in the same window; the realized ratio against
  it separates how well the engine turns fewer channels into less time from how fast it is against PyTorch's own
  convolutions;
* ``latency_model``, ``latency_budget`` — the latency model of this machine, its prediction error, calibration to
  measured milliseconds, and MAC- vs latency-budget training (:mod:`dynnet.bench.latency_extras`);
* ``operator_profile`` — where the time goes: the operators with the most self CPU time (``torch.profiler``) in dense
  and in sparse mode at each of the profile's batch sizes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from dynnet.bench.latency_extras import latency_budget, latency_model

if TYPE_CHECKING:
    from dynnet.bench.plan import BenchProfile, Job

__all__ = ["EXTRAS", "ExtraContext", "register_extra"]


@dataclass(frozen=True)
class ExtraContext:
    """What an extra measurement sees of its job.

    Attributes:
        job: the job.
        profile: the profile (timing settings: ``batch_sizes``, ``threads``, ``min_run_time``, ``batch1_samples``).
        model: the trained (or calibrated) model, eval mode, sparse execution.
        base: the registered name of the network the recipe converted (``cifar_resnet20``...).
        width: its width multiplier.
        info: the dataset's info (``in_channels``, ``num_classes``...).
        images: Tensor[M, C, H, W] real test images for timing, on the model's device.
        timing: the job's own timing (:func:`dynnet.bench.harness.profile_model`'s row).
        data: the job's loaders (:class:`dynnet.bench.jobs.JobData`; ``None`` outside a suite job).
    """

    job: Job
    profile: BenchProfile
    model: nn.Module
    base: str
    width: float
    info: Any
    images: Tensor
    timing: dict[str, Any]
    data: Any = None


EXTRAS: dict[str, Callable[[ExtraContext], dict[str, Any]]] = {}
"""Extra measurements by name (:attr:`BenchProfile.extras` names them)."""


def register_extra(name: str) -> Callable[[Callable[[ExtraContext], dict[str, Any]]], Callable]:
    """Register ``fn(context) -> dict`` as the extra ``name``; raises on a duplicate name."""

    def register(fn: Callable[[ExtraContext], dict[str, Any]]) -> Callable[[ExtraContext], dict[str, Any]]:
        if name in EXTRAS:
            raise ValueError(f"extra {name!r} is already registered")
        EXTRAS[name] = fn
        return fn

    return register


def _time(ctx: ExtraContext, model: nn.Module) -> dict[str, Any]:
    from dynnet.bench.harness import profile_model

    p = ctx.profile
    return profile_model(
        model, ctx.images, batch_sizes=p.batch_sizes, threads=p.threads, min_run_time=p.min_run_time,
        batch1_samples=p.batch1_samples, rounds=p.timing_rounds,
    )  # fmt: skip


_TIMING_FIELDS = ("dense_ms", "sparse_ms", "mac_fraction", "mac_speedup", "latency_speedup", "realized_ratio")


@register_extra("scrambled_timing")
def scrambled_timing(ctx: ExtraContext, *, seed: int = 3) -> dict[str, Any]:
    """Dense vs sparse timing of a copy of the model whose gates are random (``scramble_gates(seed=3)``).

    Returns:
        ``{"changed": parameters scrambled, "b{B}_dense_ms", "b{B}_sparse_ms", "b{B}_mac_fraction",
        "b{B}_mac_speedup", "b{B}_latency_speedup", "b{B}_realized_ratio"}`` (``{"changed": 0}`` for a model with
        nothing to scramble).
    """
    from dynnet.testing import scramble_gates

    scrambled = copy.deepcopy(ctx.model)
    changed = scramble_gates(scrambled, seed=seed)
    if not changed:
        return {"changed": 0}
    row = _time(ctx, scrambled)
    return {
        "changed": changed,
        **{f"b{b}_{k}": row[f"b{b}_{k}"] for b in ctx.profile.batch_sizes for k in _TIMING_FIELDS},
    }


@register_extra("engine_ratio")
def engine_ratio(ctx: ExtraContext) -> dict[str, Any]:
    """The job's sparse latency against the channel engine running the same base with every channel kept.

    Returns:
        ``{"b{B}_engine_dense_ms": the engine's latency, "b{B}_engine_ratio": (engine ms / sparse ms) ÷ MAC speedup}``
        per batch size of the job's timing.
    """
    from dynnet.bench.latency import realized_speedup
    from dynnet.train import build_model

    engine = build_model(
        ctx.base, "dynamic_channel_exec", budget=1.0, in_channels=ctx.info.in_channels,
        num_classes=ctx.info.num_classes, width=ctx.width,
    ).to(ctx.images.device)  # fmt: skip
    row = _time(ctx, engine.eval())
    out: dict[str, Any] = {}
    for b in ctx.profile.batch_sizes:
        engine_ms, own = row[f"b{b}_sparse_ms"], ctx.timing
        out[f"b{b}_engine_dense_ms"] = engine_ms
        out[f"b{b}_engine_ratio"] = realized_speedup(
            engine_ms, own[f"b{b}_sparse_ms"], own["dense_macs"], own[f"b{b}_mean_macs"]
        )
    return out


@register_extra("operator_profile")
def operator_profile(ctx: ExtraContext, *, top: int = 10) -> dict[str, Any]:
    """The ``top`` operators by self CPU time in dense and sparse mode at each batch size (batch 1: up to
    ``batch1_samples`` images one by one; otherwise one batch), after three warm-up calls.

    Returns:
        ``{"b{B}_{mode}": [{"op", "self_cpu_ms", "calls"}, ...]}``.
    """
    from torch.profiler import ProfilerActivity, profile

    from dynnet.core import kept_modes, set_mode

    model, images = ctx.model, ctx.images
    out: dict[str, Any] = {}
    with kept_modes(model):
        for b in ctx.profile.batch_sizes:
            xs = list(images[: ctx.profile.batch1_samples].split(1)) if b == 1 else [images[:b]]
            for mode in ("dense", "sparse"):
                set_mode(model, mode)
                with torch.inference_mode():
                    for x in xs[:3]:
                        model(x)
                    with profile(activities=[ProfilerActivity.CPU]) as prof:
                        for x in xs:
                            model(x)
                events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
                out[f"b{b}_{mode}"] = [
                    {"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3), "calls": e.count}
                    for e in events
                ]
    return out


register_extra("latency_model")(latency_model)
register_extra("latency_budget")(latency_budget)
