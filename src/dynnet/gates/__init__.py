"""Gate modules and decision rules: small networks mapping features to decision logits."""

from dynnet.gates.confidence import (
    confidence,
    exit_fractions_for_budget,
    exit_fractions_for_rate,
    exit_rate_for_budget,
    exit_taken,
    thresholds_for_fractions,
)
from dynnet.gates.pooled import GateBatchNorm1d, PooledMLPGate, open_bias_

__all__ = [
    "GateBatchNorm1d",
    "PooledMLPGate",
    "confidence",
    "exit_fractions_for_budget",
    "exit_fractions_for_rate",
    "exit_rate_for_budget",
    "exit_taken",
    "open_bias_",
    "thresholds_for_fractions",
]
