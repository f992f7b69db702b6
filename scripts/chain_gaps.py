"""Where the time between our forward kernels goes when JAX runs them back to back (a GPU
measurement aid). The benchmark times 16 forwards in one jit per call; on the 1-D one-head
paper problem that is about 4.6 us per op more than the kernel's own duration. This runs
that chain (and single forwards, one per call) under torch.profiler and prints, from
CUPTI's kernel records: the kernel's median duration, the median gap from one kernel's end
to the next one's start inside a call (negative: the next kernel started before this one
ended, as programmatic dependent launch allows) and between calls, and the time per op.

usage (on the GPU): python3 scripts/chain_gaps.py [--calls 20] [shape window stride heads]
    (default: 1-D 32768 tokens, window 2048, stride 2048, one head; bf16)
The launch settings that are fixed per process (JAX_GNA_PDL, JAX_GNA_COMMAND_BUFFER,
XLA_FLAGS) come from the environment: run it once per setting.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def kernel_events(torch, fn, calls: int, match: str) -> list[tuple[float, float]]:
    """(start, end) in microseconds of every kernel whose name contains ``match``, over
    ``calls`` back-to-back calls of ``fn`` after one warm-up call, in start order; the
    names of the other kernels are printed."""
    from benchmarks.torch_peers import kernel_trace

    kernels = [e for e in kernel_trace(torch, fn, calls).get("traceEvents", []) if e.get("cat") == "kernel"]
    others = sorted({e.get("name", "")[:60] for e in kernels if match not in e.get("name", "")})
    if others:
        print("  other kernels in the timed calls:", "; ".join(others))
    return sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in kernels if match in e.get("name", ""))


def summary(ev: list[tuple[float, float]], per_call: int) -> str:
    """Median duration, gaps inside a call and between calls, and time per op."""
    dur = statistics.median(e - s for s, e in ev)
    inside, between = [], []
    for i in range(1, len(ev)):
        (inside if i % per_call else between).append(ev[i][0] - ev[i - 1][1])
    span = (ev[-1][1] - ev[0][0]) / len(ev)
    fmt = lambda xs: f"{statistics.median(xs):6.2f} us" if xs else "     -"  # noqa: E731
    return (f"kernel {dur:6.2f} us, gap inside a call {fmt(inside)}, between calls {fmt(between)}, "
            f"span per op {span:6.2f} us ({len(ev)} kernels)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("problem", nargs="*")
    a = ap.parse_args(argv)
    prob = a.problem or ["32768", "2048", "2048", "1"]
    if len(prob) != 4:
        ap.error("the problem comes as shape window stride heads")

    import jax
    import jax.numpy as jnp
    import torch

    from jax_gna.bench import CHAIN, chained_fwd
    from profile_sm90 import problem

    op, args0 = problem(*prob)
    qkv = tuple(x.astype(jnp.bfloat16) for x in args0)
    env = {k: os.environ.get(k, "-") for k in ("JAX_GNA_PDL", "JAX_GNA_COMMAND_BUFFER", "XLA_FLAGS")}
    print(" ".join(prob), "bf16;", " ".join(f"{k}={v}" for k, v in env.items()))
    single = jax.jit(op)
    print("one forward per call:  ", summary(kernel_events(torch, lambda: single(*qkv), a.calls, "fwd_sm90"), 1))
    chain, cargs = chained_fwd(op, *qkv, ())
    g = jax.jit(chain)
    print(f"{CHAIN} forwards per call:", summary(kernel_events(torch, lambda: g(*cargs), a.calls, "fwd_sm90"), CHAIN))
    return 0


if __name__ == "__main__":
    sys.exit(main())
