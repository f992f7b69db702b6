#!/usr/bin/env bash
# session 43 device call 1: the one-tile pair kernel between one and eight waves. Where is
# the gate's threshold (pairs where 2 * clusters * H * B > SMs) right? JAX_GNA_FWD_PAIR=force
# (pairs) against =0 (none), default items (all these problems take the one-tile kernel:
# head dim 128, 128-token key tiles, items 1), bf16, three rounds, order rotated, 1 s of load.
export LD_LIBRARY_PATH=$(dirname "$(dirname "$(command -v nvcc)")")/lib64:$LD_LIBRARY_PATH XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=$PWD
L=$OUT/log.txt; D=$(mktemp -d); mkdir -p $D/ab
pack() { tar czf $OUT/r.tar.gz -C $D .; }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader >> $L
OUT=$D/m bash scripts/device_session.sh module > $D/module.log 2>&1; tail -n 2 $D/module.log >> $L
P="128x128 80x80 16x16 1 192x128 80x80 16x16 1 128x128 80x80 16x16 2 128x128 80x80 16x16 3 128x128 80x80 16x16 4 128x128 80x80 16x16 8 128x128 32x32 32x32 3 16x32x32 8x16x16 8x16x16 3"
for r in 1 2 3; do
  order="pair nopair"; [ $r = 2 ] && order="nopair pair"
  for v in $order; do
    e=JAX_GNA_FWD_PAIR=0; [ $v = pair ] && e=JAX_GNA_FWD_PAIR=force
    timeout 100 env $e python3 scripts/kernel_profile.py --dtypes bf16 --warm-s 1 --out $D/ab/${v}_$r.json $P > $D/ab/${v}_$r.log 2>&1
    echo "r$r $v rc=$? t=$SECONDS $(grep -h 'ours' $D/ab/${v}_$r.log | grep -v '^|' | sed -E 's/ bf16 ours/ /; s/ us x.*fwd_([a-z_]*).*/ \1/' | tr '\n' '|')" >> $L
    pack
  done
done
python3 scripts/lib_ab.py $D/ab > $D/ab_table.md 2>&1; cat $D/ab_table.md >> $L; cp $L $D/; pack
echo "t=$SECONDS" >> $L
cat $L
