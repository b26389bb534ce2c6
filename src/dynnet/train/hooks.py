"""Hooks: small objects :func:`dynnet.train.fit` calls at fixed points with the :class:`FitState`.

Built in: :class:`GateHealth` (gate collapse detection), :class:`BudgetTracking` (the model runs at the budget while
it trains), :class:`CSVLogger` (``log.csv``),
:class:`TensorBoardLogger` (if ``tensorboard`` is installed) and :class:`Checkpoint`. ``fit`` installs them
itself from the config, in this order: ``GateHealth``, the user's hooks, the loggers, ``Checkpoint`` — so
that what the first ones add to the epoch's log is logged and checkpointed.
"""

from __future__ import annotations

import csv
import logging
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynnet.core import Trace
from dynnet.train.checkpoint import save_checkpoint
from dynnet.train.config import TrainConfig
from dynnet.train.evaluate import decision_rates

__all__ = ["BudgetTracking", "CSVLogger", "Checkpoint", "FitState", "GateHealth", "Hook", "TensorBoardLogger"]

logger = logging.getLogger("dynnet.train")


@dataclass
class FitState:
    """Where training stands; passed to every hook call.

    Attributes:
        config: the run's :class:`TrainConfig`.
        model: the model being trained (unwrapped: never the ``DistributedDataParallel`` wrapper).
        optimizer: its optimiser.
        scheduler: its learning-rate scheduler.
        epoch: current epoch (0-based).
        step: optimiser steps done since the start of the run.
        batch_in_epoch: batches done in the current epoch.
        steps_per_epoch: batches per epoch on this process.
        total_steps: steps the schedules are laid out over.
        logs: the history so far: one dict per finished epoch.
        step_log: scalars of the last step (loss parts, lr, tau, budget, ...).
        trace: the trace of the last forward pass (``on_step_end`` only), for hooks that read decisions.
        inputs: the last training batch, Tensor[B, C, H, W] (``on_step_end`` only).
        budget_multiplier: the Lagrange multiplier ``λ`` of the budget constraint: ``fit`` adds
            ``λ · (mean MAC fraction − budget)`` of each training batch to the loss (differentiable through the
            decisions); moved by :class:`BudgetTracking` in ``"lagrange"`` mode, 0 otherwise.
        is_main: True on rank 0 (the process that writes files).
        out_dir: ``config.out_dir`` as a path, or ``None``.
    """

    config: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    steps_per_epoch: int = 0
    total_steps: int = 0
    logs: list[dict[str, Any]] = field(default_factory=list)
    step_log: dict[str, float] = field(default_factory=dict)
    trace: Trace | None = None
    inputs: torch.Tensor | None = None
    is_main: bool = True
    out_dir: Path | None = None
    hooks: list[Hook] = field(default_factory=list)
    meter: dict[str, float] = field(default_factory=dict)
    budget_multiplier: float = 0.0


class Hook:
    """Base class: override any of the ``on_*`` methods; ``state_dict`` lets a hook survive a resume."""

    def on_fit_start(self, state: FitState) -> None:
        pass

    def on_epoch_start(self, state: FitState) -> None:
        pass

    def on_step_end(self, state: FitState) -> None:
        pass

    def on_epoch_end(self, state: FitState) -> None:
        """Called after the epoch's log was appended to ``state.logs`` (``state.logs[-1]`` can be extended)."""

    def on_fit_end(self, state: FitState) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state to checkpoint (default: none)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class GateHealth(Hook):
    """Gate collapse detection: a gate always on (rate > ``high``) or always off (< ``low``) over an epoch.

    Tracks, for every binary decision of the training trace, the mean of its hard decisions over the epoch; the
    decisions a model declares idle by construction (``idle_decisions()``: an early exit whose threshold stays at
    "never" until calibration) are left out.
    At the end of the epoch it writes ``gate_rates`` (name → rate) and ``collapsed_gates`` (the names of the
    collapsed gates, e.g. ``"layer1.0:off"``) into the epoch's log and logs a WARNING naming them.

    Args:
        low: below this execution rate a gate counts as always off.
        high: above this rate, always on.
    """

    def __init__(self, low: float = 0.01, high: float = 0.99) -> None:
        self.low, self.high = low, high
        self._sums: dict[str, list[float]] = {}

    def on_epoch_start(self, state: FitState) -> None:
        if state.batch_in_epoch == 0:
            self._sums = {}

    def on_step_end(self, state: FitState) -> None:
        if state.trace is None:
            return
        for name, (s, n) in decision_rates(state.trace).items():
            acc = self._sums.setdefault(name, [0.0, 0])
            acc[0] += s
            acc[1] += n

    def rates(self) -> dict[str, float]:
        """Execution rate of each gate over the epoch so far."""
        return {k: s / n for k, (s, n) in self._sums.items() if n}

    def on_epoch_end(self, state: FitState) -> None:
        rates = self.rates()
        idle = getattr(state.model, "idle_decisions", lambda: set())()  # off by construction until calibrated
        rates = {k: r for k, r in rates.items() if k not in idle}
        collapsed = [f"{k}:on" for k, r in rates.items() if r > self.high]
        collapsed += [f"{k}:off" for k, r in rates.items() if r < self.low]
        entry = state.logs[-1]
        entry["gate_rates"] = {k: round(r, 4) for k, r in rates.items()}
        entry["collapsed_gates"] = collapsed
        if collapsed:
            logger.warning(
                "epoch %d: %d gate(s) collapsed (always on > %.2f or always off < %.2f): %s",
                state.epoch,
                len(collapsed),
                self.high,
                self.low,
                ", ".join(collapsed),
            )

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self._sums}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sums = {k: list(v) for k, v in state.get("sums", {}).items()}


class BudgetTracking(Hook):
    """Keep the model at the step's budget while it trains, by a knob, a multiplier or both (``mode``).

    ``"knob"``: every ``every`` steps, move the recipe's calibration knob (:meth:`dynnet.DynamicModel.calibrate_to_`,
    the threshold :func:`dynnet.calibrate` moves at the end) so that the mean MAC fraction on the last training
    batches equals the budget target of that step. For recipes whose decisions are thresholds the gradient does not
    fight (channel gating, instance sparsity...).

    ``"lagrange"``: dual ascent on the budget constraint ``fraction ≤ budget``. ``fit`` adds
    ``λ · (mean MAC fraction − budget)`` of every training batch to the loss (the trace's MACs are differentiable
    through the decisions' straight-through values), and every ``every`` steps the multiplier moves by the mean error
    of the steps since the last move: ``λ ← max(0, λ + gain · (fraction − budget))``. While training spends more than
    the budget the push grows; once it spends less, it fades. For recipes trained with a straight-through or Gumbel
    estimator whose task gradient undoes a threshold moved from outside: ConvNet-AIG's standard-profile fine-tune with
    knob tracking drove the offset to its -30 floor while its gates grew logits above 27 and stayed at 0.69 of the
    MACs (2026-12-07).

    Why: a budget loss pulls a fine-tuned network's gates from open (1.0) towards the budget, but from a trained base
    in a short fine-tune it often does not get there (ConvNet-AIG, SkipNet, channel gating, GaterNet, batch-shaping,
    instance sparsity ended their 2-epoch fine-tunes at 0.75-1.0 of the MACs); calibrating such a network to the
    budget afterwards switches off work it never learnt to do without, and accuracy collapses (channel gating:
    94.4 % → 9.8 % at half the MACs). Tracking makes training see the decisions inference will take, a little at a
    time as the annealed budget target falls (``TrainConfig.budget_start``), so the weights adapt to them; the
    end-of-training calibration then only corrects the last drift.

    In ``"knob"`` mode the search runs without gradients, in eval mode (BatchNorm running statistics, deterministic
    decisions) and the blocks' current mode (masked during training: the same decisions as sparse); a target the
    knob cannot reach on these batches is skipped (counted in the epoch log). Under ``torchrun`` rank 0's thresholds
    are broadcast to the others; in ``"lagrange"`` mode the fractions are summed over the ranks, so every rank moves
    the same multiplier.

    Args:
        every: steps between two moves.
        mode: ``"knob"``, ``"lagrange"`` or ``"both"`` (the knob keeps the gates where their gradient is alive, the
            multiplier holds them against the task gradient).
        batches: how many of the latest training batches the knob search measures on.
        tolerance: how close the MAC fraction on them must come to the target (knob mode).
        gain: multiplier step per unit of MAC-fraction error (lagrange mode).
    """

    MODES = ("knob", "lagrange", "both")

    def __init__(
        self, every: int, mode: str = "knob", batches: int = 2, tolerance: float = 0.02, gain: float = 1.0
    ) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if mode not in self.MODES:
            raise ValueError(f"budget tracking mode must be one of {self.MODES}, got {mode!r}")
        self.every, self.mode, self.tolerance, self.gain = every, mode, tolerance, gain
        self._recent: deque[torch.Tensor] = deque(maxlen=batches)
        self._fractions: list[float] = []
        self.thresholds: dict[str, float] = {}
        self.multiplier = 0.0
        self.skipped = 0

    def on_fit_start(self, state: FitState) -> None:
        state.budget_multiplier = self.multiplier  # resumed runs go on with the multiplier they had

    def on_step_end(self, state: FitState) -> None:
        if state.inputs is not None:
            self._recent.append(state.inputs.detach())
        if self.mode != "knob" and "mac_fraction" in state.step_log:  # the multiplier's error
            self._fractions.append(state.step_log["mac_fraction"])
        budget = state.step_log.get("budget")
        if state.step % self.every or budget is None:
            return
        if self.mode in ("lagrange", "both"):
            from dynnet.train.distributed import all_reduce_sum

            total, count = all_reduce_sum(
                torch.tensor([sum(self._fractions), len(self._fractions)], dtype=torch.float64)
            )
            if count > 0:
                error = float(total / count) - float(budget)
                self.multiplier = max(0.0, self.multiplier + self.gain * error)
                state.budget_multiplier = self.multiplier
            self._fractions = []
            if self.mode == "lagrange":
                return
        self._move_knob(state, float(budget))

    def _move_knob(self, state: FitState, budget: float) -> None:
        from dynnet.train.distributed import broadcast_state_

        if not self._recent:
            return
        model = state.model
        was_training = model.training
        try:
            model.eval()
            with torch.no_grad():
                self.thresholds = dict(model.calibrate_to_(list(self._recent), budget, self.tolerance))
        except ValueError as err:  # out of reach on these batches: keep the last thresholds
            self.skipped += 1
            logger.debug("budget tracking at step %d skipped: %s", state.step, err)
        finally:
            model.train(was_training)
        broadcast_state_(model)

    def on_epoch_end(self, state: FitState) -> None:
        entry = state.logs[-1]
        if self.mode != "lagrange":
            entry["tracked_thresholds"] = {k: round(v, 4) for k, v in self.thresholds.items()}
            entry["tracking_skipped"] = self.skipped
        if self.mode != "knob":
            entry["budget_multiplier"] = round(self.multiplier, 4)

    def state_dict(self) -> dict[str, Any]:
        return {"thresholds": self.thresholds, "skipped": self.skipped, "multiplier": self.multiplier}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.thresholds = dict(state.get("thresholds", {}))
        self.skipped = int(state.get("skipped", 0))
        self.multiplier = float(state.get("multiplier", 0.0))


_SKIP_CSV = ("gate_rates", "tracked_thresholds")


class CSVLogger(Hook):
    """Appends one row per epoch to ``out_dir/log.csv`` (rank 0); ``collapsed_gates`` joined by ``;``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_fit_start(self, state: FitState) -> None:
        if state.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._rewrite(state.logs)

    def on_epoch_end(self, state: FitState) -> None:
        if state.is_main:
            self._rewrite(state.logs)

    def _rewrite(self, logs: list[dict[str, Any]]) -> None:
        # The whole file is rewritten (a few rows): columns stay consistent when a later epoch adds one,
        # and a resumed run's log holds the epochs of the interrupted one.
        rows = [
            {k: (";".join(v) if isinstance(v, list) else v) for k, v in r.items() if k not in _SKIP_CSV} for r in logs
        ]
        columns: list[str] = []
        for r in rows:
            columns += [k for k in r if k not in columns]
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(self.path)


class TensorBoardLogger(Hook):
    """Step scalars and epoch scalars to TensorBoard (``out_dir/tb``), when ``tensorboard`` is installed."""

    def __init__(self, log_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # raises ImportError without tensorboard

        self._writer_cls = SummaryWriter
        self.log_dir = Path(log_dir)
        self._writer: Any = None

    def on_fit_start(self, state: FitState) -> None:
        if state.is_main:
            self._writer = self._writer_cls(str(self.log_dir))

    def on_step_end(self, state: FitState) -> None:
        if self._writer is not None and state.step % state.config.log_every == 0:
            for k, v in state.step_log.items():
                self._writer.add_scalar(f"train/{k}", v, state.step)

    def on_epoch_end(self, state: FitState) -> None:
        if self._writer is not None:
            for k, v in state.logs[-1].items():
                if isinstance(v, (int, float)):
                    self._writer.add_scalar(f"epoch/{k}", v, state.epoch)

    def on_fit_end(self, state: FitState) -> None:
        if self._writer is not None:
            self._writer.close()


class Checkpoint(Hook):
    """Saves ``out_dir/checkpoint`` every ``every_steps`` steps (if > 0), at every epoch end and at the end.

    Only rank 0 writes. The state stored lets :func:`fit` resume at the same epoch, batch and step, with the
    same RNG states, epoch accumulators and hook states.
    """

    def __init__(self, path: str | Path, every_steps: int = 0) -> None:
        self.path = Path(path)
        self.every_steps = every_steps
        self.last: Path | None = None

    def on_step_end(self, state: FitState) -> None:
        if self.every_steps and state.step % self.every_steps == 0 and state.batch_in_epoch < state.steps_per_epoch:
            self.save(state)

    def on_epoch_end(self, state: FitState) -> None:
        self.save(state, epoch_done=True)

    def on_fit_end(self, state: FitState) -> None:
        if self.last is None:
            self.save(state)

    def save(self, state: FitState, *, epoch_done: bool = False) -> None:
        """Write the checkpoint now (rank 0 only)."""
        if not state.is_main:
            return
        # At an epoch end the next position is (epoch + 1, batch 0); mid-epoch it is (epoch, batch_in_epoch).
        epoch, batch = (state.epoch + 1, 0) if epoch_done else (state.epoch, state.batch_in_epoch)
        train_state = {
            "epoch": epoch,
            "batch_in_epoch": batch,
            "step": state.step,
            "budget": state.step_log.get("budget"),
            "tau": state.step_log.get("tau"),
            "history": state.logs,
            "meter": {} if epoch_done else dict(state.meter),
            "hooks": {f"{i}:{type(h).__name__}": h.state_dict() for i, h in enumerate(state.hooks)},
            "config": state.config.as_dict(),
        }
        self.last = save_checkpoint(
            self.path, state.model, optimizer=state.optimizer, scheduler=state.scheduler, state=train_state
        )
