"""`profile_model`: keys, MAC figures against the trace, and the model left as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynnet
from dynnet.bench.harness import profile_model
from dynnet.core import dynamic_blocks
from dynnet.testing import scramble_gates

pytestmark = pytest.mark.usefixtures("one_thread")


def test_profile_model_reports_and_restores() -> None:
    torch.manual_seed(0)
    model = dynnet.create_model("cifar_resnet8", recipe="convnet_aig", width=0.25, in_channels=1)
    scramble_gates(model, seed=3)
    model.train()
    dynnet.set_mode(model, "masked")
    images = torch.randn(10, 1, 12, 12)
    row = profile_model(model, images, batch_sizes=(1, 8), min_run_time=0.01, batch1_samples=6)

    for b in (1, 8):
        for key in ("dense_ms", "sparse_ms", "mean_macs", "executed_macs", "mac_fraction", "mac_speedup",
                    "latency_speedup", "realized_ratio"):  # fmt: skip
            assert isinstance(row[f"b{b}_{key}"], float), key
            assert row[f"b{b}_{key}"] > 0
        assert row[f"b{b}_realized_ratio"] == pytest.approx(row[f"b{b}_latency_speedup"] / row[f"b{b}_mac_speedup"])
    assert row["b1_images"] == 6 and row["b8_images"] == 8
    # what sparse mode really ran (autotune is off in the tests: the recipe's batch path)
    assert row["b1_sparse_engine"] == row["b8_sparse_engine"] == "batched"

    # the MAC figures are those of sparse eval-mode execution of exactly those images
    model.eval()
    dynnet.set_mode(model, "sparse")
    with torch.no_grad(), dynnet.trace() as t:
        model(images[:8])
    assert row["b8_mean_macs"] == pytest.approx(float(t.macs().mean()))
    assert row["dense_macs"] == t.dense_macs()
    assert row["b8_mac_speedup"] == pytest.approx(t.dense_macs() / float(t.macs().mean()))
    assert row["b8_mac_fraction"] < 1.0  # the scrambled gates skip blocks

    # restored: train flag and per-block modes
    model.train()
    dynnet.set_mode(model, "masked")
    blocks = [b for _, b in dynamic_blocks(model)]
    blocks[0].mode = "dense"
    profile_model(model, images, batch_sizes=(2,), min_run_time=0.01)
    assert model.training
    assert [b.mode for b in blocks] == ["dense"] + ["masked"] * (len(blocks) - 1)


def test_profile_static_model() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    row = profile_model(model, torch.randn(4, 1, 4, 4), batch_sizes=(4,), min_run_time=0.01)
    assert row["dense_macs"] == 48 and row["b4_mac_speedup"] == 1.0 and row["b4_latency_speedup"] == 1.0
    assert row["dynamic"] is False


def test_profile_rejects_bad_images() -> None:
    with pytest.raises(ValueError, match="Tensor"):
        profile_model(nn.Identity(), torch.randn(3, 4))


def test_profile_reports_each_modes_fastest_layout_and_restores_the_weights() -> None:
    torch.manual_seed(0)
    model = dynnet.create_model("cifar_resnet8", recipe="convnet_aig", width=0.25, in_channels=1)
    row = profile_model(model, torch.randn(6, 1, 12, 12), batch_sizes=(4,), min_run_time=0.01)
    assert row["b4_dense_layout"] in ("contiguous", "channels_last")
    assert row["b4_sparse_layout"] in ("contiguous", "channels_last")
    conv_weights = [p for p in model.parameters() if p.dim() == 4]
    assert conv_weights and all(p.is_contiguous() for p in conv_weights)

    x = torch.randn(6, 1, 12, 12)
    only = profile_model(model, x, batch_sizes=(4,), min_run_time=0.01, layouts=["channels_last"])
    assert only["b4_dense_layout"] == only["b4_sparse_layout"] == "channels_last"
    with pytest.raises(ValueError, match="layouts"):
        profile_model(model, torch.randn(6, 1, 12, 12), batch_sizes=(4,), layouts=["nhwc"])


def test_profile_rounds_report_the_median_round(monkeypatch) -> None:
    """With ``rounds``, dense and sparse are timed alternately and each reports its median round."""
    import dynnet.bench.harness as harness
    from dynnet.bench.latency import Latency

    order: list[float] = []
    times = iter([5.0, 1.0, 3.0, 9.0, 4.0, 2.0])  # dense, sparse, dense, sparse, dense, sparse

    def fake(fn, x, *, threads=None, min_run_time=1.0, warmup=3):
        t = next(times)
        order.append(t)
        return Latency(t, 0.0, 1, x.shape[0], threads or 1, "cpu")

    monkeypatch.setattr(harness, "measure_latency", fake)
    model = dynnet.create_model("cifar_resnet8", recipe="batch_shaping", num_classes=10)
    row = profile_model(model, torch.randn(2, 3, 8, 8), batch_sizes=(2,), layouts=("contiguous",), rounds=3)
    assert order == [5.0, 1.0, 3.0, 9.0, 4.0, 2.0]
    assert row["b2_dense_ms"] == 4.0 and row["b2_sparse_ms"] == 2.0  # medians of (5, 3, 4) and (1, 9, 2)
    with pytest.raises(ValueError, match="rounds"):
        profile_model(model, torch.randn(2, 3, 8, 8), rounds=0)
