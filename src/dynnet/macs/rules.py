"""MAC rules: a table from aten op to the number of multiply-accumulates it performs.

Conventions (the same as fvcore and ``torch.utils.flop_counter``):

* One MAC is one fused multiply-add. ``torch.utils.flop_counter`` counts two FLOPs per MAC, fvcore
  counts one "flop" per MAC, so ``MACs == FlopCounterMode total / 2 == fvcore conv/linear/matmul count``.
* Only the multiply-accumulates of convolutions, matrix products and attention are counted. Bias
  additions, BatchNorm, LayerNorm, activations, pooling, softmax, element-wise arithmetic, copies
  and views cost **0 MACs by convention** (see :data:`ZERO_COST_OPS`). At inference BatchNorm folds
  into the weights and bias of the preceding convolution, so charging it would double count.
* Forward ops only: there are no rules for ``*_backward`` ops, and :class:`~dynnet.macs.MacCounter`
  ignores everything the autograd engine runs during ``backward()``. MACs measure inference cost.

A rule is a pure function ``rule(args, kwargs, out) -> int`` that receives the op's raw arguments
(tensors, not shapes) and its output, and returns an exact integer. Extend the table with
:func:`register_mac_rule`::

    @register_mac_rule(torch.ops.mylib.fancy_mm)
    def _fancy_mm(args, kwargs, out):
        return args[0].shape[0] * args[0].shape[1] * args[1].shape[1]
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch._ops import OpOverload, OpOverloadPacket
from torch.utils import flop_counter

__all__ = ["MAC_RULES", "ZERO_COST_OPS", "MacRule", "attention_macs", "conv_macs", "is_zero_cost", "register_mac_rule"]

aten = torch.ops.aten

MacRule = Callable[[tuple[Any, ...], dict[str, Any], Any], int]
"""Signature of a rule: ``(args, kwargs, out) -> MACs``."""

MAC_RULES: dict[OpOverloadPacket, MacRule] = {}
"""The rule table, keyed by op packet (``torch.ops.aten.mm``, not ``torch.ops.aten.mm.default``)."""


def _packets(names: Iterable[str]) -> list[OpOverloadPacket]:
    """Resolves aten op names, skipping those this torch build does not have."""
    return [getattr(aten, name) for name in names if hasattr(aten, name)]


def register_mac_rule(*ops: OpOverloadPacket, override: bool = False) -> Callable[[MacRule], MacRule]:
    """Decorator registering ``rule`` as the MAC count of every op in ``ops``.

    Args:
        *ops: Op packets such as ``torch.ops.aten.mm`` or ``torch.ops.mylib.my_op``.
        override: Replace an existing rule instead of raising.

    Returns:
        A decorator that registers the rule and returns it unchanged.

    Raises:
        TypeError: If an op is not an ``OpOverloadPacket``.
        ValueError: If no op is given, or an op already has a rule and ``override`` is False.
    """
    if not ops:
        raise ValueError("register_mac_rule needs at least one op, e.g. register_mac_rule(torch.ops.aten.mm)")
    for op in ops:
        if not isinstance(op, OpOverloadPacket):
            hint = f" (use {op.overloadpacket} instead)" if isinstance(op, OpOverload) else ""
            raise TypeError(f"expected an op packet such as torch.ops.aten.mm, got {type(op).__name__} {op!r}{hint}")

    def decorator(rule: MacRule) -> MacRule:
        taken = [str(op) for op in ops if op in MAC_RULES]
        if taken and not override:
            raise ValueError(f"MAC rules already registered for {taken}; pass override=True to replace them")
        for op in ops:
            MAC_RULES[op] = rule
        return rule

    return decorator


# --- matrix products -------------------------------------------------------------------------------------------


def _matmul_macs(a: torch.Tensor, b: torch.Tensor) -> int:
    """MACs of ``a @ b`` for 1-D/2-D/3-D operands: every output element costs ``k`` MACs."""
    k = a.shape[-1]
    if b.shape[0 if b.dim() == 1 else -2] != k:
        raise ValueError(f"inner dimensions differ: {tuple(a.shape)} @ {tuple(b.shape)}")
    batch = a.shape[0] if a.dim() == 3 else 1
    m = a.shape[-2] if a.dim() >= 2 else 1
    n = b.shape[-1] if b.dim() >= 2 else 1
    return batch * m * n * k


@register_mac_rule(*_packets(["mm", "bmm", "mv", "dot", "vdot", "_scaled_mm", "_int_mm"]))
def _product_rule(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    return _matmul_macs(args[0], args[1])


@register_mac_rule(*_packets(["addmm", "_addmm_activation", "baddbmm", "addbmm", "addmv"]))
def _product_accumulate_rule(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    # ``self + mat1 @ mat2``: the addition of ``self`` is a bias, free by convention.
    return _matmul_macs(args[1], args[2])


@register_mac_rule(*_packets(["linear", "mkldnn_linear"]))
def _linear_rule(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    x, weight = args[0], args[1]
    return math.prod(x.shape[:-1]) * weight.numel()


# --- convolutions ----------------------------------------------------------------------------------------------


def conv_macs(x_shape: torch.Size, w_shape: torch.Size, out_shape: torch.Size, transposed: bool = False) -> int:
    """MACs of a (transposed) convolution, bias excluded.

    A regular convolution costs ``N * C_out * prod(out_spatial) * (C_in / groups) * prod(kernel)``; the weight
    ``Tensor[C_out, C_in / groups, *kernel]`` supplies every factor but ``N`` and the spatial size. A transposed
    convolution scatters every *input* position through the kernel, so it costs
    ``N * prod(in_spatial) * C_in * (C_out / groups) * prod(kernel)``, again ``N * prod(spatial) * weight.numel()``
    with the weight ``Tensor[C_in, C_out / groups, *kernel]``. Same formula as fvcore and flop_counter.

    Args:
        x_shape: Input shape ``[N, C_in, *spatial]``.
        w_shape: Weight shape.
        out_shape: Output shape ``[N, C_out, *spatial]``.
        transposed: Whether the convolution is transposed.

    Returns:
        The number of MACs.
    """
    spatial = (x_shape if transposed else out_shape)[2:]
    return x_shape[0] * math.prod(spatial) * math.prod(w_shape)


def _first_tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


@register_mac_rule(*_packets(["convolution", "_convolution", "convolution_overrideable"]))
def _convolution_rule(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    # (input, weight, bias, stride, padding, dilation, transposed, output_padding, groups, ...)
    transposed = args[6] if len(args) > 6 else kwargs["transposed"]
    return conv_macs(args[0].shape, args[1].shape, _first_tensor(out).shape, bool(transposed))


_BACKEND_CONVS = ["cudnn_convolution", "mkldnn_convolution", "miopen_convolution", "miopen_depthwise_convolution"]
_BACKEND_CONVS += ["_slow_conv2d_forward", "thnn_conv2d", "slow_conv3d_forward", "slow_conv_dilated2d"]
_BACKEND_CONVS += ["slow_conv_dilated3d", "_conv_depthwise2d", "conv_depthwise3d"]


@register_mac_rule(*_packets(_BACKEND_CONVS))
def _backend_convolution_rule(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    return conv_macs(args[0].shape, args[1].shape, _first_tensor(out).shape, transposed=False)


_BACKEND_TRANSPOSED_CONVS = ["cudnn_convolution_transpose", "miopen_convolution_transpose"]
_BACKEND_TRANSPOSED_CONVS += ["slow_conv_transpose2d", "slow_conv_transpose3d"]


@register_mac_rule(*_packets(_BACKEND_TRANSPOSED_CONVS))
def _backend_transposed_convolution_rule(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    return conv_macs(args[0].shape, args[1].shape, _first_tensor(out).shape, transposed=True)


# --- attention -------------------------------------------------------------------------------------------------


def attention_macs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> int:
    """MACs of ``softmax(q k^T) v`` for ``q: [B, Hq, L, E]``, ``k: [B, Hkv, S, E]``, ``v: [B, Hkv, S, Ev]``.

    ``q k^T`` costs ``B * Hq * L * S * E`` and ``p v`` costs ``B * Hq * L * S * Ev``; grouped-query attention
    broadcasts the ``Hkv`` heads. Causal or other masks do not reduce the count (an upper bound, as in
    flop_counter).
    """
    batch, heads, length, e = query.shape
    return batch * heads * length * key.shape[-2] * (e + value.shape[-1])


_SDPA_KERNELS = ["_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention"]
_SDPA_KERNELS += ["_scaled_dot_product_cudnn_attention", "_scaled_dot_product_fused_attention_overrideable"]
_SDPA_KERNELS += ["_scaled_dot_product_flash_attention_for_cpu"]


@register_mac_rule(*_packets(_SDPA_KERNELS))
def _sdpa_rule(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    return attention_macs(args[0], args[1], args[2])


def _flop_counter_rule(packet: OpOverloadPacket) -> MacRule:
    """Half of flop_counter's formula; used for kernels whose packed variable-length inputs it already unpacks."""

    def rule(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
        return flop_counter.flop_registry[packet](*args, out_val=out, **kwargs) // 2

    return rule


for _packet in _packets(["_flash_attention_forward", "_efficient_attention_forward"]):
    register_mac_rule(_packet)(_flop_counter_rule(_packet))


def _sequence_lengths(x: torch.Tensor) -> list[int]:
    """Per-sample lengths of a batch-first ``Tensor[B, L, E]``, dense or nested (padding removed)."""
    if x.is_nested:
        return [int(length) for length in x._nested_tensor_size()[:, 0].tolist()]
    return [x.shape[1]] * x.shape[0]


@register_mac_rule(*_packets(["_native_multi_head_attention"]))
def _multi_head_attention_rule(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    # The fused inference path of nn.MultiheadAttention: q/k/v projections, attention, output projection.
    query, key, embed_dim = args[0], args[1], args[3]
    macs = 0
    for lq, lk in zip(_sequence_lengths(query), _sequence_lengths(key), strict=True):
        macs += (lq + 2 * lk) * embed_dim * embed_dim + 2 * lq * lk * embed_dim + lq * embed_dim * embed_dim
    return macs


@register_mac_rule(*_packets(["_transformer_encoder_layer_fwd"]))
def _transformer_encoder_layer_rule(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    # The fused inference path of nn.TransformerEncoderLayer: every token goes through the qkv, output and
    # two feed-forward projections (weights at args 3, 5, 14, 16), plus attention over its sequence.
    src, embed_dim = args[0], args[1]
    per_token = sum(args[i].numel() for i in (3, 5, 14, 16))
    return sum(length * per_token + 2 * length * length * embed_dim for length in _sequence_lengths(src))


# --- ops that cost 0 MACs by convention ------------------------------------------------------------------------

_ZERO_COST_NAMES = """
    native_batch_norm _native_batch_norm_legit _native_batch_norm_legit_no_training _native_batch_norm_legit_functional
    _batch_norm_with_update _batch_norm_no_update cudnn_batch_norm miopen_batch_norm native_layer_norm
    native_group_norm _fused_rms_norm
    max_pool1d max_pool2d max_pool3d max_pool2d_with_indices max_pool3d_with_indices mkldnn_max_pool2d
    avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d
    _adaptive_avg_pool2d _adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d
    sum mean amax amin max min aminmax argmax argmin prod var var_mean std std_mean norm linalg_vector_norm
    logsumexp cumsum cumprod any all count_nonzero _softmax _log_softmax _safe_softmax
    hardswish hardswish_ _prelu_kernel glu log_sigmoid_forward
    native_dropout bernoulli bernoulli_ uniform_ normal_ normal rand randn rand_like randn_like randint randperm
    exponential_ multinomial
    clone copy copy_ _to_copy cat stack constant_pad_nd reflection_pad1d reflection_pad2d reflection_pad3d
    replication_pad1d replication_pad2d replication_pad3d empty empty_like empty_strided new_empty
    new_empty_strided new_zeros new_ones new_full zeros zeros_like ones ones_like full full_like fill fill_ zero_
    arange scalar_tensor lift_fresh_copy _unsafe_view set_ resize_ narrow_copy repeat repeat_interleave flip roll
    tril triu index index_select index_put index_put_ index_add index_add_ index_copy index_copy_ gather scatter
    scatter_ scatter_add scatter_add_ scatter_reduce masked_select masked_scatter nonzero sort topk kthvalue
    embedding one_hot _local_scalar_dense equal is_nonzero bucketize searchsorted _unique2 unique_dim
    _nested_tensor_from_mask _nested_tensor_from_mask_left_aligned _nested_tensor_from_tensor_list to_padded_tensor
    _nested_tensor_size
    upsample_nearest1d upsample_nearest2d upsample_nearest3d _upsample_nearest_exact1d _upsample_nearest_exact2d
    _upsample_nearest_exact3d upsample_linear1d upsample_bilinear2d upsample_bicubic2d upsample_trilinear3d
    _upsample_bilinear2d_aa _upsample_bicubic2d_aa pixel_shuffle pixel_unshuffle channel_shuffle
    native_channel_shuffle grid_sampler_2d grid_sampler_3d affine_grid_generator
    size stride sym_size sym_stride numel sym_numel dim is_contiguous storage_offset sym_storage_offset
    is_strides_like_format is_non_overlapping_and_dense
"""

ZERO_COST_OPS: set[OpOverloadPacket] = set(_packets(_ZERO_COST_NAMES.split()))
"""Ops with no rule that cost 0 MACs by convention: normalization, pooling, reductions, softmax, activations
without the ``pointwise`` tag, random numbers, copies, padding, indexing, resampling and metadata queries.
Add to it to silence :meth:`~dynnet.macs.MacCounter.uncounted_ops` for an op you deem free."""


@functools.cache
def _is_elementwise(func: OpOverload) -> bool:
    if torch.Tag.pointwise in func.tags:
        return True
    # Some in-place variants (masked_fill_, gelu_, ...) lack the tag that their out-of-place twin carries.
    name = func.overloadpacket.__name__
    if func.namespace != "aten" or not name.endswith("_") or not hasattr(aten, name[:-1]):
        return False
    twin = getattr(aten, name[:-1])
    return any(torch.Tag.pointwise in getattr(twin, overload).tags for overload in twin.overloads())


def is_zero_cost(func: OpOverload) -> bool:
    """Whether ``func`` costs 0 MACs by convention: element-wise, a view, or in :data:`ZERO_COST_OPS`.

    Element-wise ops are recognized by the ``torch.Tag.pointwise`` tag (of the op or of its out-of-place twin)
    and views by their aliasing schema.
    """
    return (
        func.overloadpacket in ZERO_COST_OPS
        or func.is_view
        or torch.Tag.inplace_view in func.tags
        or _is_elementwise(func)
    )
