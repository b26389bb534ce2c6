"""Gate modules: small networks mapping features to decision logits."""

from dynnet.gates.pooled import PooledMLPGate, open_bias_

__all__ = ["PooledMLPGate", "open_bias_"]
