"""Gates computed from globally pooled features (ConvNet-AIG, SkipNet FFGate-II, FBS, ...)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.core.cache import tracing_or_compiling, version_key
from dynnet.kernels.channel import GATE_MLP, NativeGate, fold_bn

__all__ = ["GateBatchNorm1d", "PooledMLPGate", "open_bias_"]

# A logit of 3 gives p(open) = 0.95: decisions are open at start, and the softmax gradient (p(1-p) = 0.045)
# is large enough for a short schedule to move the gates (at 6 it is 0.0025 and they barely move).
OPEN_LOGIT = 3.0


def open_bias_(linear: nn.Linear, *, open_index: int | None = None, logit: float = OPEN_LOGIT) -> nn.Linear:
    """Initialise the last layer of a gate so that it starts open (the "bias trick").

    The weights are zero so that only the bias speaks, whatever the scale of the features reaching the gate (a
    trained network's, with its BatchNorm statistics, can be large: tiny random weights there closed gates of a
    fresh conversion); with ``open_index`` the layer outputs class logits and only that class gets the large bias,
    otherwise every output (a per-unit "on" logit) does. The weights get a gradient from the first step.
    """
    with torch.no_grad():
        linear.weight.zero_()
        if linear.bias is None:
            raise ValueError("the gate's last layer needs a bias to start open")
        linear.bias.zero_()
        if open_index is None:
            linear.bias.fill_(logit)
        else:
            linear.bias[open_index] = logit
    return linear


class GateBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d for decision networks that also trains on a batch of one sample.

    One sample has no batch statistics (the last batch of an epoch can be a single image): it is normalised
    with the running statistics, as in eval, which stay unchanged. Same parameters and state_dict keys as
    ``nn.BatchNorm1d``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.shape[0] == 1:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=self.eps
            )
        return super().forward(x)


class PooledMLPGate(nn.Module):
    """Global average pool → Linear → BN → ReLU → Linear: Tensor[N, C, H, W] → logits Tensor[N, K].

    Args:
        in_channels: C.
        out_features: K (2 for an off/on softmax gate, 1 for a sigmoid gate, C' for channel gates).
        hidden: width of the hidden layer (ConvNet-AIG uses 16).
        open_index: for softmax gates, the index of the "open" class; ``None`` for per-unit sigmoid logits.
    """

    def __init__(self, in_channels: int, out_features: int = 2, hidden: int = 16, open_index: int | None = 1) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(in_channels, hidden, bias=False)
        self.bn = GateBatchNorm1d(hidden)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = open_bias_(nn.Linear(hidden, out_features), open_index=open_index)

        self.open_index = open_index
        self._folded: tuple[tuple, tuple[Tensor | None, ...]] | None = None

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(self.pool(x).flatten(1))
        return self.fc2(self.act(self.bn(h)))

    def inference_logits(self, x: Tensor) -> Tensor:
        """``forward(x)`` for inference (eval mode), with the BatchNorm folded into the first layer.

        Tensor[N, C, H, W] → logits Tensor[N, K]: three kernels (sum, addmm + ReLU, addmm) instead of six
        module calls, which matters at batch 1 where a gate costs more in overhead than in MACs. Same MACs.
        """
        if self.training or tracing_or_compiling():
            return self(x)
        w1, b1, w2, b2, _, _ = self._inference_weights()
        h = torch.addmm(b1, x.sum((2, 3)), w1.t(), alpha=1.0 / (x.shape[2] * x.shape[3])).relu_()
        return torch.addmm(b2, h, w2.t())

    def inference_open(self, x: Tensor) -> Tensor:
        """For an off/on gate (K = 2, ``open_index`` set): Tensor[N] bool, whether the open logit wins.

        Equals ``forward(x).argmax(1) == open_index`` (ties go to "off") in eval mode up to rounding, computed
        as the sign of one folded logit difference.
        """
        if self.open_index is None:
            raise ValueError("inference_open needs a two-logit gate with an open_index")
        if self.training or tracing_or_compiling():
            logits = self(x)
            return logits[:, self.open_index] > logits[:, 1 - self.open_index]
        w1, b1, _, _, wd, bd = self._inference_weights()
        if wd is None:
            raise ValueError("inference_open needs a two-logit gate with an open_index")
        h = torch.addmm(b1, x.sum((2, 3)), w1.t(), alpha=1.0 / (x.shape[2] * x.shape[3])).relu_()
        return torch.addmm(bd, h, wd).squeeze(1) > 0  # addmm, not addmv: autocast knows addmm

    def native_gate(self) -> NativeGate | None:
        """This gate as the pooled-MLP gate of the compiled gated pair (:data:`~dynnet.kernels.channel.GATE_MLP`:
        channel ``c`` kept where its logit is positive), for per-unit gates (``open_index=None``) in eval mode;
        otherwise ``None``."""
        if self.training or self.open_index is not None or tracing_or_compiling():
            return None
        w1, b1, w2, b2, _, _ = self._inference_weights()
        return NativeGate(GATE_MLP, w1, b1, w2, b2, 0, self._inference_sources())

    def _inference_sources(self) -> tuple[Tensor, ...]:
        """The tensors the folded inference weights derive from."""
        # Read the tensors from the module dicts: nn.Module.__getattr__ would cost more than the gate's math.
        fc1, bn, fc2 = self._modules["fc1"], self._modules["bn"], self._modules["fc2"]
        p, b = bn._parameters, bn._buffers
        return (
            fc1._parameters["weight"],
            p["weight"],
            p["bias"],
            b["running_mean"],
            b["running_var"],
            b["num_batches_tracked"],  # the batch-norm kernel updates the running stats without a version bump
            fc2._parameters["weight"],
            fc2._parameters["bias"],
        )

    def _inference_weights(self) -> tuple[Tensor, ...]:
        """Folded ``(W1·γ/σ, β - μγ/σ, W2, b2, W2[open] - W2[off], b2[open] - b2[off])``, cached until a
        parameter or running statistic changes (:func:`dynnet.core.version_key` is the cache key)."""
        fc1, bn, fc2 = self._modules["fc1"], self._modules["bn"], self._modules["fc2"]
        key = version_key(*self._inference_sources())
        folded = self._folded
        if key is not None and folded is not None and folded[0] == key:
            return folded[1]
        with torch.inference_mode(False), torch.no_grad():
            w1, shift = fold_bn(fc1, bn)  # fc1 has no bias: shift is the batch norm's
            w1 = w1.contiguous()
            w2, b2 = fc2.weight.detach().clone(), fc2.bias.detach().clone()
            if self.open_index is not None and w2.shape[0] == 2:
                o = self.open_index
                wd, bd = (w2[o] - w2[1 - o]).reshape(-1, 1).contiguous(), (b2[o] - b2[1 - o]).reshape(1)
            else:
                wd, bd = None, None  # inference_open is for two-logit gates only
        weights = (w1, shift.contiguous(), w2, b2, wd, bd)
        if key is not None:  # meta (MAC probe) and inference tensors have no version to key a cache on
            self._folded = (key, weights)
        return weights
