"""How much of a short call's time is host work? (a GPU measurement aid)

For each problem (bf16, head dim 128, the cuda forward), with the Hopper path on and
off (JAX_GNA_SM90=0), prints per call:
  enqueue:  host time to return from one jitted call while the GPU is busy (the
            Python dispatch, XLA's thunks and the FFI handler's host work);
  per call: back-to-back calls, time until the last one is done (what
            benchmarks/run.py measures);
and the same for a trivial jitted op (x + 1 on one element), JAX's floor. When
"enqueue" is close to "per call", the host, not the kernel, sets the time; the kernel's
own duration then comes from Nsight Compute (device_session.sh `profile`, or
`ncu --metrics gpu__time_duration.sum`).

usage (on the GPU): python3 scripts/dispatch_overhead.py [shape window stride heads] ...
  default: the 1-D block-sparse paper problem, 32768 2048 2048 1
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from profile_sm90 import problem  # this directory (python3 scripts/dispatch_overhead.py)

N = 200


def times(fn, args) -> tuple[float, float]:
    """Median over 7 samples of N back-to-back calls: (enqueue, per call) seconds."""
    jax.block_until_ready(fn(*args))
    enq, tot = [], []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(N):
            out = fn(*args)
        t1 = time.perf_counter()
        jax.block_until_ready(out)
        t2 = time.perf_counter()
        enq.append((t1 - t0) / N)
        tot.append((t2 - t0) / N)
    return statistics.median(enq), statistics.median(tot)


def show(name: str, fn, args) -> None:
    e, t = times(fn, args)
    print(f"{name}: enqueue {e * 1e6:.1f} us, per call {t * 1e6:.1f} us", flush=True)


def main(argv: list[str]) -> None:
    show("trivial jit (x + 1)", jax.jit(lambda x: x + 1), (jnp.zeros((1,), jnp.float32),))
    for i in range(0, len(argv), 4):
        shape, window, stride, heads = argv[i:i + 4]
        op, args = problem(shape, window, stride, heads)
        for mode in ("auto", "0"):
            os.environ["JAX_GNA_SM90"] = mode
            fn = jax.jit(lambda *a: op(*a))  # a new jit per mode (XLA may replay a recorded CUDA graph)
            show(f"{shape} w{window} s{stride} H{heads} JAX_GNA_SM90={mode}", fn, args)
        os.environ.pop("JAX_GNA_SM90")


if __name__ == "__main__":
    main(sys.argv[1:] or ["32768", "2048", "2048", "1"])
