"""scripts/fuzz_gpu.py on the CPU: its draws are problems SEMANTICS.md accepts (with
layouts that split evenly over the devices), and its comparison passes correct kernels
and catches wrong ones (the xla backend standing in for the two CUDA calls), on one
device and sharded over two CPU devices."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jax_gna import cuda, xla
from jax_gna.params import Problem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fuzz():
    spec = importlib.util.spec_from_file_location("fuzz_gpu", os.path.join(ROOT, "scripts", "fuzz_gpu.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_draws_are_valid_problems(fuzz):
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(3000):
        c = fuzz.draw(rng)
        Problem(shape=tuple(c["shape"]), kernel_size=tuple(c["kernel_size"]), stride=tuple(c["stride"]),
                dilation=tuple(c["dilation"]), is_causal=tuple(c["is_causal"]), scale=1.0)  # raises if not
        assert np.prod(c["shape"]) <= fuzz.MAX_TOKENS[len(c["shape"])]
        assert c["dim"] % 8 == 0 and c["dim_v"] % 8 == 0 and c["heads"] % c["kv_heads"] == 0
        seen.add((len(c["shape"]), max(c["dilation"]) > 1, any(c["is_causal"]), c["dtype"]))
    assert len(seen) == 3 * 2 * 2 * 3  # every rank x dilated x causal x dtype combination


def test_sharded_draws_split_evenly(fuzz):
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(3000):
        c = fuzz.draw(rng, 2)
        Problem(shape=tuple(c["shape"]), kernel_size=tuple(c["kernel_size"]), stride=tuple(c["stride"]),
                dilation=tuple(c["dilation"]), is_causal=tuple(c["is_causal"]), scale=1.0)
        layout, fold = c["layout"], None
        if layout == "batch":
            assert c["batch"] % 2 == 0
        elif layout == "heads":
            assert c["kv_heads"] % 2 == 0 and c["heads"] % c["kv_heads"] == 0
        else:
            a = int(layout[len("context"):])
            n, d = c["shape"][a], c["dilation"][a]
            assert n % 2 == 0, c
            fold = (n // 2) % d == 0 if d > 1 else None
        seen.add((layout.rstrip("0123456789"), fold, c["extra"] > 0))
    # every layout with and without global tokens; dilated shards of whole groups and not
    assert seen >= {(k, None, e) for k in ("batch", "heads", "context") for e in (False, True)}
    assert {(c, f) for c, f, _ in seen if f is not None} == {("context", True), ("context", False)}


CASE = dict(shape=[13, 10], kernel_size=[5, 4], stride=[2, 1], dilation=[1, 2], is_causal=[False, True],
            batch=2, heads=4, kv_heads=2, dim=16, dim_v=24, dtype="float32", grads=True, seed=3)


@pytest.mark.parametrize("broken", [None, "out", "grad"])
def test_run_case_checks_against_the_brute_force(fuzz, monkeypatch, broken):
    import jax

    def kernels(q, k, v, problem):
        out, lse = xla.attention(q, k, v, problem)
        if broken == "out":  # one query's output off by a little
            out = out.at[:, 3, 4].add(1e-2)
        if broken == "grad":  # forward right, the gradient into q scaled
            out = out + (jax.lax.stop_gradient(q[..., :1]) - q[..., :1]) * 1e-3
        return out, lse

    monkeypatch.setattr(cuda, "_attention_poisoned", kernels)
    monkeypatch.setattr(cuda, "unsupported_reason", lambda *a: None)
    res = fuzz.run_case(CASE)
    assert res["ok"] == (broken is None), res
    if broken == "grad":
        assert res["errs"]["out"] < 1e-6 and res["errs"]["dq"] > 5e-5, res
    assert fuzz.path_class(res["path"]) == "sm80"  # no CUDA GPU here


def test_switches_are_drawn_per_case_seed(fuzz):
    """About a quarter of the cases force several query tiles per CTA, and a quarter
    pairs, to values the host reads; the same seed gives the same switches, and a drawn
    case carries them."""
    envs = [fuzz.switches(s) for s in range(2000)]
    forced = [e for e in envs if e and "JAX_GNA_FWD_PAIR" not in e]
    pairs = [e for e in envs if e and "JAX_GNA_FWD_PAIR" in e]
    assert 0.2 < len(forced) / len(envs) < 0.3 and 0.2 < len(pairs) / len(envs) < 0.3
    assert {e["JAX_GNA_FWD_ITEMS"] for e in forced} == {"2", "3", "8"}
    assert {e.get("JAX_GNA_FWD_KEYS") for e in forced} == {None, "64", "128"}
    assert all(e == {"JAX_GNA_FWD_ITEMS": "1", "JAX_GNA_FWD_PAIR": "force"} for e in pairs)
    assert all(fuzz.switches(s) == envs[s] for s in range(0, 2000, 97))
    rng = np.random.default_rng(5)
    cases = [fuzz.draw(rng) for _ in range(200)]
    assert all(c.get("env", {}) == fuzz.switches(c["seed"]) for c in cases)
    assert any("env" in c for c in cases)
    paired = [c for c in cases if c.get("env") == fuzz.PAIR_FORCE]
    assert paired and all(c["dim"] == c["dim_v"] == 128 and c["dtype"] != "float32" for c in paired)
    # about half of their axes: a non-causal window over the whole axis
    full = [c["kernel_size"][a] * c["dilation"][a] > c["shape"][a] - c["dilation"][a] and not c["is_causal"][a]
            for c in paired for a in range(len(c["shape"]))]
    assert 0.35 < np.mean(full) < 0.8


def test_run_case_sets_its_switches_while_it_runs(fuzz, monkeypatch):
    seen = []

    def kernels(q, k, v, problem):
        seen.append((os.environ.get("JAX_GNA_FWD_ITEMS"), os.environ.get("JAX_GNA_FWD_KEYS")))
        return xla.attention(q, k, v, problem)

    monkeypatch.setattr(cuda, "_attention_poisoned", kernels)
    monkeypatch.setattr(cuda, "unsupported_reason", lambda *a: None)
    monkeypatch.delenv("JAX_GNA_FWD_ITEMS", raising=False)
    monkeypatch.setenv("JAX_GNA_FWD_KEYS", "128")
    res = fuzz.run_case(dict(CASE, grads=False, env={"JAX_GNA_FWD_ITEMS": "3", "JAX_GNA_FWD_KEYS": "64"}))
    assert res["ok"] and seen and set(seen) == {("3", "64")}, (res, seen)
    assert "JAX_GNA_FWD_ITEMS" not in os.environ and os.environ["JAX_GNA_FWD_KEYS"] == "128"


@pytest.mark.parametrize("kernel", ["pairs", "none", "broken"])
def test_run_case_retries_a_refused_pair_force(fuzz, monkeypatch, kernel):
    """A case with JAX_GNA_FWD_PAIR=force whose forward runs no pair kernel (the host
    refuses it "not supported") runs again without that switch and says so; any other
    error is not retried."""
    seen = []

    def kernels(q, k, v, problem):
        forced = os.environ.get("JAX_GNA_FWD_PAIR")
        seen.append((forced, os.environ.get("JAX_GNA_FWD_ITEMS")))
        if forced == "force" and kernel == "none":
            raise RuntimeError("gna forward: operation not supported")
        if kernel == "broken":
            raise RuntimeError("gna forward: an illegal memory access was encountered")
        return xla.attention(q, k, v, problem)

    monkeypatch.setattr(cuda, "_attention_poisoned", kernels)
    monkeypatch.setattr(cuda, "unsupported_reason", lambda *a: None)
    monkeypatch.delenv("JAX_GNA_FWD_PAIR", raising=False)
    case = dict(CASE, grads=False, env=dict(fuzz.PAIR_FORCE))
    if kernel == "broken":
        with pytest.raises(RuntimeError, match="illegal memory access"):
            fuzz.run_case(case)
        assert seen == [("force", "1")]
    else:
        res = fuzz.run_case(case)
        assert res["ok"] and res["pair_force"] == ("passed" if kernel == "pairs" else "refused"), res
        assert seen == [("force", "1")] + ([(None, "1")] if kernel == "none" else [])
    assert "JAX_GNA_FWD_PAIR" not in os.environ


def test_hopper_forward_reads_the_path(fuzz):
    """The fuzz labels a forced pair case "(pairs)" only where the forward reached the
    Hopper kernels: cuda.kernel_path's sentences on this CPU-only machine say sm80, so
    they are written out here as the module writes them."""
    where = "on this compute capability 9.0 GPU"
    assert fuzz.hopper_forward(f"forward and backward: Hopper kernels (TMA + wgmma) {where}", False)
    assert fuzz.hopper_forward(f"forward: Hopper kernel (TMA + wgmma) {where}; backward: sm80 kernels (head dim 256)",
                               False)
    small = ("forward: sm80 kernels (a window of fewer than 128 keys), or, when differentiated, the Hopper "
             f"kernel {where}, as undilated pieces; backward: Hopper kernels {where}, as undilated pieces")
    assert fuzz.hopper_forward(small, True) and not fuzz.hopper_forward(small, False)
    assert not fuzz.hopper_forward("forward and backward: sm80 kernels (Hopper forward not applicable: "
                                   "dtype float32)", True)


# Run in a subprocess: two CPU devices need XLA_FLAGS before jax starts.
SHARDED = r"""
import importlib.util, json, sys
import jax, jax.numpy as jnp
from jax_gna import xla
spec = importlib.util.spec_from_file_location("fuzz_gpu", sys.argv[1])
fuzz = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fuzz)
base = dict(batch=2, heads=4, kv_heads=2, dim=16, dim_v=24, dtype="float32", grads=True, seed=5, extra=0)
cases = {
    # dilated shards of whole groups (they fold), global tokens replicated
    "fold": dict(base, shape=[16, 12], kernel_size=[3, 4], stride=[2, 1], dilation=[2, 1],
                 is_causal=[False, True], layout="context0", extra=7),
    # a dilated shard of 9 rows, groups of 2: not whole, tiled dilated
    "partial": dict(base, shape=[7, 18], kernel_size=[3, 5], stride=[1, 2], dilation=[1, 2],
                    is_causal=[True, False], layout="context1"),
    "batch": dict(base, shape=[20], kernel_size=[9], stride=[3], dilation=[2], is_causal=[False],
                  layout="batch", extra=3),
    "heads": dict(base, shape=[6, 5, 8], kernel_size=[3, 2, 4], stride=[1, 1, 2],
                  dilation=[1, 2, 1], is_causal=[False, False, True], layout="heads"),
}

def broken(q, k, v, problem):  # one query row of every shard's output off by 1e-2
    out, lse = xla.attention(q, k, v, problem)
    return out.at[:, 1].add(1e-2), lse

res = {n: fuzz.run_case(c, xla.attention, jax.devices()) for n, c in cases.items()}
res["broken"] = fuzz.run_case(cases["fold"], broken, jax.devices())
print(json.dumps(res))
"""


def test_sharded_run_case_on_two_cpu_devices():
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                                      + " --xla_force_host_platform_device_count=2").strip(),
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SHARDED, os.path.join(ROOT, "scripts", "fuzz_gpu.py")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("fold", "partial", "batch", "heads"):
        assert res[name]["ok"], (name, res[name])
        assert res[name]["worst"] < 0.1, (name, res[name])  # float32 against float64: far inside
    assert res["fold"]["shards_fold"] is True and res["partial"]["shards_fold"] is False
    assert set(res["fold"]["errs"]) == {"out", "lse", "dq", "dk", "dv", "d_extra_k", "d_extra_v"}
    assert not res["broken"]["ok"] and res["broken"]["errs"]["out"] > 1e-4, res["broken"]
