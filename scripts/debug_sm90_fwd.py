"""Which problems does the Hopper forward get wrong, or hang on? (a GPU debugging aid)

For a ladder of problems, simplest first, runs the NaN-poisoned cuda forward with the
Hopper kernel forced (JAX_GNA_SM90=force) in a child process with a time limit, and
prints per problem: ok and the relative errors of out / lse against a float32 `xla`
reference, the error, or TIMEOUT (the kernel did not finish: a hang).

usage (on the GPU): python3 scripts/debug_sm90_fwd.py [head_dim ...]   (default 256 128)
"""

from __future__ import annotations

import os
import subprocess
import sys

LADDER = [
    # shape, kernel, stride, causal, (b, h, h_kv)
    ((256,), 256, 1, False, (1, 1, 1)),        # dense, full key tiles
    ((256,), 64, 64, False, (1, 1, 1)),        # blocked, full key tiles
    ((256,), 31, 1, False, (1, 1, 1)),         # masked key tiles
    ((256,), 31, 1, True, (1, 1, 1)),
    ((600,), 200, 1, True, (1, 2, 1)),         # a GPU test case
    ((32, 32), 16, 16, False, (1, 2, 2)),      # 2-D blocked
    ((20, 23), (5, 4), (2, 1), (False, True), (2, 4, 2)),
    ((8, 16, 24), (4, 8, 8), (4, 8, 8), False, (1, 2, 1)),
]


def child(case: int, dim: int) -> None:
    import numpy as np

    import jax
    import jax.numpy as jnp

    from jax_gna import cuda, xla
    from jax_gna.params import Problem

    shape, k, s, c, (b, h, hkv) = LADDER[case]
    n = len(shape)
    tup = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x,) * n  # noqa: E731
    p = Problem(shape=shape, kernel_size=tup(k), stride=tup(s), dilation=(1,) * n,
                is_causal=tuple(bool(x) for x in tup(c)), scale=dim ** -0.5)
    keys = jax.random.split(jax.random.PRNGKey(case), 3)
    q = jax.random.normal(keys[0], (b, *shape, h, dim), jnp.float16)
    kk = jax.random.normal(keys[1], (b, *shape, hkv, dim), jnp.float16)
    v = jax.random.normal(keys[2], (b, *shape, hkv, dim), jnp.float16)
    o, l = jax.block_until_ready(jax.jit(lambda q, k, v: cuda._attention_poisoned(q, k, v, p))(q, kk, v))
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    ro, rl = xla.attention(f32(q), f32(kk), f32(v), p)

    def rel(a, r):
        a, r = np.asarray(f32(a), np.float64), np.asarray(r, np.float64)
        return float(np.linalg.norm(a - r) / np.linalg.norm(r)), int(np.isnan(a).sum())

    print(f"ok out {rel(o, ro)} lse {rel(l, rl)}")


def main(dims: list[int], limit_s: float = 30.0, max_timeouts: int = 2) -> None:
    env = dict(os.environ, JAX_GNA_SM90="force", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    for dim in dims:
        timeouts = 0
        for i, case in enumerate(LADDER):
            try:
                r = subprocess.run([sys.executable, __file__, "--child", str(i), str(dim)], env=env,
                                   capture_output=True, text=True, timeout=limit_s)
                lines = (r.stdout + r.stderr).strip().splitlines()
                res = lines[-1] if lines else f"rc={r.returncode}, no output"
            except subprocess.TimeoutExpired:
                res = f"TIMEOUT ({limit_s:.0f} s)"
                timeouts += 1
            print(f"D={dim} {case}: {res}", flush=True)
            if timeouts >= max_timeouts:
                print(f"D={dim}: stopped after {timeouts} timeouts", flush=True)
                break


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main([int(x) for x in sys.argv[1:]] or [256, 128])
