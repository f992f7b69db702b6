#!/usr/bin/env bash
# session 43 device call 2: the pair gate with gna::pairs_pay (past one wave and >= 16 key
# tiles per query tile) against main's (past one wave): default kernels, kernel time, bf16,
# three rounds alternating, main's build through LD_PRELOAD; then the pair GPU tests.
export LD_LIBRARY_PATH=$(dirname "$(dirname "$(command -v nvcc)")")/lib64:$LD_LIBRARY_PATH XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=$PWD
L=$OUT/log.txt; D=$(mktemp -d); mkdir -p $D/ab
pack() { tar czf $OUT/r.tar.gz -C $D .; }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader >> $L
OUT=$D/m bash scripts/device_session.sh module > $D/module.log 2>&1; tail -n 2 $D/module.log >> $L
P="128x128 32x32 32x32 3 64x64 16x16 16x16 12 16x32x32 8x16x16 8x16x16 3 128x128 80x80 16x16 4"
for r in 1 2 3; do
  order="gate main"; [ $r = 2 ] && order="main gate"
  for v in $order; do
    pre=(); [ $v = main ] && pre=(LD_PRELOAD=$PWD/build/lib_main.so)
    timeout 100 env "${pre[@]}" python3 scripts/kernel_profile.py --dtypes bf16 --warm-s 1 --out $D/ab/${v}_$r.json $P > $D/ab/${v}_$r.log 2>&1
    echo "r$r $v rc=$? t=$SECONDS $(grep -h 'ours' $D/ab/${v}_$r.log | grep -v '^|' | sed -E 's/ bf16 ours/ /; s/ us x.*fwd_([a-z_]*).*/ \1/' | tr '\n' '|')" >> $L
    pack
  done
done
python3 scripts/lib_ab.py $D/ab > $D/ab_table.md 2>&1; cat $D/ab_table.md >> $L; pack
timeout 200 python3 -m pytest -q -m gpu tests/test_cuda_gpu.py -k "sm90_pairs or pair_force or sm90_items_bitwise" > $D/tests.log 2>&1
echo "tests rc=$? t=$SECONDS $(tail -n 1 $D/tests.log)" >> $L
cp $L $D/; pack
cat $L
