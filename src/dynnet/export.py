"""Export a dynamic model's inference graph to ``torch.export``, TorchScript or ONNX.

What exports, and why:

* **Masked mode with hard (eval) decisions exports.** In eval mode every gate takes a deterministic
  hard decision and the masked path multiplies each dynamic part's output by it; every tensor keeps
  a static shape, so the graph traces. The exported graph computes the *same logits as sparse mode*
  (the conformance suite checks sparse == masked) but without the savings: every block runs for every
  sample. This is the **static fallback**; use it to ship a model to a runtime that cannot run
  data-dependent shapes (ONNX Runtime, TensorRT, mobile). The batch dimension stays dynamic.
* **Sparse mode does not export** for the recipes of this library: batch compaction
  (``x.index_select(0, keep.nonzero())``) gives tensors whose batch size depends on the data. ``torch.export``
  represents it as an unbacked symbol, but the convolution that follows needs to know whether that
  size is 0, and wrapping it in ``torch.cond`` hits a dynamo guard error (``Guard failed on the same
  frame it was created``, torch 2.14). ``export_model(..., mode="sparse")`` of a model with dynamic blocks
  raises :class:`UnsupportedExportError` saying so, before tracing (a failed trace prints hundreds of lines of
  graph dumps). For real savings, run the eager model in sparse mode (``dynnet.sparse(model)``), or
  ``torch.compile`` it (graph breaks at the data-dependent points).
* **The exported graph does not validate its input** the way ``DynamicModel.forward`` does: the NaN/Inf
  check is data-dependent and skipped while tracing (NaN images give NaN logits), and a wrong dtype fails
  inside the graph. ``torch.export`` programs still assert the channel count and image size (shape guards);
  ONNX Runtime checks rank, static dims and dtype. Validate inputs before calling an exported model.
* **No trace is recorded** by an exported graph (no decisions, no MACs): count MACs on the eager model.

Formats:

* ``"torch_export"`` — :class:`torch.export.ExportedProgram` (saved as ``.pt2`` by ``torch.export.save``).
* ``"torchscript"`` — a traced :class:`torch.jit.ScriptModule` (``torch.jit.trace``; deprecated by PyTorch in
  favour of ``torch.export`` but still widely deployed).
* ``"onnx"`` — :class:`torch.onnx.ONNXProgram` from the dynamo exporter; needs the ``onnx`` and
  ``onnxscript`` packages (``pip install onnx onnxscript``; ``onnxruntime`` to run it with
  :func:`load_exported`).

Example:
    >>> model = dynnet.create_model("cifar_resnet20", recipe="convnet_aig", in_channels=1)
    >>> export_model(model, torch.randn(2, 1, 28, 28), format="onnx", path="aig.onnx")
    >>> run = load_exported("aig.onnx")
    >>> logits = run(torch.randn(5, 1, 28, 28))  # Tensor[5, 10]
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dynnet.core import MODES, DynamicModel, check_input, dynamic_blocks, set_mode

__all__ = [
    "EXPORT_FORMATS",
    "UnsupportedExportError",
    "compile_model",
    "export_model",
    "load_exported",
    "onnx_available",
]

EXPORT_FORMATS = ("torch_export", "torchscript", "onnx")
_SUFFIX = {"torch_export": ".pt2", "torchscript": ".pt", "onnx": ".onnx"}


_SPARSE_HINT = (
    "sparse mode compacts the batch with data-dependent shapes; export mode='masked' (the static fallback: same "
    "logits, no savings), and run the eager model in sparse mode for the savings"
)


class UnsupportedExportError(ValueError):
    """The model cannot be exported in the requested format and mode; the message says why and what works."""


def onnx_available() -> bool:
    """Whether the packages the ONNX exporter needs (``onnx``, ``onnxscript``) are installed."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript"))


def compile_model(
    model: nn.Module,
    *,
    mode: str = "sparse",
    backend: str = "inductor",
    recompile_limit: int | None = None,
    **kwargs: Any,
) -> Callable[[Tensor], Tensor]:
    """``torch.compile`` of a converted model for inference in ``mode`` (eval), as a supported path.

    Sparse mode compacts the batch at every dynamic block, so the kept-sample counts change with the data, and one
    piece of code (a residual block's class) runs for blocks of several widths, with and without a downsampling
    path. A plain ``torch.compile(model)`` specialises on every count and every block and soon hits dynamo's
    recompile limit (8), after which it silently runs that code eagerly. Here the sizes are dynamic from the first
    call (one graph serves every batch and kept count), the graph breaks at the data-dependent compaction, and the
    recompile limit is raised for the duration of each call to four specialisations per dynamic block.

    Measured (ResNet-20 + ConvNet-AIG, Fashion-MNIST, 1 CPU thread, docs/reliability.md): correct, but not faster
    than the eager sparse model on CPU; dynnet's compiled kernels are the fast CPU path.

    Args:
        model: a converted model (or any module); set to eval and ``mode`` in place.
        mode: ``"sparse"``, ``"masked"`` or ``"dense"``.
        backend: ``torch.compile``'s backend.
        recompile_limit: specialisations allowed per piece of code (default ``max(8, 4 × dynamic blocks)``).
        **kwargs: more ``torch.compile`` arguments.

    Returns:
        A callable Tensor[N, C, H, W] → logits Tensor[N, K] (decisions and MACs go to an active trace, as eagerly).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    set_mode(model.eval(), mode)
    blocks = sum(1 for _ in dynamic_blocks(model))
    limit = recompile_limit or max(8, 4 * blocks)
    compiled = torch.compile(model, dynamic=True, backend=backend, **kwargs)

    def run(x: Tensor) -> Tensor:
        with torch._dynamo.config.patch(recompile_limit=limit, accumulated_recompile_limit=max(256, 8 * limit)):
            return compiled(x)

    return run


def export_model(
    model: nn.Module,
    example: Tensor,
    *,
    format: str = "torch_export",
    path: str | os.PathLike[str] | None = None,
    mode: str = "masked",
    dynamic_batch: bool = True,
) -> Any:
    """Export the hard-gated inference graph of ``model``.

    The model is put in eval mode and in ``mode`` while it is traced; its train/eval flags and modes are restored
    afterwards. As with ``torch.export`` and ``torch.jit.trace`` themselves, an in-memory ``torch_export`` or
    ``torchscript`` artifact shares the model's weight tensors; a saved file (``path``) is a snapshot.

    Args:
        model: a :class:`~dynnet.DynamicModel` (or any static ``nn.Module``) taking Tensor[N, C, H, W].
        example: Tensor[N, C, H, W] example input (real-looking values; only its shape and dtype are
            baked in, except N when ``dynamic_batch``).
        format: one of ``EXPORT_FORMATS``.
        path: where to save the artifact (``.pt2`` / ``.pt`` / ``.onnx`` by convention); parent folders are
            created. ``None``: do not save.
        mode: ``"masked"`` (the static fallback, default), ``"dense"`` (the base network, gates not
            evaluated) or ``"sparse"`` (real skipping: refused with :class:`UnsupportedExportError` for a model with
            dynamic blocks, whose compaction has data-dependent shapes; see the module docstring).
        dynamic_batch: keep the batch size symbolic (``torch_export`` and ``onnx``; a TorchScript trace
            of the masked graph has no batch-size-specific ops and accepts any N too).

    Returns:
        ``torch.export.ExportedProgram`` / ``torch.jit.ScriptModule`` / ``torch.onnx.ONNXProgram``.

    Raises:
        ValueError: unknown ``format`` or ``mode``; bad ``example`` (see ``check_input``).
        TypeError: ``model`` not a module; ``example`` not a floating-point tensor.
        UnsupportedExportError: the graph does not trace in that mode (the message gives the reason).
        ImportError: ``format="onnx"`` without ``onnx``/``onnxscript``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_model expects an nn.Module, got {type(model).__name__}")
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {format!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_input(example, getattr(model, "in_channels", None))
    if format == "onnx" and not onnx_available():
        raise ImportError("ONNX export needs the 'onnx' and 'onnxscript' packages: pip install onnx onnxscript")

    name = model.recipe if isinstance(model, DynamicModel) else type(model).__name__
    if mode == "sparse" and any(True for _ in dynamic_blocks(model)):
        # Refused up front: the trace fails on the data-dependent batch compaction, and torch logs hundreds of
        # lines of graph dumps on the way.
        raise UnsupportedExportError(f"cannot export {name!r} to {format} in sparse mode: {_SPARSE_HINT}")
    # A batch of 1 would be specialised (0/1 specialisation) and make the batch size static.
    x = example.detach()
    if dynamic_batch and x.shape[0] == 1:
        x = x.expand(2, *x.shape[1:]).contiguous()
    try:
        with _inference_state(model, mode):
            artifact = _EXPORTERS[format](model, x, dynamic_batch)
    except (ImportError, UnsupportedExportError):
        raise
    except Exception as err:  # torch raises many unrelated types here; name the cause in one error
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = "its forward does not trace (data-dependent control flow or Python-side state)"
        raise UnsupportedExportError(
            f"cannot export {name!r} to {format} in {mode} mode: {hint}. Cause: {type(err).__name__}: {first}"
        ) from err
    if path is not None:
        _save(artifact, format, Path(path))
    return artifact


def load_exported(path: str | os.PathLike[str]) -> Callable[[Tensor], Tensor]:
    """Load an artifact written by :func:`export_model` as a callable ``Tensor[N, C, H, W] -> logits``.

    The format comes from the suffix: ``.pt2`` (``torch.export.load``), ``.pt`` (``torch.jit.load``) or
    ``.onnx`` (an ONNX Runtime session, CPU provider).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown suffix, or the file is not a valid artifact of its format.
        ImportError: ``.onnx`` without ``onnxruntime``.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no exported model at {str(p)!r}")
    suffix = p.suffix.lower()
    try:
        if suffix == ".pt2":
            return torch.export.load(p).module()
        if suffix == ".pt":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                return torch.jit.load(str(p), map_location="cpu")
        if suffix == ".onnx":
            return _OnnxRuntimeModel(p)
    except ImportError:
        raise
    except Exception as err:
        raise ValueError(f"{str(p)!r} is not a valid {suffix} export ({type(err).__name__}: {err})") from err
    raise ValueError(f"unknown export suffix {suffix!r} of {str(p)!r}; expected one of .pt2, .pt, .onnx")


# -- implementation ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _inference_state(model: nn.Module, mode: str) -> Iterator[None]:
    """Eval mode and execution ``mode`` for the duration of the export; restores both afterwards.

    The model is switched in place rather than deep-copied: a copy doubles the memory of a large model, and a
    module whose forward closes over submodules (lambdas) would keep running the original's weights.
    """
    training = {m: m.training for m in model.modules()}
    modes = {b: b.mode for _, b in dynamic_blocks(model)}
    try:
        set_mode(model.eval(), mode)
        yield
    finally:
        for m, flag in training.items():
            m.training = flag
        for b, block_mode in modes.items():
            b.mode = block_mode


def _batch_dim(dynamic: bool) -> tuple[dict[int, Any], ...] | None:
    if not dynamic:
        return None
    return ({0: torch.export.Dim("batch", min=1)},)


def _export_program(model: nn.Module, x: Tensor, dynamic: bool) -> torch.export.ExportedProgram:
    return torch.export.export(model, (x,), dynamic_shapes=_batch_dim(dynamic))


def _export_torchscript(model: nn.Module, x: Tensor, dynamic: bool) -> torch.jit.ScriptModule:
    # The tracer warns on every Python bool taken from a tensor: here only shape checks of check_input,
    # which are constant for a given image size; the finite-values check is skipped (see module docstring).
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        # One eager pass fills the blocks' per-shape MAC caches: a cost probe (torch.func.functional_call)
        # cannot run inside the tracer.
        model(x)
        traced = torch.jit.trace(model, (x,), check_trace=False)
        traced(x)  # some traced graphs only fail when run (e.g. ops TorchScript cannot alias-analyse): fail here
        return traced


def _export_onnx(model: nn.Module, x: Tensor, dynamic: bool) -> Any:
    # torch.onnx prints its progress; keep the library quiet.
    import io

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(
            model,
            (x,),
            dynamo=True,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=_batch_dim(dynamic),
        )


_EXPORTERS: dict[str, Callable[[nn.Module, Tensor, bool], Any]] = {
    "torch_export": _export_program,
    "torchscript": _export_torchscript,
    "onnx": _export_onnx,
}


def _save(artifact: Any, format: str, path: Path) -> None:
    """Write to a temporary file next to ``path`` and rename it: a crash never leaves a half-written artifact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{_SUFFIX[format]}")
    try:
        if format == "torch_export":
            torch.export.save(artifact, tmp)
        elif format == "torchscript":
            artifact.save(str(tmp))
        else:
            artifact.save(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class _OnnxRuntimeModel:
    """An ONNX Runtime session called like a module: Tensor[N, C, H, W] → Tensor[N, K] logits."""

    def __init__(self, path: Path) -> None:
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise ImportError(
                "running an ONNX export needs the 'onnxruntime' package: pip install onnxruntime"
            ) from err
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a Tensor[N, C, H, W], got {type(x).__name__}")
        (logits, *_) = self.session.run(None, {self.input_name: x.detach().cpu().contiguous().numpy()})
        return torch.from_numpy(logits)
