"""Contracts every method builds on: decisions, dynamic blocks, the trace context, registries."""

from dynnet.core.block import (
    MODES,
    DynamicBlock,
    dynamic_blocks,
    force_dense,
    kept_modes,
    probe_macs,
    run_on_meta,
    set_mode,
    set_tau,
    sparse,
)
from dynnet.core.cache import tracing_or_compiling, version_key
from dynnet.core.decision import GRANULARITIES, Decision
from dynnet.core.latency import LatencyModel, LatencyTable
from dynnet.core.model import DynamicModel, LossOutput, check_input
from dynnet.core.recipe import RECIPES, RecipeSpec, build_config, register_recipe
from dynnet.core.registry import Registry, UnknownNameError
from dynnet.core.trace import MacEntry, Trace, current_trace, no_trace, trace

__all__ = [
    "GRANULARITIES",
    "MODES",
    "RECIPES",
    "Decision",
    "DynamicBlock",
    "DynamicModel",
    "LatencyModel",
    "LatencyTable",
    "LossOutput",
    "MacEntry",
    "RecipeSpec",
    "Registry",
    "Trace",
    "UnknownNameError",
    "build_config",
    "check_input",
    "current_trace",
    "dynamic_blocks",
    "force_dense",
    "kept_modes",
    "no_trace",
    "probe_macs",
    "register_recipe",
    "run_on_meta",
    "set_mode",
    "set_tau",
    "sparse",
    "trace",
    "tracing_or_compiling",
    "version_key",
]
