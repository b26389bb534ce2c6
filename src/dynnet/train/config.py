"""`TrainConfig`: every setting of :func:`dynnet.train.fit`, with the reason for its default."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["TrainConfig"]

OPTIMIZERS = ("sgd", "adamw")
TAU_SCHEDULES = ("exponential", "linear")
EVAL_MODES = ("sparse", "masked", "dense")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run.

    Attributes:
        epochs: passes over the training loader.
        lr: peak learning rate (after warmup). 0.1 is the CIFAR-ResNet SGD default.
        momentum: SGD momentum (or AdamW beta1): 0.9, the value of the papers we reproduce.
        weight_decay: L2 penalty, applied to weights with ≥ 2 dims only — decaying BN scales and biases
            hurts small networks and is not what the ResNet papers do.
        optimizer: ``"sgd"`` (the papers' choice for ResNets) or ``"adamw"`` (robust for short fine-tunes).
        nesterov: Nesterov momentum for SGD.
        cosine: cosine learning-rate decay to 0 over the run (step-wise, so a short run still anneals).
        warmup_epochs: linear learning-rate warmup (fractional epochs allowed); stabilises fresh gates.
        budget: target of the budget loss (fraction of dense MACs or execution rate); ``None``: the model's own.
        budget_start: if set, the target is annealed linearly from ``budget_start`` to ``budget`` over
            ``budget_warmup_epochs`` — starting from an open network (1.0) avoids collapsing gates at step 0.
        budget_warmup_epochs: length of that annealing, in (fractional) epochs.
        tau_start: estimator temperature at step 0; ``None`` leaves each block's own ``tau`` untouched.
        tau_end: temperature at the last step; ``None``: constant ``tau_start``.
        tau_schedule: ``"exponential"`` (geometric interpolation, the usual Gumbel annealing) or ``"linear"``.
        max_steps: stop after this many optimiser steps in total (tests, quick runs); the schedules are laid
            out over ``min(epochs × len(loader), max_steps)`` steps.
        log_every: log a training line every this many steps (``logging`` at INFO, progress bar postfix).
        out_dir: where ``log.csv``, TensorBoard events (if installed) and checkpoints go; ``None``: nowhere.
        checkpoint_every_steps: also checkpoint every this many steps (0: at the end of each epoch only).
        resume: continue from ``out_dir/checkpoint`` when it exists (same epoch, step and batch).
        seed: seeds torch's global RNG and the per-epoch shuffling, so that runs and resumed runs repeat.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; ``None``: ``cuda:<LOCAL_RANK>`` if CUDA is available.
        grad_clip: clip the global gradient norm to this value (``None``: no clipping).
        progress: show a tqdm progress bar (rank 0 only).
        eval_mode: execution mode of the per-epoch validation (``"sparse"``: what inference really runs).
        distill: weight of the knowledge-distillation loss (soft targets of a teacher, Hinton et al. 2015) added to
            the recipe's objective; 0 switches it off. The teacher is ``fit``'s ``teacher`` argument, by default a
            frozen copy of the model in dense mode taken at the start of training (the trained base network).
        distill_temperature: the softmax temperature of that loss.
        decision_lr_scale: learning-rate multiplier of a converted model's decision parameters (gates, policies,
            saliency predictors, exit heads, experts: :meth:`dynnet.DynamicModel.decision_parameters`). Fine-tuning
            a trained base wants a small learning rate for the trained weights and a large one for the fresh
            decision layers, the usual practice for new layers on a pretrained network; 1 treats them alike.
        calibrate: at the end of training, move the recipe's decision thresholds on the validation split so that
            the mean MAC fraction equals the budget (:func:`dynnet.calibrate`); skipped without validation data,
            without a budget, or for recipes whose budget is not calibrated (``RecipeSpec.budget``).
        calibrate_tolerance: the tolerance of that calibration (MAC fraction on the validation split).
        track_budget_every: every this many steps, move the recipe's calibration knob so that the model runs at the
            step's (annealed) budget on the last training batches (:class:`~dynnet.train.hooks.BudgetTracking`);
            0: never. Only for a converted model whose recipe is calibrated, with a budget; the default of a
            fine-tune from a trained base (:data:`dynnet.core.recipe.FINE_TUNE_DEFAULTS`).
        track_budget: how: ``"knob"`` (the calibration knob is set on the last training batches) or ``"lagrange"``
            (a Lagrange multiplier of the budget constraint, moved by dual ascent, weighs the differentiable MAC
            fraction in the loss: for recipes whose estimator's gradient undoes a moved threshold) or ``"both"``. See
            :class:`~dynnet.train.hooks.BudgetTracking`.
        find_unused_parameters: passed to ``DistributedDataParallel``. Training runs in masked mode, where every
            parameter takes part in every step, so the default ``False`` is right; recipes whose training skips
            parameters (e.g. exits not evaluated) need ``True``.
    """

    epochs: int = 1
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    nesterov: bool = True
    cosine: bool = True
    warmup_epochs: float = 0.0
    budget: float | None = None
    budget_start: float | None = None
    budget_warmup_epochs: float = 0.0
    tau_start: float | None = None
    tau_end: float | None = None
    tau_schedule: str = "exponential"
    max_steps: int | None = None
    log_every: int = 50
    out_dir: str | Path | None = None
    checkpoint_every_steps: int = 0
    resume: bool = False
    seed: int = 0
    device: str | None = "cpu"
    grad_clip: float | None = None
    progress: bool = False
    eval_mode: str = "sparse"
    find_unused_parameters: bool = False
    distill: float = 0.0
    distill_temperature: float = 4.0
    decision_lr_scale: float = 1.0
    calibrate: bool = True
    calibrate_tolerance: float = 0.01
    track_budget_every: int = 0
    track_budget: str = "knob"

    def __post_init__(self) -> None:
        _positive_int("epochs", self.epochs)
        if self.max_steps is not None:
            _positive_int("max_steps", self.max_steps)
        _positive_int("log_every", self.log_every)
        if self.track_budget not in ("knob", "lagrange", "both"):
            raise ValueError(f"track_budget must be 'knob', 'lagrange' or 'both', got {self.track_budget!r}")
        if not isinstance(self.track_budget_every, int) or self.track_budget_every < 0:
            raise ValueError(f"track_budget_every must be an int >= 0, got {self.track_budget_every!r}")
        if not isinstance(self.checkpoint_every_steps, int) or self.checkpoint_every_steps < 0:
            raise ValueError(f"checkpoint_every_steps must be an int >= 0, got {self.checkpoint_every_steps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.tau_schedule not in TAU_SCHEDULES:
            raise ValueError(f"tau_schedule must be one of {TAU_SCHEDULES}, got {self.tau_schedule!r}")
        if self.eval_mode not in EVAL_MODES:
            raise ValueError(f"eval_mode must be one of {EVAL_MODES}, got {self.eval_mode!r}")
        for name in ("budget", "budget_start"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be a fraction in (0, 1], got {value!r}")
        for name in ("tau_start", "tau_end"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        if self.tau_end is not None and self.tau_start is None:
            raise ValueError("tau_end needs tau_start")
        if self.warmup_epochs < 0 or self.budget_warmup_epochs < 0:
            raise ValueError("warmup_epochs and budget_warmup_epochs must be >= 0")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive, got {self.grad_clip!r}")
        if not self.distill >= 0 or not self.distill_temperature > 0:
            raise ValueError(
                f"distill must be >= 0 and distill_temperature > 0, got {self.distill!r}, {self.distill_temperature!r}"
            )
        if not self.decision_lr_scale > 0:
            raise ValueError(f"decision_lr_scale must be positive, got {self.decision_lr_scale!r}")
        if not 0 < self.calibrate_tolerance < 1:
            raise ValueError(f"calibrate_tolerance must be in (0, 1), got {self.calibrate_tolerance!r}")
        if self.resume and self.out_dir is None:
            raise ValueError("resume=True needs out_dir (where the checkpoint is)")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready settings (paths as strings)."""
        d = dataclasses.asdict(self)
        d["out_dir"] = None if self.out_dir is None else str(self.out_dir)
        return d


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
