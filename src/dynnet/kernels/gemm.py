"""The GEMM of the pixel engine's gather paths: ``Tensor[P, K] × Tensor[K, C_out]`` on oneDNN's matmul.

A convolution's weight becomes a matrix in the order of the gathered rows (:func:`weight_matrix`, cached per
parameter by :func:`cached_weight_matrix`); :func:`matmul_rows` multiplies gathered rows by it with oneDNN's matmul
(its weight prepacked for a matrix seen again, :func:`packed_weight`) where it may (:func:`onednn_usable`), else
with ``addmm``. Importing this module registers the MAC rule of oneDNN's matmul (``rows · |weight|``).
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor

__all__ = ["cached_weight_matrix", "matmul_rows", "onednn_usable", "packed_weight", "plain_cpu", "weight_matrix"]

_HAS_ONEDNN_LINEAR = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
)


def _register_onednn_mac_rule() -> None:
    """The MAC counter sees oneDNN's matmul as a linear layer: ``rows · |weight|`` MACs."""
    from dynnet.macs import MAC_RULES, register_mac_rule

    if not _HAS_ONEDNN_LINEAR or torch.ops.mkldnn._linear_pointwise in MAC_RULES:
        return

    @register_mac_rule(torch.ops.mkldnn._linear_pointwise)
    def _onednn_linear_rule(args: tuple, kwargs: dict, out: object) -> int:
        x, weight = args[0], args[1]
        return math.prod(x.shape[:-1]) * weight.numel()


_register_onednn_mac_rule()


def weight_matrix(weight: Tensor) -> Tensor:
    """Tensor[C_out, C_in, k, k] → Tensor[k·k·C_in, C_out] in the (kh, kw, c) order of the gathered rows.

    The result is the transpose of a contiguous Tensor[C_out, k·k·C_in], the layout :func:`matmul_rows` wants.
    """
    c_out = weight.shape[0]
    return weight.permute(0, 2, 3, 1).reshape(c_out, -1).contiguous().t()


def onednn_usable(*tensors: Tensor | None) -> bool:
    """Whether :func:`matmul_rows` may call oneDNN: float32 CPU tensors, and no gradient to record."""
    if not _HAS_ONEDNN_LINEAR:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if not plain_cpu(t) or t.dtype != torch.float32 or (grad and t.requires_grad):
            return False
    return True


def plain_cpu(t: Tensor) -> bool:
    """A dense CPU tensor of a plain class (not a fake, functional or other tensor subclass)."""
    return t.device.type == "cpu" and t.layout == torch.strided and type(t) in (torch.Tensor, torch.nn.Parameter)


def matmul_rows(cols: Tensor, wmat: Tensor, bias: Tensor | None = None) -> Tensor:
    """``cols @ wmat + bias``: Tensor[P, K] × Tensor[K, C_out] → Tensor[P, C_out] (``P·K·C_out`` MACs).

    On CPU (float32, inference) this runs oneDNN's matmul (``mkldnn::_linear_pointwise``, the kernel behind
    inductor's frozen linear layers): for the skinny GEMMs of the gather path it is about twice as fast as
    the BLAS behind ``torch.addmm`` here, and as fast per MAC as oneDNN's dense convolution, which is what
    the sparse path is compared against. Elsewhere (autograd, other dtypes or devices) it is ``addmm``.
    Pass ``wmat`` as the transpose of a contiguous Tensor[C_out, K] (as :func:`weight_matrix` returns it) to
    avoid a copy of the weight.
    """
    if cols.shape[0] and onednn_usable(cols, wmat, bias):
        weight = packed_weight(wmat)
        return torch.ops.mkldnn._linear_pointwise(cols.contiguous(), weight, bias, "none", [], "")
    return torch.mm(cols, wmat) if bias is None else torch.addmm(bias, cols, wmat)


_PACKED: dict[int, tuple[weakref.ref, tuple[int, ...], Tensor | None]] = {}


def packed_weight(wmat: Tensor) -> Tensor:
    """The Tensor[C_out, K] weight of oneDNN's matmul for ``wmat``; in oneDNN's blocked layout (about 5–10 %
    faster) for a matrix seen a second time (a layer's cached matrix), plain for one-off matrices.

    Keyed on the tensor itself through a weak reference and checked against its version counter, storage
    pointer and shape (in-place edits repack it).
    """
    if wmat.is_inference():  # no version counter to key a cache on: a one-off matrix
        return wmat.t().contiguous()
    key = id(wmat)
    stamp = (wmat._version, wmat.data_ptr(), *wmat.shape)
    hit = _PACKED.get(key)
    if hit is not None and hit[0]() is wmat and hit[1] == stamp:
        if hit[2] is None:
            with torch.inference_mode(False):
                packed = torch.ops.mkldnn._reorder_linear_weight(wmat.t().contiguous())
            _PACKED[key] = (hit[0], stamp, packed)
            return packed
        return hit[2]
    _PACKED[key] = (weakref.ref(wmat, lambda _, k=key: _PACKED.pop(k, None)), stamp, None)
    return wmat.t().contiguous()


_WEIGHT_MATRICES: dict[int, tuple[weakref.ref, tuple[int, ...], Tensor]] = {}


def cached_weight_matrix(weight: Tensor) -> Tensor:
    """:func:`weight_matrix` of a weight used again and again (a layer's parameter), computed once.

    The entry is keyed on the tensor itself (a weak reference: it dies with the tensor) and checked against
    its version counter, storage pointer and shape, so in-place edits and ``.data`` swaps recompute it. A
    weight that needs a gradient is never cached (the matrix must stay on the autograd graph).
    """
    if (torch.is_grad_enabled() and weight.requires_grad) or not plain_cpu(weight) or weight.is_inference():
        return weight_matrix(weight)
    key = id(weight)
    stamp = (weight._version, weight.data_ptr(), *weight.shape)
    hit = _WEIGHT_MATRICES.get(key)
    if hit is not None and hit[0]() is weight and hit[1] == stamp:
        return hit[2]
    with torch.inference_mode(False):
        wmat = weight_matrix(weight.detach())
    _WEIGHT_MATRICES[key] = (weakref.ref(weight, lambda _, k=key: _WEIGHT_MATRICES.pop(k, None)), stamp, wmat)
    return wmat
