"""Dilation as extra batch entries: a layout transform around an undilated backend call.

With dilation ``d`` on an axis of length ``L``, position ``i`` only ever meets positions
of its own group ``i % d`` (SEMANTICS.md), and inside a group the windows are those of an
undilated problem on the group's ``ceil((L - g) / d)`` positions, with the same kernel
size, stride and causality. So a dilated problem is ``d`` undilated ones per axis. The
groups of an axis have two lengths (``L // d + 1`` for the first ``L % d`` groups,
``L // d`` for the rest), so an axis splits into at most two *pieces*; a problem into
at most ``2 ** rank``, each one undilated call with its groups stacked in the batch.

:func:`attention` gathers the pieces (pad, reshape, slice, transpose: one copy per
tensor and piece in XLA), runs the backend on each and scatters ``out`` and ``lse``
back. Every step is linear, so autodiff gives the backward: the backend's own backward
on each piece, between the transposed copies. The cuda backend uses it to run dilated
problems on the Hopper kernels, which take no dilation themselves
(``jax_gna.cuda.fold_dilation``); the xla backend so that its tiles hold one group's
tokens only (``jax_gna.xla.attention``).
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from .params import Problem

__all__ = ["pieces", "gather", "scatter", "fold_groups", "unfold_groups", "applies", "forward",
           "attention", "backward_saved", "backward"]

LONG, SHORT = 0, 1  # the groups of an axis with L // d + 1 positions, and with L // d


def _groups(length: int, d: int) -> tuple[tuple[int, int, int], ...]:
    """``(kind, first group, group count)`` of each piece of one axis, long first."""
    rem = length % d
    if rem == 0:
        return ((SHORT, 0, d),)
    return ((LONG, 0, rem), (SHORT, rem, d - rem))


def pieces(problem: Problem) -> list[tuple[tuple[int, ...], Problem]]:
    """``(kinds, sub-problem)`` for each piece of a whole-grid ``problem``: ``kinds`` has
    :data:`LONG` or :data:`SHORT` per axis; the sub-problem is the undilated problem of
    one group (same kernel size, stride, causality and scale)."""
    if not problem.is_whole:
        raise ValueError("the dilation fold needs the whole grid (no shard origins)")
    per_axis = [[kind for kind, _, _ in _groups(n, d)]
                for n, d in zip(problem.shape, problem.dilation)]
    result = []
    for kinds in itertools.product(*per_axis):
        shape = tuple(n // d + (kind == LONG)
                      for n, d, kind in zip(problem.shape, problem.dilation, kinds))
        result.append((kinds, Problem(shape=shape, kernel_size=problem.kernel_size,
                                      stride=problem.stride, dilation=(1,) * problem.rank,
                                      is_causal=problem.is_causal, scale=problem.scale)))
    return result


def _split_axes(x: jax.Array, problem: Problem) -> jax.Array:
    """``[B, *spatial, ...]`` -> ``[B, M_1, d_1, ..., M_n, d_n, ...]``: each axis padded
    to ``d * ceil(L / d)`` (zeros) and split into (index in group, group)."""
    n = problem.rank
    pad = [(0, 0)] * x.ndim
    split = [x.shape[0]]
    for a, (length, d) in enumerate(zip(problem.shape, problem.dilation)):
        m = -(-length // d)
        pad[1 + a] = (0, m * d - length)
        split += [m, d]
    split += list(x.shape[1 + n:])
    return jnp.pad(x, pad).reshape(split)


def _groups_to_batch(y: jax.Array, n: int) -> jax.Array:
    """``[B, m1, g1, ..., mn, gn, ...]`` -> ``[g1 * ... * gn * B, m1, ..., mn, ...]``: the
    groups (row-major over the axes) outermost in the batch."""
    order = (tuple(2 + 2 * a for a in range(n)) + (0,) + tuple(1 + 2 * a for a in range(n))
             + tuple(range(1 + 2 * n, y.ndim)))
    y = y.transpose(order)
    return y.reshape((-1,) + y.shape[n + 1:])


def _batch_to_groups(part: jax.Array, counts: Sequence[int], batch: int, n: int) -> jax.Array:
    """The inverse of :func:`_groups_to_batch`, ``counts`` groups per axis."""
    y = part.reshape(tuple(counts) + (batch,) + part.shape[1:])
    order = [n]
    for a in range(n):
        order += [n + 1 + a, a]
    return y.transpose(order + list(range(2 * n + 1, y.ndim)))


def _merge_axes(y: jax.Array, n: int) -> jax.Array:
    """``[B, m1, g1, ..., mn, gn, ...]`` -> ``[B, m1 * g1, ..., mn * gn, ...]``."""
    return y.reshape((y.shape[0],) + tuple(y.shape[1 + 2 * a] * y.shape[2 + 2 * a] for a in range(n))
                     + y.shape[1 + 2 * n:])


def gather(x: jax.Array, problem: Problem) -> list[jax.Array]:
    """The pieces of ``x`` (``[B, *shape, ...]``), in the order of :func:`pieces`: piece
    ``[G * B, *piece shape, ...]``, its groups (row-major over the axes) outermost."""
    n = problem.rank
    y = _split_axes(x, problem)
    per_axis = [_groups(length, d) for length, d in zip(problem.shape, problem.dilation)]
    out = []
    for combo in itertools.product(*per_axis):
        index = [slice(None)]
        for (kind, g0, count), length, d in zip(combo, problem.shape, problem.dilation):
            index += [slice(0, length // d + (kind == LONG)), slice(g0, g0 + count)]
        out.append(_groups_to_batch(y[tuple(index)], n))
    return out


def scatter(parts: Sequence[jax.Array], problem: Problem) -> jax.Array:
    """The inverse of :func:`gather`: ``[B, *shape, ...]`` from the pieces."""
    n = problem.rank
    per_axis = [_groups(length, d) for length, d in zip(problem.shape, problem.dilation)]
    combos = list(itertools.product(*per_axis))
    batch = parts[0].shape[0] // math.prod(count for _, _, count in combos[0])
    # Each piece back to [B, m1, g1, ..., mn, gn, ...].
    blocks = {}
    for combo, part in zip(combos, parts):
        counts = tuple(count for _, _, count in combo)
        blocks[tuple(kind for kind, _, _ in combo)] = _batch_to_groups(part, counts, batch, n)
    # Join the pieces axis by axis: the short groups padded to the long length, then
    # long and short groups side by side.
    for a in range(n):
        length, d = problem.shape[a], problem.dilation[a]
        if length % d == 0:
            continue
        joined = {}
        for kinds, y in blocks.items():
            if kinds[a] == SHORT:
                continue
            short = blocks[kinds[:a] + (SHORT,) + kinds[a + 1:]]
            pad = [(0, 0)] * short.ndim
            pad[1 + 2 * a] = (0, 1)
            joined[kinds[:a] + (SHORT,) + kinds[a + 1:]] = jnp.concatenate(
                [y, jnp.pad(short, pad)], axis=2 + 2 * a)
        blocks = joined
    (y,) = blocks.values()
    return _merge_axes(y, n)[(slice(None),) + tuple(slice(0, length) for length in problem.shape)]


def fold_groups(x: jax.Array, dilation: Sequence[int]) -> jax.Array:
    """``[B, *spatial, ...]`` -> ``[G * B, *(spatial / dilation), ...]`` for a block whose
    every axis holds whole groups (``spatial[a] % dilation[a] == 0``): :func:`gather`'s
    layout of its single piece, groups outermost. A shard of a spatially sharded axis
    whose length is a multiple of ``d`` (so its first row is too) folds alone into the
    matching block of the folded grid (``jax_gna.sharding``)."""
    n = len(dilation)
    split = [x.shape[0]]
    for length, d in zip(x.shape[1:1 + n], dilation):
        split += [length // d, d]
    return _groups_to_batch(x.reshape(tuple(split) + x.shape[1 + n:]), n)


def unfold_groups(y: jax.Array, dilation: Sequence[int], batch: int) -> jax.Array:
    """The inverse of :func:`fold_groups`: ``[B, *spatial, ...]`` back from
    ``[G * B, *(spatial / dilation), ...]``."""
    n = len(dilation)
    return _merge_axes(_batch_to_groups(y, dilation, batch, n), n)


Impl = Callable[[jax.Array, jax.Array, jax.Array, Problem], tuple[jax.Array, jax.Array]]


def applies(problem: Problem, query_shape: Sequence[int]) -> bool:
    """Whether a call can run as pieces: a whole-grid problem with dilation and one batch
    axis (the layout :func:`gather` and :func:`scatter` assume)."""
    return (any(d != 1 for d in problem.dilation) and problem.is_whole
            and len(query_shape) == problem.rank + 3)


def forward(impl: Impl, query: jax.Array, key: jax.Array, value: jax.Array,
            problem: Problem) -> tuple[tuple[jax.Array, jax.Array], tuple]:
    """``((out, lse), saved)``: :func:`attention`, and its pieces of q, k, v, out and lse
    for :func:`backward_saved`."""
    subs = pieces(problem)
    qs, ks, vs = (gather(x, problem) for x in (query, key, value))
    outs, lses = zip(*(impl(q, k, v, sub) for q, k, v, (_, sub) in zip(qs, ks, vs, subs)))
    return (scatter(outs, problem), scatter(lses, problem)), (qs, ks, vs, outs, lses)


def attention(impl: Impl, query: jax.Array, key: jax.Array, value: jax.Array,
              problem: Problem) -> tuple[jax.Array, jax.Array]:
    """``(out, lse)`` of a whole-grid dilated ``problem`` by undilated ``impl`` calls, one
    per piece (:func:`pieces`); differentiable where ``impl`` is."""
    return forward(impl, query, key, value, problem)[0]


def backward_saved(bwd, saved: tuple, d_out: jax.Array, d_lse: jax.Array, problem: Problem):
    """``(dq, dk, dv)`` from :func:`forward`'s ``saved`` pieces by undilated
    ``bwd(q, k, v, out, lse, d_out, d_lse, sub_problem)`` calls, one per piece."""
    d_outs, d_lses = gather(d_out, problem), gather(d_lse, problem)
    grads = [bwd(*args, sub) for *args, (_, sub)
             in zip(*saved, d_outs, d_lses, pieces(problem))]
    return tuple(scatter(g, problem) for g in zip(*grads))


def backward(bwd, query, key, value, out, lse, d_out, d_lse, problem: Problem):
    """``(dq, dk, dv)`` of :func:`attention` from its saved ``(out, lse)``, as
    :func:`backward_saved` (the pieces gathered here)."""
    saved = tuple(gather(x, problem) for x in (query, key, value, out, lse))
    return backward_saved(bwd, saved, d_out, d_lse, problem)
