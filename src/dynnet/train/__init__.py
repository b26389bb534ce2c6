"""Training, evaluation and checkpoints.

>>> from dynnet.train import TrainConfig, fit, evaluate
>>> result = fit(model, loaders.train, TrainConfig(epochs=1, lr=0.1, out_dir="runs/x"), val_loader=loaders.val)
>>> ev = evaluate(model, loaders.test, mode="sparse")   # ev.accuracy, ev.macs (Tensor[N]), ev.mac_fraction

See ``docs/training.md``.
"""

from dynnet.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_checkpoint_meta,
    remember_build,
    save_checkpoint,
)
from dynnet.train.config import TrainConfig
from dynnet.train.evaluate import EvalResult, evaluate
from dynnet.train.hooks import Checkpoint, CSVLogger, FitState, GateHealth, Hook, TensorBoardLogger
from dynnet.train.loop import FitResult, build_optimizer, fit
from dynnet.train.schedules import budget_at, lr_factor, tau_at

__all__ = [
    "CSVLogger",
    "Checkpoint",
    "CheckpointError",
    "EvalResult",
    "FitResult",
    "FitState",
    "GateHealth",
    "Hook",
    "TensorBoardLogger",
    "TrainConfig",
    "budget_at",
    "build_model",
    "build_optimizer",
    "evaluate",
    "fit",
    "load_checkpoint",
    "lr_factor",
    "read_checkpoint_meta",
    "remember_build",
    "save_checkpoint",
    "tau_at",
]


def build_model(name: str, recipe: str | None = None, **kwargs):
    """``dynnet.create_model(name, recipe, **kwargs)`` that remembers its arguments for checkpoints.

    A checkpoint of a model built this way can be loaded with ``load_checkpoint(path)`` alone.
    """
    import dataclasses

    import dynnet
    from dynnet.core import RECIPES

    model = dynnet.create_model(name, recipe, **kwargs)
    if recipe is not None:
        fields = {f.name for f in dataclasses.fields(RECIPES.get(recipe).config_cls)} | {"budget", "targets"}
        kwargs = {k: v for k, v in kwargs.items() if k not in fields}
    return remember_build(model, name, **kwargs)
