#!/usr/bin/env bash
# session 42 device call 5: does the one-tile pair kernel lose on one-wave grids, as the items
# kernel's pairs did? The gated build (pairs only where 2 * clusters * H * B > SMs, or under
# force): default (gate) against JAX_GNA_FWD_PAIR=force (pairs) and =0 (none), one query
# tile per CTA, on three one-wave problems and one of four waves; 2 rounds, 1 s of load.
export LD_LIBRARY_PATH=$(dirname "$(dirname "$(command -v nvcc)")")/lib64:$LD_LIBRARY_PATH XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=$PWD
L=$OUT/log.txt; D=$(mktemp -d); mkdir -p $D/ab
pack() { tar czf $OUT/r.tar.gz -C $D .; }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader >> $L
OUT=$D/m bash scripts/device_session.sh module > $D/module.log 2>&1; tail -n 2 $D/module.log >> $L
for r in 1 2; do
  order="pair nopair gate"; [ $r = 2 ] && order="gate nopair pair"
  for v in $order; do
    envs=(JAX_GNA_FWD_ITEMS=1); [ $v = nopair ] && envs+=(JAX_GNA_FWD_PAIR=0); [ $v = pair ] && envs+=(JAX_GNA_FWD_PAIR=force)
    timeout 70 env "${envs[@]}" python3 scripts/kernel_profile.py --dtypes bf16 --warm-s 1 --out $D/ab/${v}_$r.json \
      64x64 16x16 16x16 1 128x128 32x32 32x32 1 16x32x32 8x16x16 8x16x16 1 128x128 32x32 32x32 4 > $D/ab/${v}_$r.log 2>&1
    echo "r$r $v rc=$? $(grep -h 'ours' $D/ab/${v}_$r.log | grep -v '^|' | sed -E 's/ bf16 ours/ /; s/ us x.*fwd_([a-z_]*).*/ \1/' | tr '\n' '|')" >> $L
    pack
  done
done
python3 scripts/lib_ab.py $D/ab > $D/ab_table.md 2>&1; cat $D/ab_table.md >> $L; pack
echo "t=$SECONDS" >> $L
cat $L
