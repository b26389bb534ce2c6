"""Adaptive neural networks — Bolukbasi, Wang, Dekel & Saligrama, "Adaptive Neural Networks for Efficient
Inference", ICML 2017. https://arxiv.org/abs/1702.07811

Early-exit policies: after exit ``k`` a learned policy ``γ_k(x)`` decides whether the sample stops there or
continues. The policies are trained from the per-sample costs of each choice: stopping at ``k`` costs the
exit's error plus ``λ`` × the MACs spent so far, continuing costs what the downstream policies end up doing;
each policy is a weighted binary classifier (label: the cheaper choice, weight: the cost difference),
trained from the last exit back (:func:`dynnet.losses.early_exit.adaptive_exit_targets`).

Departures from the paper:
* the exit classifiers, the trunk and the policies train in one run: classifiers and trunk on the sum of the
  exits' cross-entropies, the policies on detached features with the targets computed from the current
  decisions of the downstream policies (the paper trains the policies one by one, bottom-up, after the
  network);
* each policy is linear on the pooled feature map concatenated with the exit's softmax (the paper uses linear
  or small policies on the layer's output); it starts at "continue" (bias -6);
* exits are BranchyNet-style branches placed at fractions of the trunk's MACs; the exit losses are 0-1 errors
  as in the paper;
* at inference a sample stops when ``γ_k(x) >= threshold_k`` (0.5 by default, the policy's own decision);
  thresholds are calibrated for a MAC budget like every early-exit recipe;
* the exits' cross-entropies are weighted by weights derived from the budget (the paper trains each exit
  classifier on its own loss).

Budget: calibrated. ``budget`` (the target mean fraction of the dense MACs per image) sets the thresholds on the
policies' stop probabilities: :func:`dynnet.calibrate` fits them with MSDNet's geometric exit profile until the mean
MAC fraction on held-out images equals it. The paper's own knob, the price ``λ`` of the MACs (``cost_weight``),
stays as set: it shapes which images the policies rank as cheap to stop, the budget then picks how many stop. The
budget also weights the exits' cross-entropies when ``exit_weights`` is ``None``: ``w_k = (1 + K q_k) / 2``,
``q_k`` the share of images exit ``k`` serves at the budget
(:func:`~dynnet.methods.early_exit._common.budget_exit_weights`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.convert import Targets
from dynnet.core import LossOutput, Trace
from dynnet.core.budget import BudgetPolicy
from dynnet.core.recipe import recipe
from dynnet.gates import open_bias_
from dynnet.losses.early_exit import adaptive_exit_targets, multi_exit_cross_entropy, weighted_policy_loss
from dynnet.methods.early_exit._cascade import ExitCascade
from dynnet.methods.early_exit._common import ConvBranchHead, State
from dynnet.methods.early_exit._model import EarlyExitModel
from dynnet.methods.early_exit._trunk import plan_exits
from dynnet.methods.early_exit.calibration import operating_points

__all__ = ["AdaptiveNNCascade", "AdaptiveNNConfig", "AdaptiveNNModel", "ExitPolicy", "convert"]


@dataclass(frozen=True)
class AdaptiveNNConfig:
    """Settings of the adaptive early-exit policies.

    Attributes:
        budget: target mean fraction of the dense MACs per image: the thresholds on the policies' stop
            probabilities are calibrated to it, and it weights the exits' cross-entropies when ``exit_weights`` is
            ``None``.
        exit_fractions: cumulative fractions of the trunk's MACs after which exits go.
        cost_weight: λ, the price of the whole dense network's MACs in units of the 0-1 error.
        policy_weight: weight of the policies' loss next to the exits' cross-entropies.
        exit_weights: weight of every exit's cross-entropy, final one last (``None``: derived from the budget,
            ``(1 + K q_k) / 2`` with ``q_k`` the share of images exit ``k`` serves at the budget).
    """

    budget: float = 0.5
    exit_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    cost_weight: float = 0.5
    policy_weight: float = 1.0
    exit_weights: tuple[float, ...] | None = None


class ExitPolicy(nn.Module):
    """γ(x): [pooled features Tensor[N, C], softmax of the exit Tensor[N, K]] → exit logit Tensor[N]."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels + num_classes, 1)
        open_bias_(self.fc, logit=-6.0)  # "continue": the converted network starts as the base network

    def forward(self, h: Tensor, logits: Tensor) -> Tensor:
        feats = torch.cat([F.adaptive_avg_pool2d(h, 1).flatten(1), logits.softmax(1)], 1)
        return self.fc(feats).squeeze(1)


class AdaptiveNNCascade(ExitCascade):
    """Exit score = the policy's probability of stopping (policies see detached inputs)."""

    def __init__(self, *args: object, policies: list[ExitPolicy], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.policy = nn.ModuleList(policies)

    def exit_score(self, k: int, h: State, logits: Tensor) -> Tensor:
        return torch.sigmoid(self.policy[k](h.detach(), logits.detach()))


class AdaptiveNNModel(EarlyExitModel):
    """Objective: Σ_k w_k CE(exit k) + ``policy_weight`` × the policies' weighted binary cross-entropy."""

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        exits = self.exit_outputs(t)
        task = multi_exit_cross_entropy(exits, target, self.exit_weights(t, budget))
        errors = torch.stack([(z.argmax(1) != target).double() for z in exits], 1)
        probs = torch.stack([t.outputs[f"exit{k}/score"] for k in range(len(exits) - 1)], 1)
        labels, weights = adaptive_exit_targets(
            errors, self.stop_costs(t), (probs >= self.thresholds.to(probs.device)).double(), self.config.cost_weight
        )
        reached = torch.stack(self.alive(t)[:-1], 1).detach()
        policy_logits = torch.logit(probs.clamp(1e-6, 1 - 1e-6))
        policy = weighted_policy_loss(policy_logits, labels, weights * reached)
        total = task + self.config.policy_weight * policy
        return LossOutput(total, {"task": float(task.detach()), "policy": float(policy.detach())})


@recipe(
    "adaptive_nn",
    paper="Adaptive Neural Networks for Efficient Inference (ICML 2017), arXiv:1702.07811",
    budget=BudgetPolicy(
        "calibrated",
        knob="exit thresholds (geometric exit profile) on the policies' stop probabilities",
        reachable=(0.45, 1.0),
        derives="thresholds on the policies' stop probabilities (calibration); exit loss weights (1 + K q_k) / 2",
    ),
    bench_metrics=operating_points,  # the exits' accuracy and operating points in `dynnet bench`
)
def convert(model: nn.Module, config: AdaptiveNNConfig, targets: Targets = "auto") -> AdaptiveNNModel:
    """Attach exits and early-exit policies to ``model`` (in place). ``targets`` is unused."""
    plan = plan_exits(model, config.exit_fractions)
    heads = [ConvBranchHead(c, plan.num_classes, width=c, stride=2) for c in plan.channels]
    policies = [ExitPolicy(c, plan.num_classes) for c in plan.channels]
    cascade = AdaptiveNNCascade(model, plan.trunk, plan.positions, heads, policies=policies, thresholds=0.5)
    return AdaptiveNNModel(cascade, recipe="adaptive_nn", config=copy.copy(config), in_channels=plan.in_channels)
