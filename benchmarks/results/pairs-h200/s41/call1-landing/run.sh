#!/usr/bin/env bash
# session 41 device call 1: the pair kernel (pairs-next with the two mends) on the GPU:
# its tests (bitwise vs no pairs, tolerance vs reference), then kernel time pairs vs
# JAX_GNA_FWD_PAIR=0 (3 rounds, order rotated, 1 s of load first) on four problems, and
# 3 s clocks_probe of each on 2-D s16x16 and hunyuan.
export LD_LIBRARY_PATH=$(dirname "$(dirname "$(command -v nvcc)")")/lib64:$LD_LIBRARY_PATH XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=$PWD
L=$OUT/log.txt; D=$(mktemp -d); mkdir -p $D/ab
pack() { tar czf $OUT/r.tar.gz -C $D .; }
bash scripts/device_session.sh module > $D/module.log 2>&1; tail -n 1 $D/module.log >> $L
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader >> $L
timeout 200 python3 -m pytest -m gpu tests/test_cuda_gpu.py -k "sm90_pairs" -n 4 -q > $D/tests_pairs.log 2>&1
echo "pair tests rc=$? $(tail -n 1 $D/tests_pairs.log)" >> $L; pack
P2="256x256 80x80 16x16 24"; P3="30x48x80 18x24x24 16x8x8 24"; PC="16x44x80 16x32x48 1x8x16 24"; PH="30x48x80 30x40x40 1x32x8 24"
for r in 1 2 3; do
  order="pair nopair"; [ $r = 2 ] && order="nopair pair"
  for v in $order; do
    envs=(JAX_GNA_X=1); [ $v = nopair ] && envs=(JAX_GNA_FWD_PAIR=0)
    timeout 80 env "${envs[@]}" python3 scripts/kernel_profile.py --dtypes bf16 --warm-s 1 --out $D/ab/${v}_$r.json $P2 $P3 $PC $PH > $D/ab/${v}_$r.log 2>&1
    echo "r$r $v rc=$? $(grep -h ' ours:' $D/ab/${v}_$r.log | sed -E 's/ bf16 ours: +/ /; s/ us x.*fwd_([a-z]*).*/ \1/' | tr '\n' '|')" >> $L
    pack
  done
done
python3 scripts/lib_ab.py $D/ab > $D/ab_table.md 2>&1; cat $D/ab_table.md >> $L
for pr in "$P2" "$PH"; do for v in pair nopair; do
  envs=(JAX_GNA_X=1); [ $v = nopair ] && envs=(JAX_GNA_FWD_PAIR=0)
  timeout 40 env "${envs[@]}" python3 scripts/clocks_probe.py --seconds 3 $pr > $D/clocks_${v}_${pr%% *}.log 2>&1
  echo "clocks $v ${pr%% *}: $(head -n 1 $D/clocks_${v}_${pr%% *}.log | cut -c1-70) | $(tail -n 2 $D/clocks_${v}_${pr%% *}.log | cut -d, -f1,3 | tr '\n' ' ')" >> $L
  pack
done; done
pack; cat $L
