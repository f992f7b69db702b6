"""The `xla` backend against the float64 brute force: a randomized sweep over ranks,
window parameters, GQA, D_v != D, additional tokens and tile shapes; forward, lse and
every gradient (the lse cotangent included); and the JAX transformations."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_gna
from jax_gna import params, reference, xla

# Fresh data every run; the seed is in every failure message.
DATA_SEED = int.from_bytes(os.urandom(4), "little")


def make_cases(n, seed):
    """Configurations drawn from a fixed seed, so the coverage is the same every run."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        rank = 1 + i % 3
        k, s, d, c, shape = [], [], [], [], []
        for _ in range(rank):
            ka = int(rng.integers(2, 8 if rank == 1 else 5))
            da = int(rng.choice([1, 1, 2, 3]))
            sa = int(rng.choice([1, rng.integers(1, ka + 1), ka]))
            # Tiny (exactly k*d), border-dominated and roomier axes.
            extra = int(rng.choice([0, 1, 3, rng.integers(4, 14 if rank == 1 else 6)]))
            k.append(ka), s.append(sa), d.append(da), c.append(bool(rng.random() < 0.35))
            shape.append(ka * da + extra)
        h_kv = int(rng.choice([1, 2]))
        h = h_kv * int(rng.choice([1, 2]))
        dim = int(rng.choice([4, 8]))
        d_v = int(rng.choice([dim, 6]))
        n_extra = int(rng.choice([0, 0, 3]))
        tile = None if rng.random() < 0.4 else tuple(int(rng.integers(1, 6)) for _ in range(rank))
        kv_tile = None if tile is None else tuple(int(rng.integers(1, 6)) for _ in range(rank))
        scale = None if rng.random() < 0.7 else float(rng.uniform(0.1, 1.0))
        cases.append(dict(shape=tuple(shape), kernel_size=tuple(k), stride=tuple(s),
                          dilation=tuple(d), is_causal=tuple(c), b=int(rng.integers(1, 3)),
                          h=h, h_kv=h_kv, dim=dim, d_v=d_v, n_extra=n_extra, tile=tile,
                          kv_tile=kv_tile, scale=scale,
                          fold=i % 4 != 1))  # explicit tiles: every 4th tiles dilation directly
    return cases


def case_id(case):
    return ("{shape}-k{kernel_size}-s{stride}-d{dilation}-c{is_causal}-h{h}/{h_kv}-"
            "D{dim}/{d_v}-x{n_extra}-t{tile}".format(**case).replace(" ", ""))


def inputs(case, rng):
    b, shape = case["b"], case["shape"]
    arrays = [rng.standard_normal((b,) + shape + (case["h"], case["dim"])),
              rng.standard_normal((b,) + shape + (case["h_kv"], case["dim"])),
              rng.standard_normal((b,) + shape + (case["h_kv"], case["d_v"]))]
    if case["n_extra"]:
        arrays += [rng.standard_normal((b, case["n_extra"], case["h_kv"], case["dim"])),
                   rng.standard_normal((b, case["n_extra"], case["h_kv"], case["d_v"]))]
    else:
        arrays += [None, None]
    d_out = rng.standard_normal((b,) + shape + (case["h"], case["d_v"]))
    d_lse = rng.standard_normal((b,) + shape + (case["h"],))
    return arrays, d_out, d_lse


def gna(case, q, k, v, ak=None, av=None):
    """The op under test: the public call, or xla.attention with explicit tiles."""
    win = dict(kernel_size=case["kernel_size"], stride=case["stride"],
               dilation=case["dilation"], is_causal=case["is_causal"], scale=case["scale"])
    if case["tile"] is None:
        return jax_gna.neighborhood_attention(q, k, v, **win, additional_keys=ak,
                                              additional_values=av, return_lse=True,
                                              backend="xla")
    problem = params.make_problem(q, k, v, **win)
    out, lse = xla.attention(q, k, v, problem, q_tile=case["tile"], kv_tile=case["kv_tile"],
                             fold_dilation=case["fold"])
    if ak is not None:
        out, lse = xla.merge(out, lse, *xla.dense_attention(q, ak, av, problem.scale))
    return out, lse


def check_case(case, dtype, rtol):
    rng = np.random.default_rng(DATA_SEED)
    (q, k, v, ak, av), d_out, d_lse = inputs(case, rng)
    ref_out, ref_lse, ref_grads = reference.attention(
        q, k, v, case["kernel_size"], case["stride"], case["dilation"], case["is_causal"],
        case["scale"], ak, av, d_out=d_out, d_lse=d_lse)
    cast = lambda x: None if x is None else jnp.asarray(x, dtype)  # noqa: E731
    primals = [cast(x) for x in (q, k, v, ak, av)]
    n_diff = 5 if ak is not None else 3
    f = jax.jit(lambda *a: gna(case, *a[:3], *(a[3:] if n_diff == 5 else (None, None))))
    (out, lse), vjp = jax.vjp(f, *primals[:n_diff])
    grads = vjp((cast(d_out), jnp.asarray(d_lse, lse.dtype)))
    msg = f"case {case_id(case)} dtype {dtype.__name__} data seed {DATA_SEED}"
    assert out.dtype == dtype and out.shape == ref_out.shape, msg
    assert lse.dtype == (jnp.float64 if dtype == jnp.float64 else jnp.float32), msg
    for name, got, want in [("out", out, ref_out), ("lse", lse, ref_lse)] + list(
            zip(["dq", "dk", "dv", "d_additional_keys", "d_additional_values"], grads,
                ref_grads)):
        got = np.asarray(got, np.float64)
        assert got.shape == want.shape, f"{name}: {msg}"
        err = np.abs(got - want).max() / max(np.abs(want).max(), 1.0)
        assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol:.0e}; {msg}"


CASES = make_cases(36, seed=20261123)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_sweep_float64(case):
    with jax.enable_x64(True):
        check_case(case, jnp.float64, 1e-10)


@pytest.mark.parametrize("case", CASES[::2], ids=case_id)
def test_sweep_float32(case):
    check_case(case, jnp.float32, 2e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES[1:12:5], ids=case_id)
def test_sweep_half(case, dtype):
    check_case(case, dtype, 3e-2 if dtype == jnp.bfloat16 else 5e-3)


def test_self_attention_limit():
    """k == L, non-causal, is plain softmax attention."""
    rng = np.random.default_rng(DATA_SEED)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 6, 5, 3, 8)), jnp.float32) for _ in range(3))
    out = jax_gna.na2d(q, k, v, (6, 5), backend="xla")
    dense = jax.nn.dot_product_attention(q.reshape(2, 30, 3, 8), k.reshape(2, 30, 3, 8),
                                         v.reshape(2, 30, 3, 8))
    np.testing.assert_allclose(out.reshape(2, 30, 3, 8), dense, rtol=2e-5, atol=2e-5)


def test_blocked_attention_equals_independent_blocks():
    """stride == kernel_size with L % k == 0 is blocked (Swin-style) attention."""
    rng = np.random.default_rng(DATA_SEED)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 12, 2, 8)), jnp.float32) for _ in range(3))
    out = jax_gna.na1d(q, k, v, 4, stride=4, backend="xla")
    for blk in range(3):
        sl = slice(4 * blk, 4 * blk + 4)
        want = jax.nn.dot_product_attention(q[:, sl], k[:, sl], v[:, sl])
        np.testing.assert_allclose(out[:, sl], want, rtol=2e-5, atol=2e-5)


attention = jax.jit(xla.attention, static_argnums=(3,), static_argnames=("q_tile", "kv_tile"))


def test_query_block_inside_key_block():
    """Non-zero origins compute exactly the slice of the global result (sharding's basis)."""
    rng = np.random.default_rng(DATA_SEED)
    shape = (13, 11)
    q, k, v = (jnp.asarray(rng.standard_normal((1,) + shape + (2, 4)), jnp.float32)
               for _ in range(3))
    win = dict(kernel_size=(3, 4), stride=(2, 1), dilation=(2, 1), is_causal=(False, True))
    whole = params.make_problem(q, k, v, **win)
    out, lse = attention(q, k, v, whole)
    block = whole.replace(q_origin=(5, 4), q_extent=(4, 5), kv_origin=(1, 0), kv_extent=(12, 9))
    qb = q[:, 5:9, 4:9]
    kb, vb = k[:, 1:13, 0:9], v[:, 1:13, 0:9]
    ob, lb = attention(qb, kb, vb, block, q_tile=(3, 2), kv_tile=(2, 3))
    np.testing.assert_allclose(ob, out[:, 5:9, 4:9], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lb, lse[:, 5:9, 4:9], rtol=1e-5, atol=1e-6)
    # dK/dV of the block are the contributions of its queries only.
    dq, dk, dv = jax.jit(jax.grad(lambda a, b, c: xla.attention(a, b, c, block)[0].sum(),
                                  argnums=(0, 1, 2)))(qb, kb, vb)
    mask_q = jnp.zeros(shape).at[5:9, 4:9].set(1.0)[None, :, :, None, None]
    gq, gk, gv = jax.jit(jax.grad(
        lambda a, b, c: (xla.attention(a, b, c, whole)[0] * mask_q).sum(), argnums=(0, 1, 2)))(
            q, k, v)
    np.testing.assert_allclose(dq, gq[:, 5:9, 4:9], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dk, gk[:, 1:13, 0:9], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dv, gv[:, 1:13, 0:9], rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(gk[:, :, 9:]).max()) == 0.0  # nothing outside the key block


class TestTransformations:
    shape, win = (9, 7), dict(kernel_size=(3, 5), stride=(1, 2), dilation=(2, 1))

    def data(self):
        rng = np.random.default_rng(DATA_SEED)
        return [jnp.asarray(rng.standard_normal((2,) + self.shape + (2, 8)), jnp.float32)
                for _ in range(3)]

    def f(self, q, k, v):
        out, lse = jax_gna.na2d(q, k, v, **self.win, return_lse=True, backend="xla")
        return (out ** 2).sum() + (jnp.sin(lse)).sum()

    def test_grad_jit_checkpoint_agree(self):
        q, k, v = self.data()
        g1 = jax.jit(jax.grad(self.f, argnums=(0, 1, 2)))(q, k, v)
        g2 = jax.jit(jax.grad(jax.checkpoint(self.f), argnums=(0, 1, 2)))(q, k, v)
        with jax.enable_x64(True):
            ref = jax.jit(jax.grad(self.f, argnums=(0, 1, 2)))(
                *(x.astype(jnp.float64) for x in (q, k, v)))
        for a, b, c in zip(ref, g1, g2):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(c, b, rtol=1e-6, atol=1e-6)
            assert float(jnp.abs(a).max()) > 0

    def test_vmap_over_leading_axis(self):
        q, k, v = self.data()
        qs, ks, vs = (jnp.stack([x, x[::-1] * 0.5]) for x in (q, k, v))
        one = jax.jit(lambda a, b, c: jax_gna.na2d(a, b, c, **self.win, backend="xla"))
        batched = jax.jit(jax.vmap(one))(qs, ks, vs)
        for i in range(2):
            np.testing.assert_allclose(batched[i], one(qs[i], ks[i], vs[i]), rtol=1e-6,
                                       atol=1e-6)
        grad = jax.grad(self.f)
        gb = jax.jit(jax.vmap(grad))(qs, ks, vs)
        np.testing.assert_allclose(gb[1], jax.jit(grad)(qs[1], ks[1], vs[1]), rtol=1e-5,
                                   atol=1e-6)

    def test_gradient_matches_finite_differences(self):
        with jax.enable_x64(True):
            q, k, v = (x.astype(jnp.float64) for x in self.data())
            f = jax.jit(lambda q: self.f(q, k, v))
            g = jax.grad(f)(q)
            direction = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape))
            eps = 1e-6
            fd = (f(q + eps * direction) - f(q - eps * direction)) / (2 * eps)
            assert abs(float(fd) - float((g * direction).sum())) < 1e-6 * max(1.0, abs(float(fd)))


def test_memory_is_linear_in_tokens():
    """Forward+backward of 16,384 tokens with kernel 63 stays far below one
    [tokens, tokens] float32 buffer (1 GiB)."""
    n = 16384
    spec = jax.ShapeDtypeStruct((1, n, 2, 32), jnp.float32)

    def loss(q, k, v):
        out, lse = jax_gna.na1d(q, k, v, 63, return_lse=True, backend="xla")
        return (out ** 2).sum() + lse.sum()

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    dense = n * n * 4
    assert temp < dense / 4, f"temporary memory {temp / 2**20:.0f} MiB"
    # Doubling the tokens about doubles the memory (linear, not quadratic).
    spec2 = jax.ShapeDtypeStruct((1, 2 * n, 2, 32), jnp.float32)
    temp2 = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
        spec2, spec2, spec2).compile().memory_analysis().temp_size_in_bytes
    assert temp2 < 3 * temp, (temp, temp2)


def _plain_attention(q, k, v, scale):
    """Softmax attention of every query over all keys, by jnp and autodiff: [B, N, H, D]."""
    g = q.shape[-2] // k.shape[-2]
    k, v = jnp.repeat(k, g, axis=-2), jnp.repeat(v, g, axis=-2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    lse = jax.nn.logsumexp(s, axis=-1)
    out = jnp.einsum("bhqk,bkhe->bqhe", jnp.exp(s - lse[..., None]), v)
    return out, lse.transpose(0, 2, 1)


@pytest.mark.parametrize("spatial,chunk", [((30,), 7), ((5, 6), 30), ((2, 3, 5), 4)])
@pytest.mark.parametrize("dtype,rtol", [(jnp.float64, 1e-12), (jnp.float32, 1e-5),
                                        (jnp.bfloat16, 2e-2)])
def test_dense_attention_and_its_backward(spatial, chunk, dtype, rtol):
    """xla.dense_attention (chunks of queries, the last one padded) and its gradients,
    also through xla.dense_backward (the protocol's dense.backward), against plain
    attention differentiated by JAX in float64: GQA, D_v != D, the lse's gradient."""
    rng = np.random.default_rng(len(spatial) * 100 + chunk)
    b, h, h_kv, d, d_v, s = 2, 4, 2, 8, 6, 9
    q = rng.standard_normal((b, *spatial, h, d))
    k, v = rng.standard_normal((b, s, h_kv, d)), rng.standard_normal((b, s, h_kv, d_v))
    d_out = rng.standard_normal((b, *spatial, h, d_v))
    d_lse = rng.standard_normal((b, *spatial, h))
    n = math.prod(spatial)
    flat = lambda x: x.reshape(b, n, *x.shape[1 + len(spatial):])  # noqa: E731
    with jax.enable_x64(True):
        (want_out, want_lse), vjp = jax.vjp(lambda q, k, v: _plain_attention(flat(q), k, v, 0.4),
                                            q, k, v)
        want = (want_out, want_lse) + vjp((flat(d_out), flat(d_lse)))
        cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
        (out, lse), vjp = jax.vjp(lambda q, k, v: xla.dense_attention(q, k, v, 0.4, chunk=chunk),
                                  cast(q), cast(k), cast(v))
        got = (out, lse) + vjp((cast(d_out), jnp.asarray(d_lse, lse.dtype)))
        again = xla.dense_backward(cast(q), cast(k), cast(v), out, lse, cast(d_out),
                                   jnp.asarray(d_lse, lse.dtype), 0.4, chunk=chunk)
    assert out.dtype == dtype
    assert lse.dtype == (jnp.float64 if dtype == jnp.float64 else jnp.float32)
    for name, a, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        a, w = np.asarray(a, np.float64), np.asarray(w)
        a = a.reshape(w.shape)
        err = np.abs(a - w).max() / max(np.abs(w).max(), 1.0)
        assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol:.0e}"
    for a, w in zip(again, got[2:]):
        assert a.dtype == w.dtype and np.array_equal(np.asarray(a), np.asarray(w))
