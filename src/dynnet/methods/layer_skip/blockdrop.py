"""BlockDrop — Wu, Nagarajan, Kumar, Rennie, Davis, Grauman & Feris, "BlockDrop: Dynamic Inference Paths in
Residual Networks", CVPR 2018. https://openaccess.thecvf.com/content_cvpr_2018/papers/Wu_BlockDrop_Dynamic_Inference_CVPR_2018_paper.pdf
(arXiv:1711.08393)

A separate policy network (a small CIFAR ResNet-8) looks once at a downsampled copy of the image and
outputs, for every residual block of the main network, the probability of keeping it. Training uses
REINFORCE with a *self-critical* baseline (the reward of the greedy, thresholded policy on the same
images), the reward being ``1 - (kept blocks / blocks)^2`` for a correct prediction and ``-penalty`` for a
wrong one (accuracy-aware block savings), minus ``budget_weight × (m − budget)²`` with ``m`` the sample's MAC
fraction (a budget term the paper does not have, see below), an exploration bound
``p' = alpha p + (1 - alpha)(1 - p)`` on the sampling probabilities, and a curriculum: with
``model.curriculum = k`` only the last ``k`` blocks are decided by the policy during training, the others are kept.
At inference a block runs when ``p > 0.5``.

Departures from the paper:
* the policy and the main network are trained jointly from the start (the paper's joint fine-tuning
  stage; the cross-entropy of the sampled path trains the main network, weight ``ce_weight``); freeze
  the main network's parameters yourself to reproduce the paper's first stage;
* the greedy pass for the self-critical baseline runs in the same training mode as the sampled pass, so
  batch-norm statistics are updated by both;
* the policy sees a ``policy_resolution``² average-pooled image (the paper uses 112² for ImageNet and the
  full 32² CIFAR image);
* the paper's trade-off is ``penalty`` alone; the reward here also charges ``budget_weight × (m − budget)²`` (the
  sampled and the greedy policy alike), so that training pulls each image's MAC fraction towards the budget
  (``budget_weight=0``: the paper's reward);
* the policy starts open (bias trick), so the converted network reproduces the base network.

Budget: trained and calibrated. ``budget`` (the target mean fraction of the dense MACs per image, the policy network
included) is the centre of the reward's budget term; calibration then shifts every keep logit of the policy by one
offset (``calibration[0]``, added to the bias of its last layer) until the mean MAC fraction on held-out images equals
the budget. ``penalty`` (the paper's gamma) keeps its meaning.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.blocks import DecisionMaker, LogitEntry
from dynnet.convert import Targets, first_conv_in_channels, network_layout, replace_module, residual_blocks
from dynnet.core import Decision, DynamicModel, LossOutput, Trace, current_trace, no_trace
from dynnet.core.budget import BudgetPolicy, Knob
from dynnet.core.recipe import recipe
from dynnet.estimators.reinforce import (
    bernoulli_entropy,
    bernoulli_log_prob,
    reinforce_loss,
    sample_bernoulli,
    self_critical_advantage,
)
from dynnet.gates import open_bias_
from dynnet.methods.layer_skip._resnet import gate_logit_knob
from dynnet.methods.layer_skip.gated_residual import GatedResidual
from dynnet.models import build_base_model

__all__ = ["BlockDrop", "BlockDropConfig", "PolicyNetwork", "blockdrop_reward"]


@dataclass(frozen=True)
class BlockDropConfig:
    """Settings of BlockDrop.

    Attributes:
        budget: target mean fraction of the dense MACs per image (the policy network included): the centre of the
            reward's budget term and the target of calibration.
        policy_width: width multiplier of the ResNet-8 policy network.
        policy_resolution: side of the average-pooled image the policy sees.
        penalty: reward of a wrong prediction is ``-penalty`` (the paper's gamma).
        budget_weight: weight of the reward's budget term ``(m − budget)²``, ``m`` the image's MAC fraction
            (0: the paper's reward).
        alpha: exploration bound of the sampling probabilities (0.8 in the paper).
        ce_weight: weight of the main network's cross-entropy (joint fine-tuning).
        entropy_weight: REINFORCE entropy bonus.
    """

    budget: float = 0.5
    policy_width: float = 0.5
    policy_resolution: int = 16
    penalty: float = 5.0
    budget_weight: float = 1.0
    alpha: float = 0.8
    ce_weight: float = 1.0
    entropy_weight: float = 0.0

    def __post_init__(self) -> None:
        if not self.policy_width > 0 or self.policy_resolution < 1:
            raise ValueError(
                f"policy_width must be positive and policy_resolution >= 1, got {self.policy_width}, "
                f"{self.policy_resolution}"
            )
        if not 0.5 <= self.alpha <= 1.0:
            raise ValueError(f"alpha (the exploration bound) must be in [0.5, 1], got {self.alpha}")
        if not self.budget_weight >= 0:
            raise ValueError(f"budget_weight must be >= 0, got {self.budget_weight}")


def blockdrop_reward(
    correct: Tensor,
    kept_fraction: Tensor,
    penalty: float,
    mac_fraction: Tensor | None = None,
    budget: float = 1.0,
    budget_weight: float = 0.0,
) -> Tensor:
    """BlockDrop's reward: ``1 - f^2`` when correct, ``-penalty`` otherwise, minus ``budget_weight × (m - budget)^2``;
    Tensor[N] float64 (no gradient).

    Args:
        correct: Tensor[N] bool.
        kept_fraction: Tensor[N] fraction of blocks kept, ``f``.
        penalty: the paper's gamma.
        mac_fraction: Tensor[N] MAC fraction ``m`` of each image (``None``: no budget term).
        budget: the target MAC fraction.
        budget_weight: weight of the budget term (0: the paper's reward).
    """
    f = kept_fraction.detach().double()
    reward = torch.where(correct, 1.0 - f**2, torch.full_like(f, -float(penalty)))
    if mac_fraction is not None and budget_weight:
        reward = reward - budget_weight * (mac_fraction.detach().double() - budget) ** 2
    return reward


class PolicyNetwork(DecisionMaker):
    """Image Tensor[N, C, H, W] → keep logits Tensor[N, B] for the ``B`` blocks, from a ResNet-8 on a pooled image."""

    def __init__(self, in_channels: int, num_blocks: int, width: float, resolution: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.net = build_base_model("cifar_resnet8", num_classes=num_blocks, in_channels=in_channels, width=width)
        open_bias_(self.net.fc)

    def _logits(self, x: Tensor) -> Tensor:
        return self.net(F.adaptive_avg_pool2d(x, self.resolution))

    def open_logits(self) -> list[LogitEntry]:
        """The keep logits are the outputs of the policy's last linear layer: shift its bias."""
        return [(self.net.fc.bias, None, 1.0)]

    def decide(self, x: Tensor) -> Tensor:  # type: ignore[override]
        logits = self._logits(x)
        t = current_trace()
        if t is not None:
            macs = self.cost("policy", lambda m, inp: m._logits(inp), x)
            t.record_macs("policy", float(macs), batch_size=x.shape[0])
        return logits


class BlockDrop(DynamicModel):
    """A ResNet whose blocks are kept or dropped by one policy network that sees the image once.

    Attributes:
        curriculum: in training, the number of last blocks the policy decides (the others are kept);
            ``None``: all blocks.
    """

    def __init__(self, net: nn.Module, policy: PolicyNetwork, *, config: BlockDropConfig, in_channels: int | None):
        super().__init__(net, recipe="blockdrop", config=config, in_channels=in_channels)
        self.policy = policy
        self.layout = network_layout(net, needed_by="blockdrop")
        self.curriculum: int | None = None

    def budget_knob(self) -> Knob:
        """One offset added to every keep logit of the policy."""
        return gate_logit_knob(self, name="policy logit offset")

    def _forward_blocks(self, x: Tensor, action: Tensor | None, prob: Tensor | None) -> Tensor:
        y = self.layout.stem(self.net, x)
        index = 0
        for _, block in self.layout.blocks(self.net):
            if not isinstance(block, GatedResidual) or action is None:
                y = block(y)
            else:
                y = block(y, Decision(action[:, index], prob[:, index], "layer"))
                index += 1
        return self.layout.head(self.net, y)

    def run(self, x: Tensor) -> Tensor:
        logits = self.policy(x)
        if logits is None:  # dense mode: the base network, no policy evaluated
            return self._forward_blocks(x, None, None)
        prob = torch.sigmoid(logits)
        if not self.training:
            return self._forward_blocks(x, (prob > 0.5).to(prob.dtype), prob)
        a = self.config.alpha
        prob = a * prob + (1 - a) * (1 - prob)
        action = sample_bernoulli(prob)
        if self.curriculum is not None and self.curriculum < prob.shape[1]:
            fixed = prob.shape[1] - max(int(self.curriculum), 0)
            ones = torch.ones_like(prob[:, :fixed])
            action = torch.cat([ones, action[:, fixed:]], 1)
            prob = torch.cat([ones, prob[:, fixed:]], 1)
        out = self._forward_blocks(x, action, prob)
        t = current_trace()
        if t is not None:  # the self-critical baseline: the greedy policy on the same images
            greedy = (prob.detach() > 0.5).to(prob.dtype)
            with torch.no_grad(), no_trace():
                t.record_output("greedy_logits", self._forward_blocks(x, greedy, greedy))
            t.record_output("greedy_policy", greedy)
        return out

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        """``ce_weight`` × CE + REINFORCE (self-critical baseline when the greedy pass was recorded)."""
        cfg: BlockDropConfig = self.config
        budget = cfg.budget if budget is None else budget
        task = F.cross_entropy(logits, target)
        layer = t.decisions_of("layer")
        prob = torch.stack([d.soft for d in layer.values()], 1)
        action = torch.stack([d.hard for d in layer.values()], 1)
        # an image's MAC fraction under the sampled policy, and what a policy ``a`` would cost instead: only the
        # bodies of the blocks depend on the policy (Tensor[B] MACs each)
        entries = {e.name: e for e in t.entries}
        body = torch.tensor(
            [entries[f"{name}/body"].maximum for name in layer], dtype=torch.float64, device=action.device
        )
        dense = t.dense_macs()
        sampled = t.macs().detach() / dense
        fixed = sampled - action.detach().double() @ body / dense

        def reward_of(correct: Tensor, a: Tensor) -> Tensor:
            m = fixed + a.detach().double() @ body / dense
            return blockdrop_reward(correct, a.mean(1), cfg.penalty, m, budget, cfg.budget_weight)

        reward = reward_of(logits.argmax(1) == target, action)
        if "greedy_logits" in t.outputs:
            greedy = reward_of(t.outputs["greedy_logits"].argmax(1) == target, t.outputs["greedy_policy"])
            advantage = self_critical_advantage(reward, greedy)
        else:
            advantage = reward
        rl = reinforce_loss(
            bernoulli_log_prob(prob, action),
            advantage,
            entropy=bernoulli_entropy(prob),
            entropy_weight=cfg.entropy_weight,
        )
        parts = {"task": float(task.detach()), "reinforce": float(rl.detach()), "reward": float(reward.mean())}
        return LossOutput(cfg.ce_weight * task + rl, parts)


@recipe(
    "blockdrop",
    paper="BlockDrop: Dynamic Inference Paths in Residual Networks (CVPR 2018), arXiv:1711.08393",
    budget=BudgetPolicy("trained+calibrated", knob="policy logit offset", reachable=(0.15, 1.0),
                        derives="centre of the reward's budget term budget_weight·(m − budget)² (penalty stays)"),
)  # fmt: skip
def convert(model: nn.Module, config: BlockDropConfig, targets: Targets = "auto") -> BlockDrop:
    """Make every target residual block of ``model`` droppable by a BlockDrop policy network (in place)."""
    found = residual_blocks(model, targets)  # first: a network without residual blocks is refused for that
    layout = network_layout(model, needed_by="blockdrop")
    order = {name: i for i, (name, _) in enumerate(layout.blocks(model))}
    for name, block, adapter in found:
        if name not in order:
            raise ValueError(f"blockdrop drops blocks of the stages {layout.stage_names}; {name!r} is not one")
        new = GatedResidual(block, adapter, None)
        new.block_name = name
        replace_module(model, name, new)
    in_channels = first_conv_in_channels(model)
    policy = PolicyNetwork(in_channels or 3, len(found), config.policy_width, config.policy_resolution)
    policy.block_name = "policy"
    return BlockDrop(model, policy, config=copy.copy(config), in_channels=in_channels)
