"""Checkpoints: weights in safetensors, everything else in JSON; atomic writes; loud, named failures.

A checkpoint ``<stem>`` is up to three files:

* ``<stem>.safetensors`` — the model's ``state_dict`` (tensors shared under several names stored once, the
  aliases listed in the JSON);
* ``<stem>.optim.safetensors`` — the tensors of the optimiser and scheduler states (if given);
* ``<stem>.json`` — the commit marker, written last: format version, recipe, recipe config, base model and its
  build arguments, epoch / step / budget and any training state, dynnet and torch versions, RNG states as lists,
  the optimiser / scheduler state structure (tensors replaced by references into the second file), and the
  SHA-256 of each data file.

Nothing is unpickled: loading reads JSON and safetensors only. Every file is written to a temporary file in the
same directory, flushed and fsynced, then moved into place with :func:`os.replace`; the data files are replaced
before the JSON. A failure while writing leaves the previous checkpoint untouched. A crash in the short window
between the renames leaves an old JSON next to new data files: the SHA-256 check turns that into a
:class:`CheckpointError` rather than a silently mixed checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "checkpoint_paths",
    "get_rng_state",
    "load_checkpoint",
    "read_checkpoint_meta",
    "remember_build",
    "save_checkpoint",
    "set_rng_state",
]

FORMAT_VERSION = 1
_BUILD_ATTR = "_dynnet_build"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, truncated or does not match the model; the message names the file."""


def remember_build(model: nn.Module, name: str, **kwargs: Any) -> nn.Module:
    """Record how ``model`` was built (``dynnet.create_model(name, **kwargs)``) so a checkpoint can rebuild it.

    The record is plain JSON-able configuration kept on the module (not per-batch data). Returns ``model``.
    """
    json.dumps(kwargs)  # fail now, not at save time, on arguments JSON cannot hold
    object.__setattr__(model, _BUILD_ATTR, {"name": name, "kwargs": dict(kwargs)})
    return model


RUN_CHECKPOINT = "checkpoint"
"""The stem of the checkpoint in a run folder (what :func:`dynnet.train.fit` writes into ``out_dir``)."""


def checkpoint_paths(path: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    """``(json, weights, optimiser)`` paths of the checkpoint ``path``: a stem, any of its files, or a run folder
    (an existing directory: its ``checkpoint`` stem, where ``fit`` saves)."""
    p = Path(path)
    if p.is_dir():
        p = p / RUN_CHECKPOINT
    name = p.name
    for suffix in (".optim.safetensors", ".safetensors", ".json"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    stem = p.with_name(name)
    return (
        stem.with_name(name + ".json"),
        stem.with_name(name + ".safetensors"),
        stem.with_name(name + ".optim.safetensors"),
    )


# -- RNG ----------------------------------------------------------------------------------------------------------
def get_rng_state() -> dict[str, Any]:
    """Python, NumPy (if installed), torch CPU and CUDA RNG states as JSON-able lists."""
    state: dict[str, Any] = {"torch": torch.get_rng_state().tolist(), "python": _to_jsonable(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:  # pragma: no cover - numpy is a dependency, but stay usable without it
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    random.setstate(_to_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _to_jsonable(x: Any) -> Any:
    return [_to_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list) else x


# -- nested state with tensors <-> JSON + flat tensor dict ---------------------------------------------------------
def _flatten(obj: Any, tensors: dict[str, Tensor], prefix: str) -> Any:
    """JSON structure of ``obj`` with every tensor replaced by ``{"__tensor__": key}`` (stored in ``tensors``)."""
    if isinstance(obj, Tensor):
        key = f"{prefix}#{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _flatten(v, tensors, prefix) for k, v in obj.items()}
        return {"__items__": [[k, _flatten(v, tensors, prefix)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [_flatten(v, tensors, prefix) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (only tensors, numbers, strings, containers)")


def _unflatten(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def _dedup_state_dict(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Store each storage once: safetensors refuses tensors sharing memory (tied weights)."""
    unique: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        unique[name] = (
            t.detach().cpu().contiguous().clone() if _shares_storage(t, state) else t.detach().cpu().contiguous()
        )
    return unique, aliases


def _shares_storage(t: Tensor, state: dict[str, Tensor]) -> bool:
    # A view of a bigger storage (e.g. a slice of a fused weight) must be copied out before serialising.
    return t.numel() > 0 and t.untyped_storage().nbytes() != t.numel() * t.element_size()


# -- atomic file writes -------------------------------------------------------------------------------------------
def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fsynced temporary file in the same directory and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- save / load --------------------------------------------------------------------------------------------------
def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically.

    Args:
        path: the checkpoint stem (``runs/x/checkpoint`` → ``checkpoint.json`` + ``checkpoint.safetensors``);
            a path ending in ``.json`` or ``.safetensors`` is accepted too.
        model: the model (a ``DistributedDataParallel`` wrapper is unwrapped).
        optimizer: its state (momentum buffers, step counts) is stored too.
        scheduler: an LR scheduler with ``state_dict()``.
        state: JSON-able training state (epoch, step, budget, history...); tensors inside are stored as well.

    Returns:
        The JSON path (the commit marker).
    """
    json_path, weights_path, optim_path = checkpoint_paths(path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    model = _unwrap(model)
    # Serialise everything in memory first: a failure here must not touch the files on disk.
    weights, aliases = _dedup_state_dict(model.state_dict())
    weights_bytes = st_save(weights)
    extra_tensors: dict[str, Tensor] = {}
    optim_struct = _flatten(optimizer.state_dict(), extra_tensors, "optimizer") if optimizer is not None else None
    sched_struct = _flatten(scheduler.state_dict(), extra_tensors, "scheduler") if scheduler is not None else None
    state_struct = _flatten(dict(state or {}), extra_tensors, "state")
    optim_bytes = st_save(extra_tensors) if extra_tensors else None

    config = getattr(model, "config", None)
    import dynnet

    meta = {
        "format": "dynnet-checkpoint",
        "format_version": FORMAT_VERSION,
        "dynnet_version": dynnet.__version__,
        "torch_version": torch.__version__,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "recipe": getattr(model, "recipe", None),
        "recipe_config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None,
        "build": getattr(model, _BUILD_ATTR, None),
        "aliases": aliases,
        "files": {"weights": {"name": weights_path.name, "sha256": _sha256(weights_bytes)}},
        "optimizer": optim_struct,
        "scheduler": sched_struct,
        "state": state_struct,
        "rng": get_rng_state(),
    }
    latency = getattr(model, "latency_model", None)
    if latency is not None:  # the serving machine's latency model, and a latency budget, travel with the weights
        meta["latency"] = {"model": latency.as_dict(), "budget_ms": getattr(model, "budget_ms", None)}
    if optim_bytes is not None:
        meta["files"]["optimizer"] = {"name": optim_path.name, "sha256": _sha256(optim_bytes)}
    json_bytes = json.dumps(meta, indent=1, allow_nan=True).encode()

    # Keep the committed data files as <name>.prev until the new JSON commits: a kill between the renames
    # leaves the old JSON next to new data files, and the loader then finds the old data in .prev.
    _keep_previous(weights_path)
    _keep_previous(optim_path)
    _atomic_write(weights_path, weights_bytes)
    if optim_bytes is not None:
        _atomic_write(optim_path, optim_bytes)
    _atomic_write(json_path, json_bytes)  # the commit marker, last
    return json_path


def read_checkpoint_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed JSON of a checkpoint (no tensors loaded).

    Raises:
        CheckpointError: missing, unreadable or not a dynnet checkpoint.
    """
    json_path, _, _ = checkpoint_paths(path)
    if not json_path.is_file():
        where = f"the folder {path} holds no checkpoint: " if Path(path).is_dir() else ""
        raise CheckpointError(f"checkpoint not found: {where}{json_path} does not exist")
    try:
        meta = json.loads(json_path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"corrupt checkpoint {json_path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != "dynnet-checkpoint":
        raise CheckpointError(f"{json_path} is not a dynnet checkpoint (no 'format': 'dynnet-checkpoint')")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{json_path}: checkpoint format version {meta.get('format_version')!r}, this dynnet reads {FORMAT_VERSION}"
        )
    return meta


def _previous(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


def _keep_previous(path: Path) -> None:
    """Hard-link (or copy) the committed ``path`` to ``path.prev`` atomically, before ``path`` is replaced."""
    if not path.is_file():
        return
    tmp = path.with_name(f".{path.name}.prev.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        os.link(path, tmp)
    except OSError:  # file systems without hard links
        shutil.copyfile(path, tmp)
    os.replace(tmp, _previous(path))


def _read_tensors(folder: Path, entry: dict[str, str], json_path: Path) -> dict[str, Tensor]:
    file = folder / entry["name"]
    try:
        data = file.read_bytes()
    except OSError as err:
        raise CheckpointError(f"checkpoint {json_path}: cannot read {file} ({err})") from None
    if _sha256(data) != entry["sha256"] and _previous(file).is_file():
        # Interrupted save: the JSON still describes the previous data, kept in .prev.
        previous = _previous(file).read_bytes()
        if _sha256(previous) == entry["sha256"]:
            data = previous
    if _sha256(data) != entry["sha256"]:
        raise CheckpointError(
            f"corrupt or truncated checkpoint file {file}: its SHA-256 does not match {json_path} "
            f"({len(data)} bytes on disk)"
        )
    try:
        return st_load(data)
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"corrupt checkpoint file {file}: {err}") from None


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    restore_rng: bool = False,
    map_location: str | torch.device = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: the stem, or its ``.json`` / ``.safetensors`` file.
        model: load into this model (strict: every key must match); ``None``: rebuild it with
            ``dynnet.create_model`` from the build record and recipe config stored in the JSON.
        optimizer: restore its state too (requires the checkpoint to hold one).
        scheduler: restore its state too.
        restore_rng: also restore the Python / NumPy / torch RNG states (resuming a run).
        map_location: device of the loaded tensors.

    Returns:
        ``(model, meta)`` where ``meta`` is the JSON with ``meta["state"]`` decoded (tensors included).

    Raises:
        CheckpointError: missing, corrupt or truncated files, or weights that do not fit the model; the message
            names the file.
    """
    json_path, _, _ = checkpoint_paths(path)
    meta = read_checkpoint_meta(path)  # the path as given: a folder gets its own message
    folder = json_path.parent
    try:
        files = meta["files"]
        weights = _read_tensors(folder, files["weights"], json_path)
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"corrupt checkpoint {json_path}: missing entry {err}") from None
    for alias, original in (meta.get("aliases") or {}).items():
        weights[alias] = weights[original]
    weights = {k: v.to(map_location) for k, v in weights.items()}

    if model is None:
        model = _rebuild(meta, json_path)
    target = _unwrap(model)
    try:
        target.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"checkpoint {json_path} does not match the model ({type(target).__name__}): "
            f"{_mismatch(target.state_dict(), weights, err)}"
        ) from None

    extra: dict[str, Tensor] = {}
    if "optimizer" in files:
        extra = _read_tensors(folder, files["optimizer"], json_path)
    if optimizer is not None:
        if meta.get("optimizer") is None:
            raise CheckpointError(f"checkpoint {json_path} holds no optimizer state")
        try:
            optimizer.load_state_dict(_unflatten(meta["optimizer"], extra))
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint {json_path}: optimizer state does not fit ({err})") from None
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(_unflatten(meta["scheduler"], extra))
    meta["state"] = _unflatten(meta.get("state") or {}, extra)
    if meta.get("latency") and hasattr(target, "set_latency_model_"):
        from dynnet.core.latency import LatencyModel

        try:
            latency = LatencyModel.from_dict(meta["latency"]["model"])
            target.set_latency_model_(latency, meta["latency"].get("budget_ms"))
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"checkpoint {json_path}: its latency model does not load ({err})") from None
    if restore_rng:
        set_rng_state(meta["rng"])
    return model, meta


def _mismatch(expected: dict[str, Tensor], got: dict[str, Tensor], err: Exception, *, show: int = 5) -> str:
    """One short line: how many keys are missing / unexpected / of another shape, and the first ``show`` of each
    (a wrong architecture differs in hundreds of keys; torch's message lists them all)."""

    def few(keys: list[str]) -> str:
        more = f", ... ({len(keys) - show} more)" if len(keys) > show else ""
        return ", ".join(keys[:show]) + more

    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [
        f"{k} {tuple(got[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in got and tuple(got[k].shape) != tuple(v.shape)
    ]
    parts = [f"{len(missing)} missing keys ({few(missing)})"] if missing else []
    parts += [f"{len(unexpected)} unexpected keys ({few(unexpected)})"] if unexpected else []
    parts += [f"{len(shapes)} keys of another shape, checkpoint vs model ({few(shapes)})"] if shapes else []
    if not parts:  # some other refusal of load_state_dict: its first line
        return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    return "; ".join(parts) + " — was it saved from another model or recipe?"


def _rebuild(meta: dict[str, Any], json_path: Path) -> nn.Module:
    import dynnet

    build = meta.get("build")
    if not build:
        raise CheckpointError(
            f"checkpoint {json_path} does not say how to build its model: pass model=..., or save models made by "
            "dynnet.train.build_model / remember_build"
        )
    kwargs = dict(build.get("kwargs") or {})
    recipe = meta.get("recipe")
    if recipe is not None:
        kwargs.update(meta.get("recipe_config") or {})
        kwargs["recipe"] = recipe
    try:
        model = dynnet.create_model(build["name"], **kwargs)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {json_path}: cannot rebuild its model {build['name']!r}: {err}") from None
    return remember_build(model, build["name"], **(build.get("kwargs") or {}))


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
