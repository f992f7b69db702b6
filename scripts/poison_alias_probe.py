"""Probe for session 26's wrong gradients (benchmarks/results/extra-tokens-h200.md); its
run in session 27 found the cause: the poisoned test targets' equal NaN fills.

The first version of ``cuda.dense_attention`` ran N queries over S tokens as two
independent kernel calls: the whole blocks of S queries stacked in the batch, and one
short query block of the last ``N % S`` rows. With the poisoned test targets
(NaN-filled output buffers aliased to the kernels' outputs), both calls present and more
than one head, dK came out wrong (it looks like dV) and dV right. This rebuilds that
version here and runs it under several conditions, each in its own process, to tell
whether the poisoned outputs' buffers are the cause (an XLA:GPU buffer-sharing problem
that would touch only the test hook) or the kernels are:

  poisoned     NaN fills aliased to dq, dk, dv (the test hook of the failing runs)
  plain        no poison: the targets the op uses
  fills        dq / dk / dv filled with NaN / +inf / -inf (fills XLA cannot merge: the
               test hook since session 27)
  nocmdbuf     poisoned, JAX_GNA_COMMAND_BUFFER=0 (no CUDA graphs for our calls)
  nofusion     poisoned, XLA_FLAGS=--xla_disable_hlo_passes=priority-fusion

For each case it prints the relative errors of out, dq, dk, dv against
``xla.dense_attention`` in float32, and of dk against the reference dV ("dk~dv": near
round-off means the wrong dK holds dV).

usage: python3 scripts/poison_alias_probe.py            (all conditions, one GPU)
       python3 scripts/poison_alias_probe.py --condition plain
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONDITIONS = {
    "poisoned": {},
    "plain": {},
    "fills": {},
    "nocmdbuf": {"JAX_GNA_COMMAND_BUFFER": "0"},
    "nofusion": {"XLA_FLAGS": "--xla_disable_hlo_passes=priority-fusion"},
}
# queries N, tokens S, heads, kv heads, head dim, dtype: two failing rows of the table
# (GQA bf16 d=256; f16 d=112) and the one-head row that passed
CASES = [(780, 114, 4, 2, 256, "bfloat16"), (1022, 150, 2, 1, 112, "float16"),
         (1022, 150, 1, 1, 112, "float16")]


def two_calls(query, key, value, scale, poison):
    """The first version: whole blocks in the batch, plus one short block for the rest."""
    import jax.numpy as jnp

    from jax_gna import cuda
    from jax_gna.params import Problem

    b, n, h, d = query.shape
    s = key.shape[1]
    full, rest = divmod(n, s)
    grid = Problem(shape=(s,), kernel_size=(s,), stride=(1,), dilation=(1,), is_causal=(False,),
                   scale=scale)
    outs, lses = [], []
    if full:
        qf = query[:, :full * s].reshape(b * full, s, h, d)
        kf, vf = (jnp.broadcast_to(x[:, None], (b, full) + x.shape[1:]).reshape((b * full,) + x.shape[1:])
                  for x in (key, value))
        o, l = cuda._attention(qf, kf, vf, grid, poison, ())
        outs.append(o.reshape(b, full * s, h, -1))
        lses.append(l.reshape(b, full * s, h))
    if rest:
        o, l = cuda._attention(query[:, full * s:], key, value, grid.replace(q_extent=(rest,)),
                               poison, ())
        outs.append(o)
        lses.append(l)
    return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=1)


def run(condition: str) -> list:
    import jax
    import jax.numpy as jnp

    from fuzz_gpu import rel_error  # this script's folder is on sys.path
    from jax_gna import cuda, xla

    if condition not in ("plain", "fills"):  # the old hook: the backward's outputs all NaN
        def backward_call(query, key, value, dout, lse, delta, problem, poison=False, devices=()):
            cuda._register()
            results = (jax.ShapeDtypeStruct(query.shape, query.dtype),
                       jax.ShapeDtypeStruct(key.shape, key.dtype),
                       jax.ShapeDtypeStruct(value.shape, value.dtype))
            inits = [jnp.full(r.shape, jnp.nan, r.dtype) for r in results]
            call = jax.ffi.ffi_call(cuda.BWD_TARGET + "_aliased", results, vmap_method="broadcast_all",
                                    input_output_aliases={6: 0, 7: 1, 8: 2})
            return call(query, key, value, dout, lse, delta, *inits, **cuda._attrs(problem, devices))
        cuda._backward_call = backward_call
    poison = condition != "plain"

    rows = []
    for n, s, h, h_kv, d, dt in CASES:
        dtype = jnp.dtype(dt)
        ks = jax.random.split(jax.random.PRNGKey(n * 7 + s + d), 5)
        q = jax.random.normal(ks[0], (1, n, h, d), jnp.float32).astype(dtype)
        k = jax.random.normal(ks[1], (1, s, h_kv, d), jnp.float32).astype(dtype)
        v = jax.random.normal(ks[2], (1, s, h_kv, d), jnp.float32).astype(dtype)
        do = jax.random.normal(ks[3], (1, n, h, d), jnp.float32)
        dl = jax.random.normal(ks[4], (1, n, h), jnp.float32)

        def grads(fn, *a):
            (o, l), vjp = jax.vjp(lambda q, k, v: fn(q, k, v, d ** -0.5), *a)
            return (o, l) + vjp((do.astype(o.dtype), dl))

        got = jax.jit(lambda *a: grads(lambda *b: two_calls(*b, poison), *a))(q, k, v)
        ref = jax.jit(lambda *a: grads(xla.dense_attention, *a))(*(x.astype(jnp.float32) for x in (q, k, v)))
        errs = {name: rel_error(a, r) for name, a, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref)}
        errs["dk~dv"] = rel_error(got[3], ref[4])
        rows.append({"case": [n, s, h, h_kv, d, dt], "full_rest": list(divmod(n, s)),
                     "errs": {key: round(x, 5) for key, x in errs.items()}})
        print(condition, rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--condition", choices=sorted(CONDITIONS))
    ap.add_argument("--out", help="write every condition's rows here (JSON)")
    args = ap.parse_args(argv)
    if args.condition:
        print("ROWS " + json.dumps(run(args.condition)), flush=True)
        return 0
    results = {}
    for cond, env in CONDITIONS.items():  # each condition's rows as soon as it ends
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--condition", cond],
                              env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("ROWS ")]
        results[cond] = json.loads(lines[-1][5:]) if lines else {"failed": proc.stderr[-2000:]}
        print(cond, "done" if lines else "FAILED:\n" + proc.stderr[-1000:], flush=True)
        for r in results[cond] if lines else []:
            e = r["errs"]
            print(f"{cond:9s} N={r['case'][0]:5d} S={r['case'][1]:4d} heads {r['case'][2]}/{r['case'][3]} "
                  f"d={r['case'][4]:3d} {r['case'][5]:8s} dq {e['dq']:.4f} dk {e['dk']:.4f} "
                  f"dv {e['dv']:.4f} dk~dv {e['dk~dv']:.4f}", flush=True)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
