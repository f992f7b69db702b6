"""GPU checks of the cuda backend against the xla backend (float32 reference).

Marked ``gpu``; skipped without a CUDA GPU or without the compiled library. Every
kernel run here starts from output buffers poisoned with NaN (the backward's dK / dV
with +inf / -inf; the ``_aliased`` targets), so an element the kernels fail to write
shows up as NaN or inf.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jax_gna import cuda, mask, xla
from jax_gna.params import Problem

from gpu_checks import TOL, assert_close_bf16, fwd_bwd, rel as _rel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cuda.available(), reason=f"cuda backend unavailable: {cuda.unavailable_reason()}"),
]

_seed = [1000]


def _key():
    _seed[0] += 1
    return jax.random.PRNGKey(_seed[0])


def _problem(shape, k, s=1, d=1, c=False, scale=None, dim=64, **kw):
    n = len(shape)
    tup = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x,) * n  # noqa: E731
    return Problem(shape=tuple(shape), kernel_size=tup(k), stride=tup(s), dilation=tup(d),
                   is_causal=tuple(bool(x) for x in tup(c)),
                   scale=dim ** -0.5 if scale is None else scale, **kw)


def _inputs(problem, b, h, h_kv, d, d_v, dtype):
    kq, kk, kv, kw, ku = jax.random.split(_key(), 5)
    q = jax.random.normal(kq, (b, *problem.q_extent, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (b, *problem.kv_extent, h_kv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (b, *problem.kv_extent, h_kv, d_v), jnp.float32).astype(dtype)
    w = jax.random.normal(kw, (b, *problem.q_extent, h, d_v), jnp.float32)
    u = jax.random.normal(ku, (b, *problem.q_extent, h), jnp.float32)
    return q, k, v, w, u


def _reference(q, k, v, problem):
    return xla.attention(q, k, v, problem, fold_dilation=False)


def _check(problem, b=2, h=2, h_kv=None, d=64, d_v=None, dtype=jnp.float16, grads=True,
           signed_rows=False):
    h_kv = h if h_kv is None else h_kv
    d_v = d if d_v is None else d_v
    q, k, v, w, u = _inputs(problem, b, h, h_kv, d, d_v, dtype)
    if signed_rows:
        # Keys with positive entries; each query all-negative, all-positive or as drawn:
        # a third of the rows see only negative scores, a third only positive ones.
        k = jnp.abs(k)
        mode = jax.random.randint(_key(), q.shape[:-1] + (1,), 0, 3)
        q = jnp.where(mode == 0, -jnp.abs(q), jnp.where(mode == 1, jnp.abs(q), q))
    t_out, t_lse, t_grad = TOL[dtype]

    def loss(fn, q, k, v):
        out, lse = fn(q, k, v, problem)
        return jnp.sum(out.astype(jnp.float32) * w) + jnp.sum(lse * u), (out, lse)

    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    # The reference tiles dilation directly, so the kernels' dilation fold is checked
    # against code that shares none of it.
    ref_fn = jax.jit(jax.value_and_grad(
        lambda q, k, v: loss(_reference, f32(q), f32(k), f32(v)), argnums=(0, 1, 2), has_aux=True))
    (_, (ro, rl)), rg = ref_fn(q, k, v)
    if grads:
        fn = jax.jit(jax.value_and_grad(
            lambda q, k, v: loss(cuda._attention_poisoned, q, k, v), argnums=(0, 1, 2), has_aux=True))
        (_, (o, l)), g = fn(q, k, v)
    else:
        o, l = jax.jit(lambda q, k, v: cuda._attention_poisoned(q, k, v, problem))(q, k, v)
    assert o.dtype == dtype and o.shape == ro.shape and l.dtype == jnp.float32 and l.shape == rl.shape
    e_o, e_l = _rel(o, ro), _rel(l, rl)
    errs = {"out": e_o, "lse": e_l}
    assert e_o < t_out, errs
    assert e_l < t_lse, errs
    if grads:
        for name, a, r in zip(("dq", "dk", "dv"), g, rg):
            assert a.dtype == dtype and a.shape == r.shape
            errs[name] = _rel(a, r)
            assert errs[name] < t_grad, errs
    print(errs)
    log = os.environ.get("JAX_GNA_TEST_LOG")
    if log:  # one line per check (gpu_check.sh collects them, also under pytest-xdist)
        name = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(log, "a") as f:
            f.write(f"{name} {np.dtype(dtype).name} " + " ".join(f"{k}={v:.2e}" for k, v in errs.items()) + "\n")
    return errs


# ---------------------------------------------------------------------------
# Parameter coverage (ranks, kernels, strides, dilations, causal, GQA, D_v != D).
# ---------------------------------------------------------------------------

CASES = [
    # shape, k, s, d, causal, (b, h, h_kv, d, d_v), dtype
    ((100,), 7, 1, 1, False, (2, 2, 2, 64, 64), jnp.float16),
    ((97,), 8, 3, 2, True, (2, 4, 2, 32, 32), jnp.bfloat16),
    ((300,), 16, 16, 1, True, (1, 2, 1, 64, 64), jnp.float16),
    ((129,), 33, 5, 3, False, (1, 3, 1, 128, 64), jnp.float32),
    ((20, 23), (5, 4), (2, 1), (1, 2), (False, True), (2, 4, 1, 128, 64), jnp.float16),
    ((16, 16), 16, 1, 1, False, (1, 2, 2, 32, 32), jnp.float32),
    ((18, 17), (3, 6), (3, 6), (2, 1), (True, False), (1, 2, 2, 64, 128), jnp.bfloat16),
    ((6, 9, 10), (3, 4, 5), (1, 2, 3), (2, 1, 2), (True, False, True), (1, 2, 2, 64, 64), jnp.bfloat16),
    ((5, 8, 8), 3, 1, 1, False, (2, 2, 1, 128, 32), jnp.float32),
    ((8, 12, 10), (2, 3, 4), (2, 3, 4), 1, (False, True, False), (1, 4, 2, 32, 32), jnp.float16),
    ((12, 12), 5, 1, 1, False, (1, 2, 2, 256, 256), jnp.float16),
    ((12, 12), (4, 3), (2, 1), 1, (True, True), (1, 2, 1, 256, 128), jnp.bfloat16),
    ((64,), 9, 2, 1, False, (1, 2, 2, 72, 40), jnp.float16),
]


@pytest.mark.parametrize("kernels", ["default", "sm80"])
@pytest.mark.parametrize("shape,k,s,d,c,dims,dtype", CASES)
def test_matches_xla(monkeypatch, kernels, shape, k, s, d, c, dims, dtype):
    """Every case on the kernels the GPU picks, and on the sm80 kernels alone (what an
    sm80 GPU runs: on a Hopper GPU JAX_GNA_SM90=0 turns the Hopper path off)."""
    if kernels == "sm80":
        monkeypatch.setenv("JAX_GNA_SM90", "0")
    b, h, h_kv, dim, d_v = dims
    _check(_problem(shape, k, s, d, c, dim=dim), b, h, h_kv, dim, d_v, dtype)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("dim", [32, 64, 128, 256])
def test_head_dims(dtype, dim):
    _check(_problem((10, 11), (3, 4), (1, 2), 1, (False, True), dim=dim), 1, 2, 1, dim, dim, dtype)


def test_custom_scale():
    _check(_problem((40,), 5, scale=0.37), 1, 2, 2, 32, 32, jnp.float16)


# ---------------------------------------------------------------------------
# Blocks with non-zero origins (a shard): query block inside a larger key block.
# ---------------------------------------------------------------------------

def _key_block(problem, q_origin, q_extent):
    kv_o, kv_e = [], []
    for a in range(problem.rank):
        i = np.arange(q_origin[a], q_origin[a] + q_extent[a])
        first, last = mask.window_extent(i, problem.axis(a))
        kv_o.append(int(first.min()))
        kv_e.append(int(last.max()) - int(first.min()) + 1)
    return tuple(kv_o), tuple(kv_e)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.float32])
def test_block_origins(dtype):
    whole = _problem((40, 30), (5, 4), (1, 2), (2, 1), (False, True), dim=64)
    q_o, q_e = (10, 5), (12, 17)
    kv_o, kv_e = _key_block(whole, q_o, q_e)
    assert kv_o != (0, 0) or kv_e != whole.shape
    block = whole.replace(q_origin=q_o, q_extent=q_e, kv_origin=kv_o, kv_extent=kv_e)
    _check(block, 2, 2, 1, 64, 64, dtype)
    # And the block equals the same rows of the whole problem.
    q, k, v, _, _ = _inputs(whole, 1, 2, 1, 64, 64, dtype)
    out_w, lse_w = jax.jit(lambda q, k, v: cuda.attention(q, k, v, whole))(q, k, v)
    qs = q[:, q_o[0]:q_o[0] + q_e[0], q_o[1]:q_o[1] + q_e[1]]
    ks = k[:, kv_o[0]:kv_o[0] + kv_e[0], kv_o[1]:kv_o[1] + kv_e[1]]
    vs = v[:, kv_o[0]:kv_o[0] + kv_e[0], kv_o[1]:kv_o[1] + kv_e[1]]
    out_b, lse_b = jax.jit(lambda q, k, v: cuda.attention(q, k, v, block))(qs, ks, vs)
    sl = (slice(None), slice(q_o[0], q_o[0] + q_e[0]), slice(q_o[1], q_o[1] + q_e[1]))
    # Same operator, different tiling (so a different summation order): rounding only.
    assert _rel(out_b, out_w[sl]) < TOL[dtype][0] and _rel(lse_b, lse_w[sl]) < TOL[dtype][1]


# ---------------------------------------------------------------------------
# Determinism, poisoning, transformations.
# ---------------------------------------------------------------------------

def test_bitwise_repeatable_and_poison_free():
    p = _problem((24, 20), (5, 7), (1, 2), (1, 2), (False, True), dim=64)
    q, k, v, w, u = _inputs(p, 2, 4, 2, 64, 64, jnp.bfloat16)

    def run(fn):
        def loss(q, k, v):
            out, lse = fn(q, k, v, p)
            return jnp.sum(out.astype(jnp.float32) * w) + jnp.sum(lse * u), (out, lse)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    a = jax.tree.map(np.asarray, run(cuda.attention))
    b = jax.tree.map(np.asarray, run(cuda.attention))
    c = jax.tree.map(np.asarray, run(cuda._attention_poisoned))
    bits = lambda x: np.atleast_1d(x).view(np.uint8)  # noqa: E731
    for x, y, z in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(c)):
        assert np.array_equal(bits(x), bits(y))
        assert np.array_equal(bits(x), bits(z))


def test_vmap_and_checkpoint():
    p = _problem((30,), 5, 2, 1, True, dim=32)
    q, k, v, _, _ = _inputs(p, 2, 2, 1, 32, 32, jnp.float16)
    qs, ks, vs = (jnp.stack([x, 2 * x, -x]) for x in (q, k, v))
    out, lse = jax.jit(jax.vmap(lambda q, k, v: cuda.attention(q, k, v, p)))(qs, ks, vs)
    for i in range(3):
        o, l = cuda.attention(qs[i], ks[i], vs[i], p)
        assert np.array_equal(np.asarray(o), np.asarray(out[i]))
        assert np.array_equal(np.asarray(l), np.asarray(lse[i]))

    def loss(q, k, v):
        return jnp.sum(cuda.attention(q, k, v, p)[0].astype(jnp.float32) ** 2)

    g1 = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    g2 = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g1, g2):
        assert _rel(a, b) < 1e-6


def test_lse_cotangent_only():
    """A loss that reads only the lse: its gradient flows through dLSE alone."""
    p = _problem((12, 10), (3, 4), 1, 1, (True, False), dim=32)
    q, k, v, _, u = _inputs(p, 1, 2, 2, 32, 32, jnp.float32)

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, p)[1] * u)

    g = jax.jit(jax.grad(lambda *a: loss(cuda.attention, *a), argnums=(0, 1, 2)))(q, k, v)
    r = jax.jit(jax.grad(lambda *a: loss(xla.attention, *a), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g, r):
        assert _rel(a, b) < 5e-5


# sms 1: the kernels sum all blocks of a batch entry into the tokens' dK / dV
# (cuda._dkv_sum); 1 << 40: one run per block
@pytest.mark.parametrize("spatial,tokens,dims,dtype,sms", [
    ((10, 25), 100, (4, 2, 64, 64), jnp.bfloat16, 1 << 40),  # 250 queries padded to 3 blocks of 100
    ((10, 25), 100, (4, 2, 64, 64), jnp.bfloat16, 1),
    ((16, 16), 64, (4, 2, 128, 128), jnp.bfloat16, 1),    # 4 blocks of 64
    ((8, 8), 64, (2, 1, 128, 128), jnp.float16, 1 << 40),    # exactly one block, GQA
    ((6, 7, 5), 64, (2, 2, 32, 48), jnp.float32, 1),      # 210 queries padded to 4 blocks
    ((30, 26), 114, (4, 2, 256, 256), jnp.bfloat16, 1 << 40),  # the fuzz's failing case, one GPU
])
@pytest.mark.parametrize("fused", ["1", "0"])
def test_additional_tokens_on_the_kernels(monkeypatch, spatial, tokens, dims, dtype, sms, fused):
    """The op's computation with additional tokens (``cuda.dense_attention``: padded query
    blocks in the batch over the broadcast tokens, the neighborhood call, the merge; with
    ``fused`` "1" the Hopper-eligible cases take the tokens as extra key tiles instead),
    every kernel output poisoned, against the same on the xla backend: outputs, lse, and
    the gradients of q, k, v and the tokens."""
    monkeypatch.setattr(cuda, "_SMS", sms)
    monkeypatch.setenv("JAX_GNA_FUSED_TOKENS", fused)  # "1": as key tiles where they can be
    problem = _problem(spatial, 3, dim=dims[2])
    args, w, u = _token_inputs(spatial, tokens, *dims, dtype)
    assert cuda.dense_blocker(args[0].shape, args[3].shape, args[4].shape, dtype) is None
    _assert_tokens_close_to_xla(problem, args, w, u, dtype,
                                _op_value_and_grad(problem, w, u, cuda._attention_poisoned)(*args))


def _token_inputs(spatial, tokens, h, h_kv, d, d_v, dtype):
    """Fresh random q, k, v and the tokens' keys / values (batch 2, ``dtype``) and the
    loss weights of out and lse (float32)."""
    keys = jax.random.split(_key(), 7)
    shapes = [(2, *spatial, h, d), (2, *spatial, h_kv, d), (2, *spatial, h_kv, d_v),
              (2, tokens, h_kv, d), (2, tokens, h_kv, d_v)]
    args = [jax.random.normal(kk, sh, jnp.float32).astype(dtype) for kk, sh in zip(keys, shapes)]
    w = jax.random.normal(keys[5], (2, *spatial, h, d_v), jnp.float32)
    u = jax.random.normal(keys[6], (2, *spatial, h), jnp.float32)
    return args, w, u


def _op_value_and_grad(problem, w, u, impl):
    """The op's computation with tokens (``ops._compute`` on ``impl``), jitted:
    ``((sum(out w) + sum(lse u), (out, lse)), gradients of the five inputs)``."""
    from jax_gna import ops

    def loss(*a):
        out, lse = ops._compute(*a, impl=impl, problem=problem)
        return jnp.sum(out.astype(jnp.float32) * w) + jnp.sum(lse * u), (out, lse)

    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(5)), has_aux=True))


def _assert_tokens_close_to_xla(problem, args, w, u, dtype, got):
    """``got`` (from :func:`_op_value_and_grad`) against the xla backend in float32 within
    the dtype's tolerances: out, lse and the five gradients."""
    (_, (out, lse)), grads = got
    (_, (r_out, r_lse)), r_grads = _op_value_and_grad(problem, w, u, xla.attention)(
        *[x.astype(jnp.float32) for x in args])
    t_out, t_lse, t_grad = TOL[dtype]
    assert _rel(out, r_out) < t_out and _rel(lse, r_lse) < t_lse, (_rel(out, r_out), _rel(lse, r_lse))
    for name, g, r in zip(("dq", "dk", "dv", "d_tokens_k", "d_tokens_v"), grads, r_grads):
        assert _rel(g, r) < t_grad, (name, _rel(g, r))


# (spatial, kernel, stride, causal, tokens, (h, h_kv, d), dtype): fewer tokens than a key
# tile (16 of 128), exactly two tiles (256), a tile and 2 (130), head dim 256's key tiles
# of 64 (50 tokens: one partial tile), too few tokens for the heads to take the kernels'
# backward (cuda.dense_blocker: xla.dense_backward_saved)
@pytest.mark.parametrize("spatial,k,s,c,tokens,dims,dtype", [
    ((16, 16), 5, 1, False, 16, (4, 1, 128), jnp.bfloat16),
    ((20, 24), 7, 2, (True, False), 256, (2, 2, 64), jnp.float16),
    ((300,), 33, 4, True, 130, (2, 1, 128), jnp.bfloat16),
    ((4, 8, 10), 3, 1, False, 50, (2, 2, 256), jnp.bfloat16),
    ((16, 16), 5, 1, False, 12, (8, 2, 64), jnp.bfloat16),  # few: the tokens' backward on XLA
    ((12, 20), 5, 3, True, 40, (24, 8, 128), jnp.float16),  # 40 tokens for 24 heads: XLA's too
])
def test_tokens_as_key_tiles(spatial, k, s, c, tokens, dims, dtype):
    """The additional tokens as extra key tiles of the Hopper forward (``jax_gna_fwd_tokens``,
    outputs poisoned) and both backward passes from the merged out / lse, against the
    xla backend in float32: out, lse, and the gradients of q, k, v and the tokens."""
    if cuda._compute_capability() != "9.0":
        pytest.skip("the Hopper forward needs a compute capability 9.0 GPU")
    h, h_kv, d = dims
    problem = _problem(spatial, k, s, 1, c, dim=d)
    args, w, u = _token_inputs(spatial, tokens, h, h_kv, d, d, dtype)
    assert cuda.tokens_blocker(problem, args[0].shape, args[3].shape, args[4].shape, dtype) is None
    fn = _op_value_and_grad(problem, w, u, cuda._attention_poisoned)
    assert "jax_gna_fwd_tokens_aliased" in fn.lower(*args).as_text()
    _assert_tokens_close_to_xla(problem, args, w, u, dtype, fn(*args))


# dtype, head dim, length, additional tokens: bf16 on the Hopper kernels without tokens and
# with 128 (the tokens as extra key tiles of the forward; their backward as 2 query blocks
# per batch entry, 131086 blocks in one cuda.dense_attention call), float32 on the sm80
# kernels with 64 tokens (one block per entry, on the kernels too)
@pytest.mark.parametrize("dtype,d,n,tokens", [(jnp.bfloat16, 64, 128, 0),
                                              (jnp.bfloat16, 64, 256, 128),
                                              (jnp.float32, 8, 64, 64)])
def test_batch_above_the_grid_limit(dtype, d, n, tokens):
    """A batch of 65543, above CUDA's largest grid z (65535): each kernel runs as two
    launches (``Params::z0``). Poisoned outputs, forward and gradients of q, k, v (and the
    tokens). The inputs repeat every 7 batch entries (65535 is not a multiple of 7: a
    launch reading or writing another launch's entries shows), so every entry is checked
    against the xla backend's result on the first 7 (float32): the largest relative L2
    error of one entry within the dtype's tolerance. (A first version compared the whole
    arrays, where an error in a few entries of 65543 would hide, against xla on all of
    them, and its loss captured the 2 GB cotangent weights as constants: its bf16 cases did
    not finish in 230 s, compiling.)"""
    from jax_gna import ops

    b, period = 65543, 7
    problem = _problem((n,), 9, dim=d)
    keys = jax.random.split(_key(), 7)
    shapes = [(period, n, 1, d)] * 3 + [(period, tokens, 1, d)] * (2 if tokens else 0)
    small = [jax.random.normal(kk, sh, jnp.float32).astype(dtype) for kk, sh in zip(keys, shapes)]
    w = jax.random.normal(keys[5], (period, n, 1, d), jnp.float32)
    u = jax.random.normal(keys[6], (period, n, 1), jnp.float32)
    entry = jnp.arange(b) % period
    big = [x[entry] for x in small]
    path = cuda.kernel_path(problem, big[0].shape, big[2].shape, dtype)
    assert path.startswith("forward and backward: " + ("Hopper" if dtype == jnp.bfloat16 else "sm80")), path
    if tokens and dtype == jnp.bfloat16:
        assert cuda.tokens_blocker(problem, big[0].shape, big[3].shape, big[4].shape, dtype) is None

    def run(impl, w, u, *a):  # w, u are arguments: as constants they took minutes to compile
        def loss(w, u, *a):
            out, lse = ops._compute(*a[:3], *(a[3:] or (None, None)), impl=impl, problem=problem)
            return jnp.sum(out.astype(jnp.float32) * w) + jnp.sum(lse * u), (out, lse)
        (_, outs), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(2, 2 + len(a))),
                                                      has_aux=True))(w, u, *a)
        return (*outs, *grads)

    @jax.jit
    def entry_errors(a, r):  # relative L2 error of each batch entry against its reference
        a, r = a.astype(jnp.float32), r[entry]
        axes = tuple(range(1, a.ndim))
        return jnp.isfinite(a).all(), jnp.sqrt(jnp.sum((a - r) ** 2, axes) / jnp.sum(r ** 2, axes))

    got = run(cuda._attention_poisoned, w[entry], u[entry], *big)
    ref = run(xla.attention, w, u, *[x.astype(jnp.float32) for x in small])
    names = ["out", "lse", "dq", "dk", "dv", "d extra k", "d extra v"]
    worst = {}
    for name, a, r in zip(names, got, ref):
        finite, errs = entry_errors(a, r)
        assert bool(finite), f"{name}: NaN or inf, an element no launch wrote"
        i = int(jnp.argmax(errs))
        worst[name] = (float(errs[i]), i)
    t_out, t_lse, t_grad = TOL[dtype]
    limits = [t_out, t_lse] + [t_grad] * (len(got) - 2)
    assert all(worst[name][0] < t for name, t in zip(names, limits)), worst


@pytest.mark.parametrize("tokens", [96, 12])
def test_tokens_partitioned_op_on_one_gpu(monkeypatch, tokens):
    """The partitioned op of a call with tokens (``sharding._partitioned_tokens_op``, what a
    process with two or more devices runs under ``jax.jit``) on one GPU, where
    ``custom_partitioning`` runs its whole-array functions: each shard's program without
    a spatial split, the tokens as key tiles of the Hopper forward (poisoned) and the
    backward from the merged out / lse (96 tokens on the kernels, 12 on XLA), against
    the xla backend in float32."""
    if cuda._compute_capability() != "9.0":
        pytest.skip("the Hopper forward needs a compute capability 9.0 GPU")
    from jax_gna import sharding

    problem = _problem((16, 24), 7, 2, 1, (True, False), dim=128)
    args, w, u = _token_inputs((16, 24), tokens, 8, 2, 128, 128, jnp.bfloat16)
    monkeypatch.setattr(sharding, "_partitioning_applies", lambda *a: True)
    seen = []
    real = sharding._partitioned_tokens_op
    monkeypatch.setattr(sharding, "_partitioned_tokens_op",
                        lambda *a: seen.append(a[0]) or real(*a))
    fn = _op_value_and_grad(problem, w, u, cuda._attention_poisoned)
    assert "jax_gna_fwd_tokens_aliased" in fn.lower(*args).as_text() and seen
    got = fn(*args)
    monkeypatch.undo()
    _assert_tokens_close_to_xla(problem, args, w, u, jnp.bfloat16, got)


def test_tokens_as_key_tiles_under_vmap():
    """The public op with tokens as key tiles under ``jax.vmap`` (the FFI call takes the
    mapped axis as one more batch dim: the tokens' tensor map's batch is the product) and
    ``jax.grad``, against the xla backend in float32."""
    import jax_gna

    if cuda._compute_capability() != "9.0":
        pytest.skip("the Hopper forward needs a compute capability 9.0 GPU")
    rng = np.random.default_rng(31)
    draw = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.bfloat16)  # noqa: E731
    q, k, v = draw(3, 2, 16, 20, 4, 64), draw(3, 2, 16, 20, 2, 64), draw(3, 2, 16, 20, 2, 64)
    ak, av, w = draw(3, 2, 40, 2, 64), draw(3, 2, 40, 2, 64), draw(3, 2, 16, 20, 4, 64)

    def loss(backend, *a):
        out = jax.vmap(lambda q, k, v, ak, av: jax_gna.neighborhood_attention(
            q, k, v, (5, 7), (2, 3), is_causal=(True, False), additional_keys=ak,
            additional_values=av, backend=backend))(*a)
        return jnp.sum(out.astype(jnp.float32) * w.astype(jnp.float32)), out

    args = (q, k, v, ak, av)
    text = jax.jit(functools.partial(loss, "cuda")).lower(*args).as_text()
    assert "jax_gna_fwd_tokens" in text
    (_, out), g = jax.jit(jax.value_and_grad(functools.partial(loss, "cuda"), argnums=tuple(range(5)),
                                             has_aux=True))(*args)
    (_, r_out), r = jax.jit(jax.value_and_grad(functools.partial(loss, "xla"), argnums=tuple(range(5)),
                                               has_aux=True))(*[x.astype(jnp.float32) for x in args])
    t_out, _, t_grad = TOL[jnp.bfloat16]
    assert _rel(out, r_out) < t_out
    for name, a, b in zip(("dq", "dk", "dv", "d_tokens_k", "d_tokens_v"), g, r):
        assert _rel(a, b) < t_grad, (name, _rel(a, b))


@pytest.mark.parametrize("path,tokens", [("public", 64), ("public", 0), ("sharded", 96)])
def test_inside_shard_map_on_one_gpu(path, tokens):
    """The op inside ``shard_map`` on a one-GPU mesh, where JAX types the values as varying
    over the mesh axis (``cuda._vary_like``): the public ``neighborhood_attention`` in a
    user's ``shard_map`` over the batch ("public"), and ``neighborhood_attention_sharded``
    with the width on the mesh axis ("sharded"); with additional tokens on the kernels
    (64, 96) and without. Out, lse and the gradients of q, k, v and the tokens against
    the ``xla`` backend in float32 outside ``shard_map``."""
    import jax_gna
    from jax.sharding import Mesh, PartitionSpec as P
    from jax_gna import sharding

    mesh = Mesh(np.array(jax.devices()[:1]), ("m",))
    rng = np.random.default_rng(17)
    draw = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.bfloat16)  # noqa: E731
    q, k, v = draw(2, 20, 24, 4, 64), draw(2, 20, 24, 2, 64), draw(2, 20, 24, 2, 64)
    ak, av = draw(2, max(tokens, 1), 2, 64), draw(2, max(tokens, 1), 2, 64)
    do, dl = draw(2, 20, 24, 4, 64), draw(2, 20, 24, 4).astype(jnp.float32)
    kw = dict(kernel_size=(7, 5), stride=(2, 1))

    def public(q, k, v, ak, av, backend="cuda"):
        return jax_gna.neighborhood_attention(
            q, k, v, **kw, additional_keys=ak if tokens else None,
            additional_values=av if tokens else None, return_lse=True, backend=backend)

    if path == "public":
        batch = P("m")
        op = jax.shard_map(public, mesh=mesh, in_specs=(batch,) * 5, out_specs=(batch, batch))
    else:
        def op(q, k, v, ak, av):
            return sharding.neighborhood_attention_sharded(
                q, k, v, **kw, mesh=mesh, spatial_axes={1: "m"}, additional_keys=ak,
                additional_values=av, return_lse=True, backend="cuda")

    got = jax.jit(fwd_bwd(op))(q, k, v, ak, av, do, dl)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, ak, av, do, dl)]
    ref = jax.jit(fwd_bwd(lambda *a: public(*a, backend="xla")))(*f32)
    assert_close_bf16(got, ref, tokens, path)


@pytest.mark.parametrize("kernels", ["hopper", "sm80"])
@pytest.mark.parametrize("dtype,dim", [(jnp.bfloat16, 128), (jnp.float16, 64), (jnp.float32, 32)])
def test_broadcast_key_value_batch(monkeypatch, kernels, dtype, dim):
    """Keys/values ``[B, 1, ...]`` read by the ``m`` query batches ``[B, m, ...]`` of their
    entry (the kernels' broadcast, ``Params::kvb``; the additional tokens' calls): the
    same out, lse and dQ, bit for bit, as the calls on the keys copied to every query
    batch, and dK / dV per query batch the same as those calls'; dK / dV summed by the
    kernels over runs of 2 and 4 query batches (``Params::dkvb``) as those per query
    batch summed. Poisoned outputs. On the Hopper kernels (forced, both passes) and on
    the sm80 kernels."""
    if kernels == "sm80":
        monkeypatch.setenv("JAX_GNA_SM90", "0")
    elif dtype == jnp.float32 or not _is_sm90():
        pytest.skip("no Hopper kernels for float32 / on this GPU")
    else:
        _force_sm90(monkeypatch, backward=True)
    p = _problem((200,), 200, dim=dim)  # every key in every window, as the tokens' calls
    keys = jax.random.split(_key(), 6)
    q = jax.random.normal(keys[0], (2, 4, 200, 4, dim), jnp.float32).astype(dtype)
    k, v = (jax.random.normal(kk, (2, 1, 200, 2, dim), jnp.float32).astype(dtype)
            for kk in keys[1:3])
    do = jax.random.normal(keys[3], (2, 4, 200, 4, dim), jnp.float32).astype(dtype)
    delta = jax.random.normal(keys[4], (2, 4, 200, 4), jnp.float32)
    copied = [jnp.broadcast_to(x, (2, 4) + x.shape[2:]) for x in (k, v)]

    def run(k, v):
        out, lse = cuda._forward_call(q, k, v, p, True)
        return (out, lse) + cuda._backward_call(q, k, v, do, lse, delta, p, True)

    got = jax.jit(run)(k, v)
    want = jax.jit(run)(*copied)
    for name, a, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert a.shape == w.shape, name
        assert np.isfinite(np.asarray(a, np.float32)).all(), name
        assert np.array_equal(np.asarray(a), np.asarray(w)), name
    # and against the xla backend (one query batch of four)
    ref, _ = xla.attention(q[:, 1].astype(jnp.float32), k[:, 0].astype(jnp.float32),
                           v[:, 0].astype(jnp.float32), p)
    assert _rel(got[0][:, 1], ref) < TOL[dtype][0]
    # rounded once per run, not per query batch: within the dtype's rounding
    tol = {jnp.float32: 1e-5, jnp.float16: 2e-3, jnp.bfloat16: 1e-2}[dtype]
    for n in (2, 4):
        summed = jax.jit(lambda k, v, n=n: cuda._backward_call(
            q, k, v, do, got[1], delta, p, True, dkv_sum=n))(k, v)
        assert np.array_equal(np.asarray(summed[0]), np.asarray(got[2])), n  # dQ
        for name, a, w in zip(("dk", "dv"), summed[1:], got[3:]):
            w = np.asarray(w, np.float64).reshape((2, 4 // n, n) + w.shape[2:]).sum(2)
            assert a.shape == w.shape, (name, n)
            assert _rel(a, w) < tol, (name, n)


def test_bad_arguments_raise():
    """Rejected by the handler, not read out of bounds: a key block that misses some
    window; key/value batch dims that are not the query's with a tail of 1s (the only
    broadcast the kernels read)."""
    whole = _problem((32,), 5, dim=32)
    block = whole.replace(q_origin=(8,), q_extent=(8,), kv_origin=(8,), kv_extent=(8,))
    q, k, v, _, _ = _inputs(block, 1, 1, 1, 32, 32, jnp.float16)
    with pytest.raises(Exception, match="does not hold every window"):
        jax.block_until_ready(cuda.attention(q, k, v, block))
    q = jnp.zeros((2, 3, 32, 1, 32), jnp.float16)
    for kv_batch in ((1, 3), (2, 2), (3, 1)):  # a leading 1, a mismatch, 3 of 2 entries
        k = jnp.zeros(kv_batch + (32, 1, 32), jnp.float16)
        with pytest.raises(Exception, match="batch dims differ"):
            jax.block_until_ready(cuda._forward_call(q, k, k, whole))
    # dK / dV of broadcast keys summed over runs that do not divide the 3 query batches
    k = jnp.zeros((2, 1, 32, 1, 32), jnp.float16)
    lse = jnp.zeros((2, 3, 32, 1), jnp.float32)
    grad = jax.ShapeDtypeStruct((2, 2, 32, 1, 32), jnp.float16)
    call = jax.ffi.ffi_call(cuda.BWD_TARGET, (jax.ShapeDtypeStruct(q.shape, q.dtype), grad, grad),
                            vmap_method="broadcast_all")
    with pytest.raises(Exception, match="dk has shape"):
        jax.block_until_ready(call(q, k, k, q, lse, lse, **cuda._attrs(whole)))


# ---------------------------------------------------------------------------
# More than 2^31 elements in a tensor (64-bit offsets).
# ---------------------------------------------------------------------------

def test_large_tensor_64bit_offsets():
    L, H, D = 131200, 128, 128  # 2.15e9 elements per tensor (> 2^31), fp16: 4.3 GB each
    assert L * H * D > 2 ** 31
    p = _problem((L,), 3, dim=D)
    kq, kk, kv = jax.random.split(_key(), 3)
    mk = jax.jit(lambda key: jax.random.normal(key, (1, L, H, D), jnp.float16))
    q, k, v = mk(kq), mk(kk), mk(kv)
    tail = 48
    dout = jax.random.normal(_key(), (1, L, H, D), jnp.float16)

    def cut_passes(q, k, v, dout):
        (out, lse), vjp = jax.vjp(lambda q, k, v: cuda.attention(q, k, v, p), q, k, v)
        dq, dk, dv = vjp((dout, jnp.zeros_like(lse)))
        cut = lambda x: x[:, L - tail:]  # noqa: E731
        return cut(out), cut(lse), cut(dq), cut(dk), cut(dv)

    out, lse, dq, dk, dv = jax.jit(cut_passes)(q, k, v, dout)
    # The same rows from the block problem (exact for the last `tail` queries/keys).
    blk = p.replace(q_origin=(L - tail,), q_extent=(tail,), kv_origin=(L - tail - 2,),
                    kv_extent=(tail + 2,))
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    qb, kb, vb, db = f32(q[:, L - tail:]), f32(k[:, L - tail - 2:]), f32(v[:, L - tail - 2:]), f32(dout[:, L - tail:])
    (ro, rl), rvjp = jax.vjp(lambda q, k, v: xla.attention(q, k, v, blk), qb, kb, vb)
    rdq, rdk, rdv = rvjp((db, jnp.zeros_like(rl)))
    assert _rel(out, ro) < 4e-3 and _rel(lse, rl) < 1e-4
    assert _rel(dq, rdq) < 1e-2
    # Keys L-tail+1 .. L-1 are seen only by queries of the block.
    assert _rel(dk[:, 2:], rdk[:, 4:]) < 1e-2 and _rel(dv[:, 2:], rdv[:, 4:]) < 1e-2


# ---------------------------------------------------------------------------
# Hopper path (sm_90a TMA + wgmma). JAX_GNA_SM90=force makes a forward call fail
# unless the Hopper kernel ran it, JAX_GNA_SM90_BWD=force the same for the backward,
# so these cases prove which kernels they check.
# ---------------------------------------------------------------------------

def _is_sm90() -> bool:
    try:
        return any(getattr(d, "compute_capability", "") == "9.0" for d in jax.devices("gpu"))
    except RuntimeError:
        return False


SM90_CASES = [
    # shape, k, s, causal, (b, h, h_kv, d), dtype
    ((300,), 16, 16, True, (1, 2, 1, 64), jnp.float16),
    ((1000,), 129, 1, False, (1, 4, 2, 128), jnp.bfloat16),
    ((2048,), 256, 64, False, (2, 2, 2, 128), jnp.float16),
    ((20, 23), (5, 4), (2, 1), (False, True), (2, 4, 1, 128), jnp.float16),
    ((64, 48), 13, 1, False, (1, 2, 2, 64), jnp.bfloat16),
    ((64, 64), 16, 8, False, (1, 2, 2, 128), jnp.bfloat16),
    ((33, 70), (9, 17), (3, 5), (True, False), (1, 2, 1, 64), jnp.float16),
    ((6, 9, 10), (3, 4, 5), (1, 2, 3), (True, False, True), (1, 2, 2, 64), jnp.bfloat16),
    ((8, 16, 24), (4, 8, 8), (4, 8, 8), False, (1, 2, 2, 128), jnp.float16),
    ((10, 12, 20), (5, 7, 9), 1, (True, False, False), (2, 2, 1, 128), jnp.bfloat16),
]


def _force_sm90(monkeypatch, backward: bool) -> None:
    """Forward on the Hopper kernel (fail otherwise); the backward on the Hopper
    kernels too (fail otherwise) or on the sm80 kernels."""
    monkeypatch.setenv("JAX_GNA_SM90", "force")
    monkeypatch.setenv("JAX_GNA_SM90_BWD", "force" if backward else "0")


def _sm90_block():
    """A query block inside a larger key block (a shard) of a dilation-free problem."""
    whole = _problem((40, 30), (5, 4), (1, 2), 1, (False, True), dim=64)
    q_o, q_e = (10, 5), (12, 17)
    kv_o, kv_e = _key_block(whole, q_o, q_e)
    return whole, whole.replace(q_origin=q_o, q_extent=q_e, kv_origin=kv_o, kv_extent=kv_e)


BACKWARDS = pytest.mark.parametrize("backward", [False, True], ids=["sm80_bwd", "sm90_bwd"])


@pytest.mark.skipif(not _is_sm90(), reason="needs a compute capability 9.0 GPU")
@BACKWARDS
@pytest.mark.parametrize("shape,k,s,c,dims,dtype", SM90_CASES)
def test_sm90_matches_xla(monkeypatch, backward, shape, k, s, c, dims, dtype):
    _force_sm90(monkeypatch, backward)
    b, h, h_kv, dim = dims
    _check(_problem(shape, k, s, 1, c, dim=dim), b, h, h_kv, dim, dim, dtype)


@pytest.mark.skipif(not _is_sm90(), reason="needs a compute capability 9.0 GPU")
@pytest.mark.parametrize("shape,k,s,c,dims,dtype", [
    ((600,), 200, 1, True, (1, 2, 1, 256), jnp.float16),
    ((20, 23), (5, 4), (2, 1), (False, True), (2, 4, 2, 256), jnp.bfloat16),
    ((8, 16, 24), (4, 8, 8), (4, 8, 8), False, (1, 2, 1, 256), jnp.float16),
    ((10, 12, 20), (5, 7, 9), 1, (True, False, False), (1, 2, 2, 256), jnp.bfloat16),
])
def test_sm90_head_dim_256(monkeypatch, shape, k, s, c, dims, dtype):
    """Head dim 256: the Hopper forward (64-token key tiles, forced), the sm80 backward."""
    _force_sm90(monkeypatch, False)
    b, h, h_kv, dim = dims
    _check(_problem(shape, k, s, 1, c, dim=dim), b, h, h_kv, dim, dim, dtype)


@pytest.mark.skipif(not _is_sm90(), reason="needs a compute capability 9.0 GPU")
@pytest.mark.parametrize("keys", ["64", "128"])
@pytest.mark.parametrize("case", range(len(SM90_CASES) + 1))
def test_sm90_key_tiles(monkeypatch, keys, case):
    """The Hopper forward at head dims 64 and 128 with each key tile forced
    (JAX_GNA_FWD_KEYS; by default the host takes 64-token tiles only where they visit far
    fewer key columns), on SM90_CASES and a query block inside a key block; forward only."""
    _force_sm90(monkeypatch, False)
    monkeypatch.setenv("JAX_GNA_FWD_KEYS", keys)
    _check_forward_case(case)


def _check_forward_case(case: int) -> None:
    """The forward of SM90_CASES[case], or of a query block inside a key block (case ==
    len(SM90_CASES)), against the xla backend."""
    if case == len(SM90_CASES):
        _check(_sm90_block()[1], 2, 2, 1, 64, 64, jnp.bfloat16, grads=False)
        return
    shape, k, s, c, (b, h, h_kv, dim), dtype = SM90_CASES[case]
    _check(_problem(shape, k, s, 1, c, dim=dim), b, h, h_kv, dim, dim, dtype, grads=False)


@pytest.mark.skipif(not _is_sm90(), reason="needs a compute capability 9.0 GPU")
@pytest.mark.parametrize("items,keys", [("3", "128"), ("5", "64")])
@pytest.mark.parametrize("case", range(len(SM90_CASES) + 1))
def test_sm90_items(monkeypatch, items, keys, case):
    """The Hopper forward running several query tiles per CTA (JAX_GNA_FWD_ITEMS, forced;
    3 and 5 reuse a Q slot, and most problems leave the last CTA fewer), with each key
    tile size, on SM90_CASES and a query block inside a key block; forward only."""
    _force_sm90(monkeypatch, False)
    monkeypatch.setenv("JAX_GNA_FWD_ITEMS", items)
    monkeypatch.setenv("JAX_GNA_FWD_KEYS", keys)
    _check_forward_case(case)


@pytest.mark.skipif(not _is_sm90(), reason="needs a compute capability 9.0 GPU")
@BACKWARDS
def test_sm90_block_origins(monkeypatch, backward):
    _force_sm90(monkeypatch, backward)
    _check(_sm90_block()[1], 2, 2, 1, 64, 64, jnp.float16)


@pytest.mark.skipif(not _is_sm90(), reason="needs a compute capability 9.0 GPU")
@pytest.mark.parametrize("scale", [0.37, 1.5, -0.2, 0.0])
def test_sm90_scales(monkeypatch, scale):
    """Custom scales on the Hopper kernels, negative and zero included (the forward
    folds a positive scale into the exponent; full and masked key tiles both occur). At
    1.5 the scores spread so widely that the forward's reference row maxima jump often."""
    _force_sm90(monkeypatch, True)
    _check(_problem((700,), 300, 1, 1, False, scale=scale, dim=64), 1, 2, 1, 64, 64, jnp.float16)


@pytest.mark.skipif(not _is_sm90(), reason="needs a compute capability 9.0 GPU")
@pytest.mark.parametrize("scale,dim,dtype", [
    (None, 128, jnp.bfloat16), (None, 64, jnp.float16), (-0.1, 128, jnp.float16),
    (None, 256, jnp.bfloat16)])
def test_sm90_score_signs(monkeypatch, scale, dim, dtype):
    """Rows whose scores are all negative, all positive or mixed, in full and masked
    key tiles: a row maximum that is only right where some score is >= 0 fails here."""
    _force_sm90(monkeypatch, dim <= 128)
    _check(_problem((40, 37), (17, 23), (1, 2), 1, (False, True), scale=scale, dim=dim),
           1, 2, 1, dim, dim, dtype, signed_rows=True)


@pytest.mark.skipif(not _is_sm90(), reason="needs a compute capability 9.0 GPU")
@BACKWARDS
@pytest.mark.parametrize("shape,k,s,d,c,dims,dtype", [
    ((300,), 16, 4, 3, True, (1, 2, 1, 64), jnp.float16),           # 3 groups of 100; 16 keys
    ((301,), 129, 1, 2, False, (2, 2, 1, 128), jnp.bfloat16),       # groups of 151 and 150
    ((41, 46), (9, 15), (1, 2), (2, 3), (False, True), (1, 4, 2, 64), jnp.bfloat16),  # 4 pieces
    ((10, 20, 22), (4, 8, 7), (1, 1, 2), (2, 2, 3), (True, False, False), (1, 2, 1, 128),
     jnp.float16),
])
def test_sm90_dilation_fold(monkeypatch, backward, shape, k, s, d, c, dims, dtype):
    """Dilated problems as undilated pieces on the Hopper kernels (jax_gna.dilation). A
    folded backward runs with the Hopper backward forced, and so does the forward where an
    undifferentiated one folds (a window of >= 128 keys), so a piece that reached the sm80
    kernels would fail. Differentiated, the forward folds whenever the backward does (for
    the 16-key window with the Hopper backward, unforced); alone, a window under 128 keys
    stays on the sm80 kernels (checked without gradients)."""
    b, h, h_kv, dim = dims
    p = _problem(shape, k, s, d, c, dim=dim)
    forward = int(np.prod(p.kernel_size)) >= cuda.FOLD_FORWARD_MIN_KEYS
    monkeypatch.delenv("JAX_GNA_FOLD_DILATION", raising=False)
    monkeypatch.delenv("JAX_GNA_SM90", raising=False)
    if forward:
        monkeypatch.setenv("JAX_GNA_SM90", "force")
    monkeypatch.setenv("JAX_GNA_SM90_BWD", "force" if backward else "0")
    assert cuda.fold_dilation(p, (b, *shape, h, dim), (b, *shape, h_kv, dim), dtype) == (
        forward, backward)
    _check(p, b, h, h_kv, dim, dim, dtype)
    _check(p, b, h, h_kv, dim, dim, dtype, grads=False)


@pytest.mark.skipif(not _is_sm90(), reason="needs a compute capability 9.0 GPU")
def test_sm90_dilation_fold_head_dim_256(monkeypatch):
    """Head dim 256: the forward folded (Hopper, forced), the sm80 backward unfolded."""
    _force_sm90(monkeypatch, False)
    monkeypatch.delenv("JAX_GNA_FOLD_DILATION", raising=False)
    p = _problem((41, 46), (9, 15), (1, 2), (2, 3), (False, True), dim=256)
    assert cuda.fold_dilation(p, (1, 41, 46, 2, 256), (1, 41, 46, 1, 256), jnp.bfloat16) == (True, False)
    _check(p, 1, 2, 1, 256, 256, jnp.bfloat16)


@pytest.mark.skipif(not _is_sm90(), reason="needs a compute capability 9.0 GPU")
def test_sm90_force_rejects_other_problems(monkeypatch):
    monkeypatch.setenv("JAX_GNA_SM90", "force")
    monkeypatch.setenv("JAX_GNA_FOLD_DILATION", "0")
    p = _problem((40,), 5, 1, 2, False, dim=64)  # dilation, not folded: not on the Hopper path
    q, k, v, _, _ = _inputs(p, 1, 1, 1, 64, 64, jnp.float16)
    with pytest.raises(Exception, match="not supported"):
        jax.block_until_ready(cuda.attention(q, k, v, p))


@pytest.mark.skipif(not _is_sm90(), reason="needs a compute capability 9.0 GPU")
def test_sm90_repeatable_and_close_to_sm80(monkeypatch):
    p = _problem((48, 40), (9, 7), (1, 2), 1, (False, True), dim=128)
    q, k, v, _, _ = _inputs(p, 1, 4, 2, 128, 128, jnp.bfloat16)
    # A new jit per setting: XLA may record a jitted call into a CUDA graph and replay
    # it, and the switches are read when the handler runs.
    def make():
        return jax.jit(lambda q, k, v: cuda._attention_poisoned(q, k, v, p))
    monkeypatch.setenv("JAX_GNA_SM90", "force")
    run = make()
    a = jax.tree.map(np.asarray, run(q, k, v))
    b = jax.tree.map(np.asarray, run(q, k, v))
    monkeypatch.setenv("JAX_GNA_SM90", "0")
    c = jax.tree.map(np.asarray, make()(q, k, v))
    for x, y, z in zip(a, b, c):
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8))
        assert _rel(x, z) < TOL[jnp.bfloat16][1 if x.dtype == np.float32 else 0]


@pytest.mark.skipif(not _is_sm90(), reason="needs a compute capability 9.0 GPU")
@pytest.mark.parametrize("shape,k,s,keys,dim,dtype", [
    ((2000,), 129, 1, "64", 128, jnp.bfloat16),
    ((40, 50), (9, 7), (1, 2), "128", 64, jnp.float16),
    ((3000,), 257, 1, "128", 128, jnp.bfloat16),  # one Q slot, O straight to global memory
    ((24, 40), (7, 9), (2, 1), "128", 128, jnp.float16),
])
def test_sm90_items_bitwise(monkeypatch, shape, k, s, keys, dim, dtype):
    """Several query tiles per CTA change no bit of the forward (each query tile's key
    tiles are the same, in the same order): out and lse with 1, 3 and 4 per CTA."""
    _force_sm90(monkeypatch, False)
    monkeypatch.setenv("JAX_GNA_FWD_KEYS", keys)
    p = _problem(shape, k, s, 1, False, dim=dim)
    q, kk, v, _, _ = _inputs(p, 2, 4, 2, dim, dim, dtype)
    outs = []
    for items in ("1", "3", "4"):
        monkeypatch.setenv("JAX_GNA_FWD_ITEMS", items)
        # A new jit per setting (see test_sm90_repeatable_and_close_to_sm80).
        outs.append(jax.tree.map(np.asarray, jax.jit(lambda q, k, v: cuda._attention_poisoned(q, k, v, p))(q, kk, v)))
    for other in outs[1:]:
        for x, y in zip(outs[0], other):
            assert np.array_equal(x.view(np.uint8), y.view(np.uint8))


# Problems whose forward plan has pairs of query tiles with the same key tiles (head dim
# 128; tests/test_plan.py::test_pair_axis pins their axes; the last two leave a tile
# alone): shape, k, s, causal, (b, h, h_kv), key tokens, dtype.
PAIR_CASES = [
    ((4096,), 512, 512, False, (2, 2, 1), "128", jnp.bfloat16),          # axis 2
    ((64, 64), 16, 16, False, (1, 3, 3), "128", jnp.float16),            # axis 1
    ((64, 64), 16, 16, False, (1, 2, 1), "64", jnp.bfloat16),            # 64-token key tiles
    ((8, 16, 32), (8, 8, 16), (1, 8, 16), False, (2, 2, 2), "128", jnp.bfloat16),  # axis 0
    ((48, 96), (24, 40), (16, 32), (True, False), (1, 2, 2), "128", jnp.float16),  # causal
    ((1408,), 256, 256, False, (1, 2, 2), "128", jnp.bfloat16),          # 11 tiles: one alone
    ((14, 16, 16), (10, 8, 8), (8, 8, 8), False, (1, 2, 1), "128", jnp.float16),  # 7 on axis 0
]


@pytest.mark.skipif(not _is_sm90(), reason="needs a compute capability 9.0 GPU")
@pytest.mark.parametrize("shape,k,s,c,dims,keys,dtype", PAIR_CASES)
def test_sm90_pairs(monkeypatch, shape, k, s, c, dims, keys, dtype):
    """The forward in clusters of two CTAs sharing each K/V load (fwd_pair_sm90_kernel):
    within tolerance of the reference with JAX_GNA_FWD_PAIR=force (the call fails unless
    the pair kernel runs: a failed cluster launch would fall back silently), and the same
    bits as without pairs (JAX_GNA_FWD_PAIR=0: each query tile's key tiles are the same, in
    the same order)."""
    _force_sm90(monkeypatch, False)
    monkeypatch.setenv("JAX_GNA_FWD_KEYS", keys)
    monkeypatch.setenv("JAX_GNA_FWD_ITEMS", "1")  # pairs run one query tile per CTA
    monkeypatch.setenv("JAX_GNA_FWD_PAIR", "force")
    b, h, h_kv = dims
    p = _problem(shape, k, s, 1, c, dim=128)
    _check(p, b, h, h_kv, 128, 128, dtype, grads=False)
    q, kk, v, _, _ = _inputs(p, b, h, h_kv, 128, 128, dtype)
    outs = []
    for pair in ("force", "0"):
        monkeypatch.setenv("JAX_GNA_FWD_PAIR", pair)
        # A new jit per setting (see test_sm90_repeatable_and_close_to_sm80).
        outs.append(jax.tree.map(np.asarray, jax.jit(lambda q, k, v: cuda._attention_poisoned(q, k, v, p))(q, kk, v)))
    for x, y in zip(*outs):
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8))


@pytest.mark.skipif(not _is_sm90(), reason="needs a compute capability 9.0 GPU")
@pytest.mark.parametrize("items", ["1", "2"])
def test_sm90_pair_force_rejects_other_problems(monkeypatch, items):
    """JAX_GNA_FWD_PAIR=force fails a forward that runs no pair kernel: a sliding window
    (neighbouring query tiles visit different key tiles), and a blocked window with
    several query tiles per CTA (no pair kernel runs several)."""
    _force_sm90(monkeypatch, False)
    monkeypatch.setenv("JAX_GNA_FWD_PAIR", "force")
    monkeypatch.setenv("JAX_GNA_FWD_ITEMS", items)
    problems = [_problem((1024,), 257, 1, 1, False, dim=128)]
    if items != "1":
        problems.append(_problem((4096,), 512, 512, 1, False, dim=128))
    for p in problems:
        q, k, v, _, _ = _inputs(p, 1, 1, 1, 128, 128, jnp.bfloat16)
        with pytest.raises(Exception, match="not supported"):
            jax.block_until_ready(cuda.attention(q, k, v, p))


@pytest.mark.skipif(not _is_sm90(), reason="needs a compute capability 9.0 GPU")
@pytest.mark.parametrize("dim", [64, 128])
def test_sm90_query_range(monkeypatch, dim):
    """A forward call narrowed to rows [lo, hi) of the query buffer per axis (a sharded
    forward's sub-block call: device_q_range, on this GPU's ordinal) writes those rows as
    the whole call does (within tolerance: its query tiles start at lo) and no other row
    (they keep the poison); 3 query tiles per CTA give the same bits as one (at head dim
    128 their O goes from registers straight to the rows' addresses, at 64 through TMA
    stores)."""
    _force_sm90(monkeypatch, False)
    monkeypatch.setenv("JAX_GNA_FWD_KEYS", "128")
    p = _problem((40, 56), (9, 11), (1, 2), 1, (False, True), dim=dim)
    q, k, v, _, _ = _inputs(p, 2, 4, 2, dim, dim, jnp.bfloat16)
    lo, hi = (5, 8), (33, 50)
    table = ((jax.devices()[0].local_hardware_id or 0, p.q_origin, p.kv_origin, (lo[0], hi[0], lo[1], hi[1])),)
    whole = jax.jit(lambda q, k, v: cuda._forward_call(q, k, v, p, poison=True))(q, k, v)
    inside = (slice(None), slice(lo[0], hi[0]), slice(lo[1], hi[1]))
    parts = []
    for items in ("1", "3"):
        monkeypatch.setenv("JAX_GNA_FWD_ITEMS", items)
        # A new jit per setting (see test_sm90_repeatable_and_close_to_sm80).
        parts.append(tuple(map(np.asarray, jax.jit(
            lambda q, k, v: cuda._forward_call(q, k, v, p, poison=True, devices=table))(q, k, v))))
    for x, y in zip(map(np.asarray, whole), parts[0]):
        assert _rel(y[inside], x[inside]) < TOL[jnp.bfloat16][1 if x.dtype == np.float32 else 0]
        rest = np.ones(y.shape[:3], bool)
        rest[inside] = False
        assert np.isnan(y[rest].astype(np.float32)).all()
    for other in parts[1:]:
        for x, y in zip(parts[0], other):
            assert np.array_equal(x.view(np.uint8), y.view(np.uint8))


@pytest.mark.skipif(not _is_sm90(), reason="needs a compute capability 9.0 GPU")
def test_sm90_backward_repeatable_and_slack_block(monkeypatch):
    _force_sm90(monkeypatch, True)
    whole, _ = _sm90_block()
    # A key block much larger than the windows need: most key tiles see no query
    # (the dK/dV kernel's empty case must still write zeros over the poison).
    slack = whole.replace(q_origin=(30, 0), q_extent=(6, 30), kv_origin=(0, 0), kv_extent=(40, 30))
    _check(slack, 1, 2, 2, 128, 128, jnp.bfloat16)
    p = _problem((24, 20), (5, 7), (1, 2), 1, (False, True), dim=128)
    q, k, v, w, u = _inputs(p, 2, 4, 2, 128, 128, jnp.bfloat16)

    def loss(q, k, v):
        out, lse = cuda._attention_poisoned(q, k, v, p)
        return jnp.sum(out.astype(jnp.float32) * w) + jnp.sum(lse * u)

    g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    a, b2 = (jax.tree.map(np.asarray, g(q, k, v)) for _ in range(2))
    for x, y in zip(a, b2):
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8))


@pytest.mark.skipif(not _is_sm90(), reason="needs a compute capability 9.0 GPU")
def test_sm90_dkv_order_changes_no_bit(monkeypatch):
    """The dK/dV grid in tile order and heaviest first (JAX_GNA_DKV_ORDER=0 / 1): the same
    gradients bit for bit (each key tile's arithmetic is its own), with windows clamped at
    the ends so that the key tiles' step counts differ and the two orders differ."""
    _force_sm90(monkeypatch, True)
    p = _problem((2048,), 256, 64, 1, False, dim=128)
    q, k, v, w, u = _inputs(p, 2, 2, 2, 128, 128, jnp.float16)

    def loss(q, k, v):
        out, lse = cuda._attention_poisoned(q, k, v, p)
        return jnp.sum(out.astype(jnp.float32) * w) + jnp.sum(lse * u)

    got = []
    for order in ("0", "1"):
        monkeypatch.setenv("JAX_GNA_DKV_ORDER", order)
        # A new jit per setting: the handler reads the switch when it runs (not on a replay).
        got.append(jax.tree.map(np.asarray, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)))
    for x, y in zip(*got):
        assert np.all(np.isfinite(x))
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8))


def test_export_round_trip_runs():
    """jax.export: serialize, deserialize and *run* the forward and the gradient on the
    GPU; the results equal the directly jitted function's bit for bit."""
    from jax import export
    p = _problem((20, 23), (5, 4), (2, 1), 1, (False, True), dim=64)
    q, k, v, w, _ = _inputs(p, 1, 2, 1, 64, 64, jnp.float16)

    def loss(q, k, v):
        return jnp.sum(cuda.attention(q, k, v, p)[0].astype(jnp.float32) * w)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    exp = export.export(fn, platforms=["cuda"], disabled_checks=cuda.export_disabled_checks())(q, k, v)
    want = jax.tree.map(np.asarray, fn(q, k, v))
    runs = [exp]
    try:
        import flatbuffers  # noqa: F401  (jax.export serializes with it)
        runs.append(export.deserialize(exp.serialize()))
    except ImportError:
        print("flatbuffers missing: the exported module runs, serialization is not checked")
    for e in runs:
        got = jax.tree.map(np.asarray, e.call(q, k, v))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert np.array_equal(np.atleast_1d(a).view(np.uint8), np.atleast_1d(b).view(np.uint8))


# XLA told to record every command-buffer-compatible custom call into a CUDA graph, however
# short the sequence (flags of jax 0.11 era XLA).
_FORCE_GRAPHS = "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"
_GRAPH_SCRIPT = r'''
import json, sys
import numpy as np, jax, jax.numpy as jnp
from jax_gna import cuda, xla
from jax_gna.params import Problem

lib, _ = cuda._load_library()
p = Problem(shape=(24, 20), kernel_size=(5, 7), stride=(1, 2), dilation=(1, 1), is_causal=(False, True),
            scale=128 ** -0.5)

def loss(fn, cast):
    def f(q, k, v, w):
        out, lse = fn(cast(q), cast(k), cast(v), p)
        return jnp.sum(out.astype(jnp.float32) * w) + jnp.sum(lse)
    return f

f32 = lambda x: x.astype(jnp.float32)
grads = jax.jit(jax.grad(loss(cuda._attention_poisoned, lambda x: x), argnums=(0, 1, 2)))
refs = jax.jit(jax.grad(loss(xla.attention, f32), argnums=(0, 1, 2)))
chain = jax.jit(lambda q, k, v: cuda.attention(cuda.attention(q, k, v, p)[0], k, v, p)[0])
chain_ref = jax.jit(lambda q, k, v: xla.attention(xla.attention(q, k, v, p)[0], k, v, p)[0])
def err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b)) if np.isfinite(a).all() else 1.0

errs, calls = [], 0
r0 = lib.handler_runs()
for i in range(3):  # fresh inputs (new buffers: XLA records the calls again), each used 3 times
    ks = jax.random.split(jax.random.PRNGKey(i), 4)
    q, k, v = (jax.random.normal(kk, (2, 24, 20, 4, 128), jnp.float32).astype(jnp.bfloat16) for kk in ks[:3])
    w = jax.random.normal(ks[3], (2, 24, 20, 4, 128), jnp.float32)
    want, want_chain = refs(q, k, v, w), chain_ref(f32(q), f32(k), f32(v))
    for _ in range(3):
        errs += [err(a, b) for a, b in zip(grads(q, k, v, w), want)] + [err(chain(q, k, v), want_chain)]
        calls += 4  # forward and backward of the gradient, two forwards of the chain
print("RESULT " + json.dumps({"runs": lib.handler_runs() - r0, "calls": calls, "errs": errs}))
'''


@pytest.mark.parametrize("sm90", ["auto", "0"])
def test_command_buffer_replay(sm90):
    """With every jax_gna call recorded into a CUDA graph (forced XLA flags, in a child
    process), calls on fresh inputs and repeated calls give the right answers, and the
    handlers ran fewer times than the calls (so XLA did replay graphs). bf16, forward
    chain and gradient; the kernels the GPU picks, and the sm80 ones (JAX_GNA_SM90=0)."""
    import json
    import subprocess
    import sys
    env = {**os.environ, "JAX_GNA_COMMAND_BUFFER": "1", "JAX_GNA_SM90": sm90,
           "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + _FORCE_GRAPHS).strip()}
    r = subprocess.run([sys.executable, "-c", _GRAPH_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads([x for x in r.stdout.splitlines() if x.startswith("RESULT ")][0][7:])
    assert max(res["errs"]) < TOL[jnp.bfloat16][2], res
    assert res["runs"] < res["calls"], res
