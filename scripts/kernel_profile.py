"""Kernel durations of our forward, measured the way benchmarks/natten_peer.py measures
NATTEN's: torch.profiler (CUPTI's kernel records) over back-to-back calls, median per
kernel. JAX runs the forward and torch only profiles, in one process, so both libraries'
kernel times come from the same tool. With NATTEN importable, its forward (default
configuration, or with --natten-best the fastest of the configurations it lists for the
problem) is profiled too, on the same tensors; with --cudnn, cuDNN dense attention
(the benchmark's `cudnn` peer, jax_gna.bench.attention_fn) as well; with --backward, our
backward alone (jax.vjp's function on a cotangent; its residuals come from an untimed
forward): every kernel of it (XLA's delta fusion, dQ, dK/dV).

usage (on the GPU): python3 scripts/kernel_profile.py [--dtypes bf16,fp16] [--calls 20]
    [--cudnn] [--backward] [--natten-best] [--inputs native|bf16|mantissaN] [--warm-s S]
    [--batch 1] [--head-dim 128]
    [--out kernels.json] [shape window stride heads] ...
    (default: 1-D one-head stride 2048)
Inputs: standard normal q, k, v drawn in each dtype (native, as the benchmark draws them);
"bf16" draws them in bf16 and casts (what this script did before 2026-11-29: its fp16
inputs then had three zero low mantissa bits); "mantissaN" rounds native ones to N
mantissa bits (same values' scale, fewer bits toggling: a probe of how much the time
depends on the data, i.e. on energy under the power cap).
Each line printed is "<problem> <dtype> <who>: <median> us x<launches> <kernel>", who being
ours, "ours x16 in one jit" (forwards under 300 us also 16 in one jitted call), "ours bwd",
natten or cudnn.
--out writes the records as JSON and a markdown table beside it (.md); --from-text FILE
makes them from such printed lines instead of measuring.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


_LINE = re.compile(r"^(?P<label>.+?) (?P<dtype>bf16|fp16) "
                   r"(?P<who>ours x16 in one jit|ours bwd|ours|natten|cudnn): +"
                   r"(?P<us>[0-9.]+) us x(?P<n>[0-9]+) (?P<name>.*)$")


def records_from_text(text: str, calls: int = 20) -> list[dict]:
    """The printed lines back into records: one per (problem, dtype, who), each with its
    kernels ([name, median s, launches per call]), the longest kernel (``kernel_s``) and
    the GPU time per call (``gpu_s``: the kernels' medians times launches, summed; for
    "ours x16 in one jit" per forward)."""
    recs: dict[tuple[str, str, str], dict] = {}
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if not m:
            continue
        key = (m["label"], m["dtype"], m["who"])
        r = recs.setdefault(key, {"problem": key[0], "dtype": key[1], "who": key[2], "kernels": []})
        per = int(m["n"]) / calls / (16 if m["who"].startswith("ours x16") else 1)
        r["kernels"].append([m["name"], float(m["us"]) * 1e-6, per])
    for r in recs.values():
        r["kernel_s"] = max(t for _, t, _ in r["kernels"])
        r["gpu_s"] = sum(t * c for _, t, c in r["kernels"])
    return list(recs.values())


def round_mantissa(x, bits: int):
    """``x`` with its mantissa rounded to ``bits`` bits after the leading one (same dtype)."""
    import jax.numpy as jnp

    m, e = jnp.frexp(x.astype(jnp.float32))  # x = m * 2^e, 0.5 <= |m| < 1
    scale = 2.0 ** (bits + 1)
    return jnp.ldexp(jnp.round(m * scale) / scale, e).astype(x.dtype)


def short(name: str) -> str:
    """A kernel's name without its return type, namespaces and parameter list."""
    return re.sub(r"^void |\w+::", "", name.split("(")[0])


def markdown(records: list[dict]) -> str:
    """One row per problem and dtype: our kernel (and in one jit), NATTEN's FNA kernel and
    its GPU time per call (permutations included), where measured; below, with backward
    records, a row per problem and dtype with each of our backward's kernels."""
    rows: dict[tuple[str, str], dict] = {}
    for r in records:
        rows.setdefault((r["problem"], r["dtype"]), {})[r["who"]] = r
    us = lambda s: f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.3f} ms"  # noqa: E731
    dense = any(r["who"] == "cudnn" for r in records)
    out = ["| problem | dtype | ours: kernel | ours: kernel, 16 in one jit | NATTEN: FNA kernel "
           "| NATTEN: GPU time per call | NATTEN kernel vs ours |" + (" cuDNN dense: GPU time per call |"
                                                                       if dense else ""),
           "| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if dense else "")]
    for (prob, dt), w in rows.items():
        o, o16, n, c = w.get("ours"), w.get("ours x16 in one jit"), w.get("natten"), w.get("cudnn")
        vs = f"{100 * (n['kernel_s'] / o['kernel_s'] - 1):+.1f}%" if o and n else "-"
        out.append(f"| {prob} | {dt} | {us(o['kernel_s']) if o else '-'} | "
                   f"{us(o16['kernel_s']) if o16 else '-'} | {us(n['kernel_s']) if n else '-'} | "
                   f"{us(n['gpu_s']) if n else '-'} | {vs} |"
                   + (f" {us(c['gpu_s']) if c else '-'} |" if dense else ""))
    bwd = [r for r in records if r["who"] == "ours bwd"]
    if bwd:
        out += ["", "| problem | dtype | our backward: kernels (median each, launches per call) "
                "| GPU time per call |", "| --- | --- | --- | --- |"]
        for r in bwd:
            ks = "; ".join(f"{short(name)} {us(t)}" + (f" x{per:g}" if per != 1 else "")
                           for name, t, per in r["kernels"])
            out.append(f"| {r['problem']} | {r['dtype']} | {ks} | {us(r['gpu_s'])} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--out", default=None, help="records as JSON (and a .md table beside it)")
    ap.add_argument("--from-text", default=None, help="measure nothing: records from printed lines")
    ap.add_argument("--cudnn", action="store_true", help="also cuDNN dense attention, same tensors")
    ap.add_argument("--backward", action="store_true", help="also our backward's kernels")
    ap.add_argument("--natten-best", action="store_true",
                    help="NATTEN: every configuration it lists, the fastest FNA kernel kept")
    ap.add_argument("--inputs", default="native", help="native, bf16 or mantissaN (module doc)")
    ap.add_argument("--warm-s", type=float, default=0.0,
                    help="seconds of back-to-back calls before each profile (sustained load: "
                         "the power cap) instead of one warm-up call")
    ap.add_argument("--batch", type=int, default=1, help="batch of every problem (labels say B<n> if not 1)")
    ap.add_argument("--head-dim", type=int, default=128,
                    help="head dim of every problem (labels say D<n> if not 128; NATTEN then not run)")
    ap.add_argument("problems", nargs="*")
    args = ap.parse_args(argv)

    def write(records):
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"calls": args.calls, "records": records}, f, indent=1)
            with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
                f.write(markdown(records))
        print(markdown(records), end="")

    if args.from_text:
        with open(args.from_text) as f:
            write(records_from_text(f.read(), args.calls))
        return 0
    probs = args.problems or ["32768", "2048", "2048", "1"]
    if len(probs) % 4:
        ap.error("problems come as shape window stride heads")
    m = re.fullmatch(r"native|bf16|mantissa([0-9]+)", args.inputs)
    if not m:
        ap.error(f"--inputs {args.inputs!r}: native, bf16 or mantissaN")
    mantissa_bits = int(m.group(1)) if m.group(1) is not None else None

    import jax  # before benchmarks.torch_peers, which defaults JAX_PLATFORMS to cpu
    import jax.numpy as jnp
    import numpy as np
    import torch

    from benchmarks.hopper_report import kernel_label
    from benchmarks.torch_peers import kernel_times as profile_kernels
    from jax_gna.bench import CHAIN, CHAIN_BELOW_S, Case, attention_fn, chained_fwd, pass_fn
    from profile_sm90 import parse, problem

    try:
        import natten
        from benchmarks.natten_peer import _call as natten_call
        from benchmarks.natten_peer import _cfg_str as cfg_str
        from benchmarks.natten_peer import _configs as natten_configs
    except ImportError:
        natten = None
    if args.batch != 1 or args.head_dim != 128:
        natten = None  # its peer code profiles batch 1, head dim 128
    dts = {"bf16": (jnp.bfloat16, torch.bfloat16), "fp16": (jnp.float16, torch.float16)}
    lines: list[str] = []

    def kernel_times(torch, fn, calls):
        """profile_kernels, after --warm-s seconds of back-to-back calls of ``fn``."""
        t_end = time.perf_counter() + args.warm_s
        while time.perf_counter() < t_end:
            for _ in range(8):
                fn()
            torch.cuda.synchronize()
        return profile_kernels(torch, fn, calls)

    def say(line: str) -> None:
        lines.append(line)
        print(line, flush=True)
    for i in range(0, len(probs), 4):
        shape, window, stride, heads = probs[i:i + 4]
        dims, win, st = parse(shape, window, stride)
        for dname in args.dtypes.split(","):
            jdt, tdt = dts[dname]
            # Drawn in the dtype itself, or in bf16 and cast (--inputs bf16); the same keys.
            op, qkv = problem(shape, window, stride, heads, jnp.bfloat16 if args.inputs == "bf16" else jdt,
                              batch=args.batch, head_dim=args.head_dim)
            qkv = tuple(x.astype(jdt) for x in qkv)
            if mantissa_bits is not None:
                qkv = tuple(round_mantissa(x, mantissa_bits) for x in qkv)
            f = jax.jit(op)
            label = (kernel_label(dims, win, st, heads) + (f" B{args.batch}" if args.batch != 1 else "")
                     + (f" D{args.head_dim}" if args.head_dim != 128 else "") + f" {dname}")
            runs = [("ours", kernel_times(torch, lambda: f(*qkv), args.calls))]
            # As the bench: forwards shorter than CHAIN_BELOW_S are also timed chained.
            if max(t for t, _ in runs[0][1].values()) < CHAIN_BELOW_S:
                assert CHAIN == 16, "the records name the chain 'ours x16 in one jit'"
                chained, cargs = chained_fwd(op, *qkv, ())
                g = jax.jit(chained)
                runs.append(("ours x16 in one jit", kernel_times(torch, lambda: g(*cargs), args.calls)))
            if args.backward:
                bwd, bargs = pass_fn(op, "bwd", *qkv, qkv[0], ())
                b = jax.jit(bwd)
                runs.append(("ours bwd", kernel_times(torch, lambda: b(*bargs), args.calls)))
            if args.cudnn:
                # The benchmark's cudnn peer (its case is not used: it only flattens the tokens).
                dense = jax.jit(attention_fn("cudnn", Case("p", (1,), 1, 128, (1,))))
                runs.append(("cudnn", kernel_times(torch, lambda: dense(*qkv), args.calls)))
            for tag, res in runs:
                for name, (t, per) in sorted(res.items(), key=lambda kv: -kv[1][0]):
                    say(f"{label} {tag}: {t * 1e6:9.1f} us x{round(per * args.calls)} {name[:160]}")
            if natten is not None:
                case = Case("p", dims, int(heads), 128, win, st)
                q, k, v = (torch.from_numpy(np.asarray(x.astype(jnp.float32))).to("cuda", tdt)
                           for x in qkv)

                best = None  # (FNA kernel s, config name, kernel records)
                for cfg in natten_configs(natten, q) if args.natten_best else [None]:
                    def nat(cfg=cfg):
                        with torch.no_grad():
                            return natten_call(natten, case, q, k, v, cfg)
                    try:
                        kt = kernel_times(torch, nat, args.calls)
                    except Exception as e:  # noqa: BLE001 - a configuration this build stubs
                        print(f"{label} natten config {cfg_str(cfg)} failed: "
                              f"{str(e).splitlines()[0][:120] if str(e) else type(e).__name__}")
                        continue
                    t_fna = max(t for t, _ in kt.values())
                    print(f"{label} natten config {cfg_str(cfg)}: FNA kernel {t_fna * 1e6:.1f} us")
                    if best is None or t_fna < best[0]:
                        best = (t_fna, cfg_str(cfg), kt)
                if best is not None:
                    say(f"{label} natten config used: {best[1]}")
                    for name, (t, per) in sorted(best[2].items(), key=lambda kv: -kv[1][0]):
                        say(f"{label} natten: {t * 1e6:9.1f} us x{round(per * args.calls)} {name[:160]}")
                q = k = v = None
            jax.clear_caches()
    write(records_from_text("\n".join(lines), args.calls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
