"""``MacCounter``: counts the MACs of every aten op that runs inside it, per module and per op.

The counter is a ``TorchDispatchMode``: it sees the aten ops below autograd, looks each one up in
:data:`~dynnet.macs.rules.MAC_RULES` and returns the op's result untouched, so gradients, ``torch.no_grad()``,
train and eval mode all behave as without it. Ops without a rule are first decomposed when they have a
composite decomposition (as ``torch.utils.flop_counter.FlopCounterMode`` does); the rest are either free by
convention (:func:`~dynnet.macs.rules.is_zero_cost`) or reported by :meth:`MacCounter.uncounted_ops`.

Semantics worth knowing:

* Only forward work is counted: ops run by the autograd engine during ``backward()`` are ignored.
* Every ``with`` block on a counter that is not already active starts from zero.
* Counters nest: each counts every op executed while it is active, so an outer counter includes whatever an
  inner one counted.
* :func:`suspend_counting` hides ops from every counter entered *outside* it. A counter entered *inside* the
  suspended region counts normally: that is how a dynamic block measures its own cost in the middle of a
  counted forward without the enclosing counter seeing the probe.
* ``torch.compile`` graphs and higher-order ops are not supported; count the eager model.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.hooks import RemovableHandle

from dynnet.macs.rules import MAC_RULES, is_zero_cost

__all__ = ["MacCounter", "counting_suspended", "suspend_counting"]

_SUSPEND_LEVEL: ContextVar[int] = ContextVar("dynnet_macs_suspend_level", default=0)

aten = torch.ops.aten
# Metadata queries that tensor subclasses with custom sizes (nested tensors) must answer themselves; returning
# NotImplemented hands them back, exactly as FlopCounterMode does.
_METADATA_OPS = {
    aten.sym_is_contiguous.default,
    aten.is_contiguous.default,
    aten.is_contiguous.memory_format,
    aten.is_strides_like_format.default,
    aten.is_non_overlapping_and_dense.default,
    aten.size.default,
    aten.sym_size.default,
    aten.stride.default,
    aten.sym_stride.default,
    aten.storage_offset.default,
    aten.sym_storage_offset.default,
    aten.numel.default,
    aten.sym_numel.default,
    aten.dim.default,
    torch.ops.prim.layout.default,
}


@contextlib.contextmanager
def suspend_counting() -> Iterator[None]:
    """Hides the ops run inside the block from every :class:`MacCounter` entered before it.

    Counters entered inside the block count normally. Nesting is allowed.
    """
    token = _SUSPEND_LEVEL.set(_SUSPEND_LEVEL.get() + 1)
    try:
        yield
    finally:
        _SUSPEND_LEVEL.reset(token)


def counting_suspended() -> bool:
    """Whether the caller runs inside a :func:`suspend_counting` block."""
    return _SUSPEND_LEVEL.get() > 0


class MacCounter(TorchDispatchMode):
    """Counts the MACs (one MAC = one fused multiply-add) of every aten op executed inside the context.

    Example::

        model = torchvision.models.resnet18()
        with torch.no_grad(), MacCounter(model) as counter:
            model(torch.randn(1, 3, 224, 224))
        counter.total  # 1_814_073_344 (1.81 GMACs)
        counter.by_module()["layer1.0.conv1"]

    Args:
        model: Module whose hierarchy names :meth:`by_module`. Without it only the root entry ``""`` exists.
    """

    def __init__(self, model: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self._names: dict[int, str] = {}
        self._stack: list[str] = []
        self._by_module: Counter[str] = Counter()
        self._by_op: Counter[str] = Counter()
        self._uncounted: Counter[str] = Counter()
        self._hooks: list[RemovableHandle] = []
        self._depth = 0
        self._suspend_level = 0

    def __enter__(self) -> MacCounter:
        if self._depth == 0:
            self._start()
        self._depth += 1
        super().__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        try:
            super().__exit__(*exc_info)
        finally:
            self._depth -= 1
            if self._depth == 0:
                for hook in self._hooks:
                    hook.remove()
                self._hooks.clear()

    def _start(self) -> None:
        self._by_module.clear()
        self._by_op.clear()
        self._uncounted.clear()
        self._stack.clear()
        self._suspend_level = _SUSPEND_LEVEL.get()
        self._names = {} if self.model is None else {id(m): name for name, m in self.model.named_modules()}
        if self._names:
            self._hooks = [
                register_module_forward_pre_hook(self._enter_module),
                register_module_forward_hook(self._exit_module, always_call=True),
            ]

    def _counting(self) -> bool:
        # The autograd engine runs backward ops with a graph task id; those are not inference cost.
        return _SUSPEND_LEVEL.get() <= self._suspend_level and torch._C._current_graph_task_id() == -1

    def _enter_module(self, module: nn.Module, args: Any) -> None:
        name = self._names.get(id(module))
        if name is not None:
            self._stack.append(name)
            if self._counting():
                self._by_module[name] += 0  # list modules that ran, even at 0 MACs

    def _exit_module(self, module: nn.Module, args: Any, output: Any) -> None:
        name = self._names.get(id(module))
        if name is not None and name in self._stack:
            # Pop the innermost entry of this module (robust to a forward that raised in a child).
            index = len(self._stack) - 1 - self._stack[::-1].index(name)
            del self._stack[index:]

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _METADATA_OPS:
            return NotImplemented
        if not self._counting():
            return func(*args, **kwargs)
        rule = MAC_RULES.get(func.overloadpacket)
        if rule is None:
            with self:
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
            if not is_zero_cost(func):
                self._uncounted[str(func.overloadpacket)] += 1
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        macs = int(rule(args, kwargs, out))
        self._by_op[str(func.overloadpacket)] += macs
        for name in {"", *self._stack}:
            self._by_module[name] += macs
        return out

    @property
    def total(self) -> int:
        """All MACs counted."""
        return sum(self._by_op.values())

    def by_module(self) -> dict[str, int]:
        """Inclusive MACs per module, keyed by dotted path relative to ``model``.

        The root is ``""`` and holds :attr:`total` (ops run outside ``model`` count there only). Every other
        module of ``model`` that ran appears, in ``named_modules()`` order, even at 0 MACs. A module shared
        under several paths is listed under its first path.
        """
        order = [""] + [name for name in self._names.values() if name in self._by_module and name]
        return {name: self._by_module[name] for name in order}

    def by_op(self) -> dict[str, int]:
        """MACs per aten op packet, e.g. ``{"aten.convolution": ..., "aten.addmm": ...}``."""
        return dict(self._by_op)

    def uncounted_ops(self) -> dict[str, int]:
        """Call counts of ops that ran without a rule and are not free by convention; their MACs are missing."""
        return dict(self._uncounted)
