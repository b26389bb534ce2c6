"""`DynamicBlock`: the base of every block whose computation depends on the input.

Every dynamic block has three execution modes:

* ``"masked"`` — dense compute multiplied by the decision: differentiable, used in training, the reference.
* ``"sparse"`` — the skipped work is really not done (batch compaction, channel slicing, gathers, ...);
  inference only: a block in sparse mode that is in training mode runs masked, because compaction
  would change batch-norm statistics.
* ``"dense"`` — the original static computation, no gate evaluated: the base network, used for
  baselines and cost profiles.

Per-batch data never lives on the module: decisions and MACs go to the active trace.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from itertools import chain
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from dynnet.core.trace import no_trace

__all__ = [
    "MODES",
    "DynamicBlock",
    "dynamic_blocks",
    "force_dense",
    "forcing_dense",
    "kept_modes",
    "probe_macs",
    "run_on_meta",
    "set_mode",
    "set_tau",
    "sparse",
]

MODES = ("masked", "sparse", "dense")
_FORCE_DENSE: ContextVar[bool] = ContextVar("dynnet_force_dense", default=False)


@contextmanager
def force_dense() -> Iterator[None]:
    """Within this scope every dynamic block runs its dense (static) path."""
    token = _FORCE_DENSE.set(True)
    try:
        yield
    finally:
        _FORCE_DENSE.reset(token)


def forcing_dense() -> bool:
    """Whether :func:`force_dense` is active."""
    return _FORCE_DENSE.get()


class _Call(nn.Module):
    """Holds a module so that ``torch.func.functional_call`` can run any function of it."""

    def __init__(self, module: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.m = module
        self.fn = fn

    def forward(self, *args: Any) -> Any:
        return self.fn(self.m, *args)


def run_on_meta(module: nn.Module, fn: Callable[..., Any], *inputs: Tensor) -> Any:
    """``fn(module, *inputs)`` on the meta device: parameters, buffers and inputs (batch 2) are meta tensors.

    Nothing is computed and no state of ``module`` changes; the ops are hidden from MAC counters entered
    before the call (a counter entered inside ``fn`` counts them) and nothing is recorded into the trace.
    Batch 2, not 1: batch norm in training mode refuses a single value per channel.

    Args:
        module: the module whose parameters ``fn`` uses.
        fn: ``fn(module, *inputs)``.
        inputs: example inputs, Tensor[N, ...]; only their shapes from dim 1 on matter.
    """
    from dynnet.macs.counter import suspend_counting

    state = {
        f"m.{k}": v.to("meta")
        for k, v in chain(module.named_parameters(), module.named_buffers(remove_duplicate=False))
    }
    meta_inputs = tuple(torch.empty((2, *x.shape[1:]), dtype=x.dtype, device="meta") for x in inputs)
    with torch.no_grad(), no_trace(), suspend_counting():
        return torch.func.functional_call(_Call(module, fn), state, meta_inputs, strict=False)


def probe_macs(module: nn.Module, fn: Callable[..., Any], *inputs: Tensor) -> int:
    """MACs per sample of ``fn(module, *inputs)`` with every dynamic block dense, measured by :func:`run_on_meta`.

    Args:
        module: the module whose parameters ``fn`` uses.
        fn: ``fn(module, *inputs)``, e.g. ``lambda m, x: m.body(x)``.
        inputs: example inputs, Tensor[N, ...]; only their shapes from dim 1 on matter.

    Returns:
        MACs for one sample.
    """
    from dynnet.macs.counter import MacCounter

    def counted(m: nn.Module, *args: Tensor) -> int:
        with MacCounter() as counter:
            fn(m, *args)
        return counter.total

    with force_dense():
        total = run_on_meta(module, counted, *inputs)
    if total % 2:
        raise RuntimeError(f"MACs of {type(module).__name__} are not linear in the batch size ({total} for 2)")
    return total // 2


class DynamicBlock(nn.Module):
    """Base class of dynamic blocks.

    Subclasses implement :meth:`forward_masked`, :meth:`forward_sparse` and :meth:`forward_dense`, and
    record their decision and per-sample MACs into the active trace (when there is one).

    Attributes:
        granularity: what this block's decisions switch (see the glossary).
        mode: one of ``MODES``.
        block_name: dotted path of the block in the converted model (set by conversion).
        tau: the estimator temperature used in training.
    """

    granularity: ClassVar[str] = "layer"

    def __init__(self) -> None:
        super().__init__()
        self.mode = "masked"
        self.block_name = ""
        self.tau = 1.0
        self._macs_cache: dict[tuple, int] = {}

    def forward(self, *args: Tensor) -> Tensor:
        if _FORCE_DENSE.get() or self.mode == "dense":
            return self.forward_dense(*args)
        if self.mode == "sparse" and not self.training:
            return self.forward_sparse(*args)
        return self.forward_masked(*args)

    def forward_masked(self, *args: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_sparse(self, *args: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_dense(self, *args: Tensor) -> Tensor:
        raise NotImplementedError

    def cost(self, part: str, fn: Callable[..., Any], *inputs: Tensor) -> int:
        """Per-sample MACs of ``fn(self, *inputs)``, probed once per input shape and cached.

        Args:
            part: a name for the measured computation (``"body"``, ``"gate"``, ...).
            fn: function of the block and the inputs.
            inputs: Tensor[N, ...] inputs; the cache key is their shape without the batch dim.
        """
        # int(): under the TorchScript tracer sizes are tensors, which would hash by identity and miss every time.
        key = (part, *(tuple(int(d) for d in x.shape[1:]) for x in inputs))
        if key not in self._macs_cache:
            self._macs_cache[key] = probe_macs(self, fn, *inputs)
        return self._macs_cache[key]

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, granularity={self.granularity!r}"


def dynamic_blocks(model: nn.Module) -> Iterator[tuple[str, DynamicBlock]]:
    """All dynamic blocks of ``model`` with their dotted names."""
    for name, m in model.named_modules():
        if isinstance(m, DynamicBlock):
            yield name, m


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Set the execution mode of every dynamic block of ``model``; returns ``model``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for _, block in dynamic_blocks(model):
        block.mode = mode
    return model


@contextmanager
def kept_modes(model: nn.Module) -> Iterator[None]:
    """Within this scope the execution modes of ``model``'s dynamic blocks and its train/eval flag may change; both
    are restored on exit (also when the scope raises)."""
    modes = {name: block.mode for name, block in dynamic_blocks(model)}
    was_training = model.training
    try:
        yield
    finally:
        for name, block in dynamic_blocks(model):
            block.mode = modes.get(name, block.mode)
        model.train(was_training)


def sparse(model: nn.Module) -> nn.Module:
    """Switch ``model`` to real skipping for inference (eval mode + sparse execution); returns it."""
    return set_mode(model.eval(), "sparse")


def set_tau(model: nn.Module, tau: float) -> None:
    """Set the estimator temperature of every dynamic block.

    Raises:
        TypeError: ``tau`` is not a real number (a string, a bool, ``None``...).
        ValueError: ``tau`` is not positive (0, negative, NaN).
    """
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise TypeError(f"tau must be a positive number, got {type(tau).__name__} {tau!r}")
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau!r}")
    for _, block in dynamic_blocks(model):
        block.tau = float(tau)
