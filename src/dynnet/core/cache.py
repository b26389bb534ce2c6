"""Keys for inference caches (folded batch norms, packed weights, per-mask plans): derived data only.

A cache entry is valid while :func:`version_key` of its source tensors is unchanged; nothing is cached under
tracing or compilation (:func:`tracing_or_compiling`), where cached tensors would be baked into the graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["structure_generation", "tracing_or_compiling", "version_key"]


def version_key(*tensors: Tensor | None) -> tuple | None:
    """A cache key that changes whenever one of ``tensors`` is replaced or edited in place.

    ``(data_ptr, _version)`` per tensor: assigning a new tensor changes the pointer, an in-place edit (optimiser
    step, ``load_state_dict``, ``fill_``) bumps the version counter. ``None`` (do not cache) when a tensor has no
    version counter: inference tensors, and the meta tensors a MAC probe substitutes for the parameters.
    """
    # One pass without per-tensor checks: this runs once per block per batch-1 inference.
    try:
        key = tuple([None if t is None else (t.data_ptr(), t._version) for t in tensors])
    except RuntimeError:  # an inference tensor has no version counter
        return None
    if any(k is not None and k[0] == 0 for k in key):  # meta (or empty) tensors: nothing to cache
        return None
    return key


def tracing_or_compiling() -> bool:
    """Inside the TorchScript tracer or torch.compile / torch.export: use no cached derived tensors."""
    return torch._C._get_tracing_state() is not None or torch.compiler.is_compiling()


_GENERATION = [0]


def _bump(*args: object) -> None:
    _GENERATION[0] += 1


# Every parameter, buffer or submodule registered or assigned on any module (``m.weight = nn.Parameter(...)``,
# ``load_state_dict(assign=True)``, module surgery) bumps the generation; in-place edits do not (versions catch them).
torch.nn.modules.module.register_module_parameter_registration_hook(_bump)
torch.nn.modules.module.register_module_buffer_registration_hook(_bump)
torch.nn.modules.module.register_module_module_registration_hook(_bump)


def structure_generation() -> int:
    """A counter that changes whenever a parameter, buffer or submodule is registered or replaced on any module.

    Inference plans that hold references to a module's tensors key on it (with the tensors' versions) to notice a
    replaced tensor or module, which a version counter cannot see.
    """
    return _GENERATION[0]
