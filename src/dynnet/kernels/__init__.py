"""Kernels that really skip work (the sparse mode's engine). Pure-torch references define correctness."""

from dynnet.kernels.compaction import compact_add, compact_apply

__all__ = ["compact_add", "compact_apply"]
