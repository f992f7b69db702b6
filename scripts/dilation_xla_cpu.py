"""The xla backend on dilated problems, with and without the dilation fold
(``xla.attention(..., fold_dilation=...)``), on this machine's CPU: float32, medians of 7
calls after a warm-up, forward and forward+backward, one process. Prints a markdown table.

usage: python3 scripts/dilation_xla_cpu.py
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from jax_gna import xla
from jax_gna.params import make_problem

# shape, batch, heads, head dim, kernel size, dilation
PROBLEMS = [((4096,), 2, 4, 64, 63, 4), ((4096,), 2, 4, 64, 15, 8), ((64, 64), 2, 4, 64, 7, 4),
            ((100, 100), 1, 4, 64, 11, 3), ((16, 24, 24), 1, 4, 64, (3, 5, 5), 2)]


def median_s(fn, args, n: int = 7) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}\n")
    print("| problem | batch x heads, head dim | fwd direct | fwd folded | speedup "
          "| fwd+bwd direct | fwd+bwd folded | speedup | max abs diff |")
    print("| --- " * 9 + "|")
    for shape, b, h, d, k, dil in PROBLEMS:
        keys = jax.random.split(jax.random.PRNGKey(0), 4)
        q, kk, v, do = (jax.random.normal(x, (b, *shape, h, d), jnp.float32) for x in keys)
        p = make_problem(q, kk, v, k, 1, dil, False, None)
        t, outs = {}, {}
        for fold in (False, True):
            def f(q, k, v, fold=fold):
                return xla.attention(q, k, v, p, fold_dilation=fold)[0]
            fwd = jax.jit(f)
            fb = jax.jit(lambda q, k, v, do, f=f: jax.vjp(f, q, k, v)[1](do))
            t[fold] = (median_s(fwd, (q, kk, v)), median_s(fb, (q, kk, v, do)))
            outs[fold] = fwd(q, kk, v)
        diff = float(jnp.abs(outs[True] - outs[False]).max())
        name = "x".join(map(str, shape)) + f" w{k} d{dil}"
        print(f"| {name} | {b} x {h}, {d} | {t[False][0] * 1e3:.1f} ms | {t[True][0] * 1e3:.1f} ms | "
              f"{t[False][0] / t[True][0]:.2f}x | {t[False][1] * 1e3:.1f} ms | {t[True][1] * 1e3:.1f} ms | "
              f"{t[False][1] / t[True][1]:.2f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
