"""`fit` under torch.distributed: 2 Gloo processes equal one process on the same data order."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import dynnet
from dynnet.train import TrainConfig, evaluate, fit

WORLD = 2
BATCH_PER_RANK = 4


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 6, 6, generator=g)
    y = (x.flatten(1).sum(1) > 0).long()
    return TensorDataset(x, y)


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 2))


def _config() -> TrainConfig:
    return TrainConfig(epochs=2, lr=0.1, weight_decay=1e-3, seed=0)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(WORLD), "RANK": str(rank),
         "LOCAL_RANK": str(rank)}
    )  # fmt: skip
    torch.set_num_threads(1)
    data = _data()
    # fit initialises the process group itself (as under torchrun)
    loader = DataLoader(data, batch_size=BATCH_PER_RANK, sampler=DistributedSampler(data, WORLD, rank, seed=0))
    model = _linear()
    fit(model, loader, _config())
    assert dist.is_initialized() and dist.get_world_size() == WORLD
    ev = evaluate(model, loader, mode="sparse")  # a sharded loader: results gathered over ranks
    assert ev.num_samples == len(data)

    # a dynamic model trains under DDP in masked mode with find_unused_parameters=False, replicas stay equal
    torch.manual_seed(0)
    dyn = dynnet.create_model("cifar_resnet8", recipe="convnet_aig", width=0.25, in_channels=1)
    fit(dyn, loader, TrainConfig(epochs=1, lr=0.05, max_steps=3, out_dir=out + "/dyn"))
    flat = torch.cat([p.detach().flatten() for p in dyn.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1])
    if rank == 0:
        torch.save({"linear": model.state_dict(), "accuracy": ev.accuracy}, out + "/result.pt")
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_equal_single_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    result = torch.load(tmp_path / "result.pt", weights_only=True)

    # one process, the same global batches: DistributedSampler(num_replicas=1) draws the same permutation and
    # rank r of 2 takes its positions r, r + 2, ...: batch i of 8 here is the union of the two ranks' batches i.
    data = _data()
    loader = DataLoader(data, batch_size=WORLD * BATCH_PER_RANK, sampler=DistributedSampler(data, 1, 0, seed=0))
    single = _linear()
    fit(single, loader, _config())
    for k, v in single.state_dict().items():
        torch.testing.assert_close(result["linear"][k], v, rtol=1e-5, atol=1e-6)
    assert result["accuracy"] == evaluate(single, loader).accuracy
    assert (tmp_path / "dyn" / "checkpoint.json").is_file()  # written by rank 0
