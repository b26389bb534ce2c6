"""The exit cascade: a base network's units with early exits between them (the family's dynamic block).

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
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dynnet.core import Decision, DynamicBlock, Trace, current_trace, run_on_meta
from dynnet.methods.early_exit._common import NEVER, State, count_per_sample, max_softmax_confidence, select
from dynnet.methods.early_exit._trunk import Trunk, trunk_of

__all__ = ["ExitCascade"]


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
                    h, seg = count_per_sample(lambda k=k, s=h: m.segment(k, s))
                    (logits, carry), head = count_per_sample(lambda k=k, s=h, c=carry: m.head(k, s, c))
                    gate = 0
                    if k < m.num_exits - 1:
                        _, gate = count_per_sample(lambda k=k, s=h, lg=logits: m.exit_score(k, s, lg))
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
