"""The portable ``xla`` backend: tiled neighborhood attention in pure JAX.

Runs wherever JAX runs (CPU, GPU, TPU) and is the semantic reference for the
other backends. Memory stays O(tokens x window): the queries are cut into
multi-dimensional boxes (tiles); each tile gathers the box of keys/values that
its windows reach (one static width per axis, computed at trace time by
:func:`jax_gna.mask.key_spans`), computes its scores, applies the exact
per-element mask and a softmax inside the tile. Tiles run in chunks under
``lax.map``, so no buffer is larger than a chunk of tiles' scores.

A dilated problem over the whole grid runs as undilated pieces, its dilation groups
stacked in the batch (:mod:`jax_gna.dilation`), so tiles do not span keys of other
groups.

The backward pass is written by hand (``jax.custom_vjp``) and is deterministic
and scatter-free: dQ comes from a pass over query tiles (like the forward), dK
and dV from a pass over key tiles, each visiting the queries whose windows reach
it (:func:`jax_gna.mask.query_spans`). Scores are recomputed from the saved
log-sum-exp; the gradient flowing into a returned log-sum-exp is honoured.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import dilation, mask
from .params import Problem

# Tile shape (tokens per axis) by number of spatial axes.
DEFAULT_TILE = {1: (64,), 2: (8, 8), 3: (4, 4, 4)}
# Upper bound on the elements of one chunk's score tensor (fp32): 32 Mi = 128 MiB.
CHUNK_ELEMENTS = 1 << 25


def _acc_dtype(dtype: Any) -> Any:
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _precision(dtype: Any) -> Any:
    # Full-precision matmuls for fp32/fp64 (no TF32); half types use the native path.
    if jnp.dtype(dtype) in (jnp.float32, jnp.float64):
        return jax.lax.Precision.HIGHEST
    return None


class _Tiling:
    """Static description of one pass: tiles of block ``A`` and the window each needs
    in block ``B`` (queries→keys for the forward and dQ, keys→queries for dK/dV)."""

    def __init__(self, tile: Sequence[int], extent: Sequence[int], width: Sequence[int],
                 window_starts: Sequence[np.ndarray]):
        self.tile = tuple(tile)
        self.extent = tuple(extent)
        self.width = tuple(width)
        self.counts = tuple(-(-e // t) for e, t in zip(extent, tile))
        grid = list(itertools.product(*[range(n) for n in self.counts]))
        # Per tile: its first element in block A and its window's first element in
        # block B (both local to their blocks), one column per axis.
        self.starts = np.array([[i * t for i, t in zip(idx, self.tile)] for idx in grid],
                               dtype=np.int32).reshape(len(grid), len(self.tile))
        self.window_starts = np.array(
            [[int(window_starts[a][idx[a]]) for a in range(len(idx))] for idx in grid],
            dtype=np.int32).reshape(len(grid), len(self.tile))

    @property
    def n_tiles(self) -> int:
        return len(self.starts)

    @property
    def tile_size(self) -> int:
        return math.prod(self.tile)

    @property
    def window_size(self) -> int:
        return math.prod(self.width)


def _tile_shape(problem: Problem, extent: Sequence[int], tile: Sequence[int] | None) -> tuple:
    tile = DEFAULT_TILE[problem.rank] if tile is None else tuple(tile)
    return tuple(max(1, min(t, e)) for t, e in zip(tile, extent))


@functools.lru_cache(maxsize=256)
def _query_tiling(problem: Problem, tile: tuple | None) -> _Tiling:
    tile = _tile_shape(problem, problem.q_extent, tile)
    widths, starts = [], []
    for a in range(problem.rank):
        w, s = mask.key_spans(problem.axis(a), problem.q_origin[a], problem.q_extent[a], tile[a],
                              problem.kv_origin[a], problem.kv_extent[a])
        widths.append(w)
        starts.append(s - problem.kv_origin[a])
    return _Tiling(tile, problem.q_extent, widths, starts)


@functools.lru_cache(maxsize=256)
def _key_tiling(problem: Problem, tile: tuple | None) -> _Tiling:
    tile = _tile_shape(problem, problem.kv_extent, tile)
    widths, starts = [], []
    for a in range(problem.rank):
        w, s = mask.query_spans(problem.axis(a), problem.kv_origin[a], problem.kv_extent[a],
                                tile[a], problem.q_origin[a], problem.q_extent[a])
        widths.append(w)
        starts.append(s - problem.q_origin[a])
    return _Tiling(tile, problem.kv_extent, widths, starts)


# --------------------------------------------------------------------------
# Moving tiles in and out of [B, *spatial, ...] arrays.
# --------------------------------------------------------------------------

def _pad_to_tiles(x: jax.Array, tiling: _Tiling) -> jax.Array:
    pad = [(0, 0)] + [(0, n * t - e) for n, t, e in zip(tiling.counts, tiling.tile, tiling.extent)]
    pad += [(0, 0)] * (x.ndim - 1 - len(tiling.tile))
    return jnp.pad(x, pad)


def _slice(x: jax.Array, start: jax.Array, size: Sequence[int]) -> jax.Array:
    """``x[:, start[0]:start[0]+size[0], ..., ...]`` for a traced ``start`` per spatial axis."""
    rank = len(size)
    zero = jnp.zeros((), start.dtype)
    starts = [zero] + [start[a] for a in range(rank)] + [zero] * (x.ndim - 1 - rank)
    sizes = (x.shape[0],) + tuple(size) + x.shape[1 + rank:]
    return jax.lax.dynamic_slice(x, starts, sizes)


def _flatten_tokens(x: jax.Array, rank: int) -> jax.Array:
    """[B, *box, ...] -> [B, prod(box), ...]."""
    return x.reshape((x.shape[0], -1) + x.shape[1 + rank:])


def _group_heads(x: jax.Array, h_kv: int) -> jax.Array:
    """[B, N, H, D] -> [B, N, H_kv, G, D]: query head h uses key/value head h // G."""
    return x.reshape(x.shape[:2] + (h_kv, x.shape[2] // h_kv, x.shape[-1]))


def _group_rows(x: jax.Array, h_kv: int) -> jax.Array:
    """Per-query scalars [B, N, H] -> [B, H_kv, G, N], laid out like the scores' rows."""
    return x.reshape(x.shape[0], x.shape[1], h_kv, -1).transpose(0, 2, 3, 1)


def _untile(y: jax.Array, tiling: _Tiling) -> jax.Array:
    """[n_tiles, B, prod(tile), ...] -> [B, *extent, ...] (tiles back in place, padding cut)."""
    rank = len(tiling.tile)
    rest = y.shape[3:]
    b = y.shape[1]
    y = y.reshape(tiling.counts + (b,) + tiling.tile + rest)
    # axes: counts (0..r-1), batch (r), tile (r+1..2r), rest
    order = [rank] + [ax for a in range(rank) for ax in (a, rank + 1 + a)]
    order += list(range(2 * rank + 1, y.ndim))
    y = y.transpose(order)
    y = y.reshape((b,) + tuple(n * t for n, t in zip(tiling.counts, tiling.tile)) + rest)
    return y[(slice(None),) + tuple(slice(0, e) for e in tiling.extent)]


def _tile_mask(problem: Problem, a_is_query: bool, a_start: jax.Array, b_start: jax.Array,
               tile: Sequence[int], width: Sequence[int]) -> jax.Array:
    """Exact neighbor mask of one tile: [prod(tile), prod(width)] booleans.

    ``a_start``/``b_start`` are the local first elements of the tile (block A) and of its
    window (block B). Elements of A past the block end (tile padding) are treated as the
    block's last element when A holds queries, and masked out when A holds keys.
    """
    rank = problem.rank
    result = True
    for a in range(rank):
        ax = problem.axis(a)
        ia = a_start[a] + jnp.arange(tile[a], dtype=jnp.int32)
        ib = b_start[a] + jnp.arange(width[a], dtype=jnp.int32)
        if a_is_query:
            q = problem.q_origin[a] + jnp.minimum(ia, problem.q_extent[a] - 1)
            k = problem.kv_origin[a] + ib
            m = mask.is_neighbor(q[:, None], k[None, :], ax, jnp)
        else:
            k = problem.kv_origin[a] + ia
            q = problem.q_origin[a] + ib
            m = mask.is_neighbor(q[None, :], k[:, None], ax, jnp)
            m = m & (ia < problem.kv_extent[a])[:, None]
        # The neighborhood is the AND over axes: lay out [t_0..t_{r-1}, w_0..w_{r-1}].
        shape = [1] * (2 * rank)
        shape[a], shape[rank + a] = tile[a], width[a]
        result = result & m.reshape(shape)
    t = math.prod(tile)
    return result.reshape(t, -1)


def _chunk(tiling: _Tiling, per_tile_elements: int) -> int:
    return max(1, min(tiling.n_tiles, CHUNK_ELEMENTS // max(1, per_tile_elements)))


# --------------------------------------------------------------------------
# Forward.
# --------------------------------------------------------------------------

def _forward(query, key, value, problem: Problem, tile: tuple | None):
    rank = problem.rank
    tiling = _query_tiling(problem, tile)
    b, h, h_kv, d_v = query.shape[0], query.shape[-2], key.shape[-2], value.shape[-1]
    acc = _acc_dtype(query.dtype)
    prec = _precision(query.dtype)
    q_pad = _pad_to_tiles(query, tiling)

    def one_tile(starts):
        q_start, k_start = starts
        q = _flatten_tokens(_slice(q_pad, q_start, tiling.tile), rank)
        k = _flatten_tokens(_slice(key, k_start, tiling.width), rank)
        v = _flatten_tokens(_slice(value, k_start, tiling.width), rank)
        q = _group_heads(q, h_kv)
        s = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=acc, precision=prec)
        s = s * problem.scale
        m = _tile_mask(problem, True, q_start, k_start, tiling.tile, tiling.width)
        s = jnp.where(m, s, -jnp.inf)
        s_max = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - s_max)
        l = jnp.sum(p, axis=-1, keepdims=True)
        lse = (s_max + jnp.log(l))[..., 0]  # [b, h_kv, g, q]
        p = (p / l).astype(value.dtype if acc == jnp.float32 else acc)
        o = jnp.einsum("bhgqk,bkhd->bqhgd", p, v, preferred_element_type=acc, precision=prec)
        o = o.reshape(o.shape[:2] + (h, d_v)).astype(query.dtype)
        lse = lse.reshape(b, h, -1).transpose(0, 2, 1)
        return o, lse

    chunk = _chunk(tiling, b * h * tiling.tile_size * tiling.window_size)
    xs = (jnp.asarray(tiling.starts), jnp.asarray(tiling.window_starts))
    o, lse = jax.lax.map(one_tile, xs, batch_size=chunk)
    return _untile(o, tiling), _untile(lse, tiling)


# --------------------------------------------------------------------------
# Backward.
# --------------------------------------------------------------------------

def _backward_dq(query, key, value, lse, d_out, delta, problem: Problem, tile):
    rank = problem.rank
    tiling = _query_tiling(problem, tile)
    b, h, h_kv = query.shape[0], query.shape[-2], key.shape[-2]
    acc = _acc_dtype(query.dtype)
    prec = _precision(query.dtype)
    q_pad, do_pad = _pad_to_tiles(query, tiling), _pad_to_tiles(d_out, tiling)
    lse_pad, delta_pad = _pad_to_tiles(lse, tiling), _pad_to_tiles(delta, tiling)

    def one_tile(starts):
        q_start, k_start = starts
        q = _flatten_tokens(_slice(q_pad, q_start, tiling.tile), rank)
        do = _flatten_tokens(_slice(do_pad, q_start, tiling.tile), rank)
        l = _flatten_tokens(_slice(lse_pad, q_start, tiling.tile), rank)
        dl = _flatten_tokens(_slice(delta_pad, q_start, tiling.tile), rank)
        k = _flatten_tokens(_slice(key, k_start, tiling.width), rank)
        v = _flatten_tokens(_slice(value, k_start, tiling.width), rank)
        q, do = _group_heads(q, h_kv), _group_heads(do, h_kv)
        l, dl = _group_rows(l, h_kv)[..., None], _group_rows(dl, h_kv)[..., None]
        s = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=acc, precision=prec)
        m = _tile_mask(problem, True, q_start, k_start, tiling.tile, tiling.width)
        p = jnp.where(m, jnp.exp(s * problem.scale - l), 0)
        dp = jnp.einsum("bqhgd,bkhd->bhgqk", do, v, preferred_element_type=acc, precision=prec)
        ds = (p * (dp - dl)).astype(key.dtype if acc == jnp.float32 else acc)
        dq = jnp.einsum("bhgqk,bkhd->bqhgd", ds, k, preferred_element_type=acc, precision=prec)
        return (dq * problem.scale).reshape(dq.shape[:2] + (h, -1)).astype(query.dtype)

    chunk = _chunk(tiling, 2 * b * h * tiling.tile_size * tiling.window_size)
    xs = (jnp.asarray(tiling.starts), jnp.asarray(tiling.window_starts))
    return _untile(jax.lax.map(one_tile, xs, batch_size=chunk), tiling)


def _backward_dkv(query, key, value, lse, d_out, delta, problem: Problem, tile):
    rank = problem.rank
    tiling = _key_tiling(problem, tile)
    b, h, h_kv = query.shape[0], query.shape[-2], key.shape[-2]
    acc = _acc_dtype(query.dtype)
    prec = _precision(query.dtype)
    k_pad, v_pad = _pad_to_tiles(key, tiling), _pad_to_tiles(value, tiling)

    def one_tile(starts):
        k_start, q_start = starts
        k = _flatten_tokens(_slice(k_pad, k_start, tiling.tile), rank)
        v = _flatten_tokens(_slice(v_pad, k_start, tiling.tile), rank)
        q = _flatten_tokens(_slice(query, q_start, tiling.width), rank)
        do = _flatten_tokens(_slice(d_out, q_start, tiling.width), rank)
        l = _flatten_tokens(_slice(lse, q_start, tiling.width), rank)
        dl = _flatten_tokens(_slice(delta, q_start, tiling.width), rank)
        q, do = _group_heads(q, h_kv), _group_heads(do, h_kv)
        l, dl = _group_rows(l, h_kv)[:, :, :, None, :], _group_rows(dl, h_kv)[:, :, :, None, :]
        s = jnp.einsum("bkhd,bqhgd->bhgkq", k, q, preferred_element_type=acc, precision=prec)
        m = _tile_mask(problem, False, k_start, q_start, tiling.tile, tiling.width)
        p = jnp.where(m, jnp.exp(s * problem.scale - l), 0)
        dp = jnp.einsum("bkhd,bqhgd->bhgkq", v, do, preferred_element_type=acc, precision=prec)
        ds = (p * (dp - dl)).astype(query.dtype if acc == jnp.float32 else acc)
        p = p.astype(d_out.dtype if acc == jnp.float32 else acc)
        dv = jnp.einsum("bhgkq,bqhgd->bkhd", p, do, preferred_element_type=acc, precision=prec)
        dk = jnp.einsum("bhgkq,bqhgd->bkhd", ds, q, preferred_element_type=acc, precision=prec)
        return (dk * problem.scale).astype(key.dtype), dv.astype(value.dtype)

    chunk = _chunk(tiling, 2 * b * h * tiling.tile_size * tiling.window_size)
    xs = (jnp.asarray(tiling.starts), jnp.asarray(tiling.window_starts))
    dk, dv = jax.lax.map(one_tile, xs, batch_size=chunk)
    return _untile(dk, tiling), _untile(dv, tiling)


# --------------------------------------------------------------------------
# The differentiable op.
# --------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _attention(query, key, value, problem, q_tile, kv_tile):
    return _forward(query, key, value, problem, q_tile)


def _attention_fwd(query, key, value, problem, q_tile, kv_tile):
    out, lse = _forward(query, key, value, problem, q_tile)
    return (out, lse), (query, key, value, out, lse)


def _attention_bwd(problem, q_tile, kv_tile, residuals, cotangents):
    query, key, value, out, lse = residuals
    d_out, d_lse = cotangents
    acc = _acc_dtype(query.dtype)
    delta = jnp.sum(d_out.astype(acc) * out.astype(acc), axis=-1) - d_lse.astype(acc)
    d_out = d_out.astype(query.dtype)
    dq = _backward_dq(query, key, value, lse, d_out, delta, problem, q_tile)
    dk, dv = _backward_dkv(query, key, value, lse, d_out, delta, problem, kv_tile)
    return dq, dk, dv


_attention.defvjp(_attention_fwd, _attention_bwd)


def _folds(problem: Problem, query: jax.Array) -> bool:
    """Whether a call runs as undilated pieces (:mod:`jax_gna.dilation`): a whole-grid
    problem with dilation and one batch axis. A contiguous tile of queries holds every
    dilation group, so its key box spans ``(k - 1) * d + tile`` keys per axis, of which
    each query sees ``k``; a piece's tile spans ``k - 1 + tile``. On a 2-core CPU the
    fold made forwards 1.8-7.6x faster (``benchmarks/results/dilation-xla-cpu.md``)."""
    return dilation.applies(problem, query.shape)


def attention(query: jax.Array, key: jax.Array, value: jax.Array, problem: Problem, *,
              q_tile: Sequence[int] | None = None, kv_tile: Sequence[int] | None = None,
              fold_dilation: bool = True) -> tuple[jax.Array, jax.Array]:
    """Neighborhood attention of a block of queries over a block of keys/values.

    Args:
      query: ``[B, *problem.q_extent, H, D]``.
      key, value: ``[B, *problem.kv_extent, H_kv, D]`` and ``[..., D_v]``.
      problem: the validated :class:`~jax_gna.params.Problem`.
      q_tile, kv_tile: tile shapes of the query and key passes (default by rank).
      fold_dilation: run a dilated whole-grid problem as undilated pieces, its dilation
        groups stacked in the batch (:mod:`jax_gna.dilation`); False tiles it directly.
        A shard of a spatially sharded call (a problem with origins) is tiled directly;
        :mod:`jax_gna.sharding` folds the shards itself where they hold whole groups.

    Returns:
      ``(out, lse)``: ``[B, *q_extent, H, D_v]`` in the input dtype and the natural
      log-sum-exp of the scaled scores, ``[B, *q_extent, H]`` in float32 (float64 for
      float64 inputs). Differentiable in all three inputs, through both outputs.
    """
    q_tile = None if q_tile is None else tuple(q_tile)
    kv_tile = None if kv_tile is None else tuple(kv_tile)

    def run(q, k, v, p):
        return _attention(q, k, v, p, q_tile, kv_tile)

    if fold_dilation and _folds(problem, query):
        return dilation.attention(run, query, key, value, problem)
    return run(query, key, value, problem)


def _backward(query, key, value, out, lse, d_out, d_lse, problem: Problem):
    """``(dq, dk, dv)`` from a saved forward: the backend backward protocol
    (``attention.backward``) that the sharded op uses to skip recomputing the forward.
    Folds dilation as :func:`attention` does."""
    def bwd(q, k, v, o, l, do, dl, p):
        return _attention_bwd(p, None, None, (q, k, v, o, l), (do, dl))

    if _folds(problem, query):
        return dilation.backward(bwd, query, key, value, out, lse, d_out, d_lse, problem)
    return bwd(query, key, value, out, lse, d_out, d_lse, problem)


attention.backward = _backward
# A spatially sharded dilated call whose shards hold whole dilation groups runs folded
# (jax_gna.sharding._fold_for), for the reason _folds gives.
attention.fold_shards = lambda problems, query_shape, value_shape, dtype, groups: (True, True)


# --------------------------------------------------------------------------
# Plain attention over the additional (global) tokens, and the merge.
# --------------------------------------------------------------------------

def dense_attention(query: jax.Array, key: jax.Array, value: jax.Array, scale: float,
                    chunk: int = 1024) -> tuple[jax.Array, jax.Array]:
    """Attention of every query over all of ``key``/``value`` (``[B, S, H_kv, D]``),
    with the log-sum-exp. Queries ``[B, *spatial, H, D]`` go in chunks of ``chunk``
    tokens, each rematerialized in the backward pass, so memory stays
    O(tokens x S)."""
    spatial = query.shape[1:-2]
    b, h, d = query.shape[0], query.shape[-2], query.shape[-1]
    h_kv, d_v = key.shape[-2], value.shape[-1]
    g = h // h_kv
    n = math.prod(spatial)
    acc = _acc_dtype(query.dtype)
    prec = _precision(query.dtype)
    chunk = min(chunk, n)
    n_chunks = -(-n // chunk)
    q = query.reshape(b, n, h_kv, g, d)
    q = jnp.pad(q, ((0, 0), (0, n_chunks * chunk - n), (0, 0), (0, 0), (0, 0)))
    q = q.reshape(b, n_chunks, chunk, h_kv, g, d).transpose(1, 0, 2, 3, 4, 5)

    @jax.checkpoint
    def one_chunk(qc):
        s = jnp.einsum("bqhgd,bkhd->bhgqk", qc, key, preferred_element_type=acc, precision=prec)
        s = s * scale
        lse = jax.nn.logsumexp(s, axis=-1)
        p = jnp.exp(s - lse[..., None]).astype(value.dtype if acc == jnp.float32 else acc)
        o = jnp.einsum("bhgqk,bkhd->bqhgd", p, value, preferred_element_type=acc, precision=prec)
        return o.reshape(b, chunk, h, d_v), lse.reshape(b, h, chunk).transpose(0, 2, 1)

    o, lse = jax.lax.map(one_chunk, q)
    o = o.transpose(1, 0, 2, 3, 4).reshape(b, n_chunks * chunk, h, d_v)[:, :n]
    lse = lse.transpose(1, 0, 2, 3).reshape(b, n_chunks * chunk, h)[:, :n]
    return (o.reshape((b,) + spatial + (h, d_v)).astype(query.dtype),
            lse.reshape((b,) + spatial + (h,)))


def dense_backward(query: jax.Array, key: jax.Array, value: jax.Array, out: jax.Array,
                   lse: jax.Array, d_out: jax.Array, d_lse: jax.Array, scale: float,
                   chunk: int = 1024) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(dq, dk, dv)`` of :func:`dense_attention` given the cotangents ``d_out`` and
    ``d_lse`` of its outputs: the protocol's ``dense.backward`` (``jax_gna.sharding``) for
    ``backend="auto"``'s non-CUDA branch. It recomputes the forward (autodiff of the
    checkpointed chunks); ``out`` and ``lse`` are not used. A hand-written backward from
    the saved lse (session 27) was 2-21% faster on an H200 but 2-5x slower on XLA:CPU
    with 32-64 tokens, where this backend matters most
    (``benchmarks/results/extra-tokens-h200.md``)."""
    del out, lse
    _, vjp = jax.vjp(lambda q, k, v: dense_attention(q, k, v, scale, chunk), query, key, value)
    return vjp((d_out, d_lse))


def dense_backward_saved(query: jax.Array, key: jax.Array, value: jax.Array, out: jax.Array,
                         lse: jax.Array, d_out: jax.Array, d_lse: jax.Array, scale: float,
                         max_scores: int = 1 << 27) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(dq, dk, dv)`` of the part over ``key``/``value`` (``[B, S, H_kv, D]``, every query
    sees all of them) of an attention whose rows' saved ``out`` and ``lse`` may span more
    keys (a neighborhood merged with these tokens): ``P = exp(q k^T scale - lse)`` is the
    row's softmax restricted to these keys and ``delta = rowsum(dO o) - dLSE`` the whole
    row's, so the parts' gradients add up to the union's. No forward recomputed. The
    queries go in as few chunks as keep each chunk's ``[B, H, chunk, S]`` float32 scores
    within ``max_scores`` elements (one chunk on the benchmark problems; dK / dV summed
    over the chunks). The kernels' backward for additional tokens that ``cuda.dense_blocker``
    leaves to XLA (few tokens for the heads: ``cuda.tokens_blocker``)."""
    b, h, d = query.shape[0], query.shape[-2], query.shape[-1]
    h_kv, d_v = key.shape[-2], value.shape[-1]
    g, n = h // h_kv, math.prod(query.shape[1:-2])
    acc, prec = _acc_dtype(query.dtype), _precision(query.dtype)
    low = value.dtype if acc == jnp.float32 else acc  # matmul operands as in the forward
    q = query.reshape(b, n, h_kv, g, d)
    do = d_out.astype(query.dtype).reshape(b, n, h_kv, g, d_v)
    delta = jnp.sum(do.astype(acc) * out.reshape(b, n, h_kv, g, d_v).astype(acc), axis=-1)
    delta = delta - d_lse.reshape(b, n, h_kv, g).astype(acc)
    lse = lse.reshape(b, n, h_kv, g).astype(acc)
    row = lambda x: x.transpose(0, 2, 3, 1)[..., None]  # noqa: E731 - [b, n, h, g] -> [b, h, g, n, 1]

    def part(q, do, lse, delta):  # one chunk of queries: dq, and its share of dk / dv
        s = jnp.einsum("bqhgd,bkhd->bhgqk", q, key, preferred_element_type=acc, precision=prec)
        p = jnp.exp(s * scale - row(lse))
        dp = jnp.einsum("bqhgd,bkhd->bhgqk", do, value, preferred_element_type=acc, precision=prec)
        ds = (p * (dp - row(delta)) * scale).astype(low)
        dv = jnp.einsum("bhgqk,bqhgd->bkhd", p.astype(low), do, preferred_element_type=acc,
                        precision=prec)
        dq = jnp.einsum("bhgqk,bkhd->bqhgd", ds, key, preferred_element_type=acc, precision=prec)
        dk = jnp.einsum("bhgqk,bqhgd->bkhd", ds, q, preferred_element_type=acc, precision=prec)
        return dq, dk, dv

    chunk = max(1, max_scores // (b * h * key.shape[1]))
    if n <= chunk:
        dq, dk, dv = part(q, do, lse, delta)
    else:  # padded rows: q = dO = 0 and lse = +inf, so P = 0 there
        m = -(-n // chunk)
        pad = lambda x, fill=0: jnp.pad(  # noqa: E731
            x, [(0, 0), (0, m * chunk - n)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        cut = lambda x: x.reshape((b, m, chunk) + x.shape[2:]).swapaxes(0, 1)  # noqa: E731

        def step(carry, xs):
            dq, dk, dv = part(*xs)
            return (carry[0] + dk, carry[1] + dv), dq

        zeros = (jnp.zeros(key.shape, acc), jnp.zeros(value.shape, acc))
        (dk, dv), dq = jax.lax.scan(step, zeros, (cut(pad(q)), cut(pad(do)), cut(pad(lse, jnp.inf)),
                                                  cut(pad(delta))))
        dq = dq.swapaxes(0, 1).reshape((b, m * chunk) + dq.shape[3:])[:, :n]
    return (dq.reshape(query.shape).astype(query.dtype), dk.astype(key.dtype),
            dv.astype(value.dtype))


def merge(out_a: jax.Array, lse_a: jax.Array, out_b: jax.Array, lse_b: jax.Array
          ) -> tuple[jax.Array, jax.Array]:
    """Combine two attentions over disjoint key sets into the attention over their union."""
    lse = jnp.logaddexp(lse_a, lse_b)
    wa = jnp.exp(lse_a - lse)[..., None]
    wb = jnp.exp(lse_b - lse)[..., None]
    acc = lse.dtype
    out = out_a.astype(acc) * wa + out_b.astype(acc) * wb
    return out.astype(out_a.dtype), lse


attention.dense = dense_attention  # the additional tokens (protocol: jax_gna.sharding)
attention.tokens_backward = dense_backward_saved  # their part of a merged backward (same)
