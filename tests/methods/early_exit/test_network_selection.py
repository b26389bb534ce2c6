"""Network selection: a little network answers first, the base answers the images it is not confident on."""

from __future__ import annotations

import pytest
import torch

import dynnet
from dynnet.models import build_base_model


def _base() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_base_model("cifar_resnet8", in_channels=1, num_classes=10)


def _x(n: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn((n, 1, 16, 16), generator=g) * torch.linspace(0.2, 3.0, n).view(n, 1, 1, 1)


def test_each_image_costs_the_little_network_or_both_and_gets_that_answer() -> None:
    base = _base().eval()
    x = _x()
    with torch.no_grad():
        dense = dynnet.count_macs(base, x[:1]).total
        model = dynnet.convert(base, "network_selection", budget=0.5).eval()
        little = model.net.little
        little_macs = dynnet.count_macs(little, x[:1]).total
        assert 0.2 < little_macs / dense < 0.3  # pruned to a quarter of the base
        scores = little(x).softmax(1).amax(1)
        threshold = float(scores.median())
        model.set_thresholds([threshold])
        stop = scores >= threshold
        assert 0 < int(stop.sum()) < len(x)  # mixed: some images stop at the little network
        dynnet.sparse(model)
        with dynnet.trace() as t:
            out = model(x)
        expected = torch.where(stop.view(-1, 1), little(x), base(x))
    torch.testing.assert_close(out, expected)
    want = torch.where(stop, torch.tensor(float(little_macs)), torch.tensor(float(little_macs + dense)))
    torch.testing.assert_close(t.macs().float(), want)
    assert t.dense_macs() == pytest.approx(dense)  # the budget's unit is the base alone


def test_the_little_network_is_pruned_again_from_loaded_weights() -> None:
    model = dynnet.convert(_base(), "network_selection", budget=0.5)
    trained = _base()
    with torch.no_grad():
        for p in trained.parameters():
            p.mul_(-2.0)  # other weights, other L1 ranking
    before = {k: v.clone() for k, v in model.net.little.state_dict().items()}
    model.load_base_state_dict(trained.state_dict())
    after = model.net.little.state_dict()
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    assert any(not torch.equal(after[k], before[k]) for k in after)
    x = _x(4)
    trained.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained(x))  # every image still goes on to the (loaded) base


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"budget": 0.2}, "outside"), ({"little": "nope"}, "little must be"), ({"little_fraction": 0.6}, "not above")],
)
def test_bad_settings_are_refused_in_one_line(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dynnet.convert(_base(), "network_selection", **{"budget": 0.5, **settings})
