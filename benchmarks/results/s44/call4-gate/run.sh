#!/usr/bin/env bash
# session 44 device call 4 (the gate past 1.75 waves): which kernel the default runs on the
# 1.67-wave problem (now the one-tile kernel), 3.3 waves and the 1.94-wave one (pairs), and
# the same problems under JAX_GNA_FWD_PAIR=0; then the pair-force GPU tests.
export LD_LIBRARY_PATH=$(dirname "$(dirname "$(command -v nvcc)")")/lib64:$LD_LIBRARY_PATH XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=$PWD
L=$OUT/log.txt; D=$(mktemp -d); mkdir -p $D/ab
pack() { cp $L $D/ 2>/dev/null; tar czf $OUT/r.tar.gz -C $D .; }
OUT=$D/m bash scripts/device_session.sh module > $D/module.log 2>&1; tail -n 1 $D/module.log >> $L
P="16x44x40 16x32x32 1x8x16 1 16x44x40 16x32x32 1x8x16 2 128x128 80x80 16x16 2"
for v in default nopair; do
  e=JAX_GNA_FWD_PAIR=1; [ $v = nopair ] && e=JAX_GNA_FWD_PAIR=0
  timeout 60 env $e python3 scripts/kernel_profile.py --dtypes bf16 --warm-s 1 --out $D/ab/${v}_1.json $P > $D/ab/${v}_1.log 2>&1
  echo "$v rc=$? t=$SECONDS $(grep -h 'ours' $D/ab/${v}_1.log | grep -v '^|' | sed -E 's/ bf16 ours/ /; s/ us x.*fwd_([a-z_]*).*/ \1/' | tr '\n' '|')" >> $L
  pack
done
timeout $((200 - SECONDS)) python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda_gpu.py -k "pair_force" > $D/tests.log 2>&1
echo "tests rc=$? t=$SECONDS $(tail -n 1 $D/tests.log)" >> $L; pack
cat $L
