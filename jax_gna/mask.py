"""The GNA window math of SEMANTICS.md, one axis at a time.

The functions take integer arrays (NumPy or JAX) of *global* coordinates, so the
same code builds the masks traced into the ``xla`` backend, the NumPy brute force
of the tests, and the static tile spans computed at trace time. A key is a
neighbor of a query iff it is one on every axis.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .params import Axis


def window(i: Any, ax: Axis, xp: Any = np) -> tuple[Any, Any]:
    """Inclusive window ``[lo, hi]`` of query ``i``, in indices *within its dilation group*.

    Key ``j`` is a neighbor of query ``i`` iff ``j % d == i % d`` and
    ``lo <= j // d <= hi``.
    """
    L, k, s, d = ax.length, ax.kernel_size, ax.stride, ax.dilation
    g = i % d
    ig = i // d
    group_len = (L - g + d - 1) // d  # ceil((L - g) / d)
    wl = k // 2
    wr = k // 2 + (k % 2 - 1)
    first = (ig // s) * s
    if ax.is_causal:
        leader = xp.minimum(first + s - 1, group_len - 1)
        return xp.maximum(leader - k + 1, 0), ig
    leader = xp.minimum(first + s // 2, group_len - 1)
    centre = xp.minimum(xp.maximum(leader, wl), group_len - 1 - wr)
    return centre - wl, centre + wr


def window_extent(i: Any, ax: Axis, xp: Any = np) -> tuple[Any, Any]:
    """Inclusive range ``[first, last]`` of global key coordinates that query ``i`` can see."""
    lo, hi = window(i, ax, xp)
    g = i % ax.dilation
    return lo * ax.dilation + g, hi * ax.dilation + g


def is_neighbor(i: Any, j: Any, ax: Axis, xp: Any = np) -> Any:
    """Boolean (broadcast over ``i`` and ``j``): is key ``j`` in query ``i``'s window."""
    lo, hi = window(i, ax, xp)
    d = ax.dilation
    jg = j // d
    return (j % d == i % d) & (lo <= jg) & (jg <= hi)


def key_spans(ax: Axis, q_start: int, q_count: int, tile: int, kv_start: int, kv_count: int
              ) -> tuple[int, np.ndarray]:
    """For query tiles of ``tile`` queries covering ``[q_start, q_start + q_count)``: one
    common width ``W`` and each tile's first key, so that every tile's keys lie in
    ``[first, first + W)`` inside the key block ``[kv_start, kv_start + kv_count)``.

    Queries past the block's end (the padding of the last tile) are treated as the
    last real query. Raises ``ValueError`` if a window leaves the key block.
    """
    n_tiles = -(-q_count // tile)
    i = q_start + np.minimum(np.arange(n_tiles * tile), q_count - 1)
    first, last = window_extent(i, ax)
    if first.min() < kv_start or last.max() >= kv_start + kv_count:
        raise ValueError(
            f"the key block [{kv_start}, {kv_start + kv_count}) does not hold every window of "
            f"the queries [{q_start}, {q_start + q_count}) (they need keys "
            f"[{first.min()}, {last.max()}]).")
    lo = first.reshape(n_tiles, tile).min(axis=1)
    hi = last.reshape(n_tiles, tile).max(axis=1)
    width = int((hi - lo).max()) + 1
    starts = np.clip(lo, kv_start, kv_start + kv_count - width)
    return width, starts.astype(np.int64)


def query_spans(ax: Axis, kv_start: int, kv_count: int, tile: int, q_start: int, q_count: int
                ) -> tuple[int, np.ndarray]:
    """The transpose of :func:`key_spans`: for key tiles of ``tile`` keys covering the key
    block, one width ``W`` and each tile's first query, so that every query of the block
    that sees a key of the tile lies in ``[first, first + W)``."""
    n_tiles = -(-kv_count // tile)
    i = q_start + np.arange(q_count)
    first, last = window_extent(i, ax)
    a = kv_start + np.arange(n_tiles) * tile
    b = np.minimum(a + tile, kv_start + kv_count) - 1
    hit = (first[None, :] <= b[:, None]) & (last[None, :] >= a[:, None])
    any_hit = hit.any(axis=1)
    lo = np.where(any_hit, np.argmax(hit, axis=1), 0)
    hi = np.where(any_hit, q_count - 1 - np.argmax(hit[:, ::-1], axis=1), 0)
    width = int((hi - lo).max()) + 1
    starts = q_start + np.clip(lo, 0, q_count - width)
    return width, starts.astype(np.int64)
