"""How much of a short call's time is host work? (a GPU measurement aid)

Times the cuda forward of one problem two ways with jax_gna.bench.measure (bf16, head
dim 128, median of 30 samples of back-to-back calls):
  per call: one jitted call at a time, back to back (what benchmarks/run.py does);
  chained:  one jit that runs the op N times in a row (each output is the next query),
            divided by N: Python dispatch is paid once, the FFI handler's host work and
            the kernel N times.
If "per call" is well above "chained", the GPU waits on the host between calls.

usage (on the GPU): python3 scripts/dispatch_overhead.py [shape window stride heads] ...
  default: the 1-D block-sparse paper problem, 32768 2048 2048 1
"""

from __future__ import annotations

import sys

from jax_gna.bench import measure
from profile_sm90 import problem  # this directory (python3 scripts/dispatch_overhead.py)

N_CHAIN = 16


def run(shape: str, window: str, stride: str, heads: str) -> None:
    op, args = problem(shape, window, stride, heads)

    def chain(q, k, v):
        for _ in range(N_CHAIN):
            q = op(q, k, v)
        return q

    t_one = measure(op, args, min_samples=30, max_samples=30)["time_s"]
    t_chain = measure(chain, args, min_samples=30, max_samples=30)["time_s"] / N_CHAIN
    print(f"{shape} w{window} s{stride} H{heads}: per call {t_one * 1e6:.1f} us, "
          f"chained {t_chain * 1e6:.1f} us per op ({N_CHAIN} in one jit)", flush=True)


if __name__ == "__main__":
    args = sys.argv[1:] or ["32768", "2048", "2048", "1"]
    for i in range(0, len(args), 4):
        run(*args[i:i + 4])
