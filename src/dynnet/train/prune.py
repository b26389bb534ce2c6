"""The structured-pruning static baseline: channels of a trained base removed by their L1 norm, then fine-tuned.

A dynamic network at budget ``b`` has to beat every *static* network of ``b`` of the dense MACs, and the strongest
static networks at a MAC level are not only the narrower or shallower ones trained from scratch but the trained base
with channels removed and fine-tuned (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017). The channels
are removed physically with `torch-pruning <https://github.com/VainF/Torch-Pruning>`_ (its dependency graph keeps
residual additions consistent: coupled channels go together), the same ratio in every layer, the classifier's
outputs untouched; the ratio is bisected until the network's exact MACs (:func:`dynnet.count_macs`) are the asked
fraction of the base's. The pruned network is fine-tuned with the schedule the dynamic recipes get when they
fine-tune from the same base (``dynnet prune`` takes the same ``--epochs`` / ``--lr`` as ``dynnet train --init``).

A pruned network has other layer widths than its model name builds; :func:`resize_like` gives a freshly built
network the shapes of a pruned state_dict, so that the weights load with ``load_state_dict`` (safetensors only,
no pickle).
"""

from __future__ import annotations

import copy
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["prune", "prune_channels", "resize_like"]

logger = logging.getLogger("dynnet.train")


def _macs(net: nn.Module, example: Tensor) -> float:
    from dynnet.macs import count_macs

    was = net.training
    net.eval()
    with torch.no_grad():
        macs = float(count_macs(net, example).mean)
    net.train(was)
    return macs


def _classifiers(net: nn.Module, example: Tensor) -> list[nn.Module]:
    """The layers whose outputs are the logits (kept whole): the last Linear (or conv) to run."""
    last: list[nn.Module] = []

    def hook(module: nn.Module, *_: Any) -> None:
        last.append(module)

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    try:
        with torch.no_grad():
            net.eval()(example)
    finally:
        for h in handles:
            h.remove()
    if not last:
        raise ValueError("the network has no Linear or Conv2d layer to prune")
    return [last[-1]]


def _pruned(net: nn.Module, example: Tensor, ratio: float, keep: list[str]) -> nn.Module:
    import torch_pruning as tp

    model = copy.deepcopy(net).eval()
    modules = dict(model.named_modules())
    with torch.enable_grad():  # torch-pruning traces its dependency graph through autograd
        pruner = tp.pruner.MetaPruner(
            model, example, importance=tp.importance.GroupMagnitudeImportance(p=1), pruning_ratio=ratio,
            ignored_layers=[modules[name] for name in keep],
        )  # fmt: skip
        pruner.step()
    return model


def _check_fraction(fraction: object) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, float | int) or not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"the pruned MAC fraction must be in (0, 1], got {fraction!r}")


def prune_channels(
    net: nn.Module, fraction: float, example: Tensor, *, tolerance: float = 0.01
) -> tuple[nn.Module, float]:
    """A copy of ``net`` with the lowest-L1 channels removed until its MACs are ``fraction`` of ``net``'s.

    Args:
        net: a trained static network (left untouched).
        fraction: target MACs of the pruned network over the MACs of ``net``, in (0, 1].
        example: an input Tensor[1, C, H, W] of the size the network is used at (MACs depend on it).
        tolerance: stop the bisection on the pruning ratio when this close (channel counts are integers, so the
            nearest reachable fraction is returned when none is closer).

    Returns:
        ``(pruned, achieved)``: the pruned copy in eval mode and its exact MAC fraction.

    Raises:
        ValueError: ``fraction`` outside (0, 1].
    """
    _check_fraction(fraction)
    dense = _macs(net, example)
    if float(fraction) == 1.0:
        return copy.deepcopy(net).eval(), 1.0
    by_module = {m: n for n, m in net.named_modules()}
    keep = [by_module[m] for m in _classifiers(net, example)]
    lo, hi = 0.0, 1.0  # pruning ratio: 0 keeps everything, ~1 removes nearly all
    best: tuple[float, nn.Module, float] | None = None
    for _ in range(20):
        ratio = (lo + hi) / 2
        model = _pruned(net, example, ratio, keep)
        achieved = _macs(model, example) / dense
        if best is None or abs(achieved - fraction) < best[0]:
            best = (abs(achieved - fraction), model, achieved)
        if abs(achieved - fraction) <= tolerance:
            break
        lo, hi = (ratio, hi) if achieved > fraction else (lo, ratio)
    assert best is not None
    return best[1].eval(), best[2]


def resize_like(net: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """Give the Conv2d, BatchNorm and Linear layers of ``net`` the shapes of ``state`` (a pruned network's
    state_dict), in place, so that ``net.load_state_dict(state)`` fits; returns ``net``.

    Raises:
        ValueError: a layer of ``state`` that ``net`` does not have, or one whose kind cannot be resized.
    """
    modules = dict(net.named_modules())
    for name, module in modules.items():
        prefix = f"{name}." if name else ""
        weight = state.get(f"{prefix}weight")
        if weight is None:
            continue
        if isinstance(module, nn.Conv2d):
            out_c, in_per_group = weight.shape[:2]
            if module.groups not in (1, module.in_channels):
                raise ValueError(f"cannot resize grouped convolution {name!r} (groups={module.groups})")
            depthwise = module.groups == module.in_channels and module.groups > 1
            module.out_channels = int(out_c)
            module.in_channels = int(out_c if depthwise else in_per_group)
            module.groups = int(out_c) if depthwise else 1
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = (int(s) for s in weight.shape)
        elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
            module.num_features = int(weight.shape[0])
            for buf in ("running_mean", "running_var"):
                if getattr(module, buf, None) is not None:
                    setattr(module, buf, torch.empty_like(state[f"{prefix}{buf}"]))
        else:
            continue
        module.weight = nn.Parameter(torch.empty_like(weight))
        if getattr(module, "bias", None) is not None and f"{prefix}bias" in state:
            module.bias = nn.Parameter(torch.empty_like(state[f"{prefix}bias"]))
    unknown = sorted({k.rsplit(".", 1)[0] for k in state} - set(modules))
    if unknown:
        raise ValueError(f"the pruned weights name layers the network does not have: {', '.join(unknown[:5])}")
    return net


def prune(
    init: Any,
    fraction: float,
    *,
    out_dir: str | Path,
    model: str = "cifar_resnet20",
    data: str = "fashion_mnist",
    epochs: int = 3,
    lr: float = 0.01,
    batch_size: int = 128,
    seed: int = 0,
    val_fraction: float = 0.1,
    subset: int | None = None,
    threads: int | None = None,
    data_root: str | Path | None = None,
    progress: bool = False,
    command: str | None = None,
    dataset_kwargs: dict[str, Any] | None = None,
    distill: float = 0.0,
) -> dict[str, Any]:
    """Prune the trained ``init`` weights of ``model`` to ``fraction`` of its MACs, fine-tune, and write
    ``model.safetensors`` + ``manifest.json`` (as :func:`~dynnet.train.pretrain.pretrain` does) in ``out_dir``.

    Args:
        init: the trained base (anything :func:`~dynnet.train.init.resolve_init` takes, ``zoo:KEY`` included).
        fraction: target MAC fraction of the pruned network.
        out_dir: the run folder (refused when it holds a finished run; nothing is overwritten).
        model: the registered model name the weights belong to.
        data: the dataset to fine-tune on (the split of the base's pretraining: the validation tenth held out).
        epochs: fine-tuning epochs (the dynamic recipes' fine-tune schedule).
        lr: peak SGD learning rate of the fine-tuning (cosine decay).
        batch_size: training batch size.
        seed: seeds the split and the training order.
        val_fraction: held-out fraction of the training split.
        subset: training images (``None``: all).
        threads: torch CPU threads.
        data_root: where to look for the dataset first.
        progress: tqdm progress bar.
        command: the command recorded in the manifest (default: this process's).
        dataset_kwargs: extra arguments of the dataset builder.
        distill: weight of the distillation from the unpruned base (as the dynamic recipes get it).

    Returns:
        The manifest.
    """
    from safetensors.torch import save_file

    from dynnet.data import build_loaders
    from dynnet.models import build_base_model
    from dynnet.train.config import TrainConfig
    from dynnet.train.evaluate import evaluate
    from dynnet.train.init import frozen_teacher, resolve_init
    from dynnet.train.loop import fit
    from dynnet.train.pretrain import provenance

    _check_fraction(fraction)
    out = Path(out_dir)
    if (out / "manifest.json").exists():
        raise ValueError(f"{out} already holds a finished run: choose another --out")
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    loaders = build_loaders(data, root=data_root, batch_size=batch_size, val_fraction=val_fraction, seed=seed,
                            subset=subset, **(dataset_kwargs or {}))  # fmt: skip
    info = loaders.info
    kwargs: dict[str, Any] = {"in_channels": info.in_channels, "num_classes": info.num_classes}
    base = build_base_model(model, **kwargs)
    base.load_state_dict(resolve_init(init), strict=True)
    x, _ = next(iter(loaders.test))
    pruned, achieved = prune_channels(base, float(fraction), x[:1])
    before = evaluate(pruned, loaders.test, mode="dense").accuracy
    config = TrainConfig(
        epochs=epochs, lr=lr, seed=seed, out_dir=None, progress=progress, eval_mode="dense", distill=distill
    )
    teacher = frozen_teacher(base) if distill > 0 else None
    start = time.perf_counter()
    result = fit(pruned, loaders.train, config, val_loader=loaders.val, teacher=teacher)
    seconds = time.perf_counter() - start
    test = evaluate(pruned, loaders.test, mode="dense")
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "model.safetensors"
    save_file({k: v.detach().contiguous() for k, v in pruned.state_dict().items()}, str(weights))
    manifest = {
        "command": command or " ".join(shlex.quote(a) for a in ["dynnet", *sys.argv[1:]]),
        "model": model,
        "model_kwargs": kwargs,
        "data": data,
        "pruned": {
            "criterion": "L1 norm of each channel group (torch-pruning), the same ratio in every layer",
            "init": str(init),
            "target_fraction": float(fraction),
            "mac_fraction": achieved,
            "accuracy_before_fine_tuning": before,
        },
        "train_images": len(loaders.train.dataset),
        "settings": {
            "model": model,
            "data": data,
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "seed": seed,
            "val_fraction": val_fraction,
            "subset": subset,
            "distill": distill,
            "pruned": float(fraction),
        },
        "val_accuracy": None if result.val is None else result.val.accuracy,
        "test_accuracy": test.accuracy,
        "test_images": test.num_samples,
        "macs": float(test.macs.mean()),
        "dense_macs": float(test.macs.mean()) / achieved,
        **provenance(weights, seconds),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    logger.info("pruned %s to %.3f of its MACs: test accuracy %.2f %% (%.2f %% before fine-tuning)", model, achieved,
                100 * test.accuracy, 100 * before)  # fmt: skip
    return manifest
