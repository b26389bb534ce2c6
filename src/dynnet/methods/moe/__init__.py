"""Mixture of experts: a router sends each input to a few experts (or branches); only those run."""

from dynnet.methods.moe import hydranets, sparse_moe

__all__ = ["hydranets", "sparse_moe"]
