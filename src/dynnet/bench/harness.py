"""`profile_model`: dense vs sparse latency on real images, MACs, and the realized-speedup ratio.

MAC speedup = dense MACs / mean theoretical MACs per sample; latency speedup = dense latency / sparse latency;
realized-speedup ratio = latency speedup ÷ MAC speedup (1.0: every saved MAC was saved on the clock).

At batch 1 the decisions depend on the image, so the timed call loops over ``batch1_samples`` different
images one by one and the latency reported is the mean per image. At larger batch sizes the first ``B``
images form the batch (the images are cycled when fewer are given).

Memory layout: oneDNN's speed on CPU depends strongly on it (a 16-channel 3×3 convolution at 28×28 and batch 64
runs ~4× faster channels-last than NCHW on our 2-core machine, while at batch 1 NCHW can win). With
``layouts=("contiguous", "channels_last")`` (the default) each mode is timed in both layouts and reported in its
faster one (``b{B}_dense_layout``, ``b{B}_sparse_layout``), so neither side is measured in a layout a deployment
would not choose.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dynnet.bench.latency import Latency, measure_latency, realized_speedup
from dynnet.core import dynamic_blocks, set_mode, trace
from dynnet.macs import count_macs

__all__ = ["profile_model"]


_LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def _take(images: Tensor, n: int) -> Tensor:
    if images.shape[0] >= n:
        return images[:n]
    reps = -(-n // images.shape[0])
    return images.repeat(reps, 1, 1, 1)[:n]


def _one_by_one(model: nn.Module):
    def run(x: Tensor) -> None:
        with torch.inference_mode():
            for i in range(x.shape[0]):
                model(x[i : i + 1])

    return run


def _inference(model: nn.Module):
    # inference_mode (not only no_grad): no autograd bookkeeping at all, as a deployed model runs.
    def run(x: Tensor) -> Tensor:
        with torch.inference_mode():
            return model(x)

    return run


def _macs(model: nn.Module, x: Tensor) -> tuple[float, float, float]:
    """(mean theoretical MACs, mean executed MACs, dense MACs) per sample of ``model(x)`` as it is set up."""
    with torch.no_grad(), trace() as t:
        model(x)
    if t.entries:
        return float(t.macs().mean()), float(t.executed_macs().mean()), float(t.dense_macs())
    per = float(count_macs(model, x[:1]).per_sample[0])
    return per, per, per


def profile_model(
    model: nn.Module,
    images: Tensor,
    *,
    batch_sizes: Sequence[int] = (1, 64),
    threads: int | None = None,
    min_run_time: float = 1.0,
    batch1_samples: int = 32,
    layouts: Sequence[str] = ("contiguous", "channels_last"),
    rounds: int = 1,
) -> dict[str, Any]:
    """Latency of the dense (static base) network and of sparse execution, with MACs, at each batch size.

    The model runs in eval mode under ``torch.inference_mode()``; its train/eval flag and every dynamic block's mode
    are restored afterwards. A static ``nn.Module`` is timed once and reported as both dense and sparse.

    Args:
        model: a ``DynamicModel`` (or any classifier).
        images: Tensor[M, C, H, W] real images (decisions depend on them), already on the model's device.
        batch_sizes: the batch sizes to time; at batch 1 ``batch1_samples`` images are run one by one.
        threads: CPU threads for the timing (default: ``torch.get_num_threads()``).
        min_run_time: seconds of measurement per configuration.
        batch1_samples: how many different images the batch-1 latency is averaged over.
        layouts: memory layouts to try (``"contiguous"``, ``"channels_last"``); each mode reports its fastest.
        rounds: dense and sparse are timed alternately this many times and each reports its median round, so that a
            slow window of a shared machine does not fall on one mode only.

    Returns:
        A flat dict (one CSV row): for each batch size ``B``: ``b{B}_dense_ms``, ``b{B}_sparse_ms`` (per image at
        B = 1, per batch otherwise), ``b{B}_dense_iqr_ms``, ``b{B}_sparse_iqr_ms``, ``b{B}_mean_macs``,
        ``b{B}_executed_macs``, ``b{B}_mac_fraction``, ``b{B}_mac_speedup``, ``b{B}_latency_speedup``,
        ``b{B}_realized_ratio``, ``b{B}_sparse_engine`` (the :attr:`~dynnet.DynamicModel.last_engine` sparse mode ran:
        batched, per_sample or masked) (and ``b{B}_images``), plus ``dense_macs``, ``threads``, ``device``.
    """
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty Tensor[M, C, H, W], got {getattr(images, 'shape', images)}")
    unknown = set(layouts) - set(_LAYOUTS)
    if not layouts or unknown:
        raise ValueError(f"layouts must be a non-empty subset of {sorted(_LAYOUTS)}, got {list(layouts)}")
    dynamic = {name: block.mode for name, block in dynamic_blocks(model)}
    was_training = model.training
    threads = threads or torch.get_num_threads()
    row: dict[str, Any] = {"threads": threads, "device": str(images.device), "dynamic": bool(dynamic)}
    model.eval()
    try:
        for b in batch_sizes:
            if b < 1:
                raise ValueError(f"batch sizes must be >= 1, got {b}")
            x = _take(images, batch1_samples if b == 1 else b)
            per_call = x.shape[0] if b == 1 else 1
            fn = _one_by_one(model) if b == 1 else _inference(model)

            def timed(mode: str, fn=fn, x=x, per_call=per_call) -> tuple[Latency, str]:
                if dynamic:
                    set_mode(model, mode)
                best: tuple[Latency, str] | None = None
                for layout in layouts:
                    model.to(memory_format=_LAYOUTS[layout])
                    xl = x.contiguous(memory_format=_LAYOUTS[layout])
                    lat = _per(measure_latency(fn, xl, threads=threads, min_run_time=min_run_time), per_call)
                    if best is None or lat.median_ms < best[0].median_ms:
                        best = (lat, layout)
                model.to(memory_format=torch.contiguous_format)
                assert best is not None
                return best

            dense_runs, sparse_runs = [], []
            for _ in range(rounds):
                dense_runs.append(timed("dense"))
                if dynamic:
                    sparse_runs.append(timed("sparse"))
            engine = getattr(model, "last_engine", None) if dynamic else None  # what the sparse timing ran
            dense_lat, dense_layout = _median_round(dense_runs)
            sparse_lat, sparse_layout = _median_round(sparse_runs) if dynamic else (dense_lat, dense_layout)
            row[f"b{b}_dense_layout"], row[f"b{b}_sparse_layout"] = dense_layout, sparse_layout
            mean_macs, executed, dense_macs = _macs(model, x)  # sparse mode (last set), eval
            row["dense_macs"] = dense_macs
            mac_speedup = dense_macs / mean_macs
            lat_speedup = dense_lat.median_ms / sparse_lat.median_ms
            ratio = realized_speedup(dense_lat.median_ms, sparse_lat.median_ms, dense_macs, mean_macs)
            row.update({
                f"b{b}_images": x.shape[0],
                f"b{b}_dense_ms": dense_lat.median_ms,
                f"b{b}_dense_iqr_ms": dense_lat.iqr_ms,
                f"b{b}_sparse_ms": sparse_lat.median_ms,
                f"b{b}_sparse_iqr_ms": sparse_lat.iqr_ms,
                f"b{b}_mean_macs": mean_macs,
                f"b{b}_executed_macs": executed,
                f"b{b}_mac_fraction": mean_macs / dense_macs,
                f"b{b}_mac_speedup": mac_speedup,
                f"b{b}_latency_speedup": lat_speedup,
                f"b{b}_realized_ratio": ratio,
                f"b{b}_sparse_engine": engine,
            })  # fmt: skip
    finally:
        for name, block in dynamic_blocks(model):
            block.mode = dynamic.get(name, block.mode)
        model.train(was_training)
    return row


def _median_round(runs: list[tuple[Latency, str]]) -> tuple[Latency, str]:
    """The round with the median latency (the lower middle one for an even count), with its layout."""
    ordered = sorted(runs, key=lambda r: r[0].median_ms)
    return ordered[(len(ordered) - 1) // 2]


def _per(lat: Latency, n: int) -> Latency:
    """The latency of one image when a timed call ran ``n`` of them one by one."""
    if n == 1:
        return lat
    return Latency(lat.median_ms / n, lat.iqr_ms / n, lat.runs, 1, lat.threads, lat.device)
