"""`DynamicModel`: the network a recipe returns, with the contract ``forward(x) -> logits``."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.core.block import dynamic_blocks, probe_macs
from dynnet.core.budget import Knob, LogitShift, check_budget_in_range, search_knob
from dynnet.core.cache import structure_generation, tracing_or_compiling, version_key
from dynnet.core.latency import REST, LatencyModel
from dynnet.core.trace import Trace, current_trace
from dynnet.kernels import autotune

__all__ = ["DECISION_MODULE_NAMES", "DynamicModel", "LossOutput", "check_input"]


ENGINES = ("auto", "batched", "per_sample", "masked")
"""The values of :attr:`DynamicModel.batch_engine`."""


@dataclass
class LossOutput:
    """A training objective and its named parts (scalars, for logging)."""

    total: Tensor
    parts: dict[str, float] = field(default_factory=dict)


def check_input(
    x: Any, in_channels: int | None, *, check_finite: bool = True, dtype: torch.dtype | None = None
) -> None:
    """Validate a batch of images: Tensor[N, C, H, W], floating point, finite.

    Args:
        x: the batch.
        in_channels: expected C, or ``None``.
        check_finite: reject NaN/Inf values (skipped while compiling or exporting: data-dependent).
        dtype: the model's floating-point precision; ``x`` must have it unless autocast is enabled.

    Raises:
        TypeError: not a tensor, not floating point, or another precision than the model's.
        ValueError: wrong rank, wrong channel count, empty batch, empty images, NaN/Inf values.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a Tensor[N, C, H, W] of images, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"expected a Tensor[N, C, H, W] (4 dims), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected floating-point images, got dtype {x.dtype} (convert with x.float() / 255)")
    if in_channels is not None and x.shape[1] != in_channels:
        raise ValueError(f"the model expects {in_channels} input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    if x.shape[0] == 0:
        raise ValueError("empty batch: N must be at least 1")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"empty image: H and W must be at least 1, got shape {tuple(x.shape)}")
    if dtype is not None and x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"the model's weights are {dtype} but the input is {x.dtype}: convert the input with x.to({dtype}) "
            f"or the model with model.to({x.dtype})"
        )
    # A NaN or Inf element makes the sum NaN or Inf, so a finite sum proves every element finite: one reduction
    # (~1.5 µs at batch 1) instead of isfinite + all (~6.5 µs); a non-finite sum (possibly an overflow of large
    # finite values) is checked element-wise.
    if (
        check_finite
        and not torch.compiler.is_compiling()
        and not math.isfinite(x.sum().item())
        and not bool(torch.isfinite(x).all())
    ):
        raise ValueError("input contains NaN or Inf values")


class DynamicModel(nn.Module):
    """A converted network: the base network with dynamic blocks inside, plus the recipe's objective.

    Args:
        net: the (surgically modified) network; ``net(x)`` returns logits.
        recipe: registered recipe name.
        config: the recipe's frozen config dataclass.
        in_channels: expected input channels (validated on every call), or ``None`` to skip.

    The static part of the network (everything outside dynamic blocks) is recorded into the trace as one
    MAC entry; its cost is probed once per input shape on meta tensors.

    Buffers:
        calibration: Tensor[2] float64 ``(knob value, calibrated budget)``: the value that :func:`dynnet.calibrate`
            last gave the recipe's knob (the recipes whose knob is an edit of existing weights read it back from
            here) and the budget it calibrated to (0: never calibrated). It is part of the ``state_dict``, so a
            calibration round-trips through checkpoints and export.
    """

    def __init__(self, net: nn.Module, *, recipe: str, config: Any, in_channels: int | None) -> None:
        super().__init__()
        self.net = net
        self.recipe = recipe
        self.config = config
        self.in_channels = in_channels
        self._dense_cache: dict[tuple, int] = {}
        self.register_buffer("calibration", torch.zeros(2, dtype=torch.float64))
        # Configuration of the serving machine (not in the state_dict: a LatencyModel is JSON of its own).
        self.latency_model: LatencyModel | None = None
        self.budget_ms: float | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Every recipe's objective reads the trace: check it once here rather than in each override.
        if "compute_loss" in cls.__dict__:
            cls.compute_loss = _checks_trace(cls.__dict__["compute_loss"])

    @property
    def budget(self) -> float | None:
        """The recipe's budget (target mean fraction of the dense MACs per image), fixed at conversion.

        Setting it raises: the recipe derived its own settings (rates, thresholds, sizes) from it when converting.
        Use :func:`dynnet.calibrate` to move the decision thresholds to another budget, or convert again.
        """
        return getattr(self.config, "budget", None)

    @budget.setter
    def budget(self, value: float) -> None:
        from dynnet.core.recipe import RECIPES

        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"budget must be a number (a MAC fraction), got {type(value).__name__} {value!r}")
        policy = RECIPES.get(self.recipe).budget if self.recipe in RECIPES else None
        how, span = "", ""
        if policy is not None:
            check_budget_in_range(self.recipe, value, policy)
            span = f" (it reaches MAC fractions in [{policy.reachable[0]:.2f}, {policy.reachable[1]:.2f}])"
            if policy.calibrated:
                how = f"dynnet.calibrate(model, data, {value!r}) to move its {policy.knob}, or "
        raise AttributeError(
            f"the budget of a converted model is fixed at conversion: recipe {self.recipe!r} derived its settings "
            f"from budget={self.budget}{span}; use {how}convert the base network again with budget={value!r}"
        )

    batch_engine: str = "auto"
    """How untraced sparse inference runs a batch (set it on a model to fix it): ``"batched"``, the recipe's batch
    path (:meth:`run` on the whole batch); ``"per_sample"``, :meth:`run` on each sample in turn — the batch-1 paths
    (compiled for the channel family), which execute each sample's own decisions, where a batch path has to compute
    the union of the samples' work or pad it (batch > 1 only); ``"masked"``, the same decisions applied as masks to
    the dense computation (masked mode: the same outputs, every MAC computed), where the sparse kernels lose to the
    dense ones (gathers of a narrow layer, tiles of a small map); ``"auto"``, the fastest of these, timed once per
    input shape and calibration (:mod:`dynnet.kernels.autotune`), ``"batched"`` where timing is off (autograd, a
    profiler or MAC counter watching, ``DYNNET_AUTOTUNE=0`` as in the tests). Outputs agree up to float rounding
    (per-sample decisions are batch-invariant, and sparse = masked, by contract); a trace always sees the batched
    sparse path, so the MACs it records are those of real skipping. :attr:`last_engine` says which ran last."""

    last_engine: str | None = None
    """The engine of the last untraced call (``"batched"``, ``"per_sample"`` or ``"masked"``; ``None`` before one):
    what a latency measurement of sparse mode really timed."""

    def forward(self, x: Tensor) -> Tensor:
        """Tensor[N, C, H, W] → logits Tensor[N, K]; decisions and MACs go to the active trace."""
        check_input(x, self.in_channels, dtype=self._weight_dtype())
        t = current_trace()
        if t is None:
            engine = self._engine(x)
            self.__dict__["last_engine"] = engine
            if engine == "per_sample":
                return self._each(x)
            if engine == "masked":
                return self._masked(x)
            return self.run(x)
        start = len(t.entries)
        if self.latency_model is not None and t.latency_model is None:
            t.latency_model = self.latency_model
            t.latency_budget = self.budget_ms is not None
        out = self.run(x)
        self._record_static(t, x, start)
        return out

    def set_latency_model_(self, model: LatencyModel | None, budget_ms: float | None = None) -> DynamicModel:
        """Attach the latency model of the serving machine (``t.latency()`` reads it) and, with ``budget_ms``, make
        every budget loss of the traces of this model target that latency instead of a MAC fraction.

        Args:
            model: a :class:`~dynnet.core.latency.LatencyModel` profiled on this network (``None``: detach).
            budget_ms: target mean latency per sample (ms, at the latency model's serving batch size); ``None``: the
                budget stays a MAC fraction.

        Returns:
            ``self``.

        Raises:
            ValueError: ``budget_ms`` without a latency model, not positive, or above the dense network's latency; a
                latency model whose parts are not this model's dynamic blocks.
        """
        if budget_ms is not None:
            if model is None:
                raise ValueError("budget_ms needs a latency model: profile one with dynnet.profile_latency")
            if isinstance(budget_ms, bool) or not isinstance(budget_ms, numbers.Real) or not budget_ms > 0:
                raise ValueError(f"budget_ms must be a positive number of milliseconds, got {budget_ms!r}")
            dense = model.dense_ms()
            if budget_ms > dense * (1 + 1e-9):
                raise ValueError(
                    f"budget_ms {budget_ms:.4g} exceeds the dense network's predicted latency {dense:.4g} ms: "
                    "choose a smaller budget"
                )
        if model is not None:
            blocks = {name for name, _ in dynamic_blocks(self)}
            foreign = sorted(n for n in model.parts[model.serve_batch] if n != REST and n not in blocks)
            if foreign:
                raise ValueError(
                    f"the latency model was profiled on another network: its parts {foreign[:3]} are not dynamic "
                    f"blocks of this {self.recipe} model; profile this one with dynnet.profile_latency"
                )
        self.latency_model = model
        self.budget_ms = None if budget_ms is None else float(budget_ms)
        return self

    @property
    def latency_budget(self) -> float | None:
        """``budget_ms`` as a fraction of the dense network's predicted latency (``None`` without ``budget_ms``)."""
        if self.budget_ms is None or self.latency_model is None:
            return None
        return self.budget_ms / self.latency_model.dense_ms()

    def _weight_dtype(self) -> torch.dtype | None:
        """The precision of the model's (first floating-point) parameter; ``None`` without parameters. The parameter
        is looked up once per module structure (:func:`~dynnet.core.cache.structure_generation`); its dtype is read
        on every call (``model.to(dtype)`` converts parameters in place)."""
        if tracing_or_compiling():  # nothing stored on the module while exporting or compiling
            return next((p.dtype for p in self.parameters() if p.is_floating_point()), None)
        cached = self.__dict__.get("_first_float_param")
        if cached is None or cached[0] != structure_generation():
            first = next((p for p in self.parameters() if p.is_floating_point()), None)
            cached = (structure_generation(), first)
            self.__dict__["_first_float_param"] = cached
        return None if cached[1] is None else cached[1].dtype

    def run(self, x: Tensor) -> Tensor:
        """The network itself; recipes with extra control flow (exits, policies) override this."""
        return self.net(x)

    def _each(self, x: Tensor) -> Tensor:
        """:meth:`run` on each sample of ``x`` in turn: logits Tensor[N, K]."""
        return torch.cat([self.run(x[i : i + 1]) for i in range(x.shape[0])])

    def _masked(self, x: Tensor) -> Tensor:
        """:meth:`run` in masked mode (the decisions as masks on the dense computation), sparse mode restored."""
        blocks = self._blocks()
        try:
            for block in blocks:
                block.mode = "masked"
            return self.run(x)
        finally:
            for block in blocks:
                block.mode = "sparse"

    def _blocks(self) -> list[nn.Module]:
        """The dynamic blocks, listed once per module structure (the engine checks their modes on every call)."""
        cached = self.__dict__.get("_dynamic_blocks")
        if cached is None or cached[0] != structure_generation():
            cached = (structure_generation(), [block for _, block in dynamic_blocks(self)])
            self.__dict__["_dynamic_blocks"] = cached
        return cached[1]

    def _engine(self, x: Tensor) -> str:
        """How this untraced call runs (:attr:`batch_engine`): ``"batched"``, ``"per_sample"`` or ``"masked"`` —
        another engine than ``"batched"`` only in sparse inference."""
        engine = self.batch_engine
        if engine not in ENGINES:
            raise ValueError(f"batch_engine must be one of {ENGINES}, got {engine!r}")
        if engine == "batched" or self.training or torch.is_grad_enabled() or tracing_or_compiling():
            return "batched"
        blocks = self._blocks()
        if not blocks or any(block.mode != "sparse" for block in blocks):
            return "batched"
        n = x.shape[0]
        if engine != "auto":
            return "batched" if engine == "per_sample" and n == 1 else engine
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)  # kernels differ
        key = ("engine", id(self), structure_generation(), version_key(self.calibration), tuple(x.shape), x.dtype,
               channels_last)  # fmt: skip
        candidates: dict[str, Callable[[], object]] = {"batched": lambda: self.run(x)}
        if n > 1:
            candidates["per_sample"] = lambda: self._each(x)
        candidates["masked"] = lambda: self._masked(x)
        return autotune.choose(key, candidates) or "batched"

    def dense_macs(self, x: Tensor) -> int:
        """Per-sample MACs of the original static network at the shape of ``x`` (Tensor[N, C, H, W])."""
        key = tuple(x.shape[1:])
        if key not in self._dense_cache:
            self._dense_cache[key] = probe_macs(self, lambda m, inp: m.run(inp), x)
        return self._dense_cache[key]

    def _record_static(self, t: Trace, x: Tensor, start: int) -> None:
        dense_total = self.dense_macs(x)
        dynamic_dense = sum(e.dense for e in t.entries[start:])
        static = dense_total - dynamic_dense
        if static < -0.5:
            raise RuntimeError(f"{self.recipe}: dynamic parts claim more dense MACs than the network has")
        t.record_macs("static", float(static), batch_size=x.shape[0], dense=static)
        t.dense_total = float(dense_total)

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        """The recipe's training objective. Default: cross-entropy + MAC-budget loss + auxiliary losses.

        Args:
            logits: Tensor[N, K].
            target: Tensor[N] class indices.
            t: the trace of the forward pass that produced ``logits``.
            budget: target fraction of dense MACs (of the dense predicted latency when the model has ``budget_ms``);
                defaults to the model's configured budget.
        """
        if budget is None:
            budget = self.budget if self.latency_budget is None else self.latency_budget
        task = F.cross_entropy(logits, target)
        parts = {"task": float(task.detach())}
        total = task
        if budget is not None:
            weight = getattr(self.config, "budget_weight", 1.0)
            b = t.budget_loss(budget)
            total = total + weight * b
            parts["budget"] = float(b.detach())
        if t.losses:
            aux = t.aux_loss()
            total = total + aux
            parts["aux"] = float(aux.detach())
        return LossOutput(total, parts)

    @property
    def calibrated_budget(self) -> float | None:
        """The budget of the last :func:`dynnet.calibrate` (``None``: never calibrated)."""
        value = float(self.calibration[1])
        return value if value > 0 else None

    def budget_knob(self) -> Knob | None:
        """The decision threshold that calibration moves (``None``: the recipe has none). Recipes override it."""
        return None

    def logit_shift_knob(
        self, entries: list[tuple[Tensor, int | None, float]], *, lo: float = -30.0, hi: float = 30.0
    ) -> Knob:
        """A knob that shifts the decision logits of gates by editing their final biases (see
        :class:`~dynnet.core.budget.LogitShift`); the applied shift is kept in ``calibration[0]``.

        Args:
            entries: ``(bias, index, sign)`` of every gate: ``bias[index] += sign * shift``.
            lo: smallest shift searched.
            hi: largest shift searched.
        """
        return LogitShift(self.calibration[0], entries).knob(lo=lo, hi=hi)

    def calibrate_to_(self, batches: list[Tensor], budget: float, tolerance: float) -> dict[str, float]:
        """Move the recipe's decision thresholds so that the mean MAC fraction on ``batches`` equals ``budget``.

        Called by :func:`dynnet.calibrate` in eval and sparse mode. The default searches :meth:`budget_knob` by
        bisection; recipes with their own calibration (early exits' geometric exit profile) override it.

        Args:
            batches: Tensor[N, C, H, W] images.
            budget: target mean MAC fraction.
            tolerance: how close the fraction on ``batches`` must come.

        Returns:
            The thresholds set, by name (``{"gate logit offset": 0.7}``).

        Raises:
            ValueError: the recipe has no knob, or the budget is outside the range it reaches on ``batches``.
        """
        knob = self.budget_knob()
        if knob is None:
            raise ValueError(
                f"recipe {self.recipe!r} has no decision threshold to calibrate: its budget is fixed at conversion; "
                f"convert again with budget={budget}"
            )
        value, _, _ = search_knob(self, knob, batches, budget, tolerance)
        with torch.no_grad():
            self.calibration[0] = value
        return {knob.name: value}

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """The dynamic blocks, with their names."""
        return list(dynamic_blocks(self))

    def load_base_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Load weights of the original network (keys as in the unconverted model); gates keep theirs.

        A recipe that builds its network around copies of the base (GFNet's glance and focus encoders, LSTS's fine
        network, a recurrent-attention trunk) holds the base's keys under a prefix: when the keys do not fit the
        converted network as they are, they are loaded into every submodule that holds all of them but the base's
        classifier (:func:`base_hosts`), each copy from the same weights.
        """
        missing, unexpected = self.net.load_state_dict(state_dict, strict=False)
        if unexpected:
            hosts = base_hosts(self.net, state_dict)
            if not hosts:
                raise KeyError(
                    f"keys not found in the converted network: {unexpected[:5]} (nor in any of its submodules: the "
                    "recipe's network does not contain the base; train it from scratch)"
                )
            for host in hosts.values():
                own = host.state_dict()
                host.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
            self.init_from_base_()
            return
        not_gate = [k for k in missing if not _is_dynamic_param(k)]
        if not_gate:
            raise KeyError(f"base weights missing from the state_dict: {not_gate[:5]}")
        self.init_from_base_()

    def decision_parameters(self) -> list[nn.Parameter]:
        """The parameters the conversion added (gates, policies, predictors, exit heads, experts: every parameter
        under a decision module or an added part, the ones :meth:`load_base_state_dict` does not load)."""
        return [p for name, p in self.named_parameters() if _is_dynamic_param(name)]

    def follow_budget_(self, budget: float) -> None:
        """Set the decision knob for the training budget of this step (in place); a no-op by default.

        ``fit`` calls it every step while the budget is annealed (``TrainConfig.budget_start``). Recipes whose
        budget acts through a loss term read the budget in :meth:`compute_loss` and need nothing here; recipes whose
        knob is fixed by the budget (FBS's k-WTA density) follow the schedule through it.
        """

    def init_from_base_(self) -> None:
        """Re-initialise the decision parameters from the base weights just loaded (in place); a no-op by default.

        :meth:`load_base_state_dict` calls it, so a recipe whose gates start from the trained network (FBS ranks its
        channels by their static importance) sees the trained weights, not the ones present at conversion.
        """


def _checks_trace(compute_loss: Callable[..., LossOutput]) -> Callable[..., LossOutput]:
    """``compute_loss`` that first checks that its trace argument ``t`` is a :class:`Trace` (one clear error instead
    of an ``AttributeError`` on ``None`` deep inside a recipe's objective)."""
    if getattr(compute_loss, "_checks_trace", False):
        return compute_loss

    @functools.wraps(compute_loss)
    def checked(self: DynamicModel, logits: Tensor, target: Tensor, *args: Any, **kwargs: Any) -> LossOutput:
        t = args[0] if args else kwargs.get("t")
        if not isinstance(t, Trace):
            raise TypeError(
                f"{type(self).__name__}.compute_loss needs the trace of the forward pass that made the logits, got "
                f"{type(t).__name__}: `with dynnet.trace() as t: logits = model(x)`, then "
                "`model.compute_loss(logits, target, t)`"
            )
        return compute_loss(self, logits, target, *args, **kwargs)

    checked._checks_trace = True  # type: ignore[attr-defined]
    return checked


DynamicModel.compute_loss = _checks_trace(DynamicModel.compute_loss)  # type: ignore[method-assign]


def base_hosts(net: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, nn.Module]:
    """The outermost proper submodules of ``net`` that hold a copy of the network ``state_dict`` belongs to: every
    key of it with its shape, but those of at most one module (the classifier a recipe replaces), by name."""
    owners = {k.rpartition(".")[0] for k in state_dict}
    hosts = {}
    for name, m in net.named_modules():
        if not name or not state_dict:
            continue
        own = m.state_dict()
        absent = {k.rpartition(".")[0] for k, v in state_dict.items() if k not in own or own[k].shape != v.shape}
        if len(absent) <= 1 and len(absent) < len(owners):
            hosts[name] = m
    return {n: m for n, m in hosts.items() if not any(n.startswith(f"{o}.") for o in hosts if o != n)}


def _is_dynamic_param(key: str) -> bool:
    parts = key.split(".")
    return any(p in _DYNAMIC_PARTS for p in parts)


# Names of the submodules that make decisions (docs/design.md, contract 5).
DECISION_MODULE_NAMES = frozenset({"gate", "gates", "policy", "controller", "router", "halting", "saliency"})
# Submodule names under which recipes add parameters the base network does not have.
_DYNAMIC_PARTS = DECISION_MODULE_NAMES | {"exits", "experts", "branches", "others", "alpha"}
