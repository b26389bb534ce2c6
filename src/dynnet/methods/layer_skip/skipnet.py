"""SkipNet — Wang, Yu, Dou, Darrell & Gonzalez, "SkipNet: Learning Dynamic Routing in Convolutional Networks",
ECCV 2018. https://openaccess.thecvf.com/content_ECCV_2018/papers/Xin_Wang_Techniques_for_Learning_ECCV_2018_paper.pdf
(arXiv:1711.09485)

A gate before every residual block decides from the block's input whether the block runs. Three gate
designs of the paper: ``"ffgate1"`` and ``"ffgate2"`` (feed-forward convolutional gates, one per block) and
``"rnn"`` (the paper's default: each block's input is average-pooled and projected to ``embed`` dims, and
*one* LSTM with ``hidden`` units shared across all blocks turns the sequence of projections into decisions;
its hidden state is passed explicitly from block to block in :meth:`SkipNet.run`, never kept on a module).

Hybrid training, as in the paper: (1) ``phase="supervised"`` — supervised pre-training of soft gates:
the forward pass uses decisions thresholded at 0.5 and the backward pass the sigmoid's gradient
(straight-through sigmoid); (2) ``phase="reinforce"`` — decisions are sampled from ``Bernoulli(p)`` and
the gates are trained with REINFORCE on the reward ``-CE_n - alpha * max(0, macs_n / dense - budget)`` (accuracy
plus a computation reward), with a moving-average baseline, while the blocks keep the cross-entropy gradient.
Switch with :meth:`SkipNet.set_phase`. At inference a block runs when ``p > 0.5``.

Departures from the paper:
* the supervised phase adds the MAC-budget loss (``budget_weight``; set it to 0 for the paper's pure
  cross-entropy pre-training) so that a short pre-training already approaches the budget;
* the paper gives each gate its own reward (a computation reward at each skipped gate and ``-loss`` at the
  end); we use one per-sample return for every gate of the sample, which is the same objective without
  per-gate credit assignment;
* the computation term only charges the MACs above the budget (``max(0, macs_n / dense - budget)``, the paper
  charges all of them), so that the reinforce phase holds samples at the budget instead of trading accuracy for
  ever fewer MACs at a rate set by ``alpha`` alone;
* the feed-forward gates are simplified: FFGate-I is two stride-2 3×3 conv-BN-ReLU layers, FFGate-II one,
  both followed by global pooling and a linear layer (the paper adds max pooling and sizes them per stage);
* gates start open (bias trick), so the converted network reproduces the base network before training.

Budget: trained and calibrated. ``budget`` (the target mean fraction of the dense MACs per image, gates included) is
the target of the supervised phase's MAC-budget loss and the point above which the reinforce phase's computation
reward charges a sample's MACs (weight ``alpha``, the paper's knob); calibration then shifts the keep logit of every
gate by one offset (``calibration[0]``) until the mean MAC fraction on held-out images equals the budget.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.blocks import DecisionMaker, LogitEntry
from dynnet.convert import Targets, first_conv_in_channels, network_layout, replace_module, residual_blocks
from dynnet.core import Decision, DynamicModel, LossOutput, Trace, current_trace, tracing_or_compiling
from dynnet.core.budget import BudgetPolicy, Knob
from dynnet.core.recipe import recipe
from dynnet.estimators import straight_through_sigmoid
from dynnet.estimators.reinforce import (
    bernoulli_entropy,
    bernoulli_log_prob,
    moving_average,
    reinforce_loss,
    sample_bernoulli,
)
from dynnet.gates import open_bias_
from dynnet.methods.layer_skip._resnet import gate_logit_knob
from dynnet.methods.layer_skip.gated_residual import GatedResidual
from dynnet.testing.scramble import register_randomiser

__all__ = ["GATES", "PHASES", "SkipNet", "SkipNetConfig", "SkipNetGates"]

GATES = ("ffgate1", "ffgate2", "rnn")
PHASES = ("supervised", "reinforce")
# The feed-forward gates of every block run whether it is skipped or not (two or one stride-2 3×3 convolutions at the
# block's width, ~16 % / ~12 % of a basic block's body): with every block skipped the CIFAR ResNets still spend
# 0.18-0.23 (FFGate-I) and 0.14-0.20 (FFGate-II) of their dense MACs. The RNN gate costs almost nothing.
_FLOOR = {"ffgate1": 0.25, "ffgate2": 0.2, "rnn": 0.1}


@dataclass(frozen=True)
class SkipNetConfig:
    """Settings of SkipNet.

    Attributes:
        budget: target mean fraction of the dense MACs per image (gates included): the target of the supervised
            phase's MAC-budget loss, the point above which the reinforce phase charges MACs, and the target of
            calibration.
        gate: ``"rnn"`` (the paper's RNNGate, shared LSTM), ``"ffgate1"`` or ``"ffgate2"``.
        hidden: LSTM hidden units (10 in the paper).
        embed: size of each block's pooled projection fed to the LSTM (10 in the paper).
        phase: the training phase the model starts in (``"supervised"`` then ``"reinforce"``).
        alpha: weight of the computation term of the reward (the paper's alpha), charged per unit of MAC fraction
            above ``budget``.
        budget_weight: weight of the MAC-budget loss in the supervised phase.
        baseline_momentum: momentum of the moving-average reward baseline.
        entropy_weight: REINFORCE entropy bonus (0 in the paper).
    """

    budget: float = 0.5
    gate: str = "rnn"
    hidden: int = 10
    embed: int = 10
    phase: str = "supervised"
    alpha: float = 0.5
    budget_weight: float = 1.0
    baseline_momentum: float = 0.9
    entropy_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")


def _ff_gate(channels: int, convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(convs):
        layers += [nn.Conv2d(channels, channels, 3, 2, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), open_bias_(nn.Linear(channels, 1)))


class SkipNetGates(DecisionMaker):
    """All the gates of a SkipNet; :meth:`decide` gives block ``index``'s gate logit and the next LSTM state.

    Args:
        channels: input channels of each gated block, in execution order.
        names: dotted names of the gated blocks (for the MAC entries).
        kind: ``"ffgate1"``, ``"ffgate2"`` or ``"rnn"``.
        hidden: LSTM hidden size.
        embed: projection size.
    """

    def __init__(self, channels: list[int], names: list[str], kind: str, hidden: int, embed: int) -> None:
        super().__init__()
        self.kind, self.hidden, self.names = kind, hidden, list(names)
        if kind == "rnn":
            self.proj = nn.ModuleList(nn.Linear(c, embed) for c in channels)
            self.lstm_x = nn.Linear(embed, 4 * hidden)
            self.lstm_h = nn.Linear(hidden, 4 * hidden, bias=False)
            self.out = open_bias_(nn.Linear(hidden, 1))
        else:
            self.ff = nn.ModuleList(_ff_gate(c, 2 if kind == "ffgate1" else 1) for c in channels)

    def open_logits(self) -> list[LogitEntry]:
        """The keep logit is the output of the shared LSTM's output layer (RNN gate) or of each feed-forward gate's
        last linear layer: shift those biases."""
        if self.kind == "rnn":
            return [(self.out.bias, None, 1.0)]
        return [(ff[-1].bias, None, 1.0) for ff in self.ff]

    def initial_state(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Zero LSTM state ``(h, c)``, each Tensor[N, hidden], for a batch like ``x``."""
        z = x.new_zeros(x.shape[0], self.hidden)
        return z, z

    def _step(self, index: int, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.kind != "rnn":
            return self.ff[index](x).squeeze(1), h, c
        if not self.training and not tracing_or_compiling():
            return self._step_inference(index, x, h, c)
        e = self.proj[index](F.adaptive_avg_pool2d(x, 1).flatten(1))
        i, f, g, o = (self.lstm_x(e) + self.lstm_h(h)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return self.out(h).squeeze(1), h, c

    def _step_inference(self, index: int, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The RNN gate's step in eval: the same MACs as :meth:`_step` in four kernels (sum, the projection as one
        ``addmm``, one fused ``lstm_cell``, the output ``addmm``): at batch 1 a gate costs launches, not MACs."""
        proj = self.proj._modules[str(index)]._parameters
        lx, lh, out = (self._modules[k]._parameters for k in ("lstm_x", "lstm_h", "out"))
        e = torch.addmm(proj["bias"], x.sum((2, 3)), proj["weight"].t(), alpha=1.0 / (x.shape[2] * x.shape[3]))
        h, c = torch._VF.lstm_cell(e, (h, c), lx["weight"], lh["weight"], lx["bias"], None)
        return torch.addmm(out["bias"], h, out["weight"].t()).squeeze(1), h, c

    def decide(self, x: Tensor, h: Tensor, c: Tensor, index: int) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        """Gate ``index`` on block input Tensor[N, C, H, W] and state ``(h, c)`` → ``(logit Tensor[N], h, c)``."""
        out = self._step(index, x, h, c)
        t = current_trace()
        if t is not None:
            macs = self.cost(f"gate{index}", lambda m, a, b, s: m._step(index, a, b, s), x, h, c)
            t.record_macs(f"{self.names[index]}/gate", float(macs), batch_size=x.shape[0])
        return out


class SkipNet(DynamicModel):
    """A ResNet whose blocks are gated by SkipNet gates; ``phase`` selects the training objective."""

    def __init__(self, net: nn.Module, gates: SkipNetGates, *, config: SkipNetConfig, in_channels: int | None) -> None:
        super().__init__(net, recipe="skipnet", config=config, in_channels=in_channels)
        self.gates = gates
        self.layout = network_layout(net, needed_by="skipnet")
        self.phase = config.phase
        self.register_buffer("reward_baseline", torch.tensor(float("nan"), dtype=torch.float64))

    def budget_knob(self) -> Knob:
        """One offset added to the keep logit of every gate."""
        return gate_logit_knob(self)

    def set_phase(self, phase: str) -> None:
        """``"supervised"`` (straight-through sigmoid) or ``"reinforce"`` (sampled decisions, REINFORCE)."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        self.phase = phase

    def _decision(self, logit: Tensor) -> Decision:
        if not self.training:
            # p > 0.5 is logit > 0: the comparison does not wait for the sigmoid (kept as ``soft`` for logs).
            return Decision((logit > 0).to(logit.dtype), torch.sigmoid(logit), "layer")
        if self.phase == "supervised":
            hard, prob = straight_through_sigmoid(logit)
            return Decision(hard, prob, "layer")
        prob = torch.sigmoid(logit)
        return Decision(sample_bernoulli(prob), prob, "layer")

    def run(self, x: Tensor) -> Tensor:
        y = self.layout.stem(self.net, x)
        h, c = self.gates.initial_state(y)
        index = 0
        for _, block in self.layout.blocks(self.net):
            if not isinstance(block, GatedResidual):
                y = block(y)
                continue
            out = self.gates(y, h, c, index)
            index += 1
            if out is None:  # dense mode: the base network, no gate evaluated
                y = block(y)
                continue
            logit, h, c = out
            y = block(y, self._decision(logit))
        return self.layout.head(self.net, y)

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        """Supervised phase: CE + budget loss. Reinforce phase: CE + REINFORCE on the SkipNet reward
        ``-CE_n - alpha * max(0, macs_n / dense - budget)``."""
        cfg: SkipNetConfig = self.config
        budget = cfg.budget if budget is None else budget
        ce = F.cross_entropy(logits, target, reduction="none")
        task = ce.mean()
        parts = {"task": float(task.detach())}
        if self.phase == "supervised":
            b = t.budget_loss(budget)
            parts["budget"] = float(b.detach())
            return LossOutput(task + cfg.budget_weight * b, parts)
        decisions = list(t.decisions_of("layer").values())
        prob = torch.stack([d.soft for d in decisions], 1)
        action = torch.stack([d.hard for d in decisions], 1)
        over = (t.macs().detach() / t.dense_macs() - budget).clamp(min=0.0)
        reward = -ce.detach().double() - cfg.alpha * over
        with torch.no_grad():
            if torch.isnan(self.reward_baseline):
                self.reward_baseline.copy_(reward.mean())
            baseline = self.reward_baseline.clone()
            self.reward_baseline.copy_(moving_average(self.reward_baseline, reward, cfg.baseline_momentum))
        rl = reinforce_loss(
            bernoulli_log_prob(prob, action),
            reward,
            baseline,
            entropy=bernoulli_entropy(prob),
            entropy_weight=cfg.entropy_weight,
        )
        parts.update(reinforce=float(rl.detach()), reward=float(reward.mean()))
        return LossOutput(task + rl, parts)


@recipe(
    "skipnet",
    paper="SkipNet: Learning Dynamic Routing in Convolutional Networks (ECCV 2018), arXiv:1711.09485",
    budget=BudgetPolicy("trained+calibrated", knob="gate logit offset", reachable=(0.1, 1.0),
                        derives="supervised phase: target of the MAC-budget loss = budget; reinforce phase: the "
                        "computation reward charges alpha per unit of MAC fraction above budget",
                        # standard profile, 2026-12-07: trained at 0.5 (90.01 %), calibrated to 0.25: 36.65 %
                        transfers=False),
)  # fmt: skip
def convert(model: nn.Module, config: SkipNetConfig, targets: Targets = "auto") -> SkipNet:
    """Gate every target residual block of ``model`` (a ResNet-style network) with SkipNet gates (in place)."""
    if config.budget < _FLOOR[config.gate]:
        raise ValueError(
            f"skipnet with {config.gate!r} gates reaches MAC fractions in [{_FLOOR[config.gate]:.2f}, 1.00] (its gates "
            f"run for every block); budget {config.budget} is outside: choose a budget in that range or gate='rnn'"
        )
    channels, names = [], []
    blocks = residual_blocks(model, targets)  # first: a network without residual blocks is refused for that
    layout = network_layout(model, needed_by="skipnet")
    order = {name: i for i, (name, _) in enumerate(layout.blocks(model))}
    found = sorted(blocks, key=lambda item: order.get(item[0], -1))
    for name, block, adapter in found:
        if name not in order:
            raise ValueError(f"skipnet gates blocks of the stages {layout.stage_names}; {name!r} is not one")
        channels.append(adapter.in_channels(block))
        names.append(name)
        new = GatedResidual(block, adapter, None)
        new.block_name = name
        replace_module(model, name, new)
    gates = SkipNetGates(channels, names, config.gate, config.hidden, config.embed)
    gates.block_name = "gates"
    return SkipNet(model, gates, config=copy.copy(config), in_channels=first_conv_in_channels(model))


@register_randomiser(SkipNet)
def _randomise(model: SkipNet, generator: torch.Generator) -> int:
    """Random gates whose decisions depend on the input (for the conformance suite); returns how many tensors
    changed.

    Weights are drawn ``N(0, 1 / fan_in)``, biases are zero and the layers that read a pooled feature map (the RNN
    gate's projections, each feed-forward gate's last layer) have zero-mean rows, so a keep logit is 0 for an
    input whose pooled channels are equal and its sign follows the input's channel pattern. The generic
    scrambling's ``N(0, 1)`` biases outweigh that pattern (pooled features of a random stem vary little across
    inputs): with it, every RNN gate of a ResNet-8 took one decision for every input at 30 of 32 seeds (most often
    every block on, or every block off). Batch norms of the feed-forward gates are kept.
    """

    def draw_(linear: nn.Module, centred: bool) -> int:
        w = torch.randn(linear.weight.shape, generator=generator) / linear.weight[0].numel() ** 0.5
        linear.weight.copy_(w - w.mean(1, keepdim=True) if centred else w)
        if linear.bias is None:
            return 1
        linear.bias.zero_()
        return 2

    gates = model.gates
    changed = 0
    with torch.no_grad():
        if gates.kind == "rnn":
            changed += sum(draw_(p, centred=True) for p in gates.proj)
            changed += sum(draw_(m, centred=False) for m in (gates.lstm_x, gates.lstm_h, gates.out))
        else:
            for ff in gates.ff:
                changed += sum(draw_(m, centred=False) for m in ff if isinstance(m, nn.Conv2d))
                changed += draw_(ff[-1], centred=True)
    return changed
