#!/usr/bin/env bash
# session 42 device call 4: the producer's K/V loads folded into one lambda (load_kv; PTX:
# the pair kernel tests its pair branch once per K and once per V; other kernels reordered
# only). SASS of both builds compared, kernel time of both (the pair kernel: 2-D s16x16 and
# hunyuan, 2 rounds, LD_PRELOAD of main's build), then the GPU tests over every forward kernel.
export LD_LIBRARY_PATH=$(dirname "$(dirname "$(command -v nvcc)")")/lib64:$LD_LIBRARY_PATH XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=$PWD
L=$OUT/log.txt; D=$(mktemp -d)
pack() { tar czf $OUT/r.tar.gz -C $D .; }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader >> $L
OUT=$D/m bash scripts/device_session.sh module > $D/module.log 2>&1; tail -n 2 $D/module.log >> $L
timeout 60 cuobjdump -sass build/lib_main.so > /tmp/old.sass 2>/dev/null; timeout 60 cuobjdump -sass jax_gna/libjax_gna_cuda.so > /tmp/new.sass 2>/dev/null
python3 scripts/sass_compare.py /tmp/old.sass /tmp/new.sass 'sm90' > $D/sass_compare.txt 2>&1
echo "sass: $(grep -c '^same' $D/sass_compare.txt) same, $(grep -vc '^same' $D/sass_compare.txt) other lines" >> $L; grep -v '^same' $D/sass_compare.txt | cut -c1-200 | head -12 >> $L; pack
echo "t=$SECONDS" >> $L
OUT=$D/ab LIBAB="base main=build/lib_main.so" LIBAB_ROUNDS=2 LIBAB_LIMIT=80 \
  LIBAB_ARGS="--dtypes bf16 --warm-s 1 256x256 80x80 16x16 24 30x48x80 30x40x40 1x32x8 24" \
  bash scripts/device_session.sh libab > $D/ab.out 2>&1
grep -E "^\| |rc=" $D/ab/summary.txt >> $L; pack
echo "t=$SECONDS" >> $L
OUT=$D/tests TESTS_K="sm90_pairs or sm90_items_bitwise or tokens_as_key_tiles or sm90_repeatable or sm90_query_range or sm90_pair_force" \
  TESTS_LIMIT=$((570 - SECONDS)) bash scripts/device_session.sh tests > $D/tests.out 2>&1
grep -E "^== |tests:|FAILED|ERROR" $D/tests/summary.txt | head -30 >> $L; pack
echo "t=$SECONDS" >> $L
cat $L
