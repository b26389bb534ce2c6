"""`GatedResidual`: a residual block whose branch runs only for the inputs a decision keeps.

Masked mode computes ``post(shortcut(x) + z * body(x))`` with ``z`` the straight-through decision;
sparse mode gathers the kept samples, runs the body on them alone and scatters the result back
(:func:`dynnet.kernels.compact_add`), so a skipped sample costs no body MACs.
"""

from __future__ import annotations

from torch import Tensor, nn

from dynnet.blocks.residual import AdaptedResidual
from dynnet.convert.residual import ResidualAdapter
from dynnet.core import Decision, current_trace
from dynnet.kernels import compact_add

__all__ = ["GatedResidual"]


class GatedResidual(AdaptedResidual):
    """Wraps an existing residual block; its children keep their names (state_dict keys are unchanged).

    Args:
        block: the original residual block (torchvision/timm/dynnet) — its submodules are reused.
        adapter: how to split ``block`` into body, shortcut and post-op.
        gate: module mapping the block input to logits, or ``None`` when decisions come from outside
            (a policy network or a recurrent gate passes them to :meth:`forward`).

    Subclasses implement :meth:`decide`.
    """

    granularity = "layer"

    def __init__(self, block: nn.Module, adapter: ResidualAdapter, gate: nn.Module | None) -> None:
        super().__init__(block, adapter)
        if gate is not None:
            self.gate = gate

    def gate_inference(self, x: Tensor) -> Tensor:
        """What the gate computes at inference (eval); its MACs are the gate's cost in eval. Default: ``gate(x)``."""
        return self.gate(x)

    def decide(self, x: Tensor) -> Decision:
        """The decision for input Tensor[N, C, H, W]: ``hard`` Tensor[N] of 0/1 (straight-through in training)."""
        raise NotImplementedError

    # -- modes ----------------------------------------------------------------------------------
    def forward_dense(self, x: Tensor, decision: Decision | None = None) -> Tensor:
        return self.post(self.shortcut(x) + self.body(x))

    def forward_masked(self, x: Tensor, decision: Decision | None = None) -> Tensor:
        d = self._decision(x, decision)
        z = d.hard.to(x.dtype).view(-1, 1, 1, 1)
        out = self.post(self.shortcut(x) + z * self.body(x))
        self._record(x, d, executed_body=None)
        return out

    def forward_sparse(self, x: Tensor, decision: Decision | None = None) -> Tensor:
        d = self._decision(x, decision)
        keep = d.hard.detach()  # exact 0/1 in eval
        out = self.post(compact_add(self.body, x, keep, self.shortcut(x)))
        self._record(x, d, executed_body=keep)
        return out

    # -- bookkeeping ----------------------------------------------------------------------------
    def _decision(self, x: Tensor, decision: Decision | None) -> Decision:
        if decision is None:
            decision = self.decide(x)
        if decision.hard.shape != (x.shape[0],):
            raise ValueError(
                f"{self.block_name}: expected a decision of shape ({x.shape[0]},), got {tuple(decision.hard.shape)}"
            )
        return decision

    def _record(self, x: Tensor, d: Decision, executed_body: Tensor | None) -> None:
        t = current_trace()
        if t is None:
            return
        t.record_decision(self.block_name, d)
        n = x.shape[0]
        body = self.cost("body", lambda m, inp: m.body(inp), x)
        z = d.hard.double()
        executed = body if executed_body is None else executed_body.double() * body
        t.record_macs(f"{self.block_name}/body", z * body, executed=executed, minimum=0.0, maximum=body, dense=body)
        if hasattr(self, "gate"):
            if self.training:
                g = self.cost("gate", lambda m, inp: m.gate(inp), x)
            else:
                g = self.cost("gate_inference", lambda m, inp: m.gate_inference(inp), x)
            t.record_macs(f"{self.block_name}/gate", float(g), batch_size=n, minimum=g, maximum=g)
