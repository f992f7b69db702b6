#!/usr/bin/env bash
# Everything one lent-GPU session needs, in one call (see README, "GPU check"):
#   build   build the CUDA library (scripts/gpu_check.sh, no tests, no quick bench)
#   tests   pytest -m gpu (tests/test_cuda_gpu.py and every other gpu-marked test)
#   check   `python -m jax_gna check` with backend auto (platform_dependent) and cuda
#   example the Flax digits example with the cuda backend (throughput)
#   bench   the benchmark suite, presets $BENCH_PRESETS (default small,paper)
# usage: OUT=... bash scripts/device_session.sh build check example bench
# Results land in $OUT: summary.txt, results/ (bench JSON/markdown/PNG), logs.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device_out}
LOGS=$(mktemp -d)
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
say() { echo "== $*" | tee -a "$OUT/summary.txt"; }
step() {  # step NAME SECONDS CMD...: run with a time limit, log, and report
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  say "$name: rc=$rc in $(( $(date +%s) - t0 )) s"
  tail -n "${TAIL:-25}" "$LOGS/$name.log" | tee -a "$OUT/summary.txt"
  return $rc
}
for stage in "$@"; do
  case $stage in
    build) step build 240 env OUT="$LOGS/gpu_check" GPU_CHECK_BENCH=0 GPU_CHECK_TESTS=none \
             bash scripts/gpu_check.sh || break ;;
    tests) step tests 300 env XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m pytest -m gpu -q \
             -rfE -p no:cacheprovider -n 4 tests ;;
    check) step check_auto 90 python3 -m jax_gna check
           step check_cuda_bf16 90 python3 -m jax_gna check --backend cuda --dtype bfloat16 ;;
    example) step example 120 python3 examples/digits_vit.py --backend cuda ;;
    bench) step bench "${BENCH_LIMIT:-400}" python3 -m benchmarks.run \
             --preset "${BENCH_PRESETS:-small,paper}" --budget-s "${BENCH_BUDGET:-330}" \
             --out "$OUT/results" --no-progress ;;
    *) say "unknown stage $stage" ;;
  esac
done
tar czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
