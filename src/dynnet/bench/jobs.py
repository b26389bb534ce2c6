"""One job of the benchmark suite: its data (:func:`load_data`), its model (:func:`build_job_model`), and
:func:`run_job`, which trains (or loads and calibrates), tests in sparse mode and times it into one result row."""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from dynnet.bench.plan import BenchProfile, Job

__all__ = [
    "MAC_HIST_EDGES", "JobData", "build_job_model", "example_payload", "load_data", "pad_images", "record_examples",
    "run_job",
]  # fmt: skip

MAC_HIST_EDGES = tuple(round(0.05 * i, 2) for i in range(31))
"""Bin edges of the stored per-sample MAC histograms, in fractions of the static base network's MACs (0 .. 1.5)."""


@dataclass
class JobData:
    """Loaders of one dataset, the fixed test subset and the example images (built once per dataset and seed)."""

    train: DataLoader
    val: DataLoader | None
    test: DataLoader
    info: Any
    images: Tensor  # Tensor[M, C, H, W] real test images for the latency
    example_images: Tensor  # Tensor[E, C, H, W]
    example_targets: Tensor  # Tensor[E]
    example_indices: list[int] = field(default_factory=list)


def load_data(profile: BenchProfile, dataset: str, seed: int) -> JobData:
    from dynnet.data import build_loaders

    kwargs = dict(profile.dataset_kwargs) if dataset == profile.dataset else {}
    loaders = build_loaders(
        dataset, batch_size=profile.batch_size, val_fraction=profile.val_fraction, seed=seed, subset=profile.subset,
        **kwargs,
    )  # fmt: skip
    test_set = loaders.test.dataset
    n = len(test_set)
    # The test subset is the same for every seed: seeds vary the model and the data order, not the exam.
    order = torch.randperm(n, generator=torch.Generator().manual_seed(12345)).tolist()
    keep = order[: profile.test_subset] if profile.test_subset is not None else list(range(n))
    test_sub = Subset(test_set, keep)
    test = DataLoader(test_sub, batch_size=max(profile.batch_size, 256), shuffle=False)
    need = max((*profile.batch_sizes, profile.batch1_samples, 16))  # 16: the budget check scrambles on them
    xs, got = [], 0
    for x, _ in test:
        xs.append(x)
        got += x.shape[0]
        if got >= need:
            break
    images = torch.cat(xs)[:need]
    e = min(profile.examples, len(keep))
    ex = [test_sub[i] for i in range(e)]
    ex_x = torch.stack([torch.as_tensor(x) for x, _ in ex]) if ex else images[:0]
    ex_y = torch.tensor([int(y) for _, y in ex], dtype=torch.long)
    return JobData(loaders.train, loaders.val, test, loaders.info, images, ex_x, ex_y, keep[:e])


def example_payload(data: JobData) -> dict[str, Any]:
    """The example images as uint8 (un-normalised) lists, with targets and class names, for the decision panel."""
    info = data.info
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    pixels = ((data.example_images * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    return {
        "dataset": info.name,
        "indices": data.example_indices,
        "targets": data.example_targets.tolist(),
        "classes": list(info.classes),
        "images": pixels.tolist(),
    }


def record_examples(model: nn.Module, images: Tensor, *, max_values: int = 1024) -> dict[str, Any]:
    """The decisions a model takes on a few images (sparse mode if dynamic), for the example panel.

    Args:
        model: a trained model (a ``DynamicModel`` or any classifier), in the mode it should be shown in.
        images: Tensor[E, C, H, W].
        max_values: decisions with more values per image are averaged over their leading (channel) dims.

    Returns:
        ``{"pred": [E], "macs": [E] or None, "decisions": [{"name", "granularity", "shape", "values": [E][...]}]}``
        where ``values[i]`` is image ``i``'s decision flattened (0/1 values or indices, rounded to 2 decimals).
    """
    from dynnet.core import trace

    model.eval()
    with torch.no_grad(), trace() as t:
        logits = model(images)
    decisions = []
    for name, d in t.decisions.items():
        hard = d.hard.detach().float().cpu()
        while hard.dim() > 2 and hard[0].numel() > max_values:
            hard = hard.mean(1)
        if hard.dim() == 2 and hard.shape[1] > max_values:
            hard = hard.mean(1)
        decisions.append({
            "name": name,
            "granularity": d.granularity,
            "shape": list(hard.shape[1:]),
            "values": [[round(float(v), 2) for v in row.flatten()] for row in hard.reshape(hard.shape[0], -1)],
        })  # fmt: skip
    return {
        "pred": logits.argmax(1).tolist(),
        "macs": t.macs().detach().tolist() if t.entries else None,
        "dense_macs": t.dense_macs() if t.entries else None,
        "decisions": decisions,
    }


def build_job_model(job: Job, profile: BenchProfile, info: Any) -> tuple[nn.Module, str, float, tuple[int, int] | None]:
    """The job's model, its base name and width, and the padded input size (``None``: the dataset's own).

    A recipe that cannot convert the profile's base (or fails on its images) falls back to its own test base at the
    profile's width, then at its default width; one that needs another image size (sides divisible by 8...) gets
    the dataset's images zero-padded (black) to its ``RecipeSpec.test_input`` size. A ``trained_like`` profile
    (a speed measurement of one deployed network) has no fallback: the recipe converts that network or the job fails
    with the conversion's reason.
    """
    from dynnet.core import RECIPES
    from dynnet.models.cifar_resnet import CifarResNet
    from dynnet.train import build_model

    common = {"in_channels": info.in_channels, "num_classes": info.num_classes}
    if job.source == "shipped":
        from dynnet.zoo import load

        assert job.key is not None
        return load(job.key), job.model, job.width, None
    if job.source == "pruned":
        from dynnet.train.init import load_init
        from dynnet.train.prune import prune_channels

        assert job.budget is not None
        base = build_model(profile.base, **common, width=profile.width)
        load_init(base, profile.init_for(job.dataset))
        example = torch.zeros(1, info.in_channels, *info.image_size)
        pruned, _ = prune_channels(base, job.budget, example)
        return pruned, profile.base, profile.width, None
    if job.kind == "static":
        assert job.depth is not None
        name = f"cifar_resnet{job.depth}"
        try:
            return build_model(name, **common, width=job.width), name, job.width, None
        except Exception:  # depths the registry does not list (14, 26...): the same class, built directly
            return CifarResNet(job.depth, width=job.width, **common), name, job.width, None
    spec = RECIPES.get(job.recipe)
    attempts = [(job.model, _width(job.model, job.width)), (spec.test_base, _width(spec.test_base, job.width)),
                (spec.test_base, {})]  # fmt: skip
    sizes: list[tuple[int, int] | None] = [None]
    own = tuple(spec.test_input[1:])
    if own != tuple(info.image_size) and all(o >= i for o, i in zip(own, info.image_size, strict=True)):
        sizes.append(own)  # type: ignore[arg-type]
    if profile.trained_like:  # a speed profile measures the profile's network or nothing: a refusal is its row
        attempts, sizes = attempts[:1], [None]
    errors = []
    settings = dict(dict(profile.recipe_settings).get(job.recipe, ()))
    for size in sizes:
        probe = torch.zeros(2, info.in_channels, *(size or info.image_size))
        for name, extra in attempts:
            try:
                if profile.trained_like:  # the base's normalisation layers as a trained network's, then converted
                    import dynnet
                    from dynnet.testing.matrix import trained_like_

                    base = trained_like_(build_model(name, **common, **extra), torch.Generator().manual_seed(job.seed))
                    model = dynnet.convert(base, job.recipe, budget=job.budget, inplace=True, **settings)
                else:
                    model = build_model(name, job.recipe, budget=job.budget, **common, **extra, **settings)
                model.eval()
                with torch.no_grad():
                    model(probe)  # a recipe may convert but fail on this input size: try the next base / size
                if errors:  # say why the profile's own base or size did not do (a fallback can hide a bug)
                    logging.getLogger(__name__).warning("job %s falls back to %s %s: %s", job.id, name, extra,
                                                        " | ".join(errors))  # fmt: skip
                return model, name, float(extra.get("width", 1.0)), size
            except Exception as err:
                errors.append(f"{name} {extra} at {size or tuple(info.image_size)}: {type(err).__name__}: {err}")
    raise RuntimeError("no base network / input size this recipe runs on: " + " | ".join(errors))


def _width(model: str, width: float) -> dict[str, float]:
    """The width argument of a base network: dynnet's own models take one; torchvision and timm models none at 1.0
    (a width multiplier other than 1.0 is passed on, and their builder says it has none)."""
    from dynnet.models import MODELS

    return {"width": width} if model in MODELS or width != 1.0 else {}


class _Padded:
    """A data loader whose images are zero-padded (black, in normalised units) to ``size``, centred."""

    def __init__(self, loader: DataLoader, size: tuple[int, int], black: Tensor) -> None:
        self.loader, self.size, self.black = loader, size, black
        self.sampler = loader.sampler  # fit reseeds the shuffling through it

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield pad_images(x, self.size, self.black), y


def pad_images(x: Tensor, size: tuple[int, int], black: Tensor) -> Tensor:
    """Tensor[N, C, h, w] → Tensor[N, C, H, W], centred on a canvas of value ``black`` (Tensor[C])."""
    n, c, h, w = x.shape
    H, W = size
    out = black.to(x).view(1, c, 1, 1).expand(n, c, H, W).clone()
    top, left = (H - h) // 2, (W - w) // 2
    out[:, :, top : top + h, left : left + w] = x
    return out


def _pad_data(data: JobData, size: tuple[int, int]) -> JobData:
    black = -torch.tensor(data.info.mean) / torch.tensor(data.info.std)
    return JobData(
        _Padded(data.train, size, black), None if data.val is None else _Padded(data.val, size, black),  # type: ignore[arg-type]
        _Padded(data.test, size, black), data.info, pad_images(data.images, size, black),  # type: ignore[arg-type]
        pad_images(data.example_images, size, black), data.example_targets, data.example_indices,
    )  # fmt: skip


def _quantiles(values: Tensor) -> dict[str, float]:
    v = values.double()
    qs = torch.quantile(v, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return {"min": float(v.min()), "p10": qs[0], "p50": qs[1], "p90": qs[2], "max": float(v.max()),
            "std": float(v.std()) if v.numel() > 1 else 0.0}  # fmt: skip


def _hist(fraction: Tensor, mask: Tensor) -> list[int]:
    edges = torch.tensor(MAC_HIST_EDGES, dtype=torch.float64)
    x = fraction[mask].double().clamp(max=edges[-1].item() - 1e-9)
    counts = torch.histc(x, bins=len(edges) - 1, min=float(edges[0]), max=float(edges[-1])) if x.numel() else None
    return [0] * (len(edges) - 1) if counts is None else [int(c) for c in counts.tolist()]


def run_job(job: Job, profile: BenchProfile, data: JobData, *, checkpoint_dir: Path | None = None) -> dict[str, Any]:
    """Train, test (sparse) and time one job; returns its row (status ``"ok"``). Exceptions propagate.

    Args:
        job: the job.
        profile: the profile (schedule, timing settings).
        data: the dataset's loaders and images (:func:`load_data`).
        checkpoint_dir: where ``fit`` keeps the job's checkpoint (``<dir>/<job.id>``); a finished checkpoint found
            there is loaded instead of training again. ``None``: no checkpoint.
    """
    from dynnet.bench.front import on_budget
    from dynnet.bench.harness import profile_model
    from dynnet.core import RECIPES
    from dynnet.train import TrainConfig, evaluate, fit

    seconds: dict[str, float] = {}
    scrambled = None
    torch.manual_seed(job.seed)
    trained = job.trained_job()  # the training this job calibrates (itself, usually)
    model, base, width, size = build_job_model(trained, profile, data.info)
    if size is not None:
        data = _pad_data(data, size)
    device = profile.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = None if checkpoint_dir is None else Path(checkpoint_dir) / trained.id
    if trained is not job and out is None:
        raise ValueError(f"job {job.id} calibrates {trained.id}'s training: it needs the suite's checkpoint folder")
    if out is not None:
        _claim_checkpoint(out, trained.settings(profile))
    init, teacher, warm = _fine_tune_plan(trained, profile, model, base, width, data.info)
    config = TrainConfig(
        **{"epochs": profile.epochs, "lr": profile.lr, "seed": job.seed, "max_steps": profile.max_steps,
           "device": device, "out_dir": out, "resume": out is not None, "progress": False,
           "distill": profile.distill if (init is not None or teacher is not None) else 0.0,
           **warm, **dict(profile.train_overrides)}
    )  # fmt: skip
    start = time.perf_counter()
    if job.source == "shipped" or (profile.scrambled and job.kind == "recipe"):  # no training
        from dynnet.train.loop import FitResult

        model.to(device)
        fitted = FitResult(history=[], val=None, checkpoint=None)
        if profile.scrambled and job.kind == "recipe":
            scrambled = scramble_decisions(model, job, data)
    else:  # calibrates to the budget on validation; a finished checkpoint of `trained` is loaded, not retrained
        fitted = fit(model, data.train, config, val_loader=data.val, init=init, teacher=teacher)
    seconds["train"] = time.perf_counter() - start
    cal = fitted.calibration
    achieved_val = None if fitted.val is None or job.kind == "static" else fitted.val.mac_fraction
    if trained is not job:  # trained at another budget: calibrated to this one on the validation split
        from dynnet.calibration import calibrate

        start = time.perf_counter()
        bn_data = data.train if profile.reestimate_bn else None
        cal = calibrate(model, data.val, job.budget, tolerance=config.calibrate_tolerance, bn_data=bn_data)
        seconds["calibrate"] = time.perf_counter() - start
        achieved_val = cal.mac_fraction
    if profile.scrambled and job.kind == "recipe" and RECIPES.get(job.recipe).budget.calibrated:
        from dynnet.calibration import calibrate

        start = time.perf_counter()
        cal = calibrate(model, data.val, job.budget, tolerance=config.calibrate_tolerance)
        seconds["calibrate"] = time.perf_counter() - start
        achieved_val = cal.mac_fraction
    calibration = {
        "calibrated": cal is not None, "error": fitted.calibration_error,
        "thresholds": {} if cal is None else dict(cal.thresholds),
        "uncalibrated_val_fraction": None if cal is None else cal.before,
        "batch_norms_reestimated": 0 if cal is None else cal.batch_norms,
    }  # fmt: skip

    start = time.perf_counter()
    ev = evaluate(model, data.test, mode="sparse")
    seconds["evaluate"] = time.perf_counter() - start
    fraction = ev.macs / ev.dense_macs
    correct = ev.correct.bool()
    confidence = torch.softmax(ev.logits.double(), 1).amax(1)

    start = time.perf_counter()
    timing: dict[str, Any] = {}
    dev_images = data.images.to(device)
    timing.update(profile_model(
        model, dev_images, batch_sizes=profile.batch_sizes, threads=profile.threads,
        min_run_time=profile.min_run_time, batch1_samples=profile.batch1_samples, rounds=profile.timing_rounds,
    ))  # fmt: skip
    if device != "cpu" and profile.cpu_latency:
        model.cpu()
        cpu = profile_model(
            model, data.images, batch_sizes=profile.batch_sizes, threads=profile.threads,
            min_run_time=profile.min_run_time, batch1_samples=profile.batch1_samples, rounds=profile.timing_rounds,
        )  # fmt: skip
        timing.update({f"cpu_{k}": v for k, v in cpu.items()})
        model.to(device)
    spec = RECIPES.get(job.recipe) if job.recipe else None
    extras = {}
    if spec is not None:
        from dynnet.bench.extras import EXTRAS, ExtraContext

        ctx = ExtraContext(job, profile, model, base, width, data.info, dev_images, timing, data)
        extras = {name: EXTRAS[name](ctx) for name in profile.extras}
    seconds["profile"] = time.perf_counter() - start
    recipe_metrics = None
    if spec is not None and spec.bench_metrics is not None and not profile.scrambled:  # random heads: meaningless
        from dynnet.core import set_mode

        start = time.perf_counter()
        recipe_metrics = spec.bench_metrics(model, data.val, data.test)
        set_mode(model.eval(), "sparse")
        seconds["recipe_metrics"] = time.perf_counter() - start
    examples = record_examples(model, data.example_images.to(device)) if len(data.example_images) else {}

    source = "static" if job.source == "scratch" else job.source
    fraction_of_base = ev.mac_fraction
    if job.source != "scratch":  # a pruned or shipped network: its MACs as a fraction of the profile's dense base
        fraction_of_base = float(ev.macs.mean()) / _dense_macs(profile, data.info, data.images[:1])
    row: dict[str, Any] = {
        "job": job.id, "kind": job.kind, "recipe": job.recipe or source, "family": spec.family if spec else "static",
        "model": base, "width": width, "depth": job.depth, "budget": job.budget, "seed": job.seed,
        "dataset": job.dataset, "status": "ok", "error": "", "padded_to": None if size is None else list(size),
        "base_fallback": bool(spec is not None and (base != job.model or width != job.width)),
        "init": None if init is None else str(init), "distill": config.distill, "trained_budget": trained.budget,
        "recipe_settings": dict(dict(profile.recipe_settings).get(job.recipe or "", ())),
        "params": sum(p.numel() for p in model.parameters()),
        "accuracy": ev.accuracy, "test_images": ev.num_samples, "loss": ev.loss,
        "mean_macs": float(ev.macs.mean()), "mean_executed_macs": float(ev.executed.mean()),
        "dense_macs": ev.dense_macs, "mac_fraction": fraction_of_base, "achieved": fraction_of_base,
        "achieved_val": achieved_val,
        "on_budget": on_budget(job.budget, fraction_of_base),
        "executed_fraction": float(ev.executed.mean()) / ev.dense_macs,
        "macs_q": _quantiles(ev.macs), "executed_q": _quantiles(ev.executed),
        "mean_macs_correct": float(ev.macs[correct].mean()) if correct.any() else math.nan,
        "mean_macs_incorrect": float(ev.macs[~correct].mean()) if (~correct).any() else math.nan,
        "mac_hist": {"edges": list(MAC_HIST_EDGES), "correct": _hist(fraction, correct),
                     "incorrect": _hist(fraction, ~correct)},
        "confidence_mac_corr": _corr(confidence, ev.macs),
        "decision_rates": ev.decision_rates, "calibration": calibration,
        **({"recipe_metrics": recipe_metrics} if recipe_metrics is not None else {}),
        **({"extras": extras} if extras else {}),
        **({"scrambled": scrambled} if scrambled is not None else {}),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "history": fitted.history,
        "examples": examples,
    }  # fmt: skip
    row.update(timing)
    return row


def scramble_decisions(model: nn.Module, job: Job, data: JobData) -> dict[str, Any]:
    """The budget check's stand-in for training: decisions made input-dependent at random
    (:func:`dynnet.testing.scramble_until_mixed` on the first 16 timing images: an untrained policy of the same
    structure). Where no seed mixes them (random exit heads on a few images may all agree) the gates keep the job
    seed's scrambling and the row says so: calibration is still checked.

    Returns:
        ``{"seed": the scrambling seed, "mixed": whether the decisions were mixed on those images}``.
    """
    from dynnet.core import RECIPES
    from dynnet.testing import scramble_gates, scramble_until_mixed

    torch.manual_seed(job.seed)
    model.eval()
    x = data.images[:16].to(next(model.parameters()).device)
    try:
        return {"seed": scramble_until_mixed(model, x, across_inputs=RECIPES.get(job.recipe).input_dependent),
                "mixed": True}  # fmt: skip
    except AssertionError:
        scramble_gates(model, seed=job.seed)
        return {"seed": job.seed, "mixed": False}


def _dense_macs(profile: BenchProfile, info: Any, image: Tensor) -> float:
    """MACs per image of the profile's dense base network (on ``image``: Tensor[1, C, H, W])."""
    from dynnet.macs import count_macs
    from dynnet.train import build_model

    net = build_model(profile.base, in_channels=info.in_channels, num_classes=info.num_classes, width=profile.width)
    return float(count_macs(net.eval(), image.cpu()).mean)


def _fine_tune_plan(
    job: Job, profile: BenchProfile, model: nn.Module, base: str, width: float, info: Any
) -> tuple[str | None, nn.Module | None, dict[str, Any]]:
    """``(init, teacher, TrainConfig overrides)`` of a job: a recipe on the profile's own base starts from the
    profile's ``init`` with the budget annealed from 1; a pruned baseline is already initialised and distils from
    the dense base it was pruned from; everything else trains from scratch (a recipe with its own ``scratch``
    settings, such as RAM's optimiser)."""
    from dynnet.core import RECIPES

    scratch = dict(RECIPES.get(job.recipe).scratch) if job.kind == "recipe" else {}
    start = profile.init_for(job.dataset)
    if start is None:
        return None, None, scratch
    if job.kind == "recipe" and base == profile.base and width == profile.width:
        from dynnet.core.recipe import fine_tune_settings
        from dynnet.train.init import load_init

        try:  # a recipe whose network does not contain the base (RANet, DCN, RAM...) trains from scratch
            load_init(copy.deepcopy(model), start)
        except ValueError as err:
            logging.getLogger(__name__).warning("job %s trains from scratch: %s", job.id, err)
            return None, None, scratch
        return start, None, fine_tune_settings(job.recipe, profile.epochs)
    if job.source == "pruned" and profile.distill > 0:
        from dynnet.train import build_model
        from dynnet.train.init import frozen_teacher, load_init

        dense = build_model(profile.base, in_channels=info.in_channels, num_classes=info.num_classes, width=width)
        load_init(dense, start)
        return None, frozen_teacher(dense), {}
    return None, None, scratch


def _corr(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two Tensor[N] (NaN when one is constant)."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else math.nan


def _claim_checkpoint(folder: Path, settings: dict[str, Any]) -> None:
    """Make ``folder`` hold the checkpoint of a job with these settings: a checkpoint left there by other settings
    (a changed schedule or fine-tune default) is removed, so that ``fit`` trains anew instead of resuming it; the
    settings are written beside the checkpoint."""
    import json
    import shutil

    stamp = folder / "job.json"
    wanted = json.dumps(settings, sort_keys=True)
    if folder.exists() and (not stamp.is_file() or stamp.read_text() != wanted):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp.write_text(wanted)
