#!/usr/bin/env bash
# session 40 device call 2: K and V stages released separately (GNA_FWD_SPLIT=1, build sp)
# with and without pairs (CTA-scope remote releases): GPU pair tests on sp; kernel time
# pair / nopair / sp / spnopair on 2-D s16x16, cosmos, hunyuan, 3-D s16x8x8, 1-D s2048 H1,
# cold two rounds; 2-D 3 s of load one round.
export LD_LIBRARY_PATH=$(dirname "$(dirname "$(command -v nvcc)")")/lib64:$LD_LIBRARY_PATH XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=$PWD
D=$(mktemp -d); mkdir -p $D/o/ab $D/o/warm
xz -dc build/sp.so.xz > build/sp.so
bash scripts/device_session.sh module > $D/o/module.log 2>&1; tail -n 2 $D/o/module.log
LD_PRELOAD=$PWD/build/sp.so timeout 150 python3 -m pytest -m gpu tests/test_cuda_gpu.py -k sm90_pairs -q -p no:cacheprovider > $D/o/tests.log 2>&1
echo "tests rc=$?"; tail -n 3 $D/o/tests.log
P2="256x256 80x80 16x16 24"; PC="16x44x80 16x32x48 1x8x16 24"; PH="30x48x80 30x40x40 1x32x8 24"
P3="30x48x80 18x24x24 16x8x8 24"; P1="32768 2048 2048 1"
run() { # variant name, extra args...
  local v=$1 name=$2; shift 2
  envs=(JAX_GNA_X=1)
  case $v in nopair) envs=(JAX_GNA_FWD_PAIR=0);; sp) envs=(LD_PRELOAD=$PWD/build/sp.so);;
    spnopair) envs=(LD_PRELOAD=$PWD/build/sp.so JAX_GNA_FWD_PAIR=0);; esac
  timeout 150 env "${envs[@]}" python3 scripts/kernel_profile.py --dtypes bf16 --out $D/o/$name.json "$@" > $D/o/$name.log 2>&1
  echo "$name rc=$? $(grep -h ' ours:' $D/o/$name.log | cut -c1-70 | tr '\n' '|')"
}
for r in 1 2; do for v in pair nopair sp spnopair; do run $v ab/${v}_$r $P2 $PC $PH $P3 $P1; done; done
for v in pair nopair sp spnopair; do run $v warm/${v}_1 --warm-s 3 $P2; done
python3 scripts/lib_ab.py $D/o/ab | tee $D/o/ab/table.md
python3 scripts/lib_ab.py $D/o/warm | tee $D/o/warm/table.md
tar czf $OUT/r.tar.gz -C $D/o .
