"""Kernel durations of our forward, measured the way benchmarks/natten_peer.py measures
NATTEN's: torch.profiler (CUPTI's kernel records) over back-to-back calls, median per
kernel. JAX runs the forward and torch only profiles, in one process, so both libraries'
kernel times come from the same tool. With NATTEN importable, its forward (default
configuration) is profiled too, on the same tensors.

usage (on the GPU): python3 scripts/kernel_profile.py [--dtypes bf16,fp16] [--calls 20]
    [shape window stride heads] ...      (default: the 1-D one-head stride-2048 problem)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def kernel_medians(trace: dict) -> dict[str, tuple[float, int]]:
    """Median duration (seconds) and count of each kernel in a chrome trace (torch.profiler's
    ``export_chrome_trace``: events of category "kernel", durations in microseconds)."""
    per: dict[str, list[float]] = {}
    for e in trace.get("traceEvents", []):
        if e.get("cat") == "kernel":
            per.setdefault(e["name"], []).append(float(e["dur"]) * 1e-6)
    return {n: (statistics.median(v), len(v)) for n, v in per.items()}


def profile_kernels(torch, fn, calls: int) -> dict[str, tuple[float, int]]:
    """``fn`` once, then ``calls`` times under torch.profiler; kernel medians."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()  # the whole device: JAX's stream too
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            return kernel_medians(json.load(f))
    finally:
        os.remove(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("problems", nargs="*")
    args = ap.parse_args(argv)
    probs = args.problems or ["32768", "2048", "2048", "1"]
    if len(probs) % 4:
        ap.error("problems come as shape window stride heads")

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from jax_gna.bench import chained_fwd
    from profile_sm90 import problem

    try:
        import natten
        from benchmarks.natten_peer import _call as natten_call
        from jax_gna.bench import Case
    except ImportError:
        natten = None
    dts = {"bf16": (jnp.bfloat16, torch.bfloat16), "fp16": (jnp.float16, torch.float16)}
    for i in range(0, len(probs), 4):
        shape, window, stride, heads = probs[i:i + 4]
        op, args0 = problem(shape, window, stride, heads)
        for dname in args.dtypes.split(","):
            jdt, tdt = dts[dname]
            qkv = tuple(x.astype(jdt) for x in args0)
            f = jax.jit(op)
            label = f"{shape} w{window} s{stride} H{heads} {dname}"
            runs = [("ours", profile_kernels(torch, lambda: f(*qkv), args.calls))]
            if max(t for t, _ in runs[0][1].values()) < 300e-6:  # as the bench: short ones chained too
                chained, cargs = chained_fwd(op, *qkv, (), n=16)
                g = jax.jit(chained)
                runs.append(("ours x16 in one jit", profile_kernels(torch, lambda: g(*cargs), args.calls)))
            for tag, res in runs:
                for name, (t, n) in sorted(res.items(), key=lambda kv: -kv[1][0]):
                    print(f"{label} {tag}: {t * 1e6:9.1f} us x{n} {name[:90]}", flush=True)
            if natten is not None:
                case = Case("p", tuple(int(x) for x in shape.split("x")), int(heads), 128,
                            tuple(int(x) for x in window.split("x")) if "x" in window
                            else (int(window),) * len(shape.split("x")),
                            tuple(int(x) for x in stride.split("x")) if "x" in stride
                            else (int(stride),) * len(shape.split("x")))
                q, k, v = (torch.from_numpy(np.asarray(x.astype(jnp.float32))).to("cuda", tdt)
                           for x in qkv)

                def nat():
                    with torch.no_grad():
                        return natten_call(natten, case, q, k, v, None)
                for name, (t, n) in sorted(profile_kernels(torch, nat, args.calls).items(),
                                           key=lambda kv: -kv[1][0]):
                    print(f"{label} natten: {t * 1e6:9.1f} us x{n} {name[:90]}", flush=True)
                q = k = v = None
            jax.clear_caches()
    return 0


if __name__ == "__main__":
    sys.exit(main())
