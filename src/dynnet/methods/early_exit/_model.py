"""The converted early-exit network: :class:`EarlyExitModel` (objective, budget calibration, thresholds) and its
randomiser for the conformance suite."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dynnet.core import DynamicModel, LossOutput, Trace, kept_modes
from dynnet.methods.early_exit._cascade import ExitCascade
from dynnet.methods.early_exit._common import budget_exit_weights
from dynnet.testing.scramble import register_randomiser

__all__ = ["EarlyExitModel"]


# ---------------------------------------------------------------------------------------------- model
class EarlyExitModel(DynamicModel):
    """A converted early-exit network (``net`` is an :class:`ExitCascade`).

    The default objective is the weighted sum of the exits' cross-entropies (``config.exit_weights``, derived from
    the budget when absent: :func:`budget_exit_weights`), the joint training of BranchyNet and MSDNet.

    Budget: the exits' thresholds (a buffer or parameter ``net.gates.threshold``, in the ``state_dict``) are what
    :func:`dynnet.calibrate` sets, with MSDNet's budgeted-batch calibration (:meth:`calibrate_to_`); the geometric
    profile's parameter ``p`` is kept in ``calibration[0]``.
    """

    net: ExitCascade

    @property
    def cascade(self) -> ExitCascade:
        return self.net

    @property
    def num_exits(self) -> int:
        return self.net.num_exits

    @staticmethod
    def exit_outputs(t: Trace) -> list[Tensor]:
        """Logits of every exit recorded by a masked forward pass, Tensor[N, K] each, first exit first."""
        out, k = [], 0
        while f"exit{k}" in t.outputs:
            out.append(t.outputs[f"exit{k}"])
            k += 1
        if not out:
            raise RuntimeError("no exit logits in the trace: run the model in masked mode (training) inside trace()")
        return out

    @staticmethod
    def stop_costs(t: Trace) -> Tensor:
        """Tensor[K] float64 from a trace: MACs per sample of stopping at exit ``k``, as a fraction of the dense
        network (segments, heads and decisions of exits ``0..k``)."""
        per: dict[int, float] = {}
        for e in t.entries:
            head, _, _ = e.name.partition("/")
            if head.startswith("exit") and head[4:].isdigit():
                per[int(head[4:])] = per.get(int(head[4:]), 0.0) + e.maximum
        costs = torch.tensor([per[k] for k in sorted(per)], dtype=torch.float64)
        return costs.cumsum(0) / t.dense_macs()

    @staticmethod
    def alive(t: Trace) -> list[Tensor]:
        """Tensor[N] per exit: whether (straight-through in training) each sample reached exit ``k``."""
        stops = list(t.decisions_of("exit").values())
        out, alive = [], torch.ones_like(stops[0].hard)
        for s in stops:
            out.append(alive)
            alive = alive - s.hard
        out.append(alive)
        return out

    def exit_weights(self, t: Trace, budget: float | None = None) -> list[float]:
        """Loss weight of every exit, final one last: ``config.exit_weights`` when set, else derived from the
        budget (:func:`budget_exit_weights` on the exits' stop costs in ``t``).

        Args:
            t: the trace of a masked forward pass.
            budget: target mean MAC fraction (default: ``config.budget``).
        """
        weights = getattr(self.config, "exit_weights", None)
        if weights is None:
            return budget_exit_weights(self.stop_costs(t), self.budget if budget is None else budget)
        if len(weights) != self.num_exits:
            raise ValueError(f"exit_weights has {len(weights)} values for {self.num_exits} exits")
        return list(weights)

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        from dynnet.losses.early_exit import multi_exit_cross_entropy

        exits = self.exit_outputs(t)
        task = multi_exit_cross_entropy(exits, target, self.exit_weights(t, budget))
        parts = {"task": float(task.detach())}
        parts.update({f"ce{k}": float(F.cross_entropy(z.detach(), target)) for k, z in enumerate(exits)})
        return LossOutput(task, parts)

    # -- budget -------------------------------------------------------------------------------------
    def calibrate_to_(self, batches: list[Tensor], budget: float, tolerance: float) -> dict[str, float]:
        """Set the exits' thresholds for a mean-MAC budget with MSDNet's budgeted-batch calibration.

        One masked pass over ``batches`` gives every exit's score for every image (no labels needed); exit
        proportions follow the geometric profile ``q_k ∝ p^k``, each threshold admits the ``q_k N`` highest-scoring
        remaining images, and ``p`` is bisected until the mean MAC fraction equals ``budget``
        (:func:`~dynnet.methods.early_exit.calibration.calibrate_thresholds`). Modes are restored afterwards.

        Returns:
            ``{"exit profile p": p, "exit0 threshold": ..., ...}``.

        Raises:
            ValueError: ``budget`` lies outside the MAC fractions the thresholds reach on ``batches`` (every image
                at the first exit … every image at the last).
        """
        from dynnet.methods.early_exit.calibration import calibrate_to_budget_, collect_exits

        with kept_modes(self):
            profile = collect_exits(self, batches)
        extremes = "every image at the first exit … every image at the last"
        return calibrate_to_budget_(self, profile, budget, tolerance, extremes=extremes)

    # -- thresholds ---------------------------------------------------------------------------------
    def idle_decisions(self) -> set[str]:
        """The exits no sample can take (threshold ``NEVER``, as before calibration): training's gate-health check
        leaves them out instead of reporting them collapsed."""
        thr = self.net.gates.threshold
        return {f"exit{k}" for k in range(thr.numel()) if math.isinf(float(thr[k])) and float(thr[k]) > 0}

    @property
    def thresholds(self) -> Tensor:
        """Tensor[K - 1]: exit ``k`` is taken when its score reaches ``thresholds[k]``."""
        return self.net.gates.threshold.detach().clone()

    def set_thresholds(self, thresholds: Sequence[float] | Tensor) -> None:
        """Set every early exit's threshold (``math.inf``: never exit)."""
        thr = torch.as_tensor(thresholds, dtype=torch.float32).flatten()
        if thr.numel() != self.num_exits - 1:
            raise ValueError(f"expected {self.num_exits - 1} thresholds, got {thr.numel()}")
        with torch.no_grad():
            self.net.gates.threshold.copy_(thr)


@register_randomiser(EarlyExitModel)
def _randomise(model: EarlyExitModel, generator: torch.Generator) -> int:
    """Random decisions for testing: thresholds uniform in the score range, policies re-initialised.

    Returns:
        How many tensors were changed.
    """
    lo, hi = model.net.score_range
    changed = 0
    with torch.no_grad():
        thr = model.net.gates.threshold
        thr.copy_(lo + (hi - lo) * torch.rand(thr.shape, generator=generator))
        changed += 1
        for name, p in model.named_parameters():
            if "policy" not in name.split(".")[:-1]:
                continue
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=generator) * (2.0 if p.dim() == 1 else 1.0) / fan_in**0.5)
            changed += 1
    return changed
