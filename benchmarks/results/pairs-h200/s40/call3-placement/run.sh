#!/usr/bin/env bash
# session 40 device call 3: is the 2-D s16x16 forward's ~7.06 ms mode (against ~8.0) a
# matter of where the buffers lie? scripts/placement_probe.py (no pairs), nvidia-smi sampled.
export LD_LIBRARY_PATH=$(dirname "$(dirname "$(command -v nvcc)")")/lib64:$LD_LIBRARY_PATH XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=$PWD JAX_GNA_FWD_PAIR=0
D=$(mktemp -d); mkdir -p $D/o
bash scripts/device_session.sh module > $D/o/module.log 2>&1; tail -n 2 $D/o/module.log
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active --format=csv -lms 200 > $D/o/smi.csv 2>&1 &
SMI=$!
date +%s.%N > $D/o/t0.txt
timeout 200 python3 scripts/placement_probe.py --copies 16 --rounds 4 --out $D/o/p2d.json 256x256 80x80 16x16 24 > $D/o/p2d.log 2>&1; echo "p2d rc=$?"
date +%s.%N >> $D/o/t0.txt
XLA_PYTHON_CLIENT_ALLOCATOR=platform timeout 200 python3 scripts/placement_probe.py --copies 16 --rounds 3 --out $D/o/p2d_platform.json 256x256 80x80 16x16 24 > $D/o/p2d_platform.log 2>&1; echo "p2d_platform rc=$?"
date +%s.%N >> $D/o/t0.txt
timeout 200 python3 scripts/placement_probe.py --copies 8 --rounds 2 --out $D/o/p3d.json 30x48x80 18x24x24 16x8x8 24 > $D/o/p3d.log 2>&1; echo "p3d rc=$?"
kill $SMI
grep -h '^copy' $D/o/p2d.log $D/o/p2d_platform.log $D/o/p3d.log
tail -n 3 $D/o/p2d.log
tar czf $OUT/r.tar.gz -C $D/o .
