#!/usr/bin/env bash
# session 43 device call 5: pairs against none on long problems of few waves (one head of the
# three 3-D paper problems: 3.3-7.3 waves, 81-375 key tiles per query tile, 1-4 ms), the
# regime the gate's wave half was not measured in; bf16, two rounds alternating, 1 s of load.
export LD_LIBRARY_PATH=$(dirname "$(dirname "$(command -v nvcc)")")/lib64:$LD_LIBRARY_PATH XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=$PWD
L=$OUT/log.txt; D=$(mktemp -d); mkdir -p $D/ab
pack() { cp $L $D/ 2>/dev/null; tar czf $OUT/r.tar.gz -C $D .; }
OUT=$D/m bash scripts/device_session.sh module > $D/module.log 2>&1; tail -n 1 $D/module.log >> $L
P="16x44x80 16x32x48 1x8x16 1 30x48x80 30x40x40 1x32x8 1 30x48x80 18x24x24 16x8x8 1"
for r in 1 2; do
  order="pair nopair"; [ $r = 2 ] && order="nopair pair"
  for v in $order; do
    e=JAX_GNA_FWD_PAIR=0; [ $v = pair ] && e=JAX_GNA_FWD_PAIR=force
    timeout 60 env $e python3 scripts/kernel_profile.py --dtypes bf16 --warm-s 1 --out $D/ab/${v}_$r.json $P > $D/ab/${v}_$r.log 2>&1
    echo "r$r $v rc=$? t=$SECONDS $(grep -h 'ours' $D/ab/${v}_$r.log | grep -v '^|' | sed -E 's/ bf16 ours/ /; s/ us x.*fwd_([a-z_]*).*/ \1/' | tr '\n' '|')" >> $L
    pack
  done
done
python3 scripts/lib_ab.py $D/ab > $D/ab_table.md 2>&1; cat $D/ab_table.md >> $L; pack
cat $L
