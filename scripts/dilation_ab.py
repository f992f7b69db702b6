"""A/B of dilated problems on a Hopper GPU (a GPU measurement aid): the library's choice
(``fold``: jax_gna.dilation, the groups stacked in the batch and the Hopper kernels on
each piece, where cuda.fold_dilation says so), the fold of every pass whatever the window
(``always``: JAX_GNA_FOLD_DILATION=always), the sm80 kernels, which take dilation
directly (``sm80``: JAX_GNA_FOLD_DILATION=0), and the same window without dilation on
the Hopper kernels (``undilated``: the same work per query, so what the fold's layout
transform and pieces add) and on the sm80 kernels (``undilated-sm80``: JAX_GNA_SM90=0).

One process; per problem and pass one jit per variant (the fold is decided while
tracing), the variants interleaved round by round; median seconds per call. Prints a
line per problem and pass and writes the records as JSON.

usage (on the GPU): PYTHONPATH=.:scripts python3 scripts/dilation_ab.py [--rounds 7]
    [--set big|small|all] [--variants fold,sm80,...] [--passes fwd,fwd+bwd] [--out FILE.json]
  a markdown table of such files (anywhere): python3 scripts/dilation_ab.py --report FILE.json ...
  the layout transform alone against an elementwise copy of the same bytes (the memory
  bandwidth XLA reaches here): ... dilation_ab.py --transform [--set big] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np

import jax_gna
from ab_env import set_env, time_calls  # this directory (python3 scripts/dilation_ab.py)

# name, shape, heads, head dim, kernel size, dilation, causal (batch 8 where the name says)
BIG = [
    ("1d-32768-w512-d4", (32768,), 8, 128, 512, 4, False),
    ("1d-32767-w255-d3-causal", (32767,), 8, 64, 255, 3, True),
    ("2d-256x256-w40x40-d2x2", (256, 256), 24, 128, 40, 2, False),
    ("2d-250x250-w21x21-d3x3", (250, 250), 8, 128, 21, 3, False),
    ("2d-64x64-w7x7-d4x4-b8", (64, 64), 4, 64, 7, 4, False),
    ("3d-30x48x80-w9x12x12-d2x2x2", (30, 48, 80), 24, 128, (9, 12, 12), 2, False),
    ("3d-17x31x33-w3x5x5-d2x3x3", (17, 31, 33), 8, 64, (3, 5, 5), (2, 3, 3), False),
]
SMALL = [  # windows around cuda.FOLD_FORWARD_MIN_KEYS, small grids
    ("2d-64x64-w7x7-d4x4-b8", (64, 64), 4, 64, 7, 4, False),
    ("2d-64x64-w11x11-d4x4-b8", (64, 64), 4, 64, 11, 4, False),
    ("2d-128x128-w13x13-d4x4-b8", (128, 128), 8, 64, 13, 4, False),
    ("2d-128x128-w9x9-d3x3-b8", (128, 128), 8, 128, 9, 3, False),
    ("1d-4096-w63-d4-b8", (4096,), 8, 64, 63, 4, False),
    ("1d-4097-w255-d2-b8", (4097,), 8, 128, 255, 2, False),
    ("3d-17x31x33-w3x5x5-d2x3x3", (17, 31, 33), 8, 64, (3, 5, 5), (2, 3, 3), False),
    ("3d-17x31x33-w5x7x7-d2x3x3", (17, 31, 33), 8, 128, (5, 7, 7), (2, 3, 3), False),
    ("3d-16x32x32-w4x8x8-d2x2x2", (16, 32, 32), 8, 128, (4, 8, 8), 2, False),
]
SETS = {"big": BIG, "small": SMALL, "all": BIG + [p for p in SMALL if p not in BIG]}

VARIANTS = [("fold", {}), ("always", {"JAX_GNA_FOLD_DILATION": "always"}),
            ("sm80", {"JAX_GNA_FOLD_DILATION": "0"}), ("undilated", {}),
            ("undilated-sm80", {"JAX_GNA_SM90": "0"})]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--set", default="all", choices=sorted(SETS))
    ap.add_argument("--variants", default=",".join(v for v, _ in VARIANTS),
                    help="which of them, by name (fold and sm80 always run)")
    ap.add_argument("--passes", default="fwd,fwd+bwd")
    ap.add_argument("--out", default="")
    ap.add_argument("--report", nargs="+", default=None)
    ap.add_argument("--transform", action="store_true")
    a = ap.parse_args()
    if a.report:
        print(report(a.report))
        return
    if a.transform:
        transform(SETS[a.set], a.rounds, a.out)
        return
    chosen = set(a.variants.split(",")) | {"fold", "sm80"}
    variants = [(v, env) for v, env in VARIANTS if v in chosen]
    names = {n for _, env in variants for n in env}
    records = []
    for name, shape, heads, dim, ks, dil, causal in SETS[a.set]:
        batch = 8 if name.endswith("-b8") else 1
        key = jax.random.split(jax.random.PRNGKey(0), 4)
        q, k, v, do = (jax.random.normal(kk, (batch, *shape, heads, dim), jnp.bfloat16) for kk in key)

        def op(q, k, v, dil):
            return jax_gna.neighborhood_attention(q, k, v, ks, dilation=dil, is_causal=causal,
                                                  backend="cuda")

        how = jax_gna.explain(q, k, v, ks, dilation=dil, is_causal=causal, backend="cuda")
        passes = {
            "fwd": lambda dil: jax.jit(lambda q, k, v: op(q, k, v, dil)),
            "fwd+bwd": lambda dil: jax.jit(lambda q, k, v, do: jax.vjp(
                lambda q, k, v: op(q, k, v, dil), q, k, v)[1](do)),
        }
        for pname, make in passes.items():
            if pname not in a.passes.split(","):
                continue
            args = (q, k, v) if pname == "fwd" else (q, k, v, do)
            fns, outs = {}, {}
            for vname, env in variants:
                set_env(env, names)
                fns[vname] = make(1 if vname.startswith("undilated") else dil)
                outs[vname] = jax.tree_util.tree_map(np.asarray, fns[vname](*args))
            set_env({}, names)
            one = time_calls(fns["fold"], args, 1)
            inner = int(min(50, max(1, 0.05 // one)))
            times = {vname: [] for vname, _ in variants}
            for r in range(a.rounds):
                order = variants[r % len(variants):] + variants[:r % len(variants)]
                for vname, env in order:
                    set_env(env, names)
                    times[vname].append(time_calls(fns[vname], args, inner))
            set_env({}, names)
            diff = max(float(np.max(np.abs(x.astype(np.float32) - y.astype(np.float32))))
                       for x, y in zip(jax.tree_util.tree_leaves(outs.get("always", outs["fold"])),
                                       jax.tree_util.tree_leaves(outs["sm80"])))
            med = {vname: statistics.median(t) for vname, t in times.items()}
            rec = {"problem": name, "pass": pname, "batch": batch, "heads": heads,
                   "head_dim": dim, "dtype": "bfloat16", "inner": inner, "rounds": a.rounds,
                   "times_s": times, "median_s": med, "max_abs_diff_always_vs_sm80": diff,
                   "fold_speedup_over_sm80": med["sm80"] / med["fold"], "explain": how}
            records.append(rec)
            print(f"{name} {pname}: " + ", ".join(f"{v} {t * 1e3:.3f} ms" for v, t in med.items())
                  + f"; sm80 / fold {med['sm80'] / med['fold']:.2f}x; max |always (else fold) - sm80| {diff:.3g}",
                  flush=True)
        print(f"  {how}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
                       "records": records}, f, indent=1)


def transform(problems, rounds: int, out_path: str) -> None:
    """Time the fold's copies alone: gathering q, k, v into pieces, and scattering an
    output from them, against ``x + 1`` on the same tensors (an elementwise op that reads
    and writes every byte once: the bandwidth XLA reaches on this GPU)."""
    from jax_gna import dilation
    from jax_gna.params import make_problem

    records = []
    for name, shape, heads, dim, ks, dil, causal in problems:
        batch = 8 if name.endswith("-b8") else 1
        key = jax.random.split(jax.random.PRNGKey(0), 3)
        q, k, v = (jax.random.normal(kk, (batch, *shape, heads, dim), jnp.bfloat16) for kk in key)
        p = make_problem(q, k, v, ks, 1, dil, causal, None)
        parts = dilation.gather(q, p)
        fns = {
            "gather q, k, v": (jax.jit(lambda q, k, v: [dilation.gather(x, p) for x in (q, k, v)]),
                               (q, k, v)),
            "copy q, k, v": (jax.jit(lambda q, k, v: [x + 1 for x in (q, k, v)]), (q, k, v)),
            "scatter out": (jax.jit(lambda parts: dilation.scatter(parts, p)), (parts,)),
            "copy out": (jax.jit(lambda q: q + 1), (q,)),
        }
        for fn, args in fns.values():
            jax.block_until_ready(fn(*args))
        one = time_calls(fns["gather q, k, v"][0], (q, k, v), 1)
        inner = int(min(50, max(1, 0.05 // one)))
        times = {n: [] for n in fns}
        for _ in range(rounds):
            for n, (fn, args) in fns.items():
                times[n].append(time_calls(fn, args, inner))
        med = {n: statistics.median(t) for n, t in times.items()}
        nbytes = q.size * q.dtype.itemsize
        rec = {"problem": name, "pieces": len(parts), "tensor_bytes": nbytes, "median_s": med,
               "gbps_read_write": {n: (3 if "q, k, v" in n else 1) * 2 * nbytes / t / 1e9
                                   for n, t in med.items()}}
        rec["gather_vs_copy"] = med["copy q, k, v"] / med["gather q, k, v"]
        rec["scatter_vs_copy"] = med["copy out"] / med["scatter out"]
        records.append(rec)
        gb = rec["gbps_read_write"]
        print(f"{name} ({len(parts)} pieces, {nbytes / 2**20:.0f} MiB per tensor): gather q,k,v "
              f"{med['gather q, k, v'] * 1e3:.3f} ms ({gb['gather q, k, v']:.0f} GB/s), copy "
              f"{med['copy q, k, v'] * 1e3:.3f} ms ({gb['copy q, k, v']:.0f} GB/s): "
              f"{rec['gather_vs_copy']:.0%}; scatter out {med['scatter out'] * 1e3:.3f} ms "
              f"({gb['scatter out']:.0f} GB/s), copy {med['copy out'] * 1e3:.3f} ms "
              f"({gb['copy out']:.0f} GB/s): {rec['scatter_vs_copy']:.0%}", flush=True)
    if out_path:
        with open(out_path, "w") as f:
            json.dump({"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
                       "records": records}, f, indent=1)


def report(paths: list[str]) -> str:
    """One markdown table of the records of ``paths`` (median ms per call per variant)."""
    names = [v for v, _ in VARIANTS]
    lines = ["| problem | pass | batch x heads, head dim | " + " | ".join(names)
             + " | sm80 / fold | file |", "| --- " * (len(names) + 5) + "|"]
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for r in data["records"]:
            med = r["median_s"]
            cells = [f"{med[v] * 1e3:.3f}" if v in med else "-" for v in names]
            lines.append(f"| {r['problem']} | {r['pass']} | {r['batch']} x {r['heads']}, {r['head_dim']} | "
                         + " | ".join(cells) + f" | {med['sm80'] / med['fold']:.2f}x | "
                         f"{path.rsplit('/', 1)[-1]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
