#!/usr/bin/env bash
# session 40 device call 5: where the pair kernel's cycles go (CTA-scope release): nopair,
# pair, pm2 (cluster launch and pairing only), pcm1 (coupled, no multicast) on 2-D s16x16
# and hunyuan, 3 rounds after 1 s of load, order rotated per round; SM clock of each.
export LD_LIBRARY_PATH=$(dirname "$(dirname "$(command -v nvcc)")")/lib64:$LD_LIBRARY_PATH XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=$PWD
D=$(mktemp -d); mkdir -p $D/o/ab
for v in pcm1 pcm2; do xz -dc build/$v.so.xz > build/$v.so; done
bash scripts/device_session.sh module > $D/o/module.log 2>&1; tail -n 2 $D/o/module.log
P2="256x256 80x80 16x16 24"; PH="30x48x80 30x40x40 1x32x8 24"
envs_of() {
  case $1 in nopair) echo JAX_GNA_FWD_PAIR=0;; pair) echo JAX_GNA_X=1;;
    pm2) echo LD_PRELOAD=$PWD/build/pcm2.so;; pcm1) echo LD_PRELOAD=$PWD/build/pcm1.so;; esac
}
vs=(nopair pair pm2 pcm1)
for r in 1 2 3; do
  for k in 0 1 2 3; do
    v=${vs[$(( (k + r - 1) % 4 ))]}
    timeout 60 env $(envs_of $v) python3 scripts/kernel_profile.py --dtypes bf16 --warm-s 1 --out $D/o/ab/${v}_$r.json $P2 $PH > $D/o/ab/${v}_$r.log 2>&1
    echo "$v $r rc=$? $(grep -h ' ours:' $D/o/ab/${v}_$r.log | cut -c1-60 | tr '\n' '|')"
  done
done
python3 scripts/lib_ab.py $D/o/ab | tee $D/o/ab/table.md
for v in nopair pair pm2 pcm1; do
  timeout 30 env $(envs_of $v) python3 scripts/clocks_probe.py --seconds 3 $P2 > $D/o/clocks_$v.log 2>&1
  echo "$v $(head -n 1 $D/o/clocks_$v.log | cut -c1-80) $(tail -n 3 $D/o/clocks_$v.log | cut -d, -f1,3 | tr '\n' ' ')"
done
tar czf $OUT/r.tar.gz -C $D/o .
