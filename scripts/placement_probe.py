"""Does the forward's time depend on where its q, k, v buffers lie in memory?

The 2-D s16x16 forward has now and then taken ~7.06 ms instead of ~8.0 ms for a whole
kernel_profile.py process (sessions 16, 17, 39, 40), the same kernel on the same values. This
probe makes `--copies` copies of one problem's q, k, v in one process (a spacer buffer of
1-63 MiB allocated before each, so that they land at different addresses), then times the
forward on every copy, round after round, each followed by a fixed bf16 matmul on buffers
that never change (the control: if the GPU's state, e.g. its clock under the power cap,
moves, the control moves with it). A copy that is fast in every round and a control that
does not move point at placement; fast spells across copies that the control shares point
at the GPU's state.

usage (on the GPU): python3 scripts/placement_probe.py [--copies 12] [--rounds 3]
    [--calls 20] [--out probe.json] shape window stride heads
Each line: round, copy, the forward's ms per call (back-to-back calls timed on the host
with block_until_ready, median of 3 batches), the control's ms, seconds since the start,
and the copy's q/k/v addresses. Session 40 (benchmarks/results/pairs-h200.md, section 6):
no copy fast, on either allocator.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--out")
    ap.add_argument("problem", nargs=4, metavar="P", help="shape window stride heads")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from profile_sm90 import problem

    op, qkv = problem(*args.problem)
    f = jax.jit(op)
    rng = np.random.default_rng(0)
    keep, copies = [], []
    for _ in range(args.copies):
        keep.append(jnp.zeros((int(rng.integers(1, 64)) << 20,), jnp.uint8))
        copies.append(tuple(x * 1 for x in qkv))  # new buffers, the same values
    a = jax.random.normal(jax.random.PRNGKey(1), (8192, 8192), jnp.bfloat16)
    mm = jax.jit(lambda a: a @ a)

    def per_call(fn, *xs) -> float:
        fn(*xs).block_until_ready()
        batches = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(args.calls):
                out = fn(*xs)
            out.block_until_ready()
            batches.append((time.perf_counter() - t0) / args.calls)
        return statistics.median(batches)

    start = time.perf_counter()
    rows = []
    for r in range(args.rounds):
        for i, c in enumerate(copies):
            t = per_call(f, *c)
            tc = per_call(mm, a)
            addr = [x.unsafe_buffer_pointer() for x in c]
            row = {"round": r, "copy": i, "ms": 1e3 * t, "control_ms": 1e3 * tc,
                   "s": time.perf_counter() - start, "addr": [hex(x) for x in addr]}
            rows.append(row)
            print(f"{r} {i:2d} {row['ms']:8.3f} ms  control {row['control_ms']:6.3f} ms  "
                  f"t={row['s']:6.1f} s  {' '.join(row['addr'])}", flush=True)
    for i in range(args.copies):
        ts = [x["ms"] for x in rows if x["copy"] == i]
        print(f"copy {i:2d}: " + " ".join(f"{t:.3f}" for t in ts))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"problem": args.problem, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
