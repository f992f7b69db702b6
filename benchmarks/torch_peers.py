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

Robustness (big problems compile slowly): a line is printed (flushed) before each
block mask, compilation and measurement; ``--out`` files are rewritten after every
problem, so a run cut short keeps what it measured; ``--case-limit-s`` bounds each
peer on each problem and dtype (SIGALRM; its remaining passes are recorded as
skipped), and
``--budget-s`` the whole run. Block masks are built once per problem and reused
across dtypes. Dynamo's recompile limit is raised (every problem is a new mask_mod).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from typing import Callable, Sequence

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


def measure(torch, device, fn, min_samples=3, max_samples=20, target_s=0.25, slow_s=1.0,
            batch_s=0.02):
    """Warm up ``fn`` (compiles), then median seconds per call.

    A sample times ``inner`` back-to-back calls, enough for about ``batch_s`` (20 ms, as
    :func:`jax_gna.bench.measure`: shorter samples count each sample's start from an idle
    GPU into the per-call time of short ops).
    """
    timer = _timer(torch, device)
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    one = max(timer(fn, 1), 1e-7)
    if one >= slow_s:
        return {"time_s": one, "samples": 1, "inner": 1, "warmup_s": warm}
    inner = int(min(1000, max(1, batch_s // one)))
    n = int(min(max_samples, max(min_samples, target_s // (one * inner))))
    samples = [timer(fn, inner) for _ in range(n)]
    return {"time_s": statistics.median(samples), "min_s": min(samples), "samples": n,
            "inner": inner, "warmup_s": warm, "batch_s": batch_s}


def kernel_medians(trace: dict, calls: int = 1) -> dict[str, tuple[float, float]]:
    """Each kernel of a chrome trace (torch.profiler's ``export_chrome_trace``: events of
    category "kernel", durations in microseconds): (median seconds, launches per call)."""
    per: dict[str, list[float]] = {}
    for e in trace.get("traceEvents", []):
        if e.get("cat") == "kernel":
            per.setdefault(e["name"], []).append(float(e["dur"]) * 1e-6)
    return {n: (statistics.median(v), len(v) / calls) for n, v in per.items()}


def kernel_trace(torch, fn, calls: int = 20) -> dict:
    """torch.profiler's chrome trace (CUPTI's kernel records, so kernels that another
    framework launches in this process count too) of ``calls`` back-to-back calls of
    ``fn``, after one warm-up call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()  # the whole device: other frameworks' streams too
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            return json.load(f)
    finally:
        os.remove(path)


def kernel_times(torch, fn, calls: int = 20) -> dict[str, tuple[float, float]]:
    """The CUDA kernels of ``calls`` back-to-back calls of ``fn`` (kernel_trace):
    (median seconds, launches per call) per kernel name."""
    return kernel_medians(kernel_trace(torch, fn, calls), calls)


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float | None, why: str = ""):
    """Raise :class:`_Timeout` in this block after ``seconds`` (SIGALRM, main thread only).

    The signal lands between Python bytecodes: a long call into C (a CUDA sync, a
    compiler subprocess) is interrupted when it returns. No-op where SIGALRM or the
    main thread is not available, or for ``None``.
    """
    if (seconds is None or not hasattr(signal, "SIGALRM")
            or threading.current_thread() is not threading.main_thread()):
        yield
        return

    def handler(signum, frame):
        raise _Timeout(why or f"problem time limit ({seconds:.0f} s) reached")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _is_timeout(e: BaseException) -> bool:
    """``e`` is, wraps or names a :class:`_Timeout` (compilers re-raise their own type)."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, _Timeout) or "_Timeout" in str(e):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def add_tflops(rec: dict, case: Case) -> dict:
    """Effective TFLOP/s of an ``ok`` record (SEMANTICS.md FLOPs, any peer)."""
    if rec.get("status") == "ok" and rec.get("time_s"):
        rec["tflops"] = sim.flops(*case.window_args(), batch=case.batch, heads=case.heads,
                                  head_dim=case.head_dim, pass_=rec["pass"]) / rec["time_s"] / 1e12
    return rec


def write_split(result: dict, presets: dict[str, Sequence[str]], out_dir: str,
                suffix: str = "torch") -> list[str]:
    """Write ``<preset>-<suffix>.json`` per preset (records of its cases), atomically."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, case_names in presets.items():
        keep = set(case_names)
        part = dict(result, records=[r for r in result["records"] if r["case"] in keep],
                    name=name)
        path = os.path.join(out_dir, f"{name}-{suffix}.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(part, f, indent=1)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def _raise_recompile_limits(torch) -> None:
    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(int(getattr(cfg, name)), 4096))


def run(cases: Sequence[Case], *, peers: Sequence[str] = PEERS, dtypes=None,
        passes: Sequence[str] = PASSES, sampling=(3, 20, 0.25), deadline=None,
        progress: bool = True, case_limit_s: float | None = None,
        on_update: Callable[[dict], None] | None = None) -> dict:
    """Measure ``peers`` on ``cases``; ``on_update(result)`` after every problem and dtype."""
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
        _raise_recompile_limits(torch)
        flex_attention = torch.compile(flex_attention, dynamic=False)
    except Exception as e:  # noqa: BLE001
        flex_why = f"FlexAttention unavailable: {type(e).__name__}: {e}"
    records: list[dict] = []
    result = {"kind": "torch-peers", "env": env, "records": records,
              "config": {"peers": list(peers), "dtypes": list(dtypes), "passes": list(passes),
                         "case_limit_s": case_limit_s}}
    total = len(dtypes) * len(cases) * len(peers) * len(passes)
    done = 0
    masks: dict[str, tuple] = {}  # case name -> (block mask, seconds to build it)
    t_start = time.perf_counter()

    def say(msg: str) -> None:
        if progress:
            print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    for dtype in dtypes:
        tdtype = getattr(torch, dtype)
        for case in cases:
            smp = sampling[case.name] if isinstance(sampling, dict) else sampling
            n = case.tokens
            say(f"{case.name} {dtype}: {n} tokens")
            q = k = v = do = None
            timed_out = ""
            try:
                with time_limit(case_limit_s):
                    g = torch.Generator(device=device).manual_seed(0)
                    shape = (case.batch, case.heads, n, case.head_dim)
                    q, k, v, do = (torch.randn(shape, generator=g, device=device, dtype=tdtype)
                                   for _ in range(4))
            except _Timeout as e:
                timed_out = str(e)
            inputs_timed_out = timed_out
            for peer in peers:
                # The limit holds for each peer of a problem (a slow flex leaves sdpa its time).
                case_t0, timed_out = time.perf_counter(), inputs_timed_out
                for p in passes:
                    done += 1
                    rec = {"case": case.name, "dtype": dtype, "backend": peer, "pass": p,
                           "status": "ok"}
                    left, why = None, ""
                    if case_limit_s is not None:
                        left = case_limit_s - (time.perf_counter() - case_t0)
                        why = f"problem time limit ({case_limit_s:.0f} s) reached"
                    if deadline is not None:
                        dl = deadline - time.perf_counter()
                        if left is None or dl < left:
                            left, why = dl, f"time budget spent ({max(dl, 0):.0f} s were left)"
                    try:
                        if timed_out:
                            raise _Skip(timed_out)
                        if deadline is not None and time.perf_counter() > deadline:
                            raise _Skip("time budget spent")
                        if left is not None and left <= 0:
                            raise _Skip(why)
                        with time_limit(left, why):
                            _measure_one(torch, F, device, case, peer, p, q, k, v, do, smp,
                                         rec, masks, flex_attention, create_block_mask,
                                         flex_why, say)
                    except _Skip as e:
                        rec.update(status="skipped", note=str(e))
                    except _Timeout as e:
                        timed_out = str(e)
                        rec.update(status="skipped", note=timed_out)
                    except Exception as e:  # noqa: BLE001 - record and go on
                        if _is_timeout(e):  # torch.compile wraps what it catches
                            timed_out = why
                            rec.update(status="skipped", note=timed_out)
                        else:
                            rec.update(status="error",
                                       note=f"{type(e).__name__}: {e}".splitlines()[0][:300])
                    add_tflops(rec, case)
                    records.append(rec)
                    t = f"{rec['time_s'] * 1e3:.3f} ms" if rec["status"] == "ok" else (
                        f"{rec['status']} ({rec.get('note', '')[:120]})")
                    say(f"[{done}/{total}] {case.name} {dtype} {peer} {p}: {t}")
            del q, k, v, do
            if device == "cuda":
                torch.cuda.empty_cache()
            result["wall_s"] = time.perf_counter() - t_start
            if on_update is not None:
                on_update(result)
    result["wall_s"] = time.perf_counter() - t_start
    return result


def _measure_one(torch, F, device, case, peer, p, q, k, v, do, smp, rec, masks,
                 flex_attention, create_block_mask, flex_why, say) -> None:
    """Time one (peer, pass) of one problem into ``rec``."""
    n = case.tokens
    block_mask = mask_s = None
    if peer == "flex":
        if flex_attention is None:
            raise _Skip(flex_why)
        if case.name not in masks:
            say(f"{case.name}: building the block mask ({n} x {n})")
            t0 = time.perf_counter()
            bm = _block_mask(torch, create_block_mask, gna_mask_mod(case, torch), n, device)
            if device == "cuda":
                torch.cuda.synchronize()
            masks[case.name] = (bm, time.perf_counter() - t0)
            say(f"{case.name}: block mask in {masks[case.name][1]:.1f} s, "
                f"sparsity {float(bm.sparsity()):.1f}%")
        block_mask, mask_s = masks[case.name]

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
            return torch.autograd.grad(out, (qg, kg, vg), do, retain_graph=True)
    say(f"{case.name} {peer} {p}: compiling / warming up")
    rec.update(measure(torch, device, fn, *smp))
    if peer == "flex":
        rec["block_mask_s"] = mask_s
        rec["block_sparsity"] = float(block_mask.sparsity()) / 100.0
    if device == "cuda":
        # Peak of the process since the last reset (inputs included).
        rec["mem_bytes"] = int(torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()


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
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget of the whole run; the rest is recorded as skipped")
    ap.add_argument("--case-limit-s", type=float, default=None,
                    help="time limit of one peer on one problem and dtype (block mask, compiles, "
                         "timing)")
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
    presets = {name: [c.name for c in PRESETS[name]] for name in names}

    def save(result):
        write_split(result, presets, args.out)

    result = run(cases, peers=tuple(args.peers.split(",")), dtypes=dtypes,
                 passes=tuple(args.passes.split(",")), sampling=sampling, deadline=deadline,
                 case_limit_s=args.case_limit_s, on_update=save)
    for path in write_split(result, presets, args.out):
        print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
