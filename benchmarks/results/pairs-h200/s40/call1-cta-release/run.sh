#!/usr/bin/env bash
# session 40 device call 1: the pair kernel with CTA-scope remote releases
# (pairs-cta-release.patch): GPU pair tests; kernel time pair / nopair / pcm1 (coupled, no
# multicast) on 2-D s16x16, cosmos, hunyuan, cold two rounds and 3 s of load one round;
# SM clock pair vs nopair.
export LD_LIBRARY_PATH=$(dirname "$(dirname "$(command -v nvcc)")")/lib64:$LD_LIBRARY_PATH XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=$PWD
D=$(mktemp -d); mkdir -p $D/o/ab
xz -dc build/pcm1.so.xz > build/pcm1.so
bash scripts/device_session.sh module > $D/o/module.log 2>&1; tail -n 2 $D/o/module.log
timeout 150 python3 -m pytest -m gpu tests/test_cuda_gpu.py -k sm90_pairs -q -p no:cacheprovider > $D/o/tests.log 2>&1
echo "tests rc=$?"; tail -n 3 $D/o/tests.log
P2="256x256 80x80 16x16 24"; PC="16x44x80 16x32x48 1x8x16 24"; PH="30x48x80 30x40x40 1x32x8 24"
run() { # variant name, extra args...
  local v=$1 name=$2; shift 2
  envs=(JAX_GNA_X=1)
  case $v in nopair) envs=(JAX_GNA_FWD_PAIR=0);; pcm1) envs=(LD_PRELOAD=$PWD/build/pcm1.so);; esac
  timeout 120 env "${envs[@]}" python3 scripts/kernel_profile.py --dtypes bf16 --out $D/o/ab/$name.json "$@" > $D/o/ab/$name.log 2>&1
  echo "$name rc=$? $(grep -h ' ours:' $D/o/ab/$name.log | cut -c1-120 | tr '\n' '|')"
}
for r in 1 2; do for v in pair nopair pcm1; do run $v ${v}_$r $P2 $PC $PH; done; done
mkdir -p $D/o/warm
for v in pair nopair pcm1; do run $v ../warm/${v}_1 --warm-s 3 $P2; done
python3 scripts/lib_ab.py $D/o/ab | tee $D/o/ab/table.md
python3 scripts/lib_ab.py $D/o/warm | tee $D/o/warm/table.md
for v in pair nopair; do
  envs=(JAX_GNA_X=1); [ $v = nopair ] && envs=(JAX_GNA_FWD_PAIR=0)
  timeout 40 env "${envs[@]}" python3 scripts/clocks_probe.py --seconds 4 $P2 > $D/o/clocks_$v.log 2>&1
  tail -n 4 $D/o/clocks_$v.log
done
tar czf $OUT/r.tar.gz -C $D/o .
