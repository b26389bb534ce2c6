"""Gates computed from globally pooled features (ConvNet-AIG, SkipNet FFGate-II, FBS, ...)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GateBatchNorm1d", "PooledMLPGate", "open_bias_"]

# A logit of 3 gives p(open) = 0.95: decisions are open at start, and the softmax gradient (p(1-p) = 0.045)
# is large enough for a short schedule to move the gates (at 6 it is 0.0025 and they barely move).
OPEN_LOGIT = 3.0


def open_bias_(linear: nn.Linear, *, open_index: int | None = None, logit: float = OPEN_LOGIT) -> nn.Linear:
    """Initialise the last layer of a gate so that it starts open (the "bias trick").

    The weights are made tiny so the bias decides; with ``open_index`` the layer outputs class logits
    and only that class gets the large bias, otherwise every output (a per-unit "on" logit) does.
    """
    with torch.no_grad():
        nn.init.normal_(linear.weight, std=1e-3)
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

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(self.pool(x).flatten(1))
        return self.fc2(self.act(self.bn(h)))
