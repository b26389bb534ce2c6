"""GFNet — Wang, Lv, Huang, Song, Yang, Huang, "Glance and Focus: a Dynamic Approach to Reducing Spatial
Redundancy in Image Classification", NeurIPS 2020. https://arxiv.org/abs/2010.05300

Step 0 (glance) runs the global encoder on a down-sampled copy of the whole image; every later step (focus)
crops a full-resolution patch at a location chosen by the patch-proposal policy and runs the local encoder on
it. A recurrent classifier (GRU + linear) fuses the features of all steps so far and predicts after every
step; a sample stops at the first step whose maximum softmax probability reaches that step's threshold. In
sparse mode samples that stopped leave the batch, so later encoders run only on the samples still going.

Departures from the paper:

* the policy is a Gaussian over the patch centre trained with REINFORCE and a learned value baseline
  (:func:`dynnet.estimators.reinforce.reinforce_loss`) instead of PPO; the reward of a step is the increase of
  the true-class probability it brought (the paper's reward), without discounting;
* the policy reads the classifier's hidden state (the paper reads the global encoder's feature maps);
* training is joint (cross-entropy averaged over steps + policy + value losses) instead of the paper's three
  stages; thresholds start at ``inf`` (every sample takes every step) and are set by :func:`dynnet.calibrate` (or
  :meth:`GFNet.calibrate`);
* the steps' cross-entropies are weighted by the budget's exit profile, half and half with the paper's equal
  weights (``exit_weighting``, 0: the paper's mean);
* the encoders are the converted base network without its last linear layer (global) and a copy of it
  (local); the paper also uses two encoders of the same architecture;
* ``reproduces_base=False``: the glance sees a down-sampled image and the classifier is a new GRU, so no
  setting of the policy reproduces the base network's logits.

Budget: calibrated. ``budget`` is the target mean fraction of the dense MACs per image (the glance and every focus
step with its patch proposal). It is translated into the expected number of steps the paper's budgeted batch
classification spends: MSDNet's geometric exit profile ``p_t ∝ q^t`` over the steps, with the rate ``q`` whose
expected MACs are the budget. That profile weights the steps' losses in training (``exit_weighting``), and
:func:`dynnet.calibrate` sets the confidence thresholds from held-out images so that samples stop following the
profile whose mean MAC fraction on them is the budget (``log q`` in ``calibration[0]``, the thresholds in the
``thresholds`` buffer). Reachable: from the glance alone (a quarter of the dense MACs on 64×64 images with 32×32
patches, less on smaller images) to every step.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.convert import Targets, classifier_of, first_conv_in_channels, replace_module
from dynnet.core import Decision, DynamicBlock, DynamicModel, LossOutput, Trace, current_trace
from dynnet.core.budget import BudgetPolicy
from dynnet.core.recipe import recipe
from dynnet.gates import confidence, exit_fractions_for_budget, exit_rate_for_budget, thresholds_for_fractions
from dynnet.methods.glimpse._common import crop_glimpse, gaussian_log_prob, policy_gradient_losses
from dynnet.testing.scramble import register_randomiser

__all__ = ["GFNet", "GFNetConfig", "GlanceFocus", "RecurrentClassifier", "convert"]


@dataclass(frozen=True)
class GFNetConfig:
    """Settings of GFNet.

    Attributes:
        budget: target mean fraction of the dense MACs per image; it sets the geometric exit profile over the steps
            that weights the steps' losses and that calibration fits the confidence thresholds to.
        glance_scale: down-sampling factor of the glance (the paper glances at 96×96 or 128×128 of 224×224).
        patch_size: side of the focus patches in input pixels (the paper: 96 or 128 of 224).
        max_steps: glance + focus steps.
        hidden: GRU width of the recurrent classifier.
        location_std: standard deviation of the Gaussian patch policy (in [-1, 1] units).
        exit_weighting: λ, step ``t``'s loss weight is ``(1 - λ) + λ T p_t`` with ``p`` the budget's exit profile
            (0: the paper's equal weights; the weights always average to 1).
    """

    budget: float = 0.5
    glance_scale: int = 2
    patch_size: int = 32
    max_steps: int = 4
    hidden: int = 128
    location_std: float = 0.15
    exit_weighting: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")
        if not 0.0 <= self.exit_weighting <= 1.0:
            raise ValueError(f"exit_weighting must be in [0, 1], got {self.exit_weighting}")
        if self.max_steps < 2:
            raise ValueError(f"max_steps must be at least 2 (a glance and a focus), got {self.max_steps}")
        if self.glance_scale < 1 or self.patch_size < 1:
            raise ValueError(f"glance_scale and patch_size must be >= 1, got {self.glance_scale}, {self.patch_size}")


class RecurrentClassifier(nn.Module):
    """A GRU cell written with two linear layers (so every product is a counted matmul) and a linear head.

    Args:
        in_features: D, encoder features.
        hidden: H.
        num_classes: K.
    """

    def __init__(self, in_features: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.input = nn.Linear(in_features, 3 * hidden)
        self.state = nn.Linear(hidden, 3 * hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, f: Tensor, h: Tensor | None) -> tuple[Tensor, Tensor]:
        """Features Tensor[N, D] and state Tensor[N, H] (or None: zeros) → (new state, logits Tensor[N, K])."""
        gi = self.input(f)
        if h is None:
            h = f.new_zeros((f.shape[0], self.hidden))
            gh = self.state.bias.expand(f.shape[0], -1)
        else:
            gh = self.state(h)
        i_r, i_z, i_n = gi.chunk(3, 1)
        h_r, h_z, h_n = gh.chunk(3, 1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        h_new = (1 - z) * torch.tanh(i_n + r * h_n) + z * h
        return h_new, self.head(h_new)


class GlanceFocus(DynamicBlock):
    """Global and local encoders, recurrent classifier, patch policy and exits.

    Args:
        encoder: the base network without its classifier, Tensor[N, C, h, w] → Tensor[N, D] (for any h, w).
        features: D.
        num_classes: K.
        config: the recipe's settings.
    """

    granularity = "glimpse"

    def __init__(self, encoder: nn.Module, features: int, num_classes: int, config: GFNetConfig) -> None:
        super().__init__()
        self.glance_scale, self.patch_size = config.glance_scale, config.patch_size
        self.max_steps, self.location_std = config.max_steps, config.location_std
        self.global_encoder = encoder
        self.local_encoder = copy.deepcopy(encoder)
        self.classifier = RecurrentClassifier(features, config.hidden, num_classes)
        self.policy = nn.Linear(config.hidden, 2)
        self.value = nn.Linear(config.hidden, 1)
        self.register_buffer("thresholds", torch.full((config.max_steps - 1,), float("inf")))

    # -- steps ----------------------------------------------------------------------------------
    def glance(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Full image Tensor[N, C, H, W] → (state, logits), seen at 1/``glance_scale`` resolution."""
        small = x if self.glance_scale == 1 else F.avg_pool2d(x, self.glance_scale)
        return self.classifier(self.global_encoder(small), None)

    def focus(self, x: Tensor, loc: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """Full image, patch centres Tensor[N, 2] and state Tensor[N, H] → (new state, logits)."""
        return self.classifier(self.local_encoder(crop_glimpse(x, loc, self.patch_size)), h)

    def _costs(self, x: Tensor) -> tuple[int, int, int, int]:
        loc = x.new_zeros((1, 2))
        h = x.new_zeros((1, self.classifier.hidden))
        glance = self.cost("glance", lambda m, a: m.glance(a), x)
        focus = self.cost("focus", lambda m, a, b, c: m.focus(a, b, c), x, loc, h)
        policy = self.cost("policy", lambda m, a: m.policy(a), h)
        value = self.cost("value", lambda m, a: m.value(a), h)
        return glance, focus, policy, value

    def exit_costs(self, x: Tensor) -> Tensor:
        """Tensor[T] float64: per-sample MACs of stopping after step ``t`` (the last entry is the dense cost)."""
        glance, focus, policy, _ = self._costs(x)
        steps = self.max_steps
        return torch.tensor(
            [glance + t * focus + min(t + 1, steps - 1) * policy for t in range(steps)], dtype=torch.float64
        )

    # -- modes ----------------------------------------------------------------------------------
    def forward_dense(self, x: Tensor) -> Tensor:
        """Every step for every sample; the last step's logits."""
        h, logits = self.glance(x)
        for _ in range(1, self.max_steps):
            h, logits = self.focus(x, torch.tanh(self.policy(h)), h)
        return logits

    def forward_masked(self, x: Tensor) -> Tensor:
        return self._run(x, sparse=False)

    def forward_sparse(self, x: Tensor) -> Tensor:
        return self._run(x, sparse=True)

    def _run(self, x: Tensor, *, sparse: bool) -> Tensor:
        tr = current_trace()
        n, steps = x.shape[0], self.max_steps
        glance_cost, focus_cost, policy_cost, value_cost = self._costs(x)
        everyone = torch.arange(n, device=x.device)
        alive = torch.ones(n, dtype=torch.bool, device=x.device)
        h_all = x.new_zeros((n, self.classifier.hidden))
        out, loc = None, x.new_zeros((n, 2))
        log_probs, values, taken = [], [], []
        for t in range(steps):
            rows = alive.nonzero().squeeze(1) if sparse else everyone
            full = rows.numel() == n
            last = t == steps - 1
            if rows.numel() > 0:
                x_rows = x if full else x.index_select(0, rows)
                if t == 0:
                    h, logits = self.glance(x_rows)
                else:
                    h_rows = h_all if full else h_all.index_select(0, rows)
                    h, logits = self.focus(x_rows, loc if full else loc.index_select(0, rows), h_rows)
                if sparse:
                    h_all = h_all.index_copy(0, rows, h)
                    out = logits if out is None else out.index_copy(0, rows, logits)
                else:
                    h_all = torch.where(alive[:, None], h, h_all)
                    out = logits if out is None else torch.where(alive[:, None], logits, out)
                if tr is not None and not sparse:
                    tr.record_output(f"gfnet/logits{t}", logits)
            cost = (glance_cost if t == 0 else focus_cost) + (0 if last else policy_cost)
            self._record_step(tr, t, alive, cost, rows)
            if self.training and not last:  # the value head only runs in training; the static network has none
                self._record_step(tr, t, alive, value_cost, rows, part="value", dense=False)
            if last:
                break
            go = torch.zeros(n, dtype=torch.bool, device=x.device)
            if rows.numel() > 0:
                mean = torch.tanh(self.policy(h))
                if self.training:
                    sample = (mean.detach() + self.location_std * torch.randn_like(mean)).clamp(-1, 1)
                    log_probs.append(gaussian_log_prob(sample, mean, self.location_std))
                    values.append(self.value(h.detach()).squeeze(1))
                    taken.append(alive.clone())
                else:
                    sample = mean
                loc = loc.index_copy(0, rows, sample.detach()) if sparse else torch.where(alive[:, None], sample, loc)
                go = go.index_copy(0, rows, ~(confidence(logits) >= self.thresholds[t]))
            alive = alive & go
            if tr is not None:
                tr.record_decision(f"focus{t + 1}", Decision(alive.to(x.dtype), None, "glimpse"))
                tr.record_output(f"gfnet/location{t + 1}", loc)
        if tr is not None and self.training:  # what the steps' loss weights are derived from
            costs = self.exit_costs(x)
            tr.record_output("gfnet/exit_fractions", costs / costs[-1])
        if tr is not None and self.training and log_probs:
            tr.record_output("gfnet/log_prob", torch.stack(log_probs, 1))
            tr.record_output("gfnet/value", torch.stack(values, 1))
            tr.record_output("gfnet/taken", torch.stack(taken, 1))
        return out

    def _record_step(
        self, tr: Trace | None, t: int, alive: Tensor, cost: int, rows: Tensor, part: str = "", dense: bool = True
    ) -> None:
        if tr is None:
            return
        n = alive.shape[0]
        executed = torch.zeros(n, dtype=torch.float64, device=alive.device).index_fill(0, rows, float(cost))
        tr.record_macs(
            ("glance" if t == 0 else f"focus{t}") + (f"/{part}" if part else ""),
            alive.double() * cost,
            executed=executed,
            minimum=cost if t == 0 else 0.0,
            maximum=cost,
            dense=cost if dense else 0.0,
        )


class GFNet(DynamicModel):
    """GFNet as a :class:`DynamicModel`; objective: mean cross-entropy over steps + REINFORCE + value MSE."""

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        budget = self.config.budget if budget is None else budget
        step_logits = [v for k, v in t.outputs.items() if k.startswith("gfnet/logits")]
        if not step_logits:
            step_logits = [logits]
        ces = torch.stack([F.cross_entropy(z, target) for z in step_logits])
        if "gfnet/exit_fractions" in t.outputs and len(step_logits) > 1:
            ces = ces * self.exit_weights(t.outputs["gfnet/exit_fractions"], budget).to(ces)
        ce = ces.mean()
        total, parts = ce, {"task": float(ce.detach())}
        if "gfnet/log_prob" in t.outputs:
            p_true = torch.stack([z.detach().softmax(1).gather(1, target[:, None]).squeeze(1) for z in step_logits], 1)
            reward = p_true[:, 1:] - p_true[:, :-1]  # step t's action is judged by step t+1's gain
            policy, value = policy_gradient_losses(
                t.outputs["gfnet/log_prob"], reward, t.outputs["gfnet/value"], t.outputs["gfnet/taken"]
            )
            total = total + policy + value
            parts.update(policy=float(policy.detach()), value=float(value.detach()))
        return LossOutput(total, parts)

    def exit_weights(self, fractions: Tensor, budget: float) -> Tensor:
        """Tensor[T] loss weights ``(1 - λ) + λ T p_t``, ``p`` the geometric exit profile whose expected MAC fraction
        is ``budget`` given the MAC fraction ``fractions`` (Tensor[T]) of stopping after each step."""
        lam = self.config.exit_weighting
        p = exit_fractions_for_budget(fractions, budget)
        return (1.0 - lam) + lam * len(p) * p

    def calibrate_to_(self, batches: list[Tensor], budget: float, tolerance: float) -> dict[str, float]:
        """Confidence thresholds from ``batches`` so that samples stop following the geometric profile whose mean MAC
        fraction on them is ``budget`` (``log q`` kept in ``calibration[0]``)."""
        conf = torch.cat([self.step_confidences(x) for x in batches])
        costs = self.net.exit_costs(batches[0][:1])
        log_q, thresholds, _ = exit_rate_for_budget(conf, costs / costs[-1], budget, tolerance=tolerance)
        with torch.no_grad():
            self.net.thresholds.copy_(thresholds)
            self.calibration[0] = log_q
        return {"exit rate log q": log_q}

    @torch.no_grad()
    def step_confidences(self, x: Tensor) -> Tensor:
        """Tensor[N, T] confidence after every step (every step run, policy mean)."""
        body: GlanceFocus = self.net
        h, logits = body.glance(x)
        conf = [confidence(logits)]
        for _ in range(1, body.max_steps):
            h, logits = body.focus(x, torch.tanh(body.policy(h)), h)
            conf.append(confidence(logits))
        return torch.stack(conf, 1)

    def calibrate(self, confidences: Tensor, fractions: Tensor) -> Tensor:
        """Set thresholds from held-out confidences (Tensor[N, T]) so ``fractions[t]`` of samples stop at step t."""
        thr = thresholds_for_fractions(confidences, fractions)
        self.net.thresholds.copy_(thr)
        return thr


@recipe(
    "gfnet",
    paper="Glance and Focus: a Dynamic Approach to Reducing Spatial Redundancy in Image Classification "
    "(NeurIPS 2020), arXiv:2010.05300",
    budget=BudgetPolicy("calibrated", knob="confidence thresholds (rate q of the geometric exit profile)",
                        reachable=(0.3, 1.0),
                        derives="geometric exit profile over the steps p_t ∝ q^t with expected MACs = budget "
                                "(the expected number of steps); step loss weights"),
    test_input=(1, 64, 64),
    reproduces_base=False,
)  # fmt: skip
def convert(model: nn.Module, config: GFNetConfig, targets: Targets = "auto") -> GFNet:
    """Use ``model`` minus its last linear layer as the global encoder (and a copy as the local one)."""
    name, fc = classifier_of(model, needed_by="gfnet")
    replace_module(model, name, nn.Identity())
    in_channels = first_conv_in_channels(model)
    body = GlanceFocus(model, fc.in_features, fc.out_features, config)
    return GFNet(body, recipe="gfnet", config=copy.copy(config), in_channels=in_channels)


@register_randomiser(GFNet)
def _randomise(model: GFNet, generator: torch.Generator) -> int:
    """Random thresholds, sharper predictions and a random policy (testing)."""
    body: GlanceFocus = model.net
    with torch.no_grad():
        body.classifier.head.weight.mul_(8.0)
        body.policy.weight.copy_(torch.randn(body.policy.weight.shape, generator=generator) * 0.3)
        body.thresholds.copy_(0.3 + 0.4 * torch.rand(body.thresholds.shape, generator=generator))
    return 3
