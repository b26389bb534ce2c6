"""Network selection — Bolukbasi, Wang, Dekel & Saligrama, "Adaptive Neural Networks for Efficient Inference",
ICML 2017 (Section 4, "Network Selection"). https://arxiv.org/abs/1702.07811

A cheap network answers first; a sample whose answer is not confident enough is sent on to the expensive network,
whose answer is final. The expensive network is the base network itself; the cheap one (the "little" network) is
the base pruned to a fraction of its MACs (or a network given by the user, e.g. a shipped narrower one). A sample
that stops at the little network costs its MACs only; one that goes on costs both networks' MACs. At a budget of
half the dense MACs with a little network of a quarter, one image in four runs the base.

Departures from the paper:
* two networks, not a chain of three (AlexNet → GoogLeNet → ResNet-50): the little one and the base;
* the decision is the little network's maximum softmax probability against a threshold (the confidence rule the
  paper compares its learned policies with), not a learned policy: the threshold is calibrated for a MAC budget on
  held-out images like every early-exit recipe's;
* the paper's networks are trained separately beforehand; here both fine-tune together: the little network on its
  cross-entropy plus distillation from the base's logits (``distill``, Hinton et al. 2015; the base gets no
  gradient from it), the base on its own cross-entropy;
* ``little="pruned"`` builds the little network from the base by structured L1 pruning
  (:func:`dynnet.train.prune.prune_channels`, the static baseline's method), redone from the trained weights when
  they are loaded (:meth:`NetworkSelectionModel.init_from_base_`).

Budget: calibrated. ``budget`` (the target mean fraction of the base's MACs per image) sets the threshold on the
little network's confidence (:func:`dynnet.calibrate`): ``budget = c_little + q``, ``q`` the share of images the
base answers. Reachable: from the little network's cost (0.25 by default, every image stops there) upwards; the
declared range starts at 0.3.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.convert import Targets, classifier_of, first_conv_in_channels
from dynnet.core import LossOutput, Trace
from dynnet.core.budget import BudgetPolicy
from dynnet.core.recipe import recipe
from dynnet.losses.early_exit import exit_distillation_loss, multi_exit_cross_entropy
from dynnet.methods.early_exit._cascade import ExitCascade
from dynnet.methods.early_exit._common import NEVER, State
from dynnet.methods.early_exit._model import EarlyExitModel
from dynnet.methods.early_exit._trunk import Trunk
from dynnet.methods.early_exit.calibration import operating_points
from dynnet.testing.scramble import register_randomiser

__all__ = ["NetworkSelectionCascade", "NetworkSelectionConfig", "NetworkSelectionModel", "convert"]

PROBE_SIZE = 32
"""Side of the example image the little network is pruned at (MAC fractions barely depend on it)."""


@dataclass(frozen=True)
class NetworkSelectionConfig:
    """Settings of network selection.

    Attributes:
        budget: target mean fraction of the base network's MACs per image: the threshold on the little network's
            confidence is calibrated to it; it must exceed the little network's own fraction.
        little: the cheap network: ``"pruned"`` (the base with its lowest-L1 channels removed until it costs
            ``little_fraction`` of the base's MACs) or ``"zoo:KEY"`` (a network shipped in :mod:`dynnet.zoo`, with
            its trained weights).
        little_fraction: MACs of the pruned little network over the base's (``little="pruned"`` only).
        distill: weight of the little network's distillation from the base's logits.
        temperature: softmax temperature of that distillation.
        exit_weights: cross-entropy weights of the little network and the base (``None``: derived from the budget,
            ``(1 + K q_k) / 2`` with ``q_k`` the share of images each answers at the budget).
    """

    budget: float = 0.5
    little: str = "pruned"
    little_fraction: float = 0.25
    distill: float = 1.0
    temperature: float = 4.0
    exit_weights: tuple[float, ...] | None = None


def _identity(h: State) -> State:
    return h


def selection_trunk(base: nn.Module) -> Trunk:
    """The two "units" of network selection: the input passed on as it is (the little network is the exit head
    after it), then the whole base network; the final head is the identity (the base already gives logits)."""
    return Trunk(units=(_identity, base), head=_identity, names=("input", "base"))


class NetworkSelectionCascade(ExitCascade):
    """Exit 0 is the little network (reading the input); the final exit is the base network.

    Args:
        base: the network (the expensive one; its submodules are reused).
        little: the cheap network, Tensor[N, C, H, W] → logits Tensor[N, K].
        thresholds: initial confidence threshold (``NEVER``: every sample goes on to the base).
    """

    def __init__(self, base: nn.Module, little: nn.Module, *, thresholds: float = NEVER) -> None:
        super().__init__(base, selection_trunk(base), [0], [little], thresholds=thresholds)

    def make_trunk(self) -> Trunk:
        return selection_trunk(self._base)

    @property
    def little(self) -> nn.Module:
        return self.exits[0]


class NetworkSelectionModel(EarlyExitModel):
    """Objective: ``w_0 CE(little) + w_1 CE(base) + distill · T² KL(base ‖ little)``."""

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        little, big = self.exit_outputs(t)
        task = multi_exit_cross_entropy([little, big], target, self.exit_weights(t, budget))
        kd = exit_distillation_loss(little, big, self.config.temperature)
        total = task + self.config.distill * kd
        parts = {"task": float(task.detach()), "little_distill": float(kd.detach())}
        parts.update({f"ce{k}": float(F.cross_entropy(z.detach(), target)) for k, z in enumerate((little, big))})
        return LossOutput(total, parts)

    def init_from_base_(self) -> None:
        """A pruned little network is pruned again from the base weights just loaded (same layer shapes: the
        pruning ratio depends on the shapes only); a shipped one keeps its own weights."""
        if self.config.little != "pruned":
            return
        cascade = self.net
        fresh = _pruned_little(cascade._base, self.config.little_fraction, self.in_channels or 3)
        with torch.no_grad():
            cascade.little.load_state_dict(fresh.state_dict())


def _pruned_little(base: nn.Module, fraction: float, in_channels: int) -> nn.Module:
    from dynnet.train.prune import prune_channels

    example = torch.zeros(1, in_channels, PROBE_SIZE, PROBE_SIZE)
    was = base.training
    try:
        little, _ = prune_channels(base, fraction, example)
    finally:
        base.train(was)
    return little.train(was)


def _little_network(base: nn.Module, config: NetworkSelectionConfig, in_channels: int) -> nn.Module:
    if config.little == "pruned":
        if not 0.0 < config.little_fraction < 1.0:
            raise ValueError(f"little_fraction must be in (0, 1), got {config.little_fraction!r}")
        if config.budget <= config.little_fraction:
            raise ValueError(
                f"budget {config.budget} is not above the little network's cost ({config.little_fraction} of the MACs):"
                " lower little_fraction or raise the budget"
            )
        return _pruned_little(base, config.little_fraction, in_channels)
    if config.little.startswith("zoo:"):
        from dynnet import zoo

        return zoo.load(config.little.removeprefix("zoo:")).train(base.training)
    raise ValueError(f"little must be 'pruned' or 'zoo:KEY' (a shipped network), got {config.little!r}")


@recipe(
    "network_selection",
    paper="Adaptive Neural Networks for Efficient Inference (ICML 2017), network selection, arXiv:1702.07811",
    budget=BudgetPolicy(
        "calibrated",
        knob="threshold on the little network's confidence",
        reachable=(0.3, 1.0),
        derives="the confidence threshold (calibration); loss weights of the little network and the base "
        "(1 + K q_k) / 2",
    ),
    fine_tune={"decision_lr_scale": 1.0},  # the little network is trained weights, not a fresh head
    bench_metrics=operating_points,  # the exits' accuracy and operating points in `dynnet bench`
)
def convert(model: nn.Module, config: NetworkSelectionConfig, targets: Targets = "auto") -> NetworkSelectionModel:
    """Put a little network in front of ``model`` (in place); ``targets`` is unused. Every sample goes on to
    ``model`` until the threshold is calibrated, so the converted network reproduces the base."""
    in_channels = first_conv_in_channels(model) or 3
    little = _little_network(model, config, in_channels)
    cascade = NetworkSelectionCascade(model, little)
    return NetworkSelectionModel(cascade, recipe="network_selection", config=copy.copy(config), in_channels=in_channels)


@register_randomiser(NetworkSelectionModel)
def _randomise(model: NetworkSelectionModel, generator: torch.Generator) -> int:
    """Random decisions for the conformance suite: the little network's classifier redrawn with large weights
    (its confidence then spreads over ``(1/K, 1)`` across inputs) and the threshold uniform in ``[0.3, 0.95]``.
    Returns how many tensors changed."""
    fc = classifier_of(model.net.little)[1]
    with torch.no_grad():
        fc.weight.copy_(torch.randn(fc.weight.shape, generator=generator) * 8.0 / fc.weight.shape[1] ** 0.5)
        model.net.gates.threshold.copy_(0.3 + 0.65 * torch.rand(model.net.gates.threshold.shape, generator=generator))
    return 2
