"""Trained weights shipped inside the package: the small dense bases the defaults fine-tune from, and the static
baselines the benchmark compares against.

Each entry is two files in ``dynnet/zoo/weights/``: ``<key>.safetensors`` and ``<key>.json``, the manifest that
``dynnet pretrain`` or ``dynnet prune`` wrote (the command that produced the weights, data, settings, test
accuracy, date, machine and the sha256 of the weights). The key is ``<model>[x<width>][p<fraction>]-<data>``:
``cifar_resnet20-fashion_mnist`` (the dense base), ``cifar_resnet20x0.75-fashion_mnist`` (a narrower static
baseline), ``cifar_resnet20p0.5-fashion_mnist`` (the base pruned to half its MACs and fine-tuned). :func:`ship`
copies a finished run folder in; :func:`load` builds any entry's network with its weights.

``dynnet.create_model("cifar_resnet20", pretrained=True)`` loads them (hash checked); torchvision and timm weights
keep their own loaders (``weights=...``, ``pretrained=True`` for ``timm/<name>``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["WEIGHTS_DIR", "checked_state", "entry", "load", "load_pretrained", "ship", "shipped", "weights_key"]

WEIGHTS_DIR = Path(__file__).parent / "weights"


def weights_key(model: str, data: str, width: float | None = None, pruned: float | None = None) -> str:
    """``cifar_resnet20-fashion_mnist``, ``cifar_resnet20x0.75-fashion_mnist``, ``cifar_resnet20p0.5-fashion_mnist``."""
    w = "" if width in (None, 1.0) else f"x{width:g}"
    p = "" if pruned is None else f"p{pruned:g}"
    return f"{model}{w}{p}-{data}"


def entry(key: str) -> tuple[dict[str, Any], Path]:
    """``(manifest, weights path)`` of shipped entry ``key``.

    Raises:
        ValueError: no such entry (the message lists the shipped ones).
    """
    entries = shipped()
    if key not in entries:
        known = ", ".join(entries) or "none"
        raise ValueError(f"no shipped weights {key!r}; shipped: {known} (train your own with `dynnet pretrain`)")
    return entries[key], WEIGHTS_DIR / f"{key}.safetensors"


def checked_state(key: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(manifest, state_dict)`` of shipped entry ``key``, after checking the weights' sha256.

    Raises:
        ValueError: no such entry (the message lists the shipped ones) or a hash mismatch.
    """
    from safetensors.torch import load_file

    from dynnet.train.pretrain import sha256_of

    manifest, path = entry(key)
    digest = sha256_of(path)
    if digest != manifest["sha256"]:
        raise ValueError(f"{path} does not match its manifest (sha256 {digest[:12]}… ≠ {manifest['sha256'][:12]}…)")
    return manifest, load_file(str(path))


def load(key: str) -> nn.Module:
    """The network of shipped entry ``key`` (see :func:`shipped`) with its weights (sha256 checked), in eval mode;
    pruned entries get their pruned layer shapes."""
    from dynnet.models import build_base_model
    from dynnet.train.prune import resize_like

    manifest, state = checked_state(key)
    net = build_base_model(manifest["model"], **manifest["model_kwargs"])
    if manifest.get("pruned"):
        resize_like(net, state)
    net.load_state_dict(state, strict=True)
    return net.eval()


def shipped() -> dict[str, dict[str, Any]]:
    """The shipped entries: key → manifest."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(WEIGHTS_DIR.glob("*.json"))}


def load_pretrained(net: nn.Module, model: str, *, data: str = "fashion_mnist", width: float | None = None) -> dict:
    """Load the shipped weights of ``model`` (at ``width``) trained on ``data`` into ``net``, after checking their
    sha256 against the manifest; returns the manifest.

    Raises:
        ValueError: no such entry (the message lists the shipped ones), a hash mismatch, or weights that do not fit.
    """
    key = weights_key(model, data, width)
    manifest, state = checked_state(key)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"shipped weights {key!r} do not fit the network: {' '.join(str(err).split())[:200]}"
        ) from None
    return manifest


def ship(run_dir: str | Path, *, force: bool = False) -> Path:
    """Copy a finished ``dynnet pretrain`` or ``dynnet prune`` run (``model.safetensors`` + ``manifest.json``) into
    the package.

    Raises:
        ValueError: the run is not finished, or the entry exists and ``force`` is false.
    """
    run = Path(run_dir)
    manifest_path, weights = run / "manifest.json", run / "model.safetensors"
    if not manifest_path.is_file() or not weights.is_file():
        raise ValueError(f"{run} holds no finished pretraining run (manifest.json + model.safetensors)")
    manifest = json.loads(manifest_path.read_text())
    settings = manifest["settings"]
    key = weights_key(manifest["model"], manifest["data"], settings.get("width"), settings.get("pruned"))
    target = WEIGHTS_DIR / f"{key}.safetensors"
    if target.exists() and not force:
        raise ValueError(f"{target} exists: pass force=True to replace it")
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, target)
    manifest["weights"] = target.name
    (WEIGHTS_DIR / f"{key}.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return target
