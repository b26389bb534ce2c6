"""Channel-sliced execution of a conv → ReLU → conv pair whose inner channels are gated per input.

A residual block's inner channels (the outputs of ``conv1``, the inputs of ``conv2``) can be switched off per
input without changing the block's output width. For a sample whose kept inner channels are ``S`` (|S| = k of C)
the kernels below run

    ``y = conv2(relu(conv1(x; W1[S], b1[S])) * scale[S]; W2[:, S]) + b2``

i.e. ``conv1`` computes only the kept output channels and ``conv2`` reads only the kept input channels: both cost
``k / C`` of their dense MACs and nothing is computed for the gated-off channels. Batch norms are folded into the
convolutions first (:func:`fold_bn`, inference only), so slicing the folded weight slices the normalisation
consistently.

Strategies for a batch (each returns the same values; they differ in speed and in executed MACs):

* ``"dense"``  — every channel of every sample is on: the plain convolutions (the all-on fast path);
* ``"groups"`` — samples with identical masks are gathered and run with one weight slice per distinct mask
  (executed MACs = theoretical MACs). Best when masks repeat (nested widths, RNP, batch 1);
* ``"padded"`` — one grouped convolution (``groups = N``) with every sample's own weight slice, padded to the
  largest kept count ``k_max`` of the batch (executed MACs = ``k_max`` per sample; exact when all samples keep
  the same number of channels, as k-winners-take-all does);
* ``"per_sample"`` — a loop over samples (executed = theoretical; the reference for the other two);
* ``"auto"`` — ``dense`` when everything is on, otherwise ``groups`` when there are few distinct masks
  (at most ``max(1, N // 8)``), otherwise ``padded``: on the shared 2-core CPU of
  ``benchmarks/channel_strategies.py`` (very noisy timings) one padded grouped convolution beat a loop over
  ~N distinct masks by 3-10× at batch 64, even with 30-40 % padding waste. Then, in :func:`sliced_pair`, that
  choice is timed once against ``dense`` for the shape, batch and density (:mod:`dynnet.kernels.autotune`) and the
  faster runs: a padded convolution over most of the channels loses to the dense one (FBS at 0.75 of the MACs ran
  ×0.58 of dense speed at batch 64 in the standard profile). ``executed`` says which ran.

All functions are pure: per-batch masks are arguments, never module state.

Layout (imports go one way, each module only to those listed before it):

* ``_spec`` — :class:`ConvSpec` and :func:`fold_bn` (pure PyTorch);
* ``_compiled`` — the compiled batch-1 kernels' operand checks, ops and MAC rules, :func:`native_conv3x3_in`,
  :func:`native_pair_usable`, :func:`block_pair_macs`;
* ``_sliced`` — the strategies above: :func:`sliced_pair`, :func:`sliced_pair_single`, :func:`sliced_conv_in`;
* ``_gated`` — the gate inside the compiled call: :class:`NativeGate`, the gate kinds (``GATE_*``),
  :func:`gated_pair_single`, :func:`gated_pair_plan`;
* ``_inverted`` — an inverted residual's gated expansion (expand → depthwise → project):
  :class:`ExpandedConvs`, :class:`SqueezeExcite`, :func:`sliced_expanded`, :func:`expanded_reference`;
* ``_mlp`` — a token MLP's gated hidden channels (ConvNeXt): :func:`sliced_mlp`, :func:`mlp_reference`;
* ``_partial_sum`` — partial-sum gating (channel gating): :func:`gated_rest_add_`, :func:`tile_gated_pair_op`.

This package is the public interface: import from ``dynnet.kernels.channel``, not from its modules.
"""

from dynnet.kernels.channel._compiled import block_pair_macs, native_conv3x3_in, native_pair_usable
from dynnet.kernels.channel._gated import (
    GATE_GIVEN,
    GATE_INSTANCE,
    GATE_KWTA,
    GATE_MLP,
    NativeGate,
    gated_pair_plan,
    gated_pair_single,
)
from dynnet.kernels.channel._inverted import ExpandedConvs, SqueezeExcite, expanded_reference, sliced_expanded
from dynnet.kernels.channel._mlp import mlp_reference, sliced_mlp
from dynnet.kernels.channel._partial_sum import (
    TILE,
    gated_rest_add_,
    gated_rest_conv,
    tile_gated_pair_macs,
    tile_gated_pair_op,
    tile_gated_pair_reference,
    tile_gated_rest_add_,
    tiles_on,
    upsample_tiles,
)
from dynnet.kernels.channel._sliced import (
    STRATEGIES,
    choose_strategy,
    gated_pair_reference,
    sliced_conv_in,
    sliced_pair,
    sliced_pair_single,
)
from dynnet.kernels.channel._spec import ConvSpec, fold_bn

__all__ = [
    "GATE_GIVEN",
    "GATE_INSTANCE",
    "GATE_KWTA",
    "GATE_MLP",
    "STRATEGIES",
    "TILE",
    "ConvSpec",
    "ExpandedConvs",
    "NativeGate",
    "SqueezeExcite",
    "block_pair_macs",
    "choose_strategy",
    "expanded_reference",
    "fold_bn",
    "gated_pair_plan",
    "gated_pair_reference",
    "gated_pair_single",
    "gated_rest_add_",
    "gated_rest_conv",
    "mlp_reference",
    "native_conv3x3_in",
    "native_pair_usable",
    "sliced_conv_in",
    "sliced_expanded",
    "sliced_mlp",
    "sliced_pair",
    "sliced_pair_single",
    "tile_gated_pair_macs",
    "tile_gated_pair_op",
    "tile_gated_pair_reference",
    "tile_gated_rest_add_",
    "tiles_on",
    "upsample_tiles",
]
