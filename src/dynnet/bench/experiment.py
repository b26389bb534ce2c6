"""`run_experiment`: the "main job" — train a recipe on a dataset, test it sparse, time it, summarise.

One call builds the loaders and the model, trains with :func:`dynnet.train.fit` (validation split), evaluates
the test split in sparse mode (and in masked mode, to check that real skipping changes no prediction), times
dense vs sparse execution on real test images with :func:`dynnet.bench.harness.profile_model`, and writes
``results.json`` (with :func:`~dynnet.bench.latency.machine_info`) next to the run's checkpoint and ``log.csv``.

The default is sized for about 4-5 minutes on 2 CPU cores: ResNet-20 on 30,000 Fashion-MNIST training images
for 3 epochs (the full 54,000-image training split — 60,000 less the validation tenth — takes about 1.8× as
long: pass ``subset=None``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dynnet.bench.front import BUDGET_TOLERANCE, standard_error
from dynnet.bench.harness import profile_model
from dynnet.bench.latency import machine_info
from dynnet.core.recipe import fine_tune_settings
from dynnet.train import EvalResult, TrainConfig, build_model, evaluate, fit

__all__ = ["DEFAULT_SUBSET", "ExperimentResult", "best_static", "run_experiment", "shipped_static"]

logger = logging.getLogger("dynnet.bench")

DEFAULT_SUBSET = 30_000
"""Training images of the default run: what 3 epochs of ResNet-20 get through in ~4 minutes on 2 shared cores."""


@dataclass
class ExperimentResult:
    """The outcome of :func:`run_experiment`.

    Attributes:
        settings: the arguments of the run.
        history: :attr:`dynnet.train.FitResult.history`.
        test: the sparse-mode test :class:`~dynnet.train.EvalResult`.
        masked_accuracy: test accuracy in masked mode (equal to ``test.accuracy`` when skipping is exact).
        sparse_masked_agreement: fraction of test images whose prediction is the same in both modes.
        profile: :func:`profile_model`'s row (``{}`` when not profiled).
        machine: :func:`machine_info` at the end of the run.
        seconds: wall-clock time of training, of evaluation and of profiling.
        checkpoint: the checkpoint JSON, or ``None``.
        budget: the target MAC fraction and what was achieved: ``{"target", "val", "test", "calibrated",
            "thresholds"}`` (``val``: on the validation split after calibration; ``test``: on the test split).
        static: the shipped static networks of the same model and data, measured the same way (see
            :func:`shipped_static`; empty unless asked for).
    """

    settings: dict[str, Any]
    history: list[dict[str, Any]]
    test: EvalResult
    masked_accuracy: float
    sparse_masked_agreement: float
    profile: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    budget: dict[str, Any] = field(default_factory=dict)
    static: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: settings, test metrics, profile, machine, history, timings."""
        return {
            "settings": self.settings,
            "test": self.test.summary() | {"masked_accuracy": self.masked_accuracy,
                                           "sparse_masked_agreement": self.sparse_masked_agreement},
            "profile": self.profile,
            "machine": self.machine,
            "seconds": self.seconds,
            "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
            "budget": self.budget,
            "static": self.static,
            "history": self.history,
        }  # fmt: skip

    def summary(self) -> str:
        """A short human-readable report."""
        s, t, p = self.settings, self.test, self.profile
        max_steps = (s.get("train_overrides") or {}).get("max_steps")
        cut = f" (at most {max_steps} steps)" if max_steps is not None else ""
        lines = [
            f"dynnet: {s['model']} + {s['recipe'] or 'static'} (budget {s['budget']}) on {s['dataset']}, "
            f"{s['epochs']} epoch(s){cut}, {s['train_images']} training images, {self.seconds.get('train', 0):.0f} s",
            f"  test accuracy (sparse)  {100 * t.accuracy:.2f} %   (masked {100 * self.masked_accuracy:.2f} %, "
            f"same prediction on {100 * self.sparse_masked_agreement:.2f} % of {t.num_samples} images)",
            f"  MACs / image            {t.macs.mean() / 1e6:.2f} M theoretical = {100 * t.mac_fraction:.1f} % of "
            f"dense {t.dense_macs / 1e6:.2f} M; executed {t.executed.mean() / 1e6:.2f} M",
        ]
        if self.budget.get("target") is not None:
            b = self.budget
            val = "n/a" if b.get("val") is None else f"{b['val']:.2f}"
            how = "calibrated on validation" if b.get("calibrated") else b.get("note", "not calibrated")
            lines.append(
                f"  budget                  {b['target']:.2f} → achieved {val} (val) / {b['test']:.2f} (test)   [{how}]"
            )
        for b in s.get("batch_sizes", ()):
            if f"b{b}_dense_ms" not in p:
                continue
            unit = "ms/image" if b == 1 else "ms/batch"
            lines.append(
                f"  latency batch {b:<3}      dense {p[f'b{b}_dense_ms']:.2f} → sparse {p[f'b{b}_sparse_ms']:.2f} "
                f"{unit}: speedup ×{p[f'b{b}_latency_speedup']:.2f} for a MAC speedup ×{p[f'b{b}_mac_speedup']:.2f} "
                f"→ realized ratio {p[f'b{b}_realized_ratio']:.2f}"
            )
        if p:
            lines.append(
                f"  machine                 {self.machine.get('machine')} {self.machine.get('cpu_count')} CPUs, "
                f"{p.get('threads')} threads, load average {self.machine.get('loadavg_1m')} (shared: timings are noisy)"
            )
        if self.static:
            lines.append(self.side_by_side())
        return "\n".join(lines)

    def dynamic_row(self) -> dict[str, Any]:
        """This run as a row of :meth:`side_by_side`."""
        s, t, p = self.settings, self.test, self.profile
        return {
            "name": f"dynamic {s['recipe']} (budget {s['budget']})" if s["recipe"] else f"static {s['model']}",
            "accuracy": t.accuracy, "test_images": t.num_samples, "macs": float(t.macs.mean()),
            "mac_fraction": t.mac_fraction, **{k: p[k] for k in ("b1_sparse_ms", "b64_sparse_ms") if k in p},
            **{k: p[k] for k in ("b1_realized_ratio", "b64_realized_ratio") if k in p},
        }  # fmt: skip

    def side_by_side(self) -> str:
        """The dense base, the best static network at the dynamic model's MACs, and the dynamic model: accuracy
        (± 2 standard errors), MACs and latency, then a one-line verdict."""
        dyn = self.dynamic_row()
        best = best_static(self.static, dyn["mac_fraction"])
        dense = max(self.static, key=lambda r: r["mac_fraction"])
        rows = [("dense base", dense), *([("best static ≤ its MACs", best)] if best else []), ("dynamic", dyn)]
        head = f"  {'':<24}{'network':<44}{'test accuracy':>18}{'MACs / image':>20}{'batch 1':>11}{'batch 64':>11}"
        lines = ["", "  side by side (same test images; latency in sparse mode for the dynamic model):", head]
        for label, r in rows:
            se = 2 * standard_error(r["accuracy"], r["test_images"])
            b1 = f"{r['b1_sparse_ms']:.2f} ms" if "b1_sparse_ms" in r else "–"
            b64 = f"{r['b64_sparse_ms']:.1f} ms" if "b64_sparse_ms" in r else "–"
            acc = f"{100 * r['accuracy']:.2f} ± {se:.2f} %"
            macs = f"{r['macs'] / 1e6:.2f} M ({100 * r['mac_fraction']:.0f} %)"
            lines.append(f"  {label:<24}{r['name']:<44}{acc:>18}{macs:>20}{b1:>11}{b64:>11}")
        if best is None:
            lines.append("  verdict: no shipped static network at or below the dynamic model's MACs")
        else:
            gap = 100 * (dyn["accuracy"] - best["accuracy"])
            se = math.hypot(*(standard_error(r["accuracy"], r["test_images"]) for r in (dyn, best)))
            word = "above" if gap > 2 * se else "below" if gap < -2 * se else "level with (within 2 SE of)"
            lines.append(
                f"  verdict: the dynamic model is {gap:+.2f} points, {word} the best static network at "
                f"{100 * best['mac_fraction']:.0f} % of the dense MACs (it spends {100 * dyn['mac_fraction']:.0f} %)"
            )
        return "\n".join(lines)


def run_experiment(
    model: str = "cifar_resnet20",
    recipe: str | None = "convnet_aig",
    budget: float | None = 0.5,
    dataset: str = "fashion_mnist",
    epochs: int = 3,
    batch_size: int = 128,
    lr: float = 0.1,
    subset: int | None = DEFAULT_SUBSET,
    out_dir: str | Path | None = "runs/quickstart",
    seed: int = 0,
    *,
    data_root: str | Path | None = None,
    val_fraction: float = 0.1,
    threads: int | None = None,
    profile: bool = True,
    batch_sizes: tuple[int, ...] = (1, 64),
    min_run_time: float = 1.0,
    progress: bool = False,
    train_overrides: dict[str, Any] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    dataset_kwargs: dict[str, Any] | None = None,
    init: Any = None,
    distill: float = 0.0,
    compare_static: bool = False,
) -> ExperimentResult:
    """Train, test and time one recipe.

    Args:
        model: base network name (``dynnet.list_models()``, torchvision, ``timm/<name>``).
        recipe: recipe name, or ``None`` for the static base network.
        budget: the recipe's budget (``None``: the recipe's default).
        dataset: registered dataset name; ``in_channels`` and ``num_classes`` of the model come from it.
        epochs: training epochs.
        batch_size: training and evaluation batch size.
        lr: peak SGD learning rate (cosine schedule).
        subset: training images (``None``: the whole training split less validation).
        out_dir: where the checkpoint, ``log.csv`` and ``results.json`` go (``None``: nowhere).
        seed: seeds the model initialisation, the data split and the training order.
        data_root: where to look for the dataset first.
        val_fraction: fraction of the training split held out for validation.
        threads: torch CPU threads for training and timing (``None``: leave torch's setting).
        profile: time dense vs sparse execution.
        batch_sizes: batch sizes for the timing.
        min_run_time: seconds of measurement per timed configuration.
        progress: tqdm progress bar.
        train_overrides: extra :class:`~dynnet.train.TrainConfig` fields (``tau_start``, ``budget_start``...).
        model_kwargs: extra arguments of the model builder / recipe config (``width``, ``hidden``...).
        dataset_kwargs: extra arguments of the dataset builder.
        init: trained base weights to fine-tune from (``fit``'s ``init``: a ``.safetensors`` file, a folder with
            ``model.safetensors``, a static checkpoint, ``torchvision:NAME``, ``timm:NAME``). With it the recipe
            fine-tunes with :func:`~dynnet.core.recipe.fine_tune_settings` (budget annealed from 1, decision layers
            at a higher learning rate) unless ``train_overrides`` says otherwise.
        distill: weight of the distillation loss from the dense base (``TrainConfig.distill``).
        compare_static: also test and time the shipped static networks of ``model`` on ``dataset``
            (:func:`shipped_static`); the summary then shows them side by side with this run.

    Returns:
        :class:`ExperimentResult` (also written to ``out_dir/results.json``).
    """
    from dynnet.data import build_loaders

    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    loaders = build_loaders(
        dataset, root=data_root, batch_size=batch_size, val_fraction=val_fraction, seed=seed, subset=subset,
        **(dataset_kwargs or {}),
    )  # fmt: skip
    info = loaders.info
    kwargs = {"in_channels": info.in_channels, "num_classes": info.num_classes, **(model_kwargs or {})}
    if recipe is not None and budget is not None:
        kwargs["budget"] = budget
    net = build_model(model, recipe, **kwargs)
    settings: dict[str, Any] = {
        "model": model, "recipe": recipe, "budget": budget, "dataset": dataset, "epochs": epochs,
        "batch_size": batch_size, "lr": lr, "subset": subset, "train_images": len(loaders.train.dataset),
        "seed": seed, "batch_sizes": list(batch_sizes), "model_kwargs": model_kwargs or {},
        "train_overrides": train_overrides or {}, "init": None if init is None else str(init), "distill": distill,
    }  # fmt: skip
    warm = fine_tune_settings(recipe, epochs) if init is not None else {}
    config = TrainConfig(
        **{"epochs": epochs, "lr": lr, "seed": seed, "out_dir": out_dir, "progress": progress, "distill": distill,
           **warm, **(train_overrides or {})}
    )  # fmt: skip

    seconds: dict[str, float] = {}
    start = time.perf_counter()
    result = fit(net, loaders.train, config, val_loader=loaders.val, init=init)
    seconds["train"] = time.perf_counter() - start

    start = time.perf_counter()
    test = evaluate(net, loaders.test, mode="sparse")
    masked = evaluate(net, loaders.test, mode="masked")
    agreement = float((test.logits.argmax(1) == masked.logits.argmax(1)).double().mean())
    if agreement < 1.0:
        logger.warning("sparse and masked execution disagree on %.3f %% of test images", 100 * (1 - agreement))
    seconds["evaluate"] = time.perf_counter() - start

    row: dict[str, Any] = {}
    if profile:
        start = time.perf_counter()
        device = next(net.parameters()).device
        images = torch.cat([x for x, _ in _first_batches(loaders.test, max(max(batch_sizes), 32))]).to(device)
        row = profile_model(net, images, batch_sizes=batch_sizes, threads=threads, min_run_time=min_run_time)
        seconds["profile"] = time.perf_counter() - start

    target = getattr(net, "budget", None)
    budget_row: dict[str, Any] = {}
    if target is not None:
        cal = result.calibration
        budget_row = {
            "target": float(target), "val": None if result.val is None else result.val.mac_fraction,
            "test": test.mac_fraction, "calibrated": cal is not None,
            "thresholds": {} if cal is None else dict(cal.thresholds),
            "uncalibrated_val": None if cal is None else cal.before,
        }  # fmt: skip
        if cal is None:
            budget_row["note"] = result.calibration_error or "recipe not calibrated"
    out = ExperimentResult(
        settings=settings, history=result.history, test=test, masked_accuracy=masked.accuracy,
        sparse_masked_agreement=agreement, profile=row, machine=machine_info(), seconds=seconds,
        checkpoint=result.checkpoint, budget=budget_row,
    )  # fmt: skip
    if compare_static:
        start = time.perf_counter()
        out.static = shipped_static(
            model, dataset, loaders, dense_macs=test.dense_macs, profile=profile, batch_sizes=batch_sizes,
            threads=threads, min_run_time=min_run_time,
        )  # fmt: skip
        seconds["static"] = time.perf_counter() - start
    if out_dir is not None:
        path = Path(out_dir) / "results.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out.as_dict(), indent=1, default=str))
    return out


def shipped_static(
    model: str,
    dataset: str,
    loaders: Any,
    *,
    dense_macs: float | None = None,
    profile: bool = True,
    batch_sizes: tuple[int, ...] = (1, 64),
    threads: int | None = None,
    min_run_time: float = 1.0,
) -> list[dict[str, Any]]:
    """Every static network of ``model`` trained on ``dataset`` that :mod:`dynnet.zoo` ships (the dense base, the
    narrower ones, the pruned ones), tested on ``loaders.test`` and timed like a dynamic run.

    Returns:
        One row per entry: ``name`` (the zoo key), ``accuracy``, ``test_images``, ``macs``, ``mac_fraction`` (of
        ``dense_macs``, default the dense base's), ``b{B}_sparse_ms`` (the static network's latency) and its
        manifest's ``command``.
    """
    from dynnet import zoo

    rows = []
    images = torch.cat([x for x, _ in _first_batches(loaders.test, max(max(batch_sizes), 32))]) if profile else None
    for key, manifest in zoo.shipped().items():
        if manifest.get("model") != model or manifest.get("data") != dataset:
            continue
        net = zoo.load(key)
        result = evaluate(net, loaders.test, mode="dense")
        row: dict[str, Any] = {"name": key, "accuracy": result.accuracy, "test_images": result.num_samples,
                               "macs": float(result.macs.mean()), "command": manifest.get("command")}  # fmt: skip
        if images is not None:
            timed = profile_model(net, images, batch_sizes=batch_sizes, threads=threads, min_run_time=min_run_time)
            row.update({f"b{b}_sparse_ms": timed[f"b{b}_dense_ms"] for b in batch_sizes})
        rows.append(row)
    dense = dense_macs or max((r["macs"] for r in rows), default=1.0)
    for r in rows:
        r["mac_fraction"] = r["macs"] / dense
    return rows


def best_static(
    rows: list[dict[str, Any]], mac_fraction: float, tolerance: float = BUDGET_TOLERANCE
) -> dict[str, Any] | None:
    """The most accurate static row that spends at most ``mac_fraction`` (+ ``tolerance``, the budget tolerance of
    the benchmark) of the dense MACs, or ``None``."""
    fit_rows = [r for r in rows if r["mac_fraction"] <= mac_fraction + tolerance]
    return max(fit_rows, key=lambda r: r["accuracy"], default=None)


def _first_batches(loader, n: int):
    got = 0
    for x, y in loader:
        yield x, y
        got += x.shape[0]
        if got >= n:
            return
