#!/usr/bin/env bash
# session 45 device call 1 (main 554a2d7): NATTEN (0.21.7.dev1, 8c8729f) built on the device in
# the background while the GPU tests of the Hopper forward run, then kernel_profile.py
# --natten-best --cudnn on the three block-sparse forward targets, then the three stride-1 ones:
# session 17's same-GPU comparison (kernels-targets-h200) redone against today's kernels.
export LD_LIBRARY_PATH=$(dirname "$(dirname "$(command -v nvcc)")")/lib64:$LD_LIBRARY_PATH XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=$PWD
L=$OUT/log.txt; D=$(mktemp -d); mkdir -p $D/tmp
pack() { cp $L $D/ 2>/dev/null; tar czf $OUT/r.tar.gz -C $D --exclude="./tmp/pip-*" --exclude="*.so" --exclude="*.o" . 2>/dev/null; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader >> $L
TMPDIR=$D/tmp OUT=$D/s NATTEN_BUILD_LIMIT=450 TESTS_JOBS=3 TESTS_LIMIT=370 \
  TESTS_K="sm90_matches_xla or pair or sm90_force or sm90_items" KPROFILE_LIMIT=130 \
  KPROFILE_RUNS="bs:--natten-best --cudnn --dtypes bf16,fp16 32768 2048 2048 1 256x256 80x80 16x16 24 30x48x80 18x24x24 16x8x8 24;s1:--natten-best --cudnn --dtypes bf16,fp16 32768 2048 1 1 256x256 80x80 1x1 24 30x48x80 18x24x24 1x1x1 24" \
  timeout $((578 - SECONDS)) bash scripts/device_session.sh module nattenbuild tests nattenwait kprofile > $D/s.out 2>&1
grep -E "^== |tests:|FAILED|ERROR|ours:|natten|cudnn:" $D/s/summary.txt | cut -c1-110 | head -60 >> $L; pack
cat $L
