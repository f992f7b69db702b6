#!/usr/bin/env bash
# session 41 device call 3 (main, pairs on): the GPU tests call 2 did not reach (all
# gpu-marked tests but the sm90 ones that passed there and in call 1), with the time left.
export LD_LIBRARY_PATH=$(dirname "$(dirname "$(command -v nvcc)")")/lib64:$LD_LIBRARY_PATH XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=$PWD
L=$OUT/log.txt; D=$(mktemp -d)
pack() { tar czf $OUT/r.tar.gz -C $D .; }
OUT=$D/m bash scripts/device_session.sh module > $D/module.out 2>&1; grep rc= $D/m/summary.txt >> $L
OUT=$D/tests TESTS_K="not (sm90_items or sm90_key_tiles or sm90_matches_xla or sm90_pairs or sm90_score_signs or sm90_scales or sm90_block_origins or sm90_head_dim_256)" \
  TESTS_LIMIT=$((440 - SECONDS)) bash scripts/device_session.sh tests > $D/tests.out 2>&1
grep -E "^== |tests:|FAILED|ERROR" $D/tests/summary.txt | head -30 >> $L; pack
cat $L
