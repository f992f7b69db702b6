"""Random problems through the cuda backend against a NumPy brute force, until a time runs out.

Each case draws a rank, an axis length, kernel size, stride, dilation and causality per
axis, a batch, heads (grouped-query sometimes), head dims (mostly ones the Hopper kernels
take, sometimes any multiple of 8 up to 256, sometimes D_v != D), a dtype and sometimes
additional keys/values (global tokens in the same softmax) from a seeded generator. It
runs the op's own computation (``ops._compute``) on ``cuda._attention_poisoned`` (outputs
start as NaN or inf; the same dispatch as the public op: Hopper kernels, dilation fold or sm80
kernels) under ``jax.jit``, forward, and in most cases the gradients of a loss over out
and lse, and compares them with the float64 NumPy brute force (``jax_gna.reference``,
which shares no code with the backends) with the GPU tests' tolerances
(``tests/test_cuda_gpu.py``'s TOL). The GPU tests pin chosen cases; this looks between
them. A quarter of the cases force the Hopper forward's query tiles per CTA (half of those
its key tile size too) through environment variables set while they run (``env``).

``--devices N`` (N >= 2) shards every case over a mesh of N devices: along one spatial
axis (context parallel: halo exchange, split forward, dilated shards folded where they
hold whole groups), by batch or by heads, as the case draws (``layout``). ``--impl xla``
runs the portable backend in place of the kernels: a dry run of the script itself, e.g.
on CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=2``).

usage: python3 scripts/fuzz_gpu.py --seconds 200 --seed 1 --out fuzz.jsonl [--devices 2] [--tokens 1]
       python3 scripts/fuzz_gpu.py --case '{"shape": [40, 33], ...}'   (one case again)
Prints one line per case and a summary by kernel path; exits 1 if a case failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

import numpy as np

# The tolerances of tests/test_cuda_gpu.py (relative L2: out, lse, gradients).
TOL = {"float32": (2e-5, 2e-5, 5e-5), "float16": (4e-3, 1e-4, 1e-2), "bfloat16": (2.5e-2, 5e-4, 5e-2)}
MAX_TOKENS = {1: 2048, 2: 2048, 3: 2048}  # the brute force is dense: [tokens, tokens]


def draw(rng: np.random.Generator, devices: int = 1, tokens: float = 0.15) -> dict:
    """One random case (a JSON-able dict) whose problem SEMANTICS.md accepts; with
    ``devices`` > 1, also a layout over that many devices that splits evenly; additional
    tokens with probability ``tokens``."""
    rank = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    dtype = str(rng.choice(["bfloat16", "float16", "float32"], p=[0.45, 0.35, 0.2]))
    shape, ks, ss, ds, cs = [], [], [], [], []
    budget = MAX_TOKENS[rank]
    for a in range(rank):
        left = rank - a
        cap = max(4, int(round(budget ** (1 / left))))
        n = int(rng.integers(4, cap * 2)) if rng.random() < 0.5 else int(rng.integers(4, cap + 1))
        n = max(4, min(n, budget // 4 ** (left - 1)))
        budget = max(4 ** (left - 1), budget // n)
        d = 1 if rng.random() < 0.75 else int(rng.integers(2, 5))
        d = min(d, n // 2)
        k = int(rng.integers(2, n // d + 1))
        s = 1 if rng.random() < 0.4 else (k if rng.random() < 0.4 else int(rng.integers(1, k + 1)))
        shape.append(n), ks.append(k), ss.append(s), ds.append(d), cs.append(bool(rng.random() < 0.3))
    u = rng.random()
    if u < 0.75:
        dim = int(rng.choice([64, 128, 256], p=[0.45, 0.4, 0.15]))
    elif u < 0.85:
        dim = 32
    else:
        dim = 8 * int(rng.integers(1, 33))
    dim_v = dim if rng.random() < 0.85 else 8 * int(rng.integers(1, 33))
    h_kv, batch, layout = int(rng.integers(1, 3)), int(rng.integers(1, 4)), None
    if devices > 1:
        u = rng.random()
        if u < 0.6:  # context parallel along one spatial axis
            a = int(rng.integers(0, rank))
            layout = f"context{a}"
            # blocks of whole dilation groups half the time (the shards then fold)
            m = devices * ds[a] if rng.random() < 0.5 else devices
            n = max(m, shape[a] - shape[a] % m)
            shape[a] = n
            ks[a] = min(ks[a], n // ds[a])
            ss[a] = min(ss[a], ks[a])
        elif u < 0.8:
            layout, batch = "batch", devices * int(rng.integers(1, 3))
        else:
            layout, h_kv = "heads", devices * int(rng.integers(1, 3))
    extra = 0  # additional tokens: on the kernels or XLA as cuda.dense_blocker says (64: kernels)
    if rng.random() < tokens:
        extra = int(rng.integers(1, 64)) if rng.random() < 0.5 else int(rng.integers(64, 400))
    case = dict(shape=shape, kernel_size=ks, stride=ss, dilation=ds, is_causal=cs,
                batch=batch, heads=h_kv * int(rng.integers(1, 4)), kv_heads=h_kv,
                dim=dim, dim_v=dim_v, dtype=dtype, grads=bool(rng.random() < 0.7),
                seed=int(rng.integers(0, 2 ** 31)), extra=extra, layout=layout)
    env = switches(case["seed"])
    if env:
        case["env"] = env
    if env == PAIR_FORCE:
        pair_candidate(case)
    return case


def pair_candidate(case: dict) -> None:
    """Makes a case with pairs forced one the pair kernel can take more often (drawn from
    its own seed): head dim 128 (the pair kernel's), fp16 or bf16, and about half of its
    axes non-causal with a window over the whole axis, so that neighbouring query tiles
    along them visit the same key tiles. Without this, none of 27 forced cases that reached
    the Hopper forward ran pairs (session 43)."""
    rng = np.random.default_rng([case["seed"], 3])
    case["dim"] = case["dim_v"] = 128
    if case["dtype"] == "float32":
        case["dtype"] = str(rng.choice(["bfloat16", "float16"]))
    for a, n in enumerate(case["shape"]):
        if rng.random() < 0.5:
            case["kernel_size"][a] = n // case["dilation"][a]  # >= the drawn one, >= its stride
            case["is_causal"][a] = False


PAIR_FORCE = {"JAX_GNA_FWD_ITEMS": "1", "JAX_GNA_FWD_PAIR": "force"}


def switches(seed: int) -> dict:
    """The Hopper forward's switches for a case, drawn from its own seed (the other draws
    stay as they were): in a quarter of the cases several query tiles per CTA forced, in
    half of those the key tile size too, so a run also covers what the host's rules take
    only on large problems (csrc/gna_sm90.cu: fwd_plan, fwd_items). Of the other cases a
    third ask for pairs of query tiles in clusters of two CTAs wherever the plan has them
    (``PAIR_FORCE``: one tile per CTA, ``JAX_GNA_FWD_PAIR=force``; the host runs pairs
    by default only past one wave with >= 16 key tiles per query tile, which these small
    problems seldom reach; ``draw`` makes those cases likelier to have pairs,
    ``pair_candidate``); ``run_case`` runs a case whose forward has no pair kernel again
    without them. Environment variables, set while the case runs."""
    rng = np.random.default_rng([seed, 1])
    if rng.random() >= 0.25:
        return dict(PAIR_FORCE) if np.random.default_rng([seed, 2]).random() < 1 / 3 else {}
    env = {"JAX_GNA_FWD_ITEMS": str(int(rng.choice([2, 3, 8])))}
    if rng.random() < 0.5:
        env["JAX_GNA_FWD_KEYS"] = str(int(rng.choice([64, 128])))
    return env


def rel_error(a, r) -> float:
    """Relative L2 error of ``a`` against ``r`` in float64; infinite if ``a`` holds a
    non-finite element (an unwritten, poisoned one)."""
    import jax.numpy as jnp

    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    r = np.asarray(jnp.asarray(r, jnp.float32), np.float64)
    if not np.isfinite(a).all():
        return float("inf")
    return float(np.linalg.norm(a - r) / max(np.linalg.norm(r), 1e-30))


def _specs(case: dict, rank: int):
    """Partition specs (query, key/value, additional keys) over mesh axis "x"."""
    from jax.sharding import PartitionSpec as P

    layout = case.get("layout")
    if layout is None:
        return None
    if layout == "batch":
        lead, extra = ("x",) + (None,) * (rank + 1), P("x")
    elif layout == "heads":
        lead, extra = (None,) * (rank + 1) + ("x",), P(None, None, "x")
    else:  # "context<axis>": the extra tokens are whole on every device
        a = int(layout[len("context"):])
        lead, extra = tuple("x" if i == 1 + a else None for i in range(rank + 2)), P()
    return P(*lead), extra


def run_case(case: dict, impl=None, devices=None) -> dict:
    """Errors of one case against the reference, and the kernel path it took. ``impl``:
    the backend (default ``cuda._attention_poisoned``); ``devices``: the mesh's devices
    for a case with a ``layout``. The case's ``env`` (switches) is set while it runs. A
    case with ``JAX_GNA_FWD_PAIR=force`` whose forward runs no pair kernel fails "not
    supported" by design: it runs again without that switch; ``pair_force`` says
    "passed" (every forward call that reached the Hopper kernels ran the pair kernel) or
    "refused"."""
    env = case.get("env") or {}
    if env.get("JAX_GNA_FWD_PAIR") != "force":
        return _run_with_env(case, env, impl, devices)
    try:
        return {**_run_with_env(case, env, impl, devices), "pair_force": "passed"}
    except Exception as e:  # noqa: BLE001 - only the forced switch's own refusal is retried
        if "not supported" not in str(e):
            raise
    rest = {k: v for k, v in env.items() if k != "JAX_GNA_FWD_PAIR"}
    return {**_run_with_env(case, rest, impl, devices), "pair_force": "refused"}


def _run_with_env(case: dict, env: dict, impl, devices) -> dict:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return _run_case(case, impl, devices)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_case(case: dict, impl, devices) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding

    from jax_gna import cuda, ops, reference, sharding
    from jax_gna.params import Problem

    dtype = jnp.dtype(case["dtype"])
    problem = Problem(shape=tuple(case["shape"]), kernel_size=tuple(case["kernel_size"]),
                      stride=tuple(case["stride"]), dilation=tuple(case["dilation"]),
                      is_causal=tuple(case["is_causal"]), scale=case["dim"] ** -0.5)
    b, h, h_kv, d, d_v = case["batch"], case["heads"], case["kv_heads"], case["dim"], case["dim_v"]
    n_extra = case.get("extra", 0)
    keys = jax.random.split(jax.random.PRNGKey(case["seed"]), 5)
    keys = list(keys) + list(jax.random.split(jax.random.fold_in(keys[0], 1), 2))
    sp = tuple(case["shape"])
    q = jax.random.normal(keys[0], (b, *sp, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (b, *sp, h_kv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (b, *sp, h_kv, d_v), jnp.float32).astype(dtype)
    w = jax.random.normal(keys[3], (b, *sp, h, d_v), jnp.float32)
    u = jax.random.normal(keys[4], (b, *sp, h), jnp.float32)
    extra = ()
    if n_extra:
        extra = (jax.random.normal(keys[5], (b, n_extra, h_kv, d), jnp.float32).astype(dtype),
                 jax.random.normal(keys[6], (b, n_extra, h_kv, d_v), jnp.float32).astype(dtype))
    reason = cuda.unsupported_reason(problem, q.shape, k.shape, v.shape, dtype)
    if reason:
        return {"skipped": reason}
    impl = impl or cuda._attention_poisoned
    inputs = (q, k, v) + extra
    specs = _specs(case, problem.rank)
    if specs is not None:  # place every input on the mesh as the layout says
        mesh = Mesh(np.array(devices), ("x",))
        put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
        inputs = tuple(put(x, specs[0] if i < 3 else specs[1]) for i, x in enumerate(inputs))
        w, u = put(w, specs[0]), put(u, specs[0])

    def attend(q, k, v, *extra):  # the public op's computation, the kernels poisoned
        return ops._compute(q, k, v, *(extra or (None, None)), impl=impl, problem=problem)

    def loss(*a):  # w, u as arguments: as constants XLA would fold them in
        *args, w, u = a
        out, lse = attend(*args)
        return jnp.sum(out.astype(jnp.float32) * w) + jnp.sum(lse * u), (out, lse)

    if case["grads"]:
        argnums = tuple(range(len(inputs)))
        (_, (o, l)), g = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(*inputs, w, u)
    else:
        o, l = jax.jit(attend)(*inputs)
        g = ()
    f64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)  # noqa: E731
    ref = reference.attention(f64(q), f64(k), f64(v), problem.kernel_size, problem.stride,
                              problem.dilation, problem.is_causal, problem.scale,
                              *(f64(x) for x in extra),
                              d_out=f64(w) if case["grads"] else None, d_lse=f64(u))
    ro, rl, rg = ref[0], ref[1], (ref[2] if case["grads"] else ())

    names = ("dq", "dk", "dv", "d_extra_k", "d_extra_v")
    errs = {"out": rel_error(o, ro), "lse": rel_error(l, rl)}
    errs.update({n: rel_error(a, r) for n, a, r in zip(names, g, rg)})
    t_out, t_lse, t_grad = TOL[case["dtype"]]
    limits = {"out": t_out, "lse": t_lse, **{n: t_grad for n in names}}
    worst = max(errs[n] / limits[n] for n in errs)
    path = cuda.kernel_path(problem, q.shape, v.shape, dtype)
    res = {"errs": errs, "worst": worst, "ok": bool(worst < 1.0), "path": path}
    if n_extra and specs is None and jax.device_count() < 2:  # nothing partitions the call
        res["tokens_as_key_tiles"] = cuda.tokens_blocker(problem, q.shape, extra[0].shape,
                                                         extra[1].shape, dtype) is None
    layout = case.get("layout") or ""
    if layout.startswith("context") and max(problem.dilation) > 1:
        a = int(layout[len("context"):])
        plan = sharding.plan_axis(problem, a, "x", len(devices))
        local = list(q.shape)
        local[1 + a] //= len(devices)
        fold = sharding._fold_for(impl, problem, [plan], jax.ShapeDtypeStruct(local, dtype),
                                  jax.ShapeDtypeStruct(local[:-1] + [d_v], dtype), "forward+backward")
        res["shards_fold"] = fold is not None
    return res


def path_class(path: str, res: dict | None = None, case: dict | None = None) -> str:
    """A short name for kernel_path's sentence; for a sharded case, its layout's kind and
    whether dilated context-parallel shards folded."""
    if res is not None and "shards_fold" in res:
        cls = "fold" if res["shards_fold"] else "sm80"
    elif "undilated pieces" in path:
        cls = "fold"
    elif path.startswith("forward and backward: Hopper"):
        cls = "sm90"
    elif path.startswith("forward: Hopper"):
        cls = "sm90 fwd + sm80 bwd"
    else:
        cls = "sm80"
    if res is not None and res.get("tokens_as_key_tiles"):
        cls += " + tokens as key tiles"
    layout = (case or {}).get("layout")
    return f"{layout.rstrip('0123456789')} {cls}" if layout else cls


def hopper_forward(path: str, grads: bool) -> bool:
    """Whether kernel_path's sentence has the forward on the Hopper kernels (a folded
    forward with a small window takes them only when differentiated)."""
    return (path.startswith(("forward: Hopper", "forward and backward: Hopper"))
            or (grads and "when differentiated, the Hopper kernel" in path))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=120.0, help="stop drawing cases after this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-cases", type=int, default=10 ** 6)
    ap.add_argument("--devices", type=int, default=1,
                    help="shard each case over this many devices (a layout drawn per case)")
    ap.add_argument("--impl", choices=("cuda", "xla"), default="cuda",
                    help="xla: the portable backend in place of the kernels (a dry run)")
    ap.add_argument("--tokens", type=float, default=0.15,
                    help="the probability that a case has additional tokens")
    ap.add_argument("--out", help="append one JSON line per case here")
    ap.add_argument("--case", help="run this one case (a JSON dict as printed) and stop")
    args = ap.parse_args(argv)
    import jax

    from jax_gna import xla

    impl, devices = (xla.attention if args.impl == "xla" else None), None
    if args.devices > 1:
        devices = jax.devices() if args.impl == "xla" else jax.devices("gpu")
        if len(devices) < args.devices:
            ap.error(f"--devices {args.devices}: only {len(devices)} devices here")
        devices = devices[:args.devices]
    cases = [json.loads(args.case)] if args.case else None
    rng = np.random.default_rng(args.seed)
    t0, failed, counts, worst = time.time(), [], Counter(), {}
    i = 0
    while (cases is None and time.time() - t0 < args.seconds and i < args.max_cases) or (cases and i < 1):
        case = cases[0] if cases else draw(rng, args.devices, args.tokens)
        i += 1
        print("case", json.dumps(case), file=sys.stderr, flush=True)  # named if the process dies
        try:
            res = run_case(case, impl, devices)
        except Exception as e:  # noqa: BLE001 - a crash is a finding, recorded with its case
            res = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        rec = {"case": case, **res}
        if "skipped" not in res:
            cls = path_class(res["path"], res, case) if "path" in res else "error"
            if res.get("pair_force") == "passed" and hopper_forward(res["path"], case["grads"]):
                cls += " (pairs)"
            elif case.get("env") and "JAX_GNA_FWD_PAIR" not in case["env"] and cls.startswith("sm90"):
                cls += " (switches)"
            counts[cls] += 1
            worst[cls] = max(worst.get(cls, 0.0), res.get("worst", float("inf")))
            if not res["ok"]:
                failed.append(rec)
        print(json.dumps(rec), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
    print(f"fuzz: {i} cases in {time.time() - t0:.0f} s, {len(failed)} failed; by path: "
          + ", ".join(f"{c} {n} (worst error / tolerance {worst[c]:.2f})" for c, n in sorted(counts.items())))
    for rec in failed:
        print("FAILED", json.dumps(rec))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
