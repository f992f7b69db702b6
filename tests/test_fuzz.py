"""scripts/fuzz_gpu.py on the CPU: its draws are problems SEMANTICS.md accepts, and its
comparison passes correct kernels and catches wrong ones (the xla backend standing in
for the two CUDA calls)."""

from __future__ import annotations

import importlib.util
import os

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
