"""The benchmark suite of issue #8: every registered recipe and a family of static baselines on the same footing.

For one base network and one dataset, :func:`run_suite` trains (with :func:`dynnet.train.fit`), tests (with
:func:`dynnet.train.evaluate` in **sparse** mode, i.e. with the work really skipped) and times (with
:func:`dynnet.bench.harness.profile_model`, dense vs sparse at batch 1 and 64):

- static baselines: CIFAR ResNets at several depths (``6n + 2``) and width multipliers — the "baseline models of
  different complexities" the reading list measures dynamic networks against; their (MACs, accuracy) points give
  the static Pareto front (:mod:`dynnet.bench.report`);
- every registered recipe (``dynnet.list_recipes()`` at run time) at each budget of the profile.

Every job uses the same data, schedule and seeds. Each finished job writes ``out_dir/runs/<job>.json`` atomically
and is never recomputed while its settings are unchanged (the suite is resumable: interrupt it and run it again).
A job that fails records its error in its row; the suite goes on. At the end the table (``results.csv``,
``results.json``), the plots (:mod:`dynnet.bench.plots`) and ``report.md`` (:mod:`dynnet.bench.report`) are
written from all the rows.

Base network of a recipe: the profile's base when the recipe converts it; otherwise (a recipe that needs stages
of ≥ 2 residual blocks, or its own architecture such as MSDNet) the recipe's own ``RecipeSpec.test_base`` at the
profile's width, then at its default width. The row says which base was used.

Example:
    >>> from dynnet.bench.suite import PROFILES, run_suite
    >>> rows = run_suite(PROFILES["quick"], "benchmarks/results/suite/quick")
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from dynnet.cli import _checked, _count, _count0  # the command line's number checks (stdlib only)

__all__ = [
    "PROFILES",
    "BenchProfile",
    "Job",
    "add_suite_arguments",
    "bench_main",
    "plan_jobs",
    "record_examples",
    "run_job",
    "run_suite",
]

logger = logging.getLogger("dynnet.bench.suite")

MAC_HIST_EDGES = tuple(round(0.05 * i, 2) for i in range(31))
"""Bin edges of the stored per-sample MAC histograms, in fractions of the static base network's MACs (0 .. 1.5)."""


@dataclass(frozen=True)
class BenchProfile:
    """Everything a suite run shares: base network, data, schedule, budgets, baselines, seeds, timing.

    Attributes:
        name: profile name (``"quick"``, ``"full"``); also the results sub-folder.
        base: base network of the recipes (a registered model name).
        width: channel-width multiplier of the base network (CIFAR ResNets).
        dataset: registered dataset name (``dynnet.data``).
        dataset_kwargs: extra dataset-builder arguments, as ``(key, value)`` pairs (kept hashable).
        family_datasets: ``(family, dataset)`` pairs: recipes of that family run on another dataset (glimpse
            recipes on Cluttered Fashion-MNIST); the static baselines are then also run on that dataset so that
            every recipe has a front of its own data.
        subset: training images (``None``: the whole training split less validation).
        val_fraction: fraction of the training split held out for the per-epoch validation (small: it is
            evaluated every epoch of every job).
        test_subset: test images used for accuracy and MACs (a fixed random subset; ``None``: the whole split).
        epochs: training epochs of every job.
        max_steps: cap on optimiser steps of every job (``None``: ``epochs`` full passes).
        batch_size: training and evaluation batch size.
        lr: peak SGD learning rate (cosine decay), shared by every job.
        train_overrides: extra :class:`~dynnet.train.TrainConfig` fields for every job, as ``(key, value)`` pairs.
        budgets: budgets at which each recipe is trained (fraction of dense MACs or the recipe's execution rate).
        static_depths: CIFAR-ResNet depths of the static baselines (``6n + 2``), each at ``static_widths``.
        static_widths: width multipliers of the static baselines.
        seeds: every job runs once per seed (model initialisation, data order).
        batch_sizes: latency batch sizes (batch 1 loops over ``batch1_samples`` different images).
        min_run_time: seconds of measurement per timed configuration (median of repeated runs after warm-up).
        batch1_samples: images averaged over for the batch-1 latency.
        threads: CPU threads for the latency measurement (stated in the results).
        train_threads: CPU threads for training and evaluation. 1 on a shared machine: with 2 threads on 2 busy
            cores, OpenMP workers spin waiting for each other and a training step took ~10× longer (measured).
        device: ``"cpu"``, ``"cuda"`` or ``None`` (CUDA when available). On a GPU the latency is measured on the GPU
            and, with ``cpu_latency``, again on the CPU.
        cpu_latency: also time on the CPU when training ran on a GPU.
        examples: test images whose decisions are recorded for the example panel.
        init: trained weights the recipes on the profile's base start from (``"zoo"``: the shipped
            ``zoo:<base>[x<width>]-<dataset>``; or anything ``fit``'s ``init`` takes). The budget then anneals from 1
            over the first epoch. Recipes that run on another base (their own architecture) train from scratch.
        distill: weight of the distillation from the dense ``init`` base (recipes and pruned baselines alike).
        pruned_fractions: static baselines made by pruning ``init``'s channels (lowest L1 norm) to these MAC
            fractions and fine-tuning them with exactly the recipes' schedule (``recipe`` column ``"pruned"``).
        shipped_static: the static networks of the base model and dataset shipped in :mod:`dynnet.zoo` (trained with
            the base's own long schedule) join the static front, tested and timed like the others (``"shipped"``).
        recipe_settings: settings of particular recipes, ``((recipe, ((field, value), ...)), ...)``: fields of the
            recipe's config (network selection's shipped little network), recorded in each job's row.
        trained_budget: recipes whose budget is calibrated (``RecipeSpec.budget.calibrated``) are trained once, at
            this budget, and calibrated on the validation split to each other budget of the profile (their rows say
            ``trained_budget``); the trained job runs first and keeps its checkpoint. ``None``: every budget is
            trained.
    """

    name: str = "quick"
    base: str = "cifar_resnet8"
    width: float = 0.5
    dataset: str = "fashion_mnist"
    dataset_kwargs: tuple[tuple[str, Any], ...] = ()
    family_datasets: tuple[tuple[str, str], ...] = ()
    subset: int | None = 3000
    val_fraction: float = 0.005
    test_subset: int | None = 2000
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 128
    lr: float = 0.1
    train_overrides: tuple[tuple[str, Any], ...] = ()
    budgets: tuple[float, ...] = (0.25, 0.5, 0.75)
    static_depths: tuple[int, ...] = (8, 14, 20)
    static_widths: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    seeds: tuple[int, ...] = (0,)
    batch_sizes: tuple[int, ...] = (1, 64)
    min_run_time: float = 0.1
    batch1_samples: int = 16
    threads: int | None = 2
    train_threads: int | None = 1
    device: str | None = "cpu"
    cpu_latency: bool = True
    examples: int = 8
    init: str | None = None
    distill: float = 0.0
    pruned_fractions: tuple[float, ...] = ()
    shipped_static: bool = False
    recipe_settings: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    trained_budget: float | None = None

    def __post_init__(self) -> None:
        if not self.budgets or any(not 0.0 < b <= 1.0 for b in self.budgets):
            raise ValueError(f"budgets must be fractions in (0, 1], got {self.budgets}")
        if any(d < 8 or (d - 2) % 6 for d in self.static_depths):
            raise ValueError(f"CIFAR-ResNet depths are 6n + 2 (8, 14, 20, 26, 32...), got {self.static_depths}")
        if any(w <= 0 for w in self.static_widths):
            raise ValueError(f"widths must be positive, got {self.static_widths}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.pruned_fractions and self.init is None:
            raise ValueError("pruned_fractions need the trained base to prune: set init")
        if any(not 0.0 < f < 1.0 for f in self.pruned_fractions):
            raise ValueError(f"pruned_fractions must be in (0, 1), got {self.pruned_fractions}")
        if self.trained_budget is not None and not 0.0 < self.trained_budget <= 1.0:
            raise ValueError(f"trained_budget must be a fraction in (0, 1], got {self.trained_budget}")

    def init_for(self, dataset: str) -> str | None:
        """The ``init`` of the recipes and pruned baselines on ``dataset`` (``"zoo"`` resolved to its key)."""
        if self.init != "zoo":
            return self.init
        from dynnet.zoo import weights_key

        return f"zoo:{weights_key(self.base, dataset, self.width)}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready settings."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


PROFILES: dict[str, BenchProfile] = {
    # 2 CPU cores, ~20 minutes for ~40 recipes × 3 budgets + 12 baselines (idle machine): a very short schedule on
    # a tiny network — the accuracies are those of 1 epoch on 4,000 images, far from converged (the report says so).
    "quick": BenchProfile(
        name="quick",
        base="cifar_resnet8",
        width=0.5,
        subset=4000,
        test_subset=1000,
        epochs=1,
        budgets=(0.25, 0.5, 0.75),
        static_depths=(8, 14, 20),
        static_widths=(0.25, 0.5, 0.75, 1.0),
        min_run_time=0.05,
        batch1_samples=8,
        # 1 thread: on 2 cores shared with other work, 2 OpenMP threads spin-wait for each other and the timings
        # (and training) become 4-20× slower and meaningless (measured); pass --threads 2 on an idle machine.
        threads=1,
        train_threads=1,
        device="cpu",
    ),
    # 2 CPU cores, run in pieces (resumable job by job; commit runs/ as it grows): every recipe fine-tuned from the
    # shipped ResNet-20 (distilled from it) at budgets 0.25 / 0.5 / 0.75 on all of Fashion-MNIST, tested on the whole
    # test set in sparse mode; the static front is the shipped static networks (the base's own 30-epoch schedule)
    # and the base pruned to the same MAC levels and fine-tuned with exactly the recipes' schedule.
    "standard": BenchProfile(
        name="standard",
        base="cifar_resnet20",
        width=1.0,
        subset=None,
        val_fraction=0.1,
        test_subset=None,
        epochs=2,
        lr=0.02,
        budgets=(0.25, 0.5, 0.75),
        static_depths=(),
        static_widths=(),
        seeds=(0,),
        min_run_time=0.5,
        batch1_samples=32,
        threads=1,  # 1 thread, like quick: the machine that runs it in pieces is shared with other work
        train_threads=1,
        device="cpu",
        init="zoo",
        distill=1.0,
        pruned_fractions=(0.25, 0.5, 0.75),
        shipped_static=True,
        # network selection's little network: the shipped width-0.5 ResNet-20 (trained like the base), as in the
        # main job (the default, the base pruned to a quarter of its MACs, scores 10 % before fine-tuning).
        recipe_settings=(("network_selection", (("little", "zoo:cifar_resnet20x0.5-fashion_mnist"),)),),
        # What issue #18 allows: a calibrated recipe is trained at 0.5 and calibrated to 0.25 and 0.75 (a third of
        # the training time; the rows say so); recipes whose budget is fixed at conversion train at each budget.
        trained_budget=0.5,
    ),
    # One GPU, roughly 10 hours (estimated, not yet run): ResNet-20 at full width on all of Fashion-MNIST, 2 seeds,
    # glimpse recipes on the cluttered canvas (with their own static front). ~300 jobs of 15 epochs.
    "full": BenchProfile(
        name="full",
        base="cifar_resnet20",
        width=1.0,
        family_datasets=(("glimpse", "cluttered_fashion_mnist"),),
        subset=None,
        val_fraction=0.1,
        test_subset=None,
        epochs=15,
        budgets=(0.25, 0.5, 0.75),
        static_depths=(8, 14, 20, 32),
        static_widths=(0.25, 0.5, 0.75, 1.0),
        seeds=(0, 1),
        min_run_time=1.0,
        batch1_samples=64,
        threads=None,
        train_threads=None,
        device=None,
        examples=8,
    ),
}


@dataclass(frozen=True)
class Job:
    """One (model, budget, seed) run of the suite.

    Attributes:
        id: file-system-safe name, unique in the suite (``static-d8-w0.5-s0``, ``convnet_aig-b0.5-s0``).
        kind: ``"static"`` or ``"recipe"``.
        model: base network name.
        width: width multiplier.
        dataset: dataset name.
        seed: seed.
        recipe: recipe name (``None`` for a static baseline).
        budget: recipe budget (``None`` for a static baseline).
        depth: ResNet depth of a static baseline.
        source: how a static baseline is made: ``"scratch"`` (trained with the suite's schedule), ``"pruned"`` (the
            profile's ``init`` pruned to ``budget`` of its MACs, then fine-tuned) or ``"shipped"`` (the zoo entry
            ``key``, tested as shipped).
        key: the zoo key of a shipped static baseline.
        trained_budget: the budget the recipe is trained at when it differs from ``budget``: the job loads the
            trained job's checkpoint and calibrates it to ``budget`` (:attr:`BenchProfile.trained_budget`).
    """

    id: str
    kind: str
    model: str
    width: float
    dataset: str
    seed: int
    recipe: str | None = None
    budget: float | None = None
    depth: int | None = None
    source: str = "scratch"
    key: str | None = None
    trained_budget: float | None = None

    def settings(self, profile: BenchProfile) -> dict[str, Any]:
        """What determines the job's result: a finished job is reused only if these are unchanged (the recipe's
        fine-tune defaults and settings included, so that a change of them reruns its jobs)."""
        keys = ("epochs", "max_steps", "batch_size", "lr", "subset", "val_fraction", "test_subset",
                "train_overrides", "dataset_kwargs", "batch_sizes", "min_run_time", "batch1_samples", "threads",
                "train_threads", "device", "cpu_latency", "examples", "init", "distill")  # fmt: skip
        p = profile.as_dict()
        out = dataclasses.asdict(self) | {k: p[k] for k in keys}
        if self.recipe is not None:
            from dynnet.core.recipe import fine_tune_settings

            out["fine_tune"] = fine_tune_settings(self.recipe, profile.epochs) if profile.init is not None else {}
            out["recipe_settings"] = dict(dict(profile.recipe_settings).get(self.recipe, ()))
        return json.loads(json.dumps(out, default=_json_default))

    def trained_job(self) -> Job:
        """The job whose training this one calibrates (itself when it trains at its own budget)."""
        if self.trained_budget is None:
            return self
        tag = self.id.removeprefix(f"{self.recipe}-b{self.budget:g}")
        return dataclasses.replace(
            self, id=f"{self.recipe}-b{self.trained_budget:g}{tag}", budget=self.trained_budget, trained_budget=None
        )


def plan_jobs(profile: BenchProfile, recipes: Sequence[str] | None = None) -> list[Job]:
    """The suite's jobs: static baselines (each depth × width, on every dataset used) and recipes × budgets × seeds.

    Args:
        profile: the profile.
        recipes: recipe names (default: every registered recipe at call time).

    Returns:
        Static jobs first (cheapest first), then recipes in name order; a recipe calibrated from
        ``profile.trained_budget`` has its trained job first (added when the budgets lack it).
    """
    import dynnet
    from dynnet.core import RECIPES

    registered = dynnet.list_recipes()  # also imports every method package (registration)
    names = list(registered) if recipes is None else list(recipes)
    by_family = dict(profile.family_datasets)
    datasets = [profile.dataset]
    recipe_jobs: list[Job] = []
    for name in names:
        spec = RECIPES.get(name)
        data = by_family.get(spec.family, profile.dataset)
        if data not in datasets:
            datasets.append(data)
        trained = profile.trained_budget if spec.budget.calibrated else None
        if trained is not None and not spec.budget.reachable[0] <= trained <= spec.budget.reachable[1]:
            trained = None
        budgets = list(profile.budgets) if trained is None else [trained, *(b for b in profile.budgets if b != trained)]
        for budget in budgets:
            for seed in profile.seeds:
                tag = "" if data == profile.dataset else f"-{data}"
                recipe_jobs.append(
                    Job(f"{name}-b{budget:g}{tag}-s{seed}", "recipe", profile.base, profile.width, data, seed,
                        recipe=name, budget=budget, trained_budget=None if budget == trained else trained)
                )  # fmt: skip
    static_jobs: list[Job] = []
    for data in datasets:
        tag = "" if data == profile.dataset else f"-{data}"
        for depth in sorted(profile.static_depths):
            for width in sorted(profile.static_widths):
                for seed in profile.seeds:
                    static_jobs.append(
                        Job(f"static-d{depth}-w{width:g}{tag}-s{seed}", "static", f"cifar_resnet{depth}", width,
                            data, seed, depth=depth)
                    )  # fmt: skip
        for fraction in sorted(profile.pruned_fractions):
            for seed in profile.seeds:
                static_jobs.append(
                    Job(f"pruned-p{fraction:g}{tag}-s{seed}", "static", profile.base, profile.width, data, seed,
                        budget=fraction, source="pruned")
                )  # fmt: skip
        if profile.shipped_static:
            from dynnet.zoo import shipped

            for key, manifest in shipped().items():
                if manifest.get("model", "").startswith("cifar_resnet") and manifest.get("data") == data:
                    static_jobs.append(
                        Job(f"shipped-{key}", "static", manifest["model"],
                            float(manifest["settings"].get("width") or 1.0), data, 0, source="shipped", key=key)
                    )  # fmt: skip
    return static_jobs + recipe_jobs


# ----------------------------------------------------------------------------------------------------- data


@dataclass
class _Data:
    """Loaders of one dataset, the fixed test subset and the example images (built once per dataset and seed)."""

    train: DataLoader
    val: DataLoader | None
    test: DataLoader
    info: Any
    images: Tensor  # Tensor[M, C, H, W] real test images for the latency
    example_images: Tensor  # Tensor[E, C, H, W]
    example_targets: Tensor  # Tensor[E]
    example_indices: list[int] = field(default_factory=list)


def _load_data(profile: BenchProfile, dataset: str, seed: int) -> _Data:
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
    need = max(max(profile.batch_sizes), profile.batch1_samples)
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
    return _Data(loaders.train, loaders.val, test, loaders.info, images, ex_x, ex_y, keep[:e])


def _example_payload(data: _Data) -> dict[str, Any]:
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


# ------------------------------------------------------------------------------------------------ one job


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


def _build(job: Job, profile: BenchProfile, info: Any) -> tuple[nn.Module, str, float, tuple[int, int] | None]:
    """The job's model, its base name and width, and the padded input size (``None``: the dataset's own).

    A recipe that cannot convert the profile's base (or fails on its images) falls back to its own test base at the
    profile's width, then at its default width; one that needs another image size (sides divisible by 8...) gets
    the dataset's images zero-padded (black) to its ``RecipeSpec.test_input`` size.
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
    attempts = [(job.model, {"width": job.width}), (spec.test_base, {"width": job.width}), (spec.test_base, {})]
    sizes: list[tuple[int, int] | None] = [None]
    own = tuple(spec.test_input[1:])
    if own != tuple(info.image_size) and all(o >= i for o, i in zip(own, info.image_size, strict=True)):
        sizes.append(own)  # type: ignore[arg-type]
    errors = []
    settings = dict(dict(profile.recipe_settings).get(job.recipe, ()))
    for size in sizes:
        probe = torch.zeros(2, info.in_channels, *(size or info.image_size))
        for name, extra in attempts:
            try:
                model = build_model(name, job.recipe, budget=job.budget, **common, **extra, **settings)
                model.eval()
                with torch.no_grad():
                    model(probe)  # a recipe may convert but fail on this input size: try the next base / size
                return model, name, float(extra.get("width", 1.0)), size
            except Exception as err:
                errors.append(f"{name} {extra} at {size or tuple(info.image_size)}: {type(err).__name__}: {err}")
    raise RuntimeError("no base network / input size this recipe runs on: " + " | ".join(errors))


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


def _pad_data(data: _Data, size: tuple[int, int]) -> _Data:
    black = -torch.tensor(data.info.mean) / torch.tensor(data.info.std)
    return _Data(
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


def run_job(job: Job, profile: BenchProfile, data: _Data, *, checkpoint_dir: Path | None = None) -> dict[str, Any]:
    """Train, test (sparse) and time one job; returns its row (status ``"ok"``). Exceptions propagate.

    Args:
        job: the job.
        profile: the profile (schedule, timing settings).
        data: the dataset's loaders and images (:func:`_load_data`).
        checkpoint_dir: where ``fit`` keeps the job's checkpoint (``<dir>/<job.id>``); a finished checkpoint found
            there is loaded instead of training again. ``None``: no checkpoint.
    """
    from dynnet.bench.harness import profile_model
    from dynnet.bench.report import on_budget
    from dynnet.core import RECIPES
    from dynnet.train import TrainConfig, evaluate, fit

    seconds: dict[str, float] = {}
    torch.manual_seed(job.seed)
    trained = job.trained_job()  # the training this job calibrates (itself, usually)
    model, base, width, size = _build(trained, profile, data.info)
    if size is not None:
        data = _pad_data(data, size)
    device = profile.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = None if checkpoint_dir is None else Path(checkpoint_dir) / trained.id
    if trained is not job and out is None:
        raise ValueError(f"job {job.id} calibrates {trained.id}'s training: it needs the suite's checkpoint folder")
    init, teacher, warm = _fine_tune_plan(trained, profile, model, base, width, data.info)
    config = TrainConfig(
        **{"epochs": profile.epochs, "lr": profile.lr, "seed": job.seed, "max_steps": profile.max_steps,
           "device": device, "out_dir": out, "resume": out is not None, "progress": False,
           "distill": profile.distill if (init is not None or teacher is not None) else 0.0,
           **warm, **dict(profile.train_overrides)}
    )  # fmt: skip
    start = time.perf_counter()
    if job.source == "shipped":  # tested as shipped: no training
        from dynnet.train.loop import FitResult

        model.to(device)
        fitted = FitResult(history=[], val=None, checkpoint=None)
    else:  # calibrates to the budget on validation; a finished checkpoint of `trained` is loaded, not retrained
        fitted = fit(model, data.train, config, val_loader=data.val, init=init, teacher=teacher)
    seconds["train"] = time.perf_counter() - start
    cal = fitted.calibration
    achieved_val = None if fitted.val is None or job.kind == "static" else fitted.val.mac_fraction
    if trained is not job:  # trained at another budget: calibrated to this one on the validation split
        from dynnet.calibration import calibrate

        start = time.perf_counter()
        cal = calibrate(model, data.val, job.budget, tolerance=config.calibrate_tolerance)
        seconds["calibrate"] = time.perf_counter() - start
        achieved_val = cal.mac_fraction
    calibration = {
        "calibrated": cal is not None, "error": fitted.calibration_error,
        "thresholds": {} if cal is None else dict(cal.thresholds),
        "uncalibrated_val_fraction": None if cal is None else cal.before,
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
        min_run_time=profile.min_run_time, batch1_samples=profile.batch1_samples,
    ))  # fmt: skip
    if device != "cpu" and profile.cpu_latency:
        model.cpu()
        cpu = profile_model(
            model, data.images, batch_sizes=profile.batch_sizes, threads=profile.threads,
            min_run_time=profile.min_run_time, batch1_samples=profile.batch1_samples,
        )  # fmt: skip
        timing.update({f"cpu_{k}": v for k, v in cpu.items()})
        model.to(device)
    seconds["profile"] = time.perf_counter() - start
    examples = record_examples(model, data.example_images.to(device)) if len(data.example_images) else {}

    spec = RECIPES.get(job.recipe) if job.recipe else None
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
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "history": fitted.history,
        "examples": examples,
    }  # fmt: skip
    row.update(timing)
    return row


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
    the dense base it was pruned from; everything else trains from scratch."""
    start = profile.init_for(job.dataset)
    if start is None:
        return None, None, {}
    if job.kind == "recipe" and base == profile.base and width == profile.width:
        from dynnet.core.recipe import fine_tune_settings

        return start, None, fine_tune_settings(job.recipe, profile.epochs)
    if job.source == "pruned" and profile.distill > 0:
        from dynnet.train import build_model
        from dynnet.train.init import frozen_teacher, load_init

        dense = build_model(profile.base, in_channels=info.in_channels, num_classes=info.num_classes, width=width)
        load_init(dense, start)
        return None, frozen_teacher(dense), {}
    return None, None, {}


def _corr(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two Tensor[N] (NaN when one is constant)."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else math.nan


# ---------------------------------------------------------------------------------------------- the suite


def _write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (a crash never leaves a half-written run file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # Compact (one line): the committed results stay lean; `python -m json.tool` pretty-prints one for reading.
    tmp.write_text(json.dumps(obj, separators=(",", ":"), default=_json_default, allow_nan=True))
    os.replace(tmp, path)


def _json_default(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return str(x)


def _finished(path: Path, settings: dict[str, Any], retry_errors: bool) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        row = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if row.get("settings") != json.loads(json.dumps(settings, default=_json_default)):
        return None
    if retry_errors and row.get("status") != "ok":
        return None
    return row


def run_suite(
    profile: BenchProfile,
    out_dir: str | os.PathLike[str],
    recipes: Sequence[str] | None = None,
    *,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    retry_errors: bool = False,
    progress: bool = True,
    report: bool = True,
) -> list[dict[str, Any]]:
    """Run every job of the suite once (resumable), then write the table, plots and report.

    Args:
        profile: the :class:`BenchProfile`.
        out_dir: results folder: ``runs/<job>.json`` per job, ``results.csv``/``results.json``, ``*.png``,
            ``report.md``, ``suite.log``.
        recipes: recipe names (default: every registered recipe).
        checkpoint_dir: keep each job's checkpoint there (and reload a finished one instead of retraining); default
            with ``profile.trained_budget``: ``out_dir/checkpoints`` (git-ignored).
        retry_errors: run again the jobs whose stored row is an error (default: a failed job counts as finished).
        progress: tqdm progress bar over the jobs.
        report: write the table, plots and report at the end.

    Returns:
        One row per job (dicts; ``status`` is ``"ok"``, ``"error"``, or ``"unreachable"`` for a budget outside the
        recipe's declared range, which is not run).
    """
    from dynnet.bench.latency import machine_info

    out = Path(out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "suite.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("dynnet").addHandler(handler)
    previous_level = logging.getLogger("dynnet").level
    if previous_level == logging.NOTSET or previous_level > logging.INFO:
        logging.getLogger("dynnet").setLevel(logging.INFO)
    if checkpoint_dir is None and profile.trained_budget is not None:  # calibrated jobs load the trained ones
        checkpoint_dir = out / "checkpoints"
        checkpoint_dir.mkdir(exist_ok=True)
        (checkpoint_dir / ".gitignore").write_text("*\n")  # weights stay out of the committed results
    previous_threads = torch.get_num_threads()
    if profile.train_threads:
        torch.set_num_threads(profile.train_threads)
    try:
        jobs = plan_jobs(profile, recipes)
        _check_init(profile, {job.dataset for job in jobs})
        logger.info("suite %s: %d jobs, out_dir %s", profile.name, len(jobs), out)
        _write_json(out / "profile.json", profile.as_dict())
        rows: list[dict[str, Any]] = []
        data_cache: dict[tuple[str, int], _Data] = {}
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(jobs), desc=f"suite {profile.name}", dynamic_ncols=True)
        ran = 0
        for job in jobs:
            settings = job.settings(profile)
            path = out / "runs" / f"{job.id}.json"
            row = _finished(path, settings, retry_errors)
            if row is None and (refused := _out_of_range(job)) is not None:
                row = refused | {"settings": settings}
                _write_json(path, row)
            if row is None:
                ran += 1
                row = _run_one(job, profile, data_cache, out, settings, checkpoint_dir)
                _write_json(path, row)
            rows.append(row)
            if bar is not None:
                bar.set_postfix_str(f"{job.id} {row.get('status')}")
                bar.update(1)
        if bar is not None:
            bar.close()
        logger.info("suite %s: ran %d jobs, reused %d", profile.name, ran, len(jobs) - ran)
        if report:
            from dynnet.bench.report import write_outputs

            write_outputs(rows, out, profile=profile.as_dict(), machine=machine_info())
        return rows
    finally:
        torch.set_num_threads(previous_threads)
        logging.getLogger("dynnet").removeHandler(handler)
        logging.getLogger("dynnet").setLevel(previous_level)
        handler.close()


def _check_init(profile: BenchProfile, datasets: set[str]) -> None:
    """Refuse a profile that starts from shipped weights the package does not have (one line saying how to make
    them), before any job runs."""
    if profile.init != "zoo":
        return
    from dynnet.zoo import shipped

    for data in sorted(datasets):
        key = profile.init_for(data).split(":", 1)[1]  # type: ignore[union-attr]
        if key not in shipped():
            raise ValueError(
                f"profile {profile.name!r} fine-tunes from the shipped {key!r}, which this installation lacks: make it "
                f"with `dynnet pretrain --model {profile.base} --data {data} --out runs/pretrain/{key}` and "
                "dynnet.zoo.ship(that folder)"
            )


def _out_of_range(job: Job) -> dict[str, Any] | None:
    """The row of a recipe job whose budget lies outside the recipe's declared reachable range (not run: the
    conversion would refuse it), or ``None``."""
    from dynnet.core import RECIPES

    if job.kind != "recipe" or job.budget is None:
        return None
    spec = RECIPES.get(job.recipe)
    lo, hi = spec.budget.reachable
    if lo - 1e-9 <= job.budget <= hi + 1e-9:
        return None
    return {
        "job": job.id, "kind": job.kind, "recipe": job.recipe, "family": spec.family, "model": job.model,
        "width": job.width, "depth": job.depth, "budget": job.budget, "seed": job.seed, "dataset": job.dataset,
        "status": "unreachable", "error": f"budget {job.budget:g} is outside the declared reachable [{lo:g}, {hi:g}]",
    }  # fmt: skip


def _run_one(
    job: Job,
    profile: BenchProfile,
    data_cache: dict[tuple[str, int], _Data],
    out: Path,
    settings: dict[str, Any],
    checkpoint_dir: str | os.PathLike[str] | None,
) -> dict[str, Any]:
    from dynnet.bench.latency import machine_info

    started = time.time()
    logger.info("job %s: start", job.id)
    try:
        key = (job.dataset, job.seed)
        if key not in data_cache:
            data_cache[key] = _load_data(profile, job.dataset, job.seed)
            examples_path = out / "examples" / f"{_safe(job.dataset)}.json"
            if not examples_path.exists():
                _write_json(examples_path, _example_payload(data_cache[key]))
        row = run_job(job, profile, data_cache[key],
                      checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir))  # fmt: skip
        logger.info("job %s: accuracy %.4f, MAC fraction %.3f, %.1f s", job.id, row["accuracy"],
                    row["mac_fraction"], time.time() - started)  # fmt: skip
    except Exception as err:
        logger.error("job %s failed: %s: %s", job.id, type(err).__name__, err)
        row = {
            "job": job.id, "kind": job.kind, "recipe": job.recipe or "static", "model": job.model,
            "width": job.width, "depth": job.depth, "budget": job.budget, "seed": job.seed, "dataset": job.dataset,
            "status": "error", "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(limit=8)[-4000:],
        }  # fmt: skip
        with contextlib.suppress(Exception):
            from dynnet.core import RECIPES

            row["family"] = RECIPES.get(job.recipe).family if job.recipe else "static"
    row["settings"] = settings
    row["machine"] = machine_info()
    row["wall_seconds"] = round(time.time() - started, 2)
    row["finished"] = time.time()
    return row


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


# ------------------------------------------------------------------------------------------------------ CLI


def add_suite_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the suite's options (``--profile``, ``--out``, ``--recipes``...) to ``parser``.

    Used by ``benchmarks/suite.py`` and by ``dynnet bench``; an option the parser already has (``--threads``
    of ``dynnet bench``) is kept as it is.
    """

    def add(flag: str, **kwargs: Any) -> None:
        if flag not in parser._option_string_actions:  # argparse has no public "has option"
            parser.add_argument(flag, **kwargs)

    add("--profile", default=None, choices=sorted(PROFILES), help="run the benchmark suite with this profile")
    add("--out", default=None, help="suite results folder (default benchmarks/results/suite/<profile>)")
    add("--recipes", default=None, help="comma-separated recipe names (default: every registered recipe)")
    add("--budgets", type=_budgets, default=None, help="comma-separated budgets (default: the profile's)")
    add("--seeds", type=_seeds, default=None, help="comma-separated seeds (default: the profile's)")
    add("--subset", type=_count0, default=None, help="training images (default: the profile's)")
    add("--epochs", type=_count, default=None, help="training epochs (default: the profile's)")
    add("--device", default=None, help="cpu / cuda (default: the profile's)")
    add("--threads", type=_count, default=None, help="CPU threads of the latency timing (default: the profile's)")
    add("--keep-checkpoints", default=None, metavar="DIR", help="keep each job's checkpoint in DIR")
    add("--retry-errors", action="store_true", help="rerun the jobs that failed before")
    add("--report-only", action="store_true", help="rebuild table, plots and report from <out>/runs/")
    add("--no-progress", action="store_true", help="no progress bar")


def _budgets(text: str) -> tuple[float, ...]:
    """``--budgets``: comma-separated fractions in (0, 1]; anything else is argparse's one-line usage error."""
    return _checked(
        text, lambda t: tuple(float(v) for v in t.split(",") if v.strip()),
        lambda vs: bool(vs) and all(0.0 < v <= 1.0 for v in vs), "comma-separated budgets in (0, 1] like 0.25,0.5",
    )  # fmt: skip


def _seeds(text: str) -> tuple[int, ...]:
    """``--seeds``: comma-separated integers in [0, 2**31), the range of ``--seed``."""
    return _checked(
        text, lambda t: tuple(int(v) for v in t.split(",") if v.strip()),
        lambda vs: bool(vs) and all(0 <= v < 2**31 for v in vs), "comma-separated seeds (integers >= 0) like 0,1",
    )  # fmt: skip


def profile_from_args(args: argparse.Namespace) -> BenchProfile:
    """The named profile with the command-line overrides applied."""
    profile = PROFILES[args.profile or "quick"]
    changes: dict[str, Any] = {}
    for key, parse in (("budgets", _budgets), ("seeds", _seeds)):  # parsed by argparse, or text from a script
        value = getattr(args, key, None)
        if value:
            changes[key] = parse(value) if isinstance(value, str) else tuple(value)
    for key in ("subset", "epochs", "device", "threads"):
        if getattr(args, key, None) is not None:
            changes[key] = getattr(args, key)
    return dataclasses.replace(profile, **changes) if changes else profile


def bench_main(args: argparse.Namespace) -> int:
    """``dynnet bench --profile quick|full [...]``: run the suite (or rebuild its report) and print where it went."""
    profile = profile_from_args(args)
    out = Path(args.out or f"benchmarks/results/suite/{profile.name}")
    if getattr(args, "report_only", False):
        from dynnet.bench.latency import machine_info
        from dynnet.bench.report import load_rows, write_outputs

        write_outputs(load_rows(out), out, profile=profile.as_dict(), machine=machine_info())
    else:
        recipes = [r.strip() for r in args.recipes.split(",")] if getattr(args, "recipes", None) else None
        run_suite(
            profile,
            out,
            recipes,
            checkpoint_dir=getattr(args, "keep_checkpoints", None),
            retry_errors=getattr(args, "retry_errors", False),
            progress=not getattr(args, "no_progress", False),
        )
    print(f"report: {out / 'report.md'}")
    return 0
