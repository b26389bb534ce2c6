"""`profile_latency`: measure a converted network's latency on this machine as a function of its decisions.

Each outermost dynamic block is timed by forward hooks while the model runs in sparse mode on images, without a trace
(as inference runs: compiled batch-1 plans are used only without one); one traced call of the same batch tells which MAC
entries each block records and so its MAC fraction for the batch (eval decisions are deterministic); the rest of the
network (stem, head, policy networks outside the blocks) is the whole call's time less the blocks'. The decisions are
spread over the recipe's range by calibrating it (``DynamicModel.calibrate_to_``) to a ladder of MAC fractions; the
weights and thresholds are restored afterwards. Each part's points (MAC fraction, ms per sample) become a
:class:`~dynnet.core.latency.LatencyTable`; the tables are fitted on all settings but every third one first, and the
prediction error of the per-sample latency is measured on the settings left out (decisions the tables never saw), then
fitted again on all of them.

Assumptions (docs/latency.md): a part's latency depends on its own MAC fraction only (not on which channels, positions
or samples are kept, nor on the parts before it, e.g. through caches); at a batch size above 1 a sample's share is the
batch's time divided by the batch, a function of the batch's mean fraction, so predictions are per-sample shares that
add up to the batch's latency where the cost is linear in the kept work.
"""

from __future__ import annotations

import copy
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dynnet.core import DynamicModel, dynamic_blocks, kept_modes, set_mode, trace
from dynnet.core.latency import REST, LatencyModel, LatencyTable, PartLatency, part_fractions

__all__ = ["DEFAULT_FRACTIONS", "cpu_model", "latency_model_path", "machine_key", "profile_latency"]

DEFAULT_FRACTIONS = (0.2, 0.35, 0.5, 0.65, 0.8, 0.95)
"""The MAC fractions the decisions are calibrated to while profiling (the model's own setting is profiled too)."""


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(threads: int) -> dict[str, Any]:
    """What a latency model is keyed by: CPU model, threads, torch version, architecture."""
    return {"cpu": cpu_model(), "threads": int(threads), "torch": torch.__version__, "arch": platform.machine()}


def latency_model_path(directory: str | Path, recipe: str, threads: int) -> Path:
    """Where a latency model of ``recipe`` on this machine lives in ``directory`` (one file per machine key)."""
    key = machine_key(threads)
    slug = "".join(c if c.isalnum() else "-" for c in f"{key['cpu']}-{threads}t-torch{key['torch']}").strip("-")
    return Path(directory) / f"{recipe}--{slug}.json"


def _images(n: int, shape: Sequence[int], seed: int) -> Tensor:
    """Tensor[n, *shape] noise images whose scale and offset differ per sample (so that gates decide differently)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=g)
    return x * torch.rand((n, 1, 1, 1), generator=g).mul(1.5).add(0.25) + torch.randn((n, 1, 1, 1), generator=g)


class _Timer:
    """Forward hooks that add each outermost block's time and MAC entry names to the current run's records."""

    def __init__(self, model: nn.Module, clock: Callable[[], float]) -> None:
        blocks = list(dynamic_blocks(model))
        names = [n for n, _ in blocks]
        self.blocks = [(n, b) for n, b in blocks if not any(n.startswith(f"{o}.") for o in names if o)]
        self.clock = clock
        self.entries: dict[str, set[str]] = {n: set() for n, _ in self.blocks}
        self.seconds: dict[str, float] = {}
        self._stack: list[tuple[float, int]] = []
        self.trace = None
        self.handles = []
        for name, block in self.blocks:
            self.handles.append(block.register_forward_pre_hook(self._pre))
            self.handles.append(block.register_forward_hook(lambda m, a, o, name=name: self._post(name)))

    def _pre(self, module: nn.Module, args: Any) -> None:
        self._stack.append((self.clock(), len(self.trace.entries) if self.trace is not None else 0))

    def _post(self, name: str) -> None:
        start, first = self._stack.pop()
        self.seconds[name] = self.seconds.get(name, 0.0) + self.clock() - start
        if self.trace is not None:
            self.entries[name].update(e.name for e in self.trace.entries[first:])

    def timed(self, model: nn.Module, x: Tensor) -> tuple[float, dict[str, float]]:
        """One timed call without a trace, as inference runs (compiled plans are used only without one): (total
        seconds, seconds by block)."""
        self.seconds = {}
        start = self.clock()
        model(x)
        total = self.clock() - start
        return total, dict(self.seconds)

    def fractions(self, model: nn.Module, x: Tensor) -> dict[str, Tensor]:
        """One untimed call in a trace: the blocks' MAC entries and each part's Tensor[N] MAC fraction."""
        with trace() as t:
            self.trace = t
            model(x)
        self.trace = None
        return part_fractions(t, self.entries) if t.entries else {}

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _settings(model: nn.Module, calib: list[Tensor], fractions: Sequence[float]) -> list[Callable[[], None]]:
    """Callables that each put the model's decisions at one operating point: as it is, then calibrated to each
    fraction it reaches (a recipe that cannot be calibrated keeps its own decisions only)."""
    from dynnet.core.recipe import RECIPES

    start = copy.deepcopy(model.state_dict())
    out: list[Callable[[], None]] = [lambda: model.load_state_dict(start)]
    calibrated = isinstance(model, DynamicModel) and (
        model.recipe not in RECIPES or RECIPES.get(model.recipe).budget.calibrated
    )
    if not calibrated:
        return out
    for f in fractions:

        def setting(f: float = f) -> None:
            model.load_state_dict(start)
            model.calibrate_to_(calib, f, 0.04)

        try:
            setting()
        except ValueError:  # a fraction this recipe does not reach on these images
            continue
        out.append(setting)
    model.load_state_dict(start)
    return out


def profile_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1,),
    threads: int | None = None,
    *,
    images: Tensor | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    samples: int = 32,
    repeats: int = 3,
    knots: int = 8,
    holdout_every: int = 3,
    clock: Callable[[], float] = time.perf_counter,
    save_to: str | Path | None = None,
) -> LatencyModel:
    """Measure ``model``'s per-block latency in dense and sparse mode as a function of its decisions on this machine.

    Args:
        model: a converted model (:class:`~dynnet.DynamicModel`); its modes, training flag, weights and thresholds are
            restored afterwards.
        input_shape: ``(C, H, W)`` of one image.
        batch_sizes: the batch sizes to profile (the smallest is the serving batch that predictions refer to).
        threads: CPU threads (default ``torch.get_num_threads()``); part of the machine key.
        images: Tensor[M, C, H, W] real images (decisions depend on them); default: noise images of varied contrast.
        fractions: the MAC fractions the decisions are calibrated to in turn (recipes that can be calibrated).
        samples: images per operating point (at a batch size B: ``max(1, samples // B)`` batches).
        repeats: each batch is timed this many times; the median per part is kept.
        knots: the most knots a part's table gets.
        holdout_every: every this-many-th operating point is held out of the first fit to measure the prediction
            error (with fewer than this many points: every this-many-th batch).
        clock: seconds, monotonic (tests pass a fake one).
        save_to: a JSON file or a directory (then :func:`latency_model_path`) to store the model in.

    Returns:
        The :class:`~dynnet.core.latency.LatencyModel`, with ``error[B]`` = ``{"median", "p90", "samples"}``: the
        relative error of the predicted per-sample latency on the held-out operating points, and ``point_median``
        (of ``points``): the same for each held-out operating point's mean latency over its images.
    """
    if not isinstance(model, DynamicModel):
        raise TypeError(f"profile_latency needs a converted model (dynnet.convert), got {type(model).__name__}")
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive integers, got {list(batch_sizes)}")
    if samples < 1 or repeats < 1 or holdout_every < 2:
        raise ValueError(
            f"need samples >= 1, repeats >= 1, holdout_every >= 2; got {samples}, {repeats}, {holdout_every}"
        )
    threads = int(threads or torch.get_num_threads())
    old_threads = torch.get_num_threads()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    n_max = max(samples, max(int(b) for b in batch_sizes) * max(1, samples // min(int(b) for b in batch_sizes)))
    pool = (images if images is not None else _images(n_max, input_shape, seed=0)).to(device)
    torch.set_num_threads(threads)
    timer = _Timer(model, clock)
    parts: dict[int, dict[str, PartLatency]] = {}
    error: dict[int, dict[str, float]] = {}
    with kept_modes(model):
        try:
            model.eval()
            set_mode(model, "sparse")
            settings = _settings(model, list(pool[: max(samples, 8)].split(64)), fractions)
            with torch.no_grad():
                for b in sorted({int(b) for b in batch_sizes}):
                    batches = [_take(pool, i * b, b) for i in range(max(1, samples // b))]
                    set_mode(model, "dense")
                    dense = [_time(timer, model, x, repeats) for x in batches]
                    set_mode(model, "sparse")
                    runs = []  # (setting index, batch index, run)
                    for s, setting in enumerate(settings):
                        setting()
                        runs += [(s, i, _time(timer, model, x, repeats)) for i, x in enumerate(batches)]
                    settings[0]()
                    parts[b], error[b] = _fit(timer, runs, dense, b, knots, holdout_every, len(settings))
        finally:
            timer.close()
            torch.set_num_threads(old_threads)
    lm = LatencyModel(machine_key(threads), model.recipe, tuple(int(d) for d in input_shape), parts, error)
    if save_to is not None:
        path = Path(save_to)
        lm.save(latency_model_path(path, model.recipe, threads) if path.suffix != ".json" else path)
    return lm


def _take(pool: Tensor, start: int, n: int) -> Tensor:
    idx = torch.arange(start, start + n) % pool.shape[0]
    return pool[idx]


_Run = tuple[float, dict[str, float], dict[str, float]]  # total ms per sample, ms per sample by part, fraction by part


def _time(timer: _Timer, model: nn.Module, x: Tensor, repeats: int) -> _Run:
    """Median over ``repeats`` untraced calls of the per-sample ms, by part, with the batch's mean fraction of each
    part (from one traced call first, which also warms the caches up)."""
    n = x.shape[0]
    fractions = timer.fractions(model, x)
    totals, per_part = [], {}
    for _ in range(repeats):
        total, seconds = timer.timed(model, x)
        totals.append(total)
        for name, s in seconds.items():
            per_part.setdefault(name, []).append(s)
    total_ms = 1e3 * _median(totals) / n
    ms = {name: 1e3 * _median(v) / n for name, v in per_part.items()}
    ms[REST] = max(0.0, total_ms - sum(ms.values()))
    return total_ms, ms, {name: float(f.mean()) for name, f in fractions.items()}


def _fit(
    timer: _Timer, runs: list[tuple[int, int, _Run]], dense: list[_Run], b: int, knots: int, every: int, n_settings: int
) -> tuple[dict[str, PartLatency], dict[str, float]]:
    """The tables of all runs, and the held-out error of tables fitted without every ``every``-th setting."""
    by_setting = n_settings >= every
    held = [r for r in runs if ((r[0] if by_setting else r[1]) % every) == every - 1]
    kept = [r for r in runs if r not in held] or runs
    tables = _tables([r[2] for r in kept], knots)
    errors, by_key = [], {}
    for s, i, (total, _, fractions) in held:
        predicted = sum(t(torch.tensor([fractions.get(name, 1.0)])).item() for name, t in tables.items())
        errors.append(abs(predicted - total) / total)
        pair = by_key.setdefault(s if by_setting else i, [0.0, 0.0])
        pair[0], pair[1] = pair[0] + predicted, pair[1] + total
    # the mean over each held-out operating point's images: the timing noise of single calls averages out
    point_errors = [abs(p - m) / m for p, m in by_key.values()]
    tables = _tables([r[2] for r in runs], knots)
    dense_ms = {name: _median([d[1].get(name, 0.0) for d in dense]) for name in tables}
    entries = {name: tuple(sorted(timer.entries.get(name, ()))) for name in tables}
    out = {name: PartLatency(entries[name], tables[name], dense_ms[name]) for name in tables}
    err = {}
    if errors:
        err = {
            "median": _median(errors), "p90": _quantile(errors, 0.9), "samples": len(errors),
            "point_median": _median(point_errors), "points": len(point_errors),
        }  # fmt: skip
    return out, err


def _tables(runs: Sequence[_Run], knots: int) -> dict[str, LatencyTable]:
    names = sorted({name for _, ms, _ in runs for name in ms})
    return {
        name: LatencyTable.fit(
            [fr.get(name, 1.0) for _, _, fr in runs], [ms.get(name, 0.0) for _, ms, _ in runs], knots=knots
        )
        for name in names
    }


def _median(values: Sequence[float]) -> float:
    return _quantile(values, 0.5)


def _quantile(values: Sequence[float], q: float) -> float:
    return float(torch.tensor(list(values), dtype=torch.float64).quantile(q))
