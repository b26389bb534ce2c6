"""RS-Nets — Wang, Gao, Xu, Huang, Zhang, Ye, "Resolution Switchable Networks for Runtime Efficient Image
Recognition", ECCV 2020. https://arxiv.org/abs/2007.09558

One network runs at several input resolutions with shared convolution and linear weights but private batch
norms per resolution; it is trained at every resolution at once, each resolution's prediction distilled from
the ensemble of all of them (multi-resolution ensemble distillation). Here, to make it input-adaptive, a small policy
picks one resolution per input (Gumbel-Softmax with straight-through decisions in training, argmax at
inference), so easy inputs run at low resolution. In sparse mode the batch is split by resolution and each group
runs once at its resolution (each sample pays only for its own resolution).

Departures from the paper:

* the per-input resolution policy is an addition (the paper picks one resolution per deployment); it is a tiny
  strided convolution + linear layer on the lowest-resolution image, trained with the MAC-budget loss;
* the ensemble teacher is the plain mean of the resolutions' logits (the paper learns ensemble weights);
* images are resized with bilinear interpolation (0 MACs by convention);
* the policy starts open (full resolution, bias +6), whose private batch norms are the base network's own, so a
  fresh conversion and dense mode reproduce the base network.

Budget: trained and calibrated. ``budget`` is the target mean fraction of the full-resolution network's MACs per
image (the policy included). The paper's knob is the resolution chosen for a deployment; here it becomes the mix of
resolutions the policy picks, trained with the MAC-budget loss ``budget_weight * (mean MAC fraction - budget)^2``.
Calibration then adds ``delta * scale_r^2`` to the logit of every resolution ``r`` (one offset ``delta`` in
``calibration[0]``, kept in the policy's bias): a larger ``delta`` favours the resolutions that cost more, so every
input's chosen resolution, and the mean MAC fraction, grow monotonically with it until the mean MAC fraction on
held-out images equals the budget. Reachable: from every input at the lowest resolution (about a quarter of the
MACs at the default scales, plus the policy) to every input at full resolution.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.convert import Targets, first_conv_in_channels, replace_module
from dynnet.core import Decision, DynamicBlock, DynamicModel, LossOutput, Trace, current_trace
from dynnet.core.budget import BudgetPolicy, Knob, LogitShift
from dynnet.core.recipe import recipe
from dynnet.estimators import gumbel_softmax
from dynnet.gates import open_bias_

__all__ = ["RSNets", "RSNetsConfig", "ResolutionSwitch", "SwitchableBatchNorm2d", "convert", "resolution_index"]

_ACTIVE: ContextVar[int] = ContextVar("dynnet_rs_nets_resolution", default=0)


@contextmanager
def resolution_index(index: int) -> Iterator[None]:
    """Within this scope every :class:`SwitchableBatchNorm2d` uses the batch norm of resolution ``index``."""
    token = _ACTIVE.set(index)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


class SwitchableBatchNorm2d(nn.BatchNorm2d):
    """Private batch norms per resolution; resolution 0 uses this module's own parameters (the original's names).

    Args:
        bn: the original batch norm (copied for resolution 0, deep-copied for the others).
        num_resolutions: R.
    """

    def __init__(self, bn: nn.BatchNorm2d, num_resolutions: int) -> None:
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        self.load_state_dict(bn.state_dict())
        self.others = nn.ModuleList(copy.deepcopy(bn) for _ in range(num_resolutions - 1))

    def forward(self, x: Tensor) -> Tensor:
        r = _ACTIVE.get()
        return super().forward(x) if r == 0 else self.others[r - 1](x)


@dataclass(frozen=True)
class RSNetsConfig:
    """Settings of RS-Nets.

    Attributes:
        budget: target mean fraction of the full-resolution MACs per image (policy included): the target of the
            MAC-budget loss on the policy and of calibration (the cost-weighted resolution logit offset).
        scales: input scale of each resolution, the full one first.
        tau: Gumbel-Softmax temperature of the policy.
        distill_weight: weight of the ensemble distillation (KL) terms.
        budget_weight: weight of the MAC-budget loss.
    """

    budget: float = 0.5
    scales: tuple[float, ...] = (1.0, 0.75, 0.5)
    tau: float = 1.0
    distill_weight: float = 1.0
    budget_weight: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")
        if len(self.scales) < 2 or self.scales[0] != 1.0 or any(not 0 < s <= 1 for s in self.scales):
            raise ValueError(f"scales must start at 1.0 and lie in (0, 1], at least two, got {self.scales}")


class ResolutionPolicy(nn.Module):
    """Strided 3×3 conv (8 channels) → ReLU → global pool → linear: Tensor[N, C, h, w] → logits Tensor[N, R]."""

    def __init__(self, in_channels: int, num_resolutions: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, 2, 1)
        self.fc = open_bias_(nn.Linear(8, num_resolutions), open_index=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1))


class ResolutionSwitch(DynamicBlock):
    """The shared network, run at the resolution the policy picks for each input.

    Args:
        net: the base network with :class:`SwitchableBatchNorm2d` layers.
        in_channels: image channels.
        config: the recipe's settings.
    """

    granularity = "resolution"

    def __init__(self, net: nn.Module, in_channels: int, config: RSNetsConfig) -> None:
        super().__init__()
        self.net = net
        self.scales = tuple(config.scales)
        self.policy = ResolutionPolicy(in_channels, len(self.scales))
        self.tau = config.tau

    def resize(self, x: Tensor, r: int) -> Tensor:
        s = self.scales[r]
        if s == 1.0:
            return x
        size = [max(1, round(d * s)) for d in x.shape[-2:]]
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def at(self, r: int, x: Tensor) -> Tensor:
        """Logits of the shared network at resolution ``r`` for full-size images Tensor[N, C, H, W]."""
        with resolution_index(r):
            return self.net(self.resize(x, r))

    def forward_dense(self, x: Tensor) -> Tensor:
        return self.at(0, x)

    def decide(self, x: Tensor) -> Decision:
        logits = self.policy(self.resize(x, len(self.scales) - 1))
        sample, probs = gumbel_softmax(logits, self.tau, hard=True, noise=self.training)
        return Decision(sample, probs, "resolution")

    def forward_masked(self, x: Tensor) -> Tensor:
        d = self.decide(x)
        t = current_trace()
        outs = [self.at(r, x) for r in range(len(self.scales))]
        if t is not None:
            for r, o in enumerate(outs):
                t.record_output(f"rs_nets/logits{r}", o)
        out = sum(d.hard[:, r : r + 1].to(o.dtype) * o for r, o in enumerate(outs))
        self._record(x, d, sparse=False)
        return out

    def forward_sparse(self, x: Tensor) -> Tensor:
        d = self.decide(x)
        choice = d.hard.argmax(1)
        out = None
        for r in range(len(self.scales)):
            idx = (choice == r).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            o = self.at(r, x if idx.numel() == x.shape[0] else x.index_select(0, idx))
            out = o.new_zeros((x.shape[0], *o.shape[1:])) if out is None else out
            out = out.index_copy(0, idx, o)
        self._record(x, d, sparse=True)
        return out

    def _record(self, x: Tensor, d: Decision, *, sparse: bool) -> None:
        t = current_trace()
        if t is None:
            return
        n = x.shape[0]
        t.record_decision("resolution", d)
        for r in range(len(self.scales)):
            cost = self.cost(f"res{r}", lambda m, a, r=r: m.at(r, a), x)
            z = d.hard[:, r].double()
            executed = z.detach() * cost if sparse else float(cost)
            t.record_macs(
                f"res{r}", z * cost, executed=executed, minimum=0.0, maximum=cost, dense=cost if r == 0 else 0
            )
        small = self.resize(x[:1], len(self.scales) - 1)
        g = self.cost("policy", lambda m, a: m.policy(a), small)
        t.record_macs("policy", float(g), batch_size=n, minimum=g, maximum=g)


class RSNets(DynamicModel):
    """RS-Nets as a :class:`DynamicModel`; objective: CE of the chosen output + CE at every resolution +
    ensemble distillation + MAC budget."""

    def load_base_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Load weights of the original network (keys as in the unconverted model): each batch norm's entries go to
        its own parameters and, as at conversion, to every resolution's private copy; the policy keeps its own."""
        body: ResolutionSwitch = self.net
        switchable = {name for name, m in body.net.named_modules() if isinstance(m, SwitchableBatchNorm2d)}
        mapped: dict[str, Tensor] = {}
        for key, value in state_dict.items():
            mapped[f"net.{key}"] = value
            owner, _, leaf = key.rpartition(".")
            if owner in switchable:
                for r in range(len(body.scales) - 1):
                    mapped[f"net.{owner}.others.{r}.{leaf}"] = value.clone()
        super().load_base_state_dict(mapped)

    def budget_knob(self) -> Knob:
        """One offset ``delta`` added as ``delta * scale_r^2`` to the logit of every resolution ``r``: the chosen
        resolution's cost never decreases as ``delta`` grows (its cost ordering is the ordering of ``scale_r^2``)."""
        body: ResolutionSwitch = self.net
        bias = body.policy.fc.bias
        entries = [(bias, r, s * s) for r, s in enumerate(body.scales)]
        return LogitShift(self.calibration[0], entries).knob(lo=-100.0, hi=100.0, name="resolution logit offset")

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        budget = self.config.budget if budget is None else budget
        task = F.cross_entropy(logits, target)
        total, parts = task, {"task": float(task.detach())}
        per_res = [v for k, v in t.outputs.items() if k.startswith("rs_nets/logits")]
        if per_res:
            ce = torch.stack([F.cross_entropy(z, target) for z in per_res]).mean()
            teacher = torch.stack(per_res).mean(0).detach().softmax(1)
            kd = torch.stack([F.kl_div(z.log_softmax(1), teacher, reduction="batchmean") for z in per_res]).mean()
            total = total + ce + self.config.distill_weight * kd
            parts.update(resolutions=float(ce.detach()), distill=float(kd.detach()))
        if self.config.budget_weight:
            b = self.config.budget_weight * t.budget_loss(budget)
            total = total + b
            parts["budget"] = float(b.detach())
        return LossOutput(total, parts)


@recipe(
    "rs_nets",
    paper="Resolution Switchable Networks for Runtime Efficient Image Recognition (ECCV 2020), arXiv:2007.09558",
    budget=BudgetPolicy("trained+calibrated", knob="resolution logit offset (weighted by scale^2)",
                        reachable=(0.3, 1.0),
                        derives="MAC-budget loss target = budget (the mix of resolutions the policy picks)"),
)  # fmt: skip
def convert(model: nn.Module, config: RSNetsConfig, targets: Targets = "auto") -> RSNets:
    """Give every BatchNorm2d of ``model`` private copies per resolution and add the resolution policy."""
    bns = [(name, m) for name, m in model.named_modules() if type(m) is nn.BatchNorm2d]
    for name, bn in bns:
        replace_module(model, name, SwitchableBatchNorm2d(bn, len(config.scales)))
    in_channels = first_conv_in_channels(model)
    body = ResolutionSwitch(model, in_channels or 3, config)
    body.block_name = "resolution"
    return RSNets(body, recipe="rs_nets", config=copy.copy(config), in_channels=in_channels)
