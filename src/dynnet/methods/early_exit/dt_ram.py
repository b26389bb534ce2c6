"""DT-RAM — Li, Yang, Liu, Zhou, Wen, Xu, "Dynamic Computational Time for Visual Attention", ICCV 2017 workshops.
https://arxiv.org/abs/1703.10332 (code: https://github.com/baidu-research/DT-RAM)

RAM (:mod:`dynnet.methods.glimpse.ram`) with a **stop action**: after each glimpse a Bernoulli policy reads the
recurrent state and decides whether to stop; the answer of a sample is the classifier's output at the step where
it stopped. Everything else is RAM's :class:`~dynnet.methods.glimpse.ram.RecurrentAttention` (retina, glimpse
network, recurrent core, Gaussian location policy, baseline), reused through its extension points. What DT-RAM
adds:

* **intermediate supervision**: in training the (shared) classifier reads the hidden state after every glimpse,
  and every glimpse a sample took gets a cross-entropy loss (``task_loss``), so that stopping early gives a
  usable answer;
* a **reward that makes stopping early cheaper**: ``correct · discount^(glimpses - 1) - step_cost · max(0, f - budget)``
  (correctness of the answer at the stop step, minus a cost on the MAC fraction ``f`` of the glimpses taken above
  the budget), trained by REINFORCE with RAM's learned baseline for both the location and the stop actions;
* a **curriculum**: first a fixed number of glimpses (stop action disabled, the paper's RAM pre-training), then
  stopping enabled — :class:`DTRAMCurriculum`, a :mod:`dynnet.train` hook, switches
  ``model.stopping`` at ``fixed_fraction`` of the run;
* **budget calibration**: at inference a sample stops after glimpse ``t`` when its stop logit
  ``log(P(stop) / (1 - P(stop)))`` reaches ``thresholds[t]`` (a buffer, the logit of ``stop_threshold`` everywhere by
  default); :func:`dynnet.calibrate` (or :meth:`DTRAM.calibrate`) picks the per-step thresholds whose mean MACs on
  held-out data meet ``budget`` (MSDNet's budgeted-batch schedule from :mod:`dynnet.methods.early_exit.calibration`,
  with the stop logit as the exit score). The logit, not ``P(stop)``: a trained stop policy's probabilities round to
  exactly 1.0 in float32 for most images, and ties cannot be split by a threshold (the standard profile's calibration
  to 0.75 of the MACs, 2026-12-07, could only send every image to the same step: 0.83).

Budget: trained and calibrated. ``budget`` is the target mean fraction of the every-glimpse MACs per image (the
dense network of DT-RAM: ``max_glimpses`` glimpses and one classifier). In training, the reward charges
``step_cost`` per unit of MAC fraction above the budget (the glimpses up to the budget are free), so the stop policy
learns to spend about the budget; :func:`dynnet.calibrate` then fits the per-step stop thresholds until the mean
MAC fraction on held-out images equals it.

Sparse mode: samples that stop leave the batch (RAM's compaction), so later glimpses and heads run only for the
samples still looking; per-sample MACs count the glimpses and heads each sample ran, plus one classifier.

Departures from the paper:

* the classifier is shared across steps (as in the paper's MNIST code; its CUB/Cars models have one linear
  classifier per step); at inference it runs once per sample, on the state where the sample stopped (the same
  answer as reading every step, without the extra MACs); in training it runs after every glimpse (recorded as
  training-only MACs, ``dense=0``);
* the stop policy is one linear layer on the hidden state (the paper's code: a two-layer MLP); it is RAM's
  ``halting`` module, initialised closed (``P(stop) ≈ 0.0025``), so a fresh model takes every glimpse;
* the reward subtracts a cost on the MAC fraction above the budget (``step_cost``, default 0.05 per unit of MAC
  fraction, i.e. per ``T`` glimpses; budget → 0 gives a plain per-glimpse cost); the paper's code instead discounts
  a correct answer by ``γ^step`` (``discount``, default 1: off);
* intermediate supervision covers every glimpse a sample took, in both curriculum stages (the paper's fixed-step
  stage supervises every step; its code's stopping stage back-propagates the answer at the stop step only);
* in the stopping stage every module keeps training (the paper's MNIST code freezes the core and the location
  policy and trains the stop policy alone); no ε-greedy exploration of random stop steps;
* inference stops at ``P(stop) >= 0.5`` by default (the paper's code: ``> 0.9``), or at calibrated per-step
  thresholds;
* the first glimpse is at the image centre, locations are the policy mean at inference, hidden sizes and the
  retina are RAM's defaults here (see :mod:`dynnet.methods.glimpse.ram`);
* trace keys are RAM's (``ram/glimpses``, ``ram/location{t}``, decisions ``glimpse{t}`` = "takes glimpse t"),
  plus ``exit_index`` (the 0-based stop step, as the early-exit recipes record it) and, in training,
  ``dt_ram/logits{t}`` and ``dt_ram/looked{t}``;
* ``reproduces_base=False``: DT-RAM is its own architecture; the converted base network only gives the number of
  input channels and classes. It lives in the ``early_exit`` family (an exit per glimpse step) but is built
  on the glimpse family's public RAM recipe.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.convert import Targets, first_conv_in_channels, num_classes_of
from dynnet.core import Trace, current_trace
from dynnet.core.budget import BudgetPolicy
from dynnet.core.recipe import recipe
from dynnet.methods.early_exit.calibration import Calibration, ExitProfile, calibrate_thresholds, calibrate_to_budget_
from dynnet.methods.glimpse import RAM, RAM_SCRATCH, RAMConfig, RecurrentAttention
from dynnet.train.hooks import FitState, Hook

__all__ = ["DTRAM", "DTRAMConfig", "DTRAMCurriculum", "DynamicTimeAttention", "convert"]


@dataclass(frozen=True)
class DTRAMConfig:
    """Settings of DT-RAM.

    Attributes:
        budget: target mean fraction of the every-glimpse MACs per image: the reward charges the MAC fraction above
            it (``step_cost``), and the per-step stop thresholds are calibrated to it.
        glimpse_size: side of the retina's patches after resampling.
        num_scales: patches per glimpse (sides ``glimpse_size * 2^s``).
        max_glimpses: T, the most glimpses per image (the fixed number of the first curriculum stage).
        hidden: width of the recurrent core and of the glimpse network's output.
        glimpse_hidden: width of the "what" and "where" pathways of the glimpse network.
        location_std: standard deviation of the Gaussian location policy (in [-1, 1] units).
        step_cost: reward penalty per unit of MAC fraction above the budget (about ``T`` glimpses), as a fraction of
            a correct answer's reward.
        discount: a correct answer after ``s`` glimpses earns ``discount^(s - 1)`` (the paper's code's γ; 1: off).
        stop_threshold: inference stops after glimpse ``t`` when ``P(stop) >= stop_threshold`` (until calibrated;
            kept as its logit in ``thresholds``).
        fixed_fraction: fraction of training run with the stop action disabled (:class:`DTRAMCurriculum`).
    """

    budget: float = 0.5
    glimpse_size: int = 8
    num_scales: int = 3
    max_glimpses: int = 6
    hidden: int = 128
    glimpse_hidden: int = 128
    location_std: float = 0.15
    step_cost: float = 0.05
    discount: float = 1.0
    stop_threshold: float = 0.5
    fixed_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")
        if self.step_cost < 0:
            raise ValueError(f"step_cost must be non-negative, got {self.step_cost}")
        if not 0.0 < self.discount <= 1.0:
            raise ValueError(f"discount must be in (0, 1], got {self.discount}")
        if not 0.0 <= self.fixed_fraction <= 1.0:
            raise ValueError(f"fixed_fraction must be in [0, 1], got {self.fixed_fraction}")
        self.ram_config()  # RAM's own checks (max_glimpses >= 2, location_std > 0)

    def ram_config(self) -> RAMConfig:
        """The RAM settings of the attention network (stopping learned, the step cost as RAM's glimpse cost)."""
        return RAMConfig(
            budget=self.budget,
            glimpse_size=self.glimpse_size,
            num_scales=self.num_scales,
            max_glimpses=self.max_glimpses,
            hidden=self.hidden,
            glimpse_hidden=self.glimpse_hidden,
            location_std=self.location_std,
            learn_stopping=True,
            glimpse_cost=self.step_cost,
        )


class DynamicTimeAttention(RecurrentAttention):
    """RAM's recurrent attention with a switchable stop action, per-step stop thresholds and per-step logits.

    Args:
        in_channels: image channels.
        num_classes: K.
        config: the recipe's settings.

    Attributes:
        stopping_enabled: the stop action acts (``False`` in the curriculum's fixed-glimpses stage).
        thresholds: buffer Tensor[T - 1]: at inference a sample stops after glimpse ``t`` when its stop logit
            reaches ``thresholds[t]`` (``inf``: never).
    """

    granularity = "glimpse"

    def __init__(self, in_channels: int, num_classes: int, config: DTRAMConfig) -> None:
        super().__init__(in_channels, num_classes, config.ram_config())
        self.stopping_enabled = True
        start = float(torch.logit(torch.tensor(config.stop_threshold, dtype=torch.float64)))
        self.register_buffer("thresholds", torch.full((config.max_glimpses - 1,), start))

    @property
    def stopping(self) -> bool:
        return self.stopping_enabled

    def stop_rule(self, p_stop: Tensor, t: int, logit: Tensor | None = None) -> Tensor:
        score = torch.logit(p_stop.double()) if logit is None else logit
        return score >= self.thresholds[t].to(score.dtype)

    def after_step(self, tr: Trace | None, t: int, h_all: Tensor, alive: Tensor, rows: Tensor) -> None:
        # Intermediate supervision: in training the classifier reads every step's state. The last step's read-out
        # is the model's output (the static network's classifier), so only the earlier ones are extra work.
        if tr is None or not self.training:
            return
        tr.record_output(f"dt_ram/looked{t}", alive.clone())
        if t < self.max_glimpses - 1:
            tr.record_output(f"dt_ram/logits{t}", self.classifier(h_all))
            cost = self.classifier_cost(h_all)
            self.record_step_macs(
                tr, t, alive, cost, executed_rows=rows, n=h_all.shape[0], part="classifier", dense=False
            )

    def run_glimpses(self, x: Tensor, *, sparse: bool) -> Tensor:
        out = super().run_glimpses(x, sparse=sparse)
        tr = current_trace()
        if tr is not None:
            tr.record_output("exit_index", tr.outputs["ram/glimpses"].round().long() - 1)
            if self.training:  # what the reward charges: the MAC fraction of stopping after each glimpse
                costs = self.stop_costs(x)
                tr.record_output("dt_ram/stop_fractions", costs / costs[-1])
        return out

    def step_outputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Every glimpse for every sample (locations from the policy mean), no stopping, no trace.

        Args:
            x: Tensor[N, C, H, W] images.

        Returns:
            ``(stop_logits, logits)``: Tensor[N, T - 1] stop logit after each glimpse but the last, and
            Tensor[N, T, K] the answer a sample would give if it stopped after glimpse ``t``. At inference a
            sample's trajectory up to its stop step does not depend on the stop decisions, so these are the
            answers and scores of every possible stop step.
        """
        loc, h = x.new_zeros((x.shape[0], 2)), None
        scores, logits = [], []
        for t in range(self.max_glimpses):
            h = self.step(x, loc, h)
            logits.append(self.classifier(h))
            if t < self.max_glimpses - 1:
                loc, logit = self.heads_logit(h)
                scores.append(logit)
        return torch.stack(scores, 1), torch.stack(logits, 1)


class DTRAM(RAM):
    """DT-RAM as a :class:`DynamicModel`: intermediate cross-entropy + REINFORCE (location and stop) with a step
    cost + baseline MSE."""

    # -- curriculum ---------------------------------------------------------------------------------
    @property
    def stopping(self) -> bool:
        """Whether the stop action acts (``False``: every sample takes ``max_glimpses`` glimpses)."""
        return self.net.stopping_enabled

    @stopping.setter
    def stopping(self, value: bool) -> None:
        self.net.stopping_enabled = bool(value)

    # -- objective ----------------------------------------------------------------------------------
    def step_logits(self, logits: Tensor, t: Trace) -> tuple[Tensor, Tensor]:
        """Per-step answers and masks from a training trace.

        Returns:
            ``(logits, looked)``: Tensor[N, T, K] the classifier's output after each glimpse (the last one is the
            model's output) and Tensor[N, T] bool, whether the sample took glimpse ``t``.
        """
        steps = self.config.max_glimpses
        per_step = [t.outputs[f"dt_ram/logits{s}"] for s in range(steps - 1)] + [logits]
        looked = [t.outputs[f"dt_ram/looked{s}"] for s in range(steps)]
        return torch.stack(per_step, 1), torch.stack(looked, 1)

    def task_loss(self, logits: Tensor, target: Tensor, t: Trace) -> Tensor:
        """Intermediate supervision: each sample's mean cross-entropy over the glimpses it took, averaged over the
        batch (the answer at the stop step is among them). Plain cross-entropy without a training trace."""
        if "dt_ram/looked0" not in t.outputs:
            return F.cross_entropy(logits, target)
        per_step, looked = self.step_logits(logits, t)
        n, steps, k = per_step.shape
        ce = F.cross_entropy(per_step.reshape(n * steps, k), target.repeat_interleave(steps), reduction="none")
        mask = looked.to(ce.dtype)
        return ((ce.view(n, steps) * mask).sum(1) / mask.sum(1).clamp_min(1.0)).mean()

    def reward(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> Tensor:
        """Tensor[N]: ``correct · discount^(glimpses - 1) - step_cost · max(0, f - budget)``; ``correct`` is the
        answer at the stop step (the model's output), ``f`` the MAC fraction of stopping after ``glimpses`` glimpses
        (every-glimpse MACs = 1)."""
        cfg: DTRAMConfig = self.config
        budget = cfg.budget if budget is None else budget
        correct = (logits.detach().argmax(1) == target).float()
        glimpses = t.outputs["ram/glimpses"].float()
        fractions = t.outputs.get("dt_ram/stop_fractions")
        if fractions is None:  # a trace of another run: every glimpse costs 1 / T
            fraction = glimpses / cfg.max_glimpses
        else:
            fraction = fractions.to(glimpses.device)[glimpses.round().long().clamp(1, cfg.max_glimpses) - 1].float()
        return correct * cfg.discount ** (glimpses - 1) - cfg.step_cost * (fraction - budget).clamp_min(0.0)

    # -- budget calibration -------------------------------------------------------------------------
    @property
    def thresholds(self) -> Tensor:
        """Tensor[T - 1]: stop after glimpse ``t`` when the stop logit reaches ``thresholds[t]``."""
        return self.net.thresholds.detach().clone()

    def set_thresholds(self, thresholds: Sequence[float] | Tensor) -> None:
        """Set the per-step stop thresholds, on the stop logit (``math.inf``: never stop there)."""
        thr = torch.as_tensor(thresholds, dtype=torch.float32).flatten()
        if thr.numel() != self.config.max_glimpses - 1:
            raise ValueError(f"expected {self.config.max_glimpses - 1} thresholds, got {thr.numel()}")
        with torch.no_grad():
            self.net.thresholds.copy_(thr)

    def exit_profile(self, loader: Iterable[Any], *, max_batches: int | None = None) -> ExitProfile:
        """Every stop step's verdict on every sample of ``loader`` (an :class:`ExitProfile` whose scores are the
        stop logits); the model is left in eval mode.

        Args:
            loader: ``(Tensor[B, C, H, W], Tensor[B])`` batches, or unlabelled Tensor[B, C, H, W] batches (then the
                profile's ``correct`` is ``None``).
            max_batches: use only this many batches.
        """
        self.eval()
        device = next(self.parameters()).device
        scores, preds, targets, costs, dense = [], [], [], None, None
        labelled = True
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                x, y = (batch, None) if isinstance(batch, Tensor) else (batch[0], batch[1] if len(batch) > 1 else None)
                x = x.to(device)
                stop_logits, logits = self.net.step_outputs(x)
                scores.append(stop_logits.float().cpu())
                preds.append(logits.argmax(2).cpu())
                if y is None:
                    labelled = False
                else:
                    targets.append(y.cpu().view(-1, 1))
                if costs is None:
                    costs, dense = self.net.stop_costs(x), float(self.dense_macs(x))
        if costs is None:
            raise ValueError("exit_profile: the loader yielded no batch")
        p = torch.cat(preds)
        return ExitProfile(torch.cat(scores), p == torch.cat(targets) if labelled else None, p, costs, dense)

    def calibrate_to_(self, batches: list[Tensor], budget: float, tolerance: float) -> dict[str, float]:
        """Set the per-step stop thresholds for a mean-MAC budget (what :func:`dynnet.calibrate` calls): MSDNet's
        budgeted-batch calibration on the stop logits of ``batches`` (no labels needed).

        Returns:
            ``{"exit profile p": p, "glimpse0 threshold": ..., ...}``.

        Raises:
            ValueError: the stop action is disabled, or ``budget`` lies outside the MAC fractions the thresholds
                reach on ``batches`` (every image stopping after its first glimpse … after the last).
        """
        if not self.stopping:
            raise ValueError("dt_ram: the stop action is disabled (model.stopping = False); enable it to calibrate")
        was_training = self.training
        try:
            profile = self.exit_profile(batches)
        finally:
            self.train(was_training)
        extremes = "every image stopping after its first glimpse … after the last"
        return calibrate_to_budget_(self, profile, budget, tolerance, extremes=extremes, label="glimpse")

    def calibrate(
        self,
        loader: Iterable[tuple[Tensor, Tensor]],
        budget: float | None = None,
        *,
        max_batches: int | None = None,
    ) -> Calibration:
        """Set the stop thresholds whose mean MACs on ``loader`` meet ``budget`` (default ``config.budget``).

        The stopping stage must have been trained (a closed stop policy gives scores near 0; the thresholds then
        admit the most willing samples first, as for confidence exits).
        """
        budget = self.config.budget if budget is None else budget
        cal = calibrate_thresholds(self.exit_profile(loader, max_batches=max_batches), budget)
        self.set_thresholds(cal.thresholds)
        return cal


class DTRAMCurriculum(Hook):
    """The paper's curriculum as a :mod:`dynnet.train` hook: the stop action is disabled (every sample takes
    ``max_glimpses`` glimpses) for the first ``fixed_fraction`` of the optimiser steps, then enabled.

    Args:
        fixed_fraction: fraction of the run with a fixed number of glimpses (default: the model's
            ``config.fixed_fraction``).
    """

    def __init__(self, fixed_fraction: float | None = None) -> None:
        if fixed_fraction is not None and not 0.0 <= fixed_fraction <= 1.0:
            raise ValueError(f"fixed_fraction must be in [0, 1], got {fixed_fraction}")
        self.fixed_fraction = fixed_fraction

    def stopping_at(self, model: nn.Module, step: int, total_steps: int) -> bool:
        """Whether the stop action acts at optimiser step ``step`` of ``total_steps``."""
        fraction = model.config.fixed_fraction if self.fixed_fraction is None else self.fixed_fraction
        return step >= math.ceil(fraction * total_steps)

    def on_fit_start(self, state: FitState) -> None:
        self._set(state)

    def on_step_end(self, state: FitState) -> None:
        self._set(state)

    def on_fit_end(self, state: FitState) -> None:
        if isinstance(state.model, DTRAM):
            state.model.stopping = True  # the trained model stops at inference

    def _set(self, state: FitState) -> None:
        if isinstance(state.model, DTRAM):
            state.model.stopping = self.stopping_at(state.model, state.step, state.total_steps)

    def state_dict(self) -> dict[str, Any]:
        return {"fixed_fraction": self.fixed_fraction}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fixed_fraction = state.get("fixed_fraction", self.fixed_fraction)


@recipe(
    "dt_ram",
    paper="Dynamic Computational Time for Visual Attention (ICCV 2017 workshops), arXiv:1703.10332",
    budget=BudgetPolicy(
        "trained+calibrated",
        knob="per-glimpse stop thresholds (geometric exit profile)",
        reachable=(0.2, 1.0),
        derives="the MAC fraction above which the reward charges step_cost; per-step stop thresholds (calibration)",
    ),
    test_input=(1, 32, 32),
    reproduces_base=False,
    scratch=RAM_SCRATCH,
    revision=1,  # 1: thresholds on the stop logit (ties of P(stop) = 1.0 made 0.75 unreachable)
)
def convert(model: nn.Module, config: DTRAMConfig, targets: Targets = "auto") -> DTRAM:
    """Build a DT-RAM with ``model``'s input channels and classes (the base network is not reused)."""
    in_channels = first_conv_in_channels(model) or 1
    body = DynamicTimeAttention(in_channels, num_classes_of(model), config)
    return DTRAM(body, recipe="dt_ram", config=copy.copy(config), in_channels=in_channels)
