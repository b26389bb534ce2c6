"""RAM — Mnih, Heess, Graves, Kavukcuoglu, "Recurrent Models of Visual Attention", NeurIPS 2014.
https://arxiv.org/abs/1406.6247

A recurrent network looks at the image only through glimpses: a retina (``num_scales`` patches around a
location, each coarser than the last) feeds a glimpse network, a recurrent core integrates the glimpses, a
Gaussian location policy picks where to look next, and the classifier reads the final hidden state. The
location policy is trained with REINFORCE (reward 1 for a correct answer) and a learned baseline, the rest
by back-propagated cross-entropy (the paper's hybrid loss). With ``learn_stopping=True`` (the default) a
Bernoulli halting policy decides after each glimpse whether to stop (the paper's "learned number of glimpses"
for its dynamic environments, here with a cost on the MACs above the budget in the reward); in sparse mode
samples that stop leave the batch, so later glimpses run only for the samples still looking.

Departures from the paper:

* the first glimpse is at the image centre (the paper starts at a random location);
* the halting policy stops after glimpse ``t`` when ``P(stop) >= stop_thresholds[t]`` at inference (0.5 until
  calibrated); locations are the policy mean at inference (the paper samples at test time too);
* hidden sizes default to 128 (the paper: 256) and the retina to 3 scales of 8×8 on 64×64 canvases
  (the paper: 3 scales of 12×12 on 60×60);
* glimpse locations are recorded as trace outputs (``ram/location{t}``), not as decisions: decisions are the
  binary "take glimpse t" masks so that rates mean something;
* ``reproduces_base=False``: RAM is its own architecture; the converted base network only gives the number of
  input channels and classes.

Budget: trained and calibrated. ``budget`` is the target mean fraction of the every-glimpse MACs per image (the
dense network: ``max_glimpses`` glimpses, the heads between them and the classifier). With learned stopping the
reward charges ``glimpse_cost`` per unit of MAC fraction above the budget (``f`` = the MAC fraction of the glimpses a
sample took; the glimpses up to the budget are free), so the halting policy learns to spend about the budget, and
calibration sets the per-glimpse stop thresholds from ``P(stop)`` on held-out images so that samples stop following
MSDNet's geometric profile ``p_t ∝ q^t`` whose mean MAC fraction on them is the budget (``log q`` in
``calibration[0]``, the thresholds in the ``stop_thresholds`` buffer; DT-RAM's calibration, one rate instead of a
threshold per glimpse). Without learned stopping (``learn_stopping=False``, the
paper's fixed number of glimpses) the budget sets that number at conversion: the number of glimpses whose MAC
fraction is nearest the budget (the ``glimpse_limit`` buffer, which calibration moves as an integer knob).
Reachable: from one glimpse (about 0.15 of the dense MACs with 6 glimpses) to every glimpse.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.convert import Targets, first_conv_in_channels, num_classes_of
from dynnet.core import Decision, DynamicBlock, DynamicModel, LossOutput, Trace, current_trace
from dynnet.core.budget import BudgetPolicy, Knob
from dynnet.core.recipe import recipe
from dynnet.estimators.reinforce import bernoulli_log_prob
from dynnet.gates import exit_rate_for_budget
from dynnet.methods.glimpse._common import gaussian_log_prob, policy_gradient_losses, retina_glimpse
from dynnet.testing.scramble import register_randomiser

__all__ = ["RAM", "RAM_SCRATCH", "RAMConfig", "RecurrentAttention", "convert"]

RAM_SCRATCH = {"optimizer": "adamw", "lr": 2e-3, "weight_decay": 1e-4, "grad_clip": 5.0}
"""How RAM (and DT-RAM) train from scratch under a schedule made for ResNets: AdamW at 2e-3 with clipped gradients
(the glimpse profile's optimiser). Under SGD at 0.02 (the standard profile) the recurrent core's task loss reached
1e8-1e13 and then a non-finite value within 64 steps (2026-12-07)."""

_CLOSED = -6.0  # halting logit at start: P(stop) = 0.0025, every sample takes every glimpse


@dataclass(frozen=True)
class RAMConfig:
    """Settings of RAM.

    Attributes:
        budget: target mean fraction of the every-glimpse MACs per image: the reward charges the MAC fraction above
            it and calibration moves the halting logit to it (without learned stopping: it sets the number of
            glimpses).
        glimpse_size: side of the retina's patches after resampling.
        num_scales: patches per glimpse (sides ``glimpse_size * 2^s``).
        max_glimpses: T, the most glimpses per image (the dense network takes them all).
        hidden: width of the recurrent core and of the glimpse network's output.
        glimpse_hidden: width of the "what" and "where" pathways of the glimpse network.
        location_std: standard deviation of the Gaussian location policy (in [-1, 1] units).
        learn_stopping: learn when to stop (Bernoulli halting policy) instead of a fixed number of glimpses (the one
            whose MAC fraction is nearest the budget).
        glimpse_cost: reward penalty per unit of MAC fraction above the budget (about ``T`` glimpses), as a fraction
            of a correct answer's reward.
    """

    budget: float = 0.5
    glimpse_size: int = 8
    num_scales: int = 3
    max_glimpses: int = 6
    hidden: int = 128
    glimpse_hidden: int = 128
    location_std: float = 0.15
    learn_stopping: bool = True
    glimpse_cost: float = 0.05

    def __post_init__(self) -> None:
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")
        if self.max_glimpses < 2:
            raise ValueError(f"max_glimpses must be at least 2, got {self.max_glimpses}")
        if self.location_std <= 0:
            raise ValueError(f"location_std must be positive, got {self.location_std}")


class GlimpseNetwork(nn.Module):
    """``g = ReLU(W1 ReLU(W_what rho) + W2 ReLU(W_where l))``.

    Maps retina patches Tensor[N, C·S, g, g] and locations Tensor[N, 2] to glimpse features Tensor[N, D].
    """

    def __init__(self, in_features: int, glimpse_hidden: int, hidden: int) -> None:
        super().__init__()
        self.what = nn.Linear(in_features, glimpse_hidden)
        self.where = nn.Linear(2, glimpse_hidden)
        self.what_out = nn.Linear(glimpse_hidden, hidden)
        self.where_out = nn.Linear(glimpse_hidden, hidden)

    def forward(self, patches: Tensor, loc: Tensor) -> Tensor:
        what = self.what_out(F.relu(self.what(patches.flatten(1))))
        where = self.where_out(F.relu(self.where(loc)))
        return F.relu(what + where)


class RecurrentAttention(DynamicBlock):
    """Glimpse network + recurrent core + location and halting policies + classifier.

    A public API of the glimpse family (:mod:`dynnet.methods.glimpse`): recipes built on RAM (DT-RAM) subclass it
    and override :attr:`stopping`, :meth:`stop_rule`, :meth:`after_step` or :meth:`run_glimpses`, and read
    :meth:`step`, :meth:`heads`, :meth:`step_costs`, :meth:`stop_costs` and :meth:`classifier_cost`
    (:meth:`record_step_macs` records a part's MACs as the glimpse loop does).

    Args:
        in_channels: image channels.
        num_classes: K.
        config: the recipe's settings.
    """

    granularity = "glimpse"

    def __init__(self, in_channels: int, num_classes: int, config: RAMConfig) -> None:
        super().__init__()
        self.glimpse_size, self.num_scales = config.glimpse_size, config.num_scales
        self.max_glimpses, self.location_std = config.max_glimpses, config.location_std
        self.learn_stopping = config.learn_stopping
        g = config.glimpse_size
        self.glimpse = GlimpseNetwork(in_channels * config.num_scales * g * g, config.glimpse_hidden, config.hidden)
        self.core_input = nn.Linear(config.hidden, config.hidden)
        self.core_hidden = nn.Linear(config.hidden, config.hidden)
        self.policy = nn.Linear(config.hidden, 2)  # mean of the next location (tanh)
        self.halting = nn.Linear(config.hidden, 1) if config.learn_stopping else None  # logit of "stop now"
        self.baseline = nn.Linear(config.hidden, 1)
        self.classifier = nn.Linear(config.hidden, num_classes)
        if self.halting is not None:
            with torch.no_grad():
                self.halting.weight.normal_(std=1e-3)
                self.halting.bias.fill_(_CLOSED)
        # Without learned stopping every sample takes the number of glimpses whose MAC fraction is nearest the
        # budget (the dense network takes all ``max_glimpses``); ``None`` when the halting policy decides.
        limit = None
        if not config.learn_stopping:
            side = config.glimpse_size * 2 ** (config.num_scales - 1)
            fractions = self.stop_fractions(torch.zeros((1, in_channels, side, side)))
            limit = torch.tensor(int((fractions - config.budget).abs().argmin()) + 1)
        self.register_buffer("glimpse_limit", limit)
        # At inference a sample stops after glimpse t when P(stop) >= stop_thresholds[t] (0.5 until calibrated).
        # Subclasses with a stop rule of their own (DT-RAM) keep their thresholds and get none here.
        own_rule = type(self).stop_rule is RecurrentAttention.stop_rule and config.learn_stopping
        thresholds = torch.full((config.max_glimpses - 1,), 0.5) if own_rule else None
        self.register_buffer("stop_thresholds", thresholds)

    # -- one step ---------------------------------------------------------------------------------
    def step(self, x: Tensor, loc: Tensor, h: Tensor | None) -> Tensor:
        """One glimpse: image Tensor[N, C, H, W], location Tensor[N, 2], state Tensor[N, D] or None → new state."""
        g = self.glimpse(retina_glimpse(x, loc, self.glimpse_size, self.num_scales), loc)
        pre = self.core_input(g)
        return F.relu(pre if h is None else pre + self.core_hidden(h))

    @property
    def stopping(self) -> bool:
        """Whether the halting policy acts (subclasses switch it off, e.g. during a fixed-steps curriculum)."""
        return self.halting is not None

    def heads(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Location mean Tensor[N, 2] and stop probability Tensor[N] from the state Tensor[N, D]."""
        mean, logit = self.heads_logit(h)
        return mean, torch.sigmoid(logit)

    def heads_logit(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`heads` with the stop probability as its logit (:meth:`stop_logit`)."""
        return torch.tanh(self.policy(h)), self.stop_logit(h)

    def stop_logit(self, h: Tensor) -> Tensor:
        """The halting policy's logit Tensor[N] for the state Tensor[N, D] (``-inf`` while it does not act)."""
        return self.halting(h).squeeze(1) if self.stopping else h.new_full((h.shape[0],), float("-inf"))

    def stop_rule(self, p_stop: Tensor, t: int, logit: Tensor | None = None) -> Tensor:
        """Inference decision after glimpse ``t``: Tensor[N] bool, stop when ``P(stop) >= stop_thresholds[t]``
        (without learned stopping ``P(stop)`` is 0 and nobody stops). ``logit`` Tensor[N] is ``P(stop)``'s logit (for
        a rule on it: ``P(stop)`` rounds to 1.0 in float32 from a logit of about 17)."""
        if self.stop_thresholds is None:
            return p_stop > 0.5
        return p_stop >= self.stop_thresholds[t].to(p_stop.dtype)

    @torch.no_grad()
    def stop_probabilities(self, x: Tensor) -> Tensor:
        """Tensor[N, T - 1]: ``P(stop)`` after every glimpse but the last, every glimpse run (locations from the
        policy mean). At inference a sample's glimpses up to its stop do not depend on the stop decisions, so these
        are the scores the stop rule compares."""
        loc, h, scores = x.new_zeros((x.shape[0], 2)), None, []
        for _ in range(self.max_glimpses - 1):
            h = self.step(x, loc, h)
            loc, p_stop = self.heads(h)
            scores.append(p_stop)
        return torch.stack(scores, 1)

    def classifier_cost(self, x: Tensor) -> int:
        """Per-sample MACs of one classifier read-out."""
        h = x.new_zeros((1, self.core_hidden.in_features))
        return self.cost("classifier", lambda m, a: m.classifier(a), h)

    def stop_costs(self, x: Tensor) -> Tensor:
        """Tensor[T] float64: per-sample MACs of stopping after glimpse ``t`` (glimpses, heads, one classifier); the
        last entry is the dense network's. The retina's patches have a fixed size, so the costs do not depend on the
        image size."""
        first, later, heads, _ = self.step_costs(x)
        cls = self.classifier_cost(x)
        steps = self.max_glimpses
        return torch.tensor(
            [first + t * later + min(t + 1, steps - 1) * heads + cls for t in range(steps)], dtype=torch.float64
        )

    def stop_fractions(self, x: Tensor) -> Tensor:
        """Tensor[T] float64: MAC fraction of stopping after glimpse ``t`` (1 for the last)."""
        costs = self.stop_costs(x)
        return costs / costs[-1]

    def after_step(self, tr: Trace | None, t: int, h_all: Tensor, alive: Tensor, rows: Tensor) -> None:
        """Extension point, called by :meth:`run_glimpses` after glimpse ``t`` (nothing here).

        Args:
            tr: the active trace, or ``None``.
            t: the glimpse just taken (0-based).
            h_all: Tensor[N, D] the states of every sample (those of samples no longer looking are frozen).
            alive: Tensor[N] bool, the samples that took glimpse ``t``.
            rows: Tensor[R] long, the samples whose glimpse really ran (sparse mode: the alive ones; masked: all).
        """

    def step_costs(self, x: Tensor) -> tuple[int, int, int, int]:
        """Per-sample MACs of ``(first glimpse, later glimpse, location and halting heads, baseline)`` for images
        shaped like ``x`` (Tensor[N, C, H, W]), measured once per shape on meta tensors."""
        loc = x.new_zeros((1, 2))
        h = x.new_zeros((1, self.core_hidden.in_features))
        first = self.cost("step0", lambda m, a, b: m.step(a, b, None), x, loc)
        later = self.cost("step", lambda m, a, b, c: m.step(a, b, c), x, loc, h)
        heads = self.cost("heads", lambda m, a: m.heads(a), h)
        base = self.cost("baseline", lambda m, a: m.baseline(a), h)
        return first, later, heads, base

    # -- modes ----------------------------------------------------------------------------------
    def forward_dense(self, x: Tensor) -> Tensor:
        """Every glimpse for every sample, locations from the policy mean."""
        loc, h = x.new_zeros((x.shape[0], 2)), None
        for t in range(self.max_glimpses):
            h = self.step(x, loc, h)
            if t < self.max_glimpses - 1:
                loc, _ = self.heads(h)
        return self.classifier(h)

    def forward_masked(self, x: Tensor) -> Tensor:
        return self.run_glimpses(x, sparse=False)

    def forward_sparse(self, x: Tensor) -> Tensor:
        return self.run_glimpses(x, sparse=True)

    def run_glimpses(self, x: Tensor, *, sparse: bool) -> Tensor:
        """The glimpse loop of masked (``sparse=False``: every sample runs, those that stopped are frozen) and sparse
        mode (only the samples still looking run), recording decisions, MACs and RAM's trace outputs.

        Args:
            x: Tensor[N, C, H, W] images.
            sparse: run only the samples still looking.

        Returns:
            Tensor[N, K] logits of the classifier on each sample's last state.
        """
        tr = current_trace()
        n, steps = x.shape[0], self.max_glimpses
        limit = steps if self.glimpse_limit is None else int(self.glimpse_limit)
        first, later, heads_cost, base_cost = self.step_costs(x)
        everyone = torch.arange(n, device=x.device)
        alive = torch.ones(n, dtype=torch.bool, device=x.device)
        loc = x.new_zeros((n, 2))
        h_all = x.new_zeros((n, self.core_hidden.in_features))
        count = torch.ones(n, dtype=x.dtype, device=x.device)
        log_probs, baselines, taken = [], [], []
        for t in range(steps):
            # Sparse mode runs only the samples still looking; masked mode runs all and freezes the others.
            rows = alive.nonzero().squeeze(1) if sparse else everyone
            full = rows.numel() == n
            last = t == steps - 1
            if rows.numel() > 0:
                h_prev = None if t == 0 else (h_all if full else h_all.index_select(0, rows))
                h = self.step(
                    x if full else x.index_select(0, rows), loc if full else loc.index_select(0, rows), h_prev
                )
                h_all = h_all.index_copy(0, rows, h) if sparse else torch.where(alive[:, None], h, h_all)
            cost = (first if t == 0 else later) + (0 if last else heads_cost)
            self.record_step_macs(tr, t, alive, cost, executed_rows=rows, n=n)
            if self.training and not last:  # the baseline only runs in training; the static network has none
                self.record_step_macs(tr, t, alive, base_cost, executed_rows=rows, n=n, part="baseline", dense=False)
            self.after_step(tr, t, h_all, alive, rows)
            if last:
                break
            go = torch.zeros(n, dtype=torch.bool, device=x.device)
            p_go = x.new_zeros(n)
            if rows.numel() > 0:
                mean, logit = self.heads_logit(h)
                p_stop = torch.sigmoid(logit)
                if self.training:
                    sample = (mean.detach() + self.location_std * torch.randn_like(mean)).clamp(-1, 1)
                    stop = torch.bernoulli(p_stop.detach())
                    lp = gaussian_log_prob(sample, mean, self.location_std)
                    if self.stopping:
                        lp = lp + bernoulli_log_prob(p_stop[:, None], stop[:, None])
                    log_probs.append(lp)
                    baselines.append(self.baseline(h.detach()).squeeze(1))
                    taken.append(alive.clone())
                else:
                    sample, stop = mean, self.stop_rule(p_stop, t, logit).to(mean.dtype)
                new_loc = sample.detach()
                loc = loc.index_copy(0, rows, new_loc) if sparse else torch.where(alive[:, None], new_loc, loc)
                go = go.index_copy(0, rows, stop < 0.5)
                p_go = p_go.index_copy(0, rows, (1 - p_stop).to(x.dtype))
            if t + 1 >= limit:  # the fixed number of glimpses is reached
                go = torch.zeros_like(go)
                p_go = torch.zeros_like(p_go)
            alive = alive & go
            count = count + alive.to(x.dtype)
            if tr is not None:
                tr.record_decision(f"glimpse{t + 1}", Decision(alive.to(x.dtype), p_go * alive, "glimpse"))
                tr.record_output(f"ram/location{t + 1}", loc)
        if tr is not None:
            tr.record_output("ram/glimpses", count)
            if self.training:  # what the reward charges: the MAC fraction of stopping after each glimpse
                tr.record_output("ram/stop_fractions", self.stop_fractions(x))
            if self.training and log_probs:
                tr.record_output("ram/log_prob", torch.stack(log_probs, 1))
                tr.record_output("ram/baseline", torch.stack(baselines, 1))
                tr.record_output("ram/taken", torch.stack(taken, 1))
        return self.classifier(h_all)

    def record_step_macs(
        self,
        tr: Trace | None,
        t: int,
        alive: Tensor,
        cost: int,
        *,
        executed_rows: Tensor,
        n: int,
        part: str = "step",
        dense: bool = True,
    ) -> None:
        """Record ``glimpse{t}/{part}``: ``cost`` MACs for each ``alive`` sample (Tensor[N] bool), executed for the
        ``executed_rows`` (Tensor[R] long) of the batch of ``n``; ``dense``: part of the static network (else
        training-only work, dense 0). Nothing without a trace."""
        if tr is None:
            return
        executed = torch.zeros(n, dtype=torch.float64, device=alive.device).index_fill(0, executed_rows, float(cost))
        tr.record_macs(
            f"glimpse{t}/{part}",
            alive.double() * cost,
            executed=executed,
            minimum=cost if t == 0 else 0.0,
            maximum=cost,
            dense=cost if dense else 0.0,
        )


class RAM(DynamicModel):
    """RAM as a :class:`DynamicModel`; objective: cross-entropy + REINFORCE (location and halting) + baseline MSE.

    Subclasses (DT-RAM) override :meth:`task_loss`, :meth:`reward` and :meth:`calibrate_to_`.
    """

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        task = self.task_loss(logits, target, t)
        parts = {"task": float(task.detach())}
        total = task
        if "ram/log_prob" in t.outputs:
            reward = self.reward(logits, target, t, self.config.budget if budget is None else budget)
            policy, value = policy_gradient_losses(
                t.outputs["ram/log_prob"], reward, t.outputs["ram/baseline"], t.outputs["ram/taken"]
            )
            total = total + policy + value
            parts.update(policy=float(policy.detach()), baseline=float(value.detach()))
        return LossOutput(total, parts)

    def task_loss(self, logits: Tensor, target: Tensor, t: Trace) -> Tensor:
        """The back-propagated part of the hybrid loss: cross-entropy of the answer."""
        return F.cross_entropy(logits, target)

    def reward(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> Tensor:
        """Tensor[N] return of each sample's episode: 1 if correct, minus ``glimpse_cost · max(0, f - budget)`` with
        ``f`` the MAC fraction of the glimpses it took (every glimpse = 1) when stopping is learned."""
        cfg: RAMConfig = self.config
        budget = cfg.budget if budget is None else budget
        correct = (logits.detach().argmax(1) == target).float()
        if not cfg.learn_stopping:
            return correct
        glimpses = t.outputs["ram/glimpses"].float()
        fractions = t.outputs.get("ram/stop_fractions")
        if fractions is None:  # a trace of another run: every glimpse costs 1 / T
            fraction = glimpses / cfg.max_glimpses
        else:
            index = glimpses.round().long().clamp(1, cfg.max_glimpses) - 1
            fraction = fractions.to(glimpses.device)[index].float()
        return correct - cfg.glimpse_cost * (fraction - budget).clamp_min(0.0)

    def calibrate_to_(self, batches: list[Tensor], budget: float, tolerance: float) -> dict[str, float]:
        """With learned stopping: per-glimpse stop thresholds from ``P(stop)`` on ``batches``, so that samples stop
        following the geometric profile ``p_t ∝ q^t`` whose mean MAC fraction on them is ``budget`` (``log q`` kept in
        ``calibration[0]``). Without: the number of glimpses (:meth:`budget_knob`)."""
        body: RecurrentAttention = self.net
        if body.stop_thresholds is None:
            return super().calibrate_to_(batches, budget, tolerance)
        scores = torch.cat([body.stop_probabilities(x) for x in batches]).float()
        scores = torch.cat([scores, scores.new_ones((scores.shape[0], 1))], 1)  # the last glimpse always stops
        log_q, thresholds, _ = exit_rate_for_budget(scores, body.stop_fractions(batches[0][:1]), budget,
                                                    tolerance=tolerance)  # fmt: skip
        with torch.no_grad():
            body.stop_thresholds.copy_(thresholds)
            self.calibration[0] = log_q
        return {"stop rate log q": log_q}

    def budget_knob(self) -> Knob | None:
        """Without learned stopping, the number of glimpses (with it, :meth:`calibrate_to_` sets the stop
        thresholds)."""
        body: RecurrentAttention = self.net
        if body.glimpse_limit is None:
            return None
        limit = body.glimpse_limit

        def set_limit(v: float) -> None:
            with torch.no_grad():
                limit.fill_(round(v))

        return Knob("number of glimpses", lambda: float(limit), set_limit, 1.0, float(body.max_glimpses), integer=True)


@recipe(
    "ram",
    paper="Recurrent Models of Visual Attention (NeurIPS 2014), arXiv:1406.6247",
    budget=BudgetPolicy("trained+calibrated",
                        knob="stop thresholds (rate q of the geometric stop profile; without learned stopping: the "
                             "number of glimpses)",
                        reachable=(0.2, 1.0),
                        derives="reward charge on the MACs above the budget; without learned stopping, the number of "
                                "glimpses"),
    test_input=(1, 32, 32),
    reproduces_base=False,
    scratch=RAM_SCRATCH,
)  # fmt: skip
def convert(model: nn.Module, config: RAMConfig, targets: Targets = "auto") -> RAM:
    """Build a RAM with ``model``'s input channels and classes (the base network is not reused)."""
    in_channels = first_conv_in_channels(model) or 1
    body = RecurrentAttention(in_channels, num_classes_of(model), config)
    return RAM(body, recipe="ram", config=copy.copy(config), in_channels=in_channels)


@register_randomiser(RAM)
def _randomise(model: RAM, generator: torch.Generator) -> int:
    """Random location and halting policies (testing): samples stop after different numbers of glimpses."""
    body: RecurrentAttention = model.net
    with torch.no_grad():
        for lin in (m for m in (body.policy, body.halting) if m is not None):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=generator) * 3 / lin.in_features**0.5)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=generator) * 0.5)
    return 4
