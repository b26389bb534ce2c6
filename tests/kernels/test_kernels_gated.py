"""The compiled gated pair (a block's decision and its channel-sliced convolutions in one call) and the compiled
routing-agent step: they decide what the recipes' Python gates decide, compute what the reference slices compute,
count their MACs as the counter counts the Python path, and reject bad operands with a clear error."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

from dynnet.kernels.channel import (
    GATE_GIVEN,
    GATE_INSTANCE,
    GATE_KWTA,
    GATE_MLP,
    ConvSpec,
    NativeGate,
    gated_pair_single,
    sliced_pair_single,
)
from dynnet.losses.instance_sparsity import channel_norms, instance_keep_mask
from dynnet.macs import MacCounter
from dynnet.methods.channel.fbs import winners_take_all
from dynnet.testing.engines import kernel_engine

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = (GATE_MLP, GATE_KWTA, GATE_GIVEN, GATE_INSTANCE)
MARGIN = 1e-3  # decisions this close to their threshold may round either way; they are not compared


@st.composite
def gated_cases(draw):
    c, m, c_out = draw(st.integers(1, 20)), draw(st.integers(1, 20)), draw(st.integers(1, 20))
    h, w = draw(st.integers(1, 16)), draw(st.integers(1, 16))
    stride = draw(st.sampled_from([1, 2]))
    kind = draw(st.sampled_from(KINDS))
    k = draw(st.integers(1, m))
    flag = draw(st.booleans())  # GATE_GIVEN: binary multipliers; GATE_INSTANCE: ratio 0 (keep every non-zero)
    seed = draw(st.integers(0, 2**31 - 1))
    return c, m, c_out, h, w, stride, kind, k, flag, seed


def _python_decision(kind: int, x, gate: NativeGate, w1, b1, spec1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, margin)``: the recipes' Python decision Tensor[M] and, per channel, how far it is from flipping."""
    gw1, gb1, gw2, gb2, k = gate.gw1, gate.gb1, gate.gw2, gate.gb2, gate.k
    if kind == GATE_MLP:
        h = torch.addmm(gb1, x.sum((2, 3)), gw1.t(), alpha=1.0 / (x.shape[2] * x.shape[3])).relu_()
        logits = torch.addmm(gb2, h, gw2.t())[0]
        return (logits > 0).float(), logits.abs()
    if kind == GATE_KWTA:
        g = torch.addmm(gb1, x.abs().mean((2, 3)), gw1.t()).relu_()
        scale = winners_take_all(g, k)[0]
        top = g[0].sort(descending=True).values
        gap = (top[k - 1] - top[k]).abs() if k < g.shape[1] else torch.tensor(float("inf"))
        return scale, torch.full_like(scale, float(gap))
    if kind == GATE_GIVEN:
        return gw1.clone(), torch.full_like(gw1, float("inf"))
    hidden = F.relu(spec1.conv(x, w1, b1))
    norms = channel_norms(hidden)
    bar = gw1 * norms.mean(1, keepdim=True)
    keep = instance_keep_mask(norms, gw1)[0]
    return keep.float(), torch.minimum((norms - bar).abs(), norms)[0]


@settings(max_examples=1000, deadline=None, derandomize=True)
@given(gated_cases())
def test_gated_pair_decides_and_computes_as_the_python_path(case) -> None:
    c, m, c_out, h, w, stride, kind, k, flag, seed = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, c, h, w, generator=g)
    w1, b1 = torch.randn(m, c, 3, 3, generator=g), torch.randn(m, generator=g)
    w2, b2 = torch.randn(c_out, m, 3, 3, generator=g), torch.randn(c_out, generator=g)
    spec1, spec2 = ConvSpec((stride, stride), (1, 1), (1, 1)), ConvSpec((1, 1), (1, 1), (1, 1))
    if kind == GATE_MLP:
        j = 1 + seed % 8
        operands = [torch.randn(j, c, generator=g), torch.randn(j, generator=g)]
        operands += [torch.randn(m, j, generator=g), torch.randn(m, generator=g)]
        binary = True
    elif kind == GATE_KWTA:
        operands = [torch.randn(m, c, generator=g), torch.randn(m, generator=g)] * 2
        binary = False
    elif kind == GATE_GIVEN:
        given_scale = (torch.rand(m, generator=g) < 0.5).float() * (torch.rand(m, generator=g) + 0.5)
        operands, binary = [given_scale] * 4, flag
    else:
        operands, binary = [torch.tensor([0.0 if flag else 0.9])] * 4, True
    gate = NativeGate(kind, *operands, k if kind == GATE_KWTA else int(binary))
    with kernel_engine("native"), MacCounter() as counter:
        y, scale, kept = gated_pair_single(x, gate, w1, b1, w2, b2, spec1, spec2)
    expected, margin = _python_decision(kind, x, gate, w1, b1, spec1)
    clear = margin > MARGIN
    torch.testing.assert_close(scale[clear], expected[clear], rtol=1e-5, atol=1e-5)
    assert kept == int((scale != 0).sum())
    # The convolutions are exactly the sliced pair of the decision the kernel took.
    with kernel_engine("torch"):
        ref, k_ref = sliced_pair_single(x, w1, b1, w2, b2, scale, spec1, spec2, binary=binary)
    assert kept == k_ref
    torch.testing.assert_close(y, ref.expand_as(y), rtol=1e-4, atol=1e-4)
    plane = 9 * y.shape[2] * y.shape[3]
    if kind == GATE_INSTANCE:
        assert counter.total == m * c * plane + kept * c_out * plane
    else:
        gate_macs = {GATE_MLP: operands[0].numel() + operands[2].numel(), GATE_KWTA: m * c}.get(kind, 0)
        assert counter.total == gate_macs + kept * (c + c_out) * plane


def test_gated_pair_fused_epilogue_and_empty_decision() -> None:
    with kernel_engine("native"):
        g = torch.Generator().manual_seed(1)
        x, residual = torch.randn(1, 4, 6, 6, generator=g), torch.randn(1, 5, 6, 6, generator=g)
        w1, b1, w2, b2 = torch.randn(3, 4, 3, 3), torch.randn(3), torch.randn(5, 3, 3, 3), torch.randn(5)
        spec = ConvSpec((1, 1), (1, 1), (1, 1))
        off = torch.zeros(3)
        y, scale, kept = gated_pair_single(
            x, NativeGate(GATE_GIVEN, off, off, off, off, 1), w1, b1, w2, b2, spec, spec, residual=residual, relu=True
        )
        assert kept == 0 and not scale.any()
        torch.testing.assert_close(y, torch.relu(residual + b2.view(1, -1, 1, 1)))


def test_gated_pair_rejects_bad_operands() -> None:
    with kernel_engine("native"):
        op = torch.ops.dynnet.gated_pair3x3
        x, w1, b1 = torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3), torch.randn(6)
        w2, b2, s = torch.randn(3, 6, 3, 3), torch.randn(3), torch.ones(6)
        with pytest.raises(RuntimeError, match="gate must be 0"):
            op(x, 7, s, s, s, s, 1, w1, b1, w2, b2, 1)
        with pytest.raises(RuntimeError, match="gw1 must have 6 rows"):
            op(x, GATE_GIVEN, torch.ones(5), s, s, s, 1, w1, b1, w2, b2, 1)
        with pytest.raises(RuntimeError, match="gw1 must have 6 rows and columns: 4"):
            op(x, GATE_KWTA, torch.randn(6, 3), s, s, s, 2, w1, b1, w2, b2, 1)
        with pytest.raises(RuntimeError, match=r"k must be in \[1, 6\]"):
            op(x, GATE_KWTA, torch.randn(6, 4), s, s, s, 0, w1, b1, w2, b2, 1)
        with pytest.raises(RuntimeError, match="one sample"):
            op(torch.randn(2, 4, 5, 5), GATE_GIVEN, s, s, s, s, 1, w1, b1, w2, b2, 1)


def test_agent_step_equals_the_python_step() -> None:
    """The compiled RNP/RNR agent step: the same Q-values, next state and greedy action as ``QAgent.step``."""
    from dynnet.methods.channel._agent import QAgent, _register_agent_rule

    with kernel_engine("native"), torch.no_grad():
        torch.manual_seed(0)
        agent = QAgent([4, 8], actions=5, hidden=6, epsilon=0.0).eval()
        for p in agent.parameters():
            p.normal_(0, 0.7)
        _register_agent_rule()
        state = torch.zeros(1, 6)
        for index, channels in enumerate((4, 8)):
            x = torch.randn(1, channels, 7, 5)
            q_ref, state_ref = agent.step(x, state, index)
            enc = agent.encoders[index]
            rnn, dec = agent.rnn, agent.decoder
            args = (enc.weight, enc.bias, rnn.weight_ih, rnn.weight_hh, rnn.bias_ih, rnn.bias_hh, dec.weight, dec.bias)
            with MacCounter() as counter:
                q, nxt, action = torch.ops.dynnet.agent_step(x, *args, state)
            torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(nxt, state_ref, rtol=1e-5, atol=1e-5)
            assert action == int(q_ref.argmax())
            with MacCounter() as python:
                agent.step(x, state, index)
            assert counter.total == python.total
            state = nxt
        with pytest.raises(RuntimeError, match="state must be"):
            torch.ops.dynnet.agent_step(x, *args, torch.zeros(1, 5))


def test_routed_pair_is_the_agent_step_then_the_given_pair() -> None:
    """``routed_pair3x3`` = ``agent_step`` (state updated in place) + ``gated_pair3x3`` with the action's mask row,
    the projection shortcut included, and counts the sum of their MACs."""
    from dynnet.methods.channel._agent import _register_agent_rule

    with kernel_engine("native"), torch.no_grad():
        g = torch.Generator().manual_seed(3)
        c, m, c_out, j, actions = 6, 8, 10, 5, 4
        x = torch.randn(1, c, 9, 7, generator=g)
        agent = [torch.randn(j, c, generator=g), torch.randn(j, generator=g)]
        agent += [torch.randn(3 * j, j, generator=g), torch.randn(3 * j, j, generator=g)]
        agent += [torch.randn(3 * j, generator=g), torch.randn(3 * j, generator=g)]
        agent += [torch.randn(actions, j, generator=g), torch.randn(actions, generator=g)]
        masks = (torch.rand(actions, m, generator=g) < 0.5).float()
        w1, b1 = torch.randn(m, c, 3, 3, generator=g), torch.randn(m, generator=g)
        w2, b2 = torch.randn(c_out, m, 3, 3, generator=g), torch.randn(c_out, generator=g)
        sw, sb = torch.randn(c_out, c, generator=g), torch.randn(c_out, generator=g)
        state = torch.randn(1, j, generator=g)
        _register_agent_rule()
        from dynnet.kernels.channel._compiled import compiled_op
        from dynnet.kernels.channel._gated import _gated_macs

        compiled_op("gated_pair3x3", _gated_macs)  # its MAC rule, registered on first use (this test may run alone)
        with MacCounter() as step_count:
            _, expected_state, action = torch.ops.dynnet.agent_step(x, *agent, state)
        row = masks[action].contiguous()
        with MacCounter() as pair_count:
            expected, _, kept = torch.ops.dynnet.gated_pair3x3(
                x, GATE_GIVEN, row, row, row, row, 1, w1, b1, w2, b2, 2, None, True, sw, sb
            )
        with MacCounter() as routed_count:
            y, got_action, got_kept = torch.ops.dynnet.routed_pair3x3(
                x, state, *agent, masks, w1, b1, w2, b2, 2, None, True, sw, sb
            )
        assert (got_action, got_kept) == (action, kept)
        torch.testing.assert_close(y, expected, rtol=0, atol=0)
        torch.testing.assert_close(state, expected_state, rtol=1e-6, atol=1e-6)  # updated in place
        assert routed_count.total == step_count.total + pair_count.total
        # The shortcut is the BN-folded 1×1 convolution of stride 2.
        shortcut = F.conv2d(x, sw[:, :, None, None], sb, stride=2)
        with kernel_engine("torch"):
            ref, _ = sliced_pair_single(
                x, w1, b1, w2, b2, row, ConvSpec((2, 2), (1, 1), (1, 1)), ConvSpec((1, 1), (1, 1), (1, 1)),
                binary=True, residual=shortcut, relu=True,
            )  # fmt: skip
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
        with pytest.raises(RuntimeError, match="masks must be"):
            torch.ops.dynnet.routed_pair3x3(x, state, *agent, masks[:, :3], w1, b1, w2, b2, 2)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    st.integers(1, 4),
    st.integers(1, 20),
    st.integers(1, 20),
    st.sampled_from([1, 2]),
    st.sampled_from([1, 2]),
    st.integers(0, 2**31 - 1),
)
def test_gater_logits_equal_the_folded_python_gater(c: int, h: int, w: int, s1: int, s2: int, seed: int) -> None:
    """``gater_logits`` (GaterNet's folded gater in one call) computes the PyTorch layers' logits and counts the MACs
    the counter counts for them."""
    from dynnet.methods.channel.gaternet import _gater_op

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, c, h, w, generator=g)
    w1, b1 = torch.randn(6, c, 3, 3, generator=g), torch.randn(6, generator=g)
    w2, b2 = torch.randn(10, 6, 3, 3, generator=g), torch.randn(10, generator=g)
    wl, bl = torch.randn(7, 10, generator=g), torch.randn(7, generator=g)
    wf, bf = torch.randn(5, 7, generator=g), torch.randn(5, generator=g)
    with torch.no_grad(), MacCounter() as python:
        hidden = F.conv2d(F.conv2d(x, w1, b1, s1, 1).relu(), w2, b2, s2, 1).relu()
        ref = torch.addmm(bf, torch.addmm(bl, hidden.mean((2, 3)), wl.t()).relu(), wf.t())
    with kernel_engine("native"), MacCounter() as compiled:
        got = _gater_op()(x, w1, b1, s1, w2, b2, s2, wl, bl, wf, bf)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert compiled.total == python.total


def test_gater_logits_on_a_large_image_split_over_threads() -> None:
    """224 × 224: the second convolution is large enough to run on several threads (per-block partial sums)."""
    from dynnet.methods.channel.gaternet import _gater_op

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 224, 224, generator=g)
    w1, b1 = torch.randn(16, 3, 3, 3, generator=g), torch.randn(16, generator=g)
    w2, b2 = torch.randn(32, 16, 3, 3, generator=g), torch.randn(32, generator=g)
    wl, bl, wf, bf = torch.randn(8, 32), torch.randn(8), torch.randn(4, 8), torch.randn(4)
    hidden = F.conv2d(F.conv2d(x, w1, b1, 2, 1).relu(), w2, b2, 2, 1).relu()
    ref = torch.addmm(bf, torch.addmm(bl, hidden.mean((2, 3)), wl.t()).relu(), wf.t())
    with kernel_engine("native"):
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            got = _gater_op()(x, w1, b1, 2, w2, b2, 2, wl, bl, wf, bf)
        finally:
            torch.set_num_threads(threads)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)
        with pytest.raises(RuntimeError, match="strides must be 1 or 2"):
            _gater_op()(x, w1, b1, 3, w2, b2, 2, wl, bl, wf, bf)
        with pytest.raises(RuntimeError, match="wl must have 8 rows and columns: 32"):
            _gater_op()(x, w1, b1, 2, w2, b2, 2, wl[:, :5].contiguous(), bl, wf, bf)
