#!/usr/bin/env bash
# session 42 device call 1: items-pairs.patch on the GPU: the pair tests (incl. force and
# the items-pair cases), then kernel time with and without pairs (JAX_GNA_FWD_PAIR=0) on
# the 1-D s2048 H1/H24 and s256 H1 problems (3 rounds, order rotated, 1 s of load first;
# kernel_profile also times them 16 in one jit), the benchmark's clock on 1-D s2048 H1
# (2 rounds each), then the GPU tests session 41 did not reach, with the time left.
export LD_LIBRARY_PATH=$(dirname "$(dirname "$(command -v nvcc)")")/lib64:$LD_LIBRARY_PATH XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=$PWD
L=$OUT/log.txt; D=$(mktemp -d); mkdir -p $D/ab $D/bench
pack() { tar czf $OUT/r.tar.gz -C $D .; }
bash scripts/device_session.sh module > $D/module.log 2>&1; tail -n 1 $D/module.log >> $L
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader >> $L
timeout 200 python3 -m pytest -m gpu tests/test_cuda_gpu.py -k "pair" -n 4 -v -rfE -p no:cacheprovider > $D/tests_pairs.log 2>&1
echo "pair tests rc=$? $(tail -n 1 $D/tests_pairs.log)" >> $L; grep -E "FAILED|ERROR" $D/tests_pairs.log | head -20 >> $L; pack
echo "t=$SECONDS" >> $L
P1="32768 2048 2048 1"; P24="32768 2048 2048 24"; P256="32768 2048 256 1"
for r in 1 2 3; do
  order="pair nopair"; [ $r = 2 ] && order="nopair pair"
  for v in $order; do
    envs=(JAX_GNA_X=1); [ $v = nopair ] && envs=(JAX_GNA_FWD_PAIR=0)
    timeout 60 env "${envs[@]}" python3 scripts/kernel_profile.py --dtypes bf16 --warm-s 1 --out $D/ab/${v}_$r.json $P1 $P24 $P256 > $D/ab/${v}_$r.log 2>&1
    echo "r$r $v rc=$? $(grep -h 'ours' $D/ab/${v}_$r.log | sed -E 's/ bf16 ours/ /; s/ us x.*fwd_([a-z_]*).*/ \1/' | tr '\n' '|')" >> $L
    pack
  done
done
python3 scripts/lib_ab.py $D/ab > $D/ab_table.md 2>&1; cat $D/ab_table.md >> $L
echo "t=$SECONDS" >> $L
for r in 1 2; do for v in pair nopair; do
  envs=(JAX_GNA_X=1); [ $v = nopair ] && envs=(JAX_GNA_FWD_PAIR=0)
  timeout 90 env "${envs[@]}" python3 -m benchmarks.run --shape 32768 --window 2048 --stride 2048 --heads 1 --head-dim 128 \
    --backends cuda,cudnn --dtypes bf16,fp16 --passes fwd --samples 3x20 --out $D/bench --name b_${v}_$r --no-progress > $D/bench/${v}_$r.log 2>&1
  echo "bench r$r $v rc=$?" >> $L; grep -E "cuda|cudnn" $D/bench/${v}_$r.log | tail -n 6 >> $L; pack
done; done
echo "t=$SECONDS" >> $L
OUT=$D/tests TESTS_K="sm90_dilation or sm90_repeat or sm90_backward or sm90_dkv or sm90_force or sm90_query or tokens_as or command_buffer or export or sharded" \
  TESTS_LIMIT=$((580 - SECONDS)) bash scripts/device_session.sh tests > $D/tests.out 2>&1
grep -E "^== |tests:|FAILED|ERROR" $D/tests/summary.txt | head -30 >> $L; pack
cat $L
