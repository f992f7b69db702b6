"""Benchmark suite: jax_gna against what a JAX user would otherwise run, side by side.

Peers, measured in one process per problem and dtype:

* ``cuda``   -- ``jax_gna.neighborhood_attention(..., backend="cuda")`` (fused kernels),
* ``xla``    -- ``jax_gna.neighborhood_attention(..., backend="xla")`` (portable backend),
* ``cudnn``  -- dense attention, ``jax.nn.dot_product_attention(implementation="cudnn")``
  (GPU, fp16/bf16 only): the reference every speedup is relative to,
* ``masked`` -- XLA dense attention with the boolean neighborhood mask (built from
  :func:`jax_gna.mask.is_neighbor`): what a JAX user does today. Skipped when the
  mask or the score matrices would not fit (recorded as a skip).

Passes ``fwd``, ``bwd`` (the backward alone: the ``jax.vjp`` residuals are computed
outside the timed call) and ``fwdbwd``. Every function is jitted and compiled
before timing; a sample times ``inner`` back-to-back calls (async dispatch keeps the
device busy; ``block_until_ready`` on the last) and the median over samples is
reported. Effective TFLOP/s counts the useful FLOPs of SEMANTICS.md
(:func:`jax_gna.sim.flops`: backward = 2.5x forward, causal counts attended keys
only) for every peer, so dense peers are charged for the work they waste. Speedups
are over ``cudnn`` in the same pass and dtype; "% of bound" compares a speedup
with the simulator's tile-level bound (:mod:`jax_gna.sim`, best 128-token query
and key tiles). Memory is XLA's buffer assignment for the compiled call
(arguments + outputs + temporaries): the device memory the call needs.

Entry points: ``python -m benchmarks.run`` (repository checkout) and
``jax-gna bench``; both call :func:`main` / :func:`run`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from . import sim

PASSES = ("fwd", "bwd", "fwdbwd")
BACKENDS = ("cuda", "xla", "cudnn", "masked")
DTYPES = ("float16", "bfloat16", "float32")
_SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
#: A forward faster than CHAIN_BELOW_S per call is also timed as CHAIN forwards in one
#: jitted call (each output the next query): JAX's host time per call (about 45 us for a
#: trivial jitted op on the H200 machine) is then paid once, not per op, so the figure is
#: the GPU's time per op, which a kernel-time figure (CUDA events) compares with.
CHAIN = 16
CHAIN_BELOW_S = 300e-6


# --------------------------------------------------------------------------
# Problems and presets.
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark problem (tensors ``[batch, *shape, heads, head_dim]``)."""

    name: str
    shape: tuple[int, ...]
    heads: int
    head_dim: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    is_causal: tuple[bool, ...] = ()
    batch: int = 1
    heads_kv: int | None = None

    def __post_init__(self):
        n = len(self.shape)

        def per_axis(v, default):
            if v is None or (isinstance(v, (tuple, list)) and not v):
                return (default,) * n
            if isinstance(v, (tuple, list)):
                return tuple(v) * n if len(v) == 1 else tuple(v)
            return (v,) * n

        object.__setattr__(self, "shape", tuple(int(v) for v in self.shape))
        object.__setattr__(self, "kernel_size", per_axis(self.kernel_size, None))
        object.__setattr__(self, "stride", per_axis(self.stride, 1))
        object.__setattr__(self, "dilation", per_axis(self.dilation, 1))
        object.__setattr__(self, "is_causal", per_axis(self.is_causal, False))

    @property
    def tokens(self) -> int:
        return math.prod(self.shape)

    @property
    def kv_heads(self) -> int:
        return self.heads if self.heads_kv is None else self.heads_kv

    def window_args(self) -> tuple:
        return (self.shape, self.kernel_size, self.stride, self.dilation, self.is_causal)

    def describe(self) -> str:
        x = lambda t: "x".join(str(int(v)) for v in t)  # noqa: E731
        parts = [x(self.shape), f"k {x(self.kernel_size)}"]
        if any(s != 1 for s in self.stride):
            parts.append(f"s {x(self.stride)}")
        if any(d != 1 for d in self.dilation):
            parts.append(f"d {x(self.dilation)}")
        if any(self.is_causal):
            parts.append("causal " + "x".join("T" if c else "F" for c in self.is_causal))
        parts.append(f"B{self.batch} H{self.heads} D{self.head_dim}")
        return ", ".join(parts)


def _paper() -> list[Case]:
    c = []
    for s in (1, 256, 2048):
        c.append(Case(f"1d-32768-w2048-s{s}", (32768,), 1, 128, (2048,), (s,)))
    # The Hopper issue asks for the 1-D problems with 24 heads too (one head fills
    # 256 CTAs, under two waves on an H100).
    for s in (1, 256, 2048):
        c.append(Case(f"1d-32768-w2048-s{s}-h24", (32768,), 24, 128, (2048,), (s,)))
    for s in ((1, 1), (16, 1), (16, 16)):
        c.append(Case(f"flux-256x256-w80x80-s{'x'.join(map(str, s))}", (256, 256), 24, 128,
                      (80, 80), s))
    for w, strides in (((18, 24, 24), ((1, 1, 1), (2, 8, 8), (16, 8, 8))),
                       ((30, 40, 40), ((1, 1, 1), (1, 32, 8)))):
        for s in strides:
            c.append(Case(f"hunyuan-30x48x80-w{'x'.join(map(str, w))}-s{'x'.join(map(str, s))}",
                          (30, 48, 80), 24, 128, w, s))
    for w in ((16, 32, 48), (16, 24, 16)):
        for s in ((1, 1, 1), (1, 8, 16)):
            c.append(Case(f"cosmos-16x44x80-w{'x'.join(map(str, w))}-s{'x'.join(map(str, s))}",
                          (16, 44, 80), 32, 128, w, s))
    return c


#: The presets of issue 5. ``smoke`` runs in seconds on a CPU.
PRESETS: dict[str, list[Case]] = {
    "smoke": [
        Case("smoke-1d-256-w16", (256,), 2, 32, (16,)),
        Case("smoke-2d-16x16-w6x6-s2x3-d1x2", (16, 16), 2, 32, (6, 6), (2, 3), (1, 2)),
        Case("smoke-3d-4x8x8-w3x4x4-causal", (4, 8, 8), 2, 32, (3, 4, 4),
             is_causal=(True, False, False)),
    ],
    "paper": _paper(),
    "small": [
        Case("small-128x128-w13-d1", (128, 128), 16, 64, (13, 13), batch=16),
        Case("small-128x128-w13-d2", (128, 128), 16, 64, (13, 13), dilation=(2, 2), batch=16),
    ],
    # Causal in time only. Issue 5 names the grids and heads; the window is ours:
    # 16 frames back in time, 16x16 in space.
    "causal": [
        Case("causal-30x32x32-w16x16x16", (30, 32, 32), 24, 128, (16, 16, 16),
             is_causal=(True, False, False)),
        Case("causal-60x64x64-w16x16x16", (60, 64, 64), 24, 128, (16, 16, 16),
             is_causal=(True, False, False)),
    ],
}

#: Sampling per preset: (min samples, max samples, target seconds of sampling).
SAMPLING = {"smoke": (2, 5, 0.05), "paper": (3, 20, 0.25), "small": (3, 20, 0.25),
            "causal": (3, 20, 0.25), "custom": (5, 30, 0.5)}


# --------------------------------------------------------------------------
# Environment.
# --------------------------------------------------------------------------

def environment() -> dict:
    """GPU name, driver, jax/jaxlib versions, platform."""
    import jax
    import jaxlib

    dev = jax.devices()[0]
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": dev.platform,
        "device": getattr(dev, "device_kind", str(dev)),
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": getattr(jaxlib, "__version__", "?"),
        "python": platform.python_version(),
        "host": platform.machine(),
        "driver": None,
    }
    if dev.platform == "gpu" and shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            first = out.stdout.strip().splitlines()[0].split(", ")
            env["gpu_name"], env["driver"], env["gpu_memory"] = first[0], first[1], first[2]
        except Exception as e:  # noqa: BLE001 - informational only
            env["driver"] = f"unknown ({type(e).__name__})"
    try:
        stats = dev.memory_stats() or {}
        env["memory_limit_bytes"] = stats.get("bytes_limit")
    except Exception:  # noqa: BLE001
        env["memory_limit_bytes"] = None
    return env


def cuda_status() -> tuple[bool, str]:
    """Whether ``backend="cuda"`` can run here, and why not."""
    try:
        from . import cuda  # type: ignore[attr-defined]
    except Exception as e:  # noqa: BLE001 - any import failure means "not here"
        return False, f"jax_gna.cuda is not importable ({type(e).__name__}: {e})"
    try:
        if not cuda.available():
            reason = getattr(cuda, "unavailable_reason", lambda: "")()
            return False, f"jax_gna.cuda.available() is False{': ' + reason if reason else ''}"
    except Exception as e:  # noqa: BLE001
        return False, f"jax_gna.cuda.available() raised {type(e).__name__}: {e}"
    return True, ""


# --------------------------------------------------------------------------
# The functions under test.
# --------------------------------------------------------------------------

def masked_dense_bytes(case: Case, pass_: str, dtype: str) -> tuple[int, int]:
    """(mask bytes, estimated working set) of XLA dense attention with a boolean mask."""
    n = case.tokens
    mask = n * n
    per = case.batch * case.heads * n * n
    # fp32 logits + probabilities in the forward; backward keeps probs and adds dP, dS.
    scores = per * 4 * (2 if pass_ == "fwd" else 4)
    return mask, mask + scores


def _neighbor_mask(case: Case):
    """Device-built [N, N] boolean neighborhood mask (row-major token order)."""
    import jax
    import jax.numpy as jnp

    from .mask import is_neighbor
    from .params import Axis

    def build():
        idx = jnp.arange(case.tokens, dtype=jnp.int32)
        coords = jnp.unravel_index(idx, case.shape)
        m = None
        for a, n in enumerate(case.shape):
            ax = Axis(n, case.kernel_size[a], case.stride[a], case.dilation[a], case.is_causal[a])
            c = coords[a]
            part = is_neighbor(c[:, None], c[None, :], ax, xp=jnp)
            m = part if m is None else m & part
        return m

    return jax.jit(build)()


def attention_fn(backend: str, case: Case) -> Callable:
    """``f(q, k, v, *extra) -> out`` for one backend (``extra``: the mask for ``masked``)."""
    import jax

    if backend in ("xla", "cuda"):
        import jax_gna

        def f(q, k, v):
            return jax_gna.neighborhood_attention(q, k, v, case.kernel_size, case.stride,
                                                  case.dilation, case.is_causal, backend=backend)
        return f

    def flat(x):
        return x.reshape((x.shape[0], -1) + x.shape[-2:])

    if backend == "cudnn":
        def f(q, k, v):
            o = jax.nn.dot_product_attention(flat(q), flat(k), flat(v), implementation="cudnn")
            return o.reshape(q.shape[:-1] + v.shape[-1:])
        return f
    if backend == "masked":
        def f(q, k, v, mask):
            o = jax.nn.dot_product_attention(flat(q), flat(k), flat(v), mask=mask[None, None],
                                             implementation="xla")
            return o.reshape(q.shape[:-1] + v.shape[-1:])
        return f
    raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}.")


def pass_fn(f: Callable, pass_: str, q, k, v, do, extra: tuple) -> tuple[Callable, tuple]:
    """A jittable function and its arguments that time one pass of ``f``."""
    import jax

    if pass_ == "fwd":
        return (lambda q, k, v, *e: f(q, k, v, *e)), (q, k, v) + extra
    if pass_ == "fwdbwd":
        def fb(q, k, v, do, *e):
            out, vjp = jax.vjp(lambda q, k, v: f(q, k, v, *e), q, k, v)
            return out, vjp(do)
        return fb, (q, k, v, do) + extra
    if pass_ == "bwd":
        # The residuals come out of an untimed jitted forward as a pytree (jax.vjp's
        # result), so the timed call is the backward alone.
        res = jax.jit(lambda q, k, v, *e: jax.vjp(lambda q, k, v: f(q, k, v, *e), q, k, v)[1])(
            q, k, v, *extra)
        return (lambda vjp, do: vjp(do)), (res, do)
    raise ValueError(f"unknown pass {pass_!r}; choose from {PASSES}.")


def chained_fwd(f: Callable, q, k, v, extra: tuple, n: int = CHAIN) -> tuple[Callable, tuple] | None:
    """``n`` forwards of ``f`` in one jittable function, each output the next query, and
    its arguments; None when the output is not shaped like the query (cannot chain)."""
    import jax

    out = jax.eval_shape(f, q, k, v, *extra)
    if out.shape != q.shape or out.dtype != q.dtype:
        return None

    def chain(q, k, v, *e):
        for _ in range(n):
            q = f(q, k, v, *e)
        return q
    return chain, (q, k, v) + extra


def _compiled_bytes(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend has it
        return None


def measure(fn: Callable, args: tuple, min_samples: int = 3, max_samples: int = 20,
            target_s: float = 0.25, slow_s: float = 1.0, very_slow_s: float = 8.0,
            settle_s: float = 0.0, batch_s: float = 0.02) -> dict:
    """Compile ``fn`` (jitted), warm up, time; return median seconds per call and stats.

    A sample times ``inner`` back-to-back calls (enough for about ``batch_s``, at most
    1000) and divides: each sample also pays one start from an idle GPU and one final
    synchronisation: with 5 ms per sample the 1-D one-head paper forward chained 16 times
    measured 65.1 and 72.1 us per op in two runs on the H200 machine, with 20 ms 60.2 and
    59.8 us (what `scripts/launch_ab.py`, with 20 ms samples, measures). Calls
    slower than ``slow_s`` are timed once after the warm-up; when the warm-up call
    itself takes more than ``very_slow_s``, it is the only sample (big problems on
    slow peers; ``samples`` says 0 then). Before sampling, calls faster than ``slow_s``
    run back to back for ``settle_s`` seconds (a GPU left idle drops its clocks; a GPU
    under sustained load reaches its power cap: with 0.5 s, cuDNN's 1-D dense forward on
    the H200 machine measured 9-12% slower in two alternating rounds, ours unchanged).
    """
    import jax

    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    mem = _compiled_bytes(compiled)
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))  # warm-up (first execution)
    warm_s = time.perf_counter() - t0
    if warm_s > very_slow_s:
        return {"time_s": warm_s, "min_s": warm_s, "samples": 0, "inner": 1,
                "compile_s": compile_s, "warmup_s": warm_s, "mem_bytes": mem,
                "note": "timed by the warm-up call only (slow)"}
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    one = max(time.perf_counter() - t0, 1e-7)
    samples = [one]
    inner = 1
    if one < slow_s:
        inner = int(min(1000, max(1, batch_s // one)))
        n = int(min(max_samples, max(min_samples, target_s // (one * inner))))

        def batch() -> float:  # seconds per call of `inner` back-to-back calls
            t0 = time.perf_counter()
            out = None
            for _ in range(inner):
                out = compiled(*args)
            jax.block_until_ready(out)
            return (time.perf_counter() - t0) / inner

        t_end = time.perf_counter() + settle_s
        while time.perf_counter() < t_end:
            batch()
        samples = [batch() for _ in range(n)]
    stats = {"time_s": float(np.median(samples)), "min_s": float(np.min(samples)),
             "samples": len(samples), "inner": inner, "compile_s": compile_s,
             "warmup_s": warm_s, "settle_s": settle_s if one < slow_s else 0.0, "mem_bytes": mem,
             "batch_s": batch_s}
    try:
        peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
        if peak is not None:
            stats["process_peak_bytes"] = int(peak)
    except Exception:  # noqa: BLE001 - informational only
        pass
    return stats


# --------------------------------------------------------------------------
# The sweep.
# --------------------------------------------------------------------------

def _case_info(case: Case) -> dict:
    r = sim.best_tiles(*case.window_args(), q_tile_size=128, kv_tile_size=128)
    return {
        "name": case.name, "shape": list(case.shape), "heads": case.heads,
        "heads_kv": case.kv_heads, "head_dim": case.head_dim, "batch": case.batch,
        "kernel_size": list(case.kernel_size), "stride": list(case.stride),
        "dilation": list(case.dilation), "is_causal": list(case.is_causal),
        "tokens": case.tokens, "describe": case.describe(),
        "density": r.density, "sparsity": 1.0 - r.density, "flop_bound": r.flop_bound,
        "tile_bound": r.tile_bound, "tile_bound_avg": r.tile_bound_avg,
        "q_tile": list(r.q_tile), "kv_tile": list(r.kv_tile),
        "masked_fraction": r.masked_fraction,
        "flops": {p: sim.flops(*case.window_args(), batch=case.batch, heads=case.heads,
                               head_dim=case.head_dim, pass_=p) for p in PASSES},
    }


class _Progress:
    """tqdm when installed, else one line per step."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.n, self.enabled = total, 0, enabled
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, unit="run", dynamic_ncols=True)
            except ImportError:
                self.bar = None
        self.start = time.perf_counter()

    def step(self, label: str, result: str = "") -> None:
        self.n += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"{label} {result}"[:80])
            self.bar.update(1)
        else:
            el = time.perf_counter() - self.start
            width = 24
            done = int(width * self.n / max(1, self.total))
            print(f"[{'#' * done}{'.' * (width - done)}] {self.n}/{self.total} {el:6.1f}s "
                  f"{label} {result}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _skip_reason(backend: str, case: Case, p: str, dtype: str, on_gpu: bool, cuda_ok: bool,
                 cuda_why: str, mask_limit: int, work_limit: int) -> str | None:
    if backend == "cuda" and not cuda_ok:
        return cuda_why
    if backend == "cudnn" and not on_gpu:
        return "cuDNN needs an NVIDIA GPU"
    if backend == "cudnn" and dtype == "float32":
        return "cuDNN attention supports fp16/bf16 only"
    if backend == "masked":
        mb, wb = masked_dense_bytes(case, p, dtype)
        if mb > mask_limit or wb > work_limit:
            return (f"does not fit: [tokens, tokens] mask {mb / 2**30:.1f} GiB (limit "
                    f"{mask_limit / 2**30:.1f}), scores ~{wb / 2**30:.1f} GiB (limit "
                    f"{work_limit / 2**30:.1f})")
    return None


#: Measurement order: the fused kernels and the dense reference for every problem and
#: dtype first, then the slower peers (so a time budget cuts the least useful part).
PHASES = (("cuda", "cudnn"), ("xla", "masked"))


def run(cases: Sequence[Case], *, backends: Sequence[str] = BACKENDS,
        dtypes: Sequence[str] | None = None, passes: Sequence[str] = PASSES,
        sampling: tuple[int, int, float] | dict[str, tuple[int, int, float]] = (3, 20, 0.25),
        deadline: float | None = None, mask_limit_bytes: int = 4 << 30, seed: int = 0,
        progress: bool = True, name: str = "custom", chain_below_s: float = CHAIN_BELOW_S,
        settle_s: float = 0.0, batch_s: float = 0.02) -> dict:
    """Run the sweep; return the results (:func:`write_report` writes the files).

    Args:
      cases: problems to run.
      backends: subset of ``("cuda", "xla", "cudnn", "masked")``; peers that cannot run
        here are recorded as skipped with the reason.
      dtypes: default fp16 and bf16 on GPU, fp32 elsewhere.
      passes: subset of ``("fwd", "bwd", "fwdbwd")``.
      sampling: (min samples, max samples, target seconds of sampling per measurement), or
        a dict of them by case name.
      deadline: ``time.perf_counter()`` value after which the remaining measurements are
        recorded as skipped. ``cuda`` and ``cudnn`` are measured for every problem and
        dtype before ``xla`` and ``masked`` (:data:`PHASES`).
      mask_limit_bytes: the ``masked`` peer is skipped when its [tokens, tokens] mask is
        larger, or its estimated score matrices exceed this or 60% of device memory.
      chain_below_s: a forward faster than this per call is also timed as :data:`CHAIN`
        forwards in one jitted call (:func:`chained_fwd`); the record's ``chained_s`` is
        that time per op.
      settle_s: seconds of back-to-back calls before each measurement's samples
        (:func:`measure`).
      batch_s: about how long one sample's back-to-back calls last (:func:`measure`).
    """
    import jax
    import jax.numpy as jnp

    for b in backends:
        if b not in BACKENDS:
            raise ValueError(f"unknown backend {b!r}; choose from {BACKENDS}.")
    for p in passes:
        if p not in PASSES:
            raise ValueError(f"unknown pass {p!r}; choose from {PASSES}.")
    env = environment()
    on_gpu = env["platform"] == "gpu"
    if dtypes is None:
        dtypes = ("float16", "bfloat16") if on_gpu else ("float32",)
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}; choose from {DTYPES}.")
    cuda_ok, cuda_why = cuda_status() if "cuda" in backends else (False, "")
    mem_limit = env.get("memory_limit_bytes")
    work_limit = mask_limit_bytes if not mem_limit else max(mask_limit_bytes, int(0.6 * mem_limit))

    infos = {c.name: _case_info(c) for c in cases}
    tasks = [(dtype, case, backend, p)
             for phase in PHASES for dtype in dtypes for case in cases
             for backend in phase if backend in backends for p in passes]
    records: list[dict] = []
    # Dense attention only depends on the tensor shapes: measured once per shape.
    dense_cache: dict[tuple, dict] = {}
    inputs_key, inputs, mask_key, mask = None, None, None, None
    bar = _Progress(len(tasks), progress)
    t_start = time.perf_counter()
    try:
        for dtype, case, backend, p in tasks:
            rec = {"case": case.name, "dtype": dtype, "backend": backend, "pass": p,
                   "status": "ok"}
            label = f"{case.name} {_SHORT[dtype]} {backend} {p}"
            skip = _skip_reason(backend, case, p, dtype, on_gpu, cuda_ok, cuda_why,
                                mask_limit_bytes, work_limit)
            if skip is None and deadline is not None and time.perf_counter() > deadline:
                skip = "time budget spent"
            if skip is not None:
                rec.update(status="skipped", note=skip)
                records.append(rec)
                bar.step(label, "skipped")
                continue
            key = (case.shape, case.batch, case.heads, case.kv_heads, case.head_dim, dtype, p)
            if backend == "cudnn" and key in dense_cache:
                rec.update(dense_cache[key])
                rec["note"] = "same tensors as " + dense_cache[key]["case_measured"]
                records.append(rec)
                bar.step(label, "cached")
                continue
            try:
                if inputs_key != (case.name, dtype):
                    inputs_key, inputs = None, None
                    kq, kk, kv, ko = jax.random.split(jax.random.PRNGKey(seed), 4)
                    shp = (case.batch,) + case.shape
                    inputs = tuple(
                        jax.random.normal(kx, shp + (h, case.head_dim), dtype=jnp.dtype(dtype))
                        for kx, h in ((kq, case.heads), (kk, case.kv_heads),
                                      (kv, case.kv_heads), (ko, case.heads)))
                    inputs_key = (case.name, dtype)
                extra = ()
                if backend == "masked":
                    if mask_key != case.name:
                        mask_key, mask = None, None
                        mask, mask_key = _neighbor_mask(case), case.name
                    extra = (mask,)
                f = attention_fn(backend, case)
                fn, args = pass_fn(f, p, *inputs, extra)
                smp = sampling[case.name] if isinstance(sampling, dict) else sampling
                m = measure(fn, args, *smp, settle_s=settle_s, batch_s=batch_s)
                del fn, args
                rec.update(m)
                if p == "fwd" and m["time_s"] < chain_below_s:
                    ch = chained_fwd(f, *inputs[:3], extra)
                    if ch is not None:
                        mc = measure(*ch, *smp, settle_s=settle_s, batch_s=batch_s)
                        rec.update(chained_s=mc["time_s"] / CHAIN, chain=CHAIN)
                        del ch
                if backend == "cudnn":
                    dense_cache[key] = dict(m, case_measured=case.name)
                bar.step(label, f"{m['time_s'] * 1e3:.3f} ms")
            except Exception as e:  # noqa: BLE001 - record and go on
                msg = f"{type(e).__name__}: {e}".strip().splitlines()
                # The op refuses configurations its kernels do not cover: a skip, not an error.
                status = ("skipped" if isinstance(e, ValueError)
                          and "cannot run this call" in str(e) else "error")
                rec.update(status=status, note=" ".join(msg[:3])[:400])
                bar.step(label, status)
            records.append(rec)
    finally:
        bar.close()
        inputs = mask = None
    order = {(d, c.name, b, p): i for i, (d, c, b, p) in enumerate(
        (d, c, b, p) for d in dtypes for c in cases for b in backends for p in passes)}
    records.sort(key=lambda r: order[(r["dtype"], r["case"], r["backend"], r["pass"])])
    _derive(records, infos)
    return {"name": name, "env": env, "cases": list(infos.values()), "records": records,
            "config": {"backends": list(backends), "dtypes": list(dtypes), "passes": list(passes),
                       "sampling": sampling if isinstance(sampling, dict) else list(sampling),
                       "settle_s": settle_s, "batch_s": batch_s,
                       "mask_limit_bytes": mask_limit_bytes,
                       "cuda": cuda_ok, "cuda_note": cuda_why},
            "wall_s": time.perf_counter() - t_start}


def _derive(records: list[dict], infos: dict) -> None:
    """Add TFLOP/s, speedup over cuDNN dense and % of the simulator's bound."""
    dense = {(r["case"], r["dtype"], r["pass"]): r["time_s"] for r in records
             if r["backend"] == "cudnn" and r["status"] == "ok"}
    for r in records:
        if r["status"] != "ok":
            continue
        info = infos[r["case"]]
        r["tflops"] = info["flops"][r["pass"]] / r["time_s"] / 1e12
        t_dense = dense.get((r["case"], r["dtype"], r["pass"]))
        if t_dense is not None:
            r["speedup"] = t_dense / r["time_s"]
            r["pct_bound"] = 100.0 * r["speedup"] / info["tile_bound"]


# --------------------------------------------------------------------------
# Report: JSON, markdown, chart.
# --------------------------------------------------------------------------

def _fmt(v: Any, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def _cell(r: dict | None) -> str:
    if r is None:
        return "-"
    if r["status"] != "ok":
        return r["status"]
    t = r["time_s"] * 1e3
    out = f"{t:.3g} ms" if t < 1000 else f"{t:.0f} ms"
    out += f", {r['tflops']:.3g} TF/s"
    if r.get("speedup") is not None:
        out += f", **{r['speedup']:.2f}x**"
        if r["backend"] not in ("cudnn", "sdpa"):
            out += f" ({r['pct_bound']:.0f}%)"
    if r.get("chained_s") is not None:
        out += f"; {r['chain']} in one jit: {r['chained_s'] * 1e6:.3g} us per op"
    return out


def sampling_words(cfg: dict) -> str:
    """How a result's measurements were sampled (its ``config``), as a phrase."""
    return ("back-to-back jitted calls after warm-up"
            + (f" and {cfg['settle_s']:g} s more of calls before sampling" if cfg.get("settle_s") else "")
            + f", samples of about {1e3 * cfg.get('batch_s', 0.005):g} ms of calls each, one call "
            "when a call takes longer")


def _peers_where(peer_env: Sequence[dict] | None, device: str) -> str:
    """Where the merged peers ran (their GPU may not be this run's), as a clause."""
    parts = []
    for e in peer_env or []:
        if not e or e.get("backends") == []:
            continue
        what = "/".join(f"`{b}`" for b in e.get("backends") or []) or "peers"
        where = e.get("device", "?")
        if where != device:
            where += ", not this run's GPU"
        parts.append(f"{what} on {where} (torch {e.get('torch', '?')}, {str(e.get('date', '?'))[:10]})")
    return "; " + "; ".join(parts) if parts else ""


def markdown(result: dict) -> str:
    """The results as markdown: a table of the problems and one of the measurements."""
    env = result["env"]
    cfg = result["config"]
    x = lambda t: "x".join(map(str, t))  # noqa: E731
    dev = env.get("gpu_name") or env["device"]
    lines = [f"# jax_gna benchmark: {result['name']}", "",
             f"{dev} ({env['platform']}), driver {env.get('driver') or '-'}, jax {env['jax']} "
             f"/ jaxlib {env['jaxlib']}, Python {env['python']}, {env['date']}; "
             f"sweep wall time {result['wall_s']:.0f} s."]
    if "cuda" in cfg["backends"] and not cfg["cuda"]:
        lines += ["", f"The `cuda` backend was not measured: {cfg['cuda_note']}."]
    lines += [
        "", "Each cell: median time per call (" + sampling_words(cfg) + "; a "
        f"forward under {CHAIN_BELOW_S * 1e6:.0f} us per call is also timed as {CHAIN} in one "
        "jitted call, per op: JAX's host time per call is then paid once), "
        "effective TFLOP/s (useful FLOPs of SEMANTICS.md for every peer: backward = 2.5x "
        "forward, causal counts attended keys only), **speedup over cuDNN dense** on the same "
        "tensors, pass and dtype, and in parentheses that speedup as % of the simulator's "
        "tile-level bound. `cuda`/`xla`: jax_gna backends; `cudnn`: "
        "`jax.nn.dot_product_attention(implementation=\"cudnn\")`; `masked`: XLA dense "
        "attention with the boolean neighborhood mask. Memory: XLA's buffer assignment of the "
        "compiled call (arguments + outputs + temporaries), largest over the passes."
        + (" `flex` / `sdpa`: PyTorch FlexAttention with the GNA block mask / dense "
           "`scaled_dot_product_attention`, measured in a separate process "
           "(`benchmarks/torch_peers.py`, CUDA events; memory: that process's peak)"
           + _peers_where(result.get("peer_env"), dev) + "."
           if {"flex", "sdpa"} & set(cfg["backends"]) else ""),
        "", "## Problems", "",
        "| problem | configuration | sparsity | FLOP bound | tile bound (q / kv tile) "
        "| fwd GFLOP |", "| --- | --- | --- | --- | --- | --- |"]
    for c in result["cases"]:
        lines.append(f"| {c['name']} | {c['describe']} | {100 * c['sparsity']:.1f}% | "
                     f"{c['flop_bound']:.2f}x | {c['tile_bound']:.2f}x ({x(c['q_tile'])} / "
                     f"{x(c['kv_tile'])}) | {c['flops']['fwd'] / 1e9:.4g} |")
    recs = result["records"]
    by = {(r["case"], r["dtype"], r["backend"], r["pass"]): r for r in recs}
    passes = cfg["passes"]
    names = {"fwd": "forward", "bwd": "backward", "fwdbwd": "forward+backward"}
    lines += ["", "## Results", "",
              "| problem | dtype | backend | " + " | ".join(names[p] for p in passes)
              + " | memory GiB | note |",
              "| --- | --- | --- | " + " | ".join("---" for _ in passes) + " | --- | --- |"]
    rows = []
    for r in recs:
        k = (r["case"], r["dtype"], r["backend"])
        if k not in rows:
            rows.append(k)
    for case, dtype, backend in rows:
        cells, notes, mems = [], [], []
        for p in passes:
            r = by.get((case, dtype, backend, p))
            cells.append(_cell(r))
            if r is None:
                continue
            if r.get("mem_bytes") is not None:
                mems.append(r["mem_bytes"])
            note = r.get("note")
            if note:
                note = f"{p}: {note}" if r["status"] == "error" else note
                if note not in notes:
                    notes.append(note)
        mem = f"{max(mems) / 2**30:.2f}" if mems else "-"
        note = "; ".join(n.replace("|", "/") for n in notes)
        lines.append(f"| {case} | {_SHORT[dtype]} | {backend} | " + " | ".join(cells)
                     + f" | {mem} | {note} |")
    return "\n".join(lines) + "\n"


def chart(result: dict, path: str) -> str | None:
    """PNG: speedup over cuDNN dense vs sparsity, with the simulator's bounds.

    Returns the path, or None (with a message) when matplotlib is missing or there is
    nothing to plot.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart.", file=sys.stderr)
        return None
    infos = {c["name"]: c for c in result["cases"]}
    pts = [r for r in result["records"] if r["status"] == "ok" and r.get("speedup")
           and r["backend"] != "cudnn"]
    if not pts:
        print("no speedups over cuDNN dense were measured: no chart.", file=sys.stderr)
        return None
    passes = [p for p in result["config"]["passes"] if any(r["pass"] == p for r in pts)]
    fig, axes = plt.subplots(1, len(passes), figsize=(6 * len(passes), 4.8), squeeze=False)
    markers = {"cuda": "o", "xla": "s", "masked": "^", "flex": "D", "sdpa": "v"}
    dtypes = result["config"]["dtypes"]
    colors = {d: c for d, c in zip(dtypes, ("tab:blue", "tab:orange", "tab:green"))}
    sp = np.linspace(0.0, 0.995, 400)
    for ax, p in zip(axes[0], passes):
        ax.plot(100 * sp, 1 / (1 - sp), "k-", lw=1, label="FLOP bound 1/density")
        xs = [100 * c["sparsity"] for c in infos.values()]
        ys = [c["tile_bound"] for c in infos.values()]
        ax.scatter(xs, ys, marker="_", s=300, c="k", label="tile bound (simulator)")
        for backend, mk in markers.items():
            for d in dtypes:
                sel = [r for r in pts if r["pass"] == p and r["backend"] == backend
                       and r["dtype"] == d]
                if sel:
                    ax.scatter([100 * infos[r["case"]]["sparsity"] for r in sel],
                               [r["speedup"] for r in sel], marker=mk, c=colors[d], alpha=0.8,
                               label=f"{backend} {_SHORT[d]}")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity (% of the score matrix not attended)")
        ax.set_ylabel("speedup over cuDNN dense")
        ax.set_title(f"{result['name']}: {p}")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    dev = result["env"].get("gpu_name") or result["env"]["device"]
    fig.suptitle(f"jax_gna on {dev}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(result: dict, out_dir: str) -> dict[str, str]:
    """Write ``<name>.json``, ``<name>.md`` and ``<name>.png`` into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, result["name"])
    paths = {"json": base + ".json", "md": base + ".md"}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(paths["md"], "w") as f:
        f.write(markdown(result))
    png = chart(result, base + ".png")
    if png:
        paths["png"] = png
    return paths


# --------------------------------------------------------------------------
# Command line (``python -m benchmarks.run`` and ``jax-gna bench``).
# --------------------------------------------------------------------------

def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.replace(",", "x").split("x") if v)


def _bools(s: str) -> tuple[bool, ...]:
    out = []
    for v in s.replace(",", "x").split("x"):
        if v.lower() in ("1", "t", "true", "y", "yes"):
            out.append(True)
        elif v.lower() in ("0", "f", "false", "n", "no"):
            out.append(False)
        else:
            raise argparse.ArgumentTypeError(f"not a bool: {v!r}")
    return tuple(out)


def add_problem_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of one problem (shared with ``jax-gna sim``)."""
    p.add_argument("--shape", type=_ints, help="spatial shape, e.g. 30x48x80")
    p.add_argument("--kernel-size", "--window", dest="kernel_size", type=_ints,
                   help="kernel size per axis (one value: all axes), e.g. 18x24x24")
    p.add_argument("--stride", type=_ints, default=(1,), help="stride per axis (default 1)")
    p.add_argument("--dilation", type=_ints, default=(1,), help="dilation per axis (default 1)")
    p.add_argument("--causal", type=_bools, default=(False,),
                   help="causal per axis, e.g. TxFxF (default F)")


def _per_axis(v: tuple, rank: int) -> tuple:
    return v * rank if len(v) == 1 else v


def add_sim_arguments(p: argparse.ArgumentParser) -> None:
    """The ``sim`` flags (one problem; tiles given, or searched)."""
    add_problem_arguments(p)
    p.add_argument("--q-tile", type=_ints, default=None, help="query tile shape, e.g. 4x8x8")
    p.add_argument("--kv-tile", type=_ints, default=None, help="key tile shape, e.g. 2x8x8")
    p.add_argument("--search", action="store_true",
                   help="search tile shapes (default when --q-tile/--kv-tile are not given)")
    p.add_argument("--q-tile-size", type=int, default=128, help="tokens per query tile (search)")
    p.add_argument("--kv-tile-size", type=int, default=128, help="tokens per key tile (search)")
    p.add_argument("--top", type=int, default=5, help="how many tilings the search lists")
    p.add_argument("--waves", action="store_true",
                   help="also the wave model (sim.schedule) of the tiling: one CTA per query tile "
                        "and one per key tile, over --sms SMs, --ctas-per-tile each")
    p.add_argument("--sms", type=int, default=132, help="SMs for --waves (default 132: H100/H200)")
    p.add_argument("--ctas-per-tile", type=int, default=1, help="heads x batch, for --waves")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def run_sim_from_args(args: argparse.Namespace) -> int:
    """``jax-gna sim``: print the bounds of one problem (and the tile search)."""
    if not args.shape or not args.kernel_size:
        print("sim needs --shape and --kernel-size (e.g. --shape 30x48x80 --kernel-size "
              "18x24x24)", file=sys.stderr)
        return 2
    r = len(args.shape)
    window = (args.shape, _per_axis(args.kernel_size, r), _per_axis(args.stride, r),
              _per_axis(args.dilation, r), _per_axis(args.causal, r))
    out: dict[str, Any] = {}
    try:
        if args.q_tile or args.kv_tile:
            q = _per_axis(args.q_tile or args.kv_tile, r)
            k = _per_axis(args.kv_tile or args.q_tile, r)
            out["result"] = sim.simulate(*window, q_tile=q, kv_tile=k)
        if args.search or "result" not in out:
            out["search"] = sim.best_tiles(*window, q_tile_size=args.q_tile_size,
                                           kv_tile_size=args.kv_tile_size, top=max(2, args.top))
            out["search"] = out["search"][:max(1, args.top)]
        tiling = out["result"] if "result" in out else out["search"][0]
        waves = [sim.schedule(tiling, key_outer=ko, ctas_per_tile=args.ctas_per_tile, sms=args.sms)
                 for ko in (False, True)] if args.waves else []
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        js: dict[str, Any] = {k: (v.as_dict() if k == "result" else [x.as_dict() for x in v])
                              for k, v in out.items()}
        if waves:
            js["waves"] = [w.as_dict() for w in waves]
        print(json.dumps(js, indent=1))
        return 0
    x = lambda t: "x".join(map(str, t))  # noqa: E731
    if "result" in out:
        print(out["result"].summary())
    if "search" in out:
        best = out["search"]
        print(f"\ntile search: {args.q_tile_size}-token query tiles x {args.kv_tile_size}-token "
              f"key tiles, best {len(best)} by the worst query tile's bound")
        print(f"{'q tile':>10} {'kv tile':>10} {'bound':>8} {'avg':>8} {'masked':>8}")
        for b in best:
            print(f"{x(b.q_tile):>10} {x(b.kv_tile):>10} {b.tile_bound:7.2f}x "
                  f"{b.tile_bound_avg:7.2f}x {100 * b.masked_fraction:7.1f}%")
        if "result" not in out:
            print("\n" + best[0].summary())
    if waves:
        print("waves        (one CTA per tile; a CTA's time = the tiles it visits)")
        for w in waves:
            print("  " + w.summary())
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``bench`` flags."""
    p.add_argument("--preset", default=None,
                   help=f"comma-separated presets: {', '.join(PRESETS)}, model, model-smoke "
                        "(default smoke, unless a problem is given with --shape)")
    add_problem_arguments(p)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--heads-kv", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--backends", default=None,
                   help=f"comma-separated subset of {','.join(BACKENDS)} (default all; the "
                        "model presets: cuda)")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated: float16,bfloat16,float32 (also fp16,bf16,fp32); "
                        "default fp16,bf16 on GPU, fp32 on CPU")
    p.add_argument("--passes", default=",".join(PASSES), help="comma-separated subset of "
                   + ",".join(PASSES))
    p.add_argument("--out", default=os.path.join("benchmarks", "results"),
                   help="output directory (default benchmarks/results)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget for the whole command (all presets); once spent, "
                        "the remaining measurements are recorded as skipped")
    p.add_argument("--samples", type=_ints, default=None,
                   help="min x max samples per measurement, e.g. 3x20")
    p.add_argument("--settle-s", type=float, default=0.0,
                   help="seconds of back-to-back calls before each measurement's samples "
                        "(default 0: sampling starts after one warm-up call)")
    p.add_argument("--batch-ms", type=float, default=20.0,
                   help="about how many milliseconds of back-to-back calls one sample times "
                        "(default 20; 5 before 2026-11-29)")
    p.add_argument("--mask-limit-gib", type=float, default=4.0,
                   help="skip the masked-dense peer above this mask size (GiB)")
    p.add_argument("--cases", default=None,
                   help="regex: keep the preset cases whose name matches")
    p.add_argument("--name", default=None, help="result file name (default: the preset)")
    p.add_argument("--merge-peers", default=None,
                   help="comma-separated JSON files of benchmarks.torch_peers to merge into "
                        "the results (FlexAttention, torch SDPA)")
    p.add_argument("--from-json", default=None,
                   help="measure nothing: rewrite the report of this result JSON (with "
                        "--merge-peers merged in) into --out")
    p.add_argument("--no-progress", action="store_true")


def merge_peers(result: dict, peer_results: Sequence[dict]) -> dict:
    """Add the records of other processes (``benchmarks.torch_peers``) to a result.

    Records of cases the result does not have are dropped; a later file's record
    replaces an earlier one of the same case, dtype, backend and pass. Speedups are
    recomputed over the result's cuDNN dense times. Each file's environment goes to
    ``peer_env``, with the backends whose records came from it (``backends``): the
    peers may have run on another GPU than the result.
    """
    names = {c["name"] for c in result["cases"]}
    out = dict(result)
    out["records"] = [dict(r) for r in result["records"]]
    backends = list(result["config"]["backends"])
    source = {}  # (case, dtype, backend, pass) -> index of the peer file it came from
    for i, pr in enumerate(peer_results):
        for r in pr["records"]:
            if r["case"] in names:
                key = (r["case"], r["dtype"], r["backend"], r["pass"])
                out["records"] = [x for x in out["records"]
                                  if (x["case"], x["dtype"], x["backend"], x["pass"]) != key]
                out["records"].append(dict(r))
                source[key] = i
                if r["backend"] not in backends:
                    backends.append(r["backend"])
    out["peer_env"] = list(result.get("peer_env") or [])
    for i, pr in enumerate(peer_results):
        used = sorted({k[2] for k, j in source.items() if j == i})
        out["peer_env"].append(dict(pr.get("env") or {}, backends=used))
    out["config"] = dict(result["config"], backends=backends)
    case_i = {c["name"]: i for i, c in enumerate(result["cases"])}
    dtypes = list(dict.fromkeys(list(result["config"]["dtypes"])
                                + [r["dtype"] for r in out["records"]]))
    out["records"].sort(key=lambda r: (dtypes.index(r["dtype"]), case_i[r["case"]],
                                       backends.index(r["backend"]),
                                       PASSES.index(r["pass"]) if r["pass"] in PASSES else 9))
    _derive(out["records"], {c["name"]: c for c in out["cases"]})
    return out


def _bad_arguments(args: argparse.Namespace, dtypes, backends, passes) -> str | None:
    """Why ``bench``'s arguments cannot run (None: they can); said before any work."""
    if args.kernel_size and not args.shape:
        return "--kernel-size needs --shape (one problem); presets bring their own windows"
    if args.shape and not args.kernel_size:
        return "--shape needs --kernel-size"
    bad = [d for d in dtypes or () if d not in ("float16", "bfloat16", "float32")]
    if bad:
        return f"--dtypes {','.join(bad)}: choose from fp16, bf16, fp32"
    bad = [b for b in backends if b not in BACKENDS]
    if bad or not backends:
        return f"--backends {','.join(bad)}: choose from {','.join(BACKENDS)}"
    bad = [p for p in passes if p not in PASSES]
    if bad or not passes:
        return f"--passes {','.join(bad)}: choose from {','.join(PASSES)}"
    if args.samples is not None and (len(args.samples) not in (1, 2) or min(args.samples) < 1
                                     or args.samples[0] > args.samples[-1]):
        return f"--samples must be MINxMAX with 1 <= MIN <= MAX, got {args.samples}"
    for name in ("heads", "head_dim", "batch"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1"
    return None


def _check_case(case: Case) -> None:
    """``ValueError`` for a problem the op would reject (shapes only, nothing runs)."""
    import jax
    import jax.numpy as jnp

    from .params import make_problem
    q = jax.ShapeDtypeStruct((case.batch, *case.shape, case.heads, case.head_dim), jnp.float32)
    kv = jax.ShapeDtypeStruct((case.batch, *case.shape, case.kv_heads, case.head_dim),
                              jnp.float32)
    make_problem(q, kv, kv, *case.window_args()[1:])


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``bench`` from parsed arguments; print the tables, write the files."""
    peers = []
    for path in (args.merge_peers or "").split(","):
        if path:
            with open(path) as f:
                peers.append(json.load(f))
    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
        if args.name:
            result["name"] = args.name
        result = merge_peers(result, peers)
        paths = write_report(result, args.out)
        print(markdown(result))
        print("wrote " + ", ".join(paths.values()))
        return 0
    long = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "half": "float16"}
    dtypes = None if not args.dtypes else tuple(long.get(d, d) for d in args.dtypes.split(","))
    backends = tuple(b for b in (args.backends or ",".join(BACKENDS)).split(",") if b)
    passes = tuple(p for p in args.passes.split(",") if p)
    why = _bad_arguments(args, dtypes, backends, passes)
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    jobs: list[tuple[str, list[Case]]] = []
    if args.shape:
        r = len(args.shape)
        case = Case(args.name or "custom", args.shape, args.heads, args.head_dim,
                    _per_axis(args.kernel_size, r), _per_axis(args.stride, r),
                    _per_axis(args.dilation, r), _per_axis(args.causal, r), args.batch,
                    args.heads_kv)
        try:  # the problem checked as the op checks it, before any device work
            _check_case(case)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        jobs.append((args.name or "custom", [case]))
    for name in (args.preset or ("" if args.shape else "smoke")).split(","):
        if not name:
            continue
        from .bench_model import MODEL_PRESETS
        if name not in PRESETS and name not in MODEL_PRESETS:
            print(f"unknown preset {name!r}; choose from "
                  f"{', '.join(list(PRESETS) + list(MODEL_PRESETS))}", file=sys.stderr)
            return 2
        cases = PRESETS.get(name) or MODEL_PRESETS[name]
        if args.cases and isinstance(cases, list):
            cases = [c for c in cases if re.search(args.cases, c.name)]
        jobs.append((name, cases))
    deadline = None if args.budget_s is None else time.perf_counter() + args.budget_s
    # All grid presets run as one sweep (so the phase order and the time budget span
    # them all), then the results are split and written per preset.
    grid = [(name, cases) for name, cases in jobs if isinstance(cases, list)]
    if grid:
        sampling: dict[str, tuple[int, int, float]] = {}
        all_cases: list[Case] = []
        for name, cases in grid:
            smp = SAMPLING.get(name, SAMPLING["custom"])
            if args.samples:
                smp = (args.samples[0], args.samples[-1], smp[2])
            for c in cases:
                if c.name not in sampling:
                    sampling[c.name] = smp
                    all_cases.append(c)
        combined = run(all_cases, backends=backends, dtypes=dtypes, passes=passes,
                       sampling=sampling, deadline=deadline,
                       mask_limit_bytes=int(args.mask_limit_gib * 2**30),
                       progress=not args.no_progress, name="+".join(n for n, _ in grid),
                       settle_s=args.settle_s, batch_s=args.batch_ms / 1e3)
        for name, cases in grid:
            out_name = args.name if (args.name and len(grid) == 1) else name
            result = split_result(combined, [c.name for c in cases], out_name)
            if peers:
                result = merge_peers(result, peers)
            paths = write_report(result, args.out)
            print(markdown(result))
            print("wrote " + ", ".join(paths.values()))
    for name, case in jobs:
        if isinstance(case, list):
            continue
        from . import bench_model
        mb = tuple(b for b in (args.backends or "cuda").split(",") if b in ("cuda", "xla"))
        result = bench_model.run_model(
            case, backends=mb, dtype=dtypes[0] if dtypes else None,
            passes=tuple(p for p in passes if p != "bwd"), deadline=deadline,
            progress=not args.no_progress, name=name)
        paths = bench_model.write_model_report(result, args.out)
        print(bench_model.model_markdown(result))
        print("wrote " + ", ".join(paths.values()))
    return 0


def split_result(result: dict, case_names: Sequence[str], name: str) -> dict:
    """The part of a sweep's result that concerns ``case_names`` (one preset)."""
    keep = set(case_names)
    out = dict(result, name=name)
    out["cases"] = [c for c in result["cases"] if c["name"] in keep]
    out["records"] = [r for r in result["records"] if r["case"] in keep]
    out["sweep"] = result["name"]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.run [flags]``."""
    parser = argparse.ArgumentParser(prog="benchmarks.run", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
