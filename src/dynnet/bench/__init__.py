"""Benchmarking: latency, realized speedup, accuracy × MACs × latency reports."""

from dynnet.bench.latency import Latency, machine_info, measure_latency, realized_speedup

__all__ = ["Latency", "machine_info", "measure_latency", "realized_speedup"]
