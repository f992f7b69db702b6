#!/usr/bin/env bash
# session 44 device call 1 (main 53cdf30): the paper preset (cuda, cuDNN dense, bf16/fp16,
# fwd/bwd/fwdbwd), kernel_profile --cudnn on the six forward targets, then the GPU tests of the
# pair kernels (53cdf30 moved the pair grid's cluster count into gna::pair_clusters).
export LD_LIBRARY_PATH=$(dirname "$(dirname "$(command -v nvcc)")")/lib64:$LD_LIBRARY_PATH XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=$PWD
L=$OUT/log.txt; D=$(mktemp -d)
pack() { cp $L $D/ 2>/dev/null; tar czf $OUT/r.tar.gz -C $D .; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader >> $L
OUT=$D/paper PAPER_SDPA=0 bash scripts/device_session.sh module paper > $D/paper.out 2>&1
grep -E "^== |rc=" $D/paper/summary.txt >> $L; pack
OUT=$D/kprofile KPROFILE_LIMIT=200 KPROFILE_ARGS="--cudnn --dtypes bf16,fp16 32768 2048 2048 1 32768 2048 1 1 256x256 80x80 16x16 24 256x256 80x80 1x1 24 30x48x80 18x24x24 16x8x8 24 30x48x80 18x24x24 1x1x1 24" \
  bash scripts/device_session.sh kprofile > $D/kprofile.out 2>&1
grep -E "ours:|cudnn:|rc=" $D/kprofile/summary.txt | cut -c1-90 >> $L; pack
OUT=$D/tests TESTS_K="pair or sm90_force or sm90_items" TESTS_LIMIT=$((575 - SECONDS)) bash scripts/device_session.sh tests > $D/tests.out 2>&1
grep -E "^== |tests:|FAILED|ERROR" $D/tests/summary.txt | head -30 >> $L; pack
cat $L
