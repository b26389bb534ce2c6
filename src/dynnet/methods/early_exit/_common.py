"""Shared early-exit machinery: trunks, exit placement, exit heads, the exit cascade and the model class.

An early-exit network is a base network cut into ``K`` segments; after segment ``k`` an exit head produces
logits and (for ``k < K - 1``) a decision says whether the sample stops there. The last exit is the base
network's own classifier, so with every decision "continue" (thresholds at ``+inf``, policies biased to
"continue") the converted model reproduces the base network.

Execution modes of :class:`ExitCascade` (a :class:`~dynnet.core.DynamicBlock` of granularity ``"exit"``):

* ``masked`` (training, reference): every segment and exit runs for every sample; the output is
  ``sum_k stop_k * logits_k`` with ``stop_k = alive_k * e_k`` and ``alive_{k+1} = alive_k * (1 - e_k)``.
* ``sparse``: the batch shrinks as samples exit (compaction with ``index_select``); later segments, heads and
  decisions run on the remaining samples only.
* ``dense``: the base network, no exit evaluated.

Per-sample MACs: segment ``k``, exit head ``k`` and decision ``k`` count for a sample only if it reached exit
``k`` (``alive_k``). Costs are measured once per input shape by one pass on meta tensors (no compute).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.core import (
    Decision,
    DynamicBlock,
    DynamicModel,
    LossOutput,
    Trace,
    current_trace,
    dynamic_blocks,
    run_on_meta,
)
from dynnet.core.registry import TypeRegistry
from dynnet.kernels.compaction import index_select_rows
from dynnet.macs import MacCounter
from dynnet.testing.scramble import register_randomiser

__all__ = [
    "NEVER",
    "ConvBranchHead",
    "EarlyExitModel",
    "ExitCascade",
    "ExitPlan",
    "PooledLinearHead",
    "Trunk",
    "budget_exit_weights",
    "entropy_confidence",
    "geometric_exit_shares",
    "gradient_rescale",
    "max_softmax_confidence",
    "place_exits",
    "plan_exits",
    "register_trunk",
    "select",
    "trunk_of",
    "unit_profile",
]

NEVER = math.inf
"""Threshold of an exit that no sample takes (scores are finite)."""

State = Any  # a Tensor[N, ...] or a tuple of them (multi-scale networks)


# ---------------------------------------------------------------------------------------------- trunks
@dataclass(frozen=True)
class Trunk:
    """A base network cut into units: ``base(x) == head(units[-1](... units[0](x)))``.

    Attributes:
        units: callables state → state, in execution order (the stem is the first unit).
        head: the base classifier, final state → logits Tensor[N, K].
        names: a name per unit (for reports).
        exit_heads: heads the base network already has after some units (MSDNet), by unit index.
    """

    units: tuple[Callable[[State], State], ...]
    head: Callable[[State], Tensor]
    names: tuple[str, ...]
    exit_heads: dict[int, nn.Module] | None = None


_TRUNKS: TypeRegistry[Callable[[nn.Module], Trunk]] = TypeRegistry("trunk")


def register_trunk(cls: type, fn: Callable[[nn.Module], Trunk]) -> None:
    """Teach the early-exit recipes how to cut a network class (and its subclasses) into units; raises on a
    duplicate."""
    _TRUNKS.register(cls, fn)


def trunk_of(base: nn.Module) -> Trunk:
    """The :class:`Trunk` of ``base`` (a registered class, or a network with an ``exit_trunk()`` method).

    Raises:
        TypeError: the network's class is unknown.
    """
    if hasattr(base, "exit_trunk"):
        return base.exit_trunk()
    fn = _TRUNKS.lookup(base)
    if fn is not None:
        return fn(base)
    known = ", ".join(_TRUNKS.names())
    raise TypeError(
        f"cannot attach exits to a {type(base).__name__}: known networks are {known}; register one with "
        "dynnet.methods.early_exit.register_trunk or give the network an exit_trunk() method"
    )


def _blocks(*layers: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f"{i}.{j}", b) for i, layer in enumerate(layers) for j, b in enumerate(layer)]


def _resnet_like(stem: Callable[[Tensor], Tensor], layers: Sequence[nn.Module], head: Callable) -> Trunk:
    blocks = _blocks(*layers)
    return Trunk(
        units=(stem, *(b for _, b in blocks)),
        head=head,
        names=("stem", *(f"layer{n}" for n, _ in blocks)),
    )


def _register_builtin_trunks() -> None:
    from torchvision.models import MobileNetV2, ResNet

    from dynnet.models.cifar_resnet import CifarResNet

    register_trunk(
        CifarResNet,
        lambda b: _resnet_like(
            lambda x: b.relu(b.bn1(b.conv1(x))),
            (b.layer1, b.layer2, b.layer3),
            lambda h: b.fc(b.avgpool(h).flatten(1)),
        ),
    )
    register_trunk(
        ResNet,
        lambda b: _resnet_like(
            lambda x: b.maxpool(b.relu(b.bn1(b.conv1(x)))),
            (b.layer1, b.layer2, b.layer3, b.layer4),
            lambda h: b.fc(torch.flatten(b.avgpool(h), 1)),
        ),
    )

    def mobilenet(b: nn.Module) -> Trunk:
        return Trunk(
            units=tuple(b.features),
            head=lambda h: b.classifier(torch.flatten(F.adaptive_avg_pool2d(h, (1, 1)), 1)),
            names=tuple(f"features.{i}" for i in range(len(b.features))),
        )

    register_trunk(MobileNetV2, mobilenet)
    try:
        from timm.models.resnet import ResNet as TimmResNet
    except ImportError:  # timm is optional
        return
    register_trunk(
        TimmResNet,
        lambda b: _resnet_like(
            lambda x: b.maxpool(b.act1(b.bn1(b.conv1(x)))),
            (b.layer1, b.layer2, b.layer3, b.layer4),
            lambda h: b.forward_head(h),
        ),
    )


_register_builtin_trunks()


# ------------------------------------------------------------------------------------ meta-tensor probes
def _count(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``(fn(), MACs per sample)`` for a call on a meta batch of 2."""
    with MacCounter() as c:
        out = fn()
    if c.total % 2:
        raise RuntimeError(f"MACs are not linear in the batch size ({c.total} for 2)")
    return out, c.total // 2


def unit_profile(base: nn.Module, trunk: Trunk, input_shape: tuple[int, int, int]) -> list[tuple[State, int]]:
    """For each unit: its output (a meta tensor or tuple of them, batch 2) and its MACs per sample."""

    def run(m: nn.Module, x: Tensor) -> list[tuple[State, int]]:
        rows, h = [], x
        for unit in trunk.units:
            h, macs = _count(lambda u=unit, s=h: u(s))
            rows.append((h, macs))
        return rows

    return run_on_meta(base, run, torch.empty((1, *input_shape)))


def place_exits(unit_macs: Sequence[float], fractions: Sequence[float]) -> list[int]:
    """Unit indices after which early exits go, one per cumulative-MAC fraction (duplicates removed).

    Args:
        unit_macs: MACs of each unit of the trunk.
        fractions: increasing fractions in (0, 1) of the trunk's MACs.

    Returns:
        Sorted unit indices ``i`` (an exit after unit ``i``), never the last unit (that is the final exit).
        Each exit goes after the first unit whose cumulative cost reaches the fraction.
    """
    total = float(sum(unit_macs))
    cum = torch.tensor(list(unit_macs), dtype=torch.float64).cumsum(0) / total
    last = len(unit_macs) - 1
    positions = []
    for f in fractions:
        if not 0.0 < f < 1.0:
            raise ValueError(f"exit fractions must be in (0, 1), got {f}")
        i = int(torch.searchsorted(cum, torch.tensor(f - 1e-12, dtype=torch.float64)))
        if i < last and i not in positions:
            positions.append(i)
    if not positions:
        raise ValueError(f"no early exit fits the fractions {list(fractions)} on a trunk of {len(unit_macs)} units")
    return sorted(positions)


# -------------------------------------------------------------------------------------- pure functions
def select(state: State | None, idx: Tensor) -> State | None:
    """Rows ``idx`` of a state (Tensor[N, ...], a tuple of them, or ``None``)."""
    if state is None:
        return None
    if isinstance(state, Tensor):
        return index_select_rows(state, idx)
    return type(state)(index_select_rows(s, idx) for s in state)


def max_softmax_confidence(logits: Tensor) -> Tensor:
    """Tensor[N, K] logits → Tensor[N] maximum softmax probability, in [1/K, 1]."""
    return logits.float().softmax(1).amax(1)


def entropy_confidence(logits: Tensor) -> Tensor:
    """Tensor[N, K] logits → Tensor[N] ``1 - H(softmax) / log K`` in [0, 1] (BranchyNet exits when the
    entropy is low, i.e. when this confidence is high)."""
    logp = logits.float().log_softmax(1)
    entropy = -(logp.exp() * logp).sum(1)
    return 1.0 - entropy / math.log(logits.shape[1])


class _GradientRescale(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def gradient_rescale(x: Tensor, scale: float) -> Tensor:
    """Identity in the forward pass; multiplies the gradient by ``scale`` (IMTA's gradient equilibrium)."""
    return _GradientRescale.apply(x, scale)


def geometric_exit_shares(stop_costs: Sequence[float] | Tensor, budget: float, *, iters: int = 80) -> Tensor:
    """MSDNet's budgeted-batch exit profile for a budget: the share ``q_k ∝ p^k`` of the samples that stop at exit
    ``k``, with ``p`` such that the mean cost ``Σ_k q_k c_k`` equals ``budget``.

    Args:
        stop_costs: Tensor[K] cost of stopping at exit ``k`` (increasing; any unit, e.g. a fraction of the dense
            MACs, the unit of ``budget``).
        budget: target mean cost. Below ``c_0`` every sample stops at the first exit; above ``c_{K-1}`` at the
            last.
        iters: bisection steps on ``log p``.

    Returns:
        Tensor[K] float64 shares, summing to 1.
    """
    c = [float(v) for v in torch.as_tensor(stop_costs, dtype=torch.float64).flatten()]

    def shares(log_p: float) -> list[float]:  # softmax of k · log p, in plain floats (called every training step)
        top = max(0.0, log_p * (len(c) - 1))
        e = [math.exp(k * log_p - top) for k in range(len(c))]
        total = sum(e)
        return [v / total for v in e]

    lo, hi = -40.0, 40.0
    if budget <= c[0]:
        return torch.tensor(shares(lo), dtype=torch.float64)
    if budget >= c[-1]:
        return torch.tensor(shares(hi), dtype=torch.float64)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if sum(q * v for q, v in zip(shares(mid), c, strict=True)) > budget:
            hi = mid
        else:
            lo = mid
    return torch.tensor(shares(0.5 * (lo + hi)), dtype=torch.float64)


def budget_exit_weights(stop_costs: Sequence[float] | Tensor, budget: float) -> list[float]:
    """Loss weights of the exits derived from a budget: ``w_k = (1 + K q_k) / 2`` (mean 1).

    Half the uniform weights of the anytime objective (every exit equally good), half the share ``q_k`` of the
    samples that exit ``k`` will serve at the budget (:func:`geometric_exit_shares`, the profile that calibration
    fits): at a small budget the early exits, which answer most images, weigh more; at a large one the late exits.
    Every weight stays at least 1/2, so every exit (and the trunk under it) keeps training.

    Args:
        stop_costs: Tensor[K] cost of stopping at exit ``k``, as a fraction of the dense MACs.
        budget: target mean fraction of the dense MACs per image.
    """
    q = geometric_exit_shares(stop_costs, budget)
    return [float(w) for w in 0.5 * (1.0 + q.numel() * q)]


# ---------------------------------------------------------------------------------------------- heads
class PooledLinearHead(nn.Module):
    """Global average pool → Linear: Tensor[N, C, H, W] → logits Tensor[N, K] (CDL's linear classifiers)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, h: Tensor) -> Tensor:
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class ConvBranchHead(nn.Module):
    """A side branch: ``depth`` × (conv3×3 → BN → ReLU), global average pool, Linear.

    Tensor[N, C, H, W] → logits Tensor[N, K]. The first conv is strided when the map is larger than 8×8 so
    that the branch stays cheap next to the trunk (BranchyNet's branches are one or two conv layers).
    """

    def __init__(self, in_channels: int, num_classes: int, *, width: int, depth: int = 1, stride: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i in range(depth):
            layers += [
                nn.Conv2d(c, width, 3, stride if i == 0 else 1, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            c = width
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, h: Tensor) -> Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.body(h), 1).flatten(1))


# -------------------------------------------------------------------------------------------- cascade
class ExitCascade(DynamicBlock):
    """The base network's units with early exits between them.

    The base network's children are registered under their own names (its state_dict keys are unchanged);
    the recipe's exit heads live in ``exits`` and its decision parameters in ``gates`` (thresholds) and/or
    ``policy``.

    Args:
        base: the original network (its submodules are reused).
        trunk: how ``base`` is cut into units (:func:`trunk_of`).
        positions: unit indices after which the ``K - 1`` early exits sit (sorted).
        exits: ``K - 1`` early-exit heads (or an empty list when :meth:`exit_logits` is overridden).
        thresholds: initial threshold per early exit (``NEVER`` = no sample exits).
        trainable_thresholds: make the thresholds parameters (DynExit) instead of buffers.

    Subclasses customise :meth:`exit_logits`, :meth:`final_logits`, :meth:`exit_score` and :meth:`decide`.
    """

    granularity = "exit"
    score_range: tuple[float, float] = (0.0, 1.0)
    """Range of :meth:`exit_score`, used by the early exits' randomiser (:mod:`dynnet.testing.scramble`)."""

    def __init__(
        self,
        base: nn.Module,
        trunk: Trunk,
        positions: Sequence[int],
        exits: Sequence[nn.Module],
        *,
        thresholds: float = NEVER,
        trainable_thresholds: bool = False,
    ) -> None:
        super().__init__()
        for name, child in base.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "trunk", trunk)
        positions = list(positions)
        if positions != sorted(set(positions)) or not positions or positions[-1] >= len(trunk.units) - 1:
            raise ValueError(f"exit positions must be increasing unit indices below {len(trunk.units) - 1}")
        self.positions = positions
        self.exits = nn.ModuleList(exits)
        self.gates = nn.Module()
        thr = torch.full((len(positions),), float(thresholds))
        if trainable_thresholds:
            self.gates.threshold = nn.Parameter(thr)
        else:
            self.gates.register_buffer("threshold", thr)
        self._cost_cache: dict[tuple, list[tuple[int, int, int]]] = {}

    def __deepcopy__(self, memo: dict[int, Any]) -> ExitCascade:
        # The trunk's units are closures over the base network's modules; a plain deep copy would keep
        # them pointing at the original's weights, so the copy rebuilds its trunk from its own base.
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key != "trunk":
                object.__setattr__(new, key, copy.deepcopy(value, memo))
        object.__setattr__(new, "trunk", new.make_trunk())
        return new

    def make_trunk(self) -> Trunk:
        """The trunk of this cascade's own base network (rebuilt by copies and unpickling: its units are closures
        over the base's modules). Cascades whose units are not the base's cut override it."""
        return trunk_of(self._base)

    def __getstate__(self) -> dict[str, Any]:
        # The trunk's closures cannot be pickled (torch.save, multiprocessing): leave it out and rebuild it from
        # the unpickled base, as __deepcopy__ does.
        state = self.__dict__.copy()
        state.pop("trunk", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        object.__setattr__(self, "trunk", self.make_trunk())

    # -- structure ----------------------------------------------------------------------------------
    @property
    def num_exits(self) -> int:
        """K: early exits plus the final one."""
        return len(self.positions) + 1

    def segment(self, k: int, h: State) -> State:
        """Run the units between exit ``k - 1`` and exit ``k``."""
        start = 0 if k == 0 else self.positions[k - 1] + 1
        stop = self.positions[k] + 1 if k < len(self.positions) else len(self.trunk.units)
        for unit in self.trunk.units[start:stop]:
            h = unit(h)
        return h

    # -- hooks --------------------------------------------------------------------------------------
    def exit_logits(self, k: int, h: State, carry: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Logits Tensor[N, K] of early exit ``k`` and what later exits receive (``carry``)."""
        return self.exits[k](h), carry

    def final_logits(self, h: State, carry: Tensor | None) -> Tensor:
        """Logits of the last exit: the base network's classifier."""
        return self.trunk.head(h)

    def head(self, k: int, h: State, carry: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if k < len(self.positions):
            return self.exit_logits(k, h, carry)
        return self.final_logits(h, carry), None

    def exit_score(self, k: int, h: State, logits: Tensor) -> Tensor:
        """Tensor[N] confidence of exit ``k``; the sample exits when it reaches the threshold."""
        return max_softmax_confidence(logits)

    def decide(self, k: int, score: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(e, soft)``: Tensor[N] 0/1 exit indicator (may carry a straight-through gradient), and its
        relaxation (or ``None``)."""
        return (score >= self.gates.threshold[k]).to(score.dtype), None

    # -- costs --------------------------------------------------------------------------------------
    def costs(self, x: Tensor) -> list[tuple[int, int, int]]:
        """Per exit ``k``: MACs per sample of (segment k, exit head k, decision k), for inputs shaped like ``x``."""
        key = tuple(x.shape[1:])
        if key not in self._cost_cache:

            def run(m: ExitCascade, inp: Tensor) -> list[tuple[int, int, int]]:
                rows, h, carry = [], inp, None
                for k in range(m.num_exits):
                    h, seg = _count(lambda k=k, s=h: m.segment(k, s))
                    (logits, carry), head = _count(lambda k=k, s=h, c=carry: m.head(k, s, c))
                    gate = 0
                    if k < m.num_exits - 1:
                        _, gate = _count(lambda k=k, s=h, lg=logits: m.exit_score(k, s, lg))
                    rows.append((seg, head, gate))
                return rows

            self._cost_cache[key] = run_on_meta(self, run, x)
        return self._cost_cache[key]

    def cumulative_costs(self, x: Tensor) -> Tensor:
        """Tensor[K] float64: per-sample MACs of a sample that stops at exit k (everything it ran)."""
        rows = self.costs(x)
        per = torch.tensor([seg + head + gate for seg, head, gate in rows], dtype=torch.float64)
        # The last exit has no decision; a sample stopping at k ran decisions 0..k (k < K-1).
        return per.cumsum(0)

    # -- modes --------------------------------------------------------------------------------------
    def forward_dense(self, x: Tensor) -> Tensor:
        h = x
        for unit in self.trunk.units:
            h = unit(h)
        return self.trunk.head(h)

    def forward_masked(self, x: Tensor) -> Tensor:
        t = current_trace()
        n, last = x.shape[0], self.num_exits - 1
        alive = torch.ones(n, dtype=x.dtype, device=x.device)
        alives, stops, softs = [], [], []
        out: Tensor | None = None
        h, carry = x, None
        for k in range(self.num_exits):
            h = self.segment(k, h)
            logits, carry = self.head(k, h, carry)
            if t is not None:
                t.record_output(f"exit{k}", logits)
            alives.append(alive)
            if k == last:
                stop, soft = alive, None
            else:
                score = self.exit_score(k, h, logits)
                if t is not None:
                    t.record_output(f"exit{k}/score", score)
                e, soft = self.decide(k, score)
                e = e.to(x.dtype)
                stop = alive * e
                alive = alive * (1.0 - e)
            stops.append(stop)
            softs.append(soft)
            term = stop.to(logits.dtype).view(-1, 1) * logits
            out = term if out is None else out + term
        if t is not None:
            self._record(t, x, alives, stops, softs, executed=None)
        return out

    def forward_sparse(self, x: Tensor) -> Tensor:
        n, last = x.shape[0], self.num_exits - 1
        idx = torch.arange(n, device=x.device)
        stop_at = torch.full((n,), last, dtype=torch.long, device=x.device)
        out: Tensor | None = None
        h, carry = x, None
        for k in range(self.num_exits):
            h = self.segment(k, h)
            logits, carry = self.head(k, h, carry)
            if out is None:
                out = logits.new_empty((n, logits.shape[1]))
            if k == last:
                out.index_copy_(0, idx, logits)
                break
            e = self.decide(k, self.exit_score(k, h, logits))[0].detach() > 0.5
            if not bool(e.any()):
                continue
            gone = e.nonzero().squeeze(1)
            out.index_copy_(0, idx.index_select(0, gone), logits.index_select(0, gone))
            stop_at.index_fill_(0, idx.index_select(0, gone), k)
            if bool(e.all()):
                break
            keep = (~e).nonzero().squeeze(1)
            idx, h, carry = idx.index_select(0, keep), select(h, keep), select(carry, keep)
        t = current_trace()
        if t is not None:
            ks = torch.arange(self.num_exits, device=x.device).view(-1, 1)
            alive = (stop_at.view(1, -1) >= ks).to(x.dtype)
            stops = (stop_at.view(1, -1) == ks).to(x.dtype)
            self._record(t, x, list(alive), list(stops), [None] * self.num_exits, executed=alive)
        return out

    def _record(
        self,
        t: Trace,
        x: Tensor,
        alives: list[Tensor],
        stops: list[Tensor],
        softs: list[Tensor | None],
        executed: Tensor | None,
    ) -> None:
        """Decisions, the exit index and per-part MACs (``alive_k`` × cost) into the trace."""
        rows, last = self.costs(x), self.num_exits - 1
        stop_at = torch.stack([s.detach() for s in stops], 1).argmax(1)
        t.record_output("exit_index", stop_at)
        for k, ((seg, head, gate), alive) in enumerate(zip(rows, alives, strict=True)):
            a = alive.double()
            ran = torch.ones_like(a) if executed is None else executed[k].double()
            first = k == 0
            t.record_macs(
                f"exit{k}/segment", a * seg, executed=ran * seg, minimum=seg if first else 0.0, maximum=seg, dense=seg
            )
            t.record_macs(
                f"exit{k}/head",
                a * head,
                executed=ran * head,
                minimum=head if first else 0.0,
                maximum=head,
                dense=head if k == last else 0.0,
            )
            if k < last:
                t.record_macs(
                    f"exit{k}/gate", a * gate, executed=ran * gate, minimum=gate if first else 0.0, maximum=gate
                )
                soft = softs[k]
                t.record_decision(
                    f"exit{k}",
                    Decision(hard=stops[k], soft=None if soft is None else alive * soft, granularity="exit"),
                )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, positions={self.positions}"


# ---------------------------------------------------------------------------------------------- model
class EarlyExitModel(DynamicModel):
    """A converted early-exit network (``net`` is an :class:`ExitCascade`).

    The default objective is the weighted sum of the exits' cross-entropies (``config.exit_weights``, derived from
    the budget when absent: :func:`budget_exit_weights`), the joint training of BranchyNet and MSDNet.

    Budget: the exits' thresholds (a buffer or parameter ``net.gates.threshold``, in the ``state_dict``) are what
    :func:`dynnet.calibrate` sets, with MSDNet's budgeted-batch calibration (:meth:`calibrate_to_`); the geometric
    profile's parameter ``p`` is kept in ``calibration[0]``.
    """

    net: ExitCascade

    @property
    def cascade(self) -> ExitCascade:
        return self.net

    @property
    def num_exits(self) -> int:
        return self.net.num_exits

    @staticmethod
    def exit_outputs(t: Trace) -> list[Tensor]:
        """Logits of every exit recorded by a masked forward pass, Tensor[N, K] each, first exit first."""
        out, k = [], 0
        while f"exit{k}" in t.outputs:
            out.append(t.outputs[f"exit{k}"])
            k += 1
        if not out:
            raise RuntimeError("no exit logits in the trace: run the model in masked mode (training) inside trace()")
        return out

    @staticmethod
    def stop_costs(t: Trace) -> Tensor:
        """Tensor[K] float64 from a trace: MACs per sample of stopping at exit ``k``, as a fraction of the dense
        network (segments, heads and decisions of exits ``0..k``)."""
        per: dict[int, float] = {}
        for e in t.entries:
            head, _, _ = e.name.partition("/")
            if head.startswith("exit") and head[4:].isdigit():
                per[int(head[4:])] = per.get(int(head[4:]), 0.0) + e.maximum
        costs = torch.tensor([per[k] for k in sorted(per)], dtype=torch.float64)
        return costs.cumsum(0) / t.dense_macs()

    @staticmethod
    def alive(t: Trace) -> list[Tensor]:
        """Tensor[N] per exit: whether (straight-through in training) each sample reached exit ``k``."""
        stops = list(t.decisions_of("exit").values())
        out, alive = [], torch.ones_like(stops[0].hard)
        for s in stops:
            out.append(alive)
            alive = alive - s.hard
        out.append(alive)
        return out

    def exit_weights(self, t: Trace, budget: float | None = None) -> list[float]:
        """Loss weight of every exit, final one last: ``config.exit_weights`` when set, else derived from the
        budget (:func:`budget_exit_weights` on the exits' stop costs in ``t``).

        Args:
            t: the trace of a masked forward pass.
            budget: target mean MAC fraction (default: ``config.budget``).
        """
        weights = getattr(self.config, "exit_weights", None)
        if weights is None:
            return budget_exit_weights(self.stop_costs(t), self.budget if budget is None else budget)
        if len(weights) != self.num_exits:
            raise ValueError(f"exit_weights has {len(weights)} values for {self.num_exits} exits")
        return list(weights)

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        from dynnet.losses.early_exit import multi_exit_cross_entropy

        exits = self.exit_outputs(t)
        task = multi_exit_cross_entropy(exits, target, self.exit_weights(t, budget))
        parts = {"task": float(task.detach())}
        parts.update({f"ce{k}": float(F.cross_entropy(z.detach(), target)) for k, z in enumerate(exits)})
        return LossOutput(task, parts)

    # -- budget -------------------------------------------------------------------------------------
    def calibrate_to_(self, batches: list[Tensor], budget: float, tolerance: float) -> dict[str, float]:
        """Set the exits' thresholds for a mean-MAC budget with MSDNet's budgeted-batch calibration.

        One masked pass over ``batches`` gives every exit's score for every image (no labels needed); exit
        proportions follow the geometric profile ``q_k ∝ p^k``, each threshold admits the ``q_k N`` highest-scoring
        remaining images, and ``p`` is bisected until the mean MAC fraction equals ``budget``
        (:func:`~dynnet.methods.early_exit.calibration.calibrate_thresholds`). Modes are restored afterwards.

        Returns:
            ``{"exit profile p": p, "exit0 threshold": ..., ...}``.

        Raises:
            ValueError: ``budget`` lies outside the MAC fractions the thresholds reach on ``batches`` (every image
                at the first exit … every image at the last).
        """
        from dynnet.methods.early_exit.calibration import calibrate_to_budget_, collect_exits

        was_training = self.training
        modes = {name: block.mode for name, block in dynamic_blocks(self)}
        try:
            profile = collect_exits(self, batches)
        finally:
            for name, block in dynamic_blocks(self):
                block.mode = modes.get(name, block.mode)
            self.train(was_training)
        extremes = "every image at the first exit … every image at the last"
        return calibrate_to_budget_(self, profile, budget, tolerance, extremes=extremes)

    # -- thresholds ---------------------------------------------------------------------------------
    def idle_decisions(self) -> set[str]:
        """The exits no sample can take (threshold ``NEVER``, as before calibration): training's gate-health check
        leaves them out instead of reporting them collapsed."""
        thr = self.net.gates.threshold
        return {f"exit{k}" for k in range(thr.numel()) if math.isinf(float(thr[k])) and float(thr[k]) > 0}

    @property
    def thresholds(self) -> Tensor:
        """Tensor[K - 1]: exit ``k`` is taken when its score reaches ``thresholds[k]``."""
        return self.net.gates.threshold.detach().clone()

    def set_thresholds(self, thresholds: Sequence[float] | Tensor) -> None:
        """Set every early exit's threshold (``math.inf``: never exit)."""
        thr = torch.as_tensor(thresholds, dtype=torch.float32).flatten()
        if thr.numel() != self.num_exits - 1:
            raise ValueError(f"expected {self.num_exits - 1} thresholds, got {thr.numel()}")
        with torch.no_grad():
            self.net.gates.threshold.copy_(thr)


# ------------------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class ExitPlan:
    """Where the exits of a network go, and what they see.

    Attributes:
        trunk: the network cut into units.
        positions: unit indices after which the early exits sit.
        channels: channels of the feature map each early exit receives (the last tensor for multi-scale states).
        num_classes: outputs of the base classifier.
        unit_macs: MACs per sample of each unit at the probe resolution.
        in_channels: input channels of the network.
    """

    trunk: Trunk
    positions: list[int]
    channels: list[int]
    num_classes: int
    unit_macs: list[int]
    in_channels: int


def plan_exits(base: nn.Module, fractions: Sequence[float], *, probe_size: int = 32) -> ExitPlan:
    """Cut ``base`` into units and place one early exit per cumulative-MAC fraction (see :func:`place_exits`).

    The unit costs are probed on meta tensors at ``probe_size``×``probe_size``: relative costs, which fix the
    placement, barely depend on the resolution for convolutional networks.
    """
    from dynnet.convert import first_conv_in_channels

    in_channels = first_conv_in_channels(base) or 3
    trunk = trunk_of(base)
    profile = unit_profile(base, trunk, (in_channels, probe_size, probe_size))
    unit_macs = [m for _, m in profile]
    positions = place_exits(unit_macs, fractions)

    def last(s: State) -> Tensor:
        return s if isinstance(s, Tensor) else s[-1]

    channels = [last(profile[p][0]).shape[1] for p in positions]
    final = profile[-1][0]
    num_classes = run_on_meta(base, lambda m, *s: trunk.head(s[0] if len(s) == 1 else tuple(s)), *_as_tuple(final))
    return ExitPlan(trunk, positions, channels, int(num_classes.shape[1]), unit_macs, in_channels)


def _as_tuple(state: State) -> tuple[Tensor, ...]:
    return (state,) if isinstance(state, Tensor) else tuple(state)


@register_randomiser(EarlyExitModel)
def _randomise(model: EarlyExitModel, generator: torch.Generator) -> int:
    """Random decisions for testing: thresholds uniform in the score range, policies re-initialised.

    Returns:
        How many tensors were changed.
    """
    lo, hi = model.net.score_range
    changed = 0
    with torch.no_grad():
        thr = model.net.gates.threshold
        thr.copy_(lo + (hi - lo) * torch.rand(thr.shape, generator=generator))
        changed += 1
        for name, p in model.named_parameters():
            if "policy" not in name.split(".")[:-1]:
                continue
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=generator) * (2.0 if p.dim() == 1 else 1.0) / fan_in**0.5)
            changed += 1
    return changed
