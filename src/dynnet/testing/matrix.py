"""The conversion matrix: which deployed networks each recipe converts, and whether the conversions keep the contract.

A cell converts one network (torchvision or timm, ``num_classes=10``, BatchNorm statistics and affine parameters
randomised as a trained network's are) with one recipe. A refused cell records the recipe's one-line reason. A
converted cell is checked on small inputs:

* **open**: the fresh conversion reproduces the base network's logits in masked and sparse mode (recipes that
  reproduce their base);
* **sparse = masked**: after :func:`~dynnet.testing.scramble_until_mixed`, sparse mode gives the masked logits and
  theoretical MACs, and never executes more MACs than masked mode (the dense work) for any sample;
* **MACs**: dense mode's MACs per sample equal ``torch.utils.flop_counter`` FLOPs / 2 of the base network
  (convolutions and matrix products: the rules both count).

Logits are compared within 1e-3 of their scale; a comparison that fails in float32 is run again on float64 copies,
which settle it (rounding amplified by a deep network, and its dependence on the thread count, vanish there; a wrong
result does not).

``tests/convert/test_conversion_matrix.py`` runs it; ``scripts/conversion_matrix.py`` writes ``docs/conversion.md``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from dynnet.core import RecipeSpec

__all__ = ["MATRIX_MODELS", "Cell", "check_cell", "matrix_markdown", "matrix_models", "trained_like_"]

MATRIX_MODELS: tuple[str, ...] = (
    "torchvision/resnet18",
    "torchvision/resnet50",
    "torchvision/resnext50_32x4d",
    "torchvision/wide_resnet50_2",
    "torchvision/mobilenet_v2",
    "torchvision/mobilenet_v3_large",
    "torchvision/efficientnet_b0",
    "torchvision/efficientnet_v2_s",
    "torchvision/regnet_y_400mf",
    "torchvision/convnext_tiny",
    "torchvision/vgg11_bn",
    "timm/resnet18",
    "timm/resnet50",
    "timm/efficientnet_b0",
    "timm/mobilenetv3_large_100",
)
"""The networks of the matrix, ``"<library>/<builder>"`` (the timm ones only where timm is installed)."""


def matrix_models() -> list[str]:
    """:data:`MATRIX_MODELS` that can be built here (timm is optional)."""
    try:
        import timm  # noqa: F401
    except ImportError:
        return [m for m in MATRIX_MODELS if not m.startswith("timm/")]
    return list(MATRIX_MODELS)


def build_model(name: str, *, num_classes: int = 10, seed: int = 0) -> nn.Module:
    """A ``"<library>/<builder>"`` network initialised from ``seed`` (the global generator is left as it was), in
    eval mode."""
    library, _, builder = name.partition("/")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if library == "torchvision":
            import torchvision

            return getattr(torchvision.models, builder)(num_classes=num_classes).eval()
        if library == "timm":
            import timm

            return timm.create_model(builder, num_classes=num_classes).eval()
    raise ValueError(f"unknown library {library!r} in {name!r}; expected torchvision/<name> or timm/<name>")


def trained_like_(model: nn.Module, generator: torch.Generator, *, size: int = 64) -> nn.Module:
    """Give every normalisation layer affine parameters and running statistics far from their defaults, as training
    does (in place); returns ``model`` in eval mode.

    The affine parameters are drawn at random (weight U(0.5, 1.5), bias N(0, 0.5²)) and ConvNeXt's layer scales
    U(0.25, 0.75); the running statistics are then those of noise images (each BatchNorm layer in training mode,
    cumulative average; variances floored at a tenth of the layer's mean), moved at random (mean + N(0, 0.1²)
    standard deviations, variance × U(0.8, 1.25)). Drawn at random alone, statistics drown the input in a deep
    network: the logits of MobileNetV2 and EfficientNet no longer depend on it.
    """
    from dynnet.calibration import average_batch_norm_statistics
    from dynnet.testing.conformance import diverse_inputs

    def draw(shape: torch.Size) -> Tensor:
        return torch.rand(shape, generator=generator)

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.LayerNorm | nn.GroupNorm) and m.weight is not None:
                m.weight.copy_(draw(m.weight.shape) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.5)
            scale = getattr(m, "layer_scale", None)
            if isinstance(scale, nn.Parameter):
                scale.copy_(draw(scale.shape) * 0.5 + 0.25)
        model.eval()
        images = diverse_inputs(8, (3, size, size), seed=int(torch.randint(1 << 30, (1,), generator=generator)))
        average_batch_norm_statistics(norms, lambda: model(images))  # a cumulative average over the batch
        for m in norms:
            # nearly dead channels (variance ~0 on the calibration images) would blow up any other input
            m.running_var.clamp_(min=0.1 * float(m.running_var.mean()))
            std = (m.running_var + m.eps).sqrt()  # a shift of the mean by 0.1 std: dead channels' stay tiny
            m.running_mean.add_(torch.randn(m.running_mean.shape, generator=generator) * 0.1 * std)
            m.running_var.mul_(draw(m.running_var.shape) * 0.45 + 0.8)
    return model


@dataclass(frozen=True)
class Cell:
    """One network × recipe.

    Attributes:
        model: ``"<library>/<builder>"``.
        recipe: the recipe's registry name.
        family: the recipe's family.
        converted: whether the recipe converted the network.
        reason: the refusal (one line) or, for a converted cell, the checks that failed (empty: all passed).
        checks: the checks run on a converted cell (``open``, ``sparse=masked``, ``macs``), ``"-"`` where not run.
        dynamic_blocks: the converted model's dynamic blocks.
    """

    model: str
    recipe: str
    family: str
    converted: bool
    reason: str = ""
    checks: str = "-"
    dynamic_blocks: int = 0

    @property
    def ok(self) -> bool:
        """Refused with a one-line reason, or converted and every check passed."""
        return ("\n" not in self.reason and bool(self.reason)) if not self.converted else not self.reason


def _flop_macs(base: nn.Module, x: Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        base(x)
    return counter.get_total_flops() / 2 / x.shape[0]


def _close(a: Tensor, b: Tensor) -> bool:
    """Equal within 1e-3 of the logits' scale: deep networks with trained-like BatchNorm statistics amplify the
    summation-order differences of sliced and grouped kernels (MobileNetV2 and ResNeXt-50 cells reached 4e-4 to 2e-3
    at 1e-4); a wrong result is off by orders more (a skipped unit: > 1e-2)."""
    scale = float(b.abs().max()) if b.numel() else 1.0
    return bool(torch.allclose(a, b, rtol=1e-3, atol=1e-3 * max(1.0, scale)))


def check_cell(
    model: str,
    recipe: str,
    *,
    base: nn.Module | None = None,
    size: int = 64,
    batch: int = 4,
    deep: bool = True,
) -> Cell:
    """Convert ``model`` with ``recipe`` and, when ``deep`` and it converts, run the checks of the module docstring.

    Args:
        model: ``"<library>/<builder>"``.
        recipe: a registered recipe.
        base: the trained-like base network (built when ``None``); never modified.
        size: side of the square test images.
        batch: images per check.
        deep: run the checks (``False``: conversion only).
    """
    from dynnet.api import convert, list_recipes
    from dynnet.core import RECIPES, DynamicBlock
    from dynnet.testing.conformance import diverse_inputs, scramble_until_mixed

    list_recipes()  # registers every recipe
    spec = RECIPES.get(recipe)
    if base is None:
        base = trained_like_(build_model(model), torch.Generator().manual_seed(0))
    try:
        with torch.random.fork_rng(devices=[]):  # new parts (gates, heads) drawn the same whatever ran before
            torch.manual_seed(0)
            converted = convert(copy.deepcopy(base), recipe)
    except (ValueError, TypeError, AttributeError, NotImplementedError) as e:  # a refusal
        return Cell(model, recipe, spec.family, False, f"{type(e).__name__}: {e}")
    blocks = sum(isinstance(m, DynamicBlock) for m in converted.modules())
    if not deep:
        return Cell(model, recipe, spec.family, True, dynamic_blocks=blocks)
    x = diverse_inputs(batch, (3, size, size), seed=1)
    converted.eval()
    ran = ["open"] if spec.reproduces_base else []
    ran.append("sparse=masked")
    failed = _settled(_open_checks, converted, base, x, spec) if spec.reproduces_base else []
    try:
        scramble_until_mixed(converted, x)
    except AssertionError as e:
        failed.append(f"scrambling: {e}")
    else:
        failed += _settled(_scrambled_checks, converted, base, x, spec)
    if spec.reproduces_base:
        ran.append("macs")
    return Cell(model, recipe, spec.family, True, "; ".join(failed), ", ".join(ran), blocks)


_LOGIT_CHECKS = ("sparse != masked", "dense mode is not", "open gates do not")
"""The failures of checks that compare logits (settled in float64 by :func:`_settled`)."""


def _open_checks(converted: nn.Module, base: nn.Module, x: Tensor, spec: RecipeSpec) -> list[str]:
    """The fresh conversion reproduces the base's logits in masked and sparse mode (recipes that reproduce the base)."""
    from dynnet.core import set_mode

    failed = []
    with torch.no_grad():
        reference = base(x)
        for mode in ("masked", "sparse"):
            set_mode(converted, mode)
            if not _close(converted(x), reference):
                failed.append(f"open gates do not reproduce the base in {mode} mode")
    return failed


def _scrambled_checks(converted: nn.Module, base: nn.Module, x: Tensor, spec: RecipeSpec) -> list[str]:
    """Sparse = masked (logits, theoretical MACs, no more executed MACs) on mixed decisions; for recipes that
    reproduce the base, dense mode is the base network and its MACs are the flop counter's."""
    from dynnet.core import set_mode, trace
    from dynnet.testing.conformance import decisions_mixed

    failed = []
    with torch.no_grad():
        set_mode(converted, "masked")
        with trace() as tm:
            masked = converted(x)
        set_mode(converted, "sparse")
        with trace() as ts:
            sparse = converted(x)
        if not decisions_mixed(tm.decisions, across_inputs=spec.input_dependent):
            failed.append("decisions not mixed")
        if not _close(sparse, masked):
            failed.append(f"sparse != masked (max diff {float((sparse - masked).abs().max()):.3g})")
        if not torch.allclose(ts.macs(), tm.macs()):
            failed.append("sparse and masked theoretical MACs differ")
        if bool((ts.executed_macs() > tm.executed_macs() + 0.5).any()):
            failed.append("sparse executes more MACs than masked (dense) mode")
        if spec.reproduces_base:
            set_mode(converted, "dense")
            with trace() as td:
                dense = converted(x)
            if not _close(dense, base(x)):
                failed.append("dense mode is not the base network")
            flops = _flop_macs(base, x)
            if abs(td.dense_macs() - flops) > 1e-6 * flops + 0.5:
                failed.append(f"dense MACs {td.dense_macs():.6g} != flop counter {flops:.6g}")
    return failed


def _settled(
    check: Callable[..., list[str]], converted: nn.Module, base: nn.Module, x: Tensor, spec: RecipeSpec
) -> list[str]:
    """``check``'s failures, those of its logit comparisons that fail in float32 settled in float64.

    float32 rounding, amplified by deep trained-like networks (and by scrambled gates that let activations grow), can
    exceed any fixed tolerance and depends on the machine's thread count (a 2-thread run splits convolutions
    differently from a 1-thread one). In float64 rounding vanishes and a wrong result (a skipped unit, a decision
    taken differently) stays wrong. A model that cannot run in float64 (a float32-only kernel) keeps its failures.
    """
    failed = check(converted, base, x, spec)
    if not any(f.startswith(_LOGIT_CHECKS) for f in failed):
        return failed
    try:
        again = check(copy.deepcopy(converted).double(), copy.deepcopy(base).double(), x.double(), spec)
    except (RuntimeError, NotImplementedError, TypeError):
        return failed
    still = {a.split(" (")[0] for a in again}
    return [f for f in failed if not f.startswith(_LOGIT_CHECKS) or f.split(" (")[0] in still]


def run_matrix(
    models: Iterable[str], recipes: Iterable[str], *, deep: bool = True, progress: Callable[[Cell], None] | None = None
) -> list[Cell]:
    """:func:`check_cell` over ``models`` × ``recipes`` (each base built once)."""
    recipes = list(recipes)
    from dynnet.api import list_recipes
    from dynnet.core import RECIPES

    list_recipes()
    cells = []
    for name in models:
        base = trained_like_(build_model(name), torch.Generator().manual_seed(0))
        for recipe in recipes:
            try:
                cell = check_cell(name, recipe, base=base, deep=deep)
            except Exception as e:  # a converted model that crashes in a check: a failed cell, recorded
                reason = f"crashed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                cell = Cell(name, recipe, RECIPES.get(recipe).family, True, reason, "crashed")
            cells.append(cell)
            if progress is not None:
                progress(cell)
    return cells


def _mark(c: Cell) -> str:
    if not c.converted:
        return "·"
    if c.reason:
        return "✗"
    return "○" if c.checks == "-" else "✓"


def matrix_markdown(cells: list[Cell]) -> str:
    """The matrix as markdown: a summary table (recipes × networks: ✓ converted and checked, ○ converted and not
    checked, ✗ a check failed, · refused) and the refusal reasons, one line per distinct reason."""
    models = list(dict.fromkeys(c.model for c in cells))
    recipes = list(dict.fromkeys(c.recipe for c in cells))
    by = {(c.model, c.recipe): c for c in cells}
    short = [m.replace("torchvision/", "tv/") for m in models]
    lines = ["| recipe (family) | " + " | ".join(short) + " |", "|---|" + "---|" * len(models)]
    for r in recipes:
        family = next(c.family for c in cells if c.recipe == r)
        marks = []
        for m in models:
            c = by.get((m, r))
            marks.append("" if c is None else _mark(c))
        lines.append(f"| {r} ({family}) | " + " | ".join(marks) + " |")
    converted = sum(c.converted for c in cells)
    failed = [c for c in cells if c.converted and c.reason]
    unchecked = sum(c.converted and not c.reason and c.checks == "-" for c in cells)
    out = [
        f"{len(cells)} cells: {converted} converted ({converted - len(failed) - unchecked} pass every check, "
        f"{len(failed)} fail one, {unchecked} not checked), {len(cells) - converted} refused.",
        "",
        *lines,
        "",
    ]
    if failed:
        out += ["## Failed checks", ""]
        out += [f"- {c.model} × {c.recipe}: {c.reason}" for c in failed]
        out.append("")
    reasons: dict[str, list[str]] = {}
    for c in cells:
        if not c.converted:
            reasons.setdefault(c.reason, []).append(f"{c.model.replace('torchvision/', 'tv/')} × {c.recipe}")
    out += ["## Refusals", ""]
    for reason, where in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
        out.append(f"- {reason.replace('|', '/')} — {len(where)} cell(s): {', '.join(where)}")
    return "\n".join(out) + "\n"
