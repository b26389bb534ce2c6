"""Visual attention for action recognition — Sharma, Kiros, Salakhutdinov, "Action Recognition using Visual
Attention", ICLR 2016 workshop. https://arxiv.org/abs/1511.04119

A CNN turns frame ``t`` into a feature map ``X_t`` of ``L = K × K`` locations; at every step an LSTM reads the
map through soft attention, ``x_t = sum_i l_{t,i} X_{t,i}`` with the location softmax
``l_t = softmax(W h_{t-1})`` computed from the previous hidden state alone, and predicts the class from ``h_t``.
The LSTM's initial memory and hidden state are MLPs of the mean feature (``c_0 = f_c(mean X)``,
``h_0 = f_h(mean X)``). A video's prediction is the average of the step predictions. The objective is the
cross-entropy of every step's prediction plus the paper's doubly stochastic attention regulariser
``lambda sum_i (1 - sum_t l_{t,i})^2``, which pushes the model to look at every location at some step
(:func:`doubly_stochastic_penalty`). The entropy of each step's attention (how focused it is) is recorded as
``visual_attention_action/entropy``.

Adaptation to image classification and to dynamic computation (departures from the paper):

* frames: there is no video. Frame ``t`` is the image translated by a fixed, deterministic offset of
  ``frame_shift`` pixels (zero fill; frame 0 is the image itself), standing in for the small motion between
  video frames; every frame gets its own CNN feature map, as every video frame does in the paper. With
  ``frame_shift=0`` every step reads the same image's feature map, which is then computed once;
* the CNN is the converted base network's trunk (its children up to the global pooling, e.g. the CIFAR
  ResNet's stem and stages), trained jointly; its map is average-pooled to ``grid × grid`` locations (the paper
  uses GoogLeNet's precomputed 7 × 7 × 1024 maps);
* the number of steps is learned per sample (the paper runs a fixed number of frames): a halting unit after
  every step gives ``h_t = sigmoid(w · h_t + b)`` and the sample stops by Graves's adaptive computation time
  rule (ACT, https://arxiv.org/abs/1603.08983: stop when ``sum h_t >= 1 - eps``; the last step always stops),
  trained with ACT's ponder cost ``N + R`` (weight ``ponder_weight``). The prediction is the average of the
  step predictions up to the halting step (the paper's average, over the steps taken), chosen among the running
  averages by a straight-through selection with ACT's mean-field gradient for the halting units. ACT rather
  than a confidence exit: the stop rule is learned with the rest and needs no threshold calibration. The
  halting unit starts closed (``h ≈ 0.0025``), so a fresh model runs every step. In sparse mode samples that
  stop leave the batch: later frames go through the CNN only for the samples still looking, which is where the
  compute goes;
* the initial state is computed from the mean feature of frame 0 (the paper averages over all frames, which a
  model that decides when to stop cannot see in advance);
* one LSTM layer of ``hidden`` units and a one-layer ``tanh`` initialisation (the paper: three LSTM layers and
  MLPs); the LSTM is written with two linear layers so that its products are counted matmuls;
* the objective's per-step cross-entropy averages over the steps a sample took (weight ``step_weight``) and adds
  the cross-entropy of the prediction (the average up to the halting step); the regulariser sums over the steps
  taken. With fewer steps than locations (``T < L``) it cannot reach 0: its minimum, ``L (1 - T / L)^2``, is
  attention spread uniformly; weight decay (the paper's third term) is left to the optimiser;
* a MAC-budget loss is added to ACT's ponder cost (below);
* ``reproduces_base=False``: the classifier is a new LSTM; the base network gives the CNN, channels and classes.

Budget: trained and calibrated. ``budget`` is the target mean fraction of the dense MACs per image (every frame
through the CNN and the LSTM, the halting units included). Neither paper has a budget: ACT's knob is the time
penalty ``tau`` (``ponder_weight``), which trades accuracy for compute at no fixed rate, so it is kept as is; the
budget adds the MAC-budget loss ``budget_weight * (mean MAC fraction - budget)^2``, which reaches the halting unit
through straight-through "step ran" indicators (exact in the forward pass, Graves's mean-field gradient), so the
mean number of steps is pulled to the one the budget pays for. Calibration then subtracts one offset from the
halting logit (``calibration[0]``, kept in the halting bias) until the mean MAC fraction on held-out images equals
the budget. Reachable: from one step (``1 / max_steps`` of the dense MACs with ``frame_shift > 0``) to every step.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.convert import Targets, classifier_of, first_conv_in_channels
from dynnet.core import Decision, DynamicBlock, DynamicModel, LossOutput, Trace, current_trace
from dynnet.core.budget import BudgetPolicy, Knob, LogitShift
from dynnet.core.recipe import recipe
from dynnet.estimators.ponder import act_weights, halts, ponder_cost, straight_through_select
from dynnet.gates import open_bias_

__all__ = [
    "AttentionLSTM",
    "VisualAttentionAction",
    "VisualAttentionActionConfig",
    "VisualAttentionActionModel",
    "attention_entropy",
    "convert",
    "doubly_stochastic_penalty",
    "shift_frame",
]

NAME = "visual_attention_action"
_CLOSED = -6.0  # halting logit at start: h = 0.0025, every sample takes every step
# Direction of frame t's translation (multiplied by frame_shift, and by 2 from the tenth frame on, ...).
_DIRECTIONS = ((0, 0), (1, 0), (0, 1), (-1, 0), (0, -1), (1, 1), (-1, -1), (1, -1), (-1, 1))


@dataclass(frozen=True)
class VisualAttentionActionConfig:
    """Settings of the visual-attention LSTM.

    Attributes:
        budget: target mean fraction of the dense MACs per image: the target of the MAC-budget loss on the halting
            unit and of calibration (the halting logit offset).
        max_steps: T, frames (steps) at most per image.
        frame_shift: pixels between successive frames; 0: every step reads the same feature map (computed once).
        grid: K, the feature map is average-pooled to K × K attention locations.
        hidden: LSTM width.
        eps: ACT's epsilon (a sample stops when its halting probabilities sum to ``1 - eps``).
        ponder_weight: weight of ACT's ponder cost ``N + R`` (Graves's tau).
        attention_weight: lambda, weight of the doubly stochastic attention regulariser.
        step_weight: weight of the mean cross-entropy of the steps taken (the paper's per-step loss).
        budget_weight: weight of the MAC-budget loss (0: ACT's ponder cost alone sets the number of steps).
    """

    budget: float = 0.5
    max_steps: int = 4
    frame_shift: int = 2
    grid: int = 4
    hidden: int = 128
    eps: float = 0.01
    ponder_weight: float = 0.01
    attention_weight: float = 1.0
    step_weight: float = 1.0
    budget_weight: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")
        if self.budget_weight < 0:
            raise ValueError(f"budget_weight must be >= 0, got {self.budget_weight}")
        if self.max_steps < 2:
            raise ValueError(f"max_steps must be at least 2, got {self.max_steps}")
        if self.frame_shift < 0 or self.grid < 1 or self.hidden < 1:
            raise ValueError(
                f"frame_shift must be >= 0 and grid, hidden >= 1, got {self.frame_shift}, {self.grid}, {self.hidden}"
            )
        if not 0 < self.eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {self.eps}")


def shift_frame(x: Tensor, t: int, shift: int) -> Tensor:
    """Frame ``t``: Tensor[N, C, H, W] translated by ``shift`` pixels in the ``t``-th direction, zero fill (0 MACs).

    Frame 0 is ``x`` itself; directions cycle through the 8 neighbours, with twice the shift on the next cycle.
    """
    dx, dy = _DIRECTIONS[t % len(_DIRECTIONS)]
    scale = shift * (1 + t // len(_DIRECTIONS))
    dx, dy = dx * scale, dy * scale
    if dx == 0 and dy == 0:
        return x
    h, w = x.shape[-2:]
    p = max(abs(dx), abs(dy))
    padded = F.pad(x, (p, p, p, p))
    return padded[..., p - dy : p - dy + h, p - dx : p - dx + w]


def doubly_stochastic_penalty(attention: Tensor, taken: Tensor | None = None) -> Tensor:
    """The paper's attention regulariser ``sum_i (1 - sum_t l_{t,i})^2`` per sample.

    Args:
        attention: Tensor[N, T, L] attention maps (each row sums to 1 over the L locations).
        taken: Tensor[N, T] 0/1, the steps each sample took (``None``: all).

    Returns:
        Tensor[N]; 0 exactly when every location gets a total attention of 1 over the steps (e.g. ``T = L`` steps
        of uniform attention, or one location per step, each once).
    """
    a = attention if taken is None else attention * taken[:, :, None].to(attention.dtype)
    return ((1.0 - a.sum(1)) ** 2).sum(1)


def attention_entropy(attention: Tensor) -> Tensor:
    """Entropy (nats) of each attention map: Tensor[..., L] → Tensor[...]; ``log L`` for uniform attention."""
    return -(attention * attention.clamp_min(1e-12).log()).sum(-1)


def _trunk_of(model: nn.Module) -> tuple[nn.Sequential, int, int]:
    """``model``'s children before its global pooling as a Sequential, its feature width D and classes."""
    children = list(model.named_children())
    pools = [i for i, (_, m) in enumerate(children) if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))]
    if not pools:
        raise ValueError(
            f"{NAME} needs a network whose children run in order up to a global pooling and end in nn.Linear "
            f"(a CIFAR or torchvision ResNet); {type(model).__name__} has no adaptive pooling child"
        )
    fc = classifier_of(model, needed_by=NAME)[1]
    trunk = nn.Sequential(OrderedDict(children[: pools[0]]))
    # D is the trunk's output channels (its last convolution's), not the classifier's input: VGG flattens a 7x7 map
    # and MobileNetV3 puts a hidden Linear layer before the last one.
    convs = [m for m in trunk.modules() if isinstance(m, nn.Conv2d)]
    return trunk, convs[-1].out_channels if convs else fc.in_features, fc.out_features


class AttentionLSTM(nn.Module):
    """Location softmax from the previous state, attention-weighted context, one LSTM step and the classifier.

    Args:
        features: D.
        locations: L.
        hidden: H.
        num_classes: K.
    """

    def __init__(self, features: int, locations: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.attention = nn.Linear(hidden, locations)  # W_i h_{t-1}: one weight vector per location
        self.input = nn.Linear(features, 4 * hidden)
        self.state = nn.Linear(hidden, 4 * hidden)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, feats: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Map Tensor[N, D, L], state (h, c) Tensor[N, H] → (h, c, logits Tensor[N, K], attention Tensor[N, L])."""
        attention = F.softmax(self.attention(h), 1)
        context = torch.bmm(feats, attention.unsqueeze(2)).squeeze(2)
        i, f, g, o = (self.input(context) + self.state(h)).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c, self.classifier(h), attention


class VisualAttentionAction(DynamicBlock):
    """CNN trunk, LSTM initialisation, attention LSTM and ACT halting over frames.

    Args:
        trunk: Tensor[N, C, H, W] → feature map Tensor[N, D, h, w].
        features: D.
        num_classes: K.
        config: the recipe's settings.
    """

    granularity = "glimpse"

    def __init__(self, trunk: nn.Module, features: int, num_classes: int, config: VisualAttentionActionConfig) -> None:
        super().__init__()
        self.trunk = trunk
        self.max_steps, self.frame_shift, self.grid = config.max_steps, config.frame_shift, config.grid
        self.eps, self.ponder_weight = config.eps, config.ponder_weight
        self.init = nn.Linear(features, 2 * config.hidden)  # f_init,h and f_init,c
        self.core = AttentionLSTM(features, config.grid**2, config.hidden, num_classes)
        self.halting = open_bias_(nn.Linear(config.hidden, 1), logit=_CLOSED)

    # -- pieces -----------------------------------------------------------------------------------
    def features(self, frame: Tensor) -> Tensor:
        """Frame Tensor[N, C, H, W] → its feature map at the attention locations, Tensor[N, D, L]."""
        return F.adaptive_avg_pool2d(self.trunk(frame), self.grid).flatten(2)

    def initial_state(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        """``(h_0, c_0)`` Tensor[N, H] from the mean feature of a map Tensor[N, D, L]."""
        h, c = torch.tanh(self.init(feats.mean(2))).chunk(2, 1)
        return h, c

    def halt(self, h: Tensor) -> Tensor:
        """Halting probability Tensor[N] from the state Tensor[N, H]."""
        return torch.sigmoid(self.halting(h)).squeeze(1)

    def _frame_features(self, x: Tensor, t: int, first: Tensor | None) -> Tensor:
        if first is not None and (t == 0 or self.frame_shift == 0):
            return first
        return self.features(shift_frame(x, t, self.frame_shift))

    def _costs(self, x: Tensor) -> tuple[int, int, int, int]:
        d = self.init.in_features
        feats = x.new_empty((1, d, self.grid**2))
        h = x.new_empty((1, self.core.hidden))
        trunk = self.cost("trunk", lambda m, a: m.features(a), x)
        init = self.cost("init", lambda m, a: m.initial_state(a), feats)
        step = self.cost("step", lambda m, a, b, c: m.core(a, b, c), feats, h, h)
        halting = self.cost("halting", lambda m, a: m.halt(a), h)
        return trunk, init, step, halting

    # -- modes ----------------------------------------------------------------------------------
    def forward_dense(self, x: Tensor) -> Tensor:
        """Every frame for every sample, no halting unit evaluated; the last step's prediction."""
        first = self.features(x)
        h, c = self.initial_state(first)
        total = None
        for t in range(self.max_steps):
            h, c, logits, _ = self.core(self._frame_features(x, t, first), h, c)
            total = logits if total is None else total + logits
        return total / self.max_steps

    def forward_masked(self, x: Tensor) -> Tensor:
        first = self.features(x)
        h, c = self.initial_state(first)
        step_logits, attentions, halting = [], [], []
        for t in range(self.max_steps):
            h, c, logits, att = self.core(self._frame_features(x, t, first), h, c)
            step_logits.append(logits)
            attentions.append(att)
            if t < self.max_steps - 1:
                halting.append(self.halt(h))
        n = x.shape[0]
        act = act_weights(torch.stack([*halting, x.new_ones(n)], 1), self.eps)
        select = straight_through_select(act.weights, act.steps).to(x.dtype)
        # The prediction after t + 1 steps is the mean of the first t + 1 steps' (the paper averages over the video).
        counts = torch.arange(1, self.max_steps + 1, dtype=x.dtype, device=x.device)
        means = torch.cumsum(torch.stack(step_logits, 1), 1) / counts[:, None]
        out = (select.unsqueeze(2) * means).sum(1)
        tr = current_trace()
        if tr is not None:
            for t, z in enumerate(step_logits):
                tr.record_output(f"{NAME}/logits{t}", z)
        # Whether each step ran, straight-through: exactly ``act.ran`` in the forward pass, with the mean-field
        # gradient of Graves's weights, so that the MAC-budget loss on the recorded MACs reaches the halting unit.
        ran = 1.0 - (select.cumsum(1) - select)
        self._record(x, ran, act.steps, act.remainder, torch.stack(attentions, 1), sparse=False)
        return out

    def forward_sparse(self, x: Tensor) -> Tensor:
        n, steps = x.shape[0], self.max_steps
        rows = torch.arange(n, device=x.device)
        first = self.features(x)
        h, c = self.initial_state(first)
        out = x.new_zeros((n, self.core.classifier.out_features))
        total: Tensor | None = None  # sum of the step predictions of the samples still looking
        attention = x.new_zeros((n, steps, self.grid**2))
        ran = x.new_zeros((n, steps))
        cumulative, remainder = x.new_zeros(n), x.new_zeros(n)
        halted_at = torch.full((n,), steps, dtype=torch.long, device=x.device)
        for t in range(steps):
            # Only the samples still looking get frame t through the CNN: the others left the batch.
            full = rows.numel() == n
            if t == 0 or self.frame_shift == 0:
                feats = first if full else first.index_select(0, rows)
            else:
                feats = self.features(shift_frame(x if full else x.index_select(0, rows), t, self.frame_shift))
            h, c, logits, att = self.core(feats, h, c)
            total = logits if total is None else total + logits
            ran[rows, t] = 1.0
            attention[rows, t] = att
            if t == steps - 1:
                out[rows] = total / (t + 1)
                remainder[rows] = 1.0 - cumulative[rows]
                break
            p = self.halt(h)
            stop = halts(cumulative[rows], p, self.eps)
            done = rows[stop]
            out[done] = total[stop] / (t + 1)
            remainder[done] = 1.0 - cumulative[done]
            halted_at[done] = t + 1
            keep = ~stop
            cumulative[rows[keep]] = cumulative[rows[keep]] + p[keep]
            rows, h, c, total = rows[keep], h[keep], c[keep], total[keep]
            if rows.numel() == 0:
                break
        self._record(x, ran, halted_at, remainder, attention, sparse=True)
        return out

    # -- bookkeeping ----------------------------------------------------------------------------
    def _record(
        self, x: Tensor, ran: Tensor, steps: Tensor, remainder: Tensor, attention: Tensor, *, sparse: bool
    ) -> None:
        tr = current_trace()
        if tr is None:
            return
        trunk, init, step, halting = self._costs(x)
        rho = ponder_cost(steps, remainder)
        tr.record_output(f"{NAME}/attention", attention)
        tr.record_output(f"{NAME}/entropy", attention_entropy(attention) * ran.detach())
        tr.record_output(f"{NAME}/taken", ran.detach())
        tr.record_output(f"{NAME}/steps", steps.to(x.dtype))
        tr.record_output(f"{NAME}/ponder", rho)
        for t in range(self.max_steps):
            cost = step + (trunk + init if t == 0 else (trunk if self.frame_shift else 0))
            z = ran[:, t].double()
            executed = z.detach() * cost if sparse else float(cost)
            tr.record_macs(
                f"step{t}", z * cost, executed=executed, minimum=cost if t == 0 else 0.0, maximum=cost, dense=cost
            )
            if t < self.max_steps - 1:
                executed = z.detach() * halting if sparse else float(halting)
                lo = halting if t == 0 else 0.0
                tr.record_macs(f"step{t}/halting", z * halting, executed=executed, minimum=lo, maximum=halting)
            if t > 0:
                tr.record_decision(f"step{t}", Decision(ran[:, t], None, self.granularity))


class VisualAttentionActionModel(DynamicModel):
    """The recipe's model; objective: CE of the halting step + mean per-step CE + attention regulariser + ponder +
    MAC-budget loss."""

    def budget_knob(self) -> Knob:
        """One offset subtracted from the halting logit: the larger, the later samples halt."""
        return LogitShift(self.calibration[0], [(self.net.halting.bias, None, -1.0)]).knob(name="halting logit offset")

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        cfg: VisualAttentionActionConfig = self.config
        task = F.cross_entropy(logits, target)
        total, parts = task, {"task": float(task.detach())}
        if f"{NAME}/taken" not in t.outputs:
            return LossOutput(total, parts)
        taken = t.outputs[f"{NAME}/taken"]
        step_logits = [
            t.outputs[f"{NAME}/logits{s}"] for s in range(taken.shape[1]) if f"{NAME}/logits{s}" in t.outputs
        ]
        if step_logits and cfg.step_weight:
            ce = torch.stack([F.cross_entropy(z, target, reduction="none") for z in step_logits], 1)
            steps = (ce * taken).sum() / taken.sum()
            total, parts["steps"] = total + cfg.step_weight * steps, float(steps.detach())
        if cfg.attention_weight:
            reg = doubly_stochastic_penalty(t.outputs[f"{NAME}/attention"], taken).mean()
            total, parts["attention"] = total + cfg.attention_weight * reg, float(reg.detach())
        if cfg.ponder_weight:
            ponder = t.outputs[f"{NAME}/ponder"].mean()
            total, parts["ponder"] = total + cfg.ponder_weight * ponder, float(ponder.detach())
        if cfg.budget_weight:
            b = t.budget_loss(cfg.budget if budget is None else budget)
            total, parts["budget"] = total + cfg.budget_weight * b, float(b.detach())
        return LossOutput(total, parts)


@recipe(
    NAME,
    paper="Action Recognition using Visual Attention (ICLR 2016 workshop), arXiv:1511.04119",
    budget=BudgetPolicy("trained+calibrated", knob="halting logit offset", reachable=(0.3, 1.0),
                        derives="MAC-budget loss target = budget (the mean number of steps; ACT's tau kept as is)"),
    test_input=(1, 32, 32),
    reproduces_base=False,
)  # fmt: skip
def convert(
    model: nn.Module, config: VisualAttentionActionConfig, targets: Targets = "auto"
) -> VisualAttentionActionModel:
    """Use ``model``'s trunk (its children up to the global pooling) as the CNN of the attention LSTM."""
    in_channels = first_conv_in_channels(model)
    trunk, features, num_classes = _trunk_of(model)
    body = VisualAttentionAction(trunk, features, num_classes, config)
    return VisualAttentionActionModel(body, recipe=NAME, config=copy.copy(config), in_channels=in_channels)
