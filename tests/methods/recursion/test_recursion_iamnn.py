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
