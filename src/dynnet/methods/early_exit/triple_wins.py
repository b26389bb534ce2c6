"""Triple Wins (RDI-Nets) — Hu, Chen, Wang & Wang, "Triple Wins: Boosting Accuracy, Robustness and Efficiency
Together by Enabling Input-Adaptive Inference", ICLR 2020. https://arxiv.org/abs/2002.10025

A multi-exit network trained adversarially: every batch is attacked with PGD against the multi-exit network
(the "average-exit" attack maximises the mean cross-entropy of all exits) and the objective is the mean of the
exits' cross-entropies on clean and adversarial inputs. At inference samples stop at the first confident exit,
so the network is accurate, robust and cheap at once; evaluation reports robust accuracy under the same attack
(:func:`robust_accuracy`).

Departures from the paper:
* only the average-exit attack is used in training (the paper also studies main-branch and max-average
  attacks); PGD runs with the model in eval mode (batch-norm statistics are not updated by the attack);
* the clean input reaches ``compute_loss`` through the trace (``t.outputs["input"]``, recorded in training),
  because the objective needs to attack it;
* exits are BranchyNet-style branches at fractions of the trunk's MACs; thresholds are calibrated for a MAC
  budget on a validation split (the paper sets them from validation accuracy per exit);
* the exits' cross-entropies in the objective are weighted by weights derived from the budget (the paper averages
  them); the attack keeps the plain average.

Budget: calibrated. ``budget`` (the target mean fraction of the dense MACs per image) sets the exits'
maximum-softmax thresholds: :func:`dynnet.calibrate` fits them with MSDNet's geometric exit profile until the mean
MAC fraction on held-out images equals it. It also weights the exits in the objective when ``exit_weights`` is
``None``: ``w_k = (1 + K q_k) / 2``, ``q_k`` the share of images exit ``k`` serves at the budget
(:func:`~dynnet.methods.early_exit._common.budget_exit_weights`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dynnet.convert import Targets
from dynnet.core import LossOutput, Trace, current_trace, set_mode, trace
from dynnet.core.budget import BudgetPolicy
from dynnet.core.recipe import recipe
from dynnet.methods.early_exit._cascade import ExitCascade
from dynnet.methods.early_exit._common import ConvBranchHead
from dynnet.methods.early_exit._model import EarlyExitModel
from dynnet.methods.early_exit._trunk import plan_exits
from dynnet.methods.early_exit.adversarial import average_exit_loss, pgd_attack
from dynnet.methods.early_exit.calibration import operating_points

__all__ = ["TripleWinsConfig", "TripleWinsModel", "convert", "robust_accuracy"]


@dataclass(frozen=True)
class TripleWinsConfig:
    """Settings of Triple Wins.

    Attributes:
        budget: target mean fraction of the dense MACs per image: the exit thresholds are calibrated to it, and it
            weights the exits in the objective when ``exit_weights`` is ``None``.
        exit_fractions: cumulative fractions of the trunk's MACs after which exits go.
        epsilon: L∞ radius of the attack, in the units of the (normalised) input.
        step_size: PGD step.
        steps: PGD iterations in training.
        adversarial_weight: weight of the adversarial half of the objective (the paper: 0.5).
        exit_weights: weight of every exit's cross-entropy, final one last (``None``: derived from the budget,
            ``(1 + K q_k) / 2`` with ``q_k`` the share of images exit ``k`` serves at the budget; the paper: all 1).
    """

    budget: float = 0.5
    exit_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    epsilon: float = 0.1
    step_size: float = 0.04
    steps: int = 3
    adversarial_weight: float = 0.5
    exit_weights: tuple[float, ...] | None = None


class TripleWinsModel(EarlyExitModel):
    """Objective: ``(1 - w) mean_k w_k CE(z_k(x), y) + w mean_k w_k CE(z_k(x_adv), y)`` (``w_k``: exit weights)."""

    def run(self, x: Tensor) -> Tensor:
        t = current_trace()
        if t is not None and self.training:
            t.record_output("input", x.detach())
        return super().run(x)

    def all_exits(self, x: Tensor) -> list[Tensor]:
        """Every exit's logits for Tensor[N, C, H, W] (masked execution), as a list of Tensor[N, K]."""
        with trace() as t:
            self(x)
        return self.exit_outputs(t)

    def attack(self, x: Tensor, target: Tensor, *, steps: int | None = None) -> Tensor:
        """Average-exit PGD examples for ``x`` (model in eval mode during the attack; modes restored)."""
        cfg = self.config
        was_training, mode = self.training, self.cascade.mode
        self.eval()
        set_mode(self, "masked")
        try:
            return pgd_attack(
                lambda xa: average_exit_loss(self.all_exits(xa), target),
                x,
                epsilon=cfg.epsilon,
                step_size=cfg.step_size,
                steps=cfg.steps if steps is None else steps,
            )
        finally:
            self.train(was_training)
            set_mode(self, mode)

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        exits = self.exit_outputs(t)
        weights = self.exit_weights(t, budget)
        clean = average_exit_loss(exits, target, weights)
        w = self.config.adversarial_weight
        if "input" not in t.outputs or w == 0:
            return LossOutput(clean, {"clean": float(clean.detach())})
        x_adv = self.attack(t.outputs["input"], target)
        adv = average_exit_loss(self.all_exits(x_adv), target, weights)
        total = (1 - w) * clean + w * adv
        return LossOutput(total, {"clean": float(clean.detach()), "adversarial": float(adv.detach())})


def robust_accuracy(
    model: TripleWinsModel, loader: Iterable[tuple[Tensor, Tensor]], *, steps: int = 10, max_batches: int | None = None
) -> dict[str, float]:
    """Clean and robust (average-exit PGD) accuracy of the model's adaptive output, with mean MAC fractions.

    The attack targets all exits (masked mode); the attacked images are then classified with the model's
    current thresholds in sparse mode, as deployed.
    """
    stats = {"clean_correct": 0.0, "robust_correct": 0.0, "n": 0, "clean_macs": 0.0, "robust_macs": 0.0}
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x_adv = model.attack(x, y, steps=steps)
        model.eval()
        set_mode(model, "sparse")
        with torch.no_grad():
            for key, inp in (("clean", x), ("robust", x_adv)):
                with trace() as t:
                    out = model(inp)
                stats[f"{key}_correct"] += float((out.argmax(1) == y).sum())
                stats[f"{key}_macs"] += float(t.mac_fraction().sum())
        stats["n"] += x.shape[0]
    n = max(stats["n"], 1)
    return {
        "clean_accuracy": stats["clean_correct"] / n,
        "robust_accuracy": stats["robust_correct"] / n,
        "clean_mac_fraction": stats["clean_macs"] / n,
        "robust_mac_fraction": stats["robust_macs"] / n,
        "num_samples": stats["n"],
    }


@recipe(
    "triple_wins",
    paper="Triple Wins: Boosting Accuracy, Robustness and Efficiency Together by Enabling Input-Adaptive "
    "Inference (ICLR 2020), arXiv:2002.10025",
    budget=BudgetPolicy(
        "calibrated",
        knob="exit thresholds (geometric exit profile)",
        reachable=(0.45, 1.0),
        derives="maximum-softmax thresholds of the exits (calibration); exit loss weights (1 + K q_k) / 2",
    ),
    bench_metrics=operating_points,  # the exits' accuracy and operating points in `dynnet bench`
)
def convert(model: nn.Module, config: TripleWinsConfig, targets: Targets = "auto") -> TripleWinsModel:
    """Attach exits to ``model`` for adversarial multi-exit training (in place). ``targets`` is unused."""
    plan = plan_exits(model, config.exit_fractions)
    heads = [ConvBranchHead(c, plan.num_classes, width=c, stride=2) for c in plan.channels]
    cascade = ExitCascade(model, plan.trunk, plan.positions, heads)
    return TripleWinsModel(cascade, recipe="triple_wins", config=copy.copy(config), in_channels=plan.in_channels)
