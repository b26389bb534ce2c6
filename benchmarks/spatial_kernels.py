"""Realized speedup of the spatial kernels: latency of sparse vs dense execution against the MAC ratio.

For each kernel (a single 3×3 convolution with the pixel gather–GEMM path; a ResNet BasicBlock branch with
the pixel path (DynConv/SACT) and with the tile path (SBNet)), at output-mask densities 0.1 / 0.25 / 0.5 and
batch 1 and 16, we time the dense computation and the sparse one, interleaved (see :func:`paired_latency`),
and report

* ``mac_speedup`` = dense MACs / executed MACs (halos of the dilated mask and of the tiles included),
* ``ideal_speedup`` = 1 / density (what the mask alone promises),
* ``ratio_exec`` = latency speedup ÷ mac_speedup and ``ratio_ideal`` = latency speedup ÷ ideal_speedup,

from median times. Each computation (dense and sparse) is timed on NCHW and on channels-last input and keeps its
faster layout (recorded as ``dense_layout`` / ``sparse_layout``), as :func:`dynnet.bench.profile_model` does;
``native`` records whether the compiled gather (:mod:`dynnet.kernels.native`) ran.

Two clocks: ``wall`` (``torch.utils.benchmark.Timer.blocked_autorange`` medians, for each ``--threads`` value)
and ``cpu`` (the CPU time of the calling thread with one intra-op thread: it does not count the time the thread
waited for a core, so it is the measure least disturbed by other jobs on a shared machine). Every row records
the 1-minute load average at the time it was measured.

Masks are spatially clustered ("blobs": a random 7×7 field upsampled and thresholded at the density's
quantile), as learned masks are; uniformly random masks are also timed for the single convolution, where no
dilation is involved. Usage::

    python benchmarks/spatial_kernels.py --clock cpu                  # → kernels_cpu.{json,png}
    python benchmarks/spatial_kernels.py --clock wall --threads 1 2   # → kernels_wall.{json,png}
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark

from dynnet.bench import machine_info, steady_malloc
from dynnet.blocks import spatial_chain
from dynnet.kernels import native
from dynnet.kernels.block import reduce_to_tiles, scatter_tiles, tiles_to_pixels
from dynnet.kernels.chain import chain_sizes, run_pixels, run_tiles, stage_masks
from dynnet.kernels.spatial import gather_conv2d, scatter_add_rows
from dynnet.models.cifar_resnet import BasicBlock


def blob_mask(n: int, h: int, w: int, density: float, g: torch.Generator) -> torch.Tensor:
    """Tensor[n, h, w] bool, spatially clustered, with exactly ``round(density·h·w)`` active positions per sample."""
    field = F.interpolate(torch.randn(n, 1, 7, 7, generator=g), size=(h, w), mode="bilinear", align_corners=False)
    flat = field.flatten(1)
    k = max(1, round(density * h * w))
    idx = flat.topk(k, dim=1).indices
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True).view(n, h, w)


def random_mask(n: int, h: int, w: int, density: float, g: torch.Generator) -> torch.Tensor:
    k = max(1, round(density * h * w))
    idx = torch.rand(n, h * w, generator=g).topk(k, dim=1).indices
    return torch.zeros(n, h * w, dtype=torch.bool).scatter_(1, idx, True).view(n, h, w)


def paired_latency(
    fns: dict[str, Callable[[], object]], rounds: int, clock: Callable[[], float] | None = time.perf_counter
) -> dict[str, tuple[float, float]]:
    """Interleaved timing: every round times each function once (in a fresh random order).

    Returns ``{name: (min_ms, median_ms)}`` over the rounds. Interleaving exposes dense and sparse runs to the
    same load. With ``clock=None`` each round's time is a ``Timer.blocked_autorange`` median (wall clock);
    otherwise a single call timed with ``clock`` (``time.thread_time`` with one intra-op thread: the CPU time
    of the calling thread, which does not count the time the thread waited for a core).
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for fn in fns.values():  # warm-up
        fn()
    for r in range(rounds):
        random.Random(r).shuffle(names)
        for k in names:
            if clock is None:
                # Timer runs its statement on ONE thread unless told otherwise: pass the current setting.
                timer = benchmark.Timer("fn()", globals={"fn": fns[k]}, num_threads=torch.get_num_threads())
                t = timer.blocked_autorange(min_run_time=0.05).median
                times[k].append(t * 1e3)
            else:
                t0 = clock()
                fns[k]()
                times[k].append((clock() - t0) * 1e3)
    return {k: (min(v), statistics.median(v)) for k, v in times.items()}


def bench(
    channels: int,
    size: int,
    batches: list[int],
    densities: list[float],
    tile: int,
    rounds: int,
    clock: Callable[[], float] | None = None,
) -> list:
    g = torch.Generator().manual_seed(0)
    block = BasicBlock(channels, channels).eval()
    stages = spatial_chain(block)
    conv = block.conv1
    per_conv = conv.weight.numel() * size * size
    rows = []
    for n in batches:
        x_nchw = torch.randn(n, channels, size, size, generator=g)
        inputs = {"contiguous": x_nchw, "channels_last": x_nchw.contiguous(memory_format=torch.channels_last)}
        for density in densities:
            fns: dict[str, Callable[[], object]] = {}
            executed: dict[str, float] = {}
            masks_of = {}
            for pattern, make in (("random", random_mask), ("blob", blob_mask)):
                masks_of[pattern] = make(n, size, size, density, g)
                executed[f"conv_{pattern}"] = float(masks_of[pattern].sum()) * conv.weight.numel() / n
            mask = masks_of["blob"]
            masks = stage_masks(stages, mask, chain_sizes(stages, (size, size))[1:])
            executed["block_pixel"] = (
                sum(float(m.sum()) * s.per_position for s, m in zip(stages, masks, strict=True)) / n
            )
            tmask = reduce_to_tiles(mask, tile)
            tiles = tmask.nonzero()
            _, ex = run_tiles(stages, x_nchw, tiles, tile)
            executed["block_tile"] = float(ex.sum()) / n
            # Every computation is timed on NCHW and on channels-last input; each keeps its faster layout.
            for layout, x in inputs.items():
                fns[f"dense_conv@{layout}"] = lambda x=x: F.conv2d(x, conv.weight, None, 1, 1)
                fns[f"dense_block@{layout}"] = lambda x=x: (
                    block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x))))) + x
                )
                for pattern, m in masks_of.items():
                    fns[f"conv_{pattern}@{layout}"] = lambda m=m, x=x: gather_conv2d(x, conv.weight, m, padding=1)

                def block_pixels(ms=masks, x=x):
                    r, pos, _ = run_pixels(stages, x, ms)
                    return scatter_add_rows(x, r, pos)

                def block_tiles(t=tiles, x=x):
                    v, _ = run_tiles(stages, x, t, tile)
                    return scatter_tiles(x, v, t, tile)

                fns[f"block_pixel@{layout}"] = block_pixels
                fns[f"block_tile@{layout}"] = block_tiles
            timed = paired_latency(fns, rounds, clock)
            lat, layouts = {}, {}
            for key in {k.split("@")[0] for k in timed}:
                best = min(inputs, key=lambda lay, key=key: timed[f"{key}@{lay}"][1])
                lat[key], layouts[key] = timed[f"{key}@{best}"], best
            load = os.getloadavg()[0]
            tile_density = float(tiles_to_pixels(tmask, tile, (size, size)).float().mean())
            for key, kernel, pattern, dense_key, dense_macs in (
                ("conv_random", "conv3x3_pixel", "random", "dense_conv", per_conv),
                ("conv_blob", "conv3x3_pixel", "blob", "dense_conv", per_conv),
                ("block_pixel", "basicblock_pixel", "blob", "dense_block", 2 * per_conv),
                ("block_tile", f"basicblock_tile{tile}", "blob", "dense_block", 2 * per_conv),
            ):
                row = _row(
                    kernel, pattern, n, density, channels, size, lat[dense_key], lat[key], dense_macs, executed[key]
                )
                row["threads"] = torch.get_num_threads()
                row["load_1m"] = load
                row["dense_layout"], row["sparse_layout"] = layouts[dense_key], layouts[key]
                row["native"] = native.status()
                if key == "block_tile":
                    row["tile_density"] = tile_density
                rows.append(row)
                print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return rows


def _row(kernel, pattern, n, density, channels, size, dense, sparse, dense_macs, executed_macs) -> dict:
    (dense_min, dense_ms), (sparse_min, sparse_ms) = dense, sparse
    speed = dense_ms / sparse_ms
    mac_speedup = dense_macs / max(executed_macs, 1.0)
    return {
        "kernel": kernel, "mask": pattern, "batch": n, "density": density, "channels": channels, "size": size,
        "dense_ms": dense_ms, "sparse_ms": sparse_ms, "dense_min_ms": dense_min, "sparse_min_ms": sparse_min,
        "latency_speedup": speed, "executed_mac_fraction": executed_macs / dense_macs, "mac_speedup": mac_speedup,
        "ideal_speedup": 1.0 / density, "ratio_exec": speed / mac_speedup, "ratio_ideal": speed * density,
    }  # fmt: skip


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["threads"], r["batch"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (threads, n) in zip(axes[0], panels, strict=True):
        for kernel, pattern in sorted({(r["kernel"], r["mask"]) for r in rows}):
            sel = [
                r
                for r in rows
                if r["batch"] == n and r["threads"] == threads and r["kernel"] == kernel and r["mask"] == pattern
            ]
            ax.plot([r["density"] for r in sel], [r["ratio_exec"] for r in sel], "o-", label=f"{kernel} ({pattern})")
        ax.axhline(0.8, color="gray", ls="--", lw=0.8)
        title = f"batch {n}, {threads} thread{'s' if threads > 1 else ''}"
        ax.set(xlabel="output mask density", ylabel="latency speedup / MAC speedup", title=title, ylim=(0, 1.5))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    steady_malloc()  # before anything is timed: no page faults from glibc returning memory between calls
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/spatial")
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--tile", type=int, default=8)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=None, help="default: 7 (wall), 40 (cpu)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: Timer.blocked_autorange medians for each --threads; cpu: CPU time of the thread (1 thread)",
    )
    args = parser.parse_args()
    if args.clock == "cpu":
        args.threads = [1]
    rounds = args.rounds or (40 if args.clock == "cpu" else 7)
    clock = time.thread_time if args.clock == "cpu" else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    before = machine_info()
    rows = []
    with torch.no_grad():
        for threads in args.threads:
            torch.set_num_threads(threads)
            rows += bench(args.channels, args.size, [1, 16], [0.1, 0.25, 0.5], args.tile, rounds, clock)
    result = {"machine": before, "machine_after": machine_info(), "args": vars(args), "rows": rows}
    (out / f"kernels_{args.clock}.json").write_text(json.dumps(result, indent=1))
    plot(rows, out / f"kernels_{args.clock}.png")


if __name__ == "__main__":
    main()
