"""Dynamic multi-path: paths partition the block exactly, and sparse mode runs each path on its samples only."""

import torch

import dynnet
from dynnet.macs import MacCounter
from dynnet.testing import scramble_gates

# cifar_resnet8 width 0.5 on 1x16x16, 2 paths: each path of a block is half its body.
BODY = {
    "layer1.0": 2 * 8 * 8 * 9 * 256,
    "layer2.0": 8 * 16 * 9 * 64 + 16 * 16 * 9 * 64,
    "layer3.0": 16 * 32 * 9 * 16 + 32 * 32 * 9 * 16,
}


def _model(**kw: object) -> dynnet.DynamicModel:
    torch.manual_seed(0)
    return dynnet.create_model("cifar_resnet8", recipe="dynamic_multipath", in_channels=1, width=0.5, **kw).eval()


def test_paths_partition_the_inner_width() -> None:
    block = _model(paths=3).net.layer2[0]
    assert block.groups[0][0] == 0 and block.groups[-1][1] == block.channels == block.conv1.out_channels
    assert all(a[1] == b[0] for a, b in zip(block.groups, block.groups[1:], strict=False))


def test_sparse_runs_each_path_on_its_samples() -> None:
    model = _model()
    scramble_gates(model, seed=3, scale=2.0)
    x = torch.randn(9, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), dynnet.trace() as tm:
        masked = model(x)
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as ts, MacCounter() as c:
        out = model(x)
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ts.macs(), tm.macs())
    assert ts.executed_macs().sum().item() == c.total
    # each kept path costs its half of the block's body, per sample; nothing else of the body runs
    expected_paths = sum(ts.decisions[name].hard.sum().item() * body / 2 for name, body in BODY.items())
    path_macs = sum(e.executed.sum().item() for e in ts.entries if e.name.endswith("/body"))
    assert path_macs == expected_paths
    rates = torch.cat([d.hard.flatten() for d in ts.decisions.values()])
    assert 0 < rates.mean() < 1


def test_all_paths_off_keeps_the_shortcut() -> None:
    model = _model(paths=4)
    block = model.net.layer1[0]
    with torch.no_grad():
        block.gate.fc2.bias.fill_(-6.0)
    dynnet.sparse(model)
    x = torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        out = block(x)
        expected = block.relu(x + block.bn2(torch.zeros(2, 8, 16, 16)))
    torch.testing.assert_close(out, expected)


def test_the_knob_shifts_every_path_logit_and_sparse_mode_sees_it() -> None:
    model = _model(paths=4)
    scramble_gates(model, seed=3, scale=2.0)
    x = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    dynnet.sparse(model)
    knob = model.budget_knob()
    biases = [b.gate.fc2.bias.clone() for _, b in model.blocks()]
    fractions = []
    for value in (-30.0, -1.0, 0.0, 1.0, 30.0):
        knob.set(value)
        with torch.no_grad(), dynnet.trace() as t:
            model(x)
        fractions.append(float(t.mac_fraction().mean()))
    assert fractions == sorted(fractions) and fractions[0] < 0.2 and fractions[-1] > 0.99
    for (_, block), before in zip(model.blocks(), biases, strict=True):
        torch.testing.assert_close(block.gate.fc2.bias, before + 30.0)
    assert float(model.calibration[0]) == 30.0
