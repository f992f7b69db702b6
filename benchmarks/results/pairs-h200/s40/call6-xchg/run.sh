#!/usr/bin/env bash
# session 40 device call 6: the pair kernel with the producers exchanging stage releases
# (GNA_PAIR_XCHG=1, build px: one remote arrival per load, none from the consumer warps):
# bitwise against no pairs; kernel time px / nopair / pair (2-D s16x16, hunyuan) after 1 s
# of load; SM clock of px.
export LD_LIBRARY_PATH=$(dirname "$(dirname "$(command -v nvcc)")")/lib64:$LD_LIBRARY_PATH XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=$PWD
L=$OUT/log.txt; D=$(mktemp -d); mkdir -p $D/ab
xz -dc build/px.so.xz > build/px.so
bash scripts/device_session.sh module > $OUT/module.log 2>&1; tail -n 1 $OUT/module.log >> $L
LD_PRELOAD=$PWD/build/px.so timeout 60 python3 build/pxcheck.py >> $L 2>&1; echo "check rc=$?" >> $L
P2="256x256 80x80 16x16 24"; PH="30x48x80 30x40x40 1x32x8 24"
for v in px nopair pair; do
  envs=(JAX_GNA_X=1); [ $v = nopair ] && envs=(JAX_GNA_FWD_PAIR=0); [ $v = px ] && envs=(LD_PRELOAD=$PWD/build/px.so)
  timeout 45 env "${envs[@]}" python3 scripts/kernel_profile.py --dtypes bf16 --warm-s 1 --out $D/ab/${v}_1.json $P2 $PH > $D/ab/${v}_1.log 2>&1
  echo "$v rc=$? $(grep -h ' ours:' $D/ab/${v}_1.log | cut -c1-60 | tr '\n' '|')" >> $L
  tar czf $OUT/r.tar.gz -C $D .
done
LD_PRELOAD=$PWD/build/px.so timeout 25 python3 scripts/clocks_probe.py --seconds 3 $P2 > $OUT/clocks_px.log 2>&1
echo "px clocks: $(head -n 1 $OUT/clocks_px.log | cut -c1-60) $(tail -n 3 $OUT/clocks_px.log | cut -d, -f1,3 | tr '\n' ' ')" >> $L
cat $L
