"""The additional tokens on the cuda backend (``cuda.dense_attention``): the queries padded
and cut into blocks of S stacked in the batch, each block a 1-D problem whose window is
all S keys.

Without a GPU: the cuda backend's own padding, reshapes, broadcasts, batch chunks
and custom_vjp, with its two kernel calls replaced by the ``xla`` backend, against
``xla.dense_attention`` in float64; when it falls back to XLA; and what the public op's
computation lowers to for the cuda platform.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jax_gna import cuda, ops, xla
from jax_gna.params import Problem

import kernel_fakes


def _fake_kernels(monkeypatch, calls):
    """cuda's two kernel calls replaced by the xla backend (``kernel_fakes``), every
    shape and dtype admitted; ``calls`` gets (kind, the kernels' query shape, q_extent,
    is_whole, dkv_sum) for each."""
    kernel_fakes.xla_kernel_calls(monkeypatch, lambda kind, q, p, n: calls.append(
        (kind, q.shape, p.q_extent, p.is_whole, n)))
    monkeypatch.setattr(cuda, "unsupported_reason", lambda *a: None)
    monkeypatch.setattr(cuda, "DENSE_MIN_KEYS", 2)


# spatial shape, S, batch, largest kernel batch -> kernel batch of each forward call
CASES = [
    ((12,), 4, 2, 65535, [6]),              # 3 whole blocks of 4 per batch entry
    ((5, 3), 4, 2, 65535, [8]),             # 15 queries padded to 4 blocks
    ((2, 5, 1), 10, 1, 65535, [1]),         # as many queries as tokens: one block
    ((12,), 4, 2, 4, [3, 3]),               # 3 blocks per entry, one entry per call
    ((12,), 4, 2, 2, [2, 1, 2, 1]),         # each entry's 3 blocks in calls of 2 and 1
    ((3, 5), 4, 3, 2, [2, 2, 2, 2, 2, 2]),  # 4 padded blocks per entry in calls of 2
    ((3, 5), 4, 3, 9, [8, 4]),              # two entries of 4 blocks, then the third
]
@pytest.mark.parametrize("sms", [1 << 40, 1])
@pytest.mark.parametrize("case", CASES)
def test_cuda_dense_matches_xla(monkeypatch, case, sms):
    """Out, lse and gradients against xla; the tokens' dK / dV per block (``_dkv_sum``
    on a GPU with far more SMs than CTAs) or summed by the (faked) kernels over each
    call's blocks of a batch entry (on one SM)."""
    spatial, s, b, max_batch, batches = case
    calls = []
    _fake_kernels(monkeypatch, calls)
    monkeypatch.setattr(cuda, "_MAX_BATCH", max_batch)
    monkeypatch.setattr(cuda, "_SMS", sms)
    rng = np.random.default_rng(len(spatial) * 10 + s)
    h, h_kv, d, d_v = 4, 2, 8, 6
    q = rng.standard_normal((b, *spatial, h, d))
    k = rng.standard_normal((b, s, h_kv, d))
    v = rng.standard_normal((b, s, h_kv, d_v))
    d_out = rng.standard_normal((b, *spatial, h, d_v))
    d_lse = rng.standard_normal((b, *spatial, h))
    with jax.enable_x64(True):
        got, vjp = jax.vjp(lambda q, k, v: cuda.dense_attention(q, k, v, 0.3), q, k, v)
        grads = vjp((d_out, d_lse))
        want, ref_vjp = jax.vjp(lambda q, k, v: xla.dense_attention(q, k, v, 0.3), q, k, v)
        ref_grads = ref_vjp((d_out, d_lse))
    assert [c[1][0] for c in calls if c[0] == "fwd"] == batches, calls
    assert sorted(c[1][0] for c in calls if c[0] == "bwd") == sorted(batches), calls
    assert all(c[1][1] == s and c[3] for c in calls), calls  # whole blocks of S rows
    m = -(-math.prod(spatial) // s)
    sums = [1 if sms > 1 else len(range(m)[j]) for row in cuda._batch_chunks(b, m) for _, j in row]
    assert [c[4] for c in calls if c[0] == "bwd"] == sums, calls
    for i, (a, w) in enumerate(zip((*got, *grads), (*want, *ref_grads))):
        # The backward's delta = rowsum(dO * O) - d_lse is float32 by design: fp32 errors.
        tol = 1e-10 if i < 2 else 1e-5
        assert a.shape == w.shape, i
        assert np.abs(np.asarray(a) - np.asarray(w)).max() <= tol * max(np.abs(w).max(), 1.0), i


def test_dkv_sum(monkeypatch):
    """Blocks each dK / dV CTA sums: the divisor of the blocks with the fewest modelled
    steps, waves (the GPU's SMs: 132 as on an H200, 114 as on an H100 PCIe) x (2.6 +
    steps per CTA); checked here against that model by brute force, and on the grids
    measured in session 30 (132 SMs)."""
    def model(b, m, s, h_kv, group, n, sms):
        ctas = b * m * h_kv * -(-s // 128) // n
        return -(-ctas // sms) * (2.6 + n * -(-s // 64) * group)

    for sms in (114, 132):
        monkeypatch.setattr(cuda, "_SMS", sms)
        for b, m, s, h_kv, group in [(1, 128, 512, 24, 1), (1, 512, 128, 24, 1), (1, 64, 512, 8, 1),
                                     (1, 256, 128, 8, 1), (1, 225, 512, 24, 1), (1, 900, 128, 24, 1),
                                     (1, 128, 512, 8, 3), (2, 4096, 16, 8, 1), (3, 1024, 64, 24, 2)]:
            n = cuda._dkv_sum(b, m, s, h_kv, group)
            costs = {d: model(b, m, s, h_kv, group, d, sms) for d in range(1, m + 1) if m % d == 0}
            assert m % n == 0 and costs[n] == min(costs.values()), (b, m, s, h_kv, group, n, sms)
    monkeypatch.setattr(cuda, "_SMS", 114)  # 1-D 32768, 8 heads, 128 tokens: not one wave
    assert cuda._dkv_sum(1, 256, 128, 8) == 4  # of 128 CTAs (16) but 4.5 of 512 shorter ones
    monkeypatch.setattr(cuda, "_SMS", 132)
    # 2-D 256x256, 24 heads: 512 tokens (12288 CTAs with one per block): runs of 32, three
    # waves of 384 CTAs (session 29's rule of 1024 CTAs gave runs of 8); 128 tokens too
    assert cuda._dkv_sum(1, 128, 512, 24) == 32
    assert cuda._dkv_sum(1, 512, 128, 24) == 32
    assert cuda._dkv_sum(1, 256, 128, 8) == 16     # 1-D 32768, 8 heads, 128 tokens: one wave
    assert cuda._dkv_sum(1, 225, 512, 24) == 15    # 3-D 30x48x80: 1440 CTAs, 10.9 waves
    assert cuda._dkv_sum(1, 64, 512, 1) == 2       # 1-D, one head: 128 CTAs, not 256
    assert cuda._dkv_sum(2, 1, 512, 24) == 1       # one block
    assert cuda._dkv_sum(1, 7, 512, 1) == 1        # 28 CTAs: a run would only lengthen them


def test_cuda_dense_falls_back_to_xla(monkeypatch):
    calls = []
    _fake_kernels(monkeypatch, calls)
    monkeypatch.setattr(cuda, "DENSE_MIN_KEYS", 64)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 9, 7, 18, 8)), jnp.float32)
    few = [jnp.asarray(rng.standard_normal((1, 63, 2, 8)), jnp.float32)] * 2
    out = cuda.dense_attention(q, *few, 0.5)  # fewer than 64 tokens, more than 16 heads
    want = xla.dense_attention(q, *few, 0.5)
    assert not calls and all(np.array_equal(a, w) for a, w in zip(out, want))
    monkeypatch.setattr(cuda, "unsupported_reason", lambda *a: "no")  # shapes the kernels reject
    many = [jnp.asarray(rng.standard_normal((1, 64, 2, 8)), jnp.float32)] * 2
    cuda.dense_attention(q, *many, 0.5)
    assert not calls
    monkeypatch.setattr(cuda, "unsupported_reason", lambda *a: None)
    cuda.dense_attention(q, *many, 0.5)  # 63 queries, fewer than the tokens
    assert not calls
    cuda.dense_attention(jnp.concatenate([q, q], axis=1), *many, 0.5)
    assert [c[1][:2] for c in calls] == [(2, 64)]  # 126 queries: 2 blocks of 64


@pytest.mark.parametrize("tokens,heads,kernels", [
    (64, 64, True), (63, 16, True), (63, 17, False), (32, 16, True), (32, 17, False),
    (31, 7, True), (31, 8, False), (16, 4, True), (16, 5, False), (15, 1, False)])
def test_token_threshold(monkeypatch, tokens, heads, kernels):
    """The kernels take the tokens from 64 of them, from 32 with at most 16 query heads,
    and from 16 with at most tokens / 4 (cuda.DENSE_MIN_KEYS, DENSE_SOME_KEYS /
    DENSE_SOME_HEADS, DENSE_FEW_KEYS: measured on an H200)."""
    monkeypatch.setattr(cuda, "unsupported_reason", lambda *a: None)
    kv = (1, tokens, 1, 64)
    assert (cuda.dense_blocker((1, 4096, heads, 64), kv, kv, jnp.bfloat16) is None) == kernels


def _lower(fn, *args) -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("tokens,kernel_calls", [(100, 2), (40, 2), (12, 1)])
def test_public_op_lowers_the_tokens_to_the_kernels(tokens, kernel_calls):
    """The op's computation (``ops._compute``) on the cuda backend, 4 heads: the
    neighborhood call, and one call for the tokens where the kernels take them (100: 250
    queries padded to 3 blocks of 100; 40: at most 40 / 4 heads; not 12, fewer than 16);
    forward and backward."""
    problem = Problem(shape=(10, 25), kernel_size=(3, 5), stride=(1, 1), dilation=(1, 1),
                      is_causal=(False, False), scale=0.125)
    q = jnp.zeros((1, 10, 25, 4, 64), jnp.bfloat16)
    k = v = jnp.zeros((1, 10, 25, 2, 64), jnp.bfloat16)
    ak = av = jnp.zeros((1, tokens, 2, 64), jnp.bfloat16)

    def loss(q, k, v, ak, av):
        out, lse = ops._compute(q, k, v, ak, av, impl=cuda.attention, problem=problem)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

    text = _lower(lambda *a: ops._compute(*a, impl=cuda.attention, problem=problem), q, k, v, ak, av)
    assert text.count("custom_call @jax_gna_fwd") == kernel_calls
    m = -(-250 // tokens)  # blocks
    if kernel_calls > 1:  # the tokens read as [1, 1, tokens, ...] by all m blocks: no copy
        assert f"tensor<1x1x{tokens}x2x64xbf16>" in text and f"{m}x{tokens}x2x64" not in text
    text = _lower(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), q, k, v, ak, av)
    assert text.count("custom_call @jax_gna_fwd") == kernel_calls
    assert text.count("custom_call @jax_gna_bwd") == kernel_calls
    if kernel_calls > 1:  # the tokens' grid: `tokens` positions, each window all of them
        assert f"kernel_size = dense<{tokens}>" in text and f"tensor<1x{m}x{tokens}x4x64xbf16>" in text


@pytest.mark.parametrize("impl", ["cuda", "auto"])
@pytest.mark.parametrize("env,fused,tokens", [(None, True, 100), ("0", False, 100),
                                              (None, True, 12), ("0", False, 12)])
def test_tokens_lower_to_one_hopper_forward(monkeypatch, impl, env, fused, tokens):
    """Where the Hopper forward applies (a compute capability 9.0 GPU, pretended here) the
    op's computation with tokens is one forward call (``jax_gna_fwd_tokens``: the tokens
    as extra key tiles) and two backward calls (the neighborhood's and the tokens', both
    from the merged out / lse: no merge in XLA), one with 12 tokens (their backward on
    XLA from the saved statistics); ``JAX_GNA_FUSED_TOKENS=0`` keeps the two forwards
    (one with 12 tokens: XLA's) and the merge."""
    monkeypatch.setattr(cuda, "_compute_capability", lambda: "9.0")
    if env is None:
        monkeypatch.delenv("JAX_GNA_FUSED_TOKENS", raising=False)
    else:
        monkeypatch.setenv("JAX_GNA_FUSED_TOKENS", env)
    fn = cuda.attention if impl == "cuda" else ops._auto_attention
    ak = av = jnp.zeros((1, tokens, 2, 64), jnp.bfloat16)

    def loss(q, k, v, ak, av):
        out, lse = ops._compute(q, k, v, ak, av, impl=fn, problem=_PROBLEM)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

    text = _lower(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), *_QKV, ak, av)
    kernels = 2 if tokens >= 16 else 1  # 12 tokens: XLA's (cuda.dense_blocker)
    assert text.count("custom_call @jax_gna_fwd_tokens(") == (1 if fused else 0)
    assert text.count("custom_call @jax_gna_fwd(") == (0 if fused else kernels)
    assert text.count("custom_call @jax_gna_bwd(") == kernels
    assert ("log_plus_one" in text) != fused  # the merge's logaddexp


@pytest.mark.parametrize("dtype,tol,max_scores", [(jnp.float32, 1e-5, 1 << 27),
                                                  (jnp.bfloat16, 2e-2, 1 << 27),
                                                  (jnp.float32, 1e-5, 2 * 4 * 12 * 7)])
def test_dense_backward_saved_splits_the_union(dtype, tol, max_scores):
    """``xla.dense_backward_saved`` from the statistics of a softmax over more keys: the
    tokens cut into two parts, each part's gradients from the union's out / lse add up to
    the union's (autodiff of ``xla.dense_attention`` over all tokens), GQA, D != D_v; in
    one chunk of queries and in chunks of 7 (30 queries: the last chunk padded)."""
    rng = np.random.default_rng(31)
    draw = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)  # noqa: E731
    q, k, v = draw(2, 5, 6, 4, 16), draw(2, 20, 2, 16), draw(2, 20, 2, 8)
    w, u = draw(2, 5, 6, 4, 8), draw(2, 5, 6, 4).astype(jnp.float32)
    (out, lse), vjp = jax.vjp(lambda *a: xla.dense_attention(*a, 0.3), q, k, v)
    ref = vjp((w, u))
    one = xla.dense_backward_saved(q, k[:, :12], v[:, :12], out, lse, w, u, 0.3, max_scores)
    two = xla.dense_backward_saved(q, k[:, 12:], v[:, 12:], out, lse, w, u, 0.3,
                                   max_scores * 8 // 12)
    got = (one[0].astype(jnp.float32) + two[0], jnp.concatenate([one[1], two[1]], 1),
           jnp.concatenate([one[2], two[2]], 1))
    for name, a, r in zip(("dq", "dk", "dv"), got, ref):
        a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
        assert np.linalg.norm(a - r) / np.linalg.norm(r) < tol, name


def test_tokens_as_key_tiles_export(monkeypatch):
    """``jax.export`` of the gradient with tokens as key tiles for the cuda platform: the
    forward-with-tokens target is among ``cuda.export_disabled_checks()``."""
    from jax import export

    monkeypatch.setattr(cuda, "_compute_capability", lambda: "9.0")
    ak = av = jnp.zeros((1, 100, 2, 64), jnp.bfloat16)

    def loss(*a):
        out, lse = cuda.attention_with_tokens(*a, _PROBLEM)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

    exp = export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))), platforms=["cuda"],
                        disabled_checks=cuda.export_disabled_checks())(*_QKV, ak, av)
    assert "jax_gna_fwd_tokens" in exp.mlir_module()


_PROBLEM = Problem(shape=(16, 16), kernel_size=(5, 5), stride=(1, 1), dilation=(1, 1),
                   is_causal=(False, False), scale=0.125)
_QKV = (jnp.zeros((1, 16, 16, 4, 64), jnp.bfloat16), jnp.zeros((1, 16, 16, 2, 64), jnp.bfloat16),
        jnp.zeros((1, 16, 16, 2, 64), jnp.bfloat16))


@pytest.mark.parametrize("impl", ["cuda", "auto"])
def test_dense_backward_lowers_to_the_backward_kernels_only(impl):
    """The tokens' ``dense.backward`` (what the partitioned op's backward calls with the
    forward's saved out / lse) lowers for the cuda platform to one backward kernel call
    and no forward: nothing is recomputed. 140 queries over 70 tokens: 2 blocks."""
    dense = (cuda.attention if impl == "cuda" else ops._auto_attention).dense
    q = jnp.zeros((1, 140, 4, 64), jnp.bfloat16)
    k = jnp.zeros((1, 70, 2, 64), jnp.bfloat16)
    out, lse = jnp.zeros((1, 140, 4, 64), jnp.bfloat16), jnp.zeros((1, 140, 4), jnp.float32)
    text = _lower(lambda *a: dense.backward(*a, 0.125), q, k, k, out, lse, out, lse)
    assert text.count("custom_call @jax_gna_bwd") == 1
    assert text.count("custom_call @jax_gna_fwd") == 0
    assert "tensor<1x2x70x4x64xbf16>" in text and "tensor<1x1x70x2x64xbf16>" in text


def test_dense_backward_lowers_with_summed_key_gradients():
    """A grid the kernels sum the blocks' dK / dV on (``_dkv_sum``): 65536 queries over
    512 tokens, 24 heads over 8 key heads, 128 blocks; 4096 CTAs with one per block, so
    runs of 32 blocks (one wave of 128 CTAs): dK / dV come out as 4 batches, never one
    per block."""
    q = out = jax.ShapeDtypeStruct((1, 65536, 24, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 512, 8, 128), jnp.bfloat16)
    lse = jax.ShapeDtypeStruct((1, 65536, 24), jnp.float32)
    text = _lower(lambda *a: cuda.dense_backward(*a, 0.125), q, k, k, out, lse, out, lse)
    assert text.count("custom_call @jax_gna_bwd") == 1
    assert "tensor<1x4x512x8x128xbf16>" in text and "1x128x512x8x128" not in text


def test_explain_says_where_the_tokens_run(monkeypatch):
    import jax_gna

    monkeypatch.setattr(ops, "_cuda_status", lambda *a: None)  # pretend the kernels run here
    q = jax.ShapeDtypeStruct((1, 16, 16, 4, 64), jnp.bfloat16)
    k = v = jax.ShapeDtypeStruct((1, 16, 16, 2, 64), jnp.bfloat16)
    many = jax.ShapeDtypeStruct((1, 77, 2, 64), jnp.bfloat16)
    few = jax.ShapeDtypeStruct((1, 63, 2, 64), jnp.bfloat16)
    text = jax_gna.explain(q, k, v, 5, additional_keys=many, additional_values=many, backend="cuda")
    assert "additional tokens: on the kernels (the queries in blocks of 77" in text, text
    text = jax_gna.explain(q, k, v, 5, additional_keys=few, additional_values=few, backend="cuda")
    assert "additional tokens: on the kernels (the queries in blocks of 63" in text, text
    q = jax.ShapeDtypeStruct((1, 16, 16, 24, 64), jnp.bfloat16)
    text = jax_gna.explain(q, k, v, 5, additional_keys=few, additional_values=few, backend="cuda")
    assert "additional tokens: XLA's dense attention (63 tokens with 24 heads" in text, text
    assert "additional tokens" not in jax_gna.explain(q, k, v, 5, backend="cuda")
    monkeypatch.setattr(cuda, "_compute_capability", lambda: "9.0")
    q = jax.ShapeDtypeStruct((1, 16, 16, 4, 64), jnp.bfloat16)
    text = jax_gna.explain(q, k, v, 5, additional_keys=many, additional_values=many, backend="cuda")
    assert ("additional tokens: extra key tiles of the Hopper forward (one kernel; a call sharded "
            "along a spatial axis runs them apart on each shard), their backward on the kernels "
            "from the merged") in text, text
    monkeypatch.setattr(jax, "device_count", lambda *a: 2)  # every call partitioned: the same
    assert jax_gna.explain(q, k, v, 5, additional_keys=many, additional_values=many,
                           backend="cuda") == text
    monkeypatch.undo()
    monkeypatch.setattr(ops, "_cuda_status", lambda *a: None)
    monkeypatch.setattr(cuda, "_compute_capability", lambda: "9.0")
    q24 = q.update(shape=(1, 16, 16, 24, 64))
    text = jax_gna.explain(q24, k, v, 5, additional_keys=few, additional_values=few, backend="cuda")
    assert ("extra key tiles of the Hopper forward (one kernel; a call sharded along a spatial "
            "axis runs them apart on each shard), their backward on XLA (63 tokens with 24 "
            "heads") in text, text
    text = jax_gna.explain(q.update(shape=(1, 8, 8, 4, 64)), k.update(shape=(1, 8, 8, 2, 64)),
                           v.update(shape=(1, 8, 8, 2, 64)), 5, additional_keys=few,
                           additional_values=few, backend="cuda")
    assert ("cuda.dense_attention; not as key tiles of the forward: the Hopper forward does "
            "not apply (blocks smaller than a 128-token tile)") in text, text
    assert cuda.dense_blocker((1, 8, 4, 64), (1, 77, 2, 64), (1, 77, 2, 64), jnp.bfloat16) == (
        "fewer queries (8) than tokens (77)")


@pytest.mark.parametrize("which", ["attention", "dense_attention"])
def test_kernel_calls_type_check_under_shard_map(monkeypatch, which):
    """The real FFI calls traced (not run: no GPU needed) inside ``shard_map`` with the
    queries split over a mesh axis, differentiated: an FFI call's results come out typed
    invariant, so without ``cuda._vary_like`` on them the custom_vjp's gradients (dq above
    all) do not match the inputs' types and JAX refuses the backward. Before, gradients
    of ``neighborhood_attention_sharded(..., backend="cuda")`` failed this way (seen on
    two H200s with additional tokens; both calls fail this trace without the cast)."""
    monkeypatch.setattr(cuda, "unsupported_reason", lambda *a: None)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("cx",))
    q, k, v = jnp.zeros((1, 128, 4, 64)), jnp.zeros((1, 128, 2, 64)), jnp.zeros((1, 128, 2, 64))
    t = jnp.zeros((1, 64, 2, 64))  # 64 tokens: on the kernels
    split, rep = jax.sharding.PartitionSpec(None, "cx"), jax.sharding.PartitionSpec()
    problem = Problem(shape=(128,), kernel_size=(9,), stride=(1,), dilation=(1,),
                      is_causal=(False,), scale=0.125)
    if which == "attention":
        body, specs = (lambda q, k, v: cuda.attention(q, k, v, problem)), (split, split, split)
    else:
        body, specs = (lambda q, k, v: cuda.dense_attention(q, k, v, 0.125)), (split, rep, rep)

    def loss(q, k, v):
        out, lse = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=(split, split))(q, k, v)
        return jnp.sum(out) + jnp.sum(lse)

    args = (q, t, t) if which == "dense_attention" else (q, k, v)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(*args))
    assert jaxpr.count("ffi_call") >= 2, jaxpr[:2000]  # forward and backward kernel calls


def test_cuda_dense_under_shard_map_with_split_queries(monkeypatch):
    """Inside shard_map the queries vary over a spatial mesh axis and the tokens do not:
    the tokens' gradients (partial sums per shard) must still match their type, and sum
    over the shards (``cuda._vary_like``). Before, JAX refused to differentiate this (the
    custom_vjp's dK varied over the axis, K did not). One device is enough to type it."""
    _fake_kernels(monkeypatch, [])
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("cx",))
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
               for s in ((1, 12, 4, 8), (1, 5, 2, 8), (1, 5, 2, 8)))
    spec, rep = jax.sharding.PartitionSpec(None, "cx"), jax.sharding.PartitionSpec()

    def loss(dense, q, k, v):
        out, lse = jax.shard_map(lambda q, k, v: dense(q, k, v, 0.3), mesh=mesh,
                                 in_specs=(spec, rep, rep), out_specs=(spec, spec))(q, k, v)
        return jnp.sum(out * out) + jnp.sum(jnp.sin(lse))

    got = jax.jit(jax.grad(lambda *a: loss(cuda.dense_attention, *a), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(lambda *a: loss(xla.dense_attention, *a), argnums=(0, 1, 2))(q, k, v)
    for a, w in zip(got, want):
        np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES[1::3])
def test_cuda_dense_backward_from_saved_outputs(monkeypatch, case):
    """``cuda.dense_backward`` (the sharded path's ``dense.backward``): the gradients from a
    saved out / lse on the backward kernels alone, no forward call, the same as the
    custom_vjp's."""
    spatial, s, b, max_batch, batches = case
    calls = []
    _fake_kernels(monkeypatch, calls)
    monkeypatch.setattr(cuda, "_MAX_BATCH", max_batch)
    rng = np.random.default_rng(len(spatial) * 10 + s + 1)
    q = rng.standard_normal((b, *spatial, 4, 8))
    k, v = rng.standard_normal((b, s, 2, 8)), rng.standard_normal((b, s, 2, 6))
    d_out, d_lse = rng.standard_normal((b, *spatial, 4, 6)), rng.standard_normal((b, *spatial, 4))
    with jax.enable_x64(True):
        (out, lse), vjp = jax.vjp(lambda q, k, v: cuda.dense_attention(q, k, v, 0.3), q, k, v)
        want = vjp((d_out, d_lse))
        del calls[:]
        got = cuda.dense_backward(q, k, v, out, lse, d_out, d_lse, 0.3)
    assert [c[0] for c in calls] == ["bwd"] * len(batches), calls
    for a, w in zip(got, want):
        assert a.shape == w.shape
        assert np.allclose(np.asarray(a), np.asarray(w), rtol=1e-12, atol=1e-12)
