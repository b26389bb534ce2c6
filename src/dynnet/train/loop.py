"""`fit`: the training loop — short and explicit; everything optional lives in hooks."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from dynnet.core import DynamicModel, set_mode, set_tau, trace
from dynnet.train.checkpoint import RUN_CHECKPOINT, checkpoint_paths, load_checkpoint, set_rng_state
from dynnet.train.config import TrainConfig
from dynnet.train.distributed import all_reduce_sum, init_distributed, is_main_process, world_size
from dynnet.train.evaluate import EvalResult, evaluate
from dynnet.train.hooks import BudgetTracking, Checkpoint, CSVLogger, FitState, GateHealth, Hook, TensorBoardLogger
from dynnet.train.init import distillation_loss, frozen_teacher, load_init, teacher_logits
from dynnet.train.schedules import budget_at, lr_factor, tau_at

__all__ = ["FitResult", "build_optimizer", "fit"]

logger = logging.getLogger("dynnet.train")
CHECKPOINT_NAME = RUN_CHECKPOINT  # checkpoint_paths(out_dir) finds it


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        history: one dict per epoch (train loss and its parts, accuracy, MAC fraction, lr, tau, budget,
            validation metrics, gate rates and ``collapsed_gates``).
        val: the last validation :class:`EvalResult` (``None`` without ``val_loader``).
        checkpoint: the JSON path of the last checkpoint written (``None`` without ``out_dir``).
        calibration: the end-of-training :class:`~dynnet.CalibrationReport` on the validation split (``None``
            when not calibrated; ``calibration_error`` then says why, if it was tried).
        calibration_error: the one-line reason a calibration that was tried failed (budget out of reach).
    """

    history: list[dict[str, Any]]
    val: EvalResult | None
    checkpoint: Path | None
    calibration: Any = None
    calibration_error: str | None = None


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW; weight decay on weights with ≥ 2 dims only (not on BN parameters and biases); a converted
    model's decision parameters at ``config.decision_lr_scale`` times the learning rate (groups after the base's)."""
    decision: set[int] = set()
    if config.decision_lr_scale != 1.0 and isinstance(model, DynamicModel):
        decision = {id(p) for p in model.decision_parameters()}
    groups = []
    for scale, chosen in ((1.0, False), (config.decision_lr_scale, True)):
        params = [p for p in model.parameters() if p.requires_grad and (id(p) in decision) == chosen]
        for decayed in (True, False):
            part = [p for p in params if (p.dim() >= 2) == decayed]
            if part or not chosen:
                groups.append({
                    "params": part, "weight_decay": config.weight_decay if decayed else 0.0, "lr": config.lr * scale,
                })  # fmt: skip
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0
        )
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.momentum, 0.999))


def _seed_epoch_order(loader: Iterable, seed: int, epoch: int) -> bool:
    """Make the shuffling of ``epoch`` a function of (seed, epoch) only; returns whether it could."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)  # DistributedSampler shuffles with seed + epoch
        return True
    if isinstance(sampler, RandomSampler):
        if sampler.generator is None:
            sampler.generator = torch.Generator()
        sampler.generator.manual_seed(seed * 1_000_003 + epoch)
        return True
    return not isinstance(loader, DataLoader) or not _shuffles(loader)


def _shuffles(loader: DataLoader) -> bool:
    return not isinstance(loader.sampler, torch.utils.data.SequentialSampler)


def _loss(model: nn.Module, logits: Tensor, y: Tensor, t: Any, budget: float | None) -> tuple[Tensor, dict[str, float]]:
    if isinstance(model, DynamicModel):
        out = model.compute_loss(logits, y, t, budget)
        return out.total, dict(out.parts)
    loss = F.cross_entropy(logits, y)
    return loss, {"task": float(loss.detach())}


def fit(
    model: nn.Module,
    train_loader: Iterable[tuple[Tensor, Tensor]],
    config: TrainConfig,
    *,
    val_loader: Iterable[tuple[Tensor, Tensor]] | None = None,
    hooks: Sequence[Hook] = (),
    init: Any = None,
    teacher: nn.Module | None = None,
    budget_ms: float | None = None,
    latency_model: Any = None,
) -> FitResult:
    """Train ``model`` on ``train_loader``.

    Each step: ``model.train()`` in masked mode, ``with dynnet.trace() as t: logits = model(x)``, then
    ``model.compute_loss(logits, y, t, budget_now)`` for a :class:`~dynnet.DynamicModel` (the recipe's objective)
    or cross-entropy for a static module, backward, optional gradient clipping, optimiser and LR-scheduler step.
    Before each step the estimator temperature (:func:`dynnet.set_tau`) and the budget target follow their
    schedules (:mod:`dynnet.train.schedules`). After each epoch the model is evaluated on ``val_loader`` in
    ``config.eval_mode``.

    Launched by ``torchrun`` (``WORLD_SIZE`` > 1), the process group is initialised if needed, the model is
    wrapped in ``DistributedDataParallel``, ``DistributedSampler``s get ``set_epoch`` and only rank 0 writes.

    The model is left in eval mode at the end (its dynamic blocks in the validation mode if there was
    validation, else masked).

    Args:
        model: a ``DynamicModel`` or any classifier.
        train_loader: batches ``(Tensor[B, C, H, W], Tensor[B])``; its shuffling is reseeded per epoch from
            ``(config.seed, epoch)`` so that runs and resumed runs see the same order.
        config: :class:`TrainConfig`.
        val_loader: optional validation batches.
        hooks: extra :class:`Hook`\\ s (run after :class:`GateHealth` and :class:`BudgetTracking` when
            ``config.track_budget_every`` is set, before the loggers and the checkpoint).
        init: trained base weights to start from (:func:`dynnet.train.init.load_init`: a module, a state_dict, a
            ``.safetensors`` file, a checkpoint of a static network, ``torchvision:NAME``, ``timm:NAME``); a
            converted model keeps its gates (they still start open).
        teacher: the network to distil from when ``config.distill > 0`` (default: a frozen dense copy of ``model``
            taken after ``init``).
        budget_ms: train to a latency budget instead of a MAC budget: the mean predicted latency per image (ms) on the
            machine ``latency_model`` was profiled on. The budget schedule then anneals the fraction of the dense
            network's predicted latency (``budget_ms / dense_ms``), every budget loss reads predicted latency (see
            :meth:`~dynnet.DynamicModel.set_latency_model_`), and the MAC calibration at the end and budget tracking
            are skipped: calibrate to the measured latency with ``dynnet.calibrate(model, data, budget_ms=...)``.
        latency_model: the :class:`~dynnet.core.latency.LatencyModel` (default: the model's own, from ``convert``).

    Returns:
        :class:`FitResult`.
    """
    device = init_distributed(config.device)
    torch.manual_seed(config.seed)
    if init is not None:
        load_init(model, init)
    model = model.to(device)
    if config.distill > 0:
        teacher = (frozen_teacher(model) if teacher is None else teacher).to(device).eval()
    optimizer = build_optimizer(model, config)
    steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    if steps_per_epoch == 0:
        raise ValueError("fit: the training loader is empty")
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps=warmup_steps, cosine=config.cosine)
    )
    target_budget = config.budget if config.budget is not None else getattr(model, "budget", None)
    if budget_ms is not None or latency_model is not None:
        if not isinstance(model, DynamicModel):
            raise TypeError(f"budget_ms needs a converted model (dynnet.convert), got {type(model).__name__}")
        model.set_latency_model_(latency_model or model.latency_model, budget_ms if budget_ms else model.budget_ms)
    latency_budget = model.latency_budget if isinstance(model, DynamicModel) else None
    if latency_budget is not None:  # the schedule anneals a fraction of the dense predicted latency
        target_budget = latency_budget

    out_dir = Path(config.out_dir) if config.out_dir is not None else None
    main = is_main_process()
    all_hooks: list[Hook] = [GateHealth()]
    if config.track_budget_every and _calibrated(model) and target_budget is not None and latency_budget is None:
        all_hooks.append(BudgetTracking(config.track_budget_every, mode=config.track_budget))
    all_hooks.extend(hooks)
    ckpt_hook: Checkpoint | None = None
    if out_dir is not None:
        all_hooks.append(CSVLogger(out_dir / "log.csv"))
        with contextlib.suppress(ImportError):
            all_hooks.append(TensorBoardLogger(out_dir / "tb"))
        ckpt_hook = Checkpoint(out_dir / CHECKPOINT_NAME, config.checkpoint_every_steps)
        all_hooks.append(ckpt_hook)
    state = FitState(
        config=config, model=model, optimizer=optimizer, scheduler=scheduler, steps_per_epoch=steps_per_epoch,
        total_steps=total_steps, is_main=main, out_dir=out_dir, hooks=all_hooks,
    )  # fmt: skip

    resume_rng: dict[str, Any] | None = None
    if config.resume and out_dir is not None and checkpoint_paths(out_dir / CHECKPOINT_NAME)[0].exists():
        resume_rng = _resume(state, out_dir / CHECKPOINT_NAME)

    net: nn.Module = model
    if world_size() > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=config.find_unused_parameters,
        )  # fmt: skip

    progress = None
    if config.progress and main:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, initial=state.step, desc="train", dynamic_ncols=True)

    for h in all_hooks:
        h.on_fit_start(state)
    val_result: EvalResult | None = None
    while state.epoch < config.epochs and state.step < total_steps:
        if not _seed_epoch_order(train_loader, config.seed, state.epoch) and state.batch_in_epoch:
            logger.warning("resuming mid-epoch with a loader whose order fit cannot reseed: the order may differ")
        net.train()  # the DDP wrapper and the model
        set_mode(model, "masked")
        if state.batch_in_epoch == 0:
            state.meter = {}
        for h in all_hooks:
            h.on_epoch_start(state)
        started = time.perf_counter()
        batches = iter(train_loader)
        for _ in range(state.batch_in_epoch):
            next(batches)  # trained on before the interruption (same order: reseeded above)
        if resume_rng is not None:
            # The skipped batches consumed random numbers (augmentation): continue from the saved states.
            set_rng_state(resume_rng)
            resume_rng = None
        for x, y in batches:
            _train_step(state, net, model, x.to(device), y.to(device), target_budget, teacher)
            state.batch_in_epoch += 1
            state.step += 1
            if progress is not None:
                progress.update(1)
                if state.step % config.log_every == 0:
                    progress.set_postfix({k: f"{v:.3g}" for k, v in state.step_log.items()})
            if state.step % config.log_every == 0 and main:
                logger.info("step %d/%d %s", state.step, total_steps, _fmt(state.step_log))
            for h in all_hooks:
                h.on_step_end(state)
            state.trace = state.inputs = None
            if state.step >= total_steps:
                break
        epoch_log = _epoch_log(state, time.perf_counter() - started)
        if val_loader is not None:
            val_result = evaluate(model, val_loader, mode=config.eval_mode, device=device)
            epoch_log.update({f"val_{k}": v for k, v in val_result.summary().items() if k != "mode"})
        state.logs.append(epoch_log)
        if main:
            logger.info(
                "epoch %d %s",
                state.epoch,
                _fmt({k: v for k, v in epoch_log.items() if not isinstance(v, (dict, list))}),
            )
        for h in all_hooks:
            h.on_epoch_end(state)
        state.epoch += 1
        state.batch_in_epoch = 0
        state.meter = {}
    if progress is not None:
        progress.close()
    calibration, error = None, None
    if latency_budget is None and _should_calibrate(model, config, val_loader, target_budget):
        calibration, error = _calibrate(model, val_loader, target_budget, config.calibrate_tolerance)
        if calibration is not None:
            val_result = evaluate(model, val_loader, mode=config.eval_mode, device=device)
            if state.logs:
                state.logs[-1] = {**state.logs[-1], **_calibration_log(calibration, val_result)}
            if ckpt_hook is not None:
                ckpt_hook.save(state)  # the thresholds are model state: the final checkpoint carries them
    for h in all_hooks:
        h.on_fit_end(state)
    model.eval()
    return FitResult(
        history=state.logs, val=val_result, checkpoint=ckpt_hook.last if ckpt_hook else None,
        calibration=calibration, calibration_error=error,
    )  # fmt: skip


def _calibrated(model: nn.Module) -> bool:
    """Whether ``model`` is a converted model whose recipe declares a calibration knob."""
    from dynnet.core import RECIPES

    if not isinstance(model, DynamicModel):
        return False
    return model.recipe not in RECIPES or RECIPES.get(model.recipe).budget.calibrated


def _should_calibrate(model: nn.Module, config: TrainConfig, val_loader: Any, budget: float | None) -> bool:
    return config.calibrate and val_loader is not None and budget is not None and _calibrated(model)


def _calibrate(model: DynamicModel, val_loader: Any, budget: float, tolerance: float) -> tuple[Any, str | None]:
    """Calibrate on the validation split; a budget out of reach is logged (with the range), not raised, so that a
    finished training run is never lost to it."""
    from dynnet.calibration import calibrate

    try:
        report = calibrate(model, val_loader, budget, tolerance=tolerance)
    except ValueError as err:
        logger.warning("calibration to budget %.3f failed: %s", budget, err)
        return None, str(err)
    logger.info("calibrated on the validation split: %s", report.summary())
    if not report.within_tolerance:
        logger.warning("calibration missed: budget %.3f, achieved %.3f on validation", budget, report.mac_fraction)
    return report, None


def _calibration_log(report: Any, val: EvalResult) -> dict[str, Any]:
    """The calibrated validation metrics, for the last epoch's log entry."""
    out: dict[str, Any] = {
        "calibrated_budget": report.budget,
        "calibrated_val_mac_fraction": report.mac_fraction,
        "uncalibrated_val_mac_fraction": report.before,
        "calibration_thresholds": dict(report.thresholds),
    }
    out.update({f"val_{k}": v for k, v in val.summary().items() if k != "mode"})
    return out


def _train_step(
    state: FitState,
    net: nn.Module,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    target_budget: float | None,
    teacher: nn.Module | None = None,
) -> None:
    config = state.config
    progress = state.step / max(1, state.total_steps)
    log: dict[str, float] = {"lr": state.optimizer.param_groups[0]["lr"]}
    if config.tau_start is not None:
        tau = tau_at(progress, config.tau_start, config.tau_end, kind=config.tau_schedule)
        set_tau(model, tau)
        log["tau"] = tau
    budget = budget_at(
        state.step / state.steps_per_epoch, target_budget, start=config.budget_start,
        warmup_epochs=config.budget_warmup_epochs,
    )  # fmt: skip
    if budget is not None:
        log["budget"] = budget
        if config.budget_start is not None and isinstance(model, DynamicModel):
            model.follow_budget_(budget)  # recipes whose knob is fixed by the budget anneal it (FBS's density)
    with trace() as t:
        logits = net(x)
    loss, parts = _loss(model, logits, y, t, budget)
    if state.budget_multiplier > 0 and budget is not None and t.entries:  # BudgetTracking's "lagrange" mode
        excess = t.mac_fraction().mean() - budget
        loss = loss + state.budget_multiplier * excess
        parts["lagrange"] = float(state.budget_multiplier * excess.detach())
    if teacher is not None and config.distill > 0:
        kd = distillation_loss(logits, teacher_logits(teacher, x), config.distill_temperature)
        loss = loss + config.distill * kd
        parts["distill"] = float(kd.detach())
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite training loss at step {state.step}: {parts}")
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip is not None:
        log["grad_norm"] = float(nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip))
    state.optimizer.step()
    state.scheduler.step()

    n = x.shape[0]
    log["loss"] = float(loss.detach())
    # A loss part named like a logged setting (the "budget" loss term vs the budget target) keeps the target.
    log.update({(f"loss_{k}" if k in log else k): v for k, v in parts.items()})
    correct = float((logits.detach().argmax(1) == y).sum())
    m = state.meter
    m["n"] = m.get("n", 0.0) + n
    m["correct"] = m.get("correct", 0.0) + correct
    for k, v in parts.items():
        m[f"sum_{k}"] = m.get(f"sum_{k}", 0.0) + v * n
    m["sum_loss"] = m.get("sum_loss", 0.0) + log["loss"] * n
    if t.entries:
        frac = float(t.macs().detach().sum()) / t.dense_macs()
        m["sum_mac_fraction"] = m.get("sum_mac_fraction", 0.0) + frac
        log["mac_fraction"] = frac / n
    state.step_log = log
    state.trace = t
    state.inputs = x


def _epoch_log(state: FitState, seconds: float) -> dict[str, Any]:
    keys = sorted(state.meter)
    values = all_reduce_sum(torch.tensor([state.meter[k] for k in keys], dtype=torch.float64))
    m = dict(zip(keys, values.tolist(), strict=True))
    n = max(1.0, m.get("n", 0.0))
    log: dict[str, Any] = {"epoch": state.epoch, "step": state.step}
    log["train_loss"] = m.get("sum_loss", math.nan) / n
    for k in keys:
        if k.startswith("sum_") and k not in ("sum_loss", "sum_mac_fraction"):
            log[f"train_{k[4:]}"] = m[k] / n
    log["train_accuracy"] = m.get("correct", 0.0) / n
    if "sum_mac_fraction" in m:
        log["train_mac_fraction"] = m["sum_mac_fraction"] / n
    log["lr"] = state.step_log.get("lr", math.nan)
    for k in ("tau", "budget"):
        if k in state.step_log:
            log[k] = state.step_log[k]
    log["seconds"] = round(seconds, 2)
    return log


def _resume(state: FitState, path: Path) -> dict[str, Any] | None:
    """Load the checkpoint into ``state``; returns the RNG states to set after the skipped batches, if any."""
    _, meta = load_checkpoint(path, state.model, optimizer=state.optimizer, scheduler=state.scheduler)
    s = meta["state"]
    state.epoch = int(s["epoch"])
    state.batch_in_epoch = int(s["batch_in_epoch"])
    state.step = int(s["step"])
    state.logs = list(s.get("history") or [])
    state.meter = dict(s.get("meter") or {})
    hook_states = s.get("hooks") or {}
    for i, h in enumerate(state.hooks):
        key = f"{i}:{type(h).__name__}"
        if key in hook_states:
            h.load_state_dict(hook_states[key])
    logger.info("resumed from %s at epoch %d, batch %d, step %d", path, state.epoch, state.batch_in_epoch, state.step)
    if state.batch_in_epoch:
        return meta["rng"]
    set_rng_state(meta["rng"])
    return None


def _fmt(d: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())
