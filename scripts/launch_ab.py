"""A/B of launch settings that are fixed per process (a GPU measurement aid): XLA command
buffers (CUDA graphs) for the jax_gna custom calls (JAX_GNA_COMMAND_BUFFER, read when
the FFI targets are registered) and programmatic dependent launch of the Hopper kernels
(JAX_GNA_PDL). Each variant runs in its own child process; the variants alternate round by
round so clock drift hits them alike.

Per problem the child times: one forward per call; 16 forwards in one jit (each output the
next query; problems under 300 us per forward only), per forward; forward+backward
(jax.grad) per call. It also reports how often the FFI handlers ran per timed call (0 when
XLA replays a recorded CUDA graph) and a hash of the outputs, which must agree across
variants (neither setting changes the arithmetic).

A variant may also be given as NAME=VAR=VALUE,... (--variant, as in ab_env.py); with
LD_PRELOAD naming another build of libjax_gna_cuda.so (it has that soname, so it satisfies
the Python module's dependency) this times two builds of the library side by side, e.g.
--variant old=LD_PRELOAD=$PWD/build/old/libjax_gna_cuda.so. The child reports which file
of the library it loaded.

usage (on the GPU): python3 scripts/launch_ab.py [--rounds 2] [--variants base,graph,...]
    [--variant NAME=VAR=VALUE,...] [shape window stride heads] ...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

DEFAULT = ["32768", "2048", "2048", "1", "32768", "2048", "1", "1", "256x256", "80x80", "16x16", "24"]
# XLA records every compatible custom call into a command buffer, however short the sequence.
FORCE_GRAPHS = "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"
VARIANTS = {
    "base": {"JAX_GNA_COMMAND_BUFFER": "0", "JAX_GNA_PDL": "0"},
    "graph": {"JAX_GNA_COMMAND_BUFFER": "1", "JAX_GNA_PDL": "0"},
    "pdl": {"JAX_GNA_COMMAND_BUFFER": "0", "JAX_GNA_PDL": "1"},
    "graph+pdl": {"JAX_GNA_COMMAND_BUFFER": "1", "JAX_GNA_PDL": "1"},
    "forced": {"JAX_GNA_COMMAND_BUFFER": "1", "JAX_GNA_PDL": "0", "XLA_FLAGS": FORCE_GRAPHS},
    "forced+pdl": {"JAX_GNA_COMMAND_BUFFER": "1", "JAX_GNA_PDL": "1", "XLA_FLAGS": FORCE_GRAPHS},
}


def parse_variant(s: str) -> tuple[str, dict[str, str]]:
    """NAME=VAR=VALUE,VAR=VALUE (or NAME alone): the variant's name and environment."""
    name, _, rest = s.partition("=")
    return name, dict(kv.split("=", 1) for kv in rest.split(",") if kv)


def child(probs: list[str], samples: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_gna import cuda
    from jax_gna.bench import chained_fwd
    from profile_sm90 import problem  # this directory

    lib, _ = cuda._load_library()
    with open("/proc/self/maps") as f:
        loaded = sorted({ln.split()[-1] for ln in f if ln.rstrip().endswith("libjax_gna_cuda.so")})
    print("LIBRARY " + " ".join(loaded), flush=True)

    def time_calls(fn, args, inner):
        jax.block_until_ready(fn(*args))
        r0 = lib.handler_runs()
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / inner, (lib.handler_runs() - r0) / inner

    res = {}
    for i in range(0, len(probs), 4):
        shape, window, stride, heads = probs[i:i + 4]
        op, args = problem(shape, window, stride, heads)

        def loss(q, k, v):
            return jnp.sum(op(q, k, v).astype(jnp.float32))

        fns = {"fwd": (jax.jit(op), 1), "fwd+bwd": (jax.jit(jax.grad(loss, argnums=(0, 1, 2))), 1)}
        one, _ = time_calls(fns["fwd"][0], args, 20)
        if one < 300e-6:
            chained, _ = chained_fwd(op, *args, (), n=16)
            fns["fwd x16"] = (jax.jit(chained), 16)
        for pname, (fn, per) in fns.items():
            out = jax.tree_util.tree_map(np.asarray, fn(*args))
            h = hashlib.sha1(b"".join(x.tobytes() for x in jax.tree_util.tree_leaves(out))).hexdigest()[:12]
            one, _ = time_calls(fn, args, 1)
            inner = int(min(50, max(1, 0.02 // one)))
            t_end = time.perf_counter() + 0.5
            while time.perf_counter() < t_end:
                time_calls(fn, args, inner)
            ts, runs = [], []
            for _ in range(samples):
                t, r = time_calls(fn, args, inner)
                ts.append(t / per)
                runs.append(r)
            res[f"{shape} w{window} s{stride} H{heads} {pname}"] = {
                "s": statistics.median(ts), "runs": statistics.median(runs), "hash": h}
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--samples", type=int, default=7)
    ap.add_argument("--variants", default="base,graph,pdl,graph+pdl", help=f"from {', '.join(VARIANTS)}")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=VAR=VALUE,...: a variant of its own environment (after --variants)")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("problems", nargs="*")
    a = ap.parse_args()
    probs = a.problems or DEFAULT
    if a.child:
        child(probs, a.samples)
        return
    variants = [(name, VARIANTS[name]) for name in a.variants.split(",") if name]
    variants += [parse_variant(v) for v in a.variant]
    got: dict[str, dict[str, list]] = {name: {} for name, _ in variants}
    for r in range(a.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for name, env in order:
            t0 = time.time()
            p = subprocess.run([sys.executable, __file__, "--child", "--samples", str(a.samples), *probs],
                               env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if r == 0:
                print(f"{name}: " + next((x for x in p.stdout.splitlines() if x.startswith("LIBRARY ")),
                                         "LIBRARY ?"), flush=True)
            if p.returncode or not line:
                print(f"{name} round {r}: rc={p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}", flush=True)
                continue
            for key, val in json.loads(line[0][7:]).items():
                got[name].setdefault(key, []).append(val)
            print(f"round {r} {name}: {time.time() - t0:.0f} s", flush=True)
    keys = sorted({k for d in got.values() for k in d})
    for key in keys:
        cells, hashes = [], set()
        for name, _ in variants:
            vals = got[name].get(key, [])
            if not vals:
                cells.append(f"{name} -")
                continue
            s = statistics.median(v["s"] for v in vals)
            runs = statistics.median(v["runs"] for v in vals)
            hashes.update(v["hash"] for v in vals)
            each = " ".join(f"{v['s'] * 1e6:.1f}" for v in vals)
            cells.append(f"{name} {s * 1e6:.1f} us [{each}] (handler runs/call {runs:g})")
        print(f"{key}: " + "; ".join(cells) + f"; outputs {'equal' if len(hashes) == 1 else 'DIFFER'}",
              flush=True)


if __name__ == "__main__":
    main()
