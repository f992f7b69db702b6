#!/usr/bin/env bash
# session 42 device call 3: JAX_GNA_FWD_PAIR=force alone (no items pairs): the pair tests
# under force, the force rejections, and JAX_GNA_SM90=force's.
export LD_LIBRARY_PATH=$(dirname "$(dirname "$(command -v nvcc)")")/lib64:$LD_LIBRARY_PATH XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=$PWD
L=$OUT/log.txt; D=$(mktemp -d)
pack() { tar czf $OUT/r.tar.gz -C $D .; }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader >> $L
OUT=$D/m bash scripts/device_session.sh module > $D/module.log 2>&1; tail -n 2 $D/module.log >> $L
timeout 300 python3 -m pytest -m gpu tests/test_cuda_gpu.py -k "sm90_pairs or pair_force or sm90_force" -n 4 -v -rfE -p no:cacheprovider > $D/tests_pairs.log 2>&1
echo "tests rc=$? $(tail -n 1 $D/tests_pairs.log)" >> $L; grep -E "PASSED|FAILED|ERROR" $D/tests_pairs.log | grep -oE "tests/\S+ \S+|FAILED.*|ERROR.*" | sort -u >> $L; pack
echo "t=$SECONDS" >> $L
cat $L
