"""PyTorch peers, in their own process: FlexAttention with a GNA block mask, and dense SDPA.

Run after (or before) ``benchmarks.run`` on the same GPU; the records use the same
schema and ``python -m benchmarks.run --merge-peers FILE`` (or
:func:`jax_gna.bench.merge_peers`) adds them to a JAX result, where their
speedups are taken over cuDNN dense attention measured by JAX::

  python -m benchmarks.torch_peers --preset paper,small --out benchmarks/results

Peers (``--peers``):

* ``flex``  -- ``torch.nn.attention.flex_attention.flex_attention`` (``torch.compile``d)
  with a ``BlockMask`` from ``create_block_mask`` and the exact GNA ``mask_mod`` (the
  window formulas of :mod:`jax_gna.mask`, evaluated on torch tensors).
* ``sdpa``  -- dense ``torch.nn.functional.scaled_dot_product_attention`` (flash /
  cuDNN / efficient backends as PyTorch picks them): a cross-check of the dense
  baseline.

Timing: CUDA events around back-to-back calls after warm-up, median of samples
(wall clock on CPU). Block mask creation is not timed (it is reusable), its time
is recorded. Tensors are ``[B, H, N, D]`` (PyTorch's layout). FLOPs as
SEMANTICS.md counts them (:func:`jax_gna.sim.flops`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Sequence

# jax_gna is imported only for its window math and presets: keep JAX off the GPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from jax_gna import sim  # noqa: E402
from jax_gna.bench import PASSES, PRESETS, SAMPLING, Case  # noqa: E402
from jax_gna.mask import is_neighbor  # noqa: E402
from jax_gna.params import Axis  # noqa: E402

PEERS = ("flex", "sdpa")


class _TorchXP:
    """The two NumPy functions :func:`jax_gna.mask.window` uses, for torch tensors."""

    def __init__(self, torch):
        self.torch = torch

    def minimum(self, a, b):
        t = self.torch
        if not isinstance(b, t.Tensor):
            return t.clamp(a, max=b) if isinstance(a, t.Tensor) else min(a, b)
        return t.minimum(a, b) if isinstance(a, t.Tensor) else t.clamp(b, max=a)

    def maximum(self, a, b):
        t = self.torch
        if not isinstance(b, t.Tensor):
            return t.clamp(a, min=b) if isinstance(a, t.Tensor) else max(a, b)
        return t.maximum(a, b) if isinstance(a, t.Tensor) else t.clamp(b, min=a)


def gna_mask_mod(case: Case, torch):
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)``: is key ``kv_idx`` a neighbor?"""
    xp = _TorchXP(torch)
    axes = [Axis(n, case.kernel_size[a], case.stride[a], case.dilation[a], case.is_causal[a])
            for a, n in enumerate(case.shape)]
    strides = [1] * len(axes)
    for a in range(len(axes) - 2, -1, -1):
        strides[a] = strides[a + 1] * axes[a + 1].length

    def mask_mod(b, h, q_idx, kv_idx):
        ok = None
        for ax, st in zip(axes, strides):
            i = (q_idx // st) % ax.length
            j = (kv_idx // st) % ax.length
            part = is_neighbor(i, j, ax, xp=xp)
            ok = part if ok is None else ok & part
        return ok

    return mask_mod


def _timer(torch, device):
    if device == "cuda":
        def run(fn, inner):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / inner
    else:
        def run(fn, inner):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            return (time.perf_counter() - t0) / inner
    return run


def measure(torch, device, fn, min_samples=3, max_samples=20, target_s=0.25, slow_s=1.0):
    """Warm up ``fn`` (compiles), then median seconds per call."""
    timer = _timer(torch, device)
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    one = max(timer(fn, 1), 1e-7)
    if one >= slow_s:
        return {"time_s": one, "samples": 1, "inner": 1, "warmup_s": warm}
    inner = int(min(100, max(1, 0.005 // one)))
    n = int(min(max_samples, max(min_samples, target_s // (one * inner))))
    samples = [timer(fn, inner) for _ in range(n)]
    return {"time_s": statistics.median(samples), "min_s": min(samples), "samples": n,
            "inner": inner, "warmup_s": warm}


def run(cases: Sequence[Case], *, peers: Sequence[str] = PEERS, dtypes=None,
        passes: Sequence[str] = PASSES, sampling=(3, 20, 0.25), deadline=None,
        progress: bool = True) -> dict:
    import torch
    import torch.nn.functional as F

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtypes is None:
        dtypes = ("float16", "bfloat16") if device == "cuda" else ("float32",)
    env = {"torch": torch.__version__, "device": (torch.cuda.get_device_name(0)
                                                  if device == "cuda" else "cpu"),
           "cuda": torch.version.cuda, "python": sys.version.split()[0],
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    flex_attention = create_block_mask = None
    flex_why = ""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex_attention = torch.compile(flex_attention, dynamic=False)
    except Exception as e:  # noqa: BLE001
        flex_why = f"FlexAttention unavailable: {type(e).__name__}: {e}"
    records = []
    total = len(dtypes) * len(cases) * len(peers) * len(passes)
    done = 0
    for dtype in dtypes:
        tdtype = getattr(torch, dtype)
        for case in cases:
            smp = sampling[case.name] if isinstance(sampling, dict) else sampling
            n = case.tokens
            g = torch.Generator(device=device).manual_seed(0)
            shape = (case.batch, case.heads, n, case.head_dim)
            q, k, v, do = (torch.randn(shape, generator=g, device=device, dtype=tdtype)
                           for _ in range(4))
            block_mask, mask_s = None, None
            for peer in peers:
                for p in passes:
                    done += 1
                    rec = {"case": case.name, "dtype": dtype, "backend": peer, "pass": p,
                           "status": "ok"}
                    try:
                        if deadline is not None and time.perf_counter() > deadline:
                            raise _Skip("time budget spent")
                        if peer == "flex":
                            if flex_attention is None:
                                raise _Skip(flex_why)
                            if block_mask is None:
                                t0 = time.perf_counter()
                                block_mask = _block_mask(torch, create_block_mask,
                                                         gna_mask_mod(case, torch), n, device)
                                mask_s = time.perf_counter() - t0

                            def attn(q, k, v, bm=block_mask):
                                return flex_attention(q, k, v, block_mask=bm)
                        else:
                            def attn(q, k, v):
                                return F.scaled_dot_product_attention(q, k, v)
                        qg, kg, vg = (t.detach().requires_grad_(p != "fwd") for t in (q, k, v))
                        if p == "fwd":
                            def fn():
                                with torch.no_grad():
                                    return attn(qg, kg, vg)
                        elif p == "fwdbwd":
                            def fn():
                                out = attn(qg, kg, vg)
                                return torch.autograd.grad(out, (qg, kg, vg), do)
                        else:
                            out = attn(qg, kg, vg)

                            def fn():
                                return torch.autograd.grad(out, (qg, kg, vg), do,
                                                           retain_graph=True)
                        rec.update(measure(torch, device, fn, *smp))
                        if peer == "flex":
                            rec["block_mask_s"] = mask_s
                            rec["block_sparsity"] = float(block_mask.sparsity()) / 100.0
                        if device == "cuda":
                            # Peak of the process since the last reset (inputs included).
                            rec["mem_bytes"] = int(torch.cuda.max_memory_allocated())
                            torch.cuda.reset_peak_memory_stats()
                    except _Skip as e:
                        rec.update(status="skipped", note=str(e))
                    except Exception as e:  # noqa: BLE001 - record and go on
                        rec.update(status="error",
                                   note=f"{type(e).__name__}: {e}".splitlines()[0][:300])
                    records.append(rec)
                    if progress:
                        t = f"{rec['time_s'] * 1e3:.3f} ms" if rec["status"] == "ok" else rec[
                            "status"]
                        print(f"[{done}/{total}] {case.name} {dtype} {peer} {p}: {t}", flush=True)
            del q, k, v, do, block_mask
            if device == "cuda":
                torch.cuda.empty_cache()
    for r in records:
        if r["status"] == "ok":
            c = next(c for c in cases if c.name == r["case"])
            r["tflops"] = sim.flops(*c.window_args(), batch=c.batch, heads=c.heads,
                                    head_dim=c.head_dim, pass_=r["pass"]) / r["time_s"] / 1e12
    return {"kind": "torch-peers", "env": env, "records": records,
            "config": {"peers": list(peers), "dtypes": list(dtypes), "passes": list(passes)}}


class _Skip(Exception):
    pass


def _block_mask(torch, create_block_mask, mask_mod, n: int, device: str):
    """``create_block_mask`` without materializing the [n, n] mask (compiled)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return create_block_mask(mask_mod, None, None, n, n, device=device, _compile=True)
        except TypeError:  # newer torch: the _compile flag is gone, compile the function
            return torch.compile(create_block_mask)(mask_mod, None, None, n, n, device=device)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks.torch_peers", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="smoke", help="comma-separated presets")
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--dtypes", default=None, help="e.g. float16,bfloat16")
    ap.add_argument("--passes", default=",".join(PASSES))
    ap.add_argument("--budget-s", type=float, default=None)
    ap.add_argument("--samples", default=None, help="min x max samples, e.g. 3x20")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = ap.parse_args(argv)
    long = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
    dtypes = None if not args.dtypes else tuple(long.get(d, d) for d in args.dtypes.split(","))
    deadline = None if args.budget_s is None else time.perf_counter() + args.budget_s
    names = [n for n in args.preset.split(",") if n]
    cases, sampling = [], {}
    for name in names:
        if name not in PRESETS:
            print(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}", file=sys.stderr)
            return 2
        smp = SAMPLING.get(name, SAMPLING["custom"])
        if args.samples:
            lo, hi = (int(x) for x in args.samples.split("x"))
            smp = (lo, hi, smp[2])
        for c in PRESETS[name]:
            cases.append(c)
            sampling[c.name] = smp
    result = run(cases, peers=tuple(args.peers.split(",")), dtypes=dtypes,
                 passes=tuple(args.passes.split(",")), sampling=sampling, deadline=deadline)
    os.makedirs(args.out, exist_ok=True)
    for name in names:
        keep = {c.name for c in PRESETS[name]}
        part = dict(result, records=[r for r in result["records"] if r["case"] in keep],
                    name=name)
        path = os.path.join(args.out, f"{name}-torch.json")
        with open(path, "w") as f:
            json.dump(part, f, indent=1)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
