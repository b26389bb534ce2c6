"""Shared pieces of the layer-skip recipes whose decisions come from outside the blocks.

SkipNet's recurrent gate, BlockDrop's policy network and Dual Dynamic Inference's exits need control
flow around the blocks, so their models override :meth:`DynamicModel.run` and run the network themselves:
``stem → stages of blocks → head``, the network's :class:`~dynnet.convert.NetworkLayout`
(:func:`dynnet.convert.network_layout`).

:class:`~dynnet.blocks.DecisionMaker` (re-exported here) is the base of their decision-making modules.

:func:`gate_logit_knob` is the calibration knob of the recipes whose decisions threshold a logit at 0 (SkipNet,
BlockDrop, EnergyNet, Dynamic Multi-path, Dual Dynamic Inference): one offset added, in place, to the final bias of
every decision maker that reports its open logits (``open_logits()``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dynnet.blocks import LogitEntry
from dynnet.core import Decision
from dynnet.core.budget import LogitShift
from dynnet.estimators import gumbel_sigmoid
from dynnet.gates import PooledMLPGate
from dynnet.methods.layer_skip.gated_residual import GatedResidual

if TYPE_CHECKING:
    from dynnet.core import DynamicModel
    from dynnet.core.budget import Knob

__all__ = ["SigmoidGatedResidual", "gate_logit_knob"]


def gate_logit_knob(model: DynamicModel, *, name: str = "gate logit offset") -> Knob:
    """One offset added to the open logit of every decision of ``model`` (the MAC fraction grows with it).

    The entries come from every submodule with an ``open_logits()`` method; the shift edits their final biases in
    place, which is what the training and inference paths (folded gate caches included) read, and the applied value
    is kept in ``model.calibration[0]`` (both round-trip through ``state_dict``).

    Raises:
        ValueError: no submodule reports an open logit.
    """
    entries = [e for m in model.modules() if m is not model and hasattr(m, "open_logits") for e in m.open_logits()]
    return LogitShift(model.calibration[0], entries).knob(name=name)


class SigmoidGatedResidual(GatedResidual):
    """A gated residual block whose gate outputs one logit: Gumbel-Sigmoid, straight-through hard decisions."""

    def open_logits(self) -> list[LogitEntry]:
        """The gate's keep logit is its last linear layer's output: shift that layer's bias."""
        return [(self.gate.fc2.bias, None, 1.0)]

    def decide(self, x: Tensor) -> Decision:
        if not self.training and isinstance(self.gate, PooledMLPGate):
            # Inference: sigmoid(logit / tau) > 0.5 is logit > 0; the gate runs with its BN folded (same MACs).
            logit = self.gate.inference_logits(x).squeeze(1)
            return Decision((logit > 0).to(logit.dtype), torch.sigmoid(logit), "layer")
        logit = self.gate(x).squeeze(1)
        hard, prob = gumbel_sigmoid(logit, self.tau, hard=True, noise=self.training)
        return Decision(hard, prob, "layer")
