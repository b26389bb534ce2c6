"""The scoped trace context: decisions, auxiliary losses and per-sample MACs of one forward pass.

A converted model keeps ``forward(x) -> logits``; everything else a forward pass produces is recorded
into the innermost active :class:`Trace`, found through a :mod:`contextvars` variable (so it is safe with
threads and never stored on modules)::

    with dynnet.trace() as t:
        logits = model(x)
    loss = ce(logits, y) + t.budget_loss(target=0.5)
    t.macs()   # Tensor[N]
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor

from dynnet.core.decision import Decision
from dynnet.core.latency import LatencyModel
from dynnet.losses.budget import mac_budget_loss

__all__ = ["MacEntry", "Trace", "current_trace", "trace"]

_CURRENT: ContextVar[Trace | None] = ContextVar("dynnet_trace", default=None)


@dataclass(frozen=True)
class MacEntry:
    """MACs of one part of the network for each sample of a batch.

    Attributes:
        name: the part (``"static"``, ``"layer1.0/gate"``, ``"layer1.0/body"``, ...).
        macs: Tensor[N] (float64, exact up to 2^53) theoretical MACs implied by the decisions. In training
            it is built from the straight-through decisions, so it carries the gradient of the expected cost.
        executed: Tensor[N] MACs the kernels really performed for each sample (masked mode computes
            dense work, sparse mode only what it needs plus overheads such as gathers or halos).
        minimum: the smallest per-sample value this part can take (all gates closed).
        maximum: the largest per-sample value this part can take (all gates open).
        dense: what this part costs per sample in the original, static network (0 for gates).
    """

    name: str
    macs: Tensor
    executed: Tensor
    minimum: float
    maximum: float
    dense: float


class Trace:
    """Records of one (or several) forward passes; create it with :func:`trace`."""

    def __init__(self) -> None:
        self.decisions: dict[str, Decision] = {}
        self.losses: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}
        self.entries: list[MacEntry] = []
        self.dense_total: float | None = None
        # Set by a DynamicModel that has a latency model (configuration, not per-batch data): what t.latency() uses,
        # and whether budget_loss targets a latency fraction (a model given budget_ms) instead of a MAC fraction.
        self.latency_model: LatencyModel | None = None
        self.latency_budget: bool = False

    # -- recording (called by dynamic blocks) ---------------------------------------------------
    @staticmethod
    def _unique(store: dict, name: str) -> str:
        if name not in store:
            return name
        k = 1
        while f"{name}#{k}" in store:
            k += 1
        return f"{name}#{k}"

    def record_decision(self, name: str, decision: Decision) -> str:
        """Store a decision; a name seen before (a block run twice) gets a ``#k`` suffix. Returns the key."""
        key = self._unique(self.decisions, name)
        self.decisions[key] = decision
        return key

    def add_loss(self, name: str, value: Tensor) -> None:
        """Add an auxiliary loss term (scalar); terms with the same name are summed."""
        if value.dim() != 0:
            raise ValueError(f"auxiliary loss {name!r} must be a scalar, got shape {tuple(value.shape)}")
        self.losses[name] = self.losses[name] + value if name in self.losses else value

    def record_output(self, name: str, value: Tensor) -> str:
        """Store an extra output (e.g. the logits of an early exit). Returns the key."""
        key = self._unique(self.outputs, name)
        self.outputs[key] = value
        return key

    def record_macs(
        self,
        name: str,
        macs: Tensor | float,
        *,
        batch_size: int | None = None,
        executed: Tensor | float | None = None,
        minimum: float | None = None,
        maximum: float | None = None,
        dense: float = 0.0,
    ) -> None:
        """Record the per-sample MACs of one part.

        Args:
            name: part name.
            macs: Tensor[N] (or a float for every sample) theoretical MACs.
            batch_size: N, needed when ``macs`` is a float.
            executed: Tensor[N] or float; defaults to ``macs`` (detached).
            minimum: per-sample lower bound of this part; defaults to ``min(macs)``.
            maximum: per-sample upper bound; defaults to ``max(macs)``.
            dense: cost of this part per sample in the static network.
        """
        macs_t = _as_per_sample(macs, batch_size)
        n = macs_t.shape[0]
        exec_t = macs_t.detach() if executed is None else _as_per_sample(executed, n, macs_t.device).detach()
        lo = float(macs_t.detach().min()) if minimum is None else float(minimum)
        hi = float(macs_t.detach().max()) if maximum is None else float(maximum)
        self.entries.append(MacEntry(name, macs_t, exec_t, lo, hi, float(dense)))

    # -- reading ----------------------------------------------------------------------------------
    def _sum(self, field: str) -> Tensor:
        if not self.entries:
            raise RuntimeError(
                "no MACs were recorded: run a dynnet model (created by convert/create_model) inside trace()"
            )
        total = getattr(self.entries[0], field)
        for e in self.entries[1:]:
            total = total + getattr(e, field)
        return total

    def macs(self) -> Tensor:
        """Tensor[N]: theoretical per-sample MACs of the whole network (gates included)."""
        return self._sum("macs")

    def executed_macs(self) -> Tensor:
        """Tensor[N]: MACs the kernels really performed for each sample."""
        return self._sum("executed")

    def min_macs(self) -> float:
        """Per-sample MACs with every gate closed (gates and static parts still run)."""
        return sum(e.minimum for e in self.entries)

    def max_macs(self) -> float:
        """Per-sample MACs with every gate open (gates included)."""
        return sum(e.maximum for e in self.entries)

    def dense_macs(self) -> float:
        """Per-sample MACs of the original static network."""
        if self.dense_total is not None:
            return self.dense_total
        return sum(e.dense for e in self.entries)

    def mac_fraction(self) -> Tensor:
        """Tensor[N]: theoretical MACs as a fraction of the static network's."""
        return self.macs() / self.dense_macs()

    def budget_loss(self, target: float) -> Tensor:
        """Global budget loss ``(mean_n cost_n / dense cost - target)^2`` (differentiable in training).

        The cost is the MACs, or the predicted latency when the model was given a latency budget (``budget_ms``:
        ``target`` is then a fraction of the dense network's predicted latency, see :meth:`latency_budget_loss`).
        """
        if self.latency_budget:
            return self.latency_budget_loss(target)
        _check_budget(target)
        return mac_budget_loss(self.macs(), self.dense_macs(), target)

    # -- latency (a LatencyModel of the serving machine) ---------------------------------------------
    def _latency_model(self, model: LatencyModel | None) -> LatencyModel:
        lm = model if model is not None else self.latency_model
        if lm is None:
            raise RuntimeError(
                "this trace has no latency model: profile one with dynnet.profile_latency(model, input_shape) and "
                "attach it with model.set_latency_model_(lm), or pass it to t.latency(lm)"
            )
        return lm

    def latency(self, model: LatencyModel | None = None, *, batch_size: int | None = None) -> Tensor:
        """Tensor[N] float64: each sample's latency in ms predicted from its decisions (differentiable in training).

        Args:
            model: the latency model (default: the one of the model that ran, ``DynamicModel.latency_model``).
            batch_size: the profiled batch size whose tables to use (default: the serving batch, the smallest).
        """
        return self._latency_model(model).predict(self, batch_size)

    def dense_latency(self, model: LatencyModel | None = None, *, batch_size: int | None = None) -> float:
        """Predicted per-sample latency (ms) of the dense (static) network."""
        return self._latency_model(model).dense_ms(batch_size)

    def latency_fraction(self, model: LatencyModel | None = None) -> Tensor:
        """Tensor[N]: predicted latency as a fraction of the dense network's predicted latency."""
        return self.latency(model) / self.dense_latency(model)

    def latency_budget_loss(self, target: float, model: LatencyModel | None = None) -> Tensor:
        """Latency-budget loss ``(mean_n latency_n / dense latency - target)^2``, latencies predicted.

        Args:
            target: a fraction of the dense network's predicted latency, in (0, 1] (``budget_ms / dense_ms``).
            model: the latency model (default: the trace's).
        """
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < float(target) <= 1.0:
            raise ValueError(f"a latency budget must be a fraction in (0, 1] of the dense latency, got {target!r}")
        return mac_budget_loss(self.latency(model), self.dense_latency(model), target)

    def aux_loss(self) -> Tensor:
        """Sum of the auxiliary losses the blocks added (0 when there are none)."""
        if not self.losses:
            return torch.zeros(())
        return torch.stack([v.reshape(()) for v in self.losses.values()]).sum()

    def decisions_of(self, granularity: str) -> dict[str, Decision]:
        """The recorded decisions of one granularity, in execution order."""
        return {k: d for k, d in self.decisions.items() if d.granularity == granularity}


def _as_per_sample(value: Tensor | float, n: int | None, device: torch.device | None = None) -> Tensor:
    if isinstance(value, Tensor):
        if value.dim() != 1:
            raise ValueError(f"per-sample MACs must be Tensor[N], got shape {tuple(value.shape)}")
        return value.double()
    if n is None:
        raise ValueError("batch_size is required when MACs are given as a number")
    return torch.full((n,), float(value), dtype=torch.float64, device=device)


def _check_budget(target: float) -> None:
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < float(target) <= 1.0:
        raise ValueError(f"budget must be a fraction in (0, 1] of the dense model's MACs, got {target!r}")


def current_trace() -> Trace | None:
    """The innermost active :class:`Trace`, or ``None`` outside ``dynnet.trace()``."""
    return _CURRENT.get()


@contextmanager
def trace() -> Iterator[Trace]:
    """Open a scope whose forward passes record into a fresh :class:`Trace`."""
    t = Trace()
    token = _CURRENT.set(t)
    try:
        yield t
    finally:
        _CURRENT.reset(token)


@contextmanager
def no_trace() -> Iterator[None]:
    """Run code (e.g. cost probes) without recording into the active trace."""
    token = _CURRENT.set(None)
    try:
        yield
    finally:
        _CURRENT.reset(token)
