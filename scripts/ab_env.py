"""A/B of kernel variants that the library picks from environment variables at launch
(a GPU measurement aid): one process, one compiled function per problem and pass, the
variants interleaved round by round so clock and thermal drift hit them alike.

Each variant is a set of environment assignments ("base" = none); the library reads
its variables when its FFI handler launches the kernels (csrc/gna_sm90.cu: JAX_GNA_SM90,
JAX_GNA_SM90_BWD, JAX_GNA_PDL, and whatever switch an experiment adds there for the
session). XLA may record a jitted function's calls into a CUDA graph and replay them
without the handler, so each variant gets its own jit, first run with its variables set.
Also prints, per variant, the largest difference of its output from the
first variant's (0 where a variant changes only the schedule, not the arithmetic).
Example: --variant sm80=JAX_GNA_SM90=0 times the Hopper forward against the sm80 one.

usage (on the GPU): python3 scripts/ab_env.py [--passes fwd,bwd] [--rounds 9] [--warm-s 2] [--chain 16]
    [--batch 1] [--head-dim 128]
    [--variant NAME=VAR=VALUE,VAR=VALUE ...] [shape window stride heads] ...
  default problems: the three block-sparse paper problems.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_gna.bench import chained_fwd
from launch_ab import parse_variant  # this directory (python3 scripts/ab_env.py)
from profile_sm90 import problem

DEFAULT = ["32768", "2048", "2048", "1", "256x256", "80x80", "16x16", "24",
           "30x48x80", "18x24x24", "16x8x8", "24"]


def set_env(env: dict[str, str], names: set[str]) -> None:
    for n in names:
        os.environ.pop(n, None)
    os.environ.update(env)


def time_calls(fn, args, inner: int) -> float:
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(inner):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / inner


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--passes", default="fwd")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("--chain", type=int, default=1,
                    help="forward: time one jit of this many ops in a row (each output the next "
                         "query) per call, divided by it: JAX's per-call host time is paid once")
    ap.add_argument("--warm-s", type=float, default=0.0,
                    help="run each problem back to back this long before timing it (GPU clocks)")
    ap.add_argument("--batch", type=int, default=1, help="batch of every problem")
    ap.add_argument("--head-dim", type=int, default=128, help="head dim of every problem")
    ap.add_argument("problems", nargs="*")
    a = ap.parse_args()
    variants = [("base", {})] + [parse_variant(v) for v in a.variant]
    names = {n for _, env in variants for n in env}
    probs = a.problems or DEFAULT
    for i in range(0, len(probs), 4):
        shape, window, stride, heads = probs[i:i + 4]
        op, args = problem(shape, window, stride, heads, batch=a.batch, head_dim=a.head_dim)
        makers = {}  # pass name: (new jitted function, ops per call)
        if "fwd" in a.passes.split(","):
            chained, _ = chained_fwd(op, *args, (), n=a.chain)
            makers["fwd" if a.chain == 1 else f"fwd x{a.chain}"] = (
                lambda chained=chained: jax.jit(lambda *x: chained(*x)), a.chain)
        if "bwd" in a.passes.split(","):
            def loss(q, k, v):
                return jnp.sum(op(q, k, v).astype(jnp.float32))
            makers["fwd+bwd"] = (lambda loss=loss: jax.jit(jax.grad(lambda *x: loss(*x), argnums=(0, 1, 2))), 1)
        for pname, (make, per) in makers.items():
            times = {name: [] for name, _ in variants}
            outs, fns = {}, {}
            for name, env in variants:  # compile, warm up and keep the outputs per variant
                set_env(env, names)
                fns[name] = make()
                outs[name] = jax.tree_util.tree_map(np.asarray, fns[name](*args))
            set_env({}, names)
            one = time_calls(fns["base"], args, 1)
            inner = int(min(50, max(1, 0.02 // one)))
            t_end = time.perf_counter() + a.warm_s
            while time.perf_counter() < t_end:
                time_calls(fns["base"], args, inner)
            for r in range(a.rounds):
                order = variants[r % len(variants):] + variants[:r % len(variants)]
                for name, env in order:
                    set_env(env, names)
                    times[name].append(time_calls(fns[name], args, inner))
            ref = jax.tree_util.tree_leaves(outs[variants[0][0]])
            line = []
            for name, _ in variants:
                med = statistics.median(times[name])
                diff = max(float(np.max(np.abs(x.astype(np.float32) - y.astype(np.float32))))
                           for x, y in zip(jax.tree_util.tree_leaves(outs[name]), ref))
                line.append(f"{name} {med / per * 1e3:.4f} ms (diff {diff:.3g})")
            print(f"{shape} w{window} s{stride} H{heads} B{a.batch} D{a.head_dim} {pname} "
                  f"[{inner}x{a.rounds}]: " + "; ".join(line), flush=True)
    set_env({}, names)


if __name__ == "__main__":
    main()
