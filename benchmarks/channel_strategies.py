"""Latency of the channel-slicing batch strategies of :mod:`dynnet.kernels.channel` for one ResNet-20 block.

For a block of the second stage (32 → 32 channels, 14×14 on Fashion-MNIST) and batch sizes 1 and 64, it times the
dense reference and each strategy (``groups``, ``padded``, ``per_sample``) at several kept fractions, with three
mask structures: identical counts (k-winners-take-all), Bernoulli masks (free gates) and nested prefixes (RNP).
Writes ``benchmarks/results/channel/strategies.csv``. CPU shared with other jobs: indicative only.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from torch import nn

from dynnet.bench import machine_info, measure_latency
from dynnet.kernels.channel import ConvSpec, sliced_pair

OUT = Path(__file__).parent / "results" / "channel"


def masks(kind: str, n: int, c: int, frac: float, g: torch.Generator) -> torch.Tensor:
    k = max(1, round(frac * c))
    if kind == "equal":
        idx = torch.rand(n, c, generator=g).argsort(1)[:, :k]
        return torch.zeros(n, c).scatter_(1, idx, 1.0)
    if kind == "bernoulli":
        return (torch.rand(n, c, generator=g) < frac).float()
    groups = torch.randint(1, 5, (n,), generator=g)  # nested: 1..4 of 4 groups, mean ~ 5/8
    return (torch.arange(c)[None, :] < (groups * c // 4)[:, None]).float()


def main() -> None:
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    c1, c2 = nn.Conv2d(32, 32, 3, 1, 1), nn.Conv2d(32, 32, 3, 1, 1)
    s1, s2 = ConvSpec.of(c1), ConvSpec.of(c2)
    w1, b1, w2, b2 = c1.weight.detach(), c1.bias.detach(), c2.weight.detach(), c2.bias.detach()
    rows = []
    for n in (1, 64):
        x = torch.randn(n, 32, 14, 14, generator=g)
        dense = measure_latency(
            lambda v: sliced_pair(v, w1, b1, w2, b2, torch.ones(v.shape[0], 32), s1, s2, binary=True, strategy="dense"),
            x,
            threads=2,
            min_run_time=0.2,
        ).median_ms
        for kind in ("equal", "bernoulli", "nested"):
            for frac in (0.25, 0.5, 0.75):
                m = masks(kind, n, 32, frac, g)
                row = {"batch": n, "masks": kind, "kept": float(m.mean()), "dense_ms": dense}
                for strategy in ("groups", "padded", "per_sample", "auto"):
                    if n == 1 and strategy in ("padded", "per_sample"):
                        continue

                    def fn(v, m=m, strategy=strategy):
                        return sliced_pair(v, w1, b1, w2, b2, m, s1, s2, binary=True, strategy=strategy)

                    row[f"{strategy}_ms"] = measure_latency(fn, x, threads=2, min_run_time=0.2).median_ms
                rows.append(row)
                print(row, flush=True)
                if kind == "nested":
                    break  # the nested masks have a fixed mean kept fraction
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "strategies.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}, key=lambda k: (k.endswith("_ms"), k)))
        w.writeheader()
        w.writerows(rows)
    (OUT / "strategies_machine.json").write_text(json.dumps(machine_info(), indent=1))


if __name__ == "__main__":
    main()
