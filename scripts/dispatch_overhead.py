"""How much of a short call's time is host work? (a GPU measurement aid)

Times the cuda forward of one problem two ways, bf16, head dim 128, median of many:
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
import time

import numpy as np

import jax
import jax.numpy as jnp

import jax_gna

N_CHAIN = 16


def timed(fn, args, reps: int, inner: int) -> float:
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / inner)
    return float(np.median(samples))


def run(shape: str, window: str, stride: str, heads: str) -> None:
    dims = tuple(int(x) for x in shape.split("x"))
    n = len(dims)
    per = lambda s: tuple(int(x) for x in s.split("x")) if "x" in s else (int(s),) * n  # noqa: E731
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(kk, (1, *dims, int(heads), 128), jnp.bfloat16) for kk in keys)

    def op(q, k, v):
        return jax_gna.neighborhood_attention(q, k, v, per(window), per(stride), backend="cuda")

    one = jax.jit(op)

    @jax.jit
    def chain(q, k, v):
        for _ in range(N_CHAIN):
            q = op(q, k, v)
        return q

    t_one = timed(one, (q, k, v), 30, 20)
    t_chain = timed(chain, (q, k, v), 30, 2) / N_CHAIN
    print(f"{shape} w{window} s{stride} H{heads}: per call {t_one * 1e6:.1f} us, "
          f"chained {t_chain * 1e6:.1f} us per op ({N_CHAIN} in one jit)", flush=True)


if __name__ == "__main__":
    args = sys.argv[1:] or ["32768", "2048", "2048", "1"]
    for i in range(0, len(args), 4):
        run(*args[i:i + 4])
