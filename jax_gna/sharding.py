"""Multi-device neighborhood attention: batch/head partitioning and spatial context
parallelism with a halo exchange.

Two ways in:

* **Transparent** (``jax.jit`` with sharded inputs). :func:`jax_gna.neighborhood_attention`
  routes the backend call through :func:`attention`, a ``custom_partitioning`` op with a
  Shardy ``sharding_rule`` (and a ``custom_vjp`` whose backward is a second
  ``custom_partitioning`` op). At SPMD-partitioning time, when the shardings are known,
  the partition callback reads the sharding of ``query`` and builds a per-shard program:

  - batch and heads: each device runs the backend on its own block; nothing is
    communicated (key/value heads are sharded like the query heads, so grouped-query
    attention stays local);
  - spatial axes: each device receives from its two neighbours along every sharded
    axis exactly the rows of keys/values its windows reach (``lax.ppermute``; axes one
    after the other, so corner blocks travel too), then runs the backend on its query
    block over the halo-extended key block *in global coordinates*
    (``Problem.q_origin``/``kv_origin``), so every border window shifts exactly as in the
    unsharded operator. The backward pass sends the key/value gradients of the halo
    rows back to their owners (the transpose of the same exchange).

  With meshes of ``Explicit`` axis types (``jax.set_mesh``), the layout is already in
  the inputs' types while tracing, and the same per-shard program runs under
  ``shard_map`` instead.

  The op is only inserted when JAX sees more than one device, outside ``vmap`` (JAX has
  no batching rule for ``custom_partitioning``), and while :func:`set_auto_partitioning`
  has not turned it off (read at trace time); otherwise the backend is called directly.
  The backward recomputes nothing where the backend exposes its backward pass (``xla``
  and ``cuda`` do, see :func:`_backward_of`), but exchanges the key/value halo again
  rather than keeping it from the forward.

  What is communicated, per device and sharded axis: the forward receives
  ``(left + right) x (local cross-section) x H_kv x (D + D_v)`` elements (keys and
  values travel together, one ``ppermute`` per direction, one for both on an axis of
  two shards); the backward receives the same again plus the halo's key/value
  gradients (:func:`halo_sizes` gives the rows). An all-gather would receive
  ``(n - 1) S`` rows instead of ``left + right``. Besides the exchange and a halo-sized
  copy (keys and values joined for the collective), a shard copies key and value
  blocks (on 32-bit words): the backward its halo-extended blocks (:func:`_assemble`),
  the ``cuda`` forward on the ``jax.jit`` path only the parts of the halo block its
  border rows reach, one per border call (:func:`_split_blocks`), since it computes the
  rows whose windows stay in the shard first, over the shard's own keys, while the halo
  travels (:func:`_split_calls`). On two H200s that split forward took 0.340 ms per 1-D
  forward of 16384 owned rows (8 heads, head dim 128, window 2048) against 0.384 ms for
  ae9cacf's one call over the whole blocks after two collectives
  (``benchmarks/results/multi-gpu-h200x2.md``).

* **Explicit** (``shard_map``): :func:`neighborhood_attention_local` is called *inside*
  ``shard_map`` on the local blocks, naming the mesh axis of each sharded spatial axis;
  :func:`neighborhood_attention_sharded` wraps that in ``shard_map`` for a given mesh.
  Both are differentiable by plain JAX autodiff (the transpose of ``ppermute`` is the
  reverse ``ppermute``).

Halo. On one axis of length ``L`` cut into ``n`` shards of ``S = L / n`` rows, shard ``r``
holds the queries ``[r S, (r+1) S)``; their windows (:func:`jax_gna.mask.window_extent`)
reach keys ``[lo_r, hi_r]``. The halo is ``left = max_r (r S - lo_r)`` and
``right = max_r (hi_r - (r+1) S + 1)`` (clamped at 0): exact for stride, dilation and
causal masks (causal: ``right == 0``; blocked attention with ``S`` a multiple of the
block: no halo, no communication), the same static amount on every shard. A halo wider
than a shard is gathered from the next shards too (one ``ppermute`` per hop, sending only
the rows that are needed); an all-gather of the sequence is never inserted. Spatial
lengths must split evenly over their mesh axes (``ValueError`` otherwise).

Dilation. A dilated problem whose shards hold whole dilation groups (a multiple of
``d`` rows of every dilated axis on each shard, and of the axis's length) runs as one
undilated problem: each shard stacks its groups in the batch
(:func:`jax_gna.dilation.fold_groups`, a local copy, no communication), which makes its
blocks a shard of the folded grid of ``L / d`` positions per group; the halo exchange,
the kernels and the backward then work on that grid, and the outputs are unfolded the
same way. The backend decides per pass (``impl.fold_shards``, :func:`_fold_for`): the
``xla`` backend always, the ``cuda`` backend where the Hopper kernels take the folded
shards (``jax_gna.cuda.fold_dilation``'s rules). Other dilated shards keep the dilated
problem (the sm80 kernels).

A spatial axis may be split over several mesh axes, in any order: with
``P(None, ("y", "x"))`` on a mesh of axes ``("x", "y")`` the data is laid out ``y``-major,
while ``lax.ppermute`` numbers the devices ``x``-major. Shards are numbered in the
data's order and every exchange's source/target pairs are mapped to the mesh's numbering
(:func:`shard_numbering`), so neighbours are neighbours in the data.

One SPMD program serves every shard, but a :class:`~jax_gna.params.Problem` is static.
Every shard's key block has the same shape (``S + left + right`` rows per sharded axis;
the first shards' blocks start at the grid's first row, so the block may hold zero rows
past the halo or past the grid's end, outside every window). Shards whose query
windows have the same placement relative to their key block (all interior shards, when
the shard size is a multiple of the stride period) share one problem; the few distinct
ones (usually: first, interior, last) differ only in their origins. On the ``jax.jit``
path the ``cuda`` backend runs them all in the same kernel calls: the partitioner hands
the program the concrete mesh it is compiled for, and where all its devices belong to
this process each call carries a table (device ordinal -> origins, and in the forward's
split calls the query rows) from which each device's FFI handler picks its own problem
on the host (``impl.by_device``, ``impl.by_device_split``, :func:`_device_classes`).
Otherwise (``shard_map``: :func:`neighborhood_attention_local`,
:func:`neighborhood_attention_sharded`, meshes of ``Explicit`` axes; other backends)
``lax.switch`` on the shard index picks the problem; on a GPU XLA runs that switch with
a device-to-host copy of the index and a wait for it. (A ``shard_map`` program may be
exported and run on the devices of another mesh of the same shape; a table of device
ordinals would then silently pick wrong problems, so only the partitioner's mesh is
trusted.)

Additional tokens. A call with them is one partitioned op over the call and its tokens
(:func:`attention_with_tokens`; one ``shard_map`` with ``Explicit`` mesh axes): the
tokens are split along batch and heads like the queries and whole along their own axis.
Where no spatial axis is split, each shard runs the backend's call with its tokens
(``impl.with_tokens``: on the ``cuda`` backend the tokens as extra key tiles of the
Hopper forward); where one is, each shard runs its neighborhood part (halo exchange)
and its queries over all the tokens, merged by log-sum-exp. The ``jax.jit`` path's
backward runs both parts from the merged out / lse (``impl.backward``,
``impl.tokens_backward``) and sums the tokens' gradients over the spatial mesh axes.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
from typing import Any, Callable, Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from . import dilation, mask, xla
from .params import BoolOrTuple, IntOrTuple, Problem

__all__ = ["neighborhood_attention_local", "neighborhood_attention_sharded", "halo_sizes",
           "set_auto_partitioning", "attention", "dense_attention", "platform_backward",
           "platform_by_device",
           "plan_axis", "AxisPlan", "shard_numbering"]

log = logging.getLogger("jax_gna")

AxisName = Union[str, Sequence[str]]
Impl = Callable[[jax.Array, jax.Array, jax.Array, Problem], tuple[jax.Array, jax.Array]]
# backward(query, key, value, out, lse, d_out, d_lse, problem) -> (d_query, d_key, d_value)
Backward = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]
# (query, key, value, scale) -> (out, lse): every query over all additional tokens
Dense = Callable[[jax.Array, jax.Array, jax.Array, float], tuple[jax.Array, jax.Array]]

_AUTO_PARTITIONING = True


def set_auto_partitioning(enabled: bool) -> bool:
    """Turn the transparent partitioned op on or off (default on); returns the old value.

    Off, :func:`jax_gna.neighborhood_attention` calls the backend directly and leaves
    sharded inputs to XLA's generic partitioner (which may gather the sequence)."""
    global _AUTO_PARTITIONING
    old, _AUTO_PARTITIONING = _AUTO_PARTITIONING, bool(enabled)
    return old


def auto_partitioning() -> bool:
    """Whether :func:`attention` partitions the op itself (see :func:`set_auto_partitioning`)."""
    return _AUTO_PARTITIONING


# --------------------------------------------------------------------------
# Static plan of one sharded spatial axis.
# --------------------------------------------------------------------------

def _axis_names(name: AxisName | None) -> tuple[str, ...]:
    if name is None:
        return ()
    if isinstance(name, str):
        return (name,)
    return tuple(name)


def _collective_name(names: tuple[str, ...]) -> Any:
    return names[0] if len(names) == 1 else names


def shard_numbering(mesh_axes: AxisName, mesh_shape: Mapping[str, int]
                    ) -> tuple[Callable[[], jax.Array],
                               Callable[[Sequence[tuple[int, int]]], list[tuple[int, int]]]]:
    """How the shards of an array axis split over the mesh axes ``mesh_axes`` are numbered.

    The data is laid out in the order the names are given (as in a ``PartitionSpec``
    entry ``("y", "x")``: the first name is the major one), while ``lax.ppermute`` numbers
    the devices of a tuple of mesh axes in the mesh's order (``mesh_shape``: the mesh's
    axis sizes, in the mesh's order). Returns ``(index, pairs)``:

    * ``index()``: this shard's position along the axis, ``0 .. n-1`` in layout order
      (traced; call it inside ``shard_map`` or a partition callback);
    * ``pairs(moves)``: the ``lax.ppermute`` source/target pairs of ``moves``, a sequence
      of ``(source position, target position)`` in layout order.

    With the names in the mesh's order both numberings agree and ``pairs`` is the
    identity."""
    names = _axis_names(mesh_axes)
    sizes = tuple(int(mesh_shape[n]) for n in names)
    order = [n for n in mesh_shape if n in names]  # ppermute's numbering: major to minor

    def index() -> jax.Array:
        i = jnp.int32(0)
        for n, size in zip(names, sizes):
            i = i * size + jax.lax.axis_index(n)
        return i

    def device(position: int) -> int:
        coord = dict(zip(names, np.unravel_index(position, sizes)))
        return int(np.ravel_multi_index([coord[n] for n in order],
                                        [int(mesh_shape[n]) for n in order]))

    def pairs(moves: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        return [(device(src), device(dst)) for src, dst in moves]

    return index, pairs


@dataclasses.dataclass(frozen=True)
class AxisPlan:
    """How one spatial axis is split and which halo each shard exchanges.

    Attributes:
      axis: spatial axis (0-based among the spatial axes).
      mesh_axes: the mesh axis name(s) the axis is sharded over, in the order the data is
        laid out (major to minor; any order, not necessarily the mesh's).
      shards: number of shards ``n``; ``size``: rows per shard ``S = L / n``.
      left, right: halo rows received from the left / right neighbour.
      shard_class: for each shard, the index of its class (shards of one class share
        a static problem).
      q_origin, kv_origin: per class, the global first query and the global first key of
        its key block (``block`` rows from the first row of the grid its halo block
        holds; the same size on every shard).
      shift: per class, where its key block starts in the halo block
        ``[r S - left, (r+1) S + right)``: the rows of the halo block before the grid
        (0 but for the first shards). A shard at the start of the grid moves its block
        inward by them; the rows the block then holds beyond its halo block, and rows
        past the grid's end, are zeros and lie outside every window (masked where a
        kernel loads them in a key tile).
      mesh_shape: ``(name, size)`` of the mesh axes in ``mesh_axes``, in the mesh's order
        (how ``lax.ppermute`` numbers the shards; see :func:`shard_numbering`).
      interior: per class, the rows ``[a, b)`` of the shard (relative to its first row)
        whose windows lie inside the shard's own rows: they need no halo
        (:func:`_split_calls`). Rounded inward to multiples of 8 (tile edges); ``a == b``
        when no row qualifies.
    """

    axis: int
    mesh_axes: tuple[str, ...]
    shards: int
    size: int
    left: int
    right: int
    shard_class: tuple[int, ...]
    q_origin: tuple[int, ...]
    kv_origin: tuple[int, ...]
    mesh_shape: tuple[tuple[str, int], ...] = ()
    interior: tuple[tuple[int, int], ...] = ()

    @property
    def numbering(self):
        """:func:`shard_numbering` of this axis: ``(index, pairs)``."""
        return shard_numbering(self.mesh_axes, dict(self.mesh_shape))

    @property
    def classes(self) -> int:
        return len(self.q_origin)

    @property
    def shift(self) -> tuple[int, ...]:
        """Per class, the row of the halo block where its key block starts."""
        return tuple(k - (q - self.left) for q, k in zip(self.q_origin, self.kv_origin))

    @property
    def block(self) -> int:
        """Rows of the halo block (what a shard receives and holds) and of the key block
        (:func:`_assemble`), ``S + left + right``."""
        return self.size + self.left + self.right


def halo(problem: Problem, axis: int, shards: int) -> tuple[int, int]:
    """``(left, right)``: the rows of keys each of ``shards`` equal shards of ``axis`` needs
    from its left / right neighbour (max over shards; exact window math)."""
    length = problem.shape[axis]
    size = length // shards
    ax = problem.axis(axis)
    left = right = 0
    for r in range(shards):
        first, last = mask.window_extent(np.arange(r * size, (r + 1) * size), ax)
        left = max(left, r * size - int(first.min()))
        right = max(right, int(last.max()) - ((r + 1) * size - 1))
    return left, right


def plan_axis(problem: Problem, axis: int, mesh_axes: AxisName, shards: int,
              mesh_shape: Mapping[str, int] | None = None) -> AxisPlan:
    """Plan the halo exchange of ``axis`` split into ``shards`` equal blocks over
    ``mesh_axes`` (major to minor, in any order). ``mesh_shape`` (the mesh's axis sizes,
    in the mesh's order, e.g. ``dict(mesh.shape)``) is needed when ``mesh_axes`` names
    several mesh axes. Raises ``ValueError`` if the axis does not split evenly."""
    names = _axis_names(mesh_axes)
    length = problem.shape[axis]
    if shards < 1 or length % shards:
        raise ValueError(
            f"spatial axis {axis} of length {length} cannot be split into {shards} equal "
            f"shards over mesh axis {names}: the length must be a multiple of the number of "
            f"shards (spatial shape {problem.shape}).")
    if len(names) == 1:
        order = ((names[0], shards),)
    else:
        if mesh_shape is None or any(n not in mesh_shape for n in names):
            raise ValueError(
                f"spatial axis {axis} is sharded over mesh axes {names}: planning it needs "
                f"the mesh's axis sizes in the mesh's order (mesh_shape; inside shard_map, "
                f"the abstract mesh), got {mesh_shape!r}.")
        order = tuple((n, int(mesh_shape[n])) for n in mesh_shape if n in names)
        if math.prod(n for _, n in order) != shards:
            raise ValueError(f"mesh axes {dict(order)} make {math.prod(n for _, n in order)} "
                             f"shards, not {shards}.")
    size = length // shards
    left, right = halo(problem, axis, shards)
    block = size + left + right
    ax = problem.axis(axis)
    signatures: dict[Any, int] = {}
    shard_class, q_origin, kv_origin, interior = [], [], [], []
    for r in range(shards):
        k0 = r * size - left
        lo, hi = max(0, k0), min(length, k0 + block)
        first, last = mask.window_extent(np.arange(r * size, (r + 1) * size), ax)
        # Local neighbor structure: every query's window relative to the halo block (this
        # also fixes the dilation phase: first = lo_g * d + i % d) and the grid's border.
        sig = (lo - k0, hi - lo, (first - k0).tobytes(), (last - k0).tobytes())
        if sig not in signatures:
            signatures[sig] = len(q_origin)
            q_origin.append(r * size)
            kv_origin.append(lo)  # [lo, lo + block) holds [lo, hi)
            interior.append(_interior(first - r * size, last - r * size, size))
        shard_class.append(signatures[sig])
    return AxisPlan(axis, names, shards, size, left, right, tuple(shard_class),
                    tuple(q_origin), tuple(kv_origin), order, tuple(interior))


def _interior(first: np.ndarray, last: np.ndarray, size: int, align: int = 8
              ) -> tuple[int, int]:
    """The rows ``[a, b)`` of a shard whose windows ``[first, last]`` (relative to the
    shard's first row) lie inside ``[0, size)``: after the last row reaching left of the
    shard and before the first reaching right of it, rounded inward to multiples of
    ``align`` (the rows next to the halo go with the halo's call; a rounded edge keeps
    the calls' tiles whole). ``a == b`` when no row qualifies."""
    out_left, out_right = np.nonzero(first < 0)[0], np.nonzero(last >= size)[0]
    a = int(out_left.max()) + 1 if out_left.size else 0
    b = int(out_right.min()) if out_right.size else size
    if 0 < a:
        a = min(size, -(-a // align) * align)
    if b < size:
        b = b // align * align
    return (a, b) if a < b else (a, a)


@dataclasses.dataclass(frozen=True)
class SplitCall:
    """One backend call of a split sharded forward (:func:`_split_calls`); ``[c]`` indexes
    class combinations (row-major over the plans, as :func:`_class_problems`).

    Attributes:
      ranges: ``[c][axis]`` the query rows ``(lo, hi)`` of the shard it computes.
      kv_origin: ``[c][axis]`` the global first row of its key block.
      kv_extent: ``[axis]`` its key block's rows (one shape on every shard).
      start: ``[c][plan]`` where its key block starts in the halo block; empty for a call
        over the shard's own keys (which need no exchange).
    """

    ranges: tuple[tuple[tuple[int, int], ...], ...]
    kv_origin: tuple[tuple[int, ...], ...]
    kv_extent: tuple[int, ...]
    start: tuple[tuple[int, ...], ...] = ()

    @property
    def own(self) -> bool:
        return not self.start


# The interior rows run in this many calls. XLA runs the first under the exchange and the
# others after it, before the border calls; two measured faster than one on two H200s
# (session 23, bf16 forwards: 2-D 4.71 against 4.81 ms, 3-D 12.71 against 12.87 ms, 1-D
# 0.340 against 0.355 ms; why was not isolated).
_INTERIOR_CALLS = 2


def _split_calls(problem: Problem, plans: Sequence[AxisPlan]) -> tuple[SplitCall, ...] | None:
    """A sharded forward as calls over disjoint boxes of each shard's query rows, so that
    most of the work runs while the halo travels. The first calls take the interior rows
    of every sharded axis (:attr:`AxisPlan.interior`, cut in :data:`_INTERIOR_CALLS`
    parts along the first sharded axis), whose windows lie inside the shard's own keys;
    the others take what is left, one box per sharded axis and side (rows before / after
    the interior on that axis, the interior on the axes before it, every row on the axes
    after it; both sides in one call where no shard has both), each over the part of
    the halo block its windows reach. Calls empty on every shard are left out. None when
    no shard has an interior row."""
    combos = list(itertools.product(*[range(p.classes) for p in plans]))
    problems = _class_problems(problem, plans)
    full = [(0, n) for n in problems[0].q_extent]

    def boxes(j: int, side: int | None):
        out = []
        for combo in combos:
            box = list(full)
            for i, (p, c) in enumerate(zip(plans, combo)):
                a, b = p.interior[c]
                box[p.axis] = ((a, b) if side is None or i < j else (0, p.size) if i > j
                               else (0, a) if side == 0 else (b, p.size))
            out.append(tuple(box))
        return tuple(out)

    def rows(box) -> bool:
        return all(lo < hi for lo, hi in box)

    def used(ranges) -> bool:
        return any(rows(box) for box in ranges)

    interior = boxes(0, None)
    if not used(interior):
        return None
    axis, parts = plans[0].axis, []
    for k in range(_INTERIOR_CALLS):
        part = []
        for box in interior:
            lo, hi = box[axis]
            cut = [lo + (hi - lo) * i // _INTERIOR_CALLS // 8 * 8
                   for i in range(_INTERIOR_CALLS)] + [hi]
            part.append(box[:axis] + ((cut[k], cut[k + 1]),) + box[axis + 1:])
        parts.append(tuple(part))
    border = []
    for j in range(len(plans)):
        left, right = boxes(j, 0), boxes(j, 1)
        if any(rows(a) and rows(b) for a, b in zip(left, right)):
            border += [left, right]
        else:
            border.append(tuple(b if rows(b) else a for a, b in zip(left, right)))
    calls = [SplitCall(r, tuple(p.q_origin for p in problems), problems[0].q_extent)
             for r in parts if used(r)]
    return tuple(calls + [_border_call(problem, plans, combos, problems, r)
                          for r in border if used(r)])


def _border_call(problem: Problem, plans: Sequence[AxisPlan], combos, problems,
                 ranges) -> SplitCall:
    """The :class:`SplitCall` for query boxes ``ranges`` over slices of the halo blocks:
    per class the keys its rows' windows reach, at one size (the largest) on every
    shard (rows past a class's reach are masked, past the halo block zeros)."""
    origins, starts = [], []
    spans: dict[int, int] = {p.axis: 1 for p in plans}
    for ci, combo in enumerate(combos):
        box, origin, start = ranges[ci], list(problems[ci].kv_origin), []
        for p, c in zip(plans, combo):
            lo, hi = box[p.axis]
            if all(a < b for a, b in box):
                first, last = mask.window_extent(p.q_origin[c] + np.arange(lo, hi),
                                                 problem.axis(p.axis))
                k0, k1 = int(first.min()), int(last.max()) + 1
            else:  # nothing to compute on these shards: any block inside the grid
                k0, k1 = p.kv_origin[c], p.kv_origin[c] + 1
            origin[p.axis] = k0
            start.append(k0 - (p.q_origin[c] - p.left))
            spans[p.axis] = max(spans[p.axis], k1 - k0)
        origins.append(tuple(origin))
        starts.append(tuple(start))
    extent = list(problems[0].kv_extent)
    for a, n in spans.items():
        extent[a] = n
    return SplitCall(ranges, tuple(origins), tuple(extent), tuple(starts))


def _class_problems(problem: Problem, plans: Sequence[AxisPlan]) -> list[Problem]:
    """Per combination of classes (row-major over ``plans``): the static problem of the
    local query block over the key block :func:`_assemble` builds."""
    out = []
    for combo in itertools.product(*[range(p.classes) for p in plans]):
        q_origin, q_extent = list(problem.q_origin), list(problem.q_extent)
        kv_origin, kv_extent = list(problem.kv_origin), list(problem.kv_extent)
        for p, c in zip(plans, combo):
            q_origin[p.axis], q_extent[p.axis] = p.q_origin[c], p.size
            kv_origin[p.axis], kv_extent[p.axis] = p.kv_origin[c], p.block
        out.append(problem.replace(q_origin=tuple(q_origin), q_extent=tuple(q_extent),
                                   kv_origin=tuple(kv_origin), kv_extent=tuple(kv_extent)))
    return out


def _device_classes(plans: Sequence[AxisPlan], mesh: Any) -> tuple[tuple[int, int], ...] | None:
    """``(device ordinal, class combination)`` for every device of ``mesh`` (the index
    :func:`_branch_index` computes on that device), for backends that pick each device's
    problem on the host (``impl.by_device``). None when ``mesh`` is not a concrete mesh
    whose devices all belong to this process with distinct ordinals, or when JAX may
    load the compiled program for other devices: with
    ``jax_remove_custom_partitioning_ptr_from_cache_key`` set, the persistent cache,
    whose key leaves out the device assignment on GPUs, could hand this program to the
    same mesh shape over devices in another order, and a table of ordinals would then
    pick wrong problems without an error (``lax.switch`` reads the partition instead)."""
    devices = getattr(mesh, "devices", None) if isinstance(mesh, jax.sharding.Mesh) else None
    if not isinstance(devices, np.ndarray) or not devices.size:
        return None
    if getattr(jax.config, "jax_remove_custom_partitioning_ptr_from_cache_key", False):
        return None
    try:
        me = jax.process_index()
        ordinals = [d.local_hardware_id for d in devices.flat]
        if any(d.process_index != me for d in devices.flat):
            return None
    except Exception:  # noqa: BLE001 - a device type without these attributes
        return None
    if any(o is None for o in ordinals) or len(set(ordinals)) != len(ordinals):
        return None
    sizes = dict(mesh.shape)
    table = []
    for idx, ordinal in zip(np.ndindex(devices.shape), ordinals):
        coord = dict(zip(mesh.axis_names, idx))
        combo = 0
        for p in plans:
            r = 0
            for n in p.mesh_axes:  # layout order, as shard_numbering's index()
                r = r * sizes[n] + coord[n]
            combo = combo * p.classes + p.shard_class[r]
        table.append((int(ordinal), combo))
    return tuple(table)


# --------------------------------------------------------------------------
# The per-shard program (runs inside shard_map or a custom_partitioning lower_fn).
# --------------------------------------------------------------------------

def _hops(rows: int, plan: AxisPlan) -> list[int]:
    """Rows taken from each neighbour 1, 2, ... shards away for a halo of ``rows``."""
    n = -(-rows // plan.size)
    return [plan.size if j < n else rows - (n - 1) * plan.size for j in range(1, n + 1)]


def _exchange(xs: tuple[jax.Array, ...], plans: Sequence[AxisPlan]) -> tuple[jax.Array, ...]:
    """The local blocks ``xs`` (each ``[B, *spatial, ...]``) extended by their halo to the
    halo blocks ``[r S - left, (r+1) S + right)`` along every sharded axis, one axis after
    the other so the corners of 2-D/3-D windows arrive too (:func:`_join`; keys and values
    travel together, one ``ppermute`` per direction and hop; on an axis of two shards one
    ``ppermute`` carries both directions). A halo wider than a shard
    comes from several shards (one ``ppermute`` per hop, each sending only rows that are
    needed). Rows outside the global grid arrive as zeros; they lie outside every
    window (the kernels may load them in a key tile, masked).
    Neighbours are neighbours in the data's layout order (:func:`shard_numbering`),
    whatever the order of the mesh axes."""
    widths = np.cumsum([0] + [x.shape[-1] for x in xs])
    for p in plans:
        dim = 1 + p.axis
        name = _collective_name(p.mesh_axes)
        index_of_shard, pairs = p.numbering

        def edge(first: int, rows: int) -> jax.Array:
            # The arrays' rows [first, first + rows), concatenated along the last dim (they
            # travel in one collective: a halo-sized copy).
            e = [jax.lax.slice_in_dim(x, first, first + rows, axis=dim) for x in xs]
            return jnp.concatenate(e, axis=-1) if len(xs) > 1 else e[0]

        def split(got: jax.Array) -> tuple[jax.Array, ...]:
            # back into the arrays (slices that fuse into the block copy of _assemble)
            return tuple(got[..., a:b] for a, b in zip(widths[:-1], widths[1:]))

        def send(first: int, rows: int, moves: list[tuple[int, int]]) -> tuple[jax.Array, ...]:
            return split(jax.lax.ppermute(edge(first, rows), name, pairs(moves)))

        if p.shards == 2 and p.left and p.right:
            # Two shards: each sends to one neighbour only, so both directions fit in one
            # collective (XLA ran two, one per direction, one after the other). Shard 0
            # sends its last `left` rows, shard 1 its first `right` rows.
            first = index_of_shard() == 0
            rows = max(p.left, p.right)

            def padded(e: jax.Array) -> jax.Array:
                pad = [(0, 0, 0)] * e.ndim
                pad[dim] = (0, rows - e.shape[dim], 0)
                return jax.lax.pad(e, jnp.zeros((), e.dtype), pad)

            got = jax.lax.ppermute(
                jnp.where(first, padded(edge(p.size - p.left, p.left)), padded(edge(0, p.right))),
                name, pairs([(0, 1), (1, 0)]))
            zero = jnp.zeros((), got.dtype)
            from_left = jnp.where(first, zero, jax.lax.slice_in_dim(got, 0, p.left, axis=dim))
            from_right = jnp.where(first, jax.lax.slice_in_dim(got, 0, p.right, axis=dim), zero)
            xs = tuple(_join(a, dim) for a in zip(split(from_left), xs, split(from_right)))
            continue

        left, right = _hops(p.left, p), _hops(p.right, p)
        parts = [send(p.size - left[j - 1], left[j - 1], [(r, r + j) for r in range(p.shards - j)])
                 for j in range(len(left), 0, -1)]  # farthest left neighbour first
        parts.append(xs)
        parts += [send(0, right[j - 1], [(r + j, r) for r in range(p.shards - j)])
                  for j in range(1, len(right) + 1)]
        xs = tuple(_join(a, dim) for a in zip(*parts))  # the next axis sends corners too
    return xs


def _join(chunks: Sequence[jax.Array], dim: int) -> jax.Array:
    """``jnp.concatenate(chunks, axis=dim)``, written as a select between the zero-padded
    chunks: one elementwise loop over the result. (XLA's GPU concatenate kernel
    vectorizes only by a factor that divides every chunk's length along ``dim``; a halo
    of 1023 rows made it copy a 1-D key block 3.7x slower than a halo of 1024 did.)"""
    if len(chunks) == 1:
        return chunks[0]
    total = sum(c.shape[dim] for c in chunks)
    out, row, start = None, None, 0
    for c in chunks:
        pad = [(0, 0, 0)] * c.ndim
        pad[dim] = (start, total - start - c.shape[dim], 0)
        padded = jax.lax.pad(c, jnp.zeros((), c.dtype), pad)
        if out is None:
            out, row = padded, jax.lax.broadcasted_iota(jnp.int32, padded.shape, dim)
        else:
            out = jnp.where(row < start, out, padded)
        start += c.shape[dim]
    return out


def _assemble(blocks: Sequence[jax.Array], plans: Sequence[AxisPlan]) -> tuple[jax.Array, ...]:
    """This shard's key blocks from :func:`_exchange`'s halo blocks: along every sharded
    axis the halo block from its row ``shift`` on (the first shards skip the rows before
    the grid), zeros after its end (a zero pad and a slice at a traced offset, which fuse
    with the last :func:`_join` into one copy per array). Every shard's blocks have the
    same shape, so one backend call can serve them all."""
    if not any(p.shift for p in plans):
        return tuple(blocks)
    starts = []
    for p in plans:
        index_of_shard, _ = p.numbering
        table = jnp.asarray([p.shift[c] for c in p.shard_class], jnp.int32)
        starts.append(table[index_of_shard()] if any(p.shift) else 0)
    return _slice_halo(blocks, plans, starts, [max(p.shift) for p in plans],
                       [p.block for p in plans])


def _slice_halo(blocks: Sequence[jax.Array], plans: Sequence[AxisPlan], starts: Sequence[Any],
                last_start: Sequence[int], rows: Sequence[int]) -> tuple[jax.Array, ...]:
    """Along every sharded axis ``plans[j]``, ``rows[j]`` rows of the halo blocks from row
    ``starts[j]`` (traced, at most ``last_start[j]``) on, zeros past their end: a zero pad
    and a slice at a traced offset, which fuse with the last :func:`_join` into one copy
    per array."""
    ndim = blocks[0].ndim
    pad, at, shape = [(0, 0, 0)] * ndim, [jnp.int32(0)] * ndim, list(blocks[0].shape)
    for p, start, last, n in zip(plans, starts, last_start, rows):
        pad[1 + p.axis] = (0, max(last + n - p.block, 0), 0)
        at[1 + p.axis] = jnp.asarray(start, jnp.int32)
        shape[1 + p.axis] = n
    return tuple(jax.lax.dynamic_slice(jax.lax.pad(x, jnp.zeros((), x.dtype), pad), at,
                                       shape[:-1] + [x.shape[-1]]) for x in blocks)


def _to_words(x: jax.Array) -> jax.Array:
    """``x`` as 32-bit words along its last dim where its elements are narrower and the
    dim's bytes split into words (a free bitcast): the exchange and the block copies then
    move 4-byte elements (XLA's copy at a traced offset does not vectorize, so each
    element costs one load)."""
    ratio = 4 // x.dtype.itemsize
    if ratio <= 1 or x.shape[-1] % ratio:
        return x
    return jax.lax.bitcast_convert_type(x.reshape(*x.shape[:-1], x.shape[-1] // ratio, ratio),
                                        jnp.uint32)


def _from_words(w: jax.Array, like: jax.Array) -> jax.Array:
    if w.dtype == like.dtype:
        return w
    x = jax.lax.bitcast_convert_type(w, like.dtype)
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _blocks(key: jax.Array, value: jax.Array, plans: tuple[AxisPlan, ...]
            ) -> tuple[jax.Array, jax.Array]:
    """This shard's key and value blocks: :func:`_exchange`, then :func:`_assemble`, on
    32-bit words (:func:`_to_words`). Its transpose (the halo's gradients back to their
    owners, summed in the input dtype) is the float one's."""
    words = _to_words(key), _to_words(value)
    if words[0].dtype != words[1].dtype:  # they travel together (one array): as they are
        return _assemble(_exchange((key, value), plans), plans)
    k, v = _assemble(_exchange(words, plans), plans)
    return _from_words(k, key), _from_words(v, value)


def _blocks_fwd(key, value, plans):
    return _blocks(key, value, plans), (key, value)


def _blocks_bwd(plans, inputs, cotangents):
    # The float exchange's pullback (its forward is dead code: XLA drops it).
    _, pullback = jax.vjp(lambda k, v: _assemble(_exchange((k, v), plans), plans), *inputs)
    return pullback(tuple(cotangents))


_blocks.defvjp(_blocks_fwd, _blocks_bwd)


def _split_blocks(key: jax.Array, value: jax.Array, plans: Sequence[AxisPlan],
                  calls: Sequence[SplitCall]) -> list[tuple[jax.Array, jax.Array]]:
    """The key and value blocks of a split forward's calls (:func:`_split_calls`): the
    shard's own for the own-key calls, for the others a slice (at a per-shard offset) of
    the halo blocks of one exchange, on 32-bit words as :func:`_blocks`. Forward only."""
    words = _to_words(key), _to_words(value)
    if words[0].dtype != words[1].dtype:
        words = key, value
    halo, index, out = None, _branch_index(plans), []
    for call in calls:
        if call.own:
            out.append((key, value))
            continue
        if halo is None:
            halo = _exchange(words, plans)
        row = jnp.asarray(call.start, jnp.int32)[jnp.int32(0) if index is None else index]
        k, v = _slice_halo(halo, plans, [row[j] for j in range(len(plans))],
                           [max(s[j] for s in call.start) for j in range(len(plans))],
                           [call.kv_extent[p.axis] for p in plans])
        out.append((_from_words(k, key), _from_words(v, value)))
    return out


def _branch_index(plans: Sequence[AxisPlan]) -> jax.Array | None:
    if all(p.classes == 1 for p in plans):
        return None
    index = jnp.int32(0)
    for p in plans:
        index_of_shard, _ = p.numbering
        r = index_of_shard()
        index = index * p.classes + jnp.asarray(p.shard_class, jnp.int32)[r]
    return index


def _switch(index, branches, *operands):
    if index is None:
        return branches[0](*operands)
    return jax.lax.switch(index, branches, *operands)


def _fold(problem: Problem, plans: Sequence[AxisPlan], query_shape: Sequence[int]
          ) -> tuple[Problem, tuple[AxisPlan, ...]] | None:
    """``(folded problem, its plans)`` where a spatially sharded dilated problem can run
    as one undilated one with its dilation groups stacked in the batch
    (:func:`jax_gna.dilation.fold_groups` on each shard's blocks, no communication): every
    dilated axis's block on a shard, and its global length, must hold whole groups
    (a multiple of ``d`` rows). A group's rows on a shard are then a contiguous block of
    the group's positions (shard ``r`` of ``S`` rows holds positions ``[r S / d, (r+1) S /
    d)``), so the folded axis of length ``L / d`` is split as evenly over the same shards,
    and its halo is the undilated window's. None otherwise."""
    if not plans or not dilation.applies(problem, query_shape):
        return None
    local = list(problem.shape)
    for p in plans:
        local[p.axis] = p.size
    if any(n % d or length % d for n, length, d in zip(local, problem.shape, problem.dilation)):
        return None
    ((_, folded),) = dilation.pieces(problem)  # whole groups: one piece
    return folded, tuple(plan_axis(folded, p.axis, p.mesh_axes, p.shards, dict(p.mesh_shape))
                         for p in plans)


def _fold_for(impl: Impl, problem: Problem, plans: Sequence[AxisPlan], query, value,
              pass_: str) -> tuple[Problem, tuple[AxisPlan, ...]] | None:
    """:func:`_fold` where the backend asks for it: ``impl.fold_shards(problems,
    query_shape, value_shape, dtype, groups) -> (forward, backward)`` says whether it
    would rather run the folded shards' problems (``problems``: one per class combination,
    each with ``groups`` times the batch of ``query_shape``) in a forward that is not
    differentiated and in a backward from saved outputs. ``pass_``: ``"forward"``,
    ``"backward"`` or ``"forward+backward"`` (a forward that autodiff may differentiate:
    either flag). A backend without ``fold_shards`` keeps the dilated problem."""
    fold = _fold(problem, plans, query.shape)
    decide = getattr(impl, "fold_shards", None)
    if fold is None or decide is None:
        return None
    fwd, bwd = decide(_class_problems(*fold), query.shape, value.shape, query.dtype,
                      math.prod(problem.dilation))
    wanted = {"forward": fwd, "backward": bwd, "forward+backward": fwd or bwd}[pass_]
    return fold if wanted else None


def local_attention(query: jax.Array, key: jax.Array, value: jax.Array, problem: Problem,
                    plans: Sequence[AxisPlan], impl: Impl, mesh: Any = None,
                    differentiated: bool = True) -> tuple[jax.Array, jax.Array]:
    """This shard's block of the global operator: halo exchange, then ``impl`` on the
    query block over the halo-extended key block. Differentiable (autodiff transposes
    the exchange).

    Shards whose problems differ (by their origins) run one backend call where ``impl``
    has ``by_device`` and ``mesh`` is the concrete mesh the program runs on (each
    device's problem is then chosen on the host, see :func:`_device_classes`);
    otherwise ``lax.switch`` on the shard's class picks the problem. Where ``impl`` also
    has ``by_device_split``, the rows whose windows need no halo are computed over the
    shard's own keys by a call that does not wait for the exchange, the others after it
    (:func:`_split_calls`; not differentiable: the ``jax.jit`` path's backward is
    :func:`local_attention_backward`). A dilated problem whose shards hold whole dilation
    groups runs undilated, the groups stacked in the batch, where the backend asks for
    it (:func:`_fold_for`; ``differentiated=False`` says that autodiff will not
    differentiate this forward, as on the ``jax.jit`` path)."""
    if not plans:
        return impl(query, key, value, problem)
    fold = _fold_for(impl, problem, plans, query, value,
                     "forward+backward" if differentiated else "forward")
    if fold is not None:
        d, b = problem.dilation, query.shape[0]
        out, lse = local_attention(*(dilation.fold_groups(x, d) for x in (query, key, value)),
                                   *fold, impl, mesh, differentiated)
        return dilation.unfold_groups(out, d, b), dilation.unfold_groups(lse, d, b)
    problems, index = _class_problems(problem, plans), _branch_index(plans)
    by_device, devices = getattr(impl, "by_device", None), _device_classes(plans, mesh)
    one_call = index is not None and by_device is not None and devices is not None
    split = getattr(impl, "by_device_split", None) if one_call else None
    calls = _split_calls(problem, plans) if split is not None else None
    if calls is not None:
        blocks = _split_blocks(key, value, plans, calls)
        return split(query, blocks, index, problems, calls, devices)
    k, v = _blocks(key, value, tuple(plans))
    if one_call:
        return by_device(query, k, v, index, problems, devices)
    branches = [lambda q, k, v, prob=prob: impl(q, k, v, prob) for prob in problems]
    return _switch(index, branches, query, k, v)


def local_attention_backward(query, key, value, out, lse, d_out, d_lse, problem: Problem,
                             plans: Sequence[AxisPlan], impl: Impl,
                             backward: Backward | None, mesh: Any = None):
    """Gradients of :func:`local_attention` from its saved output and log-sum-exp; uses
    the backend's ``backward`` where it has one (no recomputation of the forward), and
    its ``backward_by_device`` as :func:`local_attention` uses ``by_device``."""
    def grads(q, k, v, prob):
        if backward is not None:
            return backward(q, k, v, out, lse, d_out, d_lse, prob)
        _, vjp = jax.vjp(lambda q, k, v: impl(q, k, v, prob), q, k, v)
        return vjp((d_out, d_lse))

    if not plans:
        return grads(query, key, value, problem)
    fold = _fold_for(impl, problem, plans, query, value, "backward")
    if fold is not None:
        d, b = problem.dilation, query.shape[0]
        folded = (dilation.fold_groups(x, d) for x in (query, key, value, out, lse, d_out, d_lse))
        return tuple(dilation.unfold_groups(g, d, b) for g in local_attention_backward(
            *folded, *fold, impl, backward, mesh))
    (k, v), blocks_vjp = jax.vjp(lambda k, v: _blocks(k, v, tuple(plans)), key, value)
    problems, index = _class_problems(problem, plans), _branch_index(plans)
    by_device, devices = getattr(impl, "backward_by_device", None), _device_classes(plans, mesh)
    if index is not None and backward is not None and by_device is not None and devices is not None:
        dq, dk, dv = by_device(query, k, v, out, lse, d_out, d_lse, index, problems, devices)
    else:
        branches = [lambda q, k, v, prob=prob: grads(q, k, v, prob) for prob in problems]
        dq, dk, dv = _switch(index, branches, query, k, v)
    dk, dv = blocks_vjp((dk, dv))  # halo gradients go back to their owners
    return dq, dk, dv


def _backward_of(impl: Impl) -> Backward | None:
    """The backend's backward from saved ``(out, lse)``, if it has one; ``None`` means
    :func:`local_attention_backward` recomputes the forward (``jax.vjp``).

    Protocol for a backend: ``impl.backward(q, k, v, out, lse, d_out, d_lse, problem)
    -> (dq, dk, dv)`` (``xla.attention`` and ``cuda.attention`` have it)."""
    return getattr(impl, "backward", None)


def platform_backward(cuda_impl: Impl, default_impl: Impl) -> Backward | None:
    """The backward of an impl that runs ``cuda_impl`` on CUDA and ``default_impl``
    elsewhere (``lax.platform_dependent``), for ``backend="auto"``; None if either has none."""
    cuda_bwd, default_bwd = _backward_of(cuda_impl), _backward_of(default_impl)
    if cuda_bwd is None or default_bwd is None:
        return None

    def backward(q, k, v, out, lse, d_out, d_lse, problem):
        return jax.lax.platform_dependent(
            q, k, v, out, lse, d_out, d_lse, cuda=lambda *a: cuda_bwd(*a, problem),
            default=lambda *a: default_bwd(*a, problem))
    return backward


def platform_by_device(cuda_impl: Impl, default_impl: Impl) -> tuple[Any, Any, Any]:
    """``(by_device, backward_by_device, by_device_split)`` (see :func:`local_attention`)
    of an impl that runs ``cuda_impl`` on CUDA and ``default_impl`` elsewhere, for
    ``backend="auto"``: ``cuda_impl``'s on CUDA, a ``lax.switch`` between
    ``default_impl``'s problems elsewhere (for ``by_device_split``, ``default_impl`` on
    each call's rows over its key block); ``None`` for what ``cuda_impl`` (or
    ``default_impl``'s backward) lacks."""
    cuda_fwd = getattr(cuda_impl, "by_device", None)
    cuda_bwd = getattr(cuda_impl, "backward_by_device", None)
    cuda_split = getattr(cuda_impl, "by_device_split", None)
    default_bwd = _backward_of(default_impl)

    def by_device(q, k, v, index, problems, devices):
        branches = [lambda q, k, v, p=p: default_impl(q, k, v, p) for p in problems]
        return jax.lax.platform_dependent(
            q, k, v, index, cuda=lambda q, k, v, i: cuda_fwd(q, k, v, i, problems, devices),
            default=lambda q, k, v, i: jax.lax.switch(i, branches, q, k, v))

    def by_device_split(q, blocks, index, problems, calls, devices):
        def shard(c):  # default_impl on each call's box of class combination c
            def run(q, *kv):
                out = lse = None
                for i, call in enumerate(calls):
                    box = call.ranges[c]
                    if any(lo >= hi for lo, hi in box):
                        continue
                    rows = (slice(None),) + tuple(slice(lo, hi) for lo, hi in box)
                    p = problems[c]
                    sub = p.replace(q_origin=tuple(o + lo for o, (lo, _) in zip(p.q_origin, box)),
                                    q_extent=tuple(hi - lo for lo, hi in box),
                                    kv_origin=call.kv_origin[c], kv_extent=call.kv_extent)
                    o, l = default_impl(q[rows], kv[2 * i], kv[2 * i + 1], sub)
                    if out is None:
                        out = jnp.zeros(q.shape[:-1] + o.shape[-1:], o.dtype)
                        lse = jnp.zeros(q.shape[:-1], l.dtype)
                    out, lse = out.at[rows].set(o), lse.at[rows].set(l)
                return out, lse
            return run

        flat = [x for kv in blocks for x in kv]
        return jax.lax.platform_dependent(
            q, index, *flat,
            cuda=lambda q, i, *kv: cuda_split(q, list(zip(kv[::2], kv[1::2])), i, problems,
                                               calls, devices),
            default=lambda q, i, *kv: jax.lax.switch(
                i, [shard(c) for c in range(len(problems))], q, *kv))

    def backward_by_device(q, k, v, out, lse, d_out, d_lse, index, problems, devices):
        branches = [lambda *a, p=p: default_bwd(*a, p) for p in problems]
        return jax.lax.platform_dependent(
            q, k, v, out, lse, d_out, d_lse, index,
            cuda=lambda *a: cuda_bwd(*a, problems, devices),
            default=lambda *a: jax.lax.switch(a[-1], branches, *a[:-1]))

    return (by_device if cuda_fwd is not None else None,
            backward_by_device if cuda_bwd is not None and default_bwd is not None else None,
            by_device_split if cuda_split is not None else None)


def _check_axis_keys(name: str, mapping: Mapping[Any, Any], rank: int) -> None:
    """A ValueError unless every key of ``mapping`` (argument ``name``) is a spatial axis
    index in ``[0, rank)``."""
    for a in mapping:
        if not isinstance(a, (int, np.integer)) or not 0 <= a < max(rank, 0):
            raise ValueError(f"{name} keys must be spatial axis indices in [0, {rank}), "
                             f"got {a!r} ({name}={dict(mapping)}).")


def halo_sizes(shape: Sequence[int], kernel_size: IntOrTuple, stride: IntOrTuple = 1,
               dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False, *,
               shards: Mapping[int, int]) -> dict[int, tuple[int, int]]:
    """``{spatial_axis: (left, right)}``: the key/value rows each shard receives from its
    left / right neighbours when spatial axis ``a`` of the global ``shape`` is split into
    ``shards[a]`` equal blocks. Per step and device, the forward moves
    ``(left + right) * prod(other local extents) * H_kv * (D + D_v)`` elements per sharded
    axis; the backward moves twice that (the halo again, and its gradient back)."""
    from .params import _is_int, window_params

    shape = tuple(int(n) for n in shape)
    k, s, d, c = window_params(shape, kernel_size, stride, dilation, is_causal)
    problem = Problem(shape=shape, kernel_size=k, stride=s, dilation=d, is_causal=c, scale=1.0)
    _check_axis_keys("shards", shards, len(shape))
    out = {}
    for a, n in shards.items():
        if not _is_int(n):
            raise ValueError(f"shards[{a}] must be an integer shard count, got {n!r}.")
        p = plan_axis(problem, a, (f"axis{a}",), int(n))
        out[a] = (p.left, p.right)
    return out


# --------------------------------------------------------------------------
# Transparent path: custom_partitioning + Shardy sharding rule.
# --------------------------------------------------------------------------

def _partitioning_applies(*args: Any) -> bool:
    if not _AUTO_PARTITIONING or jax.device_count() < 2:
        return False
    try:  # no batching rule for custom_partitioning: call the backend directly under vmap
        from jax._src import core
        from jax._src.interpreters import batching
        trace = core.trace_ctx.trace
        while trace is not None:
            if isinstance(trace, batching.BatchTrace):
                return False
            trace = getattr(trace, "parent_trace", None)
    except Exception:  # pragma: no cover - private API moved; be conservative
        return not any(type(a).__name__ == "BatchTracer" for a in args)
    return True


def _rule(rank: int, groups: int, kv_heads: int, backward: bool,
          tokens: bool = False) -> tuple[str, dict]:
    """The Shardy sharding rule of the partitioned op (``tokens``: the op with the
    additional tokens, ``[B, S, H_kv, D]``, as two more inputs) and its factors."""
    sp = " ".join("xyz"[:rank])
    # Query heads are (key/value head, group) major to minor. Shardy rejects a size-1
    # factor inside a compound one, so a single key/value head gets its own factor.
    if groups > 1:
        qh, kh = ("(h g)", "h") if kv_heads > 1 else ("g", "u")
    else:
        qh, kh = "h", "h"
    q, k, v = f"b {sp} {qh} d", f"b {sp} {kh} d", f"b {sp} {kh} e"
    ins = f"{q}, {k}, {v}, b s {kh} d, b s {kh} e" if tokens else f"{q}, {k}, {v}"
    o, lse = f"b {sp} {qh} e", f"b {sp} {qh}"
    sizes = {"g": groups} if groups > 1 and kv_heads > 1 else {}
    if backward:
        rule = f"{ins}, {o}, {lse}, {o}, {lse} -> {ins}"
    else:
        rule = f"{ins} -> {o}, {lse}"
    # (special factors listed in order of first appearance: Shardy wants them sorted)
    factors = ("d", "e", "s") if tokens else ("d", "e")
    return rule, dict(need_replication_factors=factors, **sizes)


def _mesh_size(mesh, names: tuple[str, ...]) -> int:
    return math.prod(mesh.shape[n] for n in names)


def _layout(problem: Problem, spec: Sequence[Any], mesh_shape: Mapping[str, int],
            q_shape: Sequence[int], k_shape: Sequence[int]):
    """From the partition spec of ``query``: the spatial plans and the leading part of the
    spec we run with (batch, *spatial, heads). Batch / heads that do not split evenly
    (heads: over the key/value heads) stay whole."""
    spec = tuple(spec) + (None,) * (len(q_shape) - len(spec))
    size = lambda names: math.prod(mesh_shape[n] for n in names)  # noqa: E731
    batch = _axis_names(spec[0])
    heads = _axis_names(spec[-2])
    if batch and q_shape[0] % size(batch):
        batch = ()
    if heads and k_shape[-2] % size(heads):
        log.warning("jax_gna: %d key/value heads do not split over mesh axes %s; the heads "
                    "are not partitioned", k_shape[-2], heads)
        heads = ()
    plans = []
    for a in range(problem.rank):
        names = _axis_names(spec[1 + a])
        if names and size(names) > 1:
            plans.append(plan_axis(problem, a, names, size(names), mesh_shape))
    spatial = [None] * problem.rank
    for p in plans:
        spatial[p.axis] = _collective_name(p.mesh_axes)
    lead = (_collective_name(batch) if batch else None, *spatial,
            _collective_name(heads) if heads else None)
    return tuple(plans), lead


def _plan_from_sharding(problem: Problem, sharding: Any, mesh: Any, shapes: Sequence[tuple]):
    """From the (Shardy-propagated) sharding of ``query``: the mesh, the spatial plans and
    the shardings we ask for (data tensors, log-sum-exp)."""
    q_shape, k_shape = shapes
    if isinstance(sharding, NamedSharding):
        mesh, spec = sharding.mesh, sharding.spec
    else:
        spec = ()
        if mesh is None or mesh.empty:
            raise ValueError(
                "jax_gna: sharded neighborhood attention needs the inputs' shardings as "
                f"NamedSharding over a Mesh, got {sharding!r}; use jax.sharding.NamedSharding "
                "or jax_gna.sharding.neighborhood_attention_sharded.")
    plans, lead = _layout(problem, spec, dict(mesh.shape), q_shape, k_shape)
    data = NamedSharding(mesh, PartitionSpec(*lead, None))
    lse = NamedSharding(mesh, PartitionSpec(*lead))
    return mesh, plans, data, lse


def _explicit_spec(x: Any):
    """``(abstract mesh, spec)`` when ``x``'s type carries an explicit sharding (mesh axes
    of type ``Explicit``, e.g. under ``jax.set_mesh``) that splits some dim, else None."""
    try:
        sh = jax.typeof(x).sharding
        mesh, spec = sh.mesh, tuple(sh.spec)
    except Exception:  # noqa: BLE001 - concrete arrays without a typed sharding, old JAX
        return None
    if getattr(mesh, "empty", True) or not any(e is not None for e in spec):
        return None
    return mesh, spec


def _has_explicit_axes(mesh) -> bool:
    """Whether ``mesh`` has an axis of type ``Explicit``."""
    explicit = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)
    return explicit is not None and explicit in tuple(getattr(mesh, "axis_types", ()) or ())


def _explicit_attention(impl: Impl, query, key, value, problem: Problem, mesh, spec):
    """Explicit-sharding mode: the layout is known while tracing, so run the per-shard
    program under ``shard_map`` (plain autodiff; no partitioner callback needed)."""
    plans, lead = _layout(problem, spec, dict(mesh.shape), query.shape, key.shape)
    data, lse = PartitionSpec(*lead, None), PartitionSpec(*lead)
    query, key, value = [jax.sharding.reshard(x, NamedSharding(mesh, data))
                         for x in (query, key, value)]
    used = {n for e in lead for n in _axis_names(e)}

    def body(q, k, v):
        return local_attention(q, k, v, problem, plans, impl)

    return jax.shard_map(body, mesh=mesh, in_specs=(data, data, data), out_specs=(data, lse),
                         axis_names=frozenset(used))(query, key, value)


def _with_saved_backward(fwd: Callable, bwd: Callable) -> Callable:
    """The differentiable op of a partitioned pair: ``fwd(*inputs) -> (out, lse)`` and
    ``bwd(*inputs, out, lse, d_out, d_lse) -> gradients of the inputs`` (the cotangents
    cast to the outputs' dtypes)."""
    @jax.custom_vjp
    def op(*inputs):
        return fwd(*inputs)

    def op_fwd(*inputs):
        out, lse = fwd(*inputs)
        return (out, lse), (*inputs, out, lse)

    def op_bwd(res, cot):
        d_out, d_lse = cot
        out, lse = res[-2:]
        return tuple(bwd(*res, d_out.astype(out.dtype), d_lse.astype(lse.dtype)))

    op.defvjp(op_fwd, op_bwd)
    return op


def _partitioned_op(problem: Problem, impl: Impl, groups: int, kv_heads: int):
    from jax.experimental.custom_partitioning import custom_partitioning

    backward = _backward_of(impl)

    def forward_global(q, k, v):
        return impl(q, k, v, problem)

    def backward_global(q, k, v, out, lse, d_out, d_lse):
        return local_attention_backward(q, k, v, out, lse, d_out, d_lse, problem, (), impl,
                                        backward)

    # jax.jit: custom_partitioning rejects functions with closed-over constants (the
    # backends' static tables); a nested jit keeps them inside.
    fwd = custom_partitioning(jax.jit(forward_global))
    bwd = custom_partitioning(jax.jit(backward_global))

    def partition_fwd(mesh, arg_shapes, result_shape):
        shapes = (arg_shapes[0].shape, arg_shapes[1].shape)
        mesh, plans, data, lse = _plan_from_sharding(problem, arg_shapes[0].sharding, mesh, shapes)

        def lower(q, k, v):  # op's forward: its backward is partition_bwd's, not autodiff
            return local_attention(q, k, v, problem, plans, impl, mesh, differentiated=False)

        return mesh, lower, (data, lse), (data, data, data)

    def partition_bwd(mesh, arg_shapes, result_shape):
        shapes = (arg_shapes[0].shape, arg_shapes[1].shape)
        mesh, plans, data, lse = _plan_from_sharding(problem, arg_shapes[0].sharding, mesh, shapes)

        def lower(q, k, v, out, l, d_out, d_l):
            return local_attention_backward(q, k, v, out, l, d_out, d_l, problem, plans, impl,
                                            backward, mesh)

        return mesh, lower, (data, data, data), (data, data, data, data, lse, data, lse)

    rule, factors = _rule(problem.rank, groups, kv_heads, backward=False)
    fwd.def_partition(partition=partition_fwd, sharding_rule=rule, **factors)
    rule, factors = _rule(problem.rank, groups, kv_heads, backward=True)
    bwd.def_partition(partition=partition_bwd, sharding_rule=rule, **factors)

    return _with_saved_backward(fwd, bwd)


def attention(impl: Impl, query: jax.Array, key: jax.Array, value: jax.Array,
              problem: Problem) -> tuple[jax.Array, jax.Array]:
    """``impl(query, key, value, problem)``, partitioned by the inputs' shardings under
    ``jax.jit`` (see the module docstring). What :func:`jax_gna.neighborhood_attention`
    calls; the same contract as a backend: ``(out, lse)``."""
    if not problem.is_whole or not _partitioning_applies(query, key, value):
        return impl(query, key, value, problem)
    explicit = _explicit_spec(query)
    if explicit is not None:
        return _explicit_attention(impl, query, key, value, problem, *explicit)
    groups = query.shape[-2] // key.shape[-2]
    return _partitioned_op(problem, impl, groups, key.shape[-2])(query, key, value)


# --------------------------------------------------------------------------
# The additional (global) tokens: dense attention of every query over them.
# --------------------------------------------------------------------------

def _dense_layout(spec: Sequence[Any], mesh_shape: Mapping[str, int], q_shape, k_shape):
    """Leading spec (batch, *spatial, heads) for the dense part: queries keep their
    spatial sharding (no halo: every query sees all extra tokens); returns it and the
    mesh axes that split the spatial dims (the extra tokens' gradients sum over them)."""
    spec = tuple(spec) + (None,) * (len(q_shape) - len(spec))
    size = lambda names: math.prod(mesh_shape[n] for n in names)  # noqa: E731
    lead = []
    for dim in range(len(q_shape) - 1):
        names = _axis_names(spec[dim])
        n = q_shape[dim] if dim < len(q_shape) - 2 else k_shape[-2]  # heads: split H_kv
        lead.append(_collective_name(names) if names and n % size(names) == 0 else None)
    spatial = tuple(n for e in lead[1:-1] for n in _axis_names(e))
    return tuple(lead), spatial


def dense_of(impl: Impl) -> Dense:
    """The backend's attention over the additional tokens: ``impl.dense(q, k, v, scale)
    -> (out, lse)`` (every query over all of ``k``/``v``, ``[B, S, H_kv, D]``), or
    ``xla.dense_attention`` for a backend without one."""
    return getattr(impl, "dense", xla.dense_attention)


def _dense_local_backward(q, k, v, out, lse, d_out, d_lse, scale, spatial, dense):
    """One shard's gradients of the dense part: from the saved ``out``/``lse`` through
    ``dense.backward(q, k, v, out, lse, d_out, d_lse, scale)`` where the dense function
    has one (``cuda.dense_attention``), else by recomputing its forward (``jax.vjp``)."""
    backward = getattr(dense, "backward", None)
    if backward is not None:
        dq, dk, dv = backward(q, k, v, out, lse, d_out, d_lse, scale)
    else:
        _, vjp = jax.vjp(lambda q, k, v: dense(q, k, v, scale), q, k, v)
        dq, dk, dv = vjp((d_out, d_lse))
    if spatial:  # every spatial shard saw all extra tokens: sum their gradients
        dk, dv = jax.lax.psum((dk, dv), spatial)
    return dq, dk, dv


def _dense_partitioned(scale: float, rank: int, groups: int, kv_heads: int, dense: Dense):
    from jax.experimental.custom_partitioning import custom_partitioning

    fwd = custom_partitioning(jax.jit(lambda q, k, v: dense(q, k, v, scale)))
    bwd = custom_partitioning(jax.jit(
        lambda q, k, v, o, l, do, dl: _dense_local_backward(q, k, v, o, l, do, dl, scale, (),
                                                            dense)))

    def shardings(mesh, arg_shapes):
        sh = arg_shapes[0].sharding
        if isinstance(sh, NamedSharding):
            mesh, spec = sh.mesh, sh.spec
        else:
            spec = ()
        lead, spatial = _dense_layout(spec, dict(mesh.shape), arg_shapes[0].shape,
                                      arg_shapes[1].shape)
        data = NamedSharding(mesh, PartitionSpec(*lead, None))
        lse = NamedSharding(mesh, PartitionSpec(*lead))
        extra = NamedSharding(mesh, PartitionSpec(lead[0], None, lead[-1], None))
        return mesh, spatial, data, lse, extra

    def partition_fwd(mesh, arg_shapes, result_shape):
        mesh, _, data, lse, extra = shardings(mesh, arg_shapes)
        return (mesh, lambda q, k, v: dense(q, k, v, scale), (data, lse),
                (data, extra, extra))

    def partition_bwd(mesh, arg_shapes, result_shape):
        mesh, spatial, data, lse, extra = shardings(mesh, arg_shapes)

        def lower(q, k, v, o, l, do, dl):
            return _dense_local_backward(q, k, v, o, l, do, dl, scale, spatial, dense)

        return mesh, lower, (data, extra, extra), (data, extra, extra, data, lse, data, lse)

    sp = " ".join("xyz"[:rank])
    if groups > 1:
        qh, kh = ("(h g)", "h") if kv_heads > 1 else ("g", "u")
    else:
        qh, kh = "h", "h"
    sizes = {"g": groups} if groups > 1 and kv_heads > 1 else {}
    q, k, v = f"b {sp} {qh} d", f"b s {kh} d", f"b s {kh} e"
    o, lse = f"b {sp} {qh} e", f"b {sp} {qh}"
    # (special factors listed in order of first appearance: Shardy wants them sorted)
    factors = dict(need_replication_factors=("d", "s", "e"), **sizes)
    fwd.def_partition(partition=partition_fwd, sharding_rule=f"{q}, {k}, {v} -> {o}, {lse}",
                      **factors)
    bwd.def_partition(partition=partition_bwd,
                      sharding_rule=f"{q}, {k}, {v}, {o}, {lse}, {o}, {lse} -> {q}, {k}, {v}",
                      **factors)

    return _with_saved_backward(fwd, bwd)


def dense_attention(query: jax.Array, key: jax.Array, value: jax.Array, scale: float,
                    dense: Dense | None = None) -> tuple[jax.Array, jax.Array]:
    """``dense`` (default :func:`jax_gna.xla.dense_attention`; a backend's is
    :func:`dense_of`: every query over all additional tokens), partitioned like
    :func:`attention`: queries stay split along batch, heads and spatial axes (no
    communication forward); the additional tokens are split along batch / heads and
    replicated over the spatial mesh axes, whose partial gradients are summed (one
    all-reduce of ``S_extra`` rows in the backward)."""
    dense = dense or xla.dense_attention
    if not _partitioning_applies(query, key, value):
        return dense(query, key, value, scale)
    explicit = _explicit_spec(query)
    if explicit is not None:
        mesh, spec = explicit
        lead, _ = _dense_layout(spec, dict(mesh.shape), query.shape, key.shape)
        data, lse = PartitionSpec(*lead, None), PartitionSpec(*lead)
        extra = PartitionSpec(lead[0], None, lead[-1], None)
        query = jax.sharding.reshard(query, NamedSharding(mesh, data))
        key, value = [jax.sharding.reshard(x, NamedSharding(mesh, extra)) for x in (key, value)]
        used = {n for e in lead for n in _axis_names(e)}
        return jax.shard_map(lambda q, k, v: dense(q, k, v, scale), mesh=mesh,
                             in_specs=(data, extra, extra), out_specs=(data, lse),
                             axis_names=frozenset(used))(query, key, value)
    rank = query.ndim - 3
    groups = query.shape[-2] // key.shape[-2]
    return _dense_partitioned(scale, rank, groups, key.shape[-2], dense)(query, key, value)


def _local_with_tokens(query, key, value, extra_keys, extra_values, problem: Problem,
                       plans: Sequence[AxisPlan], impl: Impl, mesh: Any = None,
                       differentiated: bool = False):
    """One shard's forward of a call with additional tokens (the whole call without
    ``plans``): the backend's ``impl.with_tokens`` where no spatial axis is split (each
    shard holds whole grids), else :func:`local_attention` (halo exchange) merged with
    the shard's queries over all the tokens. ``differentiated``: as
    :func:`local_attention` says (False on the ``jax.jit`` path, whose backward is
    :func:`_local_with_tokens_backward`; True under ``shard_map``, plain autodiff)."""
    fused = getattr(impl, "with_tokens", None)
    if fused is not None and not plans:
        return fused(query, key, value, extra_keys, extra_values, problem)
    out, lse = local_attention(query, key, value, problem, plans, impl, mesh, differentiated)
    return xla.merge(out, lse, *dense_of(impl)(query, extra_keys, extra_values, problem.scale))


def _local_with_tokens_backward(query, key, value, extra_keys, extra_values, out, lse, d_out,
                                d_lse, problem: Problem, plans: Sequence[AxisPlan], impl: Impl,
                                mesh: Any = None):
    """Gradients of :func:`_local_with_tokens` from its merged ``out`` / ``lse``: each
    part's backward from the merged statistics (``P = exp(s - lse)`` over a part's keys
    is the merged softmax restricted to them, ``delta = rowsum(dO o) - dLSE`` the whole
    row's), so the two add up to the union's gradients with no merge backward:
    :func:`local_attention_backward` and ``impl.tokens_backward``; the tokens' gradients
    summed over the spatial shards, which all saw every token."""
    dq, dk, dv = local_attention_backward(query, key, value, out, lse, d_out, d_lse, problem,
                                          plans, impl, _backward_of(impl), mesh)
    dqx, dxk, dxv = impl.tokens_backward(query, extra_keys, extra_values, out, lse, d_out,
                                         d_lse, problem.scale)
    spatial = tuple(n for p in plans for n in p.mesh_axes)
    if spatial:
        dxk, dxv = jax.lax.psum((dxk, dxv), spatial)
    acc = jnp.promote_types(dq.dtype, jnp.float32)
    return (dq.astype(acc) + dqx.astype(acc)).astype(dq.dtype), dk, dv, dxk, dxv


def _explicit_with_tokens(impl: Impl, query, key, value, extra_keys, extra_values,
                          problem: Problem, mesh, spec):
    """:func:`_explicit_attention` for a call with additional tokens: one ``shard_map``
    running :func:`_local_with_tokens` (plain autodiff; the tokens' gradients are summed
    over the spatial mesh axes by the transpose of their replication)."""
    plans, lead = _layout(problem, spec, dict(mesh.shape), query.shape, key.shape)
    data, lse = PartitionSpec(*lead, None), PartitionSpec(*lead)
    extra = PartitionSpec(lead[0], None, lead[-1], None)
    query, key, value = [jax.sharding.reshard(x, NamedSharding(mesh, data))
                         for x in (query, key, value)]
    extra_keys, extra_values = [jax.sharding.reshard(x, NamedSharding(mesh, extra))
                                for x in (extra_keys, extra_values)]
    used = {n for e in lead for n in _axis_names(e)}

    def body(q, k, v, xk, xv):
        return _local_with_tokens(q, k, v, xk, xv, problem, plans, impl, differentiated=True)

    return jax.shard_map(body, mesh=mesh, in_specs=(data, data, data, extra, extra),
                         out_specs=(data, lse), axis_names=frozenset(used))(
        query, key, value, extra_keys, extra_values)


def _partitioned_tokens_op(problem: Problem, impl: Impl, groups: int, kv_heads: int):
    """:func:`_partitioned_op` for a call with additional tokens: one op over
    ``(q, k, v, extra_k, extra_v)`` whose shards run :func:`_local_with_tokens` (the
    tokens ``[B, S, H_kv, D]`` split along batch and heads like the queries, whole
    along S), its backward :func:`_local_with_tokens_backward`."""
    from jax.experimental.custom_partitioning import custom_partitioning

    def forward_global(q, k, v, xk, xv):
        return _local_with_tokens(q, k, v, xk, xv, problem, (), impl)

    def backward_global(q, k, v, xk, xv, out, lse, d_out, d_lse):
        return _local_with_tokens_backward(q, k, v, xk, xv, out, lse, d_out, d_lse, problem,
                                           (), impl)

    fwd = custom_partitioning(jax.jit(forward_global))  # jit: see _partitioned_op
    bwd = custom_partitioning(jax.jit(backward_global))

    def layout(mesh, arg_shapes):
        shapes = (arg_shapes[0].shape, arg_shapes[1].shape)
        mesh, plans, data, lse = _plan_from_sharding(problem, arg_shapes[0].sharding, mesh, shapes)
        extra = NamedSharding(mesh, PartitionSpec(data.spec[0], None, data.spec[-2], None))
        return mesh, plans, data, lse, extra

    def partition_fwd(mesh, arg_shapes, result_shape):
        mesh, plans, data, lse, extra = layout(mesh, arg_shapes)

        def lower(q, k, v, xk, xv):
            return _local_with_tokens(q, k, v, xk, xv, problem, plans, impl, mesh)

        return mesh, lower, (data, lse), (data, data, data, extra, extra)

    def partition_bwd(mesh, arg_shapes, result_shape):
        mesh, plans, data, lse, extra = layout(mesh, arg_shapes)

        def lower(q, k, v, xk, xv, out, l, d_out, d_l):
            return _local_with_tokens_backward(q, k, v, xk, xv, out, l, d_out, d_l, problem,
                                               plans, impl, mesh)

        return (mesh, lower, (data, data, data, extra, extra),
                (data, data, data, extra, extra, data, lse, data, lse))

    rule, factors = _rule(problem.rank, groups, kv_heads, backward=False, tokens=True)
    fwd.def_partition(partition=partition_fwd, sharding_rule=rule, **factors)
    rule, factors = _rule(problem.rank, groups, kv_heads, backward=True, tokens=True)
    bwd.def_partition(partition=partition_bwd, sharding_rule=rule, **factors)

    return _with_saved_backward(fwd, bwd)


def attention_with_tokens(impl: Impl, query: jax.Array, key: jax.Array, value: jax.Array,
                          extra_keys: jax.Array, extra_values: jax.Array,
                          problem: Problem) -> tuple[jax.Array, jax.Array]:
    """:func:`attention` over each query's window merged with :func:`dense_attention` over
    the additional tokens ``extra_keys`` / ``extra_values``: ``(out, lse)`` over both. A
    backend may do both in one: ``impl.with_tokens(q, k, v, extra_k, extra_v, problem)``
    (the kernels' Hopper forward), taken where nothing partitions the call. Under
    ``jax.jit`` with two or more devices, a backend with a backward from saved
    statistics (``impl.backward`` and ``impl.tokens_backward``) runs one partitioned op
    (:func:`_partitioned_tokens_op`): ``impl.with_tokens`` on each shard where no spatial
    axis is split, the two parts and a merge on each shard where one is, the backward
    from the merged out / lse; with ``Explicit`` mesh axes, the same shards' programs in
    one ``shard_map`` (:func:`_explicit_with_tokens`, plain autodiff). Otherwise (a
    backend without those) the two parts, each partitioned, and ``xla.merge``."""
    fused = getattr(impl, "with_tokens", None)
    args = (query, key, value, extra_keys, extra_values)
    if problem.is_whole and _partitioning_applies(*args):
        explicit = _explicit_spec(query)
        if explicit is not None:
            return _explicit_with_tokens(impl, *args, problem, *explicit)
        if _backward_of(impl) is not None and getattr(impl, "tokens_backward", None) is not None:
            groups = query.shape[-2] // key.shape[-2]
            return _partitioned_tokens_op(problem, impl, groups, key.shape[-2])(*args)
    elif fused is not None and problem.is_whole:
        return fused(*args, problem)
    out, lse = attention(impl, query, key, value, problem)
    extra_out, extra_lse = dense_attention(query, extra_keys, extra_values, problem.scale,
                                           dense_of(impl))
    return xla.merge(out, lse, extra_out, extra_lse)


# --------------------------------------------------------------------------
# Explicit path: inside shard_map, or shard_map for you.
# --------------------------------------------------------------------------

def neighborhood_attention_local(query: jax.Array, key: jax.Array, value: jax.Array,
                                 kernel_size: IntOrTuple, stride: IntOrTuple = 1,
                                 dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False,
                                 scale: float | None = None, *,
                                 spatial_axes: Mapping[int, AxisName] | None = None,
                                 additional_keys: jax.Array | None = None,
                                 additional_values: jax.Array | None = None,
                                 return_lse: bool = False, backend: str = "auto"):
    """Neighborhood attention on this device's blocks, for use **inside** ``shard_map``.

    ``query``/``key``/``value`` are the local blocks ``[B_local, *spatial_local, H_local, D]``
    of global arrays split evenly along the spatial axes named in ``spatial_axes``
    (``{spatial_axis: mesh_axis_name or tuple of names}``, spatial axes counted from 0;
    e.g. ``{0: "context"}`` for ``P("data", "context", None, None)``; a tuple names the
    mesh axes major to minor as in the ``PartitionSpec``, in any order, e.g.
    ``{0: ("y", "x")}`` for ``P(None, ("y", "x"), None, None)``). Batch and heads may
    be split too (nothing to say: they are independent). The result is this device's
    block of the global operator (``kernel_size``, ``stride``, ... refer to the global
    grid): halo rows are exchanged with the neighbours by ``lax.ppermute``; gradients flow
    back through the same exchange.

    ``additional_keys/values`` are this device's (typically replicated over the spatial
    mesh axes) extra tokens, attended by every local query.

    Raises ``ValueError`` as :func:`jax_gna.neighborhood_attention` does (checked on the
    global shapes).

    Shards whose problems differ (at the borders) pick theirs with ``lax.switch``; the
    ``jax.jit`` path (:func:`jax_gna.neighborhood_attention` on sharded inputs) runs them
    in the same kernel calls instead, its forward computing the rows that need no halo
    first (see the module docstring).
    """
    from .ops import select
    from .params import check_return_lse, make_problem
    from . import xla as _xla

    check_return_lse(return_lse)
    if spatial_axes is not None and not isinstance(spatial_axes, Mapping):
        raise ValueError("spatial_axes must map spatial axis indices to mesh axis names, got "
                         f"{spatial_axes!r}.")
    spatial_axes = dict(spatial_axes or {})
    ndim = len(np.shape(query))
    rank = ndim - 3
    _check_axis_keys("spatial_axes", spatial_axes, rank)
    # The mesh's axis order: how ppermute numbers a spatial axis split over several mesh
    # axes (the data is laid out in the order spatial_axes names them).
    mesh_shape = dict(getattr(jax.sharding.get_abstract_mesh(), "shape", None) or {}) or None
    counts = {}
    for a, n in spatial_axes.items():
        try:
            counts[a] = int(jax.lax.axis_size(_collective_name(_axis_names(n))))
        except NameError as e:  # not inside shard_map (or a mesh without that axis)
            raise ValueError(
                f"spatial_axes[{a}]={n!r} is not a mesh axis bound here: call "
                "neighborhood_attention_local inside jax.shard_map over a mesh with that axis "
                "(or neighborhood_attention_sharded, which does).") from e

    def global_struct(x):
        shape = list(np.shape(x))
        for a, n in counts.items():
            shape[1 + a] *= n
        return jax.ShapeDtypeStruct(tuple(shape), x.dtype)

    g = [global_struct(x) for x in (query, key, value)]
    problem = make_problem(*g, kernel_size, stride, dilation, is_causal, scale,
                           additional_keys, additional_values)
    _, _, impl = select(backend, problem, query, key, value)
    plans = tuple(plan_axis(problem, a, spatial_axes[a], counts[a], mesh_shape)
                  for a in sorted(spatial_axes) if counts[a] > 1)
    out, lse = local_attention(query, key, value, problem, plans, impl)
    if additional_keys is not None:
        extra_out, extra_lse = dense_of(impl)(query, additional_keys, additional_values,
                                              problem.scale)
        out, lse = _xla.merge(out, lse, extra_out, extra_lse)
    return (out, lse) if return_lse else out


def neighborhood_attention_sharded(query: jax.Array, key: jax.Array, value: jax.Array,
                                   kernel_size: IntOrTuple, stride: IntOrTuple = 1,
                                   dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False,
                                   scale: float | None = None, *, mesh: jax.sharding.Mesh,
                                   batch_axis: AxisName | None = None,
                                   head_axis: AxisName | None = None,
                                   spatial_axes: Mapping[int, AxisName] | None = None,
                                   additional_keys: jax.Array | None = None,
                                   additional_values: jax.Array | None = None,
                                   return_lse: bool = False, backend: str = "auto"):
    """:func:`jax_gna.neighborhood_attention` over global arrays laid out on ``mesh`` as
    ``P(batch_axis, *[spatial_axes.get(i) for each spatial axis], head_axis, None)``
    (``shard_map`` around :func:`neighborhood_attention_local`). Outputs come back with
    that layout (log-sum-exp without the last dim); a spatial axis may name a tuple of
    mesh axes in any order (the layout's, major to minor). ``head_axis`` must divide the
    key/value heads. Additional tokens are split over ``batch_axis``/``head_axis`` only.
    Inputs laid out otherwise are resharded to that layout first (also on a mesh with
    ``Explicit`` axes, where ``shard_map`` itself would refuse them). Works under
    ``jax.jit`` and ``jax.grad``."""
    from .params import check_return_lse, make_problem

    if not isinstance(mesh, jax.sharding.Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh (not an abstract mesh), got {mesh!r}.")
    check_return_lse(return_lse)
    if spatial_axes is not None and not isinstance(spatial_axes, Mapping):
        raise ValueError("spatial_axes must map spatial axis indices to mesh axis names, got "
                         f"{spatial_axes!r}.")
    spatial_axes = dict(spatial_axes or {})
    make_problem(query, key, value, kernel_size, stride, dilation, is_causal, scale,
                 additional_keys, additional_values)  # errors before any device work
    rank = len(np.shape(query)) - 3
    _check_axis_keys("spatial_axes", spatial_axes, rank)
    named = [("batch_axis", batch_axis), ("head_axis", head_axis)]
    named += [(f"spatial_axes[{a}]", n) for a, n in spatial_axes.items()]
    used: dict[str, str] = {}
    for what, names in named:
        unknown = [n for n in _axis_names(names) if n not in mesh.shape]
        if unknown:
            raise ValueError(f"{what}={names!r} names {unknown}, not an axis of the mesh "
                             f"(its axes: {tuple(mesh.shape)}).")
        for n in _axis_names(names):
            if n in used:
                raise ValueError(f"mesh axis {n!r} is named twice ({used[n]} and {what}): "
                                 "each mesh axis splits one dim.")
            used[n] = what
    h_kv = np.shape(key)[-2]
    heads = _axis_names(head_axis)
    if heads and h_kv % _mesh_size(mesh, heads):
        raise ValueError(f"head_axis={head_axis!r} splits {_mesh_size(mesh, heads)} ways, "
                         f"which does not divide the {h_kv} key/value heads.")
    batch = _axis_names(batch_axis)
    if batch and np.shape(query)[0] % _mesh_size(mesh, batch):
        raise ValueError(f"batch_axis={batch_axis!r} splits {_mesh_size(mesh, batch)} ways, "
                         f"which does not divide the batch {np.shape(query)[0]}.")
    for a, names in spatial_axes.items():
        n = _mesh_size(mesh, _axis_names(names))
        if np.shape(query)[1 + a] % n:
            raise ValueError(
                f"spatial axis {a} of length {np.shape(query)[1 + a]} cannot be split into {n} "
                f"equal shards over mesh axis {names!r}: the length must be a multiple of the "
                f"number of shards.")
    lead = (batch_axis, *[spatial_axes.get(a) for a in range(rank)], head_axis)
    data, lse_spec = PartitionSpec(*lead, None), PartitionSpec(*lead)
    extra = PartitionSpec(batch_axis, None, head_axis, None)
    has_extra = additional_keys is not None

    def body(q, k, v, *extra_kv):
        ak, av = extra_kv if has_extra else (None, None)
        return neighborhood_attention_local(
            q, k, v, kernel_size, stride, dilation, is_causal, scale, spatial_axes=spatial_axes,
            additional_keys=ak, additional_values=av, return_lse=True, backend=backend)

    in_specs = (data, data, data) + ((extra, extra) if has_extra else ())
    args = (query, key, value) + ((additional_keys, additional_values) if has_extra else ())
    if _has_explicit_axes(mesh):  # shard_map reshards nothing there: place the inputs
        args = tuple(jax.sharding.reshard(x, NamedSharding(mesh, spec))
                     for x, spec in zip(args, in_specs))
    out, lse = jax.shard_map(body, mesh=mesh, in_specs=in_specs,
                             out_specs=(data, lse_spec))(*args)
    return (out, lse) if return_lse else out

