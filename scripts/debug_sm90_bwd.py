"""Where does the Hopper backward differ from the sm80 one? (a GPU debugging aid)

For a ladder of problems, simplest first, runs the gradient of the NaN-poisoned cuda
attention with the sm80 backward (known good) and with the Hopper backward
(JAX_GNA_SM90_BWD=force), and prints, per gradient, the relative error against a
float32 `xla` reference and, where the Hopper one is off, which tokens, heads and
head-dim columns are wrong. The forward is the Hopper one in both runs.

usage (on the GPU): python3 scripts/debug_sm90_bwd.py
"""

from __future__ import annotations

import os

import numpy as np

import jax
import jax.numpy as jnp

from jax_gna import cuda, xla
from jax_gna.params import Problem

LADDER = [
    # shape, kernel, stride, causal, (b, h, h_kv, d), dtype
    ((128,), 128, 1, False, (1, 1, 1, 64), jnp.float16),   # one tile, dense
    ((256,), 256, 1, False, (1, 1, 1, 64), jnp.float16),   # 2x2 tiles, dense
    ((256,), 256, 1, False, (1, 1, 1, 128), jnp.float16),
    ((256,), 31, 1, False, (1, 1, 1, 64), jnp.float16),    # a real window
    ((256,), 31, 1, True, (1, 1, 1, 64), jnp.bfloat16),
    ((300,), 16, 16, True, (1, 2, 1, 64), jnp.float16),
    ((1000,), 129, 1, False, (1, 4, 2, 128), jnp.bfloat16),
    ((20, 23), (5, 4), (2, 1), (False, True), (2, 4, 1, 128), jnp.float16),
    ((8, 16, 24), (4, 8, 8), (4, 8, 8), False, (1, 2, 2, 128), jnp.float16),
]


def problem(shape, k, s, c, d):
    n = len(shape)
    tup = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x,) * n  # noqa: E731
    return Problem(shape=tuple(shape), kernel_size=tup(k), stride=tup(s), dilation=(1,) * n,
                   is_causal=tuple(bool(x) for x in tup(c)), scale=d ** -0.5)


def where_wrong(a, r, name):
    """A few lines on which elements of a gradient are off."""
    bad = ~np.isclose(a, r, rtol=5e-2, atol=5e-2 * max(np.abs(r).max(), 1e-6))
    if not bad.any():
        return
    b, *sp, h, d = a.shape
    tok = bad.reshape(b, -1, h, d)
    rows = np.argwhere(tok.any(axis=(0, 2, 3))).ravel()
    heads = np.argwhere(tok.any(axis=(0, 1, 3))).ravel()
    cols = np.argwhere(tok.any(axis=(0, 1, 2))).ravel()
    nan = int(np.isnan(a).sum())
    print(f"    {name}: {bad.mean():.3f} of elements off, NaN {nan}; tokens {len(rows)}/{tok.shape[1]}"
          f" {rows[:12].tolist()}{'...' if len(rows) > 12 else ''} ..{rows[-4:].tolist()};"
          f" heads {heads.tolist()}; columns {len(cols)}/{d} {cols[:8].tolist()}")
    i = tuple(np.argwhere(bad)[0])
    print(f"      first at {i}: got {a[i]:.4g} want {r[i]:.4g}; "
          f"got/want norm {np.linalg.norm(a) / max(np.linalg.norm(r), 1e-30):.4f}")


def main() -> None:
    os.environ["JAX_GNA_SM90"] = "force"
    for n, (shape, k, s, c, (b, h, h_kv, d), dtype) in enumerate(LADDER):
        p = problem(shape, k, s, c, d)
        keys = jax.random.split(jax.random.PRNGKey(n), 5)
        q = jax.random.normal(keys[0], (b, *shape, h, d), jnp.float32).astype(dtype)
        kk = jax.random.normal(keys[1], (b, *shape, h_kv, d), jnp.float32).astype(dtype)
        v = jax.random.normal(keys[2], (b, *shape, h_kv, d), jnp.float32).astype(dtype)
        w = jax.random.normal(keys[3], (b, *shape, h, d), jnp.float32)
        u = jax.random.normal(keys[4], (b, *shape, h), jnp.float32)

        def loss(fn, q, k, v):
            out, lse = fn(q, k, v, p)
            return jnp.sum(out.astype(jnp.float32) * w) + jnp.sum(lse * u)

        f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
        ref = jax.jit(jax.grad(lambda q, k, v: loss(xla.attention, f32(q), f32(k), f32(v)), argnums=(0, 1, 2)))
        want = [np.asarray(x, np.float64) for x in ref(q, kk, v)]
        print(f"[{n}] shape {shape} k {k} s {s} causal {c} b,h,h_kv,d {b, h, h_kv, d} {jnp.dtype(dtype).name}",
              flush=True)
        for mode in ("0", "force"):
            os.environ["JAX_GNA_SM90_BWD"] = mode
            # a new jit per mode (XLA may replay a recorded CUDA graph of an old one)
            got = jax.jit(jax.grad(lambda q, k, v: loss(cuda._attention_poisoned, q, k, v), argnums=(0, 1, 2)))
            try:
                g = [np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in got(q, kk, v)]
            except Exception as e:  # noqa: BLE001 (a debugging aid: say it and go on)
                print(f"  bwd {mode}: raised {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            errs = {nm: float(np.linalg.norm(np.nan_to_num(a, nan=1e6) - r) / np.linalg.norm(r))
                    for nm, a, r in zip(("dq", "dk", "dv"), g, want)}
            print(f"  bwd {'sm80' if mode == '0' else 'sm90'}: "
                  + " ".join(f"{k}={e:.2e}" for k, e in errs.items()), flush=True)
            if mode == "force":
                for nm, a, r in zip(("dq", "dk", "dv"), g, want):
                    if errs[nm] > 5e-2:
                        where_wrong(a, r, nm)


if __name__ == "__main__":
    main()
