"""What the benchmark suite runs: profiles (:class:`BenchProfile`, :data:`PROFILES`), jobs (:class:`Job`) and their
plan (:func:`plan_jobs`). Pure planning: nothing here trains, loads data or writes files."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = ["PROFILES", "BenchProfile", "Job", "plan_jobs"]


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
        families: recipe families the profile runs (``"channel"``, ``"early_exit"``...); empty, with empty
            ``recipes``: every registered recipe. A family profile is one of these with its measurements (``extras``).
        recipes: recipes the profile runs besides its ``families`` (DT-RAM, an early exit built on the glimpse
            family's RAM, with the glimpse recipes).
        extras: measurements of :data:`dynnet.bench.extras.EXTRAS` made on every recipe job after the timing
            (``"scrambled_timing"``, ``"engine_ratio"``, ``"operator_profile"``); they land in the row's ``extras``.
            A recipe's own measurements (``RecipeSpec.bench_metrics``) run in every profile.
        scrambled: the budget check: no training; each recipe's decisions are randomised
            (:func:`dynnet.testing.scramble_until_mixed`: an untrained policy of the same structure), calibrated to
            the job's budget on the validation split and measured on the test subset, so that ``achieved`` and
            ``on_budget`` say whether calibration reaches the budget on images it has not seen.
        trained_budget: recipes whose budget is calibrated and transfers (``RecipeSpec.budget.calibrated`` and
            ``.transfers``) are trained once, at this budget, and calibrated on the validation split to each other
            budget of the profile (their rows say ``trained_budget``); the trained job runs first and keeps its
            checkpoint. The other recipes are trained at every budget. ``None``: every budget is trained.
        reestimate_bn: a job calibrated from another budget's training also re-estimates the base network's
            batch-norm statistics on training images under its new decisions, then calibrates again
            (``calibrate(..., bn_data=...)``); in the settings of those jobs only.
        trained_like: with ``scrambled``, the base network's normalisation layers get the statistics and affine
            parameters of a trained network (:func:`dynnet.testing.matrix.trained_like_`) before the recipe converts
            it: deployed networks (torchvision, timm) whose weights cannot be downloaded here still run with the
            activation scales the sparse engine meets in practice.
        timing_rounds: dense and sparse are timed alternately this many times per batch size and each reports its
            median round (:func:`dynnet.bench.harness.profile_model`'s ``rounds``).
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
    families: tuple[str, ...] = ()
    recipes: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()
    scrambled: bool = False
    reestimate_bn: bool = False
    trained_like: bool = False
    timing_rounds: int = 1

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
        if self.scrambled and self.trained_budget is not None:
            raise ValueError("a scrambled profile (the budget check) trains nothing: leave trained_budget None")
        if self.trained_like and not self.scrambled:
            raise ValueError("trained_like statistics stand in for weights nobody trained: set scrambled too")
        if self.timing_rounds < 1:
            raise ValueError(f"timing_rounds must be >= 1, got {self.timing_rounds}")
        if self.extras:
            from dynnet.bench.extras import EXTRAS

            unknown = sorted(set(self.extras) - set(EXTRAS))
            if unknown:
                raise ValueError(f"unknown extras {unknown}; known: {sorted(EXTRAS)}")

    def selects(self, name: str, family: str) -> bool:
        """Whether the profile runs recipe ``name`` of ``family`` (every recipe without ``families``/``recipes``)."""
        if not self.families and not self.recipes:
            return True
        return family in self.families or name in self.recipes

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
        # A calibrated recipe is trained at 0.5 and calibrated to 0.25 and 0.75 (a third of
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

# The family profiles (they replace the family scripts benchmarks/<family>.py had): the recipes of one family, with the
# measurements that family needs (`extras`; a recipe's own `bench_metrics` run in every profile). On Fashion-MNIST
# they fine-tune from the shipped ResNet-20 like `standard`, on a shorter schedule (20,000 images × 2 epochs, 2,000
# test images), against the shipped static networks; their rows are comparable with each other, not with standard's.
_FAMILY = dataclasses.replace(
    PROFILES["standard"], subset=20_000, val_fraction=0.05, test_subset=2000, min_run_time=0.25, batch1_samples=16,
    pruned_fractions=(),
)  # fmt: skip
PROFILES |= {
    # Layer skipping and recursion; the engine's realized speedup at random (mixed) gates, whatever training did.
    "layer_skip": dataclasses.replace(
        _FAMILY, name="layer_skip", families=("layer_skip", "recursion"), extras=("scrambled_timing",)
    ),
    # Early exits: each recipe's `bench_metrics` gives every exit's accuracy and the operating points of the trained
    # cascade at budgets 0.4-0.9 (thresholds calibrated on validation, no retraining). Exits reach 0.45 at the least.
    "early_exit": dataclasses.replace(_FAMILY, name="early_exit", families=("early_exit",), budgets=(0.5, 0.75)),
    # Channel gating; each job also times the channel engine with every channel kept (`engine_ratio`).
    "channel": dataclasses.replace(_FAMILY, name="channel", families=("channel",), extras=("engine_ratio",)),
    # ConvNet-AIG alone at 0.5 on the whole test set: timing of random gates and operator tables (where time goes).
    "convnet_aig": dataclasses.replace(
        _FAMILY,
        name="convnet_aig",
        recipes=("convnet_aig",),
        budgets=(0.5,),
        test_subset=None,
        min_run_time=1.0,
        batch1_samples=32,
        extras=("scrambled_timing", "operator_profile"),
    ),
    # Spatial and block recipes where space matters: Cluttered Fashion-MNIST (64×64 canvases, one garment each),
    # from scratch (no shipped weights for it), ResNet-20 × 0.5 and narrower / shallower static networks; timed at
    # batch 16 too (the spatial kernels' target batch). PerforatedCNN builds its masks for 64×64.
    "spatial": BenchProfile(
        name="spatial",
        base="cifar_resnet20",
        width=0.5,
        dataset="cluttered_fashion_mnist",
        families=("spatial", "block"),
        subset=8000,
        val_fraction=0.02,
        test_subset=2000,
        epochs=3,
        lr=0.1,
        static_depths=(8, 20),
        static_widths=(0.35, 0.5),
        batch_sizes=(1, 16, 64),
        min_run_time=0.25,
        batch1_samples=16,
        threads=1,
        train_threads=1,
        device="cpu",
        recipe_settings=(("perforated_cnn", (("input_size", 64),)),),
        trained_budget=0.5,
    ),
    # Glimpses, resolution and mixtures of experts on the cluttered canvas (MoE on plain Fashion-MNIST; its
    # `bench_metrics` give the experts' load), from scratch with AdamW; DT-RAM (an early exit on RAM) with them.
    "glimpse": BenchProfile(
        name="glimpse",
        base="cifar_resnet8",
        width=1.0,
        dataset="cluttered_fashion_mnist",
        families=("glimpse", "resolution", "moe"),
        recipes=("dt_ram",),
        family_datasets=(("moe", "fashion_mnist"),),
        subset=7000,
        val_fraction=0.05,
        test_subset=2000,
        epochs=2,
        batch_size=64,
        lr=2e-3,
        train_overrides=(("optimizer", "adamw"), ("weight_decay", 1e-4)),
        static_depths=(8,),
        static_widths=(0.5, 1.0),
        min_run_time=0.25,
        batch1_samples=16,
        threads=1,
        train_threads=1,
        device="cpu",
        trained_budget=0.5,
    ),
    # The budget check (no training, minutes): every recipe on ResNet-20 with random decisions, calibrated to 0.5 and
    # 0.75 on ~1,000 validation images and measured on 1,024 test images; `on_budget` within 0.03 is a pass.
    "budget": BenchProfile(
        name="budget",
        base="cifar_resnet20",
        width=1.0,
        scrambled=True,
        subset=1024,
        val_fraction=0.0171,
        test_subset=1024,
        budgets=(0.5, 0.75),
        static_depths=(),
        static_widths=(),
        batch_sizes=(),
        examples=0,
        threads=1,
        train_threads=1,
        device="cpu",
    ),
}

# The speed profiles (they replace benchmarks/realized_speedup.py): how much of the MAC saving sparse mode turns into
# time on the networks people deploy, at 224 × 224. No training and no downloadable weights: the base gets a trained
# network's normalisation statistics (`trained_like`), each recipe's decisions are randomised to mixed ones
# (`scrambled`) and calibrated to the budget on half of 128 synthetic pattern images, then dense and sparse are timed
# alternately (3 rounds, each mode reports its median round). The accuracies are those of random heads: meaningless.
_SPEED = BenchProfile(
    name="speed_resnet50",
    base="resnet50",
    width=1.0,
    dataset="synthetic",
    dataset_kwargs=(("num_train", 128), ("num_test", 64), ("image_size", 224), ("in_channels", 3)),
    recipes=("convnet_aig", "fbs", "dynconv", "sbnet"),
    scrambled=True,
    trained_like=True,
    subset=None,
    val_fraction=0.5,
    test_subset=64,
    budgets=(0.5,),
    static_depths=(),
    static_widths=(),
    batch_size=32,
    batch_sizes=(1, 8),
    min_run_time=0.5,
    batch1_samples=8,
    timing_rounds=3,
    threads=1,
    train_threads=1,
    device="cpu",
    examples=0,
)
PROFILES |= {
    "speed_resnet50": _SPEED,
    "speed_mobilenet_v2": dataclasses.replace(_SPEED, name="speed_mobilenet_v2", base="mobilenet_v2"),
    "speed_resnet18": dataclasses.replace(_SPEED, name="speed_resnet18", base="resnet18", batch_sizes=(1, 8, 64)),
}
# The latency-budget profiles (they replace benchmarks/latency_budget.py; docs/latency.md): SkipNet (layer skip), batch
# shaping (channel) and SACT (spatial), whose objectives call the trace's budget loss, so that a latency budget weights
# each block by its predicted cost (ConvNet-AIG, FBS and DynConv train to a rate and would train alike under both
# budgets), at budget 0.5 with the latency model of this machine, its prediction error and
# calibration to measured milliseconds (`dynnet.bench.latency_extras`). On Fashion-MNIST they are fine-tuned from the
# shipped base (8,000 images × 2 epochs: about 6 minutes a recipe on one shared core) and then fine-tuned again, a
# few steps each, with a MAC and with a latency budget; ResNet-18 at 224 runs untrained,
# like the speed profiles, on 64 synthetic test images (batch 1; with 256, one recipe took over 40 minutes).
_LATENCY_RECIPES = ("skipnet", "batch_shaping", "sact")
PROFILES |= {
    "latency": dataclasses.replace(
        PROFILES["channel"], name="latency", families=(), recipes=_LATENCY_RECIPES, budgets=(0.5,), subset=8000,
        extras=("latency_budget",),
    ),
    "latency_resnet18": dataclasses.replace(
        _SPEED, name="latency_resnet18", base="resnet18", recipes=_LATENCY_RECIPES, batch_sizes=(1,),
        extras=("latency_model",),
    ),
}  # fmt: skip


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
        # Only when set, so that the settings of the profiles without them (and their stored rows) are unchanged.
        out |= {k: p[k] for k in ("extras", "scrambled", "trained_like") if p[k]}
        if profile.timing_rounds != 1:
            out["timing_rounds"] = profile.timing_rounds
        if self.trained_budget is not None and profile.reestimate_bn:
            out["reestimate_bn"] = True
        if self.recipe is not None:
            from dynnet.core import RECIPES
            from dynnet.core.recipe import fine_tune_settings

            out["fine_tune"] = fine_tune_settings(self.recipe, profile.epochs) if profile.init is not None else {}
            out["recipe_settings"] = dict(dict(profile.recipe_settings).get(self.recipe, ()))
            spec = RECIPES.get(self.recipe)
            if spec.revision:  # absent at 0, so that rows made before revisions existed stay current
                out["revision"] = spec.revision
            if spec.scratch:  # likewise: only the recipes that declare settings for training from scratch
                out["scratch"] = dict(spec.scratch)
        return json.loads(json.dumps(out, default=json_default))

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
        recipes: recipe names (default: the profile's ``families`` and ``recipes``, or every registered recipe at
            call time).

    Returns:
        Static jobs first (cheapest first), then recipes in name order; a recipe calibrated from
        ``profile.trained_budget`` has its trained job first (added when the budgets lack it).
    """
    import dynnet
    from dynnet.core import RECIPES

    registered = dynnet.list_recipes()  # also imports every method package (registration)
    chosen = [n for n in registered if profile.selects(n, RECIPES.get(n).family)]
    names = chosen if recipes is None else list(recipes)
    by_family = dict(profile.family_datasets)
    datasets = [profile.dataset]
    recipe_jobs: list[Job] = []
    for name in names:
        spec = RECIPES.get(name)
        data = by_family.get(spec.family, profile.dataset)
        if data not in datasets:
            datasets.append(data)
        trained = profile.trained_budget if spec.budget.calibrated and spec.budget.transfers else None
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


def json_default(x: Any) -> Any:
    """``json.dumps``'s ``default`` for results and settings: tensors as lists, anything else as text."""
    return x.tolist() if isinstance(x, Tensor) else str(x)
