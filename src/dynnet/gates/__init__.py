"""Gate modules and decision rules: small networks mapping features to decision logits."""

from dynnet.gates.confidence import confidence, exit_fractions_for_rate, thresholds_for_fractions
from dynnet.gates.pooled import PooledMLPGate, open_bias_

__all__ = ["PooledMLPGate", "confidence", "exit_fractions_for_rate", "open_bias_", "thresholds_for_fractions"]
