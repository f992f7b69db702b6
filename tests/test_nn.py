"""Tests of the Flax layers in :mod:`jax_gna.nn` (CPU, small shapes)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

flax = pytest.importorskip("flax")
optax = pytest.importorskip("optax")
from flax import linen, nnx  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_gna  # noqa: E402
from jax_gna import nn as gn  # noqa: E402
from jax_gna import reference  # noqa: E402

NNX = {1: gn.NeighborhoodAttention1D, 2: gn.NeighborhoodAttention2D,
       3: gn.NeighborhoodAttention3D}
LINEN = {1: gn.NeighborhoodAttention1DLinen, 2: gn.NeighborhoodAttention2DLinen,
         3: gn.NeighborhoodAttention3DLinen}
SPATIAL = {1: (12,), 2: (6, 5), 3: (4, 5, 4)}


def _x(shape, seed=0, dtype=jnp.float32):
    # NumPy, not jax.random: compiling a jax.random.normal per shape costs seconds on CPU.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _np_init(key, shape, dtype=jnp.float32):
    """A cheap kernel initializer for tests (the default one compiles per shape)."""
    return jnp.asarray(0.2 * np.random.default_rng(sum(shape)).standard_normal(shape), dtype)


def _shape_of(fn, *args):
    """Output shape (and dtype) of ``fn(*args)`` by tracing only: no compilation."""
    out = jax.eval_shape(fn, *args)
    return out.shape, out.dtype


def _params(m: nnx.Module) -> dict:
    """NNX parameters as a flat dict of arrays (the Linen ``params`` collection)."""
    return {k: v[...] for k, v in nnx.state(m, nnx.Param).items()}


def _random_params(m: nnx.Module, seed: int = 1) -> None:
    """Give every parameter (norm scales and biases included) random values."""
    for i, name in enumerate(sorted(m.config.param_shapes())):
        var = getattr(m, name)
        var[...] = 1.0 + 0.3 * _x(var.shape, seed * 100 + i) if "norm" in name else \
            0.3 * _x(var.shape, seed * 100 + i)


# --------------------------------------------------------------------------
# Shapes, parameter counts, validation.
# --------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [1, 2, 3])
def test_shapes(rank):
    spatial = SPATIAL[rank]
    m = NNX[rank](4, 16, kernel_size=3, qkv_features=24, out_features=10, num_kv_heads=2,
                  normalize_qk=True, rope=True, backend="xla",
                  kernel_init=_np_init, rngs=nnx.Rngs(0))
    assert m.num_spatial_dims == rank
    assert _shape_of(m, _x((2, *spatial, 16)))[0] == (2, *spatial, 10)
    # Several leading batch axes.
    assert _shape_of(m, _x((3, 2, *spatial, 16)))[0] == (3, 2, *spatial, 10)
    lm = LINEN[rank](num_heads=4, kernel_size=3, qkv_features=24, out_features=10,
                     num_kv_heads=2, normalize_qk=True, rope=True, backend="xla")
    variables = jax.eval_shape(lm.init, jax.random.key(0), _x((2, *spatial, 16)))
    assert _shape_of(lm.apply, variables, _x((2, *spatial, 16)))[0] == (2, *spatial, 10)


def test_general_class_and_rank_checks():
    m = gn.NeighborhoodAttention(2, 8, kernel_size=(3, 2), num_spatial_dims=2,
                                 kernel_init=_np_init, rngs=nnx.Rngs(0))
    assert _shape_of(m, _x((1, 5, 4, 8)))[0] == (1, 5, 4, 8)
    with pytest.raises(ValueError, match="num_spatial_dims"):
        gn.NeighborhoodAttention(2, 8, kernel_size=3, kernel_init=_np_init, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="spatial axes"):
        gn.NeighborhoodAttention2D(2, 8, kernel_size=3, num_spatial_dims=3,
                                   kernel_init=_np_init, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="kernel_size"):
        gn.NeighborhoodAttention2D(2, 8, kernel_size=(3, 3, 3),
                                   kernel_init=_np_init, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="kernel_size"):
        gn.NeighborhoodAttention2D(2, 8, kernel_size=1, kernel_init=_np_init, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="stride"):
        gn.NeighborhoodAttention1D(2, 8, kernel_size=3, stride=4,
                                   kernel_init=_np_init, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_kv_heads"):
        gn.NeighborhoodAttention1D(4, 8, kernel_size=3, num_kv_heads=3,
                                   kernel_init=_np_init, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="qkv_features"):
        gn.NeighborhoodAttention1D(3, 8, kernel_size=3, kernel_init=_np_init, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="backend"):
        gn.NeighborhoodAttention1D(2, 8, kernel_size=3, backend="tpu",
                                   kernel_init=_np_init, rngs=nnx.Rngs(0))
    m = gn.NeighborhoodAttention2D(2, 8, kernel_size=3, kernel_init=_np_init, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="in_features"):
        m(_x((1, 5, 5, 6)))
    with pytest.raises(ValueError, match="kernel_size"):  # the op checks k <= L
        m(_x((1, 2, 5, 8)))


@pytest.mark.parametrize("use_bias,normalize_qk,context", [(True, False, None),
                                                            (False, True, None),
                                                            (True, True, 12)])
def test_parameter_counts(use_bias, normalize_qk, context):
    c, h, hkv, qkv, out = 16, 4, 2, 32, 20
    d = qkv // h
    m = gn.NeighborhoodAttention2D(h, c, kernel_size=3, qkv_features=qkv, out_features=out,
                                   num_kv_heads=hkv, use_bias=use_bias,
                                   normalize_qk=normalize_qk, context_features=context,
                                   kernel_init=_np_init, rngs=nnx.Rngs(0))
    expected = c * h * d + 2 * c * hkv * d + h * d * out
    if use_bias:
        expected += h * d + 2 * hkv * d + out
    if normalize_qk:
        expected += 2 * d
    if context:
        expected += 2 * context * hkv * d + (2 * hkv * d if use_bias else 0)
    count = sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert count == expected
    lm = gn.NeighborhoodAttention2DLinen(num_heads=h, kernel_size=3, qkv_features=qkv,
                                         out_features=out, num_kv_heads=hkv,
                                         use_bias=use_bias, normalize_qk=normalize_qk,
                                         context_features=context)
    args = (_x((1, 4, 4, c)),) + ((_x((1, 3, context)),) if context else ())
    variables = linen.unbox(jax.eval_shape(lm.init, jax.random.key(0), *args))
    assert sum(p.size for p in jax.tree.leaves(variables)) == expected
    assert (jax.tree.map(lambda a: a.shape, variables["params"])
            == jax.tree.map(jnp.shape, _params(m)))


def test_kernel_init_sees_fan_in():
    calls = []

    def init(key, shape, dtype=jnp.float32):
        calls.append(tuple(shape))
        return jnp.zeros(shape, dtype)

    gn.NeighborhoodAttention1D(4, 16, kernel_size=3, qkv_features=32, out_features=8,
                               num_kv_heads=2, kernel_init=init, rngs=nnx.Rngs(0))
    assert sorted(calls) == sorted([(16, 32), (16, 16), (16, 16), (32, 8)])


# --------------------------------------------------------------------------
# Sharding metadata.
# --------------------------------------------------------------------------

def test_sharding_metadata_nnx_and_linen():
    m = gn.NeighborhoodAttention2D(4, 16, kernel_size=3, num_kv_heads=2, normalize_qk=True,
                                   context_features=8, kernel_init=_np_init, rngs=nnx.Rngs(0))
    specs = nnx.get_partition_spec(nnx.state(m, nnx.Param))
    names = set(m.config.param_shapes())
    assert names == set(gn.LOGICAL_AXES)  # every documented parameter exists here
    for name in names:
        assert getattr(m, name).get_metadata()["out_sharding"] == gn.LOGICAL_AXES[name]
        assert specs[name].get_value() == P(*gn.LOGICAL_AXES[name])
    lm = gn.NeighborhoodAttention2DLinen(num_heads=4, kernel_size=3, num_kv_heads=2,
                                         normalize_qk=True, context_features=8)
    boxed = jax.eval_shape(lm.init, jax.random.key(0), _x((1, 4, 4, 16)), _x((1, 3, 8)))
    lspecs = linen.get_partition_spec(boxed)["params"]
    for name in names:
        assert lspecs[name] == P(*gn.LOGICAL_AXES[name])
    rules = (("heads", "model"), ("kv_heads", "model"), ("embed", None), ("head_dim", None))
    mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    shardings = linen.logical_to_mesh_sharding(lspecs, mesh, rules)
    assert shardings["query_kernel"].spec == P(None, "model", None)
    assert shardings["out_kernel"].spec == P("model", None, None)


def test_eager_sharding_under_mesh():
    n = 2 if len(jax.devices()) >= 2 else 1
    mesh = jax.make_mesh((n,), ("model",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:n])
    rules = (("heads", "model"), ("kv_heads", "model"), ("embed", None), ("head_dim", None))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        m = gn.NeighborhoodAttention2D(4, 16, kernel_size=3, num_kv_heads=2,
                                       kernel_init=_np_init, rngs=nnx.Rngs(0))
        assert m.query_kernel[...].sharding.spec == P(None, "model", None)
        assert m.out_kernel[...].sharding.spec == P("model", None, None)
        y = nnx.jit(lambda m, x: m(x))(m, _x((2, 4, 4, 16)))
    assert y.shape == (2, 4, 4, 16)


# --------------------------------------------------------------------------
# Equality with the functional op.
# --------------------------------------------------------------------------

def _manual(m: gn.NeighborhoodAttention, x, context=None, ak=None, av=None):
    """The layer written out with the public op, from the module's parameters."""
    p, cfg = _params(m), m.config

    def proj(t, name):
        y = jnp.einsum("...c,chd->...hd", t, p[name + "_kernel"])
        return y + p[name + "_bias"] if name + "_bias" in p else y

    def rms(t, s):
        return t / jnp.sqrt(jnp.mean(t * t, -1, keepdims=True) + 1e-6) * s

    q, k, v = proj(x, "query"), proj(x, "key"), proj(x, "value")
    if cfg.normalize_qk:
        q, k = rms(q, p["query_norm_scale"]), rms(k, p["key_norm_scale"])
    if cfg.rope:
        q, k = gn.apply_rope(q, cfg.rope_theta), gn.apply_rope(k, cfg.rope_theta)
    eks, evs = [], []
    if context is not None:
        pre = "context_" if cfg.context_features else ""
        ck, cv = proj(context, pre + "key"), proj(context, pre + "value")
        if cfg.normalize_qk:
            ck = rms(ck, p["key_norm_scale"])
        eks.append(ck)
        evs.append(cv)
    if ak is not None:
        eks.append(ak)
        evs.append(av)
    o = jax_gna.neighborhood_attention(
        q, k, v, cfg.kernel_size, cfg.stride, cfg.dilation, cfg.is_causal, backend="xla",
        additional_keys=jnp.concatenate(eks, 1) if eks else None,
        additional_values=jnp.concatenate(evs, 1) if evs else None)
    y = jnp.einsum("...hd,hdo->...o", o, p["out_kernel"])
    return y + p["out_bias"] if "out_bias" in p else y


@pytest.mark.parametrize("rank,kw", [
    (1, dict(kernel_size=5, stride=2, dilation=2, is_causal=True)),
    (2, dict(kernel_size=(3, 4), stride=(1, 2), is_causal=(True, False), num_kv_heads=2)),
    (2, dict(kernel_size=3, normalize_qk=True, rope=True, num_kv_heads=1)),
    (3, dict(kernel_size=(2, 3, 2), dilation=(2, 1, 1), rope=True, use_bias=False)),
])
def test_matches_functional_op(rank, kw):
    spatial = SPATIAL[rank]
    m = NNX[rank](4, 16, qkv_features=32, out_features=12, backend="xla",
                  kernel_init=_np_init, rngs=nnx.Rngs(0),
                  **kw)
    _random_params(m)
    x = _x((2, *spatial, 16), 3)
    got, want = nnx.jit(lambda m, x: (m(x), _manual(m, x)))(m, x)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_additional_tokens():
    hkv, d = 2, 8
    m = gn.NeighborhoodAttention2D(4, 16, kernel_size=3, qkv_features=32, num_kv_heads=hkv,
                                   normalize_qk=True, rope=True, context_features=6,
                                   backend="xla", kernel_init=_np_init, rngs=nnx.Rngs(0))
    _random_params(m)
    x, ctx = _x((2, 5, 5, 16), 1), _x((2, 3, 6), 2)
    ak, av = _x((2, 4, hkv, d), 3), _x((2, 4, hkv, d), 4)

    @nnx.jit
    def run(m, x, ctx, ak, av):
        return (m(x, ctx, additional_keys=ak, additional_values=av), _manual(m, x, ctx, ak, av),
                m(x), m(x, additional_keys=ak, additional_values=av),
                _manual(m, x, None, ak, av))

    out, want, plain, out_kv, want_kv = run(m, x, ctx, ak, av)
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)
    assert not np.allclose(out, plain, atol=1e-3)  # the extra tokens matter
    np.testing.assert_allclose(out_kv, want_kv, rtol=2e-5, atol=2e-5)
    # Without context_features, context shares the key/value projections.
    m2 = gn.NeighborhoodAttention1D(2, 8, kernel_size=3, backend="xla",
                                    kernel_init=_np_init, rngs=nnx.Rngs(0))
    x2, c2 = _x((1, 7, 8), 5), _x((1, 2, 8), 6)
    got, want = nnx.jit(lambda m, x, c: (m(x, c), _manual(m, x, c)))(m2, x2, c2)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="context"):
        jax.eval_shape(m2, x2, _x((1, 2, 5)))
    with pytest.raises(ValueError, match="additional_keys"):
        jax.eval_shape(lambda: m(x, additional_keys=ak[:, :, :1], additional_values=av))


def test_rope_is_relative():
    """Rotated q.k depends only on the offset between positions, and rope keeps norms."""
    d = 12
    q = jnp.broadcast_to(_x((1, 1, 1, 1, d), 1), (1, 6, 7, 1, d))
    k = jnp.broadcast_to(_x((1, 1, 1, 1, d), 2), (1, 6, 7, 1, d))
    rq, rk = gn.apply_rope(q), gn.apply_rope(k)
    np.testing.assert_allclose(jnp.linalg.norm(rq, axis=-1), jnp.linalg.norm(q, axis=-1),
                               rtol=1e-5)
    s = jnp.einsum("xyd,uvd->xyuv", rq[0, :, :, 0], rk[0, :, :, 0])
    np.testing.assert_allclose(s[1, 2, 3, 1], s[3, 5, 5, 4], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s[0, 0, 2, 2], s[2, 3, 4, 5], rtol=1e-4, atol=1e-5)
    assert abs(float(s[0, 0, 2, 2]) - float(s[0, 0, 2, 3])) > 1e-4


def test_dtypes():
    m = gn.NeighborhoodAttention2D(2, 8, kernel_size=3, dtype=jnp.bfloat16, normalize_qk=True,
                                   rope=True, kernel_init=_np_init, rngs=nnx.Rngs(0))
    assert m.query_kernel[...].dtype == jnp.float32
    assert _shape_of(m, _x((1, 4, 4, 8)))[1] == jnp.bfloat16
    m = gn.NeighborhoodAttention2D(2, 8, kernel_size=3, param_dtype=jnp.bfloat16,
                                   kernel_init=_np_init, rngs=nnx.Rngs(0))
    assert m.query_kernel[...].dtype == jnp.bfloat16
    assert _shape_of(m, _x((1, 4, 4, 8), dtype=jnp.bfloat16))[1] == jnp.bfloat16


# --------------------------------------------------------------------------
# Gradients.
# --------------------------------------------------------------------------

def _dense_reference(cfg: gn.AttentionConfig, p: dict, x):
    """The layer in float64 with a dense masked softmax (no jax_gna op involved)."""
    spatial = x.shape[1:-1]
    mask = jnp.asarray(reference.neighbor_mask(spatial, cfg.kernel_size, cfg.stride,
                                               cfg.dilation, cfg.is_causal))
    b, n = x.shape[0], math.prod(spatial)
    proj = lambda name: jnp.einsum("...c,chd->...hd", x, p[name + "_kernel"]) + p[name + "_bias"]
    q, k, v = proj("query"), proj("key"), proj("value")
    q, k = gn.apply_rope(q, cfg.rope_theta), gn.apply_rope(k, cfg.rope_theta)
    q, k, v = (t.reshape(b, n, t.shape[-2], t.shape[-1]) for t in (q, k, v))
    g = cfg.num_heads // cfg.num_kv_heads
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * cfg.head_dim ** -0.5
    s = jnp.where(mask, s, -jnp.inf)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v)
    y = jnp.einsum("bqhd,hdo->bqo", o, p["out_kernel"]) + p["out_bias"]
    return y.reshape(b, *spatial, -1)


def test_gradients_match_float64_dense():
    cfg_kw = dict(kernel_size=(3, 2), stride=(2, 1), is_causal=(False, True), num_kv_heads=2,
                  rope=True)
    m = gn.NeighborhoodAttention2D(4, 16, backend="xla",
                                   kernel_init=_np_init, rngs=nnx.Rngs(0), **cfg_kw)
    _random_params(m)
    x = _x((2, 5, 4, 16), 7)
    w = _x((2, 5, 4, 16), 8)

    def loss(m, x):
        return jnp.sum(m(x) * w)

    gm, gx = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(m, x)
    gm = {k: v[...] for k, v in gm.items()}
    for g in jax.tree.leaves((gm, gx)):
        assert np.all(np.isfinite(g))
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), _params(m))
        x64, w64 = jnp.asarray(np.asarray(x, np.float64)), jnp.asarray(np.asarray(w, np.float64))
        ref = jax.grad(lambda p, x: jnp.sum(_dense_reference(m.config, p, x) * w64),
                       argnums=(0, 1))(p64, x64)
        ref = jax.tree.map(np.asarray, ref)
    for name in gm:
        np.testing.assert_allclose(gm[name], ref[0][name], rtol=1e-4, atol=1e-4, err_msg=name)
    np.testing.assert_allclose(gx, ref[1], rtol=1e-4, atol=1e-4)


def test_linen_and_nnx_agree():
    kw = dict(kernel_size=(3, 3), stride=(1, 2), num_kv_heads=2, qkv_features=16,
              out_features=6, normalize_qk=True, rope=True, context_features=5, backend="xla")
    m = gn.NeighborhoodAttention2D(4, 8, kernel_init=_np_init, rngs=nnx.Rngs(0), **kw)
    _random_params(m)
    lm = gn.NeighborhoodAttention2DLinen(num_heads=4, in_features=8, **kw)
    x, ctx = _x((2, 5, 6, 8), 1), _x((2, 3, 5), 2)
    variables = {"params": _params(m)}
    # Linen init gives the same tree of names and shapes.
    init = linen.unbox(jax.eval_shape(lm.init, jax.random.key(0), x, ctx))
    assert jax.tree.map(lambda a: a.shape, init) == jax.tree.map(jnp.shape, variables)
    # Same values and gradients.
    yl, gl = jax.jit(jax.value_and_grad(lambda v: jnp.sum(lm.apply(v, x, ctx) ** 2)))(variables)
    ym, gm = nnx.jit(nnx.value_and_grad(lambda m: jnp.sum(m(x, ctx) ** 2)))(m)
    np.testing.assert_allclose(yl, ym, rtol=1e-6)
    gl = gl["params"]
    for name, g in gm.items():
        np.testing.assert_allclose(g[...], gl[name], rtol=1e-5, atol=1e-5, err_msg=name)


# --------------------------------------------------------------------------
# Transforms and training.
# --------------------------------------------------------------------------

class _Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.attn = gn.NeighborhoodAttention2D(2, 8, kernel_size=3, normalize_qk=True, rope=True,
                                               backend="xla", kernel_init=_np_init, rngs=rngs)

    def __call__(self, x):
        return x + self.attn(x)


def test_nnx_scan_and_remat_over_layers():
    n_layers = 3

    @nnx.split_rngs(splits=n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs):
        return _Block(rngs)

    blocks = create(nnx.Rngs(0))
    assert blocks.attn.query_kernel.shape == (n_layers, 8, 2, 4)
    # The stacked parameters keep their logical axes, behind the new "layers" axis.
    assert (blocks.attn.query_kernel.get_metadata()["out_sharding"]
            == ("layers",) + gn.LOGICAL_AXES["query_kernel"])

    @nnx.jit
    def forward(blocks, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        @nnx.remat
        def step(block, x):
            return block(x)
        return step(blocks, x)

    x = _x((2, 5, 5, 8), 1)
    y = forward(blocks, x)
    graphdef, state = nnx.split(blocks)

    @jax.jit
    def loop(state, x):
        for i in range(n_layers):
            x = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))(x)
        return x

    np.testing.assert_allclose(y, loop(state, x), rtol=1e-5, atol=1e-5)

    grads = nnx.jit(nnx.grad(lambda b: jnp.sum(forward(b, x) ** 2)))(blocks)
    leaves = jax.tree.leaves(grads)
    assert leaves and all(np.all(np.isfinite(g)) for g in leaves)
    assert grads["attn"]["query_kernel"][...].shape == (n_layers, 8, 2, 4)


def test_jax_jit_and_optax_training():
    m = gn.NeighborhoodAttention1D(2, 8, kernel_size=3, rope=True, backend="xla",
                                   kernel_init=_np_init, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(m, nnx.Param)
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    x = _x((4, 9, 8), 1)
    target = jnp.roll(x, 1, axis=1)

    def loss(params):
        return jnp.mean((nnx.merge(graphdef, params)(x) - target) ** 2)

    @jax.jit
    def step(params, opt_state):
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    first = None
    for _ in range(30):
        params, opt_state, value = step(params, opt_state)
        first = value if first is None else first
    assert float(value) < 0.7 * float(first)

    # The same through nnx.jit and nnx.Optimizer.
    m = gn.NeighborhoodAttention1D(2, 8, kernel_size=3, backend="xla",
                                   kernel_init=_np_init, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(m, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def nnx_step(m, opt):
        value, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(m)
        opt.update(m, grads)
        return value

    values = [float(nnx_step(m, opt)) for _ in range(30)]
    assert values[-1] < 0.7 * values[0]


def test_linen_remat():
    lm = linen.remat(gn.NeighborhoodAttention2DLinen)(num_heads=2, kernel_size=3, backend="xla")
    x = _x((1, 4, 4, 8))
    v = jax.jit(lm.init)(jax.random.key(0), x)
    g = jax.jit(jax.grad(lambda v: jnp.sum(lm.apply(v, x) ** 2)))(v)
    assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(linen.unbox(g)))


# --------------------------------------------------------------------------
# attention_fn drop-in for Flax's own multi-head attention.
# --------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [1, 2, 3])
def test_attention_fn_matches_op(rank):
    spatial = SPATIAL[rank]
    fn = gn.make_attention_fn(3, stride=2, is_causal=True, backend="xla")
    q, k, v = (_x((2, *spatial, 4, 8), i) for i in range(3))
    flax_kw = dict(bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
                   dropout_rate=0.0, deterministic=True, dtype=None, precision=None, module=None,
                   is_causal=False, force_fp32_for_softmax=False)
    # Extra leading batch axes need num_spatial_dims.
    fn_r = gn.make_attention_fn(3, stride=2, is_causal=True, num_spatial_dims=rank,
                                backend="xla")

    @jax.jit
    def run(q, k, v):
        qq, kk, vv = (t.reshape(1, *t.shape) for t in (q, k, v))
        return (jax_gna.neighborhood_attention(q, k, v, 3, 2, 1, True, backend="xla"),
                fn(q, k, v, **flax_kw), fn_r(qq, kk, vv)[0])

    ref, got, got_r = run(q, k, v)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_r, ref, rtol=1e-6, atol=1e-6)


def test_attention_fn_in_flax_mha():
    fn = gn.make_attention_fn((3, 3), backend="xla")
    x = _x((2, 6, 5, 16), 1)
    mha = nnx.MultiHeadAttention(4, 16, attention_fn=fn, decode=False,
                                 kernel_init=_np_init, rngs=nnx.Rngs(0))

    @nnx.jit
    def run(mha, x):
        q, k, v = mha.query(x), mha.key(x), mha.value(x)
        return (mha(x), mha.out(jax_gna.na2d(q, k, v, 3, backend="xla")),
                # NNX passes is_causal: True makes every axis causal.
                mha(x, is_causal=True),
                mha.out(jax_gna.na2d(q, k, v, 3, is_causal=True, backend="xla")))

    y, ref, y_c, ref_c = run(mha, x)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_c, ref_c, rtol=1e-5, atol=1e-5)
    g = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(mha)
    assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(g))

    lmha = linen.MultiHeadDotProductAttention(num_heads=4, attention_fn=fn)
    v = jax.eval_shape(lmha.init, jax.random.key(0), x)
    v = jax.tree.map(lambda s: _x(s.shape, 4) * 0.3, v)

    @jax.jit
    def run_linen(v, x):
        p = v["params"]
        proj = lambda n: jnp.einsum("...c,chd->...hd", x, p[n]["kernel"]) + p[n]["bias"]
        o = jax_gna.na2d(proj("query"), proj("key"), proj("value"), 3, backend="xla")
        return (lmha.apply(v, x),
                jnp.einsum("...hd,hdo->...o", o, p["out"]["kernel"]) + p["out"]["bias"])

    y, ref = run_linen(v, x)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="mask"):
        jax.eval_shape(lambda: lmha.apply(v, x, mask=jnp.ones((2, 6, 4, 5, 5), bool)))


def test_arguments_checked_at_construction():
    """rope_theta (a positive finite number) when the layer is built; make_attention_fn's
    window and scale when the function is made, where the window's rank is known."""
    for theta in (0.0, -1.0, "abc", float("inf")):
        with pytest.raises(ValueError, match="rope_theta"):
            gn.NeighborhoodAttention1D(num_heads=2, in_features=8, kernel_size=2, rope=True,
                                       rope_theta=theta, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="kernel_size"):
        gn.make_attention_fn(1)
    with pytest.raises(ValueError, match="scale"):
        gn.make_attention_fn(3, scale="a")
    with pytest.raises(ValueError):
        gn.make_attention_fn((3, 3), stride=(1, 2, 1))
    gn.make_attention_fn(3, stride=(1, 2))  # the rank comes with the query


def test_attention_fn_refuses_what_it_cannot_do():
    fn = gn.make_attention_fn(3, backend="xla")
    q = _x((1, 5, 5, 2, 4))
    with pytest.raises(ValueError, match="mask"):
        fn(q, q, q, mask=jnp.ones((1, 2, 25, 25), bool))
    with pytest.raises(ValueError, match="bias"):
        fn(q, q, q, bias=jnp.zeros((1, 2, 25, 25)))
    with pytest.raises(ValueError, match="dropout"):
        fn(q, q, q, dropout_rate=0.1, deterministic=False)
    with pytest.raises(ValueError, match="dropout"):  # Flax's default: deterministic=False
        fn(q, q, q, dropout_rate=0.1, dropout_rng=jax.random.key(0))
    with pytest.raises(ValueError, match="qk_attn_weights_einsum"):
        fn(q, q, q, qk_attn_weights_einsum=jnp.einsum)
    with pytest.raises(TypeError):  # a misspelt mask is not silently dropped
        fn(q, q, q, maks=jnp.ones((1, 2, 25, 25), bool))
    # every keyword of Flax's own functions is taken (refused or honoured by name)
    import inspect
    ours = set(inspect.signature(fn).parameters)
    for flax_fn in (linen.dot_product_attention, nnx.dot_product_attention):
        assert not set(inspect.signature(flax_fn).parameters) - ours, flax_fn
    half = lambda arrays, dtype: tuple(a.astype(jnp.float16) for a in arrays)  # noqa: E731
    assert _shape_of(lambda q: fn(q, q, q, promote_dtype=half), q)[1] == jnp.float16
    assert _shape_of(lambda q: fn(q, q, q, dropout_rate=0.1, deterministic=True), q)[0] == q.shape
    assert _shape_of(lambda q: fn(q, q, q, dtype=jnp.bfloat16), q)[1] == jnp.bfloat16
    # spatial axes from the query's rank or the kernel size's length: 1, 2 or 3 only
    for f, shape in ((fn, (10, 2, 4)), (fn, (1, 2, 2, 2, 2, 2, 4)),
                     (gn.make_attention_fn((3, 3, 3, 3), backend="xla"), (1, 4, 4, 4, 4, 2, 4))):
        x = _x(shape)
        with pytest.raises(ValueError, match="1, 2 or 3 spatial axes"):
            f(x, x, x)


_SHARDED_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from jax_gna import nn as gn

def init(key, shape, dtype=jnp.float32):
    return jnp.asarray(0.2 * np.random.default_rng(sum(shape)).standard_normal(shape), dtype)

kw = dict(kernel_size=3, num_kv_heads=2, rope=True, normalize_qk=True, backend="xla",
          kernel_init=init)
x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 6, 6, 16)), jnp.float32)
loss = lambda m, x: jnp.sum(m(x) ** 2)
ref_m = gn.NeighborhoodAttention2D(4, 16, rngs=nnx.Rngs(0), **kw)
ref_y, ref_g = nnx.jit(lambda m, x: (m(x), nnx.grad(loss)(m, x)))(ref_m, x)
mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
rules = (("heads", "model"), ("kv_heads", "model"), ("embed", None), ("head_dim", None))
with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    m = gn.NeighborhoodAttention2D(4, 16, rngs=nnx.Rngs(0), **kw)
    assert m.query_kernel[...].sharding.spec == P(None, "model", None)
    assert m.out_kernel[...].sharding.spec == P("model", None, None)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    y, g = nnx.jit(lambda m, x: (m(x), nnx.grad(loss)(m, x)))(m, xs)
np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
for name, v in g.items():
    np.testing.assert_allclose(v[...], ref_g[name][...], rtol=1e-4, atol=1e-4, err_msg=name)
# The same on a mesh with Explicit axes (jax.make_mesh's default): the sum over the
# sharded heads needs the output's sharding (out_sharding, as Flax's MultiHeadAttention)
mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    m = gn.NeighborhoodAttention2D(4, 16, rngs=nnx.Rngs(0), **kw)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    loss_e = lambda m, x: jnp.sum(m(x, out_sharding=P("data")) ** 2)
    y, g = nnx.jit(lambda m, x: (m(x, out_sharding=P("data")), nnx.grad(loss_e)(m, x)))(m, xs)
    assert y.sharding.spec == P("data", None, None, None), y.sharding
np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
for name, v in g.items():
    np.testing.assert_allclose(v[...], ref_g[name][...], rtol=1e-4, atol=1e-4, err_msg=name)
# Under a mesh without logical axis rules (data parallel only) the layer builds with
# replicated parameters (the logical names were read as mesh axes: a ValueError)
with jax.set_mesh(mesh):
    m = gn.NeighborhoodAttention2D(4, 16, rngs=nnx.Rngs(0), **kw)
    y = nnx.jit(lambda m, x: m(x))(m, jax.device_put(x, NamedSharding(mesh, P("data"))))
np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
print("SHARDED_OK")
"""


def test_sharded_layer_matches_unsharded():
    """On 4 CPU devices (2 data x 2 model): heads-sharded parameters, batch-sharded input,
    on Auto and on Explicit mesh axes (with out_sharding)."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "SHARDED_OK" in proc.stdout, proc.stdout + proc.stderr


def test_rope_and_qk_norm_keep_float64():
    """With x64, float64 inputs are rotated and normalized in float64 (float32 tables
    gave errors near 1e-7): against a float64 NumPy rotary embedding (1-D, rotate half)
    and RMS norm, to 1e-12."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 9, 3, 8))
    pos = np.arange(9, dtype=np.float64)[:, None]
    ang = pos * 10000.0 ** (-np.arange(0, 8, 2) / 8)  # [9, 4]
    c, s = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
    want = np.concatenate([x[..., :4] * c - x[..., 4:] * s, x[..., 4:] * c + x[..., :4] * s], -1)
    scale = rng.standard_normal(8)
    want_norm = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + gn._RMS_EPS) * scale
    with jax.enable_x64(True):
        got = gn.apply_rope(jnp.asarray(x))
        got_norm = gn._rms_norm(jnp.asarray(x), jnp.asarray(scale))
        assert got.dtype == got_norm.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(got_norm), want_norm, rtol=1e-12, atol=1e-12)
    got32 = gn.apply_rope(jnp.asarray(x, jnp.float32))  # float32 as before
    assert got32.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got32), want, rtol=1e-5, atol=1e-5)


def test_layer_flags_rank_and_empty_context_refused():
    """Bool options must be bools (``rope="False"`` was True); the fixed-rank Linen
    layers refuse another ``num_spatial_dims`` as the NNX ones do (it silently made a
    2-D layer); an empty ``context`` names ``context``, not ``additional_keys``."""
    x = jnp.ones((1, 8, 8))
    for flag in ("use_bias", "normalize_qk", "rope"):
        with pytest.raises(ValueError, match=f"{flag} must be a bool"):
            gn.NeighborhoodAttention1D(2, 8, kernel_size=3, **{flag: "no"}, rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match=f"{flag} must be a bool"):
            gn.NeighborhoodAttention1DLinen(num_heads=2, kernel_size=3, **{flag: 1}).init(
                jax.random.key(0), x)
    for layer, other in ((gn.NeighborhoodAttention1DLinen, 2), (gn.NeighborhoodAttention2DLinen, 1),
                         (gn.NeighborhoodAttention3DLinen, 1)):
        with pytest.raises(ValueError, match="spatial axes, got num_spatial_dims"):
            jax.eval_shape(layer(num_heads=2, kernel_size=3, num_spatial_dims=other).init,
                           jax.random.key(0), x)
    m = gn.NeighborhoodAttention1D(2, 8, kernel_size=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="context must hold at least one token"):
        m(jnp.ones((2, 8, 8)), context=jnp.ones((2, 0, 8)))
