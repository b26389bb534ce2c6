"""Trained weights shipped inside the package: the small dense bases the defaults fine-tune from, and the static
baselines the benchmark compares against.

Each entry is two files in ``dynnet/zoo/weights/``: ``<key>.safetensors`` and ``<key>.json``, the manifest that
``dynnet pretrain`` wrote (the command that produced the weights, data, settings, test accuracy, date, machine and
the sha256 of the weights). The key is ``<model>[x<width>]-<data>``: ``cifar_resnet20-fashion_mnist``,
``cifar_resnet20x0.75-fashion_mnist``. :func:`ship` copies a finished ``dynnet pretrain`` run folder in.

``dynnet.create_model("cifar_resnet20", pretrained=True)`` loads them (hash checked); torchvision and timm weights
keep their own loaders (``weights=...``, ``pretrained=True`` for ``timm/<name>``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["WEIGHTS_DIR", "load_pretrained", "ship", "shipped", "weights_key"]

WEIGHTS_DIR = Path(__file__).parent / "weights"


def weights_key(model: str, data: str, width: float | None = None) -> str:
    """``cifar_resnet20-fashion_mnist``, ``cifar_resnet20x0.75-fashion_mnist``."""
    w = "" if width in (None, 1.0) else f"x{width:g}"
    return f"{model}{w}-{data}"


def shipped() -> dict[str, dict[str, Any]]:
    """The shipped entries: key → manifest."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(WEIGHTS_DIR.glob("*.json"))}


def load_pretrained(net: nn.Module, model: str, *, data: str = "fashion_mnist", width: float | None = None) -> dict:
    """Load the shipped weights of ``model`` (at ``width``) trained on ``data`` into ``net``, after checking their
    sha256 against the manifest; returns the manifest.

    Raises:
        ValueError: no such entry (the message lists the shipped ones), a hash mismatch, or weights that do not fit.
    """
    from safetensors.torch import load_file

    from dynnet.train.pretrain import sha256_of

    key = weights_key(model, data, width)
    entries = shipped()
    if key not in entries:
        known = ", ".join(entries) or "none"
        raise ValueError(f"no shipped weights {key!r}; shipped: {known} (train your own with `dynnet pretrain`)")
    manifest = entries[key]
    path = WEIGHTS_DIR / f"{key}.safetensors"
    digest = sha256_of(path)
    if digest != manifest["sha256"]:
        raise ValueError(f"{path} does not match its manifest (sha256 {digest[:12]}… ≠ {manifest['sha256'][:12]}…)")
    try:
        net.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"shipped weights {key!r} do not fit the network: {' '.join(str(err).split())[:200]}"
        ) from None
    return manifest


def ship(run_dir: str | Path, *, force: bool = False) -> Path:
    """Copy a finished ``dynnet pretrain`` run (``model.safetensors`` + ``manifest.json``) into the package.

    Raises:
        ValueError: the run is not finished, or the entry exists and ``force`` is false.
    """
    run = Path(run_dir)
    manifest_path, weights = run / "manifest.json", run / "model.safetensors"
    if not manifest_path.is_file() or not weights.is_file():
        raise ValueError(f"{run} holds no finished pretraining run (manifest.json + model.safetensors)")
    manifest = json.loads(manifest_path.read_text())
    key = weights_key(manifest["model"], manifest["data"], manifest["settings"].get("width"))
    target = WEIGHTS_DIR / f"{key}.safetensors"
    if target.exists() and not force:
        raise ValueError(f"{target} exists: pass force=True to replace it")
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, target)
    manifest["weights"] = target.name
    (WEIGHTS_DIR / f"{key}.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return target
