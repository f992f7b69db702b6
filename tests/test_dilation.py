"""The dilation fold (jax_gna.dilation): dilated problems as undilated pieces.

The fold is backend-independent, so it is checked here with the ``xla`` backend in
float64 against the NumPy brute force; the cuda backend's choice to fold and its
lowering (one kernel call per piece) are checked without a GPU too.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jax_gna import cuda, dilation, reference, xla
from jax_gna.params import Problem

import kernel_fakes

CASES = [
    # shape, kernel_size, stride, dilation, causal
    ((10,), (3,), (1,), (3,), (False,)),            # 10 % 3 = 1: groups of 4, 3, 3
    ((12,), (4,), (4,), (3,), (True,)),             # divisible: one piece
    ((11, 9), (3, 2), (2, 1), (2, 4), (True, False)),
    ((9, 8), (4, 2), (1, 2), (2, 1), (False, False)),  # one axis undilated
    ((7, 9, 8), (2, 3, 2), (1, 3, 2), (3, 2, 4), (False, True, False)),
]


def _problem(case, scale=0.3) -> Problem:
    shape, k, s, d, c = case
    return Problem(shape=shape, kernel_size=k, stride=s, dilation=d, is_causal=c, scale=scale)


@pytest.mark.parametrize("case", CASES)
def test_gather_scatter_round_trip(case):
    p = _problem(case)
    rng = np.random.default_rng(0)
    for tail in [(3, 4), (3,)]:  # q/k/v/out and lse
        x = jnp.asarray(rng.standard_normal((2, *p.shape, *tail)), jnp.float32)
        parts = dilation.gather(x, p)
        subs = dilation.pieces(p)
        assert len(parts) == len(subs) == math.prod(1 + (n % d != 0) for n, d in zip(p.shape, p.dilation))
        for part, (kinds, sub) in zip(parts, subs):
            groups = math.prod(d if n % d == 0 else (n % d if kind == dilation.LONG else d - n % d)
                               for n, d, kind in zip(p.shape, p.dilation, kinds))
            assert part.shape == (groups * 2, *sub.shape, *tail)
            assert sub.dilation == (1,) * p.rank and sub.is_whole
            assert (sub.kernel_size, sub.stride, sub.is_causal, sub.scale) == (
                p.kernel_size, p.stride, p.is_causal, p.scale)
        assert np.array_equal(np.asarray(dilation.scatter(parts, p)), np.asarray(x))


@pytest.mark.parametrize("case", CASES)
def test_pieces_hold_the_groups(case):
    """Each piece's rows are the tokens of its groups, in group order: piece entry
    (group g, batch b, index j) is token ``j * d + g`` on every axis."""
    p = _problem(case)
    index = np.indices(p.shape)  # the coordinates themselves as data: [rank, *shape]
    x = jnp.asarray(np.moveaxis(index, 0, -1)[None], jnp.int32)  # [1, *shape, rank]
    for part, (kinds, sub) in zip(dilation.gather(x, p), dilation.pieces(p)):
        starts = [0 if n % d == 0 or kind == dilation.LONG else n % d
                  for n, d, kind in zip(p.shape, p.dilation, kinds)]
        counts = [d if n % d == 0 else (n % d if kind == dilation.LONG else d - n % d)
                  for n, d, kind in zip(p.shape, p.dilation, kinds)]
        got = np.asarray(part).reshape(*counts, *sub.shape, p.rank)
        for g in np.ndindex(*counts):
            for j in np.ndindex(*sub.shape):
                want = [(ji) * d + (g0 + gi) for ji, d, g0, gi in zip(j, p.dilation, starts, g)]
                assert list(got[g + j]) == want, (g, j)
                assert all(w < n for w, n in zip(want, p.shape))


@pytest.mark.parametrize("case", CASES)
def test_fold_matches_brute_force_float64(case):
    p = _problem(case)
    rng = np.random.default_rng(1)
    b, h, h_kv, d, d_v = 2, 4, 2, 8, 6
    q = rng.standard_normal((b, *p.shape, h, d))
    k = rng.standard_normal((b, *p.shape, h_kv, d))
    v = rng.standard_normal((b, *p.shape, h_kv, d_v))
    d_out = rng.standard_normal((b, *p.shape, h, d_v))
    d_lse = rng.standard_normal((b, *p.shape, h))
    ref_out, ref_lse, ref_grads = reference.attention(
        q, k, v, p.kernel_size, p.stride, p.dilation, p.is_causal, p.scale, d_out=d_out,
        d_lse=d_lse)
    with jax.enable_x64(True):
        f = jax.jit(lambda q, k, v: dilation.attention(xla.attention, q, k, v, p))
        (out, lse), vjp = jax.vjp(f, q, k, v)
        grads = vjp((jnp.asarray(d_out), jnp.asarray(d_lse)))
        saved = jax.jit(lambda *a: dilation.backward(xla.attention.backward, *a, p))(
            q, k, v, out, lse, d_out, d_lse)
    for name, got, want in [("out", out, ref_out), ("lse", lse, ref_lse)] + list(
            zip(("dq", "dk", "dv"), grads, ref_grads)) + list(
            zip(("dq saved", "dk saved", "dv saved"), saved, ref_grads)):
        got = np.asarray(got)
        assert got.shape == want.shape, name
        assert np.abs(got - want).max() <= 1e-10 * max(np.abs(want).max(), 1.0), name


def test_fold_groups_is_gather_of_one_piece():
    """Every axis a multiple of its dilation: fold_groups is gather's single piece, and
    unfold_groups inverts it (q/k/v/out and lse layouts)."""
    p = Problem(shape=(6, 4, 9), kernel_size=(2, 2, 3), stride=(1, 1, 1), dilation=(3, 2, 3),
                is_causal=(False,) * 3, scale=1.0)
    rng = np.random.default_rng(1)
    for tail in [(3, 4), (3,)]:
        x = jnp.asarray(rng.standard_normal((2, *p.shape, *tail)), jnp.float32)
        (piece,) = dilation.gather(x, p)
        folded = dilation.fold_groups(x, p.dilation)
        assert np.array_equal(np.asarray(folded), np.asarray(piece))
        assert np.array_equal(np.asarray(dilation.unfold_groups(folded, p.dilation, 2)), np.asarray(x))


def test_pieces_need_the_whole_grid():
    p = _problem(CASES[2]).replace(q_origin=(2, 0), q_extent=(9, 9))
    with pytest.raises(ValueError, match="whole grid"):
        dilation.pieces(p)


# ---------------------------------------------------------------------------
# The cuda backend's use of the fold (no GPU needed: the decision and the lowering).
# ---------------------------------------------------------------------------

def _hopper(monkeypatch):
    """Pretend the visible GPU is a compute capability 9.0 one."""
    monkeypatch.setattr(cuda, "_compute_capability", lambda: "9.0")
    for name in ("JAX_GNA_SM90", "JAX_GNA_FOLD_DILATION"):
        monkeypatch.delenv(name, raising=False)


BIG = Problem(shape=(41, 46), kernel_size=(9, 15), stride=(1, 2), dilation=(2, 3),
              is_causal=(False, True), scale=0.125)   # 4 pieces, 20-21 x 15-16: 8 x 16 tiles
Q, V = (1, 41, 46, 4, 64), (1, 41, 46, 2, 64)


def test_fold_decision(monkeypatch):
    _hopper(monkeypatch)
    assert cuda.fold_dilation(BIG, Q, V, jnp.bfloat16) == (True, True)
    assert "layout transform" in cuda.kernel_path(BIG, Q, V, jnp.bfloat16)
    small = BIG.replace(kernel_size=(5, 7))  # 35 keys: only the backward folds
    assert cuda.fold_dilation(small, Q, V, jnp.bfloat16) == (False, True)
    assert cuda.kernel_path(small, Q, V, jnp.bfloat16).startswith("forward: sm80 kernels (a window")
    monkeypatch.setenv("JAX_GNA_FOLD_DILATION", "always")
    assert cuda.fold_dilation(small, Q, V, jnp.bfloat16) == (True, True)
    monkeypatch.delenv("JAX_GNA_FOLD_DILATION")
    d256 = (Q[:-1] + (256,), V[:-1] + (256,))
    assert cuda.fold_dilation(BIG, *d256, jnp.bfloat16) == (True, False)  # sm80 backward
    text = cuda.kernel_path(BIG, *d256, jnp.bfloat16)
    assert "backward: sm80 kernels, on the pieces" in text and "(head dim 256)" in text, text
    no = [
        (BIG.replace(dilation=(1, 1)), Q, V, jnp.bfloat16),               # nothing to fold
        (BIG.replace(q_origin=(4, 0), q_extent=(20, 46)), Q, V, jnp.bfloat16),  # a shard
        (BIG, Q, V, jnp.float32),                                         # sm80-only dtype
        (BIG, Q[:-1] + (32,), V[:-1] + (32,), jnp.float16),               # head dim 32
        (BIG.replace(shape=(16, 18), q_extent=(16, 18), kv_extent=(16, 18), kernel_size=(5, 5)),
         (1, 16, 18, 4, 64), (1, 16, 18, 2, 64), jnp.float16),            # 8 x 6 pieces
        (BIG, (358 << 20, 41, 46, 4, 64), (358 << 20, 41, 46, 2, 64), jnp.float16),  # 6 x that >= 2^31
    ]
    for args in no:
        assert cuda.fold_dilation(*args) == (False, False), args[0]
    # 6 x 11000 groups above 65535 (CUDA's largest grid z): folded, in several launches
    assert cuda.fold_dilation(BIG, (11000,) + Q[1:], (11000,) + V[1:], jnp.float16) == (True, True)
    monkeypatch.setenv("JAX_GNA_SM90_BWD", "0")
    assert cuda.fold_dilation(BIG, Q, V, jnp.bfloat16) == (True, False)
    monkeypatch.delenv("JAX_GNA_SM90_BWD")
    for name, value in (("JAX_GNA_FOLD_DILATION", "0"), ("JAX_GNA_SM90", "0")):
        monkeypatch.setenv(name, value)
        assert cuda.fold_dilation(BIG, Q, V, jnp.bfloat16) == (False, False)
        assert "dilation" in cuda.kernel_path(BIG, Q, V, jnp.bfloat16)
        monkeypatch.delenv(name)
    monkeypatch.setattr(cuda, "_compute_capability", lambda: "8.0")
    assert cuda.fold_dilation(BIG, Q, V, jnp.bfloat16) == (False, False)


def test_sharded_fold_decision(monkeypatch):
    """Spatially sharded: the shards fold (jax_gna.sharding._fold_for) where each holds
    whole dilation groups and the kernels' rules (cuda.attention.fold_shards, the shards'
    folded problems) allow it."""
    from jax_gna import sharding

    _hopper(monkeypatch)
    big = BIG.replace(shape=(40, 48), q_extent=(40, 48), kv_extent=(40, 48))
    plans = (sharding.plan_axis(big, 0, "x", 2),)
    local = jax.ShapeDtypeStruct((1, 20, 48, 4, 64), jnp.bfloat16)
    folded, fplans = sharding._fold_for(cuda.attention, big, plans, local, local, "forward")
    assert folded.shape == (20, 16) and folded.dilation == (1, 1) and folded.is_whole
    assert ((folded.kernel_size, folded.stride, folded.is_causal)
            == (big.kernel_size, big.stride, big.is_causal))
    assert fplans[0].size == 10 and fplans[0].shards == 2
    small = big.replace(kernel_size=(5, 7))  # 35 keys: the forward keeps the dilation
    assert sharding._fold_for(cuda.attention, small, (sharding.plan_axis(small, 0, "x", 2),),
                              local, local, "forward") is None
    for pass_ in ("backward", "forward+backward"):
        assert sharding._fold_for(cuda.attention, small, (sharding.plan_axis(small, 0, "x", 2),),
                                  local, local, pass_) is not None
    # shards of 10 rows are not whole groups of 4; 41 rows are not whole groups of 2
    odd = big.replace(dilation=(4, 3), kernel_size=(5, 15))
    assert sharding._fold_for(cuda.attention, odd, (sharding.plan_axis(odd, 0, "x", 4),),
                              local, local, "forward") is None
    odd = BIG.replace(shape=(40, 46), q_extent=(40, 46), kv_extent=(40, 46))
    assert sharding._fold(odd, (sharding.plan_axis(odd, 0, "x", 2),), local.shape) is None
    f32 = jax.ShapeDtypeStruct(local.shape, jnp.float32)
    assert sharding._fold_for(cuda.attention, big, plans, f32, f32, "forward") is None
    assert sharding._fold_for(xla.attention, big, plans, f32, f32, "forward") is not None
    monkeypatch.setattr(cuda, "_compute_capability", lambda: "8.0")
    assert sharding._fold_for(cuda.attention, big, plans, local, local, "forward") is None


def _lower(fn, *args) -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("fold", [True, False, "undilated"])
def test_fold_lowers_to_one_call_per_piece(monkeypatch, fold):
    _hopper(monkeypatch)
    monkeypatch.delenv("JAX_GNA_SM90_BWD", raising=False)
    if not fold:
        monkeypatch.setenv("JAX_GNA_FOLD_DILATION", "0")
    problem = BIG.replace(dilation=(1, 1)) if fold == "undilated" else BIG
    q = jnp.zeros(Q, jnp.bfloat16)
    k = v = jnp.zeros(V, jnp.bfloat16)

    def loss(q, k, v):
        out, lse = cuda.attention(q, k, v, problem)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

    text = _lower(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
    calls = re.findall(r'custom_call @(jax_gna_\w+)\(.*?dilation = (?:array<i64: ([-0-9, ]+)>|dense<([^>]*)>)',
                       text)
    n = 4 if fold is True else 1
    assert len(dilation.pieces(BIG)) == 4
    assert sorted(c for c, _, _ in calls) == ["jax_gna_bwd"] * n + ["jax_gna_fwd"] * n, calls
    assert f"kv_extent = dense<[{', '.join(map(str, Q[1:3]))}]>" in text or fold is True
    if fold == "undilated":
        return
    want = "1" if fold else "2, 3"
    assert all((a or b).strip("[]") == want for _, a, b in calls), calls
    # The backend backward protocol (saved out and lse) folds the same way.
    out = jnp.zeros(Q[:-1] + (64,), jnp.bfloat16)
    lse = jnp.zeros(Q[:-1], jnp.float32)
    text = _lower(lambda *a: cuda.attention.backward(*a, BIG), q, k, v, out, lse, out, lse)
    assert text.count("custom_call @jax_gna_bwd") == n


def test_small_window_folds_the_forward_only_when_differentiated(monkeypatch):
    """A window under FOLD_FORWARD_MIN_KEYS: an inference forward runs one dilated call; a
    differentiated one runs as pieces, and the backward on them."""
    _hopper(monkeypatch)
    monkeypatch.delenv("JAX_GNA_SM90_BWD", raising=False)
    small = BIG.replace(kernel_size=(5, 7))
    q = jnp.zeros(Q, jnp.bfloat16)
    k = v = jnp.zeros(V, jnp.bfloat16)
    text = _lower(lambda q, k, v: cuda.attention(q, k, v, small), q, k, v)
    assert text.count("custom_call @jax_gna_fwd") == 1 and "dilation = dense<[2, 3]>" in text

    def loss(q, k, v):
        out, lse = cuda.attention(q, k, v, small)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

    text = _lower(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
    assert text.count("custom_call @jax_gna_fwd") == 4 and text.count("custom_call @jax_gna_bwd") == 4
    assert "dilation = dense<[2, 3]>" not in text


def _fake_kernels(monkeypatch, calls):
    """The cuda backend's own fold, custom_vjp and delta on the CPU: its two kernel calls
    replaced by the xla backend (``kernel_fakes``), every dtype admitted to the Hopper
    path, and the GPU pretended."""
    kernel_fakes.xla_kernel_calls(monkeypatch, lambda kind, q, p, n: calls.append(
        (kind, p.dilation, q.shape)))
    _hopper(monkeypatch)
    monkeypatch.delenv("JAX_GNA_SM90_BWD", raising=False)
    monkeypatch.setattr(cuda, "_hopper_blockers", lambda *a: [])


@pytest.mark.parametrize("fold_inference", [True, False])
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[4]])
def test_cuda_fold_matches_brute_force(monkeypatch, case, fold_inference):
    """cuda.attention's folded passes (inference forward folded or not, differentiated
    forward and backward, the saved-output backward) against the float64 brute force."""
    p = _problem(case)
    monkeypatch.setattr(cuda, "FOLD_FORWARD_MIN_KEYS", 1 if fold_inference else 10 ** 9)
    calls = []
    _fake_kernels(monkeypatch, calls)
    rng = np.random.default_rng(2)
    b, h, h_kv, d, d_v = 2, 4, 2, 64, 6  # head dim 64: the Hopper backward's
    q = rng.standard_normal((b, *p.shape, h, d))
    k = rng.standard_normal((b, *p.shape, h_kv, d))
    v = rng.standard_normal((b, *p.shape, h_kv, d_v))
    d_out = rng.standard_normal((b, *p.shape, h, d_v))
    d_lse = rng.standard_normal((b, *p.shape, h))
    ref = reference.attention(q, k, v, p.kernel_size, p.stride, p.dilation, p.is_causal,
                              p.scale, d_out=d_out, d_lse=d_lse)
    n = len(dilation.pieces(p))
    with jax.enable_x64(True):
        assert cuda.fold_dilation(p, q.shape, v.shape, q.dtype)[1]
        out, lse = cuda.attention(q, k, v, p)
        if fold_inference:
            assert len(calls) == n and all(c[1] == (1,) * p.rank for c in calls), calls
        else:
            assert [c[1] for c in calls] == [p.dilation], calls
        calls.clear()
        (out2, lse2), vjp = jax.vjp(lambda q, k, v: cuda.attention(q, k, v, p), q, k, v)
        grads = vjp((d_out, d_lse))
        assert sorted(c[0] for c in calls) == ["bwd"] * n + ["fwd"] * n, calls
        saved = cuda.attention.backward(q, k, v, out, lse, d_out, d_lse, p)
    got = [out, lse, out2, lse2, *grads, *saved]
    want = [ref[0], ref[1], ref[0], ref[1], *ref[2], *ref[2]]
    for i, (a, w) in enumerate(zip(got, want)):
        # The backward's delta = rowsum(dO * O) - d_lse is float32 by design: fp32 errors.
        tol = 1e-10 if i < 4 else 1e-5
        assert a.shape == w.shape, i
        assert np.abs(np.asarray(a) - w).max() <= tol * max(np.abs(w).max(), 1.0), i


def test_fold_needs_one_batch_axis(monkeypatch):
    _hopper(monkeypatch)
    assert cuda.fold_dilation(BIG, Q, V, jnp.bfloat16) == (True, True)
    assert cuda.fold_dilation(BIG, (2,) + Q, (2,) + V, jnp.bfloat16) == (False, False)
