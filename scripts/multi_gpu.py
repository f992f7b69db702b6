"""Sharded neighborhood attention on several GPUs: time per call of the cuda backend on
one GPU against the same problem split over N GPUs, by heads (no communication) and
along a spatial axis (context parallelism: halo exchange by collective-permute).

Forward and forward+backward, bf16, batch 1, head dim 128, under ``jax.jit``; timed by
``jax_gna.bench.measure`` (median of samples of back-to-back calls, after a warm-up).
Scaling efficiency = time on one GPU / (N x time on N GPUs). Writes JSON and a markdown
table. With ``--profile`` each measurement is followed by 10 calls under torch.profiler,
and the kernels of each GPU are summed per call (printed above the measurement's line,
``profile`` in the JSON).

With ``--fold-ab`` (the dilated problems by default) the context layout is timed with the
shards folded into undilated problems (the default) and with ``JAX_GNA_FOLD_DILATION=0``
(the sm80 kernels on the dilated shards), alternating, twice each; no heads layout.

With ``--shard-map`` the context layout is timed twice: the public op under ``jax.jit``
on the split arrays (the op partitions itself), and the explicit path,
``neighborhood_attention_sharded`` (``shard_map`` around the per-shard program, which
picks the shard's problem by ``lax.switch``), alternating, twice each; no heads layout.

With ``--tokens S`` every call has S additional tokens (split by heads like the queries
in the heads layout, whole on every GPU in the context layout). ``--tokens-ab`` times the
heads layout with the tokens as key tiles of each shard's Hopper forward (the default)
and with ``JAX_GNA_FUSED_TOKENS=0`` (apart on each shard), alternating, twice each.

usage: python3 scripts/multi_gpu.py [--gpus N] [--out FILE.json] [--problems NAMES]
       [--passes fwd,fwdbwd] [--profile] [--tokens S [--tokens-ab]]
       [--fold-ab | --shard-map]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name -> (shape, heads, kernel_size, stride, index of the spatial axis split for context
#          [, dilation])
PROBLEMS = {
    "1d_w2048": ((32768,), 8, (2048,), (1,), 0),
    "1d_w2048_s256": ((32768,), 8, (2048,), (256,), 0),
    "2d_w80_s16": ((256, 256), 24, (80, 80), (16, 16), 0),
    "3d_w18x24x24_s16x8x8": ((30, 48, 80), 24, (18, 24, 24), (16, 8, 8), 2),
    # dilated (--fold-ab): the shards hold whole dilation groups, so they fold
    "1d_w512_d4": ((32768,), 8, (512,), (1,), 0, (4,)),
    "2d_w40_d2": ((256, 256), 24, (40, 40), (1, 1), 0, (2, 2)),
    "3d_w9x12x12_d2": ((30, 48, 80), 24, (9, 12, 12), (1, 1, 1), 2, (2, 2, 2)),
}
DILATED = [n for n, p in PROBLEMS.items() if len(p) > 5]


def profile(fn, args, calls: int = 10) -> dict:
    """The kernels and copies of ``calls`` calls of ``fn`` (each waited for), per GPU: time
    per call of our kernels (``gna``), NCCL's and XLA's (fusions, copies), the five
    longest of XLA's, host<->device copies per call, and the span per call (first start
    to last end over all calls, divided by ``calls``)."""
    import jax
    import torch

    from benchmarks.torch_peers import kernel_trace

    compiled = jax.jit(fn).lower(*args).compile()
    trace = kernel_trace(torch, lambda: jax.block_until_ready(compiled(*args)), calls)
    out: dict = {}
    for e in trace.get("traceEvents", []):
        cat = e.get("cat")
        if cat not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        dev = out.setdefault(str(e.get("args", {}).get("device", "?")),
                             {"us_per_call": {}, "xla_top": {}, "copies_per_call": {},
                              "t0": float("inf"), "t1": 0.0})
        t, d, name = float(e["ts"]), float(e["dur"]), e.get("name", "")
        dev["t0"], dev["t1"] = min(dev["t0"], t), max(dev["t1"], t + d)
        if cat != "kernel":
            dev["copies_per_call"][name] = dev["copies_per_call"].get(name, 0) + 1 / calls
            continue
        kind = "gna" if "gna" in name else "nccl" if "nccl" in name.lower() else "xla"
        dev["us_per_call"][kind] = dev["us_per_call"].get(kind, 0.0) + d / calls
        if kind == "xla":
            dev["xla_top"][name[:48]] = dev["xla_top"].get(name[:48], 0.0) + d / calls
    for dev in out.values():
        dev["span_us_per_call"] = (dev.pop("t1") - dev.pop("t0")) / calls
        dev["xla_top"] = dict(sorted(dev["xla_top"].items(), key=lambda kv: -kv[1])[:5])
        print("    device", {k: (round(v, 1) if isinstance(v, float) else
                              {n: round(x, 1) for n, x in v.items()}) for k, v in dev.items()},
              flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--out", default="multi-gpu.json")
    ap.add_argument("--problems", default=",".join(PROBLEMS))
    ap.add_argument("--passes", default="fwd,fwdbwd")
    ap.add_argument("--profile", action="store_true",
                    help="also each call's kernels per GPU (torch.profiler): time per call "
                    "by kind (our kernels, NCCL, XLA's), copies, span")
    ap.add_argument("--backend", default="cuda", help="cuda; xla (with fake CPU devices) "
                    "only checks this script")
    ap.add_argument("--fold-ab", action="store_true",
                    help="context layout with the dilated shards folded and not (see above)")
    ap.add_argument("--shard-map", action="store_true",
                    help="context layout under jit and by neighborhood_attention_sharded "
                         "(see above)")
    ap.add_argument("--tokens", type=int, default=0, help="additional tokens per call")
    ap.add_argument("--tokens-ab", action="store_true",
                    help="heads layout with the tokens as key tiles and apart (see above)")
    args = ap.parse_args(argv)
    if args.tokens_ab and not args.tokens:
        raise SystemExit("--tokens-ab needs --tokens S")
    if args.fold_ab and args.problems == ",".join(PROBLEMS):
        args.problems = ",".join(DILATED)

    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import jax_gna
    from jax_gna import bench, sharding

    gpus = jax.devices()
    if len(gpus) < args.gpus:
        raise SystemExit(f"needs {args.gpus} devices, JAX sees {len(gpus)}")
    n = args.gpus
    mesh = Mesh(np.array(gpus[:n]), ("x",))
    records = []
    unknown = set(args.problems.split(",")) - set(PROBLEMS)
    if unknown:
        raise SystemExit(f"unknown problems {sorted(unknown)}; choose from {list(PROBLEMS)}")
    for name in args.problems.split(","):
        shape, heads, kernel, stride, axis, *dil = PROBLEMS[name]
        dil = dil[0] if dil else 1
        if heads % n or shape[axis] % n:
            print(f"{name}: skipped, {heads} heads and {shape[axis]} rows along axis {axis} "
                  f"do not both split over {n} GPUs", flush=True)
            continue
        rank = len(shape)
        rng = np.random.default_rng(0)
        host = [rng.standard_normal((1, *shape, heads, 128), np.float32) for _ in range(4)]
        tokens = [rng.standard_normal((1, args.tokens, heads, 128), np.float32)
                  for _ in range(2 if args.tokens else 0)]
        left, right = sharding.halo_sizes(shape, kernel, stride=stride, dilation=dil,
                                          shards={axis: n})[axis]

        def f(q, k, v, *extra):
            ak, av = extra or (None, None)
            return jax_gna.neighborhood_attention(q, k, v, kernel, stride, dil,
                                                  additional_keys=ak, additional_values=av,
                                                  backend=args.backend)

        def explicit(q, k, v, *extra):
            ak, av = extra or (None, None)
            return sharding.neighborhood_attention_sharded(
                q, k, v, kernel, stride, dil, mesh=mesh, spatial_axes={axis: "x"},
                additional_keys=ak, additional_values=av, backend=args.backend)

        context = [None] * (rank + 2)
        context[1 + axis] = "x"
        ctx = NamedSharding(mesh, P(*context))
        heads_split = NamedSharding(mesh, P(*([None] * (rank + 1)), "x"))
        one = jax.sharding.SingleDeviceSharding(gpus[0])
        # (label, sharding, environment while tracing ({name: value}), op)
        layouts = [("1 GPU", one, {}, f)]
        if args.fold_ab:
            layouts += [(f"{n} GPUs, context (axis {axis}), {lab}", ctx, env, f)
                        for _ in range(2) for lab, env in (
                            ("folded", {}), ("sm80 dilated", {"JAX_GNA_FOLD_DILATION": "0"}))]
        elif args.shard_map:
            layouts += [(f"{n} GPUs, context (axis {axis}), {lab}", ctx, {}, op)
                        for _ in range(2) for lab, op in (("jit", f), ("shard_map", explicit))]
        elif args.tokens_ab:
            layouts += [(f"{n} GPUs, heads, tokens {lab}", heads_split, env, f)
                        for _ in range(2) for lab, env in (
                            ("as key tiles", {}), ("apart", {"JAX_GNA_FUSED_TOKENS": "0"}))]
        else:
            layouts += [(f"{n} GPUs, heads", heads_split, {}, f),
                        (f"{n} GPUs, context (axis {axis})", ctx, {}, f)]
        for pass_ in args.passes.split(","):
            base = None
            for layout, spec, env, op in layouts:
                q, k, v, do = (jax.device_put(jnp.asarray(x, jnp.bfloat16), spec) for x in host)
                # the tokens [1, S, H, D]: split by heads like the queries, else whole on
                # every device
                tspec = (NamedSharding(mesh, P(None, None, "x")) if spec is heads_split
                         else spec if spec is one else NamedSharding(mesh, P()))
                extra = tuple(jax.device_put(jnp.asarray(x, jnp.bfloat16), tspec) for x in tokens)
                fn, fargs = bench.pass_fn(op, pass_, q, k, v, do, extra)
                if args.fold_ab or args.tokens_ab:  # read while tracing: trace afresh
                    jax.clear_caches()
                os.environ.update(env)
                try:
                    stats = bench.measure(fn, fargs, settle_s=0.5)
                finally:
                    for name_ in env:
                        os.environ.pop(name_, None)
                t = stats["time_s"]
                base = t if base is None else base
                rec = {"problem": name, "shape": shape, "heads": heads, "kernel_size": kernel,
                       "stride": stride, "dilation": dil, "tokens": args.tokens, "pass": pass_,
                       "layout": layout, "time_s": t,
                       "samples": stats["samples"], "inner": stats["inner"],
                       "efficiency": None if layout == "1 GPU" else base / (n * t),
                       "halo_rows": [left, right] if "context" in layout else None}
                if args.profile:
                    try:
                        rec["profile"] = profile(fn, fargs)
                    except Exception as e:  # noqa: BLE001 - the timing above still stands
                        rec["profile"] = f"failed: {e!r}"
                        print("    profile failed:", repr(e), flush=True)
                records.append(rec)
                eff = "" if rec["efficiency"] is None else f"  efficiency {rec['efficiency']:.0%}"
                print(f"{name:24s} {pass_:7s} {layout:28s} {t * 1e3:9.3f} ms{eff}", flush=True)
                del q, k, v, do, extra, fargs

    result = {"environment": bench.environment(), "gpus": n,
              "devices": [str(d) for d in gpus[:n]], "records": records}
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    lines = ["| problem | pass | layout | time (ms) | efficiency | halo rows (left, right) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in records:
        eff = "" if r["efficiency"] is None else f"{r['efficiency']:.0%}"
        halo = "" if r["halo_rows"] is None else f"{r['halo_rows'][0]}, {r['halo_rows'][1]}"
        lines.append(f"| {r['problem']} | {r['pass']} | {r['layout']} | {r['time_s'] * 1e3:.3f} "
                     f"| {eff} | {halo} |")
    with open(os.path.splitext(args.out)[0] + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
