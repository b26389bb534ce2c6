"""Fine-tuning from trained weights (`fit(init=...)`, `--init`) and distillation from the dense base."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import dynnet
from dynnet.data import build_loaders
from dynnet.models import build_base_model
from dynnet.testing import scramble_until_mixed
from dynnet.train import TrainConfig, fit, remember_build, save_checkpoint
from dynnet.train.init import distillation_loss, frozen_teacher, load_init, resolve_init


@pytest.fixture(scope="module")
def loaders():
    return build_loaders("synthetic", batch_size=32, subset=128, in_channels=1, image_size=12, num_train=200,
                         num_test=64)  # fmt: skip


def _trained_base(seed: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    base = build_base_model("cifar_resnet8", in_channels=1, width=0.25)
    with torch.no_grad():  # "trained" batch-norm statistics, so that a wrong load shows
        for m in base.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return base.eval()


def _converted(seed: int = 0) -> dynnet.DynamicModel:
    torch.manual_seed(seed)
    return dynnet.create_model("cifar_resnet8", recipe="convnet_aig", in_channels=1, width=0.25)


@pytest.mark.parametrize("form", ["module", "state_dict", "safetensors", "folder", "checkpoint"])
def test_load_init_puts_the_base_weights_in_and_gates_still_start_open(form, tmp_path) -> None:
    base = _trained_base()
    init = {"module": base, "state_dict": base.state_dict()}.get(form)
    if form in ("safetensors", "folder"):
        save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "model.safetensors"))
        init = tmp_path / "model.safetensors" if form == "safetensors" else tmp_path
    if form == "checkpoint":
        init = save_checkpoint(tmp_path / "ck", remember_build(base, "cifar_resnet8", in_channels=1, width=0.25))
    model = load_init(_converted(), init).eval()
    x = torch.randn(4, 1, 12, 12)
    assert not torch.allclose(_converted().eval()(x), base(x), atol=1e-3)  # precondition: the weights matter
    torch.testing.assert_close(model(x), base(x))


def test_bad_init_gets_one_clear_line(tmp_path) -> None:
    with pytest.raises(ValueError, match="no weights there"):
        resolve_init(tmp_path / "nothing")
    converted = save_checkpoint(tmp_path / "conv", _converted())
    with pytest.raises(ValueError, match="converted model"):
        resolve_init(converted)
    other = build_base_model("cifar_resnet8", in_channels=1, width=0.5)
    with pytest.raises(ValueError, match="do not fit"):
        load_init(_converted(), other)


def test_distillation_loss_is_zero_for_the_teacher_and_positive_otherwise() -> None:
    t = torch.randn(8, 10)
    assert float(distillation_loss(t.clone(), t)) == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(8, 10, requires_grad=True)
    loss = distillation_loss(s, t, temperature=2.0)
    assert float(loss) > 0
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(s, t, temperature=0.0)


def test_frozen_teacher_is_the_dense_base() -> None:
    model = _converted()
    scramble_until_mixed(model, torch.randn(8, 1, 12, 12) * torch.linspace(0.2, 3, 8).view(8, 1, 1, 1))
    teacher = frozen_teacher(model)
    assert all(not p.requires_grad for p in teacher.parameters())
    x = torch.randn(4, 1, 12, 12)
    dense = dynnet.set_mode(model.eval(), "dense")(x)
    torch.testing.assert_close(teacher(x), dense)


def test_fit_with_init_and_distill(loaders, tmp_path) -> None:
    base = _trained_base()
    model = _converted()
    cfg = TrainConfig(max_steps=3, lr=0.01, distill=0.5, calibrate=False)
    result = fit(model, loaders.train, cfg, init=base)
    assert "train_distill" in result.history[-1] and result.history[-1]["train_distill"] >= 0
    # the base weights went in before training: a convolution starts from the base's, and moved only a little
    w0 = base.conv1.weight
    assert (model.net.conv1.weight - w0).abs().max() < 0.05 * w0.abs().max()
