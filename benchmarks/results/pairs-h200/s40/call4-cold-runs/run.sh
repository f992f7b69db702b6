#!/usr/bin/env bash
# session 40 device call 4: the 2-D s16x16 forward's ~7.06 ms mode: kernel_profile.py cold
# (bf16 then fp16 in one process), 6 processes of 20 calls and 2 of 200, nvidia-smi every
# 100 ms with each process's start and end times, to see the clock during a fast run.
export LD_LIBRARY_PATH=$(dirname "$(dirname "$(command -v nvcc)")")/lib64:$LD_LIBRARY_PATH XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=$PWD
D=$(mktemp -d); mkdir -p $D/o
bash scripts/device_session.sh module > $D/o/module.log 2>&1; tail -n 2 $D/o/module.log
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active --format=csv -lms 100 > $D/o/smi.csv 2>&1 &
SMI=$!
for r in 1 2 3 4 5 6 7 8; do
  calls=20; [ $r -gt 6 ] && calls=200
  echo "run $r start $(date '+%Y/%m/%d %H:%M:%S.%N')" >> $D/o/times.txt
  timeout 90 python3 scripts/kernel_profile.py --dtypes bf16,fp16 --calls $calls --out $D/o/k_$r.json 256x256 80x80 16x16 24 > $D/o/k_$r.log 2>&1
  echo "run $r end $(date '+%Y/%m/%d %H:%M:%S.%N') rc=$?" >> $D/o/times.txt
  echo "$r calls=$calls $(grep -h ' ours:' $D/o/k_$r.log | cut -c1-50 | tr '\n' '|')"
done
kill $SMI
tar czf $OUT/r.tar.gz -C $D/o .
