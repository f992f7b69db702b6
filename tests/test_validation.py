"""Every rejected input of SEMANTICS.md raises ValueError naming the argument, before
any computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_gna


def arrays(spatial=(8, 8), h=2, h_kv=2, d=8, d_v=8, b=1, dtype=jnp.float32):
    q = jnp.zeros((b,) + spatial + (h, d), dtype)
    k = jnp.zeros((b,) + spatial + (h_kv, d), dtype)
    v = jnp.zeros((b,) + spatial + (h_kv, d_v), dtype)
    return q, k, v


def rejects(match, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        jax_gna.neighborhood_attention(*args, **kwargs)


def test_rank():
    q = jnp.zeros((1, 8, 8))
    rejects("query must have rank 4, 5 or 6", q, q, q, 3)
    q7 = jnp.zeros((1, 4, 4, 4, 4, 1, 8))
    rejects("rank 4, 5 or 6", q7, q7, q7, 2)
    q, k, v = arrays()
    k1 = jnp.zeros((1, 64, 2, 8))
    rejects("same rank", q, k1, v, 3)


def test_shapes_disagree():
    q, k, v = arrays()
    rejects("batch and spatial", q, jnp.zeros((2, 8, 8, 2, 8)), v, 3)
    rejects("batch and spatial", q, k, jnp.zeros((1, 8, 9, 2, 8)), 3)
    rejects("same head dim", q, jnp.zeros((1, 8, 8, 2, 16)), v, 3)
    rejects("same number of heads", q, k, jnp.zeros((1, 8, 8, 1, 8)), 3)
    q3, k3, v3 = arrays(h=3, h_kv=2)
    rejects("multiple of the key/value heads", q3, k3, v3, 3)


def test_fixed_rank_functions():
    q, k, v = arrays((8, 8))
    with pytest.raises(ValueError, match="na1d expects 1 spatial axes"):
        jax_gna.na1d(q, k, v, 3)
    with pytest.raises(ValueError, match="na3d expects 3"):
        jax_gna.na3d(q, k, v, 3)
    assert jax_gna.na2d(q, k, v, 3).shape == q.shape


@pytest.mark.parametrize("kwargs,match", [
    (dict(kernel_size=1), "kernel_size must be >= 2"),
    (dict(kernel_size=(3, 1)), "kernel_size must be >= 2"),
    (dict(kernel_size=3, stride=0), "stride must satisfy"),
    (dict(kernel_size=3, stride=4), "stride must satisfy"),
    (dict(kernel_size=(3, 3), stride=(1, 5)), "stride must satisfy"),
    (dict(kernel_size=3, dilation=0), "dilation must be >= 1"),
    (dict(kernel_size=9), "kernel_size \\* dilation must not exceed"),
    (dict(kernel_size=3, dilation=3), "kernel_size=3 \\* dilation=3 = 9 > length 8"),
    (dict(kernel_size=(3, 3, 3)), "has 3 entries, but the inputs have 2 spatial axes"),
    (dict(kernel_size=(3,)), "has 1 entries"),
    (dict(kernel_size=3, stride=(1,)), "stride=\\(1,\\) has 1 entries"),
    (dict(kernel_size=3.0), "kernel_size must be an integer"),
    (dict(kernel_size=(3, 2.5)), "kernel_size must be an integer"),
    (dict(kernel_size=True), "kernel_size must be an integer"),
    (dict(kernel_size=3, stride="1"), "stride must be an integer"),
    (dict(kernel_size=3, dilation=1.0), "dilation must be an integer"),
    (dict(kernel_size=3, is_causal=1), "is_causal must be a bool"),
    (dict(kernel_size=3, is_causal=(True, 0)), "is_causal must be a bool"),
    (dict(kernel_size=3, is_causal=(True,)), "is_causal=\\(True,\\) has 1 entries"),
    (dict(kernel_size=3, scale="x"), "scale must be a real number"),
    (dict(kernel_size=3, scale=float("nan")), "scale must be finite"),
    (dict(kernel_size=3, scale=3e38), "scale 3e\\+38 overflows float32"),
    (dict(kernel_size=3, scale=-3e38), "overflows float32"),
    (dict(kernel_size=3, backend="triton"), "backend must be one of"),
])
def test_bad_parameters(kwargs, match):
    q, k, v = arrays()
    rejects(match, q, k, v, **kwargs)


def test_scale_just_below_float32_overflow_and_float64():
    """The largest scales float32 can take (scale * log2(e) below its maximum) pass, and a
    float64 call (xla backend, x64) takes a scale float32 cannot hold."""
    from jax_gna.params import make_problem

    q, k, v = arrays()
    assert make_problem(q, k, v, 3, scale=2.3e38).scale == 2.3e38
    q64 = jax.ShapeDtypeStruct(q.shape, np.float64)
    with jax.enable_x64(True):
        assert make_problem(q64, q64, q64, 3, scale=1e300).scale == 1e300


def test_not_arrays():
    q, k, v = arrays()
    rejects("query must be an array", np.zeros((1, 8, 8, 2, 8)).tolist(), k, v, 3)
    rejects("additional_values must be an array", q, k, v, 3,
            additional_keys=jnp.zeros((1, 5, 2, 8)), additional_values=[[0.0]])


def test_dtypes():
    q, k, v = arrays()
    rejects("same dtype", q, k.astype(jnp.bfloat16), v, 3)
    rejects("same dtype", q, k, v.astype(jnp.float16), 3)
    qi = jnp.zeros((1, 8, 8, 2, 8), jnp.int32)
    rejects("floating point, got dtype int32", qi, qi, qi, 3)


def test_additional_tokens():
    q, k, v = arrays(h=4, h_kv=2, d=8, d_v=6)
    ak = jnp.zeros((1, 5, 2, 8))
    av = jnp.zeros((1, 5, 2, 6))
    rejects("go together: got only additional_keys", q, k, v, 3, additional_keys=ak)
    rejects("go together: got only additional_values", q, k, v, 3, additional_values=av)
    rejects("additional_keys must have shape \\[batch=1, S_extra, heads_kv=2, dim=8\\]",
            q, k, v, 3, additional_keys=jnp.zeros((1, 5, 4, 8)), additional_values=av)
    rejects("additional_keys must have shape", q, k, v, 3,
            additional_keys=jnp.zeros((2, 5, 2, 8)), additional_values=av)
    rejects("additional_values must have shape \\[batch=1, S_extra=5, heads_kv=2, dim_v=6\\]",
            q, k, v, 3, additional_keys=ak, additional_values=jnp.zeros((1, 4, 2, 6)))
    rejects("additional_values must have shape", q, k, v, 3, additional_keys=ak,
            additional_values=jnp.zeros((1, 5, 2, 8)))
    rejects("additional_keys must have the dtype of query", q, k, v, 3,
            additional_keys=ak.astype(jnp.bfloat16), additional_values=av)
    out = jax_gna.neighborhood_attention(q, k, v, 3, additional_keys=ak, additional_values=av)
    assert out.shape == (1, 8, 8, 4, 6)


def test_rejected_before_any_computation():
    """Validation happens at trace time, on shapes: nothing runs, even under jit."""
    q, k, v = arrays()
    calls = []

    def f(q, k, v):
        calls.append(1)
        return jax_gna.neighborhood_attention(q, k, v, 9)

    with pytest.raises(ValueError, match="must not exceed"):
        jax.jit(f).trace(q, k, v)
    with pytest.raises(ValueError, match="must not exceed"):
        jax.eval_shape(f, q, k, v)


def test_cuda_backend_errors_clearly_without_gpu():
    if any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("a GPU is present")
    q, k, v = arrays()
    with pytest.raises(ValueError, match="backend='cuda' cannot run this call"):
        jax_gna.neighborhood_attention(q, k, v, 3, backend="cuda")
    assert jax_gna.explain(q, k, v, 3).startswith("xla:")
    # explain says why instead of raising; bad inputs still raise
    text = jax_gna.explain(q, k, v, 3, backend="cuda")
    assert text.startswith("cuda: cannot run this call (neighborhood_attention raises"), text
    from jax_gna import ops
    from jax_gna.params import make_problem
    assert text.endswith(ops._cuda_status(make_problem(q, k, v, 3), q, k, v)), text
    with pytest.raises(ValueError, match="must not exceed"):
        jax_gna.explain(q, k, v, 99, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        jax_gna.explain(q, k, v, 3, backend="cudaa")


def test_public_signatures_have_no_private_arguments():
    """The public ops' signatures name only documented arguments (``na1d`` ... ``na3d``
    pass their rank privately), and each fixed-rank op refuses other ranks."""
    import inspect

    for op in (jax_gna.neighborhood_attention, jax_gna.na1d, jax_gna.na2d, jax_gna.na3d,
               jax_gna.explain):
        assert not [p for p in inspect.signature(op).parameters if p.startswith("_")], op
    q = jnp.zeros((1, 6, 6, 2, 8))
    with pytest.raises(ValueError, match="na1d expects 1 spatial axes"):
        jax_gna.na1d(q, q, q, 3)
    with pytest.raises(TypeError):
        jax_gna.neighborhood_attention(q, q, q, 3, _rank=2)


def test_numpy_inputs_accepted():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 10, 2, 4)).astype(np.float32)
    out = jax_gna.na1d(q, q, q, 3)
    assert out.shape == q.shape and np.isfinite(np.asarray(out)).all()


def test_explain_takes_the_op_arguments_only():
    """``explain`` takes what the op takes (``return_lse`` too) and refuses anything else,
    e.g. a misspelt ``additional_keys``, instead of answering for a different call."""
    import jax_gna

    x = np.zeros((1, 8, 2, 4), np.float32)
    assert "xla" in jax_gna.explain(x, x, x, 3, return_lse=True, backend="xla")
    with pytest.raises(TypeError):
        jax_gna.explain(x, x, x, 3, addtional_keys=x[:, :2])
    with pytest.raises(ValueError, match="return_lse must be a bool"):  # as the op checks it
        jax_gna.explain(x, x, x, 3, return_lse="x")


@pytest.mark.parametrize("backend,ready", [("cuda", False), ("cuda", True), ("auto", False), ("auto", True)])
def test_explain_asks_the_cuda_checks_once(monkeypatch, backend, ready):
    """``explain`` asks whether the kernels can run the call once (they are not cheap:
    the CUDA checks and the Hopper eligibility), and answers as the op would."""
    from jax_gna import cuda, ops

    calls = []

    def status(*args):
        calls.append(args)
        return None if ready else "no GPU here (test)"

    monkeypatch.setattr(ops, "_cuda_status", status)
    monkeypatch.setattr(cuda, "kernel_path", lambda *a: "kernels (test)")
    x = np.zeros((1, 8, 2, 4), np.float32)
    text = jax_gna.explain(x, x, x, 3, backend=backend)
    assert len(calls) == 1
    if ready:
        assert text.startswith("cuda: ") and "kernels (test)" in text, text
    elif backend == "cuda":
        assert text == ("cuda: cannot run this call (neighborhood_attention raises ValueError): "
                        "no GPU here (test)"), text
    else:
        assert text == "xla: the CUDA kernels do not apply (no GPU here (test))", text


def test_checks_use_the_dtype_jax_computes_in():
    """NumPy float64 inputs with x64 off compute in float32: the scale check and the
    dtype agreement follow that, not the NumPy dtype."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 12, 2, 8))  # float64
    k = rng.standard_normal((1, 12, 1, 8))
    rejects("overflows float32", q, k, k, 3, scale=1e39)
    out = jax_gna.na1d(q, jnp.asarray(k, jnp.float32), jnp.asarray(k, jnp.float32), 3)
    assert out.dtype == jnp.float32


def test_symbolic_shapes_rejected_clearly():
    b, = jax.export.symbolic_shape("b")
    q = jax.ShapeDtypeStruct((b, 12, 2, 8), jnp.float32)
    with pytest.raises(ValueError, match="static shapes"):
        jax.export.export(jax.jit(lambda q: jax_gna.na1d(q, q, q, 3, backend="xla")))(q)


@pytest.mark.parametrize("flag", ["no", None, 1])
def test_return_lse_must_be_a_bool(flag):
    q, k, v = arrays()
    rejects("return_lse must be a bool", q, k, v, 3, return_lse=flag)
    assert len(jax_gna.neighborhood_attention(q, k, v, 3, return_lse=np.bool_(True))) == 2


def test_local_op_outside_shard_map():
    """``neighborhood_attention_local`` names mesh axes that only ``shard_map`` binds."""
    from jax_gna import sharding

    q, k, v = arrays()
    with pytest.raises(ValueError, match="inside jax.shard_map"):
        sharding.neighborhood_attention_local(q, k, v, 3, spatial_axes={0: "context"})
    with pytest.raises(ValueError, match="spatial_axes must map"):
        sharding.neighborhood_attention_local(q, k, v, 3, spatial_axes=["context"])


def test_forward_mode_autodiff_is_refused():
    """Reverse mode only (the op is a ``jax.custom_vjp``): ``jax.jvp`` raises JAX's
    TypeError, as README says, rather than giving a wrong tangent."""
    q = jnp.ones((1, 8, 2, 4))
    for backend in ("xla", "auto"):
        with pytest.raises(TypeError, match="forward-mode autodiff"):
            jax.jvp(lambda x: jax_gna.na1d(x, x, x, 3, backend=backend), (q,), (q,))
