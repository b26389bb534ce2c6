"""A latency model of one machine: per-sample milliseconds predicted from a trace's decisions.

The model is additive. A converted network is cut into *parts*: each outermost dynamic block (its own decisions, its
gates and body) and the *rest* (stem, head, policy networks and every MAC entry recorded outside a block). A part's
per-sample latency is a function of one number, its theoretical MAC fraction ``x = Σ macs / Σ maximum`` over the
trace entries it records (0: everything skipped, 1: everything run). That function is a lookup table
(:class:`LatencyTable`) measured in sparse mode on the machine that will serve the model and interpolated linearly
between its knots. A sample's predicted latency is the sum of its parts' values, and it is differentiable in the
straight-through MACs, so a budget loss can target milliseconds.

The tables are measured by :func:`dynnet.bench.latency_model.profile_latency` (``dynnet.profile_latency``); this
module only predicts, and reads and writes the JSON the profile is stored as (no pickle).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from dynnet.core.trace import Trace

__all__ = ["REST", "LatencyModel", "LatencyTable", "PartLatency", "part_fractions"]

REST = "rest"
"""The name of the part that holds every MAC entry recorded outside a dynamic block (stem, head, policies)."""

FORMAT = 1


@dataclass(frozen=True)
class LatencyTable:
    """Per-sample latency (ms) of one part as a piecewise-linear function of its MAC fraction.

    Attributes:
        x: knots, strictly increasing MAC fractions.
        ms: the latency at each knot (median of the measurements nearest to it), milliseconds per sample.

    Outside ``[x[0], x[-1]]`` the table is constant (the nearest knot's value): a fraction never measured is not
    extrapolated.
    """

    x: tuple[float, ...]
    ms: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.x or len(self.x) != len(self.ms):
            raise ValueError(
                f"a latency table needs as many knots as values (>= 1), got {len(self.x)} / {len(self.ms)}"
            )
        if any(b <= a for a, b in zip(self.x, self.x[1:], strict=False)):
            raise ValueError(f"latency table knots must increase strictly, got {self.x}")
        if not all(math.isfinite(v) for v in (*self.x, *self.ms)):
            raise ValueError("latency table knots and values must be finite")

    @classmethod
    def fit(cls, x: Sequence[float], ms: Sequence[float], *, knots: int = 8) -> LatencyTable:
        """The table of measured points: at most ``knots`` knots, each the median fraction and median latency of a
        run of points with neighbouring fractions (equal fractions always share a knot).

        Args:
            x: MAC fraction of each measurement.
            ms: its latency (ms per sample).
            knots: the most knots the table gets.
        """
        if len(x) != len(ms) or not len(x):
            raise ValueError(f"need as many fractions as latencies (>= 1), got {len(x)} / {len(ms)}")
        if knots < 1:
            raise ValueError(f"knots must be >= 1, got {knots}")
        pairs = sorted(zip((float(v) for v in x), (float(v) for v in ms), strict=True))
        groups: list[list[tuple[float, float]]] = []  # runs of equal fractions
        for p in pairs:
            if groups and abs(groups[-1][0][0] - p[0]) <= 1e-9:
                groups[-1].append(p)
            else:
                groups.append([p])
        size = len(pairs) / knots  # close a bin once it holds its share of the points
        bins: list[list[tuple[float, float]]] = [[]]
        for g in groups:
            if bins[-1] and len(bins[-1]) + len(g) / 2 > size and len(bins) < knots:
                bins.append([])
            bins[-1].extend(g)
        kx, kms = [], []
        for b in bins:
            bx, bms = _median([p[0] for p in b]), _median([p[1] for p in b])
            if kx and bx <= kx[-1]:  # medians of neighbouring bins can meet: merge them
                kms[-1] = 0.5 * (kms[-1] + bms)
                continue
            kx.append(bx)
            kms.append(bms)
        return cls(tuple(kx), tuple(kms))

    def __call__(self, x: Tensor) -> Tensor:
        """Tensor[N] MAC fractions → Tensor[N] predicted ms (float64; differentiable in ``x`` between knots)."""
        x = x.double()
        xp = torch.tensor(self.x, dtype=torch.float64, device=x.device)
        fp = torch.tensor(self.ms, dtype=torch.float64, device=x.device)
        if len(self.x) == 1:
            return fp[0] + 0.0 * x
        xc = torch.minimum(torch.maximum(x, xp[0]), xp[-1])
        i = torch.searchsorted(xp, xc.detach()).clamp(1, len(self.x) - 1)
        x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
        return f0 + (f1 - f0) * (xc - x0) / (x1 - x0)

    def as_dict(self) -> dict[str, list[float]]:
        return {"x": list(self.x), "ms": list(self.ms)}


@dataclass(frozen=True)
class PartLatency:
    """One part of the network in the latency model.

    Attributes:
        entries: the names of the trace MAC entries the part records (``"layer1.0/body"``, ``"layer1.0/gate"``).
        table: its per-sample latency as a function of its MAC fraction, sparse mode.
        dense_ms: its per-sample latency in dense mode (the static base network).
    """

    entries: tuple[str, ...]
    table: LatencyTable
    dense_ms: float

    def as_dict(self) -> dict[str, Any]:
        return {"entries": list(self.entries), "table": self.table.as_dict(), "dense_ms": self.dense_ms}


@dataclass
class LatencyModel:
    """Per-sample latency of a converted network on one machine, predicted from its decisions.

    Attributes:
        machine: what was measured on (CPU model, threads, torch version, ...): the key a stored model is found by.
        recipe: the recipe of the profiled model.
        input_shape: ``(C, H, W)`` of the profiled images.
        parts: for each profiled batch size, the parts by name (block names and :data:`REST`).
        error: held-out prediction error of the profile by batch size (``median``, ``p90``: relative errors of the
            per-sample latency; ``samples``; ``point_median``: of each held-out operating point's mean latency).
    """

    machine: dict[str, Any]
    recipe: str
    input_shape: tuple[int, ...]
    parts: dict[int, dict[str, PartLatency]]
    error: dict[int, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError("a latency model needs the parts of at least one batch size")

    @property
    def batch_sizes(self) -> list[int]:
        return sorted(self.parts)

    @property
    def serve_batch(self) -> int:
        """The batch size predictions refer to by default: the smallest one profiled (the serving batch)."""
        return self.batch_sizes[0]

    def dense_ms(self, batch_size: int | None = None) -> float:
        """Predicted per-sample latency of the dense (static) network, ms."""
        return sum(p.dense_ms for p in self._parts(batch_size).values())

    def predict(self, t: Trace, batch_size: int | None = None) -> Tensor:
        """Tensor[N] float64 per-sample latency (ms) predicted from the MACs recorded in ``t``.

        Args:
            t: the trace of a forward pass of the profiled model (any mode: theoretical MACs are read).
            batch_size: which profiled batch size's tables to use (default :attr:`serve_batch`; another batch size
                takes the nearest profiled one).
        """
        parts = self._parts(batch_size)
        fractions = part_fractions(t, {name: p.entries for name, p in parts.items()})
        total = None
        for name, p in parts.items():
            ms = p.table(fractions[name])
            total = ms if total is None else total + ms
        assert total is not None
        return total

    def _parts(self, batch_size: int | None) -> dict[str, PartLatency]:
        b = self.serve_batch if batch_size is None else min(self.parts, key=lambda k: (abs(k - batch_size), k))
        return self.parts[b]

    # -- JSON ----------------------------------------------------------------------------------------
    def as_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "machine": self.machine,
            "recipe": self.recipe,
            "input_shape": list(self.input_shape),
            "batch_sizes": {
                str(b): {name: p.as_dict() for name, p in parts.items()} for b, parts in sorted(self.parts.items())
            },
            "error": {str(b): e for b, e in sorted(self.error.items())},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyModel:
        if data.get("format") != FORMAT:
            raise ValueError(f"unknown latency model format {data.get('format')!r} (this dynnet reads {FORMAT})")
        parts = {
            int(b): {
                name: PartLatency(
                    tuple(p["entries"]), LatencyTable(tuple(p["table"]["x"]), tuple(p["table"]["ms"])), p["dense_ms"]
                )
                for name, p in bparts.items()
            }
            for b, bparts in data["batch_sizes"].items()
        }
        error = {int(b): dict(e) for b, e in data.get("error", {}).items()}
        return cls(dict(data["machine"]), data["recipe"], tuple(data["input_shape"]), parts, error)

    def save(self, path: str | Path) -> Path:
        """Write the model as JSON to ``path``; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> LatencyModel:
        """Read a model written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def part_fractions(t: Trace, parts: Mapping[str, Sequence[str]]) -> dict[str, Tensor]:
    """Each part's per-sample theoretical MAC fraction in ``t``: ``Σ macs / Σ maximum`` over its entries.

    Args:
        t: a trace.
        parts: entry names by part; the entries of no part go to :data:`REST` (which may also be listed, empty).

    Returns:
        Tensor[N] float64 by part name (a part without MACs, or whose maximum is 0, gets 1: it always runs).
    """
    owner = {e: name for name, entries in parts.items() for e in entries}
    macs: dict[str, Tensor] = {}
    peak: dict[str, float] = {}
    n = t.entries[0].macs.shape[0] if t.entries else 0
    for e in t.entries:
        name = owner.get(e.name, REST)
        macs[name] = macs[name] + e.macs if name in macs else e.macs
        peak[name] = peak.get(name, 0.0) + e.maximum
    out = {}
    for name in {*parts, REST}:
        if name in macs and peak[name] > 0:
            out[name] = macs[name] / peak[name]
        else:
            out[name] = torch.ones(n, dtype=torch.float64)
    return out


def _median(values: Sequence[float]) -> float:
    s = sorted(values)
    m = len(s) // 2
    return s[m] if len(s) % 2 else 0.5 * (s[m - 1] + s[m])
