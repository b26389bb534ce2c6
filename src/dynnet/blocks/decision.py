"""Decision makers that live outside the blocks they decide for."""

from __future__ import annotations

from torch import Tensor

from dynnet.core import DynamicBlock

__all__ = ["DecisionMaker", "LogitEntry"]

LogitEntry = tuple[Tensor, int | None, float]
"""``(bias, index, sign)``: a decision's "open" logit is ``sign * bias[index]`` plus a term that does not depend on
the bias (``index=None``: every element of ``bias``), as :class:`~dynnet.core.budget.LogitShift` takes it."""


class DecisionMaker(DynamicBlock):
    """A module the static network does not have and that decides for blocks elsewhere (a policy network, a shared
    recurrent gate, RNP's agent, GaterNet's gater, an exit classifier); its dense path returns ``None``.

    In dense mode (and under ``force_dense()``, where the static MAC profile is probed) no decision is evaluated and
    the model runs its base network. Subclasses implement :meth:`decide`; masked and sparse modes both call it (a
    decision is computed the same way whether the blocks then skip for real or not). ``granularity`` is the
    :class:`~dynnet.core.DynamicBlock` default (``"layer"``); channel controllers set ``"channel"``.
    """

    def decide(self, *args: Tensor) -> tuple[Tensor, ...] | Tensor:
        raise NotImplementedError

    def open_logits(self) -> list[LogitEntry]:
        """The biases that shift this module's keep/open logits (for a logit-shift calibration knob such as
        :func:`dynnet.methods.layer_skip._resnet.gate_logit_knob`); none by default."""
        return []

    def forward_dense(self, *args: Tensor) -> None:
        return None

    def forward_masked(self, *args: Tensor) -> tuple[Tensor, ...] | Tensor:
        return self.decide(*args)

    def forward_sparse(self, *args: Tensor) -> tuple[Tensor, ...] | Tensor:
        return self.decide(*args)
