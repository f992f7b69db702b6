"""One forward+backward of the cuda backend on one problem, for Nsight Compute.

    ncu --kernel-name regex:sm90 --launch-count 3 --section SpeedOfLight ... \
        python3 scripts/profile_sm90.py 256x256 80x80 16x16 24

profiles the Hopper forward, dQ and dK/dV kernels (bf16, batch 1, head dim 128).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

import jax_gna


def parse(shape: str, window: str, stride: str) -> tuple[tuple[int, ...], ...]:
    """The command line's "256x256 80x80 16x16" as per-axis tuples (a single number in
    window or stride applies to every axis)."""
    dims = tuple(int(x) for x in shape.split("x"))
    per = lambda s: tuple(int(x) for x in s.split("x")) if "x" in s else (int(s),) * len(dims)  # noqa: E731
    return dims, per(window), per(stride)


def problem(shape: str, window: str, stride: str, heads: str, dtype=jnp.bfloat16,
            batch: int = 1, head_dim: int = 128):
    """The command line's problem: random q, k, v of ``dtype`` (batch 1 and head dim 128
    unless given) and the cuda forward on them, `op(q, k, v)` (also used by
    scripts/dispatch_overhead.py, scripts/kernel_profile.py and scripts/ab_env.py)."""
    dims, win, st = parse(shape, window, stride)
    key = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(kk, (batch, *dims, int(heads), head_dim), dtype) for kk in key)

    def op(q, k, v):
        return jax_gna.neighborhood_attention(q, k, v, win, st, backend="cuda")

    return op, (q, k, v)


def main(shape: str, window: str, stride: str, heads: str) -> None:
    op, (q, k, v) = problem(shape, window, stride, heads)

    def loss(q, k, v):
        return jnp.sum(op(q, k, v).astype(jnp.float32))

    g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    jax.block_until_ready(g(q, k, v))


if __name__ == "__main__":
    main(*sys.argv[1:5])
