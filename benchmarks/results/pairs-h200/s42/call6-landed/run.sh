#!/usr/bin/env bash
# session 42 device call 6: the landed build (59f56a9): pair tests under force, force
# rejections, and kernel names by default on one one-wave and one four-wave problem.
export LD_LIBRARY_PATH=$(dirname "$(dirname "$(command -v nvcc)")")/lib64:$LD_LIBRARY_PATH XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=$PWD
L=$OUT/log.txt; D=$(mktemp -d)
pack() { tar czf $OUT/r.tar.gz -C $D .; }
OUT=$D/m bash scripts/device_session.sh module > $D/module.log 2>&1; tail -n 1 $D/module.log >> $L
timeout 150 python3 -m pytest -m gpu tests/test_cuda_gpu.py -k "sm90_pairs or pair_force" -n 4 -v -rfE -p no:cacheprovider > $D/tests.log 2>&1
echo "tests rc=$? $(tail -n 1 $D/tests.log)" >> $L; grep -E "FAILED|ERROR" $D/tests.log | head >> $L; pack
timeout 40 python3 scripts/kernel_profile.py --dtypes bf16 --calls 5 64x64 16x16 16x16 1 128x128 32x32 32x32 4 > $D/names.log 2>&1
echo "names rc=$? $(grep -h 'ours' $D/names.log | grep -v '^|' | sed -E 's/ bf16 ours/ /; s/ us x.*fwd_([a-z_]*).*/ \1/' | tr '\n' '|')" >> $L; pack
cat $L
