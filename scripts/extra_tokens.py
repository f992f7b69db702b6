"""What additional (global) tokens cost on the GPU: on our kernels and on XLA.

The public op attends to ``additional_keys/values`` by a dense attention merged with the
neighborhood attention's output by log-sum-exp. On the cuda backend that dense part runs
on our kernels from ``cuda.DENSE_MIN_KEYS`` tokens on (``cuda.dense_attention``: the
queries cut into blocks of S tokens stacked in the batch, each a 1-D problem of S
positions whose window is all S keys, the keys broadcast to every block); before, and
below that, on XLA (``xla.dense_attention``: query chunks of 1024, einsums,
log-sum-exp). For each problem and number of extra tokens S this times, bf16, batch 1,
head dim 128, forward and forward+backward, all in one process
(``jax_gna.bench.measure``):
  na          the neighborhood attention alone (cuda backend)
  na+extra    the public op with the extra tokens (cuda backend)
  na+xla      the same with the dense part on XLA (the op before the kernels took it)
  xla         ``xla.dense_attention`` alone
  kernel      ``cuda.dense_attention`` alone (on the kernels even below DENSE_MIN_KEYS);
              its error against ``xla`` (out, lse; the tokens' dK / dV with the kernels
              summing runs of blocks, ``cuda._dkv_sum``, and with one per block)
  kernel-ctasN, na+extra-ctasN  (``--dkv-ctas N,...``; the second where na+extra is
              asked for) ``kernel`` / ``na+extra`` with the tokens' dK / dV summed in
              runs by session 29's rule (the longest run of blocks that leaves N CTAs;
              1024 was its default) instead of ``cuda._dkv_sum``'s wave model
  kernel-per-block  (asked for by name) ``kernel`` with the tokens' dK / dV per query
              block, summed in float32 outside the kernels (no run sums: the backward
              before session 29)
  cudnn       cuDNN's fused attention of the queries over the S tokens
              (``jax.nn.dot_product_attention``, no log-sum-exp): a bound for a fused kernel
  blocks      (asked for by name) the kernels on the query blocks and the tokens already
              copied to every block (made before the timed call; its backward leaves dK/dV
              per block, unsummed): what ``kernel`` cost without its copy of the tokens per
              block, before the kernels read them broadcast (session 28)
  na+extra-apart  na+extra traced with ``JAX_GNA_FUSED_TOKENS=0``: the tokens' forward
              apart from the neighborhood one and merged in XLA (the op before session 31),
              where na+extra takes them as extra key tiles of the Hopper forward; the two
              ops' outputs and gradients are compared (``fused_vs_apart``)
  na+extra-recompute  (asked for by name) na+extra with the tokens' partitioned backward
              recomputing their forward (``dense.backward`` removed while tracing)

With ``--kernels`` every variant timed is also profiled (torch.profiler, 10 calls):
each kernel's median duration, printed and recorded (``kernels``: [name, s, launches]).

usage: python3 scripts/extra_tokens.py [--out FILE.json] [--extra 16,77,512] [--variants xla,kernel]
       [--dkv-ctas 256,4096] [--kernels]
       [--heads 1] [--variants kernel,blocks]
       [--devices 2 --variants na,na+extra,na+extra-recompute --passes fwdbwd]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name -> (shape, heads, kernel_size, stride)
PROBLEMS = {
    "2d_w80_s16": ((256, 256), 24, (80, 80), (16, 16)),
    "1d_w2048": ((32768,), 8, (2048,), (1,)),
    "3d_w18x24x24_s16x8x8": ((30, 48, 80), 24, (18, 24, 24), (16, 8, 8)),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="extra-tokens.json")
    ap.add_argument("--problems", default="2d_w80_s16,1d_w2048")
    ap.add_argument("--extra", default="16,77,512")
    ap.add_argument("--passes", default="fwd,fwdbwd")
    ap.add_argument("--variants", default="na,na+extra,na+xla,xla,kernel,cudnn",
                    help="which of the variants above to time")
    ap.add_argument("--devices", type=int, default=1,
                    help="split the queries' last spatial axis over this many GPUs (the "
                         "partitioned op under jit); adds the variant na+extra-recompute: the "
                         "tokens' backward recomputing their forward, as before it took the "
                         "saved out / lse")
    ap.add_argument("--heads", type=int, default=0,
                    help="the number of heads for every problem (default: the problem's own)")
    ap.add_argument("--dkv-ctas", default="",
                    help="comma-separated CTA counts: adds the variants kernel-ctasN")
    ap.add_argument("--kernels", action="store_true",
                    help="also each GPU kernel's median time in every variant (torch.profiler)")
    args = ap.parse_args(argv)
    sweep = [int(x) for x in args.dkv_ctas.split(",") if x]
    chosen = args.variants.split(",")
    chosen += [f"{v}-ctas{n}" for v in ("kernel", "na+extra") if v in chosen for n in sweep]

    import jax
    import jax.numpy as jnp

    import jax_gna
    from jax_gna import bench, cuda, xla
    from jax_gna.params import make_problem

    records = []
    for name in args.problems.split(","):
        shape, heads, kernel, stride = PROBLEMS[name]
        heads = args.heads or heads
        rng = np.random.default_rng(0)
        q, k, v, do = (jnp.asarray(rng.standard_normal((1, *shape, heads, 128)), jnp.bfloat16)
                       for _ in range(4))
        if args.devices > 1:
            from jax.sharding import Mesh, NamedSharding, PartitionSpec

            mesh = Mesh(np.array(jax.devices()[:args.devices]), ("x",))
            split = NamedSharding(mesh, PartitionSpec(*[None] * len(shape), "x"))
            q, k, v, do = (jax.device_put(x, split) for x in (q, k, v, do))
        scale = 128 ** -0.5
        problem = make_problem(q, k, v, kernel, stride)
        for s in (int(x) for x in args.extra.split(",")):
            ek, ev = (jnp.asarray(rng.standard_normal((1, s, heads, 128)), jnp.bfloat16)
                      for _ in range(2))
            flat = lambda x: x.reshape(x.shape[0], -1, *x.shape[-2:])  # noqa: E731

            def na_xla(q, k, v):
                out, lse = cuda.attention(q, k, v, problem)
                return xla.merge(out, lse, *xla.dense_attention(q, ek, ev, scale))[0]

            variants = {
                "na": lambda q, k, v: jax_gna.neighborhood_attention(
                    q, k, v, kernel, stride, backend="cuda"),
                "na+extra": lambda q, k, v: jax_gna.neighborhood_attention(
                    q, k, v, kernel, stride, additional_keys=ek, additional_values=ev,
                    backend="cuda"),
                "na+xla": na_xla,
                "xla": lambda q, k, v: xla.dense_attention(q, ek, ev, scale)[0],
                "kernel": lambda q, k, v: cuda.dense_attention(q, ek, ev, scale)[0],
                "cudnn": lambda q, k, v: jax.nn.dot_product_attention(
                    flat(q), ek, ev, scale=scale, implementation="cudnn").reshape(q.shape),
            }
            variants["na+extra-recompute"] = variants["na+extra"]  # traced without .backward
            variants["na+extra-apart"] = variants["na+extra"]  # traced with JAX_GNA_FUSED_TOKENS=0
            variants["blocks"] = None  # _blocks_pass
            variants["kernel-per-block"] = variants["kernel"]  # traced with runs of 1
            for n in sweep:  # traced with _runs_for(n)
                variants[f"kernel-ctas{n}"] = variants["kernel"]
                variants[f"na+extra-ctas{n}"] = variants["na+extra"]
            least, dkv_sum = cuda.DENSE_MIN_KEYS, cuda._dkv_sum

            def with_grads(fn, q, ek, ev, do):  # out, lse, d tokens_k, d tokens_v
                (out, lse), vjp = jax.vjp(lambda ek, ev: fn(q, ek, ev, scale), ek, ev)
                return (out, lse) + vjp((do, jnp.zeros_like(lse)))

            cuda.DENSE_MIN_KEYS = 2  # "kernel": the kernels for every S (read while tracing)
            got = jax.jit(functools.partial(with_grads, cuda.dense_attention))(q, ek, ev, do)
            cuda._dkv_sum = _per_block
            per_block = jax.jit(functools.partial(with_grads, cuda.dense_attention))(q, ek, ev, do)
            cuda.DENSE_MIN_KEYS, cuda._dkv_sum = least, dkv_sum
            ref = jax.jit(functools.partial(with_grads, xla.dense_attention))(
                *(x.astype(jnp.float32) for x in (q, ek, ev, do)))
            errs = {n: _rel(a, r) for n, a, r in zip(("out", "lse", "dk", "dv"), got, ref)}
            errs.update({n + "_per_block": _rel(a, r)
                         for n, a, r in zip(("dk", "dv"), per_block[2:], ref[2:])})
            print(f"{name} S={s}: kernel against xla {errs}", flush=True)
            if "na+extra-apart" in chosen:
                errs.update(_fused_vs_apart(kernel, stride, q, k, v, do, ek, ev))
                print(f"{name} S={s}: fused against apart {errs}", flush=True)
            for pass_ in args.passes.split(","):
                for label, f in variants.items():
                    if label not in chosen:
                        continue
                    cuda.DENSE_MIN_KEYS = 2 if label.startswith("kernel") else least
                    if label == "kernel-per-block":
                        cuda._dkv_sum = _per_block
                    if "-ctas" in label:
                        cuda._dkv_sum = _runs_for(int(label.rsplit("-ctas", 1)[1]))
                    kernels = None
                    if label == "na+extra-recompute":
                        del cuda.dense_attention.backward
                    if label == "na+extra-apart":  # read while tracing: no cached traces
                        os.environ["JAX_GNA_FUSED_TOKENS"] = "0"
                        jax.clear_caches()
                    try:
                        if label == "blocks":
                            fn, fargs = _blocks_pass(q, ek, ev, do, scale, pass_)
                        else:
                            fn, fargs = bench.pass_fn(f, pass_, q, k, v, do, ())
                        t = bench.measure(fn, fargs)["time_s"]
                        if args.kernels:
                            kernels = _kernel_times(fn, fargs)
                    except Exception as e:  # noqa: BLE001 - record and go on
                        print(f"  {label} {pass_}: failed {e!r}"[:400], flush=True)
                        t = None
                    finally:
                        cuda.DENSE_MIN_KEYS, cuda._dkv_sum = least, dkv_sum
                        cuda.dense_attention.backward = cuda.dense_backward
                        if os.environ.pop("JAX_GNA_FUSED_TOKENS", None) is not None:
                            jax.clear_caches()
                    records.append({"problem": name, "extra": s, "pass": pass_, "variant": label,
                                    "devices": args.devices, "heads": heads,
                                    "time_s": t, "errs_kernel_vs_xla": errs, "kernels": kernels})
                    print(f"{name:12s} S={s:5d} {pass_:7s} {label:9s} "
                          + ("failed" if t is None else f"{t * 1e3:9.3f} ms"), flush=True)
                    for kname, ks, per in kernels or ():
                        print(f"    {ks * 1e6:10.1f} us x{per:g}  {kname[:110]}", flush=True)
    with open(args.out, "w") as fh:
        json.dump({"environment": bench.environment(), "records": records}, fh, indent=1)
    return 0


def _rel(a, r) -> float:
    """Relative L2 difference of ``a`` against ``r``, both taken in float32."""
    import jax.numpy as jnp

    a, r = (x.astype(jnp.float32).ravel() for x in (a, r))
    return float(jnp.linalg.norm(a - r) / jnp.linalg.norm(r))


def _fused_vs_apart(kernel, stride, q, k, v, do, ek, ev) -> dict:
    """Relative L2 differences of the op's out and q / k / v / tokens' gradients with the
    tokens as key tiles (by default) against the tokens apart (``JAX_GNA_FUSED_TOKENS=0``,
    read while tracing: the caches are cleared around it), the public op on the cuda backend."""
    import jax
    import jax_gna

    def run(q, k, v, do, ek, ev):
        out, vjp = jax.vjp(lambda *a: jax_gna.neighborhood_attention(
            *a[:3], kernel, stride, additional_keys=a[3], additional_values=a[4],
            backend="cuda"), q, k, v, ek, ev)
        return (out,) + vjp(do)

    args = (q, k, v, do, ek, ev)
    jax.clear_caches()
    fused = jax.jit(run)(*args)
    os.environ["JAX_GNA_FUSED_TOKENS"] = "0"
    jax.clear_caches()
    try:
        apart = jax.jit(run)(*args)
    finally:
        os.environ.pop("JAX_GNA_FUSED_TOKENS", None)
        jax.clear_caches()
    names = ("out", "dq", "dk", "dv", "d_tokens_k", "d_tokens_v")
    return {f"fused_vs_apart_{n}": _rel(a, r) for n, a, r in zip(names, fused, apart)}


def _per_block(b, m, s, h_kv, group=1) -> int:
    """``cuda._dkv_sum`` for the backward before session 29: dK / dV per block."""
    return 1


def _runs_for(ctas: int):
    """``cuda._dkv_sum`` by session 29's rule: the longest run of blocks (a divisor of m)
    that leaves ``ctas`` CTAs (key tiles of 128), else 1."""
    def runs(b, m, s, h_kv, group=1):
        one = b * m * h_kv * -(-s // 128)
        return max(n for n in range(1, m + 1) if m % n == 0 and (n == 1 or one // n >= ctas))
    return runs


def _kernel_times(fn, fargs, calls: int = 10) -> list:
    """[name, median s, launches per call] of each GPU kernel of ``fn`` jitted, over
    ``calls`` calls (torch.profiler), longest first. A kernel launched k times per call
    gives k entries, "#i name" the i-th launch of each call (e.g. the neighborhood
    attention's dQ kernel and then the tokens')."""
    import statistics

    import jax
    import torch

    from benchmarks.torch_peers import kernel_trace

    jf = jax.jit(fn)
    trace = kernel_trace(torch, lambda: jax.block_until_ready(jf(*fargs)), calls)
    launches: dict[str, list[float]] = {}
    for e in sorted((e for e in trace.get("traceEvents", []) if e.get("cat") == "kernel"),
                    key=lambda e: float(e["ts"])):
        launches.setdefault(e["name"], []).append(float(e["dur"]) * 1e-6)
    rows = []
    for name, durs in launches.items():
        k = max(len(durs) // calls, 1)
        for i in range(k):
            rows.append([f"#{i + 1} {name}" if k > 1 else name, statistics.median(durs[i::k]), 1])
    return sorted(rows, key=lambda r: -r[1])


def _blocks_pass(q, ek, ev, do, scale, pass_):
    """The ``blocks`` variant: ``cuda.attention`` of the tokens' 1-D problem on the query
    blocks and the tokens broadcast to each block, both made here, outside the timed call."""
    import jax
    import jax.numpy as jnp

    from jax_gna import bench, cuda

    rank, s = q.ndim - 3, ek.shape[1]
    grid = cuda._token_grid(s, scale)
    qb, dob = (jax.jit(lambda x: cuda._dense_blocks(x, rank, s))(x) for x in (q, do))
    kb, vb = (jax.jit(lambda x: jnp.broadcast_to(x[:, None], qb.shape[:2] + x.shape[1:]))(x)
              for x in (ek, ev))
    qb, dob, kb, vb = (x.reshape((-1,) + x.shape[2:]) for x in (qb, dob, kb, vb))
    return bench.pass_fn(lambda q, k, v: cuda.attention(q, k, v, grid)[0], pass_, qb, kb, vb,
                         dob, ())


if __name__ == "__main__":
    sys.exit(main())
