#!/usr/bin/env bash
# Sequential re-run of every family benchmark with its default schedule, meant for a quiet 2-core CPU.
#
#   bash benchmarks/run_all.sh                      # all six scripts, 2 threads, results in benchmarks/results/<family>/
#   ONLY="spatial convnet_aig" bash benchmarks/run_all.sh          # a subset, in this order
#   QUICK=1 THREADS=1 RESULTS=/tmp/bench_check bash benchmarks/run_all.sh   # smoke test of every script (--quick)
#
# Estimated wall time on a quiet 2-core machine (see each script's docstring; the limit it was sized for):
#   layer_skip ~7 min (10), early_exit ~8.5 min (10), channel ~15.5 min (17), spatial ~7.5 min (12),
#   resolution_glimpse_moe ~8 min (10), convnet_aig ~2.5 min (3): about 49 minutes in all (60).
#
# Each script's output goes to <results>/<family>/run.log, framed by `uptime` before and after (the load average
# tells whether the machine was really quiet) and its wall time. A failing script does not stop the others; the
# failures are listed at the end and the exit status is 1 if any failed. The scripts also store the machine info
# (date, load average, torch threads) with their own results.
set -u
cd "$(dirname "$0")/.." || exit 2

PY=${PY:-.venv/bin/python}
THREADS=${THREADS:-2}
RESULTS=${RESULTS:-benchmarks/results}
QUICK=${QUICK:-0}
ONLY=${ONLY:-layer_skip early_exit channel spatial resolution_glimpse_moe convnet_aig}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
# glibc malloc keeps freed memory and serves tensors up to 32 MiB from the heap (dynnet.bench.latency.STEADY_MALLOC): repeated
# calls reuse their pages instead of faulting fresh ones in, so dense and dynamic runs time compute, not page faults.
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.trim_threshold=4294967296:glibc.malloc.mmap_threshold=33554432}

summary=()
failed=()
all_start=$(date +%s)
echo "run_all: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), threads $THREADS, results under $RESULTS, quick=$QUICK"
echo "run_all: $(uptime)"
echo "run_all: git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

for family in $ONLY; do
    script="benchmarks/${family}.py"
    out="$RESULTS/$family"
    log="$out/run.log"
    mkdir -p "$out"
    args=(--out "$out" --threads "$THREADS")
    if [ "$QUICK" = "1" ]; then
        args+=(--quick)
    fi
    start=$(date +%s)
    {
        echo "== $family: start $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
        echo "== command: $PY -u $script ${args[*]}"
        echo "== uptime before: $(uptime)"
    } >"$log"
    echo "== $family: started $(date -u '+%H:%M:%S UTC') ($(uptime | sed 's/.*load/load/')), log: $log"
    if [ -f "$script" ]; then
        "$PY" -u "$script" "${args[@]}" >>"$log" 2>&1
        rc=$?
    else
        echo "no such script: $script" >>"$log"
        rc=127
    fi
    wall=$(($(date +%s) - start))
    {
        echo "== uptime after: $(uptime)"
        echo "== $family: end $(date -u '+%Y-%m-%d %H:%M:%S UTC'), exit status $rc, wall time ${wall} s"
    } >>"$log"
    line=$(printf '%-24s %5d s  (%d min %02d s)  exit %d' "$family" "$wall" $((wall / 60)) $((wall % 60)) "$rc")
    echo "== $line"
    summary+=("$line")
    if [ "$rc" -ne 0 ]; then
        failed+=("$family (exit $rc, see $log)")
        tail -n 5 "$log" | sed 's/^/   | /'
    fi
done

total=$(($(date +%s) - all_start))
echo
echo "run_all: finished $(date -u '+%Y-%m-%d %H:%M:%S UTC'), total wall time ${total} s ($((total / 60)) min $((total % 60)) s)"
echo "run_all: $(uptime)"
printf '  %s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "FAILED (${#failed[@]}):"
    printf '  %s\n' "${failed[@]}"
    exit 1
fi
echo "all scripts succeeded"
