"""IamNN: one weight-shared block iterated per stage, ACT halting, unrolled dense network."""

import torch

import dynnet
from dynnet.macs import MacCounter
from dynnet.testing import scramble_gates


def _model(**kw: object) -> dynnet.DynamicModel:
    torch.manual_seed(0)
    return dynnet.create_model("cifar_resnet20", recipe="iamnn", in_channels=1, width=0.5, **kw).eval()


def test_the_shared_block_is_iterated() -> None:
    model = _model(iterations=4)
    stage = model.net.layer1
    assert stage.num_units == 5 and all(stage.unit(i) is stage.shared for i in range(1, 5))
    x = torch.randn(3, 8, 16, 16)
    dynnet.set_mode(model, "dense")
    with torch.no_grad():
        y = stage.unit(0)(x)
        for _ in range(4):
            y = stage.shared(y)
        torch.testing.assert_close(stage(x), y)
    n_params = sum(p.numel() for p in model.parameters())
    base = dynnet.create_model("cifar_resnet20", in_channels=1, width=0.5)
    assert n_params < sum(p.numel() for p in base.parameters())  # weight sharing: fewer parameters


def test_halting_shrinks_executed_macs_in_sparse_mode() -> None:
    model = _model()
    scramble_gates(model, seed=2)
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), dynnet.trace() as tm:
        masked = model(x)
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as ts, MacCounter() as c:
        out = model(x)
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-4)
    assert ts.executed_macs().sum().item() == c.total
    assert c.total < tm.executed_macs().sum().item()
    # the dense network is the fully unrolled one
    assert tm.dense_macs() == tm.max_macs() - sum(e.maximum for e in tm.entries if "halting" in e.name)


def test_base_weights_load_into_the_transition_and_shared_blocks() -> None:
    torch.manual_seed(3)
    base = dynnet.create_model("cifar_resnet20", in_channels=1, width=0.5)
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in base.state_dict().items()}
    model = _model()
    model.load_base_state_dict(state)
    loaded = model.net.state_dict()
    for stage in ("layer1", "layer2", "layer3"):
        for key in ("conv1.weight", "bn2.running_mean", "bn1.bias"):
            torch.testing.assert_close(loaded[f"{stage}.0.{key}"], state[f"{stage}.0.{key}"])
            torch.testing.assert_close(loaded[f"{stage}.shared.{key}"], state[f"{stage}.1.{key}"])
        assert not any(k.startswith(f"{stage}.2.") for k in loaded)
    torch.testing.assert_close(loaded["conv1.weight"], state["conv1.weight"])
    torch.testing.assert_close(loaded["fc.weight"], state["fc.weight"])
