#!/usr/bin/env bash
# session 42 device call 2: items pairs gated to grids of more than one wave. The items
# pair tests (force: the gate does not apply), kernel names and times with and without
# pairs on the 1-D s2048 H1 (one wave: now the items kernel either way), H24 and s256 H24
# (2 rounds, 1 s of load), then the paper preset (cuda, cuDNN dense, bf16/fp16).
export LD_LIBRARY_PATH=$(dirname "$(dirname "$(command -v nvcc)")")/lib64:$LD_LIBRARY_PATH XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=$PWD
L=$OUT/log.txt; D=$(mktemp -d); mkdir -p $D/ab
pack() { tar czf $OUT/r.tar.gz -C $D .; }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader >> $L
OUT=$D/paper PAPER_SDPA=0 bash scripts/device_session.sh module > $D/module.log 2>&1; tail -n 2 $D/module.log >> $L
timeout 170 python3 -m pytest -m gpu tests/test_cuda_gpu.py -k "items_pairs or pair_force" -n 4 -v -rfE -p no:cacheprovider > $D/tests_pairs.log 2>&1
echo "pair tests rc=$? $(tail -n 1 $D/tests_pairs.log)" >> $L; grep -E "FAILED|ERROR" $D/tests_pairs.log | head -20 >> $L; pack
echo "t=$SECONDS" >> $L
for r in 1 2; do
  order="pair nopair"; [ $r = 2 ] && order="nopair pair"
  for v in $order; do
    envs=(JAX_GNA_X=1); [ $v = nopair ] && envs=(JAX_GNA_FWD_PAIR=0)
    timeout 60 env "${envs[@]}" python3 scripts/kernel_profile.py --dtypes bf16 --warm-s 1 --out $D/ab/${v}_$r.json 32768 2048 2048 1 32768 2048 2048 24 32768 2048 256 24 > $D/ab/${v}_$r.log 2>&1
    echo "r$r $v rc=$? $(grep -h 'ours' $D/ab/${v}_$r.log | grep -v '^|' | sed -E 's/ bf16 ours/ /; s/ us x.*fwd_([a-z_]*).*/ \1/' | tr '\n' '|')" >> $L
    pack
  done
done
python3 scripts/lib_ab.py $D/ab > $D/ab_table.md 2>&1; cat $D/ab_table.md >> $L
echo "t=$SECONDS" >> $L
OUT=$D/paper PAPER_SDPA=0 bash scripts/device_session.sh paper > $D/paper.out 2>&1
grep -E "^== |rc=" $D/paper/summary.txt >> $L; pack
echo "t=$SECONDS" >> $L
cat $L
