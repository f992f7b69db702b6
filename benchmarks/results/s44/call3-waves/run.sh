#!/usr/bin/env bash
# session 44 device call 3: pairs against none where the one-tile grid fills 1.7-8.3 waves,
# one problem whose CTAs all visit 128 key tiles (3-D 16x44x40, window 16x32x32, stride
# 1x8x16; 220 query tiles per head, heads 1-5), one tile per CTA on both sides
# (JAX_GNA_FWD_ITEMS=1; the default takes 4 per CTA at two heads), bf16, 1 s of load
# before each profile, rounds alternating the order while time is left.
export LD_LIBRARY_PATH=$(dirname "$(dirname "$(command -v nvcc)")")/lib64:$LD_LIBRARY_PATH XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=$PWD
L=$OUT/log.txt; D=$(mktemp -d); mkdir -p $D/ab
pack() { cp $L $D/ 2>/dev/null; tar czf $OUT/r.tar.gz -C $D .; }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader >> $L
OUT=$D/m bash scripts/device_session.sh module > $D/module.log 2>&1; tail -n 1 $D/module.log >> $L
P=""; for h in 1 2 3 4 5; do P="$P 16x44x40 16x32x32 1x8x16 $h"; done
for r in 1 2 3 4; do
  [ $SECONDS -gt 330 ] && break
  order="pair nopair"; [ $((r % 2)) = 0 ] && order="nopair pair"
  for v in $order; do
    e=JAX_GNA_FWD_PAIR=0; [ $v = pair ] && e=JAX_GNA_FWD_PAIR=force
    timeout 80 env JAX_GNA_FWD_ITEMS=1 $e python3 scripts/kernel_profile.py --dtypes bf16 --warm-s 1 --out $D/ab/${v}_$r.json $P > $D/ab/${v}_$r.log 2>&1
    echo "r$r $v rc=$? t=$SECONDS $(grep -h 'ours' $D/ab/${v}_$r.log | grep -v '^|' | sed -E 's/ bf16 ours/ /; s/ us x.*fwd_([a-z_]*).*/ \1/' | tr '\n' '|')" >> $L
    pack
  done
done
python3 scripts/lib_ab.py $D/ab > $D/ab_table.md 2>&1; cat $D/ab_table.md >> $L; pack
cat $L
