"""Benchmarking: latency, realized speedup, accuracy × MACs × latency reports."""

from dynnet.bench.experiment import ExperimentResult, run_experiment
from dynnet.bench.harness import profile_model
from dynnet.bench.latency import Latency, machine_info, measure_latency, realized_speedup, steady_malloc
from dynnet.bench.latency_model import profile_latency
from dynnet.bench.plan import BenchProfile
from dynnet.bench.suite import run_suite

__all__ = [
    "BenchProfile",
    "ExperimentResult",
    "Latency",
    "machine_info",
    "measure_latency",
    "profile_latency",
    "profile_model",
    "realized_speedup",
    "run_experiment",
    "run_suite",
    "steady_malloc",
]
