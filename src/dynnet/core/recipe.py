"""The recipe registry: each method of the reading list is a registered :class:`RecipeSpec`."""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from dynnet.core.budget import BudgetPolicy
from dynnet.core.registry import Registry

__all__ = [
    "FAMILY_FINE_TUNE",
    "FINE_TUNE_DEFAULTS",
    "RECIPES",
    "RecipeSpec",
    "build_config",
    "fine_tune_settings",
    "recipe",
    "register_recipe",
]


@dataclass(frozen=True)
class RecipeSpec:
    """How to build one recipe.

    Attributes:
        name: lowercase paper name (``"convnet_aig"``).
        family: the reading-list family (``"layer_skip"``, ``"early_exit"``, ...).
        config_cls: frozen dataclass of the recipe's settings (``budget`` among them).
        convert: ``convert(model, config, targets) -> DynamicModel``.
        paper: "Title (Venue Year), link".
        test_base: a small registered base model the conformance suite converts.
        test_input: (C, H, W) of the conformance suite's inputs.
        exact_executed: sparse mode executes exactly the theoretical MACs (no gather/halo overheads).
        reproduces_base: open gates reproduce the base network's logits.
        input_dependent: decisions depend on the input. ``False`` for methods whose masks are fixed per
            layer (perforation, bandit-chosen channel subsets): the conformance suite then asks for masks
            that are partial (some units off, some on) instead of masks that differ across inputs.
        budget: how the recipe honours ``budget`` (the target fraction of the dense MACs): trained, calibrated,
            both, or fixed at conversion, and the range of MAC fractions it can reach.
        fine_tune: :class:`~dynnet.train.TrainConfig` settings of the recipe's fine-tuning from a trained base, over
            :data:`FINE_TUNE_DEFAULTS` (see :func:`fine_tune_settings`).
        scratch: :class:`~dynnet.train.TrainConfig` settings of training the recipe's own network from scratch (where
            its network does not contain a base to start from), over the caller's schedule: RAM's recurrent core
            diverges under the ResNets' SGD rate and trains with AdamW.
        revision: raised when a change of the recipe's code changes what it trains or measures (a fixed estimator,
            a new objective): benchmark rows made at an older revision are stale and rerun (0: never revised).
        bench_metrics: the recipe's own measurements in the benchmark suite (``dynnet bench``), beside the ones every
            job makes: ``fn(model, val, test) -> dict`` with the trained model (eval mode; it may change the
            execution mode, the suite restores sparse mode), the validation batches (``None`` without a validation
            split) and the test batches (``(Tensor[B, C, H, W], Tensor[B])`` each); the JSON-ready dict lands in the
            job's row as ``recipe_metrics`` (early exits: the operating points of their exits; MoE: expert load).
    """

    name: str
    family: str
    config_cls: type
    convert: Callable[..., nn.Module]
    paper: str
    test_base: str = "cifar_resnet8"
    test_input: tuple[int, int, int] = (3, 32, 32)
    exact_executed: bool = True
    reproduces_base: bool = True
    input_dependent: bool = True
    budget: BudgetPolicy | None = None
    fine_tune: dict[str, Any] = dataclasses.field(default_factory=dict)
    scratch: dict[str, Any] = dataclasses.field(default_factory=dict)
    revision: int = 0
    bench_metrics: Callable[..., dict[str, Any]] | None = None


FINE_TUNE_DEFAULTS: dict[str, Any] = {"budget_start": 1.0, "track_budget_every": 25}
"""How every recipe fine-tunes from a trained base unless its family or itself declares otherwise: the budget
annealed from 1 (the gates warm up open; ``budget_warmup_epochs`` is half the run, at most one epoch), and the
model kept at that annealed budget by moving its calibration knob every 25 steps
(:class:`~dynnet.train.hooks.BudgetTracking`; only for calibrated recipes): without it the gates of six recipes
ended a 2-epoch fine-tune at 0.75-1.0 of the MACs and collapsed when calibrated to 0.5 (docs/training.md)."""

FAMILY_FINE_TUNE: dict[str, dict[str, Any]] = {"early_exit": {"decision_lr_scale": 10.0, "track_budget_every": 0}}
"""Fine-tuning settings of a whole family, over :data:`FINE_TUNE_DEFAULTS`. Early exits put fresh classifiers on
the trained trunk: at the trunk's learning rate they do not learn in a short fine-tune (BranchyNet, 1 epoch of
30,000 Fashion-MNIST images at lr 0.02: 81.7 % at half the MACs; heads at 10x: 92.1 %). The same 10x lost 3 points
for FBS's saliency predictors and did not help ConvNet-AIG's gates (docs/training.md). Their training evaluates
every exit whatever the thresholds, so budget tracking would change nothing but the time: off."""


def fine_tune_settings(name: str | None, epochs: int) -> dict[str, Any]:
    """The :class:`~dynnet.train.TrainConfig` overrides of recipe ``name`` fine-tuned from a trained base for
    ``epochs`` epochs: :data:`FINE_TUNE_DEFAULTS`, the budget annealed over ``min(1, epochs / 2)`` epochs, then the
    family's (:data:`FAMILY_FINE_TUNE`) and the recipe's own ``fine_tune`` settings. ``{}`` for ``None`` (a static
    network fine-tunes plainly)."""
    if name is None:
        return {}
    spec = RECIPES.get(name)
    settings = {**FINE_TUNE_DEFAULTS, "budget_warmup_epochs": min(1.0, epochs / 2)}
    return {**settings, **FAMILY_FINE_TUNE.get(spec.family, {}), **spec.fine_tune}


RECIPES: Registry[RecipeSpec] = Registry("recipe")


def register_recipe(spec: RecipeSpec) -> RecipeSpec:
    """Register a recipe; raises on a duplicate name, a config without ``budget`` or a default budget outside the
    declared reachable range."""
    if not dataclasses.is_dataclass(spec.config_cls):
        raise TypeError(f"recipe {spec.name!r}: config_cls must be a dataclass")
    if not isinstance(spec.budget, BudgetPolicy):
        raise TypeError(
            f"recipe {spec.name!r}: declare how it honours a budget, e.g. "
            f"@recipe({spec.name!r}, budget=BudgetPolicy('trained+calibrated'))"
        )
    fields = {f.name: f for f in dataclasses.fields(spec.config_cls)}
    if "budget" not in fields:
        raise TypeError(f"recipe {spec.name!r}: its config needs a `budget` field (fraction of the dense MACs)")
    default = fields["budget"].default
    lo, hi = spec.budget.reachable
    if not isinstance(default, float | int) or not lo - 1e-9 <= default <= hi + 1e-9:
        raise ValueError(f"recipe {spec.name!r}: default budget {default!r} is outside its reachable [{lo}, {hi}]")
    RECIPES.register(spec.name, spec)
    return spec


def recipe(
    name: str,
    *,
    paper: str,
    budget: BudgetPolicy,
    family: str | None = None,
    config: type | None = None,
    **options: Any,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register the decorated ``convert(model, config, targets)`` function as a recipe.

    The family is the package the function lives in (``dynnet.methods.<family>.<module>``) and the config class is
    the annotation of its ``config`` argument, unless given.

    Args:
        name: lowercase recipe name.
        paper: "Title (Venue Year), link".
        budget: how the recipe honours ``budget`` (:class:`~dynnet.core.budget.BudgetPolicy`).
        family: the reading-list family, when the module does not live in ``dynnet.methods.<family>``.
        config: the config dataclass, when the ``config`` argument is not annotated with it.
        **options: the other :class:`RecipeSpec` fields (``test_base``, ``test_input``, ``exact_executed``,
            ``reproduces_base``, ``input_dependent``, ``fine_tune``, ``scratch``, ``revision``, ``bench_metrics``).

    Example:
        >>> @recipe("convnet_aig", paper="...", budget=BudgetPolicy("trained+calibrated"))
        ... def convert(model: nn.Module, config: ConvNetAIGConfig, targets: Targets = "auto") -> ConvNetAIG: ...
    """

    def register(convert: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        fam = family
        if fam is None:
            parts = convert.__module__.split(".")
            if len(parts) < 4 or parts[:2] != ["dynnet", "methods"]:
                raise ValueError(f"recipe {name!r}: pass family= (module {convert.__module__} is not a method package)")
            fam = parts[2]
        cfg = config or typing.get_type_hints(convert).get("config")
        if cfg is None:
            raise TypeError(f"recipe {name!r}: annotate convert's `config` argument with the config class")
        spec = register_recipe(
            RecipeSpec(name=name, family=fam, config_cls=cfg, convert=convert, paper=paper, budget=budget, **options)
        )
        convert.spec = spec  # type: ignore[attr-defined]
        return convert

    return register


def build_config(spec: RecipeSpec, **kwargs: Any) -> Any:
    """Instantiate a recipe's config, rejecting unknown keys with the list of known ones."""
    fields = {f.name: f for f in dataclasses.fields(spec.config_cls)}
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise TypeError(f"recipe {spec.name!r} has no setting(s) {unknown}; its settings: {sorted(fields)}")
    for key, value in kwargs.items():
        kind = fields[key].type
        annotation = kind if isinstance(kind, str) else getattr(kind, "__name__", "")
        if not _matches_annotation(value, annotation):
            raise TypeError(f"recipe {spec.name!r}: setting {key}={value!r} must be {annotation} (not NaN)")
    return spec.config_cls(**kwargs)


def _matches_annotation(value: Any, annotation: str) -> bool:
    """Whether ``value`` fits a simple annotation (``int``, ``float``, ``bool``, ``str``, unions with ``None``).

    Other annotations (tuples, literals, classes) are not checked here: the config's ``__post_init__`` does.
    """
    options = [o.strip() for o in annotation.split("|")]
    if not options or any(o not in ("int", "float", "bool", "str", "None") for o in options):
        return True
    for o in options:
        if o == "None" and value is None:
            return True
        if o == "bool" and isinstance(value, bool):
            return True
        if isinstance(value, bool):
            continue
        if o == "int" and isinstance(value, numbers.Integral):
            return True
        if o == "float" and isinstance(value, numbers.Real) and not math.isnan(value):
            return True
        if o == "str" and isinstance(value, str):
            return True
    return False
