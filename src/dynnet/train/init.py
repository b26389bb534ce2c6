"""Start a conversion from trained weights, and the knowledge-distillation loss of the fine-tuning.

The papers of the field fine-tune a trained network (ConvNet-AIG, SkipNet, BlockDrop, FBS, DynConv...), several of
them distilling from it. :func:`load_init` puts trained base weights into a (converted) model; :func:`frozen_teacher`
makes the dense teacher; :func:`distillation_loss` is Hinton et al.'s soft-target loss.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["distillation_loss", "frozen_teacher", "load_init", "resolve_init"]


def resolve_init(init: str | os.PathLike[str] | nn.Module | dict[str, Tensor]) -> dict[str, Tensor]:
    """The base weights named by ``init``, as a state_dict of the *unconverted* network.

    Args:
        init: a module or a state_dict; a ``.safetensors`` file (``dynnet pretrain``'s ``model.safetensors``) or a
            folder holding one; a dynnet checkpoint (stem or ``.json``) of a static network;
            ``torchvision:NAME`` (the torchvision model's default weights) or ``timm:NAME`` (timm's pretrained
            weights; both need the weights in the local cache or internet); ``zoo:KEY`` (weights shipped in
            :mod:`dynnet.zoo`, e.g. ``zoo:cifar_resnet20-fashion_mnist``).

    Raises:
        ValueError: nothing usable at that name (one line saying what was looked for).
    """
    if isinstance(init, nn.Module):
        return {k: v.detach() for k, v in init.state_dict().items()}
    if isinstance(init, dict):
        return dict(init)
    text = str(init)
    if text.startswith("zoo:"):
        from dynnet.zoo import checked_state

        return checked_state(text.split(":", 1)[1])[1]
    if text.startswith("torchvision:"):
        import torchvision

        try:
            return torchvision.models.get_model(text.split(":", 1)[1], weights="DEFAULT").state_dict()
        except Exception as err:  # unknown name, or no weights offline
            raise ValueError(f"cannot load {text}: {' '.join(str(err).split())[:200]}") from None
    if text.startswith("timm:"):
        try:
            import timm

            return timm.create_model(text.split(":", 1)[1], pretrained=True).state_dict()
        except Exception as err:
            raise ValueError(f"cannot load {text}: {' '.join(str(err).split())[:200]}") from None
    path = Path(text)
    if path.is_dir() and (path / "model.safetensors").is_file():
        path = path / "model.safetensors"
    if path.suffix == ".safetensors" and path.is_file() and not path.name.endswith(".optim.safetensors"):
        from safetensors.torch import load_file

        if path.with_suffix(".json").is_file():  # a dynnet checkpoint's weights: load through the checkpoint
            return _checkpoint_state(path.with_suffix(".json"))
        return load_file(str(path))
    from dynnet.train.checkpoint import checkpoint_paths

    if checkpoint_paths(path)[0].is_file():
        return _checkpoint_state(checkpoint_paths(path)[0])
    raise ValueError(
        f"--init {text}: no weights there (expected a .safetensors file, a folder with model.safetensors, a dynnet "
        "checkpoint, zoo:KEY, torchvision:NAME or timm:NAME)"
    )


def _checkpoint_state(path: Path) -> dict[str, Tensor]:
    from dynnet.core import DynamicModel
    from dynnet.train.checkpoint import load_checkpoint

    model, _ = load_checkpoint(path)
    if isinstance(model, DynamicModel):
        raise ValueError(f"{path} holds a converted model ({model.recipe}); --init takes the weights of a base network")
    return {k: v.detach() for k, v in model.state_dict().items()}


def load_init(model: nn.Module, init: Any) -> nn.Module:
    """Load trained base weights (see :func:`resolve_init`) into ``model`` in place; returns it.

    A converted model keeps its gates' own initialisation (``DynamicModel.load_base_state_dict``): only the base
    network's weights are replaced, and the gates still start open.

    Raises:
        ValueError: the weights do not fit the network (missing or unexpected keys, other shapes), in one line.
    """
    from dynnet.core import DynamicModel

    state = resolve_init(init)
    try:
        if isinstance(model, DynamicModel):
            model.load_base_state_dict(state)
        else:
            model.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError) as err:
        raise ValueError(f"the init weights do not fit the network: {' '.join(str(err).split())[:300]}") from None
    return model


def frozen_teacher(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` to distil from: for a converted model, its dense mode (the base network itself,
    no gate evaluated), in eval mode, without gradients."""
    from dynnet.core import set_mode

    teacher = copy.deepcopy(model).eval()
    set_mode(teacher, "dense")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float = 4.0) -> Tensor:
    """``T² · KL(softmax(teacher / T) ‖ softmax(student / T))`` (Hinton et al., 2015), mean over the batch.

    Args:
        student: Tensor[N, K] logits.
        teacher: Tensor[N, K] logits (no gradient flows to them).
        temperature: ``T``; the ``T²`` factor keeps the gradient scale independent of it.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    t = temperature
    log_p = F.log_softmax(student / t, dim=1)
    q = F.softmax(teacher.detach() / t, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean") * (t * t)


@torch.no_grad()
def teacher_logits(teacher: nn.Module, x: Tensor) -> Tensor:
    """The teacher's logits for a batch, outside any trace."""
    from dynnet.core import no_trace

    with no_trace():
        return teacher(x)
