"""The inference fast paths of the channel family: untraced sparse execution (batch 1 and batch N), cached
BN-folded weights and their invalidation, all-on and all-off decisions."""

from __future__ import annotations

import contextlib

import pytest
import torch

import dynnet
from dynnet.testing import diverse_inputs, scramble_until_mixed
from dynnet.testing.engines import kernel_engine

FAST_RECIPES = [
    "batch_shaping",
    "stochastic_neurons",
    "fbs",
    "gaternet",
    "rnp",
    "runtime_routing",
    "instance_sparsity",
    "channel_gating",
]


def _model(recipe: str, **config) -> dynnet.DynamicModel:
    torch.manual_seed(0)
    config.setdefault("in_channels", 3)
    return dynnet.create_model("cifar_resnet8", recipe=recipe, num_classes=10, **config)


def _outputs(model: dynnet.DynamicModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked (traced), sparse untraced at batch N and sparse untraced one sample at a time."""
    model.eval()
    dynnet.set_mode(model, "masked")
    with torch.no_grad(), dynnet.trace():
        masked = model(x)
    dynnet.sparse(model)
    with torch.inference_mode():
        batch = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(x.shape[0])])
    return masked, batch, single


@pytest.mark.parametrize("recipe", FAST_RECIPES)
def test_untraced_sparse_matches_masked(recipe: str) -> None:
    model = _model(recipe)
    x = diverse_inputs(5, (3, 16, 16))
    scramble_until_mixed(model, x)
    masked, batch, single = _outputs(model, x)
    torch.testing.assert_close(batch, masked, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(single, masked, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("recipe", ["batch_shaping", "stochastic_neurons", "channel_gating"])
@pytest.mark.parametrize("state", ["all_on", "all_off"])
def test_all_on_and_all_off_decisions(recipe: str, state: str) -> None:
    model = _model(recipe)
    x = diverse_inputs(3, (3, 16, 16))
    on = state == "all_on"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if recipe == "channel_gating" and name.endswith("gate.threshold"):
                p.fill_(-1e4 if on else 1e4)
            elif recipe != "channel_gating" and name.endswith("gate.fc2.bias"):
                p.fill_(100.0 if on else -100.0)
    with torch.no_grad(), dynnet.trace() as t:
        dynnet.sparse(model)(x)
    expected = t.max_macs() if on else t.min_macs()
    torch.testing.assert_close(t.macs(), torch.as_tensor(expected, dtype=torch.float64).expand_as(t.macs()))
    masked, batch, single = _outputs(model, x)
    torch.testing.assert_close(batch, masked, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(single, masked, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("recipe", ["batch_shaping", "instance_sparsity", "channel_gating"])
def test_cached_weights_follow_in_place_parameter_edits(recipe: str) -> None:
    model = _model(recipe)
    x = diverse_inputs(4, (3, 16, 16))
    scramble_until_mixed(model, x)
    before = _outputs(model, x)[1]  # fills the caches
    block = model.net.layer1[0]
    with torch.no_grad():
        block.conv1.weight.mul_(1.5)
        if recipe != "channel_gating":
            block.bn1.running_var.mul_(2.0)
            block.bn2.bias.add_(0.5)
        else:
            block.conv2.weight.add_(0.1)
    masked, batch, single = _outputs(model, x)
    assert not torch.allclose(batch, before)
    torch.testing.assert_close(batch, masked, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(single, masked, rtol=1e-4, atol=1e-4)
    # load_state_dict copies in place too
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.net.layer1[0].parameters():
            p.mul_(0.5)
    model.load_state_dict(state)
    torch.testing.assert_close(_outputs(model, x)[1], batch)


def test_folded_weights_are_cached_and_keep_gradients_when_enabled() -> None:
    model = _model("batch_shaping").eval()
    block = model.net.layer1[0]
    with torch.no_grad():
        first = block.folded_weights()
        assert block.folded_weights()[0] is first[0]  # cached
    w1 = block.folded_weights()[0]  # gradients enabled: recomputed on the graph
    assert w1.requires_grad and w1 is not first[0]


# Recipes whose batch-1 blocks run as one compiled call (gate inside the call, or a controller's decision passed in).
COMPILED = [
    ("batch_shaping", {}),
    ("stochastic_neurons", {}),
    ("fbs", {"budget": 0.5}),
    ("dynamic_channel_exec", {"budget": 0.5}),
    ("instance_sparsity", {"threshold": 1.0}),
    ("gaternet", {}),
    ("rnp", {}),
    ("runtime_routing", {}),
]


def _python_path(monkeypatch) -> None:
    """Turn the compiled block calls and agent steps off (the Python gates and per-op kernels run)."""
    from dynnet.methods.channel._agent import QAgent, QRoutingModel
    from dynnet.methods.channel._block import ChannelGatedBlock
    from dynnet.methods.channel.gaternet import GaterNet

    monkeypatch.setattr(ChannelGatedBlock, "_forward_native", lambda self, *a, **k: None)
    monkeypatch.setattr(QAgent, "native_step", lambda self, *a, **k: None)
    monkeypatch.setattr(QRoutingModel, "_run_compiled", lambda self, *a, **k: None)
    monkeypatch.setattr(GaterNet, "_run_compiled", lambda self, *a, **k: None)


@pytest.mark.parametrize(("recipe", "config"), COMPILED, ids=[r for r, _ in COMPILED])
def test_compiled_blocks_equal_masked_and_count_the_python_path_macs(recipe: str, config: dict, monkeypatch) -> None:
    from dynnet.macs import MacCounter
    from dynnet.methods.channel._block import ChannelGatedBlock

    with kernel_engine("native"):
        model = _model(recipe, **config)
        x = diverse_inputs(4, (3, 16, 16))
        scramble_until_mixed(model, x)
        masked, _, single = _outputs(model, x)
        torch.testing.assert_close(single, masked, rtol=1e-4, atol=1e-4)
        blocks = [b for b in model.modules() if isinstance(b, ChannelGatedBlock)]
        assert blocks and all(b._plan is not None for b in blocks)  # the compiled call ran in every block
        own_gate = recipe not in ("gaternet", "rnp", "runtime_routing")
        assert all((b._plan[4] is not None) == own_gate for b in blocks)
        with torch.inference_mode():
            with MacCounter() as compiled:
                fast = model(x[:1])
            with monkeypatch.context() as m:
                _python_path(m)
                with MacCounter() as python:
                    slow = model(x[:1])
        assert compiled.total == python.total
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)


def test_compiled_plans_follow_edits_replacements_and_settings() -> None:
    """A cached plan never answers for weights it was not built from: in-place gate edits, replaced parameters
    and buffers, and recipe settings (FBS density, instance threshold) rebuild it; a deep copy drops it."""
    import copy

    with kernel_engine("native"):
        x = diverse_inputs(3, (3, 16, 16))
        model = _model("batch_shaping")
        scramble_until_mixed(model, x)
        block = model.net.layer1[0]

        def check() -> torch.Tensor:
            masked, _, single = _outputs(model, x)
            torch.testing.assert_close(single, masked, rtol=1e-4, atol=1e-4)
            return single

        first = check()
        with torch.no_grad():
            block.gate.fc2.bias.fill_(-100.0)  # every channel of the block off
        closed = check()
        assert not torch.allclose(closed, first)
        with torch.no_grad():
            block.gate.fc2.bias.fill_(100.0)
        opened = check()
        block.conv2.weight = torch.nn.Parameter(block.conv2.weight.detach() * 3)  # replaced, not edited
        replaced = check()
        assert not torch.allclose(replaced, opened)
        block.bn1.running_var = block.bn1.running_var * 4  # a buffer assigned, not edited
        assert not torch.allclose(check(), replaced)
        clone = copy.deepcopy(model)
        torch.testing.assert_close(_outputs(clone, x)[2], _outputs(model, x)[2])

        fbs = _model("fbs", budget=0.75)
        scramble_until_mixed(fbs, x)
        dense_k = _outputs(fbs, x)[2]
        for b in fbs.blocks():
            b[1].density = 0.25
        masked, _, single = _outputs(fbs, x)
        torch.testing.assert_close(single, masked, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(single, dense_k)

        inst = _model("instance_sparsity", threshold=0.5)
        scramble_until_mixed(inst, x)
        _outputs(inst, x)
        inst.set_threshold(1.5)
        masked, _, single = _outputs(inst, x)
        torch.testing.assert_close(single, masked, rtol=1e-4, atol=1e-4)


def test_compiled_blocks_step_aside_for_gradients_and_the_torch_engine() -> None:
    model = _model("batch_shaping")
    x = diverse_inputs(2, (3, 16, 16))
    with kernel_engine("torch"):
        masked, _, single = _outputs(model, x)
    assert all(b._plan is None for _, b in model.blocks())  # DYNNET_NATIVE=0: nothing compiled is used
    torch.testing.assert_close(single, masked, rtol=1e-4, atol=1e-4)
    dynnet.sparse(model)
    y = model(x[:1])  # gradients enabled: the differentiable path
    assert y.requires_grad


def test_gater_inference_logits_fold_the_batch_norms_exactly() -> None:
    from dynnet.macs import MacCounter

    model = _model("gaternet").eval()
    gater = model.gate
    with torch.no_grad():
        for m in gater.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.3)
    x = diverse_inputs(3, (3, 16, 16))
    with torch.no_grad():
        with MacCounter() as plain:
            ref = gater.logits(x)
        with MacCounter() as folded:
            got = gater.inference_logits(x)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        assert folded.total == plain.total
        assert gater.inference_logits(x) is not got and gater._folded is not None  # cached folds
        gater.features[4].running_var.mul_(3.0)  # an in-place edit refolds
        torch.testing.assert_close(gater.inference_logits(x), gater.logits(x), rtol=1e-4, atol=1e-4)
        model.to(memory_format=torch.channels_last)  # refolded NCHW-contiguous for the compiled gater
        torch.testing.assert_close(gater.inference_logits(x[:1]), gater.logits(x[:1]), rtol=1e-4, atol=1e-4)
        model.to(memory_format=torch.contiguous_format)
        gater.features[2] = torch.nn.Sigmoid()  # another structure: the modules run as they are
        torch.testing.assert_close(gater.inference_logits(x), gater.logits(x))
        torch.testing.assert_close(gater.inference_logits(x[:1]), gater.logits(x[:1]))


def test_fbs_ties_break_to_the_lowest_index_on_every_path() -> None:
    """A fresh FBS predictor gives every channel the same saliency: masked mode, the Python sparse path and the
    compiled call must keep the same k channels (the lowest indices), not whichever a top-k happens to return."""
    with kernel_engine("native"):
        model = _model("fbs")  # predictor weights 0, bias 1: all saliencies tie
        model.set_density(0.5)
        x = diverse_inputs(3, (3, 16, 16))
        masked, batch, single = _outputs(model, x)
        torch.testing.assert_close(batch, masked, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(single, masked, rtol=1e-4, atol=1e-4)
        with torch.no_grad(), dynnet.trace() as t:
            dynnet.sparse(model)(x[:1])
        kept = next(iter(t.decisions.values())).hard[0]
        assert kept.tolist() == [1.0] * (kept.numel() // 2) + [0.0] * (kept.numel() - kept.numel() // 2)


@pytest.mark.parametrize("recipe", ["batch_shaping", "fbs", "rnp", "gaternet", "instance_sparsity"])
def test_compiled_blocks_on_torchvision_resnet18(recipe: str) -> None:
    """torchvision's BasicBlock (projection shortcuts ``downsample = conv1x1 + BN``, stride-2 ``conv1``): every
    block runs as one compiled call, the three downsampling ones with their shortcut inside, equal to masked mode."""
    from dynnet.methods.channel._block import ChannelGatedBlock

    torchvision = pytest.importorskip("torchvision")
    with kernel_engine("native"):
        torch.manual_seed(0)
        model = dynnet.convert(torchvision.models.resnet18(num_classes=10), recipe)
        x = diverse_inputs(2, (3, 32, 32))
        scramble_until_mixed(model, x)
        masked, _, single = _outputs(model, x)
        torch.testing.assert_close(single, masked, rtol=1e-4, atol=1e-4)
        plans = [b._plan for b in model.modules() if isinstance(b, ChannelGatedBlock)]
        assert len(plans) == 8 and all(p is not None for p in plans)
        assert sum(p[5] is not None for p in plans) == 3  # the projection shortcuts run inside the call


def _scrambled_channel_gating(density: float = 0.3, **config) -> tuple[dynnet.DynamicModel, torch.Tensor]:
    """A channel-gating ResNet-8 whose thresholds put part of every gated convolution's tiles on, and its inputs."""
    from dynnet.methods.channel.channel_gating import GatedConv

    torch.manual_seed(0)
    model = _model("channel_gating", **config)
    x = diverse_inputs(3, (3, 19, 16))  # 19 rows: partial tiles at every stage
    scramble_until_mixed(model, x)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, GatedConv):
                m.gate.threshold.uniform_(-0.5, 1.5 * density)
    return model, x


def test_channel_gating_compiled_blocks_equal_masked_and_execute_the_theoretical_macs(monkeypatch) -> None:
    """Batch 1: every gated block runs as one compiled call (stride-2 blocks with their projection inside), equal to
    masked mode; it executes exactly the MACs the trace reports as theoretical (the batch path computes a superset);
    under a MAC counter it is the dispatcher op, otherwise the direct binding."""
    from dynnet.macs import MacCounter
    from dynnet.methods.channel.channel_gating import GatedBasicBlock

    with kernel_engine("native"):
        model, x = _scrambled_channel_gating()
        with torch.no_grad(), dynnet.trace() as t:
            dynnet.sparse(model)(x)
        on = torch.cat([d.hard.flatten() for d in t.decisions.values()]).mean()
        assert 0.1 < on < 0.9  # decisions mixed: the rest is computed for part of the tiles only
        masked, batch, single = _outputs(model, x)
        torch.testing.assert_close(batch, masked, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(single, masked, rtol=1e-4, atol=1e-4)
        blocks = [b for b in model.modules() if isinstance(b, GatedBasicBlock)]
        assert len(blocks) == 3 and all(b._plan is not None for b in blocks)
        assert sum(b._plan[4] is not None for b in blocks) == 2  # the projection shortcuts inside the call
        for i in range(x.shape[0]):
            with torch.inference_mode():
                with MacCounter() as counter:
                    fast = model(x[i : i + 1])
                with dynnet.trace() as t:
                    model(x[i : i + 1])
            assert counter.total == int(t.macs()[0])
            assert int(t.executed_macs()[0]) >= counter.total
            torch.testing.assert_close(fast, single[i : i + 1], rtol=1e-5, atol=1e-5)
        calls = []
        for b in blocks:
            direct = b._plan[7]
            monkeypatch.setattr(b, "_plan", (*b._plan[:7], lambda *a, f=direct: calls.append(1) or f(*a)))
        with torch.inference_mode():
            torch.testing.assert_close(model(x[:1]), single[:1])
        assert len(calls) == 3


def test_channel_gating_compiled_loop_steps_aside() -> None:
    """Hooks (on a block, a stage or a module inside a block), other tiles, gradients and DYNNET_NATIVE=0 fall back
    to the module path (hooks fire), a network that is not ResNet-style still runs each block compiled, and a
    deep copy and in-place edits keep results equal to masked mode."""
    import copy

    from dynnet.methods.channel.channel_gating import GatedBasicBlock

    with kernel_engine("native"):
        model, x = _scrambled_channel_gating()
        masked, _, single = _outputs(model, x)
        torch.testing.assert_close(single, masked, rtol=1e-4, atol=1e-4)
        seen = []
        for target in (model.net.layer1[0], model.net.layer2, model.net.layer2[0].bn1, model.net.layer1[0].conv2):
            handle = target.register_forward_hook(lambda *a: seen.append(1))
            with torch.inference_mode():
                torch.testing.assert_close(model(x[:1]), single[:1], rtol=1e-4, atol=1e-4)
            handle.remove()
            assert seen, target
            seen.clear()
        model.net.layer2[0].conv1.tile = 2  # another tile: that block's convolutions run in Python
        masked2, _, single2 = _outputs(model, x)
        torch.testing.assert_close(single2, masked2, rtol=1e-4, atol=1e-4)
        model.net.layer2[0].conv1.tile = 4
        with torch.no_grad():
            model.net.layer1[0].conv1.weight.mul_(1.5)  # an in-place edit rebuilds the plan
        masked3, _, single3 = _outputs(model, x)
        torch.testing.assert_close(single3, masked3, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(single3, single)
        clone = copy.deepcopy(model)
        torch.testing.assert_close(_outputs(clone, x)[2], single3)
        dynnet.sparse(model)
        assert model(x[:1]).requires_grad  # gradients enabled: the differentiable path
        # Not ResNet-style (no stem attributes): the blocks still run compiled one by one.
        blocks = [b for b in model.modules() if isinstance(b, GatedBasicBlock)]
        for b in blocks:
            b._plan = None
        net = torch.nn.Sequential(model.net.conv1, model.net.bn1, model.net.relu, *blocks)
        with torch.inference_mode():
            y = net(x[:1])
        assert all(b._plan is not None for b in blocks)
        dynnet.set_mode(model, "masked")
        with torch.inference_mode():
            torch.testing.assert_close(y, net(x[:1]), rtol=1e-4, atol=1e-4)
    with kernel_engine("torch"):
        for b in blocks:
            b._plan = None
        torch.testing.assert_close(_outputs(model, x)[2], single3, rtol=1e-4, atol=1e-4)
        assert all(b._plan is None for b in blocks)


def test_channel_gating_compiled_blocks_on_torchvision_resnet18() -> None:
    """torchvision's BasicBlock (``downsample = conv1x1 + BN``): every block compiled, equal to masked mode."""
    from dynnet.methods.channel.channel_gating import GatedBasicBlock, GatedConv

    torchvision = pytest.importorskip("torchvision")
    with kernel_engine("native"):
        torch.manual_seed(0)
        model = dynnet.convert(torchvision.models.resnet18(num_classes=10), "channel_gating")
        x = diverse_inputs(2, (3, 40, 36))
        scramble_until_mixed(model, x)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, GatedConv):
                    m.gate.threshold.uniform_(-0.5, 0.5)
        masked, _, single = _outputs(model, x)
        torch.testing.assert_close(single, masked, rtol=1e-4, atol=1e-4)
        plans = [b._plan for b in model.modules() if isinstance(b, GatedBasicBlock)]
        assert len(plans) == 8 and all(p is not None for p in plans)
        assert sum(p[4] is not None for p in plans) == 3


@contextlib.contextmanager
def _counting_compiled_calls(calls: list[int]):
    """Record the batch size of every ChannelGating._run_compiled call."""
    from dynnet.methods.channel.channel_gating import ChannelGating

    original = ChannelGating._run_compiled

    def counted(self, x, **kwargs):
        calls.append(x.shape[0])
        return original(self, x, **kwargs)

    ChannelGating._run_compiled = counted
    try:
        yield
    finally:
        ChannelGating._run_compiled = original


def test_channel_gating_batches_decide_per_window_and_equal_masked_on_partial_windows() -> None:
    from dynnet.methods.channel.channel_gating import GatedConv

    model, x = _scrambled_channel_gating()  # 19 x 16 inputs: the last row of windows is cut at every stage
    x = torch.cat([x, x.flip(2)])  # batch 6
    model.batch_engine = "batched"  # the modules' batch path (tile_gated_rest_add_), not the per-sample loop
    calls = []
    with _counting_compiled_calls(calls):
        masked, batch, _ = _outputs(model, x)
    assert sum(n > 1 for n in calls) == 0  # no batch went through the compiled loop
    model.batch_engine = "per_sample"
    dynnet.sparse(model)
    with torch.inference_mode(), _counting_compiled_calls(calls):
        per_sample = model(x)
    assert calls[-1] == 6  # the compiled loop ran the batch, sample by sample
    torch.testing.assert_close(per_sample, masked, rtol=1e-4, atol=1e-4)
    dynnet.set_mode(model, "masked")
    with torch.no_grad(), dynnet.trace() as t:
        model(x)
    rates = torch.stack([d.rate() for name, d in t.decisions.items()])
    assert bool((rates > 0).any()) and bool((rates < 1).any()) and len(t.decisions) == 6  # mixed, every conv gated
    assert all(isinstance(m, GatedConv) and m.tile == 4 for m in model.modules() if isinstance(m, GatedConv))
    torch.testing.assert_close(batch, masked, rtol=1e-4, atol=1e-4)
