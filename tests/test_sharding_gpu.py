"""Sharded neighborhood attention on two real GPUs: the cuda backend under ``jax.jit``.

Marked ``gpu``; skipped without the compiled library or with fewer than two GPUs.
``tests/test_sharding.py`` checks the partitioning itself on 8 fake CPU devices with the
``xla`` backend; this file checks that the CUDA kernels run it on real devices: each
GPU launches the kernels on its own block (query and key blocks with non-zero origins,
halos received from the other GPU through NCCL), forward and backward.

Each case runs the forward, the log-sum-exp and the gradients of q, k, v through both
(random cotangents) under ``jax.jit`` on inputs sharded over a mesh of two GPUs, and
compares them with the unsharded ``xla`` backend in float32 on one GPU (relative L2
error, the tolerances of ``tests/test_cuda_gpu.py``). The kernels' output buffers start
as NaN or inf (the poisoned test targets), so an element a shard fails to write fails
the test. Where a case says so, ``JAX_GNA_SM90=force`` / ``JAX_GNA_SM90_BWD=force`` make
the run fail unless the Hopper kernels ran every shard.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_gna import cuda, dilation, sharding, xla
from jax_gna.params import make_problem

from gpu_checks import TOL, assert_close_bf16, fwd_bwd, rel as _rel


def _gpus() -> list:
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


def _is_sm90() -> bool:
    return all(getattr(d, "compute_capability", "") == "9.0" for d in _gpus()[:2])


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cuda.available(), reason=f"cuda backend unavailable: {cuda.unavailable_reason()}"),
    pytest.mark.skipif(len(_gpus()) < 2, reason="needs two GPUs"),
]


# name -> (spatial shape, B, H, H_kv, D, dtype, window kwargs, leading spec
#          (batch, *spatial, heads) over the mesh axis "x", Hopper kernels forced)
CASES = {
    # context parallel, 1-D: halos of 256 rows each way, Hopper forward and backward
    "1d_context_bf16_d128_gqa": (
        (4096,), 1, 4, 2, 128, jnp.bfloat16, dict(kernel_size=513),
        (None, "x", None), True),
    # context parallel, block-sparse (strided) windows: halos that follow the stride groups
    "1d_context_fp16_d64_stride": (
        (4096,), 2, 2, 2, 64, jnp.float16, dict(kernel_size=1000, stride=200),
        (None, "x", None), True),
    # 2-D, split along the width, strided: Hopper tiles inside each shard's blocks
    "2d_context_width_bf16_d128_stride": (
        (64, 96), 1, 2, 1, 128, jnp.bfloat16, dict(kernel_size=(24, 40), stride=(8, 8)),
        (None, None, "x", None), True),
    # 2-D, dilated and causal: the sm80 kernels (float32, 3xTF32)
    "2d_context_fp32_dilated_causal": (
        (32, 24), 2, 4, 2, 32, jnp.float32,
        dict(kernel_size=(7, 5), stride=(2, 1), dilation=(1, 2), is_causal=(False, True)),
        (None, "x", None, None), False),
    # 3-D, split in time, causal in time
    "3d_context_bf16_d128_causal": (
        (8, 16, 16), 1, 2, 2, 128, jnp.bfloat16,
        dict(kernel_size=(3, 8, 8), stride=(1, 4, 4), is_causal=(True, False, False)),
        (None, "x", None, None, None), True),
    # batch and heads: no communication at all
    "3d_batch_fp16_d64": (
        (6, 10, 12), 2, 2, 1, 64, jnp.float16, dict(kernel_size=(3, 5, 7), stride=(1, 2, 1)),
        ("x", None, None, None, None), False),
    "1d_heads_bf16_d128_causal": (
        (1024,), 1, 4, 2, 128, jnp.bfloat16, dict(kernel_size=255, is_causal=True),
        (None, None, "x"), False),
    # context parallel, dilated: each shard's 2048 rows are whole groups of 4, so the
    # shards run the undilated problem (groups in the batch) on the Hopper kernels
    "1d_context_bf16_d128_dilated_fold": (
        (4096,), 1, 4, 2, 128, jnp.bfloat16, dict(kernel_size=255, stride=5, dilation=4),
        (None, "x", None), True),
    "2d_context_fp16_d64_dilated_causal_fold": (
        (64, 48), 2, 2, 1, 64, jnp.float16,
        dict(kernel_size=(12, 12), dilation=(2, 3), is_causal=(True, False)),
        (None, "x", None, None), True),
    # batch, dilated: each GPU folds its half of the batch into undilated pieces (4: both
    # axes' groups have two lengths) on the Hopper kernels, forward and backward
    "2d_batch_bf16_d128_dilated_fold": (
        (25, 50), 4, 2, 1, 128, jnp.bfloat16, dict(kernel_size=(8, 16), stride=(1, 2), dilation=(2, 3)),
        ("x", None, None, None), True),
}


# The cuda backend with its kernels' outputs starting as NaN or inf, forward and backward, and
# every protocol attribute: the shards of a context-parallel call run one kernel call per
# sub-block (``by_device_split``: the interior rows over the shard's own keys, then the
# rest), and the backward from saved outputs folds dilation where cuda's does.
_poisoned = cuda._attention_poisoned


def _poisoned_unsplit(q, k, v, problem):
    """The same with one forward call over the key blocks (``by_device``)."""
    return cuda._attention_poisoned(q, k, v, problem)


def _poisoned_switch(q, k, v, problem):
    """The same without ``by_device``: ``lax.switch`` between the shards' problems."""
    return cuda._attention_poisoned(q, k, v, problem)


for _name in ("backward", "fold_shards", "by_device", "backward_by_device"):
    setattr(_poisoned_unsplit, _name, getattr(_poisoned, _name))
for _name in ("backward", "fold_shards"):
    setattr(_poisoned_switch, _name, getattr(_poisoned, _name))


def _fwd_bwd(impl, problem):
    def f(q, k, v, do, dl):
        (o, l), vjp = jax.vjp(lambda q, k, v: sharding.attention(impl, q, k, v, problem), q, k, v)
        return (o, l) + tuple(vjp((do.astype(o.dtype), dl)))
    return f


def _collectives(hlo: str) -> dict:
    return {op: len(re.findall(rf"\b{op}(-start)?\(", hlo))
            for op in ("collective-permute", "all-gather", "all-to-all", "conditional")}


# The switch between the shards' problems (what runs where the mesh is not known):
# context-parallel cases on the Hopper kernels, the sm80 kernels and folded dilated
# shards. And one case on a mesh that lists the GPUs in reverse (mesh position !=
# device ordinal: the one-call path's table).
SWITCH_CASES = ["1d_context_bf16_d128_gqa", "2d_context_fp32_dilated_causal",
                "2d_context_fp16_d64_dilated_causal_fold"]
REVERSED_CASES = ["1d_context_fp16_d64_stride"]
# One forward call over the key blocks, without the interior rows' call first.
UNSPLIT_CASES = ["1d_context_bf16_d128_gqa", "2d_context_width_bf16_d128_stride"]


def _forward_calls(hlo: str) -> int:
    return len(re.findall(r'custom_call_target="jax_gna_fwd', hlo))


@pytest.mark.parametrize("case,path", [(c, "one_call") for c in CASES]
                         + [(c, "switch") for c in SWITCH_CASES]
                         + [(c, "one_call_reversed_mesh") for c in REVERSED_CASES]
                         + [(c, "one_call_unsplit") for c in UNSPLIT_CASES])
def test_sharded_cuda_matches_xla(monkeypatch, case, path):
    shape, b, h, h_kv, d, dtype, kw, lead, force = CASES[case]
    if force:
        if not _is_sm90():
            pytest.skip("needs compute capability 9.0 GPUs")
        monkeypatch.setenv("JAX_GNA_SM90", "force")
        monkeypatch.setenv("JAX_GNA_SM90_BWD", "force")
    rng = np.random.default_rng(sum(map(ord, case)))
    draw = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    q, k, v = draw(b, *shape, h, d), draw(b, *shape, h_kv, d), draw(b, *shape, h_kv, d)
    do, dl = draw(b, *shape, h, d), draw(b, *shape, h)
    q, k, v = (np.asarray(jnp.asarray(x, dtype).astype(jnp.float32)) for x in (q, k, v))
    problem = make_problem(q, k, v, **kw)

    gpus = _gpus()[:2][::-1] if path == "one_call_reversed_mesh" else _gpus()[:2]
    mesh = Mesh(np.array(gpus), ("x",))
    spec = NamedSharding(mesh, P(*lead))  # (batch, *spatial, heads); head_dim whole
    args = [jax.device_put(jnp.asarray(x, dtype), spec) for x in (q, k, v)]
    args += [jax.device_put(jnp.asarray(x), spec) for x in (do, dl)]
    impl = {"switch": _poisoned_switch, "one_call_unsplit": _poisoned_unsplit}.get(path, _poisoned)
    fn = jax.jit(_fwd_bwd(impl, problem))
    hlo = fn.lower(*args).compile().as_text()
    counts = _collectives(hlo)
    got = fn(*args)

    spatial = any(e is not None for e in lead[1:-1])
    assert counts["all-gather"] == 0 and counts["all-to-all"] == 0, counts
    assert (counts["collective-permute"] > 0) == spatial, counts  # the halo exchange only
    # one kernel call per pass for every shard, or the switch (the shards differ here)
    assert (counts["conditional"] > 0) == (path == "switch"), counts
    # the forward: one call, or the interior rows' call and then the others'
    if path != "switch":
        plans = [sharding.plan_axis(problem, a - 1, "x", 2)
                 for a, e in enumerate(lead[:-1]) if a > 0 and e is not None]
        # dilated shards of whole groups that the kernels fold: the folded problem's calls
        local = [n // 2 if e is not None else n for n, e in zip(q.shape, lead + (None,))]
        fold = sharding._fold_for(impl, problem, plans, jax.ShapeDtypeStruct(local, dtype),
                                  jax.ShapeDtypeStruct(local, dtype), "forward") if plans else None
        assert (fold is not None) == (spatial and case.endswith("_fold")), fold
        calls = sharding._split_calls(*(fold or (problem, plans))) if plans else None
        want = 1 if calls is None or path == "one_call_unsplit" else len(calls)
        if not spatial and any(x > 1 for x in problem.dilation):  # one call per piece
            want = len(dilation.pieces(problem))
            assert len(re.findall(r'custom_call_target="jax_gna_bwd', hlo)) == want
        assert _forward_calls(hlo) == want, (_forward_calls(hlo), want)
    for x in got:  # every result stays split the way the inputs were
        assert x.sharding.is_equivalent_to(spec, x.ndim), (x.sharding, spec)

    one = _gpus()[0]
    ref = jax.jit(_fwd_bwd(xla.attention, problem))(
        *(jax.device_put(jnp.asarray(x), one) for x in (q, k, v, do, dl)))
    t_out, t_lse, t_grad = TOL[dtype]
    errs = {n: _rel(a, r) for n, a, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref)}
    for n, a, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        assert a.shape == r.shape and a.dtype == (jnp.float32 if n == "lse" else dtype), (n, a.dtype)
    print(case, counts, errs)
    assert errs["out"] < t_out and errs["lse"] < t_lse, errs
    assert max(errs["dq"], errs["dk"], errs["dv"]) < t_grad, errs


def test_sharded_layer_training_step():
    """A Flax NNX layer (GQA, rotary, qk-norm) on a context-parallel mesh of two GPUs
    with the cuda backend (float32: the sm80 kernels): loss and updated parameters
    equal the unsharded step's on one GPU."""
    from flax import nnx

    from jax_gna import nn as gnn

    layer = gnn.NeighborhoodAttention2D(4, 64, kernel_size=(7, 5), stride=(2, 1), num_kv_heads=2,
                                        rope=True, normalize_qk=True, backend="cuda",
                                        rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer, nnx.Param)
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((2, 32, 16, 64)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((2, 32, 16, 64)), jnp.float32)

    def step(params, x, y):
        def loss(p):
            return jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2)
        value, grads = jax.value_and_grad(loss)(params)
        return value, jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)

    mesh = Mesh(np.array(_gpus()[:2]), ("context",))
    acts = NamedSharding(mesh, P(None, "context", None, None))
    sharded = jax.jit(step)
    args = (jax.device_put(params, NamedSharding(mesh, P())), jax.device_put(x, acts),
            jax.device_put(y, acts))
    counts = _collectives(sharded.lower(*args).compile().as_text())
    assert counts["collective-permute"] > 0 and counts["conditional"] == 0, counts
    value, new = sharded(*args)
    one = _gpus()[0]
    ref_value, ref_new = jax.jit(step)(*jax.device_put((params, x, y), one))
    assert abs(float(value) - float(ref_value)) <= 1e-5 * abs(float(ref_value))
    worst = max(jax.tree.leaves(jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(jax.device_get(a) - jax.device_get(b)))), new, ref_new)))
    assert worst < 1e-5, worst


@pytest.mark.parametrize("path,tokens", [("jit", 96), ("jit_batch", 96), ("jit_batch", 12),
                                         ("shard_map", 96), ("shard_map", 0)])
def test_sharded_additional_tokens(path, tokens):
    """Additional tokens (96: on the kernels, ``cuda.dense_attention``; 12: XLA's, too few
    for the kernels) with the queries split in width (``jit``) or batch (``jit_batch``) over two
    GPUs under ``jax.jit`` (one partitioned op for the call and its tokens, poisoned:
    in width the two parts and a merge on each shard, in batch the tokens as key tiles
    of each shard's Hopper forward; the backward from the merged out / lse), and inside
    ``shard_map`` (``neighborhood_attention_sharded``, also without tokens). Out, lse
    and the gradients of q, k, v and the tokens against the unsharded ``xla`` backend in
    float32 on one GPU."""
    import jax_gna
    from jax_gna import ops

    rng = np.random.default_rng(11)
    draw = lambda *s: np.asarray(jnp.asarray(rng.standard_normal(s), jnp.bfloat16)  # noqa: E731
                                 .astype(jnp.float32))
    b = 2 if path == "jit_batch" else 1
    q, k, v = draw(b, 32, 48, 4, 128), draw(b, 32, 48, 2, 128), draw(b, 32, 48, 2, 128)
    ak, av = draw(b, tokens, 2, 128), draw(b, tokens, 2, 128)
    do, dl = draw(b, 32, 48, 4, 128), draw(b, 32, 48, 4)
    kw = dict(kernel_size=(9, 9), stride=(1, 2))
    problem = make_problem(q, k, v, **kw)
    mesh = Mesh(np.array(_gpus()[:2]), ("x",))

    def op(q, k, v, ak, av):
        if not tokens:
            ak = av = None
        if path.startswith("jit"):
            return ops._compute(q, k, v, ak, av, _poisoned, problem)
        return sharding.neighborhood_attention_sharded(
            q, k, v, **kw, mesh=mesh, spatial_axes={1: "x"}, additional_keys=ak,
            additional_values=av, return_lse=True, backend="cuda")

    if path == "jit_batch":
        data, lse = NamedSharding(mesh, P("x")), NamedSharding(mesh, P("x"))
        extra = data
    else:
        data = lse = NamedSharding(mesh, P(None, None, "x"))
        extra = NamedSharding(mesh, P())
    args = [jax.device_put(jnp.asarray(x, jnp.bfloat16), s)
            for x, s in zip((q, k, v, ak, av), (data, data, data, extra, extra))]
    args += [jax.device_put(jnp.asarray(do), data), jax.device_put(jnp.asarray(dl), lse)]
    fn = jax.jit(fwd_bwd(op))
    hlo = fn.lower(*args).compile().as_text()
    assert _collectives(hlo)["all-gather"] == 0, _collectives(hlo)
    if path.startswith("jit") and _is_sm90():  # each shard's forward: one kernel, or two parts
        assert (cuda.FWD_TOKENS_TARGET in hlo) == (path == "jit_batch"), path
    got = fn(*args)

    one = _gpus()[0]
    ref = jax.jit(fwd_bwd(lambda q, k, v, ak, av: jax_gna.neighborhood_attention(
        q, k, v, **kw, additional_keys=ak if tokens else None,
        additional_values=av if tokens else None, return_lse=True, backend="xla")))(
        *(jax.device_put(jnp.asarray(x), one) for x in (q, k, v, ak, av, do, dl)))
    assert_close_bf16(got, ref, tokens, path)
