"""Dynamic channel execution — Spasov & Liò, "Dynamic Neural Network Channel Execution for Efficient Training",
BMVC 2019. https://arxiv.org/abs/1905.06435

Every gated layer runs a combinatorial multi-armed bandit whose arms are its channels. At each training step the
bandit picks the ``k`` channels to execute with the combinatorial upper confidence bound rule (CUCB),

    score_c = μ̂_c + α · sqrt(ln t / T_c)        (T_c = 0: +∞, every channel is tried first),

the same subset for the whole batch; only those channels run forward and backward, and each played channel's
reward is observed. The reward is the channel's estimated importance from the training signal: the first-order
Taylor saliency of its activation ``a`` (Molchanov et al.), ``mean_n |Σ_{hw} a · ∂L/∂a|``, divided by the largest
value among the played channels of that step so that rewards lie in ``[0, 1]`` as CUCB assumes; ``μ̂_c`` is the
running mean of channel ``c``'s rewards and ``T_c`` how often it was played. At inference the subset is fixed:
the ``k`` channels of highest estimated value ``μ̂`` (ties to the lowest index), a compact static network.

The bandit statistics ``value`` (μ̂), ``count`` (T), ``steps`` (t) and ``keep`` (k) are buffers of the block's
``gate`` submodule (saved in the state_dict). The selection advances ``steps`` in training-mode forward passes;
the rewards are observed by a hook on the inner activation's gradient during the backward pass (under no_grad).
Nothing per-batch is kept on modules: the hook's closure holds the activation for the one backward pass.

Where the channels are: the inner channels of each basic residual block (``conv1``'s outputs = ``conv2``'s inputs,
:class:`~dynnet.methods.channel.ChannelGatedBlock`): ``conv1`` computes and ``conv2`` reads only the kept ones.
Sparse mode folds the batch norms and runs one sliced convolution pair for the whole batch (the mask is shared:
:func:`dynnet.kernels.channel.sliced_pair`, strategy ``groups`` with one group). MACs: ``k / C`` of the branch.
Each block keeps ``k`` of its ``C`` inner channels, ``k = floor(f · C + phase)`` (at least 1) for one kept fraction
``f`` and a per-block phase spread over [0, 1) (so that the blocks' one-channel steps interleave); the objective is
plain cross-entropy (the budget is a hard constraint, not a loss).

Departures from the paper:
* the paper gates the output channels of every convolution of VGG/ResNet/DenseNet; here the inner channels of
  basic residual blocks (the residual stream stays dense);
* the reward: the paper derives channel rewards from the training signal as well, but its exact formula and
  normalisation may differ from the Taylor saliency normalised per step used here;
* training runs in masked mode (dense convolutions × the channel mask), so the training compute saving is
  theoretical here (``t.macs()`` shows it; the trace's executed MACs are dense); real skipping is in sparse mode
  (inference);
* ``μ̂`` is a plain running mean over the whole training run (non-stationary rewards are not discounted);
* the paper fixes ``k`` per layer; here it is derived from the MAC budget (below);
* the default ``budget = 1.0`` keeps every channel, so a fresh conversion reproduces the base network.

Budget: calibrated. ``budget`` is the target fraction of the dense MACs; the paper's knob, the number ``k`` of
channels each bandit plays, is derived from it at conversion: the kept fraction ``f`` whose MAC fraction on a
nominal ``C × 32 × 32`` input is closest to the budget (the subset is the same for every input, so that fraction is
exact for any input of that size). ``k`` is each bandit's ``keep`` buffer (the inference subset and the compiled
batch-1 call's plan are keyed on it) and ``f`` is kept in ``calibration[0]``; calibration sets one ``f`` for every
block until the MAC fraction on held-out images equals the budget. Reachable (declared): 0.1 to 1; one channel per
block costs 0.09 of a ResNet-8 and 0.02 of a ResNet-20.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.convert import Targets, first_conv_in_channels
from dynnet.core import Decision, DynamicModel, LossOutput, Trace
from dynnet.core.budget import BudgetPolicy, Knob
from dynnet.core.cache import tracing_or_compiling, version_key
from dynnet.core.recipe import recipe
from dynnet.kernels.channel import GATE_GIVEN, NativeGate
from dynnet.methods.channel._block import ChannelGatedBlock, convert_blocks, gated_channels
from dynnet.methods.channel._budget import block_phases, derive_fraction, kept_channels, top_k_keep
from dynnet.testing.scramble import register_randomiser

__all__ = [
    "ChannelBandit",
    "DynamicChannelExec",
    "DynamicChannelExecBlock",
    "DynamicChannelExecConfig",
    "cucb_scores",
    "taylor_reward",
    "top_k_mask",
]


@dataclass(frozen=True)
class DynamicChannelExecConfig:
    """Settings of dynamic channel execution.

    Attributes:
        budget: target mean fraction of the dense MACs per image. The number ``k`` of inner channels each block
            executes (the paper's knob) is derived from it at conversion; 1.0 keeps every channel.
        exploration: ``α`` of the CUCB bonus ``α · sqrt(ln t / T_c)`` (``sqrt(3/2)``: the CUCB bound).
        strategy: sparse-mode batch strategy (:mod:`dynnet.kernels.channel`; one shared mask → one group).
    """

    budget: float = 1.0
    exploration: float = math.sqrt(1.5)
    strategy: str = "auto"

    def __post_init__(self) -> None:
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be a fraction in (0, 1] of the dense MACs, got {self.budget}")
        if self.exploration < 0:
            raise ValueError(f"exploration must be non-negative, got {self.exploration}")


# -- pure functions ------------------------------------------------------------------------------------------------


def cucb_scores(value: Tensor, count: Tensor, step: int, exploration: float) -> Tensor:
    """CUCB indices ``μ̂ + α·sqrt(ln t / T)`` of Tensor[C] statistics; ``+∞`` for arms never played."""
    bonus = exploration * torch.sqrt(math.log(max(step, 1)) / count.clamp_min(1e-12))
    return torch.where(count > 0, value + bonus, torch.full_like(value, math.inf))


def top_k_mask(scores: Tensor, k: int | Tensor) -> Tensor:
    """Tensor[C] bool: the ``k`` highest scores (ties to the lowest index).

    ``k`` may be a 0-dim tensor (a buffer): no value leaves the device, so meta-tensor cost probes run it too.
    """
    return top_k_keep(scores, k)


def taylor_reward(activation: Tensor, grad: Tensor) -> Tensor:
    """First-order Taylor saliency per channel, ``mean_n |Σ_{hw} a · ∂L/∂a|``: Tensor[N, C, H, W] ×2 → Tensor[C]."""
    return (activation * grad).sum((2, 3)).abs().mean(0)


# -- the bandit and the block --------------------------------------------------------------------------------------


class ChannelBandit(nn.Module):
    """A combinatorial UCB bandit over ``channels`` arms choosing ``keep`` of them; statistics are buffers.

    Args:
        channels: C, the number of arms.
        keep: k, the arms played per round.
        exploration: ``α`` of the UCB bonus.
    """

    def __init__(self, channels: int, keep: int, exploration: float) -> None:
        super().__init__()
        if not 1 <= keep <= channels:
            raise ValueError(f"keep must be in [1, {channels}], got {keep}")
        self.exploration = float(exploration)
        self.register_buffer("value", torch.zeros(channels))
        self.register_buffer("count", torch.zeros(channels))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("keep", torch.tensor(keep, dtype=torch.long))
        self._fixed: tuple[tuple, tuple[Tensor, Tensor]] | None = None

    @property
    def channels(self) -> int:
        return self.value.shape[0]

    def fixed(self) -> Tensor:
        """The inference subset: Tensor[C] bool, the ``k`` arms of highest estimated value.

        Cached while ``value`` and ``keep`` are unchanged (:func:`~dynnet.core.cache.version_key`): a training
        round or ``load_state_dict`` edits them in place and so recomputes it.
        """
        return self._fixed_pair()[0]

    def fixed_scale(self) -> Tensor:
        """:meth:`fixed` as Tensor[1, C] float32 0/1 channel multipliers (cached with it)."""
        return self._fixed_pair()[1]

    def _fixed_pair(self) -> tuple[Tensor, Tensor]:
        key = None if tracing_or_compiling() else version_key(self.value, self.keep)
        if key is not None and self._fixed is not None and self._fixed[0] == key:
            return self._fixed[1]
        with torch.inference_mode(False), torch.no_grad():
            mask = top_k_mask(self.value, self.keep)
            pair = (mask, mask.to(torch.float32).unsqueeze(0))
        if key is not None:
            self._fixed = (key, pair)
        return pair

    def explore_(self) -> Tensor:
        """One training round: advance ``t`` and return the CUCB choice, Tensor[C] bool."""
        with torch.no_grad():
            self.steps += 1
            return top_k_mask(cucb_scores(self.value, self.count, int(self.steps), self.exploration), self.keep)

    def update_(self, played: Tensor, reward: Tensor) -> None:
        """Observe the rewards (Tensor[C], in [0, 1]) of the played arms (Tensor[C] bool): running means."""
        with torch.no_grad():
            p = played.to(self.count.device)
            self.count += p.to(self.count.dtype)
            delta = (reward.to(self.value) - self.value) / self.count.clamp_min(1.0)
            self.value += torch.where(p, delta, torch.zeros_like(delta))

    def observe_(self, played: Tensor, activation: Tensor, grad: Tensor) -> None:
        """Reward the played arms with their Taylor saliency, normalised by the largest among them."""
        r = taylor_reward(activation.detach(), grad.detach()).float()
        top = r[played].max() if bool(played.any()) else r.new_ones(())
        self.update_(played, r / top.clamp_min(1e-12))

    def forward(self, x: Tensor) -> Tensor:
        """Tensor[N, ...] → the inference subset for every sample, Tensor[N, C] bool (no MACs)."""
        return self.fixed().unsqueeze(0).expand(x.shape[0], -1)


class DynamicChannelExecBlock(ChannelGatedBlock):
    """A basic block whose inner channels are chosen by a bandit (the same subset for the whole batch)."""

    def decide(self, x: Tensor) -> tuple[Decision, Tensor]:
        # Training: a CUCB round per step (the selection changes from step to step); inference: the fixed subset.
        chosen = self.gate.explore_().unsqueeze(0).expand(x.shape[0], -1) if self.training else self.gate(x)
        hard = chosen.to(x.dtype if x.is_floating_point() else torch.float32)
        return Decision(hard=hard, soft=None, granularity="channel"), hard

    def sparse_scale(self, x: Tensor) -> Tensor:
        # Inference: the fixed subset, the same for every sample (Tensor[1, C] broadcasts over the batch).
        if self.training or x.dtype != torch.float32:
            return super().sparse_scale(x)
        return self.gate.fixed_scale().expand(x.shape[0], -1)

    def native_gate(self) -> NativeGate | None:
        # The fixed subset as given binary multipliers; the plan is rebuilt when the bandit's statistics change.
        bandit = self.gate
        s = bandit.fixed_scale().reshape(-1)
        return NativeGate(GATE_GIVEN, s, s, s, s, 1, (bandit.value, bandit.keep))

    def forward_masked(self, x: Tensor, decision: Decision | None = None, scale: Tensor | None = None) -> Tensor:
        d, s = self._decision(x, decision, scale)
        a = self.inner(x)
        h = a * s.to(a.dtype)[:, :, None, None]
        if self.training and h.requires_grad and decision is None:
            played = s[0].detach() > 0
            # The bandit's feedback: ∂L/∂h equals ∂L/∂a on the played channels (0 elsewhere, unobserved arms).
            act, bandit = a.detach(), self.gate

            def observe(g: Tensor) -> None:  # returns None: the gradient itself is left unchanged
                bandit.observe_(played, act, g)

            h.register_hook(observe)
        out = self.post(self.shortcut(x) + self.outer(h))
        self._record(x, d, executed_channels=None)
        return out


class DynamicChannelExec(DynamicModel):
    """The converted network. Objective: cross-entropy (the kept fraction is fixed by ``budget``)."""

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        task = F.cross_entropy(logits, target)
        return LossOutput(task, {"task": float(task.detach())})

    def bandits(self) -> list[ChannelBandit]:
        """The bandits of every gated block, in execution order."""
        return [m.gate for m in self.modules() if isinstance(m, DynamicChannelExecBlock)]

    def set_keep_fraction(self, fraction: float) -> None:
        """Give every bandit ``k = max(1, floor(fraction · C + phase))`` channels to play (phases spread over the
        blocks); the fraction is kept in ``calibration[0]``."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"the kept fraction must be in [0, 1], got {fraction}")
        bandits = self.bandits()
        with torch.no_grad():  # in place: the inference subsets and plans keyed on `keep` are rebuilt
            for bandit, phase in zip(bandits, block_phases(len(bandits)), strict=True):
                bandit.keep.fill_(kept_channels(fraction, bandit.channels, phase))
            self.calibration[0] = float(fraction)

    def budget_knob(self) -> Knob:
        """The kept fraction ``f`` of every bandit (one value; the MACs grow with it)."""
        return Knob("kept channel fraction", lambda: float(self.calibration[0]), self.set_keep_fraction, 0.0, 1.0)


@recipe(
    "dynamic_channel_exec",
    paper="Dynamic Neural Network Channel Execution for Efficient Training (BMVC 2019), arXiv:1905.06435",
    budget=BudgetPolicy("calibrated", knob="kept channel fraction", reachable=(0.1, 1.0),
                        derives="k of every bandit, from the kept fraction whose MAC fraction on a nominal 32x32 input "
                        "is the budget (budget 1: every channel)",
                        # standard profile, 2026-12-07: trained at 0.5 (91.63 %), calibrated to 0.75: 88.28 %
                        transfers=False),
    input_dependent=False,
)  # fmt: skip
def convert(model: nn.Module, config: DynamicChannelExecConfig, targets: Targets = "auto") -> DynamicChannelExec:
    """Put a channel bandit on the inner channels of every target residual block of ``model`` (in place): basic
    blocks, Bottlenecks and inverted residuals (:mod:`~dynnet.methods.channel._layout`)."""

    def make(name: str, block: nn.Module, adapter) -> DynamicChannelExecBlock:
        c = gated_channels(block)
        return DynamicChannelExecBlock(
            block, adapter, ChannelBandit(c, c, config.exploration), strategy=config.strategy
        )

    blocks = convert_blocks(model, targets, make)
    net = DynamicChannelExec(
        model, recipe="dynamic_channel_exec", config=copy.copy(config), in_channels=first_conv_in_channels(model)
    )
    phases = block_phases(len(blocks))
    net.set_keep_fraction(
        derive_fraction(net, blocks, config.budget, lambda f, i: kept_channels(f, blocks[i].channels, phases[i]))
    )
    return net


@register_randomiser(DynamicChannelExec)
def _randomise(model: DynamicChannelExec, generator: torch.Generator) -> int:
    """Random statistics for every bandit, which then plays a random 20-80 % of its ``k`` channels (at least one,
    fewer than all); returns their number.

    The conformance suite's scrambling: the bandit statistics are the decisions, and they are buffers. ``k``
    shrinks from its value (derived from the budget) rather than being redrawn, so conversions at different
    budgets stay different after scrambling.
    """
    for bandit in model.bandits():
        c = bandit.channels
        with torch.no_grad():
            bandit.value.copy_(torch.rand(c, generator=generator))
            bandit.count.copy_(torch.randint(1, 50, (c,), generator=generator).float())
            bandit.steps.fill_(int(bandit.count.sum()))
            frac = 0.2 + 0.6 * float(torch.rand((), generator=generator))
            bandit.keep.fill_(min(c - 1, max(1, round(frac * int(bandit.keep)))) if c > 1 else 1)
    return len(model.bandits())
