"""NATTEN peer: its fused neighborhood attention (Hopper FNA kernels), forward, in PyTorch.

Records have the schema of :mod:`benchmarks.torch_peers` (backend ``"natten"``), so
``python -m benchmarks.run --from-json R.json --merge-peers FILE`` adds them to a JAX
result. NATTEN takes ``[B, *spatial, H, D]`` tensors, as jax_gna does::

  python -m benchmarks.natten_peer --preset paper --dtypes bf16,fp16 --out DIR

For each problem every forward configuration NATTEN lists for the input
(``natten.backends.configs.cutlass_hopper.get_all_forward_configs``: query/key tile
shapes and kernel schedule) is timed; a configuration whose kernel this build does
not have (``scripts/natten_minimal.py`` builds a subset) is skipped. The record's
``time_s`` is the fastest configuration (``natten_config``); ``natten_default_s`` is
NATTEN's default configuration's time, ``natten_configs`` all of them. Timing as in
torch_peers: CUDA events around back-to-back calls (token permutation included:
it is part of NATTEN's call), median of samples after a warm-up. Before timing,
one small problem is checked against jax_gna's float64 reference.

``--kernel-time`` also profiles the fastest configuration (``torch.profiler``, 20 calls)
and records each CUDA kernel's median duration and launches per call (``natten_kernels``),
the longest one's (``natten_kernel_s``: the FNA kernel, without the token permutation;
NATTEN's published figures are kernel times) and their sum per call (``natten_gpu_s``:
the GPU time of the whole call, permutations included). ``--cases REGEX`` keeps the
cases whose name matches.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Sequence

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from benchmarks.torch_peers import (_Timeout, add_tflops, kernel_times, measure,  # noqa: E402
                                    time_limit, write_split)
from jax_gna.bench import PRESETS, Case  # noqa: E402


def _configs(natten, q):
    try:
        from natten.backends.configs.cutlass_hopper import get_all_forward_configs
        cfgs = list(get_all_forward_configs(q))
    except Exception:  # noqa: BLE001 - other NATTEN versions: the default only
        cfgs = []
    return [None] + cfgs


def _cfg_str(cfg) -> str:
    if cfg is None:
        return "default"
    (qt, kt), sched = cfg
    x = lambda t: "x".join(map(str, t))  # noqa: E731
    return f"q{x(qt)}-kv{x(kt)}-{getattr(sched, 'name', sched)}"


def _call(natten, case: Case, q, k, v, cfg):
    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(case.shape)]
    kw = {}
    if cfg is not None:
        (qt, kt), sched = cfg
        kw = {"q_tile_shape": tuple(qt), "kv_tile_shape": tuple(kt), "kernel_schedule": sched}
    return fn(q, k, v, kernel_size=case.kernel_size, stride=case.stride,
              dilation=case.dilation, is_causal=case.is_causal, backend="hopper-fna", **kw)


def check(torch, natten, dtype: str = "bfloat16") -> dict:
    """NATTEN vs jax_gna's float64 reference on small 1-D/2-D/3-D problems (head dim 128)."""
    import numpy as np

    from jax_gna import reference

    out = {}
    for case in (Case("chk-1d", (300,), 2, 128, (33,), (4,)),
                 Case("chk-2d", (20, 24), 2, 128, (7, 9), (2, 3)),
                 Case("chk-3d", (8, 12, 16), 2, 128, (4, 6, 8), (2, 2, 8))):
        g = torch.Generator(device="cuda").manual_seed(1)
        shp = (1,) + case.shape + (case.heads, case.head_dim)
        q, k, v = (torch.randn(shp, generator=g, device="cuda", dtype=getattr(torch, dtype))
                   for _ in range(3))
        try:
            with torch.no_grad():
                o = _call(natten, case, q, k, v, None).float().cpu().numpy()
            ref, _ = reference.attention(*(t.float().cpu().numpy().astype(np.float64)
                                           for t in (q, k, v)), case.kernel_size, case.stride,
                                         case.dilation, case.is_causal)
            out[case.name] = float(np.max(np.abs(o - ref)) / max(np.max(np.abs(ref)), 1e-30))
        except Exception as e:  # noqa: BLE001
            out[case.name] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    return out


def run(cases: Sequence[Case], dtypes: Sequence[str], *, sampling=(3, 20, 0.25),
        deadline: float | None = None, case_limit_s: float | None = None,
        on_update=None, kernel_time: bool = False) -> dict:
    import torch
    import natten

    t_start = time.perf_counter()
    env = {"torch": torch.__version__, "natten": natten.__version__,
           "device": torch.cuda.get_device_name(0), "cuda": torch.version.cuda,
           "python": sys.version.split()[0],
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    records: list[dict] = []
    result = {"kind": "torch-peers", "env": env, "records": records,
              "config": {"peers": ["natten"], "dtypes": list(dtypes), "passes": ["fwd"]}}
    env["check_rel_err"] = check(torch, natten)
    print(f"check vs float64 reference (bf16, max |err| / max |ref|): {env['check_rel_err']}",
          flush=True)
    for dtype in dtypes:
        for case in cases:
            rec = {"case": case.name, "dtype": dtype, "backend": "natten", "pass": "fwd",
                   "status": "ok"}
            timings = {}
            try:
                if deadline is not None and time.perf_counter() > deadline:
                    raise _Timeout("time budget spent")
                left = case_limit_s
                if deadline is not None:
                    dl = deadline - time.perf_counter()
                    left = dl if left is None else min(left, dl)
                with time_limit(left):
                    g = torch.Generator(device="cuda").manual_seed(0)
                    shp = (case.batch,) + case.shape + (case.heads, case.head_dim)
                    kv_shp = (case.batch,) + case.shape + (case.kv_heads, case.head_dim)
                    q = torch.randn(shp, generator=g, device="cuda", dtype=getattr(torch, dtype))
                    k, v = (torch.randn(kv_shp, generator=g, device="cuda",
                                        dtype=getattr(torch, dtype)) for _ in range(2))
                    fns = {}
                    for cfg in _configs(natten, q):
                        name = _cfg_str(cfg)
                        try:
                            def fn(cfg=cfg, q=q, k=k, v=v):
                                with torch.no_grad():
                                    return _call(natten, case, q, k, v, cfg)
                            timings[name] = measure(torch, "cuda", fn, *sampling)["time_s"]
                            fns[name] = fn
                        except _Timeout:
                            raise
                        except Exception as e:  # noqa: BLE001 - e.g. a stubbed kernel
                            timings[name] = f"{type(e).__name__}: {e}".splitlines()[0][:160]
                    ok = {n: t for n, t in timings.items() if isinstance(t, float)}
                    if kernel_time and ok:
                        kt = kernel_times(torch, fns[min(ok, key=ok.get)])
                        if kt:
                            # [name, median s, launches per call]: the FNA kernel and its
                            # token permutations (several share a long name prefix).
                            rec["natten_kernels"] = [[n[:200], t, c] for n, (t, c) in kt.items()]
                            rec["natten_kernel_s"] = max(t for t, _ in kt.values())
                            rec["natten_gpu_s"] = sum(t * c for t, c in kt.values())
                    q = k = v = fn = fns = None  # noqa: F841 - free the inputs
            except _Timeout as e:
                if not any(isinstance(t, float) for t in timings.values()):
                    rec.update(status="skipped", note=str(e))
            ok = {n: t for n, t in timings.items() if isinstance(t, float)}
            if ok:
                best = min(ok, key=ok.get)
                rec.update(time_s=ok[best], natten_config=best, natten_configs=timings,
                           natten_default_s=ok.get("default"))
                if best != "default":
                    rec["note"] = f"fastest NATTEN config {best}"
            elif rec["status"] == "ok":
                rec.update(status="error",
                           note="; ".join(f"{n}: {t}" for n, t in timings.items())[:400])
            add_tflops(rec, case)
            records.append(rec)
            t = f"{rec['time_s'] * 1e3:.3f} ms ({rec['natten_config']})" if rec["status"] == "ok" \
                else f"{rec['status']}: {rec.get('note', '')[:160]}"
            if "natten_kernel_s" in rec:
                t += f", kernel {rec['natten_kernel_s'] * 1e3:.3f} ms"
            print(f"[{time.perf_counter() - t_start:7.1f}s] {case.name} {dtype} natten fwd: {t}",
                  flush=True)
            torch.cuda.empty_cache()
            result["wall_s"] = time.perf_counter() - t_start
            if on_update is not None:
                on_update(result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks.natten_peer", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="paper", help="comma-separated presets")
    ap.add_argument("--dtypes", default="bfloat16,float16")
    ap.add_argument("--budget-s", type=float, default=None)
    ap.add_argument("--case-limit-s", type=float, default=None)
    ap.add_argument("--out", default=os.path.join("benchmarks", "results"))
    ap.add_argument("--cases", default=None, help="regex: keep the cases whose name matches")
    ap.add_argument("--kernel-time", action="store_true",
                    help="also profile the fastest configuration's kernels (torch.profiler)")
    args = ap.parse_args(argv)
    long = {"fp16": "float16", "bf16": "bfloat16"}
    dtypes = tuple(long.get(d, d) for d in args.dtypes.split(",") if d)
    names = [n for n in args.preset.split(",") if n]
    for n in names:
        if n not in PRESETS:
            print(f"unknown preset {n!r}", file=sys.stderr)
            return 2
    cases = [c for n in names for c in PRESETS[n]
             if args.cases is None or re.search(args.cases, c.name)]
    presets = {n: [c.name for c in PRESETS[n]] for n in names}
    deadline = None if args.budget_s is None else time.perf_counter() + args.budget_s
    result = run(cases, dtypes, sampling=(3, 10, 0.1), deadline=deadline,
                 case_limit_s=args.case_limit_s,
                 on_update=lambda r: write_split(r, presets, args.out, suffix="natten"),
                 kernel_time=args.kernel_time)
    for p in write_split(result, presets, args.out, suffix="natten"):
        print(f"wrote {p}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
