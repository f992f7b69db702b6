"""Model-level benchmark: one diffusion-transformer (DiT) block, self attention vs GNA.

As the GNA / NATTEN papers report it: one block with hidden size 3072, 24 heads of
head dim 128, MLP ratio 4, on the HunyuanVideo 30x48x80 token grid, random weights,
batch 1, bf16; forward and forward+backward (gradients of the weights and the
input). The attention is either dense self attention through cuDNN
(``jax.nn.dot_product_attention(implementation="cudnn")``) or jax_gna's GNA over the
token grid, in the configurations of the ``paper`` preset. Reported: block time,
speedup over the self-attention block, and the attention-free part of the block
(same block with the attention replaced by the identity) so the ceiling on the
block speedup is visible.

The block: ``x += Wo(attn(rms(Wq h), rms(Wk h), Wv h))`` with ``h = LN(x)``, then
``x += W2 gelu(W1 LN(x))`` (pre-norm, QK RMS norm as in HunyuanVideo/FLUX, no
modulation: adaLN's per-token cost is negligible at this size).

Run: ``python -m benchmarks.run --preset model`` (``model-smoke``: a tiny one for CPUs).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Sequence

from . import sim
from .bench import _Progress, _SHORT, cuda_status, environment, measure


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """One DiT block on a token grid, and the GNA configurations to compare."""

    name: str
    grid: tuple[int, ...]
    hidden: int
    heads: int
    mlp_ratio: int
    configs: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]  # (name, kernel, stride)
    batch: int = 1

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


_HUNYUAN = (("w18x24x24-s1", (18, 24, 24), (1, 1, 1)),
            ("w18x24x24-s2x8x8", (18, 24, 24), (2, 8, 8)),
            ("w18x24x24-s16x8x8", (18, 24, 24), (16, 8, 8)),
            ("w30x40x40-s1", (30, 40, 40), (1, 1, 1)),
            ("w30x40x40-s1x32x8", (30, 40, 40), (1, 32, 8)))

MODEL_PRESETS = {
    "model": ModelCase("dit-3072-h24-30x48x80", (30, 48, 80), 3072, 24, 4, _HUNYUAN),
    "model-smoke": ModelCase("dit-64-h2-4x8x8", (4, 8, 8), 64, 2, 4,
                             (("w3x4x4-s1", (3, 4, 4), (1, 1, 1)),
                              ("w4x4x4-s4x4x4", (4, 4, 4), (4, 4, 4)))),
}


def _init(case: ModelCase, dtype, seed: int = 0):
    import jax
    import jax.numpy as jnp

    c, m = case.hidden, case.hidden * case.mlp_ratio
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)

    def w(k, shape):
        return (jax.random.normal(k, shape, jnp.float32) / math.sqrt(shape[0])).astype(dtype)

    params = {"wqkv": w(ks[0], (c, 3 * c)), "wo": w(ks[1], (c, c)), "w1": w(ks[2], (c, m)),
              "w2": w(ks[3], (m, c))}
    n = math.prod(case.grid)
    x = jax.random.normal(ks[4], (case.batch, n, c), dtype)
    dy = jax.random.normal(ks[5], (case.batch, n, c), dtype)
    return params, x, dy


def block_fn(case: ModelCase, attention: str, kernel=None, stride=None):
    """``f(params, x) -> y`` for one block; ``attention`` in cudnn | cuda | xla | none."""
    import jax
    import jax.numpy as jnp

    h_, d_ = case.heads, case.head_dim

    def ln(x):
        x32 = x.astype(jnp.float32)
        mu = x32.mean(-1, keepdims=True)
        var = ((x32 - mu) ** 2).mean(-1, keepdims=True)
        return ((x32 - mu) * jax.lax.rsqrt(var + 1e-6)).astype(x.dtype)

    def rms(x):
        x32 = x.astype(jnp.float32)
        return (x32 * jax.lax.rsqrt((x32 * x32).mean(-1, keepdims=True) + 1e-6)).astype(x.dtype)

    def attn(q, k, v):
        if attention == "cudnn":
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
        if attention == "none":
            return v
        import jax_gna
        b = q.shape[0]
        grid = lambda t: t.reshape((b,) + case.grid + (h_, d_))  # noqa: E731
        o = jax_gna.neighborhood_attention(grid(q), grid(k), grid(v), kernel, stride,
                                           backend=attention)
        return o.reshape(q.shape)

    def f(params, x):
        b, n, c = x.shape
        qkv = ln(x) @ params["wqkv"]
        q, k, v = (t.reshape(b, n, h_, d_) for t in jnp.split(qkv, 3, axis=-1))
        o = attn(rms(q), rms(k), v)
        x = x + o.reshape(b, n, c) @ params["wo"]
        return x + jax.nn.gelu(ln(x) @ params["w1"]) @ params["w2"]

    return f


def run_model(case: ModelCase, *, backends: Sequence[str] = ("cuda",),
              dtype: str | None = None, passes: Sequence[str] = ("fwd", "fwdbwd"),
              sampling: tuple[int, int, float] = (3, 10, 0.5), deadline: float | None = None,
              progress: bool = True, name: str = "model") -> dict:
    """Time the block with each attention; return the results (``write_model_report``)."""
    import jax
    import jax.numpy as jnp

    env = environment()
    on_gpu = env["platform"] == "gpu"
    dtype = dtype or ("bfloat16" if on_gpu else "float32")
    cuda_ok, cuda_why = cuda_status() if "cuda" in backends else (False, "")
    variants = [("self-attention (cudnn)", "cudnn", None, None),
                ("no attention (ceiling)", "none", None, None)]
    for b in backends:
        for cname, k, s in case.configs:
            variants.append((f"GNA {cname} ({b})", b, k, s))
    params, x, dy = _init(case, jnp.dtype(dtype))
    records = []
    bar = _Progress(len(variants) * len(passes), progress)
    t_start = time.perf_counter()
    for label, attention, k, s in variants:
        for p in passes:
            rec = {"variant": label, "attention": attention, "pass": p, "status": "ok",
                   "kernel_size": list(k) if k else None, "stride": list(s) if s else None}
            skip = None
            if attention == "cudnn" and (not on_gpu or dtype == "float32"):
                skip = "cuDNN needs an NVIDIA GPU and fp16/bf16"
            elif attention == "cuda" and not cuda_ok:
                skip = cuda_why
            elif deadline is not None and time.perf_counter() > deadline:
                skip = "time budget spent"
            if skip:
                rec.update(status="skipped", note=skip)
                records.append(rec)
                bar.step(label + " " + p, "skipped")
                continue
            try:
                f = block_fn(case, attention, k, s)
                if p == "fwd":
                    fn, args = f, (params, x)
                else:
                    def fn(params, x, dy, f=f):
                        y, vjp = jax.vjp(f, params, x)
                        return y, vjp(dy)
                    args = (params, x, dy)
                rec.update(measure(fn, args, *sampling))
                bar.step(label + " " + p, f"{rec['time_s'] * 1e3:.2f} ms")
            except Exception as e:  # noqa: BLE001 - record and go on
                rec.update(status="error", note=f"{type(e).__name__}: {e}".splitlines()[0][:300])
                bar.step(label + " " + p, "error")
            records.append(rec)
    bar.close()
    base = {r["pass"]: r["time_s"] for r in records
            if r["attention"] == "cudnn" and r["status"] == "ok"}
    for r in records:
        if r["status"] == "ok" and r["pass"] in base:
            r["speedup"] = base[r["pass"]] / r["time_s"]
        if r["kernel_size"]:
            r["attention_flop_bound"] = sim.simulate(case.grid, tuple(r["kernel_size"]),
                                                     tuple(r["stride"]), q_tile=8,
                                                     kv_tile=8).flop_bound
    return {"name": name, "kind": "model", "env": env, "case": dataclasses.asdict(case),
            "dtype": dtype, "records": records, "passes": list(passes),
            "cuda_note": cuda_why, "wall_s": time.perf_counter() - t_start}


def model_markdown(result: dict) -> str:
    env, case = result["env"], result["case"]
    dev = env.get("gpu_name") or env["device"]
    grid = "x".join(map(str, case["grid"]))
    lines = [f"# jax_gna model-level benchmark: {result['name']}", "",
             f"One DiT block: hidden {case['hidden']}, {case['heads']} heads of "
             f"{case['hidden'] // case['heads']}, MLP ratio {case['mlp_ratio']}, token grid "
             f"{grid}, batch {case['batch']}, {_SHORT[result['dtype']]}, random weights. "
             f"{dev}, driver {env.get('driver') or '-'}, jax {env['jax']}, {env['date']}.", "",
             "Time per block call (median after warm-up); speedup over the same block with "
             "cuDNN self attention. `no attention` replaces the attention by the identity: "
             "the ceiling of any block speedup.", "",
             "| attention | " + " | ".join(f"{p} ms | {p} speedup" for p in result["passes"])
             + " | note |",
             "| --- | " + " | ".join("--- | ---" for _ in result["passes"]) + " | --- |"]
    by = {(r["variant"], r["pass"]): r for r in result["records"]}
    for v in dict.fromkeys(r["variant"] for r in result["records"]):
        cells, notes = [], []
        for p in result["passes"]:
            r = by.get((v, p))
            if r is None or r["status"] != "ok":
                cells.append(r["status"] if r else "-")
                cells.append("-")
                if r and r.get("note") and r["note"] not in notes:
                    notes.append(r["note"])
                continue
            cells.append(f"{r['time_s'] * 1e3:.2f}")
            cells.append(f"{r['speedup']:.2f}x" if r.get("speedup") else "-")
        lines.append(f"| {v} | " + " | ".join(cells) + " | "
                     + "; ".join(n.replace("|", "/") for n in notes) + " |")
    return "\n".join(lines) + "\n"


def write_model_report(result: dict, out_dir: str) -> dict[str, str]:
    import json
    import os

    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, result["name"])
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(base + ".md", "w") as f:
        f.write(model_markdown(result))
    return {"json": base + ".json", "md": base + ".md"}
