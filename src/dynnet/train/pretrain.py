"""`pretrain`: train a dense base network with a real schedule and write it as safetensors + a manifest.

The dynamic recipes start from a trained network, as their papers do; this is how dynnet makes the small ones its
defaults need (``dynnet pretrain --model cifar_resnet20 --data fashion_mnist``). The schedule is the usual CIFAR
ResNet one: SGD with Nesterov momentum 0.9, learning rate 0.1 with cosine decay, weight decay 5e-4 on the weights,
batch 128, random crop (2-pixel padding) and horizontal flip, on the training split less its validation tenth (the
same split, for the same seed, that the fine-tuning runs calibrate on, so that the base never sees it).

The run folder holds the resumable training checkpoint (``checkpoint.*``, written every ``checkpoint_every`` steps),
and at the end ``model.safetensors`` (the weights only) and ``manifest.json``: the command that produced them, the
data, epochs, seed, test accuracy, date, machine and the weights' sha256.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["pretrain", "provenance", "sha256_of"]

logger = logging.getLogger("dynnet.train")


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def provenance(weights: Path, seconds: float) -> dict[str, Any]:
    """The fields every weights manifest ends with: training time, date, machine, torch version, the weights' file
    name and sha256."""
    from dynnet.bench.latency import machine_info

    return {
        "train_seconds_last_session": round(seconds, 1),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "torch": torch.__version__,
        "weights": weights.name,
        "sha256": sha256_of(weights),
    }


def pretrain(
    model: str = "cifar_resnet20",
    data: str = "fashion_mnist",
    *,
    out_dir: str | Path,
    width: float | None = None,
    epochs: int = 30,
    lr: float = 0.1,
    batch_size: int = 128,
    weight_decay: float = 5e-4,
    seed: int = 0,
    val_fraction: float = 0.1,
    threads: int | None = None,
    data_root: str | Path | None = None,
    checkpoint_every: int = 100,
    progress: bool = False,
    command: str | None = None,
    dataset_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the dense ``model`` on ``data`` and write ``model.safetensors`` + ``manifest.json`` in ``out_dir``.

    Resumes from ``out_dir/checkpoint`` when it holds a run of the same settings (interrupt and call again).

    Args:
        model: a registered base model (``dynnet.list_models()``).
        data: a registered dataset; augmentation is switched on where the dataset offers it.
        out_dir: the run folder.
        width: width multiplier of ``cifar_resnet*`` models (the static baselines of the benchmark).
        epochs: training epochs.
        lr: peak SGD learning rate (cosine decay to 0).
        batch_size: training batch size.
        weight_decay: L2 penalty on weights with at least 2 dimensions.
        seed: seeds initialisation, the validation split and the training order.
        val_fraction: the held-out tenth of the training split (not trained on).
        threads: torch CPU threads (``None``: torch's default).
        data_root: where to look for the dataset first.
        checkpoint_every: steps between resumable checkpoints.
        progress: tqdm progress bar.
        command: the command line recorded in the manifest (default: this process's).
        dataset_kwargs: extra arguments of the dataset builder (recorded in the manifest).

    Returns:
        The manifest (also written to ``out_dir/manifest.json``).
    """
    from safetensors.torch import save_file

    from dynnet.data import build_loaders
    from dynnet.models import build_base_model
    from dynnet.train.config import TrainConfig
    from dynnet.train.evaluate import evaluate
    from dynnet.train.loop import fit

    out = Path(out_dir)
    settings = {
        "model": model, "data": data, "width": width, "epochs": epochs, "lr": lr, "batch_size": batch_size,
        "weight_decay": weight_decay, "seed": seed, "val_fraction": val_fraction,
        "dataset_kwargs": dataset_kwargs or {},
    }  # fmt: skip
    _claim_run_folder(out, settings)
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    extra = {"augment": True} if data in ("fashion_mnist", "cifar10", "cifar100") else {}
    loaders = build_loaders(
        data, root=data_root, batch_size=batch_size, val_fraction=val_fraction, seed=seed,
        **{**extra, **(dataset_kwargs or {})},
    )  # fmt: skip
    info = loaders.info
    kwargs: dict[str, Any] = {"in_channels": info.in_channels, "num_classes": info.num_classes}
    if width is not None:
        kwargs["width"] = width
    net = build_base_model(model, **kwargs)
    config = TrainConfig(
        epochs=epochs, lr=lr, weight_decay=weight_decay, seed=seed, out_dir=out, resume=True,
        checkpoint_every_steps=checkpoint_every, progress=progress, eval_mode="dense",
    )  # fmt: skip
    start = time.perf_counter()
    result = fit(net, loaders.train, config, val_loader=loaders.val)
    seconds = time.perf_counter() - start
    test = evaluate(net, loaders.test, mode="dense")
    weights = out / "model.safetensors"
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(weights))  # no metadata: safetensors orders it at random, which would change the hash

    manifest = {
        "command": command or " ".join(shlex.quote(a) for a in ["dynnet", *sys.argv[1:]]),
        "model": model,
        "model_kwargs": kwargs,
        "data": data,
        "train_images": len(loaders.train.dataset),
        "augmentation": "random crop (pad 2) + horizontal flip" if extra else "none",
        "settings": settings,
        "val_accuracy": None if result.val is None else result.val.accuracy,
        "test_accuracy": test.accuracy,
        "test_images": test.num_samples,
        "dense_macs": test.dense_macs,
        **provenance(weights, seconds),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    logger.info("pretrained %s on %s: test accuracy %.2f %%", model, data, 100 * test.accuracy)
    return manifest


def _claim_run_folder(out: Path, settings: dict[str, Any]) -> None:
    """Remember the settings of the run in ``out``; refuse a folder that holds a run of other settings."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "pretrain.json"
    if path.exists():
        before = json.loads(path.read_text())
        if before != settings:
            changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
            raise ValueError(
                f"{out} holds a pretraining run with other settings ({', '.join(changed)}): "
                "resume it with the same settings or choose another --out"
            )
    else:
        path.write_text(json.dumps(settings, indent=1) + "\n")
