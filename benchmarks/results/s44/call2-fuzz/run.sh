#!/usr/bin/env bash
# session 44 device call 2 (main 53cdf30): scripts/fuzz_gpu.py with pairs forced in a quarter of the cases
# (JAX_GNA_FWD_PAIR=force, one tile per CTA; a case whose forward has no pair kernel runs
# again without), three processes with their own seeds side by side on the one GPU.
export LD_LIBRARY_PATH=$(dirname "$(dirname "$(command -v nvcc)")")/lib64:$LD_LIBRARY_PATH XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=$PWD
L=$OUT/log.txt; D=$(mktemp -d)
pack() { tar czf $OUT/r.tar.gz -C $D .; }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader >> $L
OUT=$D/m bash scripts/device_session.sh module > $D/module.log 2>&1; tail -n 2 $D/module.log >> $L
for s in 20261209 20261210 20261211; do
  timeout $(( ${FUZZ_S:-400} + 140 )) python3 scripts/fuzz_gpu.py --seconds ${FUZZ_S:-400} --seed $s --out $D/fuzz_$s.jsonl > $D/fuzz_$s.log 2> $D/fuzz_$s.err &
done
wait
for s in 20261209 20261210 20261211; do echo "seed $s: $(grep '^fuzz:' $D/fuzz_$s.log)" >> $L; grep '^FAILED' $D/fuzz_$s.log | cut -c1-1500 >> $L; done
python3 - $D >> $L <<'PY'
import json, glob, sys, collections
c = collections.Counter()
for f in glob.glob(sys.argv[1] + "/fuzz_*.jsonl"):
    for line in open(f):
        r = json.loads(line)
        if "pair_force" in r:
            c[(r["pair_force"], r.get("ok"), r.get("path", "")[:60])] += 1
for k, n in sorted(c.items(), key=str):
    print("forced pairs:", k, n)
PY
echo "t=$SECONDS" >> $L; cp $L $D/; pack
cat $L
