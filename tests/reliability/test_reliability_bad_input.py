"""Bad input to the public API: a correct result or a clear dynnet error, never a crash deep inside torch.

"Clear" means: a ``ValueError`` / ``TypeError`` / ``KeyError`` (or a subclass: ``UnknownNameError``,
``DatasetNotFoundError``) raised from dynnet's own code, whose message names the problem.
"""

from __future__ import annotations

import math
import traceback

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import dynnet
from dynnet.core import UnknownNameError
from dynnet.data import DATASETS, DatasetNotFoundError, build_loaders

FUZZ = settings(
    max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# FileNotFoundError: for missing files (DatasetNotFoundError subclasses it), as the standard library does.
CLEAR = (ValueError, TypeError, KeyError, FileNotFoundError)


def assert_clear(err: BaseException, *words: str) -> None:
    """``err`` is a clear error: the right type, raised in dynnet's code, its message naming ``words``."""
    assert isinstance(err, CLEAR), f"{type(err).__name__}: {err}"
    frames = traceback.extract_tb(err.__traceback__)
    assert "dynnet" in frames[-1].filename.replace("\\", "/").split("/"), (
        f"raised inside {frames[-1].filename}:{frames[-1].lineno}, not by dynnet: {type(err).__name__}: {err}"
    )
    for w in words:
        assert w.lower() in str(err).lower(), f"{w!r} not in {str(err)!r}"


def raises_clear(fn, *words: str) -> BaseException:
    try:
        fn()
    except Exception as err:
        assert_clear(err, *words)
        return err
    raise AssertionError(f"no error raised; expected one naming {words}")


@pytest.fixture(scope="module")
def model() -> dynnet.DynamicModel:
    torch.manual_seed(0)
    return dynnet.create_model("cifar_resnet8", recipe="convnet_aig", in_channels=1, width=0.25).eval()


# -- forward: shapes, values, dtypes, memory formats -----------------------------------------------------------------
@FUZZ
@given(shape=st.lists(st.integers(0, 5), min_size=0, max_size=6), channels_ok=st.booleans())
def test_forward_any_shape(model: dynnet.DynamicModel, shape: list[int], channels_ok: bool) -> None:
    if channels_ok and len(shape) >= 2:
        shape[1] = 1
    if len(shape) == 4 and shape[1] == 1 and shape[0] >= 1:
        assume(shape[2] >= 1 and shape[3] >= 1)  # zero-size images: test_zero_size_image below
    x = torch.randn(shape)
    if len(shape) != 4:
        raises_clear(lambda: model(x), "Tensor[N, C, H, W]", "4 dims")
    elif shape[1] != 1:
        raises_clear(lambda: model(x), "expects 1 input channels", f"got {shape[1]}")
    elif shape[0] == 0:
        raises_clear(lambda: model(x), "empty batch")
    else:
        with torch.no_grad():
            y = model(x)
        assert y.shape == (shape[0], 10) and torch.isfinite(y).all()


@pytest.mark.parametrize("hw", [(0, 0), (0, 5), (7, 0)])
def test_zero_size_image(model: dynnet.DynamicModel, hw: tuple[int, int]) -> None:
    raises_clear(lambda: model(torch.randn(2, 1, *hw)), "empty image")


@FUZZ
@given(n=st.integers(1, 4), pos=st.tuples(st.integers(0, 3), st.integers(0, 27), st.integers(0, 27)),
       bad=st.sampled_from([math.nan, math.inf, -math.inf]))  # fmt: skip
def test_forward_non_finite_values(model: dynnet.DynamicModel, n: int, pos: tuple[int, int, int], bad: float) -> None:
    x = torch.randn(n, 1, 28, 28)
    x[pos[0] % n, 0, pos[1], pos[2]] = bad
    raises_clear(lambda: model(x), "NaN or Inf")


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.complex64])
def test_forward_non_float_dtypes(model: dynnet.DynamicModel, dtype: torch.dtype) -> None:
    raises_clear(lambda: model(torch.zeros(2, 1, 28, 28, dtype=dtype)), "floating-point", str(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_forward_precision_mismatch_is_a_clear_error(model: dynnet.DynamicModel, dtype: torch.dtype) -> None:
    raises_clear(lambda: model(torch.randn(2, 1, 28, 28, dtype=dtype)), "weights are torch.float32", str(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_runs_half_input(dtype: torch.dtype) -> None:
    """A model converted to half precision takes half inputs, in masked and sparse mode, close to float32."""
    torch.manual_seed(0)
    model = dynnet.create_model("cifar_resnet8", recipe="convnet_aig", in_channels=1, width=0.5).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
        model.to(dtype)
        masked = model(x.to(dtype))
        sparse_out = dynnet.sparse(model)(x.to(dtype))
    assert masked.dtype == dtype
    torch.testing.assert_close(sparse_out, masked)
    torch.testing.assert_close(masked.float(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


def test_autocast_bfloat16_runs_a_float32_model(model: dynnet.DynamicModel) -> None:
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


@settings(FUZZ, max_examples=6)
@given(n=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_channels_last_and_batch_of_one_give_the_same_answer(model: dynnet.DynamicModel, n: int, seed: int) -> None:
    x = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed)) * (1 + seed % 3)
    with torch.no_grad():
        for mode in ("masked", "sparse"):
            dynnet.set_mode(model, mode)
            y = model(x)
            torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), y, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(model(x[-1:]), y[-1:], rtol=1e-4, atol=1e-4)
    dynnet.set_mode(model, "masked")


def test_training_batch_of_one() -> None:
    model = dynnet.create_model("cifar_resnet8", recipe="convnet_aig", in_channels=1, width=0.25).train()
    with dynnet.trace() as t:
        logits = model(torch.randn(1, 1, 28, 28))
    model.compute_loss(logits, torch.tensor([3]), t).total.backward()
    assert logits.shape == (1, 10)


# -- budgets and recipe settings -------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [0, 0.0, -0.5, 1.0001, 7, math.nan, math.inf, -math.inf, "0.5", [0.5]])
def test_bad_budget(budget: object) -> None:
    raises_clear(lambda: dynnet.create_model("cifar_resnet8", recipe="convnet_aig", budget=budget), "budget")


@pytest.mark.parametrize("budget", [1, 1.0, 0.05, 0.5])  # 0.05: the low end of ConvNet-AIG's declared range
def test_budget_edges_are_accepted(budget: float) -> None:
    model = dynnet.create_model("cifar_resnet8", recipe="convnet_aig", budget=budget)
    assert model.budget == budget


def test_bool_budget_is_rejected() -> None:
    raises_clear(lambda: dynnet.create_model("cifar_resnet8", recipe="convnet_aig", budget=True), "budget", "True")


@pytest.mark.parametrize("budget", [0.0, 3.0, math.nan])
def test_bad_budget_in_compute_loss(model: dynnet.DynamicModel, budget: float) -> None:
    x = torch.randn(2, 1, 28, 28)
    with dynnet.trace() as t:
        logits = model(x)
    raises_clear(lambda: model.compute_loss(logits, torch.tensor([0, 1]), t, budget=budget), "budget")


@pytest.mark.parametrize(
    ("setting", "value"),
    [("hidden", 0), ("hidden", -3), ("hidden", 2.5), ("hidden", "16"), ("tau", 0.0), ("tau", "x"),
     ("rate_weight", math.nan), ("rate_weight", -1.0)],
)  # fmt: skip
def test_bad_recipe_setting(setting: str, value: object) -> None:
    raises_clear(lambda: dynnet.create_model("cifar_resnet8", recipe="convnet_aig", **{setting: value}), setting)


def test_unknown_recipe_setting_lists_the_known_ones() -> None:
    raises_clear(lambda: dynnet.create_model("cifar_resnet8", recipe="convnet_aig", hiden=3), "hiden", "settings")
    raises_clear(lambda: dynnet.convert(dynnet.create_model("cifar_resnet8"), "convnet_aig", hiden=3), "hiden")


def test_bad_mode_and_tau(model: dynnet.DynamicModel) -> None:
    raises_clear(lambda: dynnet.set_mode(model, "fast"), "mode must be one of")
    for tau in (0.0, -1.0, math.nan):
        raises_clear(lambda tau=tau: dynnet.set_tau(model, tau), "tau must be positive")
    for tau in ("x", "0.5", None, True, [1.0]):
        err = raises_clear(lambda tau=tau: dynnet.set_tau(model, tau), "tau must be a positive number")
        assert isinstance(err, TypeError)


def test_setting_the_budget_of_a_converted_model_says_what_to_do(model: dynnet.DynamicModel) -> None:
    hint = r"fixed at conversion.*dynnet\.calibrate\(model, data, 0\.2\).*budget=0\.2"
    with pytest.raises(AttributeError, match=hint):
        model.budget = 0.2
    assert model.budget == 0.5
    raises_clear(lambda: setattr(model, "budget", 1.5), "budget 1.5 is outside", "convnet_aig")
    raises_clear(lambda: setattr(model, "budget", "low"), "budget must be a number")


@pytest.mark.parametrize("recipe", ["convnet_aig", "branchynet", "fbs"])
def test_compute_loss_without_a_trace(recipe: str) -> None:
    from dynnet.testing import build_recipe_pair

    _, converted = build_recipe_pair(recipe)
    logits, target = torch.zeros(2, 10), torch.tensor([1, 2])
    for t in (None, {}):
        err = raises_clear(lambda t=t: converted.compute_loss(logits, target, t), "dynnet.trace()", "compute_loss")
        assert isinstance(err, TypeError)
    raises_clear(lambda: converted.compute_loss(logits, target, t=None), "dynnet.trace()")


# -- names -----------------------------------------------------------------------------------------------------------
@FUZZ
@given(name=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_/0123456789ABC-", max_size=16))
def test_unknown_names(name: str) -> None:
    assume(name not in dynnet.list_recipes() and name not in DATASETS)
    err = raises_clear(lambda: dynnet.create_model("cifar_resnet8", recipe=name), "unknown recipe")
    assert isinstance(err, UnknownNameError) and "convnet_aig" in str(err)
    err = raises_clear(lambda: dynnet.convert(torch.nn.Identity(), name), "unknown recipe")
    assert isinstance(err, UnknownNameError)
    err = raises_clear(lambda: build_loaders(name), "unknown dataset")
    assert isinstance(err, UnknownNameError) and "fashion_mnist" in str(err)


@pytest.mark.parametrize("name", ["nope_net", "CIFAR_RESNET8", "", "timm/", "timm/nope_net"])
def test_unknown_model_names(name: str) -> None:
    assert isinstance(raises_clear(lambda: dynnet.create_model(name), "unknown", "model"), UnknownNameError)


@pytest.mark.parametrize("name", [None, 5, ["cifar_resnet8"]])
def test_model_name_that_is_not_a_string(name: object) -> None:
    raises_clear(lambda: dynnet.create_model(name), "name must be a str")


def test_recipe_name_that_is_not_a_string() -> None:
    raises_clear(lambda: dynnet.create_model("cifar_resnet8", recipe=["convnet_aig"]), "name must be a str")


@pytest.mark.parametrize(("key", "value"), [("num_classes", 0), ("num_classes", -1), ("num_classes", "10"),
                                            ("in_channels", 0)])  # fmt: skip
def test_bad_model_arguments(key: str, value: object) -> None:
    raises_clear(lambda: dynnet.create_model("cifar_resnet8", **{key: value}), key)


def test_bad_width_and_unknown_model_argument() -> None:
    raises_clear(lambda: dynnet.create_model("cifar_resnet8", width=0), "width must be positive")
    raises_clear(lambda: dynnet.create_model("cifar_resnet8", recipe="convnet_aig", colour=1), "colour")


# -- convert ---------------------------------------------------------------------------------------------------------
def test_convert_bad_model_and_targets() -> None:
    base = dynnet.create_model("cifar_resnet8")
    raises_clear(lambda: dynnet.convert("cifar_resnet8", "convnet_aig"), "nn.Module")
    raises_clear(lambda: dynnet.convert(base, "convnet_aig", targets=["layer9.9"]), "not a submodule")
    raises_clear(lambda: dynnet.convert(base, "convnet_aig", targets=["layer1.0.conv1"]), "not a residual block")
    raises_clear(lambda: dynnet.convert(torch.nn.Conv2d(3, 3, 3), "convnet_aig"), "no residual blocks")
    raises_clear(lambda: dynnet.convert(base, "convnet_aig", targets=[]), "no residual blocks")


@pytest.mark.parametrize("targets", [5, b"layer1.0", [1, 2]])
def test_convert_targets_of_a_wrong_type(targets: object) -> None:
    base = dynnet.create_model("cifar_resnet8")
    raises_clear(lambda: dynnet.convert(base, "convnet_aig", targets=targets), "targets must be")


def test_convert_an_already_converted_model() -> None:
    model = dynnet.create_model("cifar_resnet8", recipe="convnet_aig")
    raises_clear(lambda: dynnet.convert(model, "convnet_aig"), "already converted")


# -- count_macs ------------------------------------------------------------------------------------------------------
def test_count_macs_bad_input(model: dynnet.DynamicModel) -> None:
    raises_clear(lambda: dynnet.count_macs(model, [1.0]), "non-empty batch tensor")
    raises_clear(lambda: dynnet.count_macs(model, torch.tensor(1.0)), "non-empty batch tensor")
    raises_clear(lambda: dynnet.count_macs(model, torch.randn(0, 1, 28, 28)), "non-empty batch tensor")
    raises_clear(lambda: dynnet.count_macs(model, torch.randn(2, 3, 28, 28)), "expects 1 input channels")
    raises_clear(lambda: dynnet.count_macs(model, torch.full((2, 1, 28, 28), math.nan)), "NaN or Inf")
    raises_clear(lambda: dynnet.count_macs(model, torch.zeros(2, 1, 28, 28, dtype=torch.uint8)), "floating-point")
    # batch of 1 and channels_last count the same MACs per sample as a contiguous batch
    x = torch.randn(3, 1, 28, 28)
    full = dynnet.count_macs(model, x)
    assert dynnet.count_macs(model, x[:1]).per_sample[0] == full.per_sample[0]
    torch.testing.assert_close(dynnet.count_macs(model, x.to(memory_format=torch.channels_last)).per_sample,
                               full.per_sample)  # fmt: skip


def test_count_macs_of_a_non_module() -> None:
    raises_clear(lambda: dynnet.count_macs("resnet18", torch.randn(1, 3, 32, 32)), "nn.Module")


# -- data ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "words"),
    [({"batch_size": 0}, "batch_size"), ({"batch_size": 2.5}, "batch_size"), ({"subset": 0}, "subset"),
     ({"val_fraction": 1.0}, "val_fraction"), ({"val_fraction": math.nan}, "val_fraction"),
     ({"num_workers": -1}, "num_workers"), ({"distributed": True}, "distributed")],
)  # fmt: skip
def test_build_loaders_bad_arguments(kw: dict, words: str) -> None:
    raises_clear(lambda: build_loaders("synthetic", **kw), words)


def test_build_loaders_missing_files(tmp_path) -> None:
    err = raises_clear(lambda: build_loaders("cifar10", root=tmp_path / "nowhere", subset=8), "not found")
    assert isinstance(err, DatasetNotFoundError) and isinstance(err, FileNotFoundError)
    raises_clear(lambda: build_loaders("imagefolder", root=tmp_path / "nowhere"), "not a folder")
    raises_clear(lambda: build_loaders("imagefolder"), "root")
