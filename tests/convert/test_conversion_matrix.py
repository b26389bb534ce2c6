"""The conversion matrix: deployed networks × recipes (``dynnet.testing.matrix``; docs/conversion.md).

The fast part converts one network of every newly supported structure with one recipe of every family that applies
and runs the cell checks (open gates reproduce a trained-like base in masked and sparse mode, sparse = masked after
scrambling, dense MACs = the flop counter's), and checks the one-line refusals. The whole matrix is ``slow``.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

import dynnet
from dynnet.testing.matrix import build_model, check_cell, matrix_models, run_matrix, trained_like_

try:
    import timm  # noqa: F401

    HAS_TIMM = True
except ImportError:
    HAS_TIMM = False


@functools.lru_cache(maxsize=4)
def _base(name: str) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trained_like_(build_model(name), torch.Generator().manual_seed(0))


FAST_CELLS = [
    ("torchvision/mobilenet_v2", "convnet_aig"),  # InvertedResidual (only where use_res_connect), ReLU6
    ("torchvision/mobilenet_v3_large", "skipnet"),  # InvertedResidual with squeeze-excitation; a layout run
    ("torchvision/efficientnet_b0", "sparse_moe"),  # MBConv with stochastic depth: experts for the branch
    ("torchvision/regnet_y_400mf", "blockdrop"),  # ResBottleneckBlock (projection, SE), a policy over the blocks
    ("torchvision/convnext_tiny", "dynamic_recursive"),  # CNBlock: x + layer_scale * branch(x)
    ("torchvision/vgg11_bn", "branchynet"),  # a plain network: exits only
    ("torchvision/efficientnet_b0", "early_exit_cnn"),  # exits after any block
    ("torchvision/mobilenet_v2", "sbnet"),  # tiles through a depthwise stage (groups = channels)
    ("torchvision/mobilenet_v2", "dynconv"),  # pixels through a depthwise stage, gathered channel by channel
    ("torchvision/mobilenet_v3_large", "visual_attention_action"),  # a hidden Linear before the classifier
    ("torchvision/mobilenet_v3_large", "fbs"),  # expanded channels sliced through the squeeze-excitation
    ("torchvision/efficientnet_b0", "dynamic_channel_exec"),  # the same in MBConv (SiLU, sigmoid gate, drop path)
    ("torchvision/efficientnet_b0", "act"),  # halting over a stage after its transition block (no shortcut)
    ("torchvision/convnext_tiny", "batch_shaping"),  # the MLP's hidden channels, token by token
    ("torchvision/efficientnet_b0", "dynconv"),  # pixels through MBConv: the squeeze-excitation on the masked map
]

REFUSED = [
    ("torchvision/vgg11_bn", "convnet_aig", "no residual blocks found in VGG"),
    ("torchvision/mobilenet_v2", "perforated_cnn", "InvertedResidual"),  # its perforated kernels: groups=1 only
    ("torchvision/convnext_tiny", "sbnet", "CNBlock"),
    ("torchvision/vgg11_bn", "lsts", "16x16-pixel patch is too small"),  # five poolings take 16 pixels below 1
    ("torchvision/efficientnet_b0", "instance_sparsity", "squeeze-excitation"),  # it pools the unread channels
]


@pytest.mark.parametrize(("model", "recipe"), FAST_CELLS)
def test_a_new_structure_converts_and_keeps_the_contract(model: str, recipe: str) -> None:
    cell = check_cell(model, recipe, base=_base(model))
    assert cell.converted, cell.reason
    assert cell.dynamic_blocks > 0 or dynnet.core.RECIPES.get(recipe).family == "early_exit"
    assert not cell.reason, cell.reason
    assert "sparse=masked" in cell.checks


@pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed")
def test_timm_efficientnet_converts_and_keeps_the_contract() -> None:
    cell = check_cell("timm/efficientnet_b0", "convnet_aig", base=_base("timm/efficientnet_b0"))
    assert cell.converted and not cell.reason, cell.reason


@pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed")
@pytest.mark.parametrize(
    ("model", "recipe"),
    [
        ("timm/resnet18", "fbs"),  # timm's BasicBlock (act1, act2; DropBlock and anti-aliasing the identity)
        ("timm/resnet18", "channel_gating"),  # its own gated convolutions, the activation named act1
        ("timm/resnet50", "rnp"),  # timm's Bottleneck, the stem's act1 and the head's global_pool
        ("timm/mobilenetv3_large_100", "batch_shaping"),  # BatchNormAct2d, SqueezeExcite, a DepthwiseSeparableConv
    ],
)
def test_the_channel_family_gates_timm_resnets(model: str, recipe: str) -> None:
    cell = check_cell(model, recipe, base=_base(model))
    assert cell.converted and not cell.reason, cell.reason
    assert cell.dynamic_blocks > 0 and "sparse=masked" in cell.checks


@pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed")
def test_a_timm_block_with_squeeze_excitation_is_refused_by_the_channel_family() -> None:
    import timm

    net = timm.create_model("seresnet18", num_classes=10)
    with pytest.raises(ValueError, match="squeeze-excitation"):
        dynnet.convert(net, "fbs")


@pytest.mark.parametrize(("model", "recipe", "names"), REFUSED)
def test_an_unsupported_pair_is_refused_in_one_line(model: str, recipe: str, names: str) -> None:
    cell = check_cell(model, recipe, base=_base(model), deep=False)
    assert not cell.converted
    assert "\n" not in cell.reason and names in cell.reason
    assert "supported" in cell.reason or "needs" in cell.reason  # names what is supported


def test_a_layer_skip_recipe_on_vgg_says_what_applies() -> None:
    with pytest.raises(ValueError, match="early exits only"):
        dynnet.convert(build_model("torchvision/vgg11_bn"), "skipnet")


def test_convnext_layer_scale_stays_a_parameter_of_the_converted_model() -> None:
    model = dynnet.convert(build_model("torchvision/convnext_tiny"), "convnet_aig")
    names = {n for n, _ in model.named_parameters()}
    assert "net.features.1.0.layer_scale" in names
    assert "net.features.1.0.layer_scale" in model.state_dict()


# Cells whose checks fail today, and why (docs/conversion.md lists them too); the whole-matrix test fails on any other.
# "Not mixed": no scrambling made the decisions differ across the noise inputs (their per-sample scale and offset,
# which LayerNorm and whole-image glimpses normalise away); whether a cell mixes depends on the new parts' seed.
_NOT_MIXED = "scrambled decisions never differ across the noise inputs"
_CHAOTIC = (
    "scrambled halting on the trained-like EfficientNetV2-S (40 blocks) lets activations grow until float32 rounding "
    "flips a halting decision between masked and sparse mode"
)
# FBS's saliency g = relu(W mean|x| + b) grows with its block's input and multiplies the block's output: random
# predictors square the activations block after block (g max 3 → 2e4 → inf over 16 Bottlenecks, also with weights 4x
# smaller); untested with trained predictors.
_FBS_FEEDBACK = (
    "scrambled FBS saliencies overflow a 16-Bottleneck ResNet-50 or a 16-MBConv EfficientNet-B0 to inf (saliency grows "
    "with the input; in float64 sparse and masked mode agree)"
)
KNOWN_FAILURES: dict[tuple[str, str], str] = {
    ("torchvision/resnet50", "fbs"): _FBS_FEEDBACK,
    ("torchvision/efficientnet_b0", "fbs"): _FBS_FEEDBACK,
    ("timm/efficientnet_b0", "fbs"): _FBS_FEEDBACK,
    ("torchvision/wide_resnet50_2", "fbs"): _FBS_FEEDBACK,
    ("timm/resnet50", "fbs"): _FBS_FEEDBACK,
    ("torchvision/mobilenet_v2", "branchynet"): _NOT_MIXED,
    ("torchvision/resnet50", "branchynet"): _NOT_MIXED,
    ("timm/resnet50", "branchynet"): _NOT_MIXED,
    ("torchvision/convnext_tiny", "branchynet"): _NOT_MIXED,
    ("torchvision/convnext_tiny", "dynexit"): _NOT_MIXED,
    ("torchvision/convnext_tiny", "triple_wins"): _NOT_MIXED,
    ("torchvision/efficientnet_b0", "gfnet"): _NOT_MIXED,
    ("torchvision/regnet_y_400mf", "gfnet"): _NOT_MIXED,
    ("torchvision/mobilenet_v3_large", "gfnet"): _NOT_MIXED,
    ("timm/mobilenetv3_large_100", "gfnet"): _NOT_MIXED,
    ("torchvision/efficientnet_b0", "network_selection"): _NOT_MIXED,
    ("torchvision/mobilenet_v3_large", "network_selection"): _NOT_MIXED,
    ("timm/efficientnet_b0", "network_selection"): _NOT_MIXED,
    ("torchvision/efficientnet_v2_s", "network_selection"): _NOT_MIXED,
    ("torchvision/efficientnet_v2_s", "dynamic_recursive"): _CHAOTIC,
}


@pytest.mark.slow
@pytest.mark.parametrize("model", matrix_models())
def test_the_whole_matrix(model: str) -> None:
    failures = []
    for cell in run_matrix([model], dynnet.list_recipes()):  # a check that crashes is a failed cell
        if not cell.ok and (model, cell.recipe) not in KNOWN_FAILURES:
            failures.append(f"{cell.recipe}: {cell.reason or 'refused without a reason'}")
    assert not failures, failures
