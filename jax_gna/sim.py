"""Speed-of-light simulator: how fast can a tiled GNA kernel be, before any kernel runs?

A tiled attention kernel splits the queries into *query tiles* and the keys into
*key tiles* (both multi-dimensional boxes of the spatial grid, e.g. 4x8x8 and
2x8x8 in 3-D). For each query tile it visits only the key tiles that hold at
least one neighbor of one of its queries, applies the exact element mask on the
visited tiles that are only partly inside the neighborhood, and skips the rest.
Its cost is then about ``visited tiles / all tiles`` of dense attention's. This
module counts those tiles exactly, in NumPy, without building any
``[tokens, tokens]`` array:

Per-axis separability. A key is a neighbor of a query iff it is one on every
axis (SEMANTICS.md), so a key tile (a box) holds a neighbor of some query of a
query tile (a box) iff *on every axis* the tile's key interval meets the union of
the per-axis neighbor sets of the tile's queries. We build, per axis, the small
boolean matrix ``visited[query tile, key tile]`` (and ``full[...]``: every real
query of the tile sees every real key of the key tile on that axis) and get all
multi-dimensional counts as products of per-axis counts. A 3-D 30x48x80 problem
takes about a millisecond.

The bounds (all "x times faster than dense attention over the same tokens"):

* ``flop_bound`` = total keys / average number of keys a query attends to
  (``1 / density``). Causal windows count only the keys actually attended.
* ``tile_bound`` = total keys / keys in the key tiles visited by the *worst* query
  tile, i.e. total key tiles / key tiles visited when the tiles divide the grid
  (padding in partial tiles is work a kernel pays for and dense attention does not).
  **This is the headline number** (``SimResult.bound``) and the one that
  reproduces the published speed-of-light values exactly (rounded to 2
  decimals): HunyuanVideo 30x48x80, window 18x24x24, query tile 4x8x8, key tile
  2x8x8: 3.27x at stride 1 and 11.11x at stride 16x8x8; FLUX 256x256, window
  80x80, query tile 16x16, key tile 16x8: 6.10x. The worst tile is an interior
  one in large problems, so it is what the bulk of the work costs.
* ``tile_bound_avg``: the same for the average query tile (higher than
  ``tile_bound``: border tiles see fewer key tiles).

Dilated axes are tiled per dilation group by default (``layout="grouped"``: the
kernels' layout, where a dilated problem is ``prod(dilation)`` undilated ones);
``layout="interleaved"`` tiles the original coordinates instead. Tiles are aligned
at the grid (group) origin; a last tile that runs past the end of an axis is one
tile, whose padding counts as work in ``tile_bound`` (a kernel pays for it); the
bounds checks of padded elements are not counted as element masks.

(The bound over the *average* query tile does not reproduce the published values:
it gives 5.24x for the HunyuanVideo stride-1 case above, where the worst tile gives
3.27x. The two agree whenever every query tile sees the same number of key tiles,
e.g. blocked GNA.)
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
import math
from typing import Iterable, Sequence, Union

import numpy as np

from .mask import window
from .params import Axis, per_axis, window_params

IntOrTuple = Union[int, Sequence[int]]
BoolOrTuple = Union[bool, Sequence[bool]]

__all__ = ["AxisTiles", "SimResult", "Schedule", "simulate", "schedule", "best_tiles",
           "tile_shapes", "LAYOUTS", "attended_keys", "attended_pairs", "flops", "dense_flops",
           "axis_tiles"]

# Max number of (query, key tile) cells evaluated at once per axis (memory bound).
_CHUNK = 1 << 22


# --------------------------------------------------------------------------
# One axis.
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AxisTiles:
    """Tile counts of one axis.

    Attributes:
      axis: the axis parameters.
      q_tile, kv_tile: tile extents on this axis.
      n_q_tiles, n_kv_tiles: number of tiles covering the axis (last one may be partial).
      visited: ``[n_q_tiles, n_kv_tiles]`` bool; key tile meets the union of the
        query tile's windows on this axis.
      full: ``[n_q_tiles, n_kv_tiles]`` bool; every real query of the query tile sees
        every real key of the key tile on this axis (implies ``visited``).
      keys_per_query: average number of keys a query sees on this axis.
    """

    axis: Axis
    q_tile: int
    kv_tile: int
    n_q_tiles: int
    n_kv_tiles: int
    visited: np.ndarray
    full: np.ndarray
    keys_per_query: float

    @property
    def visited_per_q_tile(self) -> np.ndarray:
        return self.visited.sum(axis=1)

    @property
    def full_per_q_tile(self) -> np.ndarray:
        return self.full.sum(axis=1)


def _axis_neighbor_counts(ax: Axis) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every query of the axis: group ``g``, window ``[lo, hi]`` (in group indices)."""
    i = np.arange(ax.length, dtype=np.int64)
    lo, hi = window(i, ax)
    lo = np.broadcast_to(np.asarray(lo, dtype=np.int64), i.shape)
    hi = np.broadcast_to(np.asarray(hi, dtype=np.int64), i.shape)
    return i % ax.dilation, lo, hi


LAYOUTS = ("grouped", "interleaved")


@functools.lru_cache(maxsize=4096)
def axis_tiles(ax: Axis, q_tile: int, kv_tile: int, layout: str = "grouped") -> AxisTiles:
    """Per-axis visited/full key tiles for every query tile (see the module docstring).

    ``layout`` says how tiles cover a dilated axis (``d > 1``):

    * ``"grouped"`` (default; what jax_gna's kernels and NATTEN do): the axis is split
      into its ``d`` dilation groups (position ``i`` goes to group ``i % d`` at index
      ``i // d``) and each group is tiled on its own, as an undilated axis; tiles never
      mix groups. The matrices are block-diagonal over the groups.
    * ``"interleaved"``: tiles are intervals of the original coordinates. Query ``i``
      (group ``g = i % d``) sees the keys ``g + d*m`` for ``m`` in its window
      ``[lo, hi]``; a key tile ``[a, b]`` holds ``|[ceil((a-g)/d), floor((b-g)/d)] &
      [lo, hi]|`` of them.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
    if layout == "grouped" and ax.dilation > 1:
        parts = []
        for g in range(ax.dilation):
            n = (ax.length - g + ax.dilation - 1) // ax.dilation
            parts.append(axis_tiles(Axis(n, ax.kernel_size, ax.stride, 1, ax.is_causal),
                                    q_tile, kv_tile, "interleaved"))
        nq = sum(p.n_q_tiles for p in parts)
        nk = sum(p.n_kv_tiles for p in parts)
        visited = np.zeros((nq, nk), dtype=bool)
        full = np.zeros((nq, nk), dtype=bool)
        r = c = 0
        for p in parts:
            visited[r:r + p.n_q_tiles, c:c + p.n_kv_tiles] = p.visited
            full[r:r + p.n_q_tiles, c:c + p.n_kv_tiles] = p.full
            r, c = r + p.n_q_tiles, c + p.n_kv_tiles
        _, lo, hi = _axis_neighbor_counts(ax)
        visited.setflags(write=False)
        full.setflags(write=False)
        return AxisTiles(ax, q_tile, kv_tile, nq, nk, visited, full, float(np.mean(hi - lo + 1)))
    if q_tile < 1 or kv_tile < 1:
        raise ValueError(f"tile extents must be >= 1, got q_tile={q_tile}, kv_tile={kv_tile}.")
    L, d = ax.length, ax.dilation
    nq = -(-L // q_tile)
    nk = -(-L // kv_tile)
    g, lo, hi = _axis_neighbor_counts(ax)
    a = np.arange(nk, dtype=np.int64) * kv_tile
    b = np.minimum(a + kv_tile, L) - 1
    size = b - a + 1
    visited = np.zeros((nq, nk), dtype=bool)
    full = np.zeros((nq, nk), dtype=bool)
    # Process whole query tiles, a chunk at a time.
    tiles_per_chunk = max(1, _CHUNK // max(1, nk * q_tile))
    for t0 in range(0, nq, tiles_per_chunk):
        t1 = min(nq, t0 + tiles_per_chunk)
        q0, q1 = t0 * q_tile, min(L, t1 * q_tile)
        gg, ll, hh = g[q0:q1, None], lo[q0:q1, None], hi[q0:q1, None]
        m_first = -((gg - a[None, :]) // d)          # ceil((a - g) / d)
        m_last = (b[None, :] - gg) // d               # floor((b - g) / d)
        count = np.minimum(m_last, hh) - np.maximum(m_first, ll) + 1
        count = np.maximum(count, 0)
        hit = count > 0
        whole = count == size[None, :]
        # Pad the queries to whole tiles: padding rows neither hit nor break "full".
        pad = (t1 - t0) * q_tile - (q1 - q0)
        if pad:
            hit = np.concatenate([hit, np.zeros((pad, nk), bool)])
            whole = np.concatenate([whole, np.ones((pad, nk), bool)])
        visited[t0:t1] = hit.reshape(t1 - t0, q_tile, nk).any(axis=1)
        full[t0:t1] = whole.reshape(t1 - t0, q_tile, nk).all(axis=1)
    keys_per_query = float(np.mean(hi - lo + 1))
    visited.setflags(write=False)
    full.setflags(write=False)
    return AxisTiles(ax, q_tile, kv_tile, nq, nk, visited, full, keys_per_query)


# --------------------------------------------------------------------------
# FLOP counting.
# --------------------------------------------------------------------------

def _axes(shape: Sequence[int], kernel_size: IntOrTuple, stride: IntOrTuple,
          dilation: IntOrTuple, is_causal: BoolOrTuple) -> tuple[Axis, ...]:
    shape = tuple(int(n) for n in shape)
    if not 1 <= len(shape) <= 3:
        raise ValueError(f"shape must have 1, 2 or 3 spatial axes, got {shape}.")
    k, s, d, c = window_params(shape, kernel_size, stride, dilation, is_causal)
    return tuple(Axis(shape[a], k[a], s[a], d[a], c[a]) for a in range(len(shape)))


def attended_pairs(shape: Sequence[int], kernel_size: IntOrTuple, stride: IntOrTuple = 1,
                   dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False) -> int:
    """Exact number of (query, key) neighbor pairs over the whole grid (one batch, one head).

    ``prod(shape) * prod(kernel_size)`` without causal masking; with it, only the
    keys actually attended are counted.
    """
    axes = _axes(shape, kernel_size, stride, dilation, is_causal)
    total = 1
    for ax in axes:
        _, lo, hi = _axis_neighbor_counts(ax)
        total *= int(np.sum(hi - lo + 1))
    return total


def attended_keys(shape: Sequence[int], kernel_size: IntOrTuple, stride: IntOrTuple = 1,
                  dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False) -> float:
    """Average number of keys a query attends to."""
    return attended_pairs(shape, kernel_size, stride, dilation, is_causal) / math.prod(shape)


def flops(shape: Sequence[int], kernel_size: IntOrTuple, stride: IntOrTuple = 1,
          dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False, *, batch: int = 1,
          heads: int = 1, head_dim: int = 128, head_dim_v: int | None = None,
          pass_: str = "fwd") -> float:
    """Useful FLOPs as SEMANTICS.md counts them (what "effective TFLOP/s" divides).

    Forward: ``2 * B * H * pairs * (D + D_v)`` (= ``4 * B * H * prod(shape) *
    prod(kernel_size) * D`` without causal masking and with ``D_v == D``). Stride
    does not change it; causal masking does. ``pass_`` is ``"fwd"``, ``"bwd"``
    (2.5x forward) or ``"fwdbwd"`` (3.5x forward).
    """
    dv = head_dim if head_dim_v is None else head_dim_v
    fwd = 2.0 * batch * heads * attended_pairs(shape, kernel_size, stride, dilation,
                                               is_causal) * (head_dim + dv)
    factor = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}
    if pass_ not in factor:
        raise ValueError(f"pass_ must be one of {tuple(factor)}, got {pass_!r}.")
    return fwd * factor[pass_]


def dense_flops(shape: Sequence[int], *, batch: int = 1, heads: int = 1, head_dim: int = 128,
                head_dim_v: int | None = None, is_causal: bool = False,
                pass_: str = "fwd") -> float:
    """FLOPs of dense attention over the same tokens (causal: lower triangle incl. diagonal)."""
    n = math.prod(shape)
    pairs = n * (n + 1) / 2 if is_causal else n * n
    dv = head_dim if head_dim_v is None else head_dim_v
    factor = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}[pass_]
    return 2.0 * batch * heads * pairs * (head_dim + dv) * factor


# --------------------------------------------------------------------------
# The simulation of one tiling.
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SimResult:
    """What a tiled kernel must do for one problem and one pair of tile shapes.

    Bounds are speedups over dense attention on the same tokens.

    Attributes:
      shape, kernel_size, stride, dilation, is_causal: the problem (per axis).
      q_tile, kv_tile: tile shapes (per axis).
      density: average attended keys per query / total keys.
      flop_bound: ``1 / density``.
      n_q_tiles, n_kv_tiles: number of query / key tiles of the grid.
      visited_worst: key tiles visited by the worst query tile.
      visited_avg: key tiles visited by the average query tile.
      visited_total: visited (query tile, key tile) pairs.
      masked_total: of those, pairs that need an element mask (some query of the
        tile does not see some key of the key tile).
      masked_worst: masked key tiles of the worst query tile (the query tile with
        the most visited key tiles, ties broken by most masked).
      tile_bound: ``total keys / (visited_worst * keys per kv tile)`` (the headline
        bound; ``n_kv_tiles / visited_worst`` when the tiles divide the grid).
      tile_bound_avg: the same with ``visited_avg``.
      per_axis: the per-axis counts.
    """

    shape: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]
    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    density: float
    flop_bound: float
    n_q_tiles: int
    n_kv_tiles: int
    visited_worst: int
    visited_avg: float
    visited_total: int
    masked_total: int
    masked_worst: int
    tile_bound: float
    tile_bound_avg: float
    per_axis: tuple[AxisTiles, ...] = dataclasses.field(repr=False, compare=False)

    @property
    def bound(self) -> float:
        """The speed-of-light speedup over dense attention (``tile_bound``)."""
        return self.tile_bound

    @property
    def masked_fraction(self) -> float:
        """Fraction of the visited tiles that need an element mask."""
        return self.masked_total / self.visited_total if self.visited_total else 0.0

    @property
    def visited_fraction(self) -> float:
        """Fraction of all (query tile, key tile) pairs that are visited."""
        return self.visited_total / (self.n_q_tiles * self.n_kv_tiles)

    def as_dict(self) -> dict:
        """JSON-friendly summary (no per-axis matrices)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != "per_axis"}
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = list(v)
        out["bound"] = self.bound
        out["masked_fraction"] = self.masked_fraction
        out["visited_fraction"] = self.visited_fraction
        return out

    def summary(self) -> str:
        """A few human-readable lines."""
        x = lambda t: "x".join(str(v) for v in t)  # noqa: E731
        causal = "x".join("T" if c else "F" for c in self.is_causal)
        return "\n".join([
            f"problem      shape {x(self.shape)}, kernel {x(self.kernel_size)}, stride "
            f"{x(self.stride)}, dilation {x(self.dilation)}, causal {causal}",
            f"tiles        query {x(self.q_tile)} ({self.n_q_tiles} tiles), key "
            f"{x(self.kv_tile)} ({self.n_kv_tiles} tiles)",
            f"FLOP bound   {self.flop_bound:.2f}x  (density {self.density:.4f})",
            f"tile bound   {self.tile_bound:.2f}x worst query tile ({self.visited_worst} key "
            f"tiles), {self.tile_bound_avg:.2f}x average ({self.visited_avg:.2f})",
            f"masks        {self.masked_total} of {self.visited_total} visited tile pairs "
            f"({100 * self.masked_fraction:.1f}%) need an element mask; worst query tile: "
            f"{self.masked_worst} of {self.visited_worst}",
        ])


def simulate(shape: Sequence[int], kernel_size: IntOrTuple, stride: IntOrTuple = 1,
             dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False, *,
             q_tile: IntOrTuple = 64, kv_tile: IntOrTuple = 64,
             layout: str = "grouped") -> SimResult:
    """Simulate one tiling of one GNA problem.

    Args:
      shape: spatial extents (1-3 axes).
      kernel_size, stride, dilation, is_causal: GNA parameters (int/bool or per axis),
        checked as the public op checks them.
      q_tile, kv_tile: tile shapes (int: the same extent on every axis).
      layout: how tiles cover dilated axes: ``"grouped"`` (each dilation group tiled on
        its own, as the kernels do) or ``"interleaved"`` (see :func:`axis_tiles`).

    Returns:
      A :class:`SimResult`; ``result.bound`` is the speed-of-light speedup over dense.

    Example::

      >>> round(simulate((30, 48, 80), (18, 24, 24), q_tile=(4, 8, 8),
      ...                kv_tile=(2, 8, 8)).bound, 2)
      3.27
    """
    axes = _axes(shape, kernel_size, stride, dilation, is_causal)
    rank = len(axes)
    qt = per_axis("q_tile", q_tile, rank)
    kt = per_axis("kv_tile", kv_tile, rank)
    per = tuple(axis_tiles(ax, qt[a], kt[a], layout) for a, ax in enumerate(axes))
    return _combine(axes, qt, kt, per)


def _combine(axes: Sequence[Axis], qt: tuple[int, ...], kt: tuple[int, ...],
             per: Sequence[AxisTiles]) -> SimResult:
    n_q = math.prod(p.n_q_tiles for p in per)
    n_k = math.prod(p.n_kv_tiles for p in per)
    visited_total = math.prod(int(p.visited.sum()) for p in per)
    full_total = math.prod(int(p.full.sum()) for p in per)
    visited_worst = math.prod(int(p.visited_per_q_tile.max()) for p in per)
    visited_avg = math.prod(float(p.visited_per_q_tile.mean()) for p in per)
    # Masked tiles of the worst query tile: per axis, among the rows with the most
    # visited tiles, the one with the fewest full tiles.
    worst_full = 1
    for p in per:
        v = p.visited_per_q_tile
        worst_full *= int(p.full_per_q_tile[v == v.max()].min())
    keys = math.prod(p.keys_per_query for p in per)
    total_keys = math.prod(ax.length for ax in axes)
    density = keys / total_keys
    return SimResult(
        shape=tuple(ax.length for ax in axes),
        kernel_size=tuple(ax.kernel_size for ax in axes),
        stride=tuple(ax.stride for ax in axes),
        dilation=tuple(ax.dilation for ax in axes),
        is_causal=tuple(ax.is_causal for ax in axes),
        q_tile=tuple(qt), kv_tile=tuple(kt),
        density=density, flop_bound=1.0 / density,
        n_q_tiles=n_q, n_kv_tiles=n_k,
        visited_worst=visited_worst, visited_avg=visited_avg, visited_total=visited_total,
        masked_total=visited_total - full_total, masked_worst=visited_worst - worst_full,
        tile_bound=total_keys / (visited_worst * math.prod(kt)),
        tile_bound_avg=total_keys / (visited_avg * math.prod(kt)),
        per_axis=tuple(per))


# --------------------------------------------------------------------------
# Waves: how a grid of one tile per CTA spreads over the SMs.
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Schedule:
    """The steps of every CTA of a grid with one tile per CTA, and when the SMs finish.

    A CTA's *steps* are the tiles it visits: key tiles per query tile (the forward and
    dQ, query-outer) or query tiles per key tile (dK/dV, key-outer). The model: one CTA
    per SM at a time, a CTA takes as long as its steps, and a CTA starts on the first
    SM to become free, in launch order (what the block scheduler does, minus fixed costs
    per CTA).

    Attributes:
      key_outer: whether the CTAs are key tiles.
      steps: ``[tiles]`` steps per tile of one head, in block order (row-major over the
        tile grid, the last axis fastest).
      ctas_per_tile: CTAs with the same tile (heads x batch; launched tile-fastest).
      sms: SMs the grid runs on.
      in_order: time (steps) until the last SM finishes, CTAs launched in block order.
      heaviest_first: the same with every head's tiles launched heaviest first (ties in
        block order).
      ideal: all steps spread evenly (and at least the heaviest CTA).
    """

    key_outer: bool
    steps: np.ndarray = dataclasses.field(repr=False, compare=False)
    ctas_per_tile: int
    sms: int
    in_order: float
    heaviest_first: float
    ideal: float

    @property
    def efficiency(self) -> float:
        """``ideal / in_order``: the share of the SMs' time the grid keeps busy."""
        return self.ideal / self.in_order

    def as_dict(self) -> dict:
        """JSON-friendly summary (no per-tile steps)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "steps"}
        out["efficiency"] = self.efficiency
        return out

    def summary(self) -> str:
        """One line."""
        st = self.steps
        what = "query tiles per key tile" if self.key_outer else "key tiles per query tile"
        return (f"{'key-outer' if self.key_outer else 'query-outer':12} {st.size} x "
                f"{self.ctas_per_tile} CTAs on {self.sms} SMs, {what} {int(st.min())}-"
                f"{int(st.max())} (mean {st.mean():.2f}): finish at {self.in_order:g} steps in "
                f"block order ({100 * self.efficiency:.1f}% busy), {self.heaviest_first:g} "
                f"heaviest first, {self.ideal:.1f} ideal")


def _finish(steps: np.ndarray, order: np.ndarray, ctas_per_tile: int, sms: int) -> float:
    free = [0.0] * min(sms, steps.size * ctas_per_tile)
    for _ in range(ctas_per_tile):
        for t in order:
            heapq.heappush(free, heapq.heappop(free) + float(steps[t]))
    return max(free)


def schedule(result: SimResult, *, key_outer: bool = False, ctas_per_tile: int = 1,
             sms: int = 132) -> Schedule:
    """The wave model of :class:`Schedule` for the tiling of ``result``.

    Args:
      result: a :func:`simulate` result (its tiles are the CTAs' tiles).
      key_outer: CTAs are key tiles visiting query tiles (a dK/dV kernel), else query tiles.
      ctas_per_tile: heads x batch (CTAs launched per tile).
      sms: streaming multiprocessors (132 on an H100 SXM or H200).

    Example (1-D, window 2048, stride 256: key tiles near the ends take 16 to 48 steps
    against 32, and in block order the heavy ones at the end start in the second wave)::

      >>> r = simulate((32768,), 2048, 256, q_tile=64, kv_tile=128)
      >>> s = schedule(r, key_outer=True)
      >>> s.in_order, s.heaviest_first
      (80.0, 64.0)
    """
    if ctas_per_tile < 1 or sms < 1:
        raise ValueError(f"ctas_per_tile and sms must be >= 1, got {ctas_per_tile}, {sms}.")
    per = [p.visited.sum(axis=0 if key_outer else 1).astype(np.int64) for p in result.per_axis]
    steps = functools.reduce(np.multiply.outer, per).reshape(-1)
    heavy = np.argsort(-steps, kind="stable")
    total = float(steps.sum()) * ctas_per_tile
    return Schedule(key_outer=key_outer, steps=steps, ctas_per_tile=ctas_per_tile, sms=sms,
                    in_order=_finish(steps, np.arange(steps.size), ctas_per_tile, sms),
                    heaviest_first=_finish(steps, heavy, ctas_per_tile, sms),
                    ideal=max(total / sms, float(steps.max())))


# --------------------------------------------------------------------------
# Tile-shape search.
# --------------------------------------------------------------------------

def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tile_shapes(size: int, shape: Sequence[int], *, max_overhang: int = 2) -> list[tuple[int, ...]]:
    """All ordered factorizations of ``size`` tokens into ``len(shape)`` per-axis extents.

    Extents larger than ``max_overhang`` times an axis length (mostly padding) are left out,
    unless that leaves nothing (a grid smaller than one tile).
    """
    if size < 1:
        raise ValueError(f"tile size must be >= 1, got {size}.")
    combos = [tuple(c) for c in itertools.product(_divisors(size), repeat=len(shape))
              if math.prod(c) == size]
    fit = [c for c in combos if all(t <= max_overhang * n for t, n in zip(c, shape))]
    return fit or combos  # a grid smaller than one tile: keep every factorization


def best_tiles(shape: Sequence[int], kernel_size: IntOrTuple, stride: IntOrTuple = 1,
               dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False, *,
               q_tile_size: int = 128, kv_tile_size: int = 128, top: int = 1,
               q_tiles: Iterable[Sequence[int]] | None = None,
               kv_tiles: Iterable[Sequence[int]] | None = None, layout: str = "grouped"
               ) -> Union[SimResult, list[SimResult]]:
    """Search the tile shapes of ``q_tile_size`` / ``kv_tile_size`` tokens for the best bound.

    Every factorization of the tile sizes over the axes is tried (or the given
    ``q_tiles`` / ``kv_tiles`` candidates). Ranked by ``tile_bound`` (worst query
    tile), then ``tile_bound_avg``, then fewer masked tiles. Per-axis counts are
    cached, so the search costs a few per-axis evaluations per candidate extent.

    Returns the best :class:`SimResult`, or the ``top`` best as a list when ``top > 1``.
    """
    axes = _axes(shape, kernel_size, stride, dilation, is_causal)
    rank = len(axes)
    # Grouped layout: tiles live in a dilation group, so fit them to the group lengths.
    lengths = [-(-ax.length // ax.dilation) if layout == "grouped" else ax.length
               for ax in axes]
    qs = ([per_axis("q_tiles", t, rank) for t in q_tiles] if q_tiles is not None
          else tile_shapes(q_tile_size, lengths))
    ks = ([per_axis("kv_tiles", t, rank) for t in kv_tiles] if kv_tiles is not None
          else tile_shapes(kv_tile_size, lengths))
    if not qs or not ks:
        raise ValueError(f"no tile shapes to search for shape {tuple(lengths)} "
                         f"(q_tile_size={q_tile_size}, kv_tile_size={kv_tile_size}).")
    results = []
    for qt in qs:
        for kt in ks:
            per = [axis_tiles(ax, qt[a], kt[a], layout) for a, ax in enumerate(axes)]
            results.append(_combine(axes, tuple(qt), tuple(kt), per))
    results.sort(key=lambda r: (-r.tile_bound, -r.tile_bound_avg, r.masked_total,
                                r.q_tile, r.kv_tile))
    return results[0] if top <= 1 else results[:top]
