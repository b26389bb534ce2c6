"""Batch-1 channel-sliced convolution pairs: PyTorch's convolutions on pre-sliced weights vs the compiled kernel.

For the three ResNet-20 stage shapes (16 channels at 28×28, 32 at 14×14, 64 at 7×7), a pair of 3×3 convolutions
``conv2(relu(conv1(x; W1[S])); W2[:, S])`` with ``|S|`` = all, ½ and ¼ of the inner channels is timed

* ``torch``: ``F.conv2d`` on weights sliced beforehand (no slicing cost: the best PyTorch can do per call);
* ``native``: ``torch.ops.dynnet.sliced_pair3x3`` (:mod:`dynnet.kernels.native`), which reads the kept channels
  from the scale vector itself,

with ``torch.utils.benchmark.Timer.blocked_autorange`` medians at ``--threads`` threads. Each row gives the
ratio of the ideal speedup each engine realizes against its own all-channel time
(``(t_all / t_k) / (C / k)``). Usage::

    python benchmarks/channel_kernels.py [--threads 2] [--out benchmarks/results/channel]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from dynnet.bench import machine_info
from dynnet.kernels import native

SHAPES = ((16, 28), (32, 14), (64, 7))


def median_us(stmt: str, env: dict, threads: int) -> float:
    timer = Timer(stmt, globals=env, num_threads=threads)
    return timer.blocked_autorange(min_run_time=0.5).median * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/channel"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if native.load() is None:
        raise SystemExit(f"the compiled kernels are needed for this benchmark: {native.status()}")
    op = torch.ops.dynnet.sliced_pair3x3
    g = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        for c, size in SHAPES:
            x = torch.randn(1, c, size, size, generator=g)
            w1, b1 = torch.randn(c, c, 3, 3, generator=g) * 0.1, torch.randn(c, generator=g)
            w2, b2 = torch.randn(c, c, 3, 3, generator=g) * 0.1, torch.randn(c, generator=g)
            times = {}
            for k in (c, c // 2, c // 4):
                keep = torch.randperm(c, generator=g)[:k].sort().values
                scale = torch.zeros(c)
                scale[keep] = 1.0
                env = {
                    "F": F, "op": op, "x": x, "w1": w1, "b1": b1, "w2": w2, "b2": b2, "scale": scale,
                    "s1": w1[keep].contiguous(), "sb1": b1[keep].contiguous(), "s2": w2[:, keep].contiguous(),
                }  # fmt: skip
                times[k] = {
                    "torch": median_us("F.conv2d(F.relu(F.conv2d(x, s1, sb1, 1, 1)), s2, b2, 1, 1)", env, args.threads),
                    "native": median_us("op(x, w1, b1, w2, b2, scale, True, 1)", env, args.threads),
                }
            for k, t in times.items():
                row = {"channels": c, "size": size, "kept": k, "threads": args.threads}
                for engine in ("torch", "native"):
                    row[f"{engine}_us"] = t[engine]
                    row[f"{engine}_ratio"] = (times[c][engine] / t[engine]) / (c / k)
                rows.append(row)
                print({key: round(v, 3) if isinstance(v, float) else v for key, v in row.items()}, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine_info(), "args": {"threads": args.threads}, "rows": rows}
    (args.out / "kernels.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
