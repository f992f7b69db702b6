"""Command line: ``jax-gna`` (also ``python -m jax_gna``).

Subcommands:
  check   run the operator on random 1-D, 2-D and 3-D problems, compare it with the
          float64 brute force, and print the backend used, the error and the time.
  sim     speed-of-light bounds of one problem and tiling, or a tile-shape search.
  bench   the benchmark suite (presets smoke/paper/small/causal or one problem).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

# Each problem: spatial shape, kernel_size, stride, dilation, is_causal.
CHECK_PROBLEMS = (
    ((96,), (7,), (1,), (2,), (False,)),
    ((20, 24), (5, 6), (2, 3), (1, 2), (False, True)),
    ((6, 10, 12), (3, 4, 5), (1, 2, 5), (1, 1, 2), (True, False, False)),
)


def _check(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    import jax_gna
    from jax_gna import reference

    rng = np.random.default_rng(args.seed)
    tol = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}[args.dtype]
    print(f"jax {jax.__version__}, devices: {', '.join(str(d) for d in jax.devices())}")
    failed = 0
    for shape, k, s, d, c in CHECK_PROBLEMS:
        b, h, h_kv, dim = 2, 4, 2, 32
        q, kk, v = (rng.standard_normal((b,) + shape + (n, dim)).astype(np.float32)
                    for n in (h, h_kv, h_kv))
        q, kk, v = (jax.numpy.asarray(x, dtype=args.dtype) for x in (q, kk, v))
        why = jax_gna.explain(q, kk, v, k, s, d, c, backend=args.backend)
        name = (f"{len(shape)}-D {'x'.join(map(str, shape))} kernel={k} stride={s} "
                f"dilation={d} causal={c} {args.dtype}")
        fn = jax.jit(lambda q, kk, v: jax_gna.neighborhood_attention(
            q, kk, v, k, s, d, c, return_lse=True, backend=args.backend))
        try:
            out, lse = jax.block_until_ready(fn(q, kk, v))  # compile + first run
        except ValueError as e:  # e.g. backend="cuda" where the kernels cannot run
            failed += 1
            print(f"{name}: FAILED: {e}")
            continue
        start = time.perf_counter()
        for _ in range(args.repeats):
            out, lse = jax.block_until_ready(fn(q, kk, v))
        ms = (time.perf_counter() - start) / args.repeats * 1e3
        ref_out, ref_lse = reference.attention(
            np.asarray(q, np.float64), np.asarray(kk, np.float64), np.asarray(v, np.float64),
            k, s, d, c)
        err = float(np.abs(np.asarray(out, np.float64) - ref_out).max()
                    / max(np.abs(ref_out).max(), 1e-30))
        lse_err = float(np.abs(np.asarray(lse, np.float64) - ref_lse).max())
        ok = err <= tol and lse_err <= tol * 10 and np.isfinite(err)
        failed += not ok
        print(f"{name}: backend {why}; "
              f"max rel error {err:.2e}, lse error {lse_err:.2e}; {ms:.2f} ms/call "
              f"{'OK' if ok else 'FAILED'}")
    print("all checks passed" if not failed else f"{failed} check(s) FAILED")
    return 1 if failed else 0


def _positive(s: str) -> int:
    n = int(s)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jax-gna", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="compare the operator with a float64 brute force")
    p.add_argument("--backend", default="auto", choices=["auto", "xla", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=_positive, default=5, help="timed calls per problem")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_check)
    _add_sim(sub)
    _add_bench(sub)
    return parser


def _add_sim(sub) -> None:
    """``jax-gna sim``: speed-of-light bounds of one problem (:mod:`jax_gna.sim`)."""
    from . import bench
    p = sub.add_parser("sim", help="speed-of-light bounds of one problem, and a tile search")
    bench.add_sim_arguments(p)
    p.set_defaults(run=bench.run_sim_from_args)


def _add_bench(sub) -> None:
    """``jax-gna bench``: the benchmark suite (:mod:`jax_gna.bench`)."""
    from . import bench
    p = sub.add_parser("bench", help="benchmark against cuDNN dense and masked dense attention")
    bench.add_arguments(p)
    p.set_defaults(run=bench.run_from_args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
