"""The structured-pruning baseline: channels removed for real to a MAC fraction, lowest L1 first, weights that load
back into a freshly built network, and the prune → fine-tune → ship → load path."""

from __future__ import annotations

import pytest
import torch

import dynnet
import dynnet.zoo as zoo
from dynnet.train.init import resolve_init
from dynnet.train.pretrain import pretrain
from dynnet.train.prune import prune, prune_channels, resize_like

DATA = {"num_train": 96, "num_test": 32, "in_channels": 1, "image_size": 12}


def _net(width: float = 0.5) -> torch.nn.Module:
    torch.manual_seed(0)
    return dynnet.create_model("cifar_resnet8", in_channels=1, width=width).eval()


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.75])
def test_prune_channels_removes_channels_to_the_asked_mac_fraction(fraction: float) -> None:
    net = _net(width=1.0)  # 16/32/64 channels: fine enough steps for 0.03
    x = torch.randn(1, 1, 28, 28)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    pruned, achieved = prune_channels(net, fraction, x)
    assert abs(achieved - fraction) <= 0.03
    dense, small = dynnet.count_macs(net, x).mean, dynnet.count_macs(pruned, x).mean
    assert small / dense == pytest.approx(achieved)
    assert pruned.conv1.out_channels < net.conv1.out_channels  # physically narrower, not masked
    assert pruned.fc.out_features == net.fc.out_features
    assert pruned(torch.randn(4, 1, 28, 28)).shape == (4, 10)
    for k, v in net.state_dict().items():  # the base is untouched
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_the_channels_with_the_smallest_l1_norm_go_first() -> None:
    net = _net(width=1.0)
    block = net.layer2[0]  # inner channels of a block are coupled only with bn1 and conv2's input
    dead = [3, 7]
    with torch.no_grad():
        block.conv1.weight[dead] = 0
        block.bn1.weight[dead] = 0
        block.bn1.bias[dead] = 0
        block.conv2.weight[:, dead] = 0
    pruned, _ = prune_channels(net, 0.75, torch.randn(1, 1, 28, 28))
    kept = pruned.layer2[0].conv1.weight
    assert kept.shape[0] <= block.conv1.weight.shape[0] - len(dead)
    assert bool((kept.flatten(1).abs().sum(1) > 0).all()), "a zero filter survived while live ones were removed"


def test_resize_like_loads_pruned_weights_into_a_fresh_network() -> None:
    pruned, _ = prune_channels(_net(), 0.5, torch.randn(1, 1, 28, 28))
    state = pruned.state_dict()
    fresh = dynnet.create_model("cifar_resnet8", in_channels=1, width=0.5)
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict(state)
    resize_like(fresh, state).load_state_dict(state, strict=True)
    x = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(fresh.eval()(x), pruned(x))
    with pytest.raises(ValueError, match="layers the network does not have"):
        resize_like(dynnet.create_model("cifar_resnet8", in_channels=1), {"nope.weight": torch.zeros(2, 2)})


@pytest.mark.parametrize("fraction", [0.0, 1.5, -0.1, True])
def test_bad_fractions_are_refused(fraction: object) -> None:
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        prune_channels(_net(), fraction, torch.randn(1, 1, 28, 28))  # type: ignore[arg-type]


def test_prune_fine_tunes_writes_a_manifest_and_ships_as_a_loadable_entry(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path / "weights")
    base = tmp_path / "base"
    pretrain("cifar_resnet8", "synthetic", out_dir=base, epochs=1, batch_size=32, dataset_kwargs=DATA)
    out = tmp_path / "pruned"
    manifest = prune(base, 0.5, out_dir=out, model="cifar_resnet8", data="synthetic", epochs=1, batch_size=32,
                     dataset_kwargs=DATA, distill=1.0)  # fmt: skip
    assert manifest["settings"]["distill"] == 1.0
    assert abs(manifest["pruned"]["mac_fraction"] - 0.5) <= 0.03
    assert manifest["macs"] == pytest.approx(manifest["pruned"]["mac_fraction"] * manifest["dense_macs"])
    with pytest.raises(ValueError, match="already holds a finished run"):
        prune(base, 0.5, out_dir=out, model="cifar_resnet8", data="synthetic", dataset_kwargs=DATA)
    assert zoo.ship(out).name == "cifar_resnet8p0.5-synthetic.safetensors"
    net = zoo.load("cifar_resnet8p0.5-synthetic")
    from safetensors.torch import load_file

    expected = load_file(str(out / "model.safetensors"))
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0)
    zoo.ship(base)
    state = resolve_init("zoo:cifar_resnet8-synthetic")
    torch.testing.assert_close(state["fc.weight"], load_file(str(base / "model.safetensors"))["fc.weight"])
