"""The benchmark suite: every registered recipe and the static baselines, accuracy × MACs × latency, one report.

    python benchmarks/suite.py --profile quick        # ~20 min on 2 CPU cores → benchmarks/results/suite/quick/
    python benchmarks/suite.py --profile full         # one GPU, hours → benchmarks/results/suite/full/
    python benchmarks/suite.py --profile quick --report-only   # rebuild table, plots and report from runs/

Resumable: each finished job is stored in ``<out>/runs/<job>.json`` and skipped on the next run.
Same as ``dynnet bench --profile quick`` once the CLI has the suite options.
"""

from __future__ import annotations

import argparse
import sys

from dynnet.bench.suite import add_suite_arguments, bench_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_suite_arguments(parser)
    args = parser.parse_args(argv)
    if args.profile is None:
        args.profile = "quick"
    return bench_main(args)


if __name__ == "__main__":
    sys.exit(main())
