r"""Running a ResNet-style network block by block, for recipes whose channel decisions come from outside the blocks.

RNP's recurrent controller and GaterNet's gater network decide for every block; their models override
:meth:`DynamicModel.run` and walk ``stem → stages → pool → fc`` themselves, passing each block its decision.
Their decision makers are :class:`~dynnet.blocks.DecisionMaker`\ s with ``granularity = "channel"``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from dynnet.core import tracing_or_compiling
from dynnet.core.block import forcing_dense
from dynnet.core.cache import structure_generation
from dynnet.kernels import native

__all__ = [
    "block_compiled_ok",
    "compiled_input_ok",
    "compiled_loop_ok",
    "iter_blocks",
    "resnet_head",
    "resnet_stages",
    "resnet_stem",
]


_STAGES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # net -> (structure generation, stages)


def resnet_stages(net: nn.Module) -> list[nn.Sequential]:
    """The ``layer1, layer2, ...`` stages of ``net``, cached until a module is registered or replaced anywhere
    (batch-1 inference walks them on every call).

    Raises:
        ValueError: ``net`` is not ResNet-style (``conv1, bn1, relu, layer1.., avgpool, fc``; timm's ``act1`` and
            ``global_pool`` for ``relu`` and ``avgpool``).
    """
    cached = _STAGES.get(net)
    if cached is not None and cached[0] == structure_generation():
        return cached[1]
    needed = ("conv1", "bn1", "fc", "layer1")
    missing = [a for a in needed if not hasattr(net, a)]
    missing += [] if _stem_act(net) is not None else ["relu"]
    missing += [] if _pool(net) is not None else ["avgpool"]
    if missing:
        raise ValueError(
            f"this recipe runs ResNet-style networks (conv1, bn1, relu, layer1.., avgpool, fc: torchvision's, timm's "
            f"with act1 and global_pool, dynnet's CIFAR ResNets); {type(net).__name__} lacks {missing}"
        )
    stages, k = [], 1
    while isinstance(getattr(net, f"layer{k}", None), nn.Sequential):
        stages.append(getattr(net, f"layer{k}"))
        k += 1
    _STAGES[net] = (structure_generation(), stages)
    return stages


def resnet_stem(net: nn.Module, x: Tensor) -> Tensor:
    """``conv1 → bn1 → relu (→ maxpool)``: the first stage's input (timm: ``act1`` for ``relu``)."""
    resnet_stages(net)
    x = _stem_act(net)(net.bn1(net.conv1(x)))
    maxpool = getattr(net, "maxpool", None)
    return maxpool(x) if isinstance(maxpool, nn.Module) else x


def iter_blocks(net: nn.Module) -> Iterator[nn.Module]:
    """The blocks of every stage, in execution order."""
    for stage in resnet_stages(net):
        yield from stage


def resnet_head(net: nn.Module, x: Tensor) -> Tensor:
    """``avgpool → flatten → fc`` (timm: ``global_pool``): logits Tensor[N, K]."""
    return net.fc(torch.flatten(_pool(net)(x), 1))


def _stem_act(net: nn.Module) -> nn.Module | None:
    """The stem's activation: ``relu`` (torchvision, dynnet) or ``act1`` (timm)."""
    return next((m for m in (getattr(net, "relu", None), getattr(net, "act1", None)) if isinstance(m, nn.Module)), None)


def _pool(net: nn.Module) -> nn.Module | None:
    """The global pooling before ``fc``: ``avgpool`` (torchvision, dynnet) or ``global_pool`` (timm)."""
    found = (getattr(net, "avgpool", None), getattr(net, "global_pool", None))
    return next((m for m in found if isinstance(m, nn.Module)), None)


def compiled_input_ok(x: Tensor) -> bool:
    """Whether compiled calls may run on ``x`` in place of module calls: no gradients, tracing, ``force_dense``,
    ``DYNNET_NATIVE=0`` or global forward hooks, and ``x`` one float32 CPU sample."""
    if torch.is_grad_enabled() or tracing_or_compiling() or forcing_dense() or native.disabled():
        return False
    if type(x) is not Tensor or x.shape[0] != 1 or x.dtype != torch.float32 or not x.is_cpu:
        return False
    hooks = nn.modules.module
    return not (hooks._global_forward_hooks or hooks._global_forward_pre_hooks)


def compiled_loop_ok(x: Tensor, controller: nn.Module) -> bool:
    """The preconditions of a batch-1 loop of compiled block calls driven by ``controller`` (RNP/RNR's agent,
    GaterNet's gater): :func:`compiled_input_ok` (the loop calls no module), and the controller in sparse eval mode
    without hooks. Each block must also pass :func:`block_compiled_ok`."""
    return compiled_input_ok(x) and block_compiled_ok(controller)


def block_compiled_ok(module: nn.Module) -> bool:
    """Whether a dynamic block (or controller) may be run by a compiled loop: sparse eval mode and no hooks."""
    return (
        getattr(module, "mode", None) == "sparse"
        and not module.training
        and not module._forward_hooks
        and not module._forward_pre_hooks
    )
