#!/usr/bin/env bash
# session 45 device call 2 (main 554a2d7), on call 1's machine while it was still warm: call 1's
# NATTEN build had reached 11 of 46 ninja steps when its 450 s limit ended it (the GPU tests
# beside it took the CPUs); this resumes it in /tmp/natten-build (not wiped, all 16 CPUs, no
# niceness), then kernel_profile.py --natten-best --cudnn on the three block-sparse targets.
# The command as run (one line in the device call), split here for reading:
export LD_LIBRARY_PATH=$(dirname "$(dirname "$(command -v nvcc)")")/lib64:$LD_LIBRARY_PATH XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD; L=$OUT/log.txt
( export NATTEN_CUDA_ARCH="9.0" NATTEN_N_WORKERS=16 NATTEN_BUILD_DIR=/tmp/natten-build CMAKE_GENERATOR=Ninja \
    NATTEN_MINIMAL_SCRIPT=$PWD/scripts/natten_minimal.py \
    NATTEN_KEEP_KERNELS='^hopper_fna[123]d_(float16|bfloat16)_128x128x128_(coop|pp)_Q[0-9x]+_KV[0-9x]+_causal0(x0)*$'
  cd /tmp && timeout 400 python3 -m pip install -v --no-build-isolation --no-deps --no-cache-dir \
    --target $OLDPWD/build/natten_site /tmp/natten-src ) > $OUT/nb.log 2>&1
echo "build rc=$? at $SECONDS s" >> $L; grep -oE '^ *\[[0-9]+/[0-9]+\]' $OUT/nb.log | tail -1 >> $L
if [ -f build/natten_site/natten/__init__.py ]; then
  PYTHONPATH=$PWD/build/natten_site:$PWD timeout $((585 - SECONDS)) python3 scripts/kernel_profile.py \
    --natten-best --cudnn --dtypes bf16,fp16 --out $OUT/bs.json \
    32768 2048 2048 1 256x256 80x80 16x16 24 30x48x80 18x24x24 16x8x8 24 > $OUT/kp.log 2>&1
  echo "kprofile rc=$? at $SECONDS s" >> $L
fi
tail -c 3000 $OUT/nb.log | gzip > $OUT/nb_tail.gz; rm -f $OUT/nb.log; cat $L
