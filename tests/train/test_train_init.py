"""Fine-tuning from trained weights (`fit(init=...)`, `--init`) and distillation from the dense base."""

from __future__ import annotations

import itertools

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


def test_fbs_starts_from_the_channels_static_pruning_keeps() -> None:
    """Below density 1, k-WTA's first choice (every saliency its bias) is the loaded channels' static importance."""
    base = _trained_base()
    torch.manual_seed(0)
    model = dynnet.create_model("cifar_resnet8", recipe="fbs", budget=0.5, in_channels=1, width=0.25)
    before = [b.saliency.fc.bias.clone() for b in model.fbs_blocks()]
    load_init(model, base)
    for block, old in zip(model.fbs_blocks(), before, strict=True):
        assert block.density < 1.0  # precondition: k-WTA drops channels
        bias, importance = block.saliency.fc.bias, block.channel_importance()
        assert not torch.equal(bias, old) and not block.saliency.fc.weight.any()
        assert importance.unique().numel() == importance.numel()  # precondition: a strict order to follow
        assert torch.equal(torch.argsort(bias), torch.argsort(importance))
        assert float(bias.min()) >= 1.0 and float(bias.max()) <= 1.0 + 0.05 + 1e-6
        x = torch.randn(3, block.conv1.in_channels, 6, 6)
        kept = block.decide(x)[0].hard
        top = torch.topk(importance, int(kept[0].sum())).indices
        assert torch.equal(kept.nonzero()[:, 1].view(3, -1).sort(1).values, top.sort().values.expand(3, -1))
    # a trained predictor (W != 0) is left as it is by a later base load
    with torch.no_grad():
        model.fbs_blocks()[0].saliency.fc.weight.fill_(0.1)
    trained = model.fbs_blocks()[0].saliency.fc.bias.clone().add_(0.5)
    with torch.no_grad():
        model.fbs_blocks()[0].saliency.fc.bias.copy_(trained)
    load_init(model, base)
    torch.testing.assert_close(model.fbs_blocks()[0].saliency.fc.bias, trained)


def test_fbs_at_budget_one_still_reproduces_the_base_after_load() -> None:
    base = _trained_base()
    model = load_init(dynnet.create_model("cifar_resnet8", recipe="fbs", in_channels=1, width=0.25), base).eval()
    x = torch.randn(4, 1, 12, 12)
    torch.testing.assert_close(model(x), base(x))


def test_decision_parameters_get_their_own_learning_rate() -> None:
    from dynnet.train.loop import build_optimizer

    model = _converted()
    decision = {id(p) for p in model.decision_parameters()}
    assert decision and len(decision) < len(list(model.parameters()))
    assert all("gate" in n for n, p in model.named_parameters() if id(p) in decision)
    opt = build_optimizer(model, TrainConfig(lr=0.02, decision_lr_scale=10.0))
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs.keys() == {id(p) for p in model.parameters()}
    assert all(lr == pytest.approx(0.2 if i in decision else 0.02) for i, lr in lrs.items())
    plain = build_optimizer(model, TrainConfig(lr=0.02))
    assert {g["lr"] for g in plain.param_groups} == {0.02}
    with pytest.raises(ValueError, match="decision_lr_scale"):
        TrainConfig(decision_lr_scale=0.0)


def test_fit_anneals_the_fbs_density_with_the_budget(loaders) -> None:
    """FBS's knob is fixed by the budget: while fit anneals the budget from 1, the density follows it."""
    model = dynnet.create_model("cifar_resnet8", recipe="fbs", budget=0.5, in_channels=1, width=0.25)
    target = model.fbs_blocks()[0].density
    seen: list[float] = []

    class Watch(dynnet.train.Hook):
        def on_step_end(self, state) -> None:
            seen.append(state.model.fbs_blocks()[0].density)

    steps = len(loaders.train)
    cfg = TrainConfig(epochs=2, lr=0.01, budget_start=1.0, budget_warmup_epochs=1.0, calibrate=False)
    fit(model, loaders.train, cfg, hooks=[Watch()])
    assert target < 1.0 and len(seen) == 2 * steps
    assert seen[0] > seen[steps // 2] > target  # decreasing while the budget anneals
    assert all(a >= b for a, b in itertools.pairwise(seen))
    assert seen[steps:] == [target] * steps  # then the budget's own density


def test_fine_tune_settings_by_family_and_recipe() -> None:
    from dynnet.core.recipe import FINE_TUNE_DEFAULTS, fine_tune_settings

    assert fine_tune_settings(None, 3) == {}
    fbs = fine_tune_settings("fbs", 1)
    assert fbs["budget_start"] == FINE_TUNE_DEFAULTS["budget_start"] == 1.0 and fbs["budget_warmup_epochs"] == 0.5
    assert fbs.get("decision_lr_scale", 1.0) == 1.0
    assert fbs["track_budget_every"] == FINE_TUNE_DEFAULTS["track_budget_every"] > 0  # gates kept at the budget
    assert fine_tune_settings("branchynet", 4) == {
        **fbs, "budget_warmup_epochs": 1.0, "decision_lr_scale": 10.0, "track_budget_every": 0,
    }  # fmt: skip
    TrainConfig(**fine_tune_settings("branchynet", 1))  # every setting is a TrainConfig field
