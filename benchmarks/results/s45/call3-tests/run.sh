#!/usr/bin/env bash
# session 45 device call 3 (main 554a2d7): the gpu-marked tests call 1 did not select (not the
# two-GPU sharding file), 6 processes, with the time left; per-test lines in tests.log.gz.
export LD_LIBRARY_PATH=$(dirname "$(dirname "$(command -v nvcc)")")/lib64:$LD_LIBRARY_PATH XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=$PWD
L=$OUT/log.txt; D=$(mktemp -d)
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader >> $L
TMPDIR=$D OUT=$D/s TESTS_JOBS=6 TESTS_LIMIT=$((500 - SECONDS)) \
  TESTS_K="not (sm90_matches_xla or pair or sm90_force or sm90_items) and not sharding" \
  bash scripts/device_session.sh module tests > $D/s.out 2>&1
grep -E "^== |tests:|FAILED|ERROR" $D/s/summary.txt | head -40 >> $L
f=$(find $D -name tests.log | head -1); [ -n "$f" ] && grep -E " (PASSED|FAILED|ERROR|SKIPPED) " $f | gzip > $OUT/tests.log.gz
cat $L
