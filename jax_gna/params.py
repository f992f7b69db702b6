"""Validation of user input and the one immutable problem description.

Everything a backend needs to know about *which* keys a query sees lives in
:class:`Problem`. It is built once, at the top of the public call, after every
check of SEMANTICS.md has passed; no backend validates again.

A ``Problem`` describes a block of queries and a block of keys inside a global
grid (``q_origin`` / ``kv_origin`` with the local extents). Unsharded calls use
the whole grid for both; a shard of a spatially sharded call uses its own block
of queries and the halo-extended block of keys, and computes exactly its part of
the global operator.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

IntOrTuple = Union[int, Sequence[int]]
BoolOrTuple = Union[bool, Sequence[bool]]

BACKENDS = ("auto", "xla", "cuda")


@dataclasses.dataclass(frozen=True)
class Problem:
    """Window parameters and block placement, one entry per spatial axis.

    Attributes:
      shape: global spatial extents (the grid the windows are defined on).
      kernel_size, stride, dilation, is_causal: per-axis GNA parameters.
      q_origin, q_extent: the block of queries, in global coordinates.
      kv_origin, kv_extent: the block of keys/values, in global coordinates.
      scale: the factor applied to ``q . k``.
    """

    shape: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]
    scale: float
    q_origin: tuple[int, ...] = ()
    q_extent: tuple[int, ...] = ()
    kv_origin: tuple[int, ...] = ()
    kv_extent: tuple[int, ...] = ()

    def __post_init__(self):
        n = len(self.shape)
        zeros = (0,) * n
        if not self.q_origin:
            object.__setattr__(self, "q_origin", zeros)
        if not self.kv_origin:
            object.__setattr__(self, "kv_origin", zeros)
        if not self.q_extent:
            object.__setattr__(self, "q_extent", tuple(self.shape))
        if not self.kv_extent:
            object.__setattr__(self, "kv_extent", tuple(self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_whole(self) -> bool:
        """True when both blocks are the whole grid (the unsharded case)."""
        zeros = (0,) * self.rank
        return (self.q_origin == zeros and self.kv_origin == zeros
                and self.q_extent == self.shape and self.kv_extent == self.shape)

    def axis(self, a: int) -> "Axis":
        return Axis(self.shape[a], self.kernel_size[a], self.stride[a],
                    self.dilation[a], self.is_causal[a])

    def replace(self, **changes: Any) -> "Problem":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Axis:
    """The GNA parameters of one axis (global length ``length``)."""

    length: int
    kernel_size: int
    stride: int
    dilation: int
    is_causal: bool


# --------------------------------------------------------------------------
# Input validation (SEMANTICS.md, "Rejected input").
# --------------------------------------------------------------------------

def _is_int(x: Any) -> bool:
    return isinstance(x, (numbers.Integral, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_bool(x: Any) -> bool:
    return isinstance(x, (bool, np.bool_))


def per_axis(name: str, value: Any, rank: int, kind: str = "int") -> tuple:
    """Normalize an int/bool or a tuple of them to a tuple of ``rank`` entries."""
    check = _is_bool if kind == "bool" else _is_int
    what = "a bool" if kind == "bool" else "an integer"
    if isinstance(value, (list, tuple)):
        if len(value) != rank:
            raise ValueError(
                f"{name}={tuple(value)!r} has {len(value)} entries, but the inputs have "
                f"{rank} spatial axes; give one value or a tuple of {rank}.")
        items = tuple(value)
    else:
        items = (value,) * rank
    for v in items:
        if not check(v):
            raise ValueError(f"{name} must be {what} or a tuple of them, got {value!r}.")
    return tuple(bool(v) for v in items) if kind == "bool" else tuple(int(v) for v in items)


def check_window(rank: int, kernel_size: IntOrTuple, stride: IntOrTuple = 1,
                 dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False
                 ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[bool, ...]]:
    """Check the GNA parameters that need no spatial shape; return them per axis."""
    k = per_axis("kernel_size", kernel_size, rank)
    s = per_axis("stride", stride, rank)
    d = per_axis("dilation", dilation, rank)
    c = per_axis("is_causal", is_causal, rank, kind="bool")
    for a in range(rank):
        if k[a] < 2:
            raise ValueError(f"kernel_size must be >= 2 on every axis, got kernel_size={k}.")
        if s[a] < 1 or s[a] > k[a]:
            raise ValueError(
                f"stride must satisfy 1 <= stride <= kernel_size on every axis, got "
                f"stride={s} with kernel_size={k}.")
        if d[a] < 1:
            raise ValueError(f"dilation must be >= 1 on every axis, got dilation={d}.")
    return k, s, d, c


def window_params(shape: Sequence[int], kernel_size: IntOrTuple, stride: IntOrTuple = 1,
                  dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False
                  ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[bool, ...]]:
    """Check the GNA parameters against a spatial shape; return them per axis."""
    k, s, d, c = check_window(len(shape), kernel_size, stride, dilation, is_causal)
    for a in range(len(shape)):
        if k[a] * d[a] > shape[a]:
            raise ValueError(
                f"kernel_size * dilation must not exceed the axis length: on axis {a}, "
                f"kernel_size={k[a]} * dilation={d[a]} = {k[a] * d[a]} > length {shape[a]} "
                f"(spatial shape {tuple(shape)}).")
    return k, s, d, c


def _dtype(x: Any) -> np.dtype:
    """The dtype JAX computes ``x`` in (NumPy float64 is float32 unless x64 is on)."""
    return np.dtype(jax.dtypes.canonicalize_dtype(
        x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype))


def _shape(x: Any) -> tuple[int, ...]:
    try:
        return tuple(int(n) for n in np.shape(x))
    except Exception as e:  # noqa: BLE001 - symbolic dims (jax.export) raise their own kind
        raise ValueError(
            f"jax_gna needs static shapes, got shape {tuple(np.shape(x))}: symbolic dimensions "
            "(jax.export shape polymorphism) are not supported; export one shape per "
            "batch size.") from e


def check_tensors(query: Any, key: Any, value: Any, additional_keys: Any = None,
                  additional_values: Any = None, rank: int | None = None) -> int:
    """Check the shapes and dtypes of the inputs; return the number of spatial axes."""
    for name, x in (("query", query), ("key", key), ("value", value),
                    ("additional_keys", additional_keys),
                    ("additional_values", additional_values)):
        if x is not None and not (hasattr(x, "shape") and hasattr(x, "dtype")):
            raise ValueError(f"{name} must be an array (jax.Array or numpy.ndarray), got "
                             f"{type(x).__name__}.")
    qs, ks, vs = _shape(query), _shape(key), _shape(value)
    for name, s in (("query", qs), ("key", ks), ("value", vs)):
        if len(s) not in (4, 5, 6):
            raise ValueError(
                f"{name} must have rank 4, 5 or 6 ([batch, *spatial, heads, dim] with 1-3 "
                f"spatial axes), got shape {s}.")
    if not len(qs) == len(ks) == len(vs):
        raise ValueError(
            f"query, key and value must have the same rank, got shapes {qs}, {ks}, {vs}.")
    n = len(qs) - 3
    if rank is not None and n != rank:
        raise ValueError(
            f"na{rank}d expects {rank} spatial axes (rank {rank + 3} inputs), got query shape "
            f"{qs} with {n}.")
    if not qs[:-2] == ks[:-2] == vs[:-2]:
        raise ValueError(
            f"query, key and value must agree in batch and spatial shape, got shapes {qs}, "
            f"{ks}, {vs}.")
    if qs[-1] != ks[-1]:
        raise ValueError(
            f"query and key must have the same head dim, got {qs[-1]} (query shape {qs}) and "
            f"{ks[-1]} (key shape {ks}).")
    if ks[-2] != vs[-2]:
        raise ValueError(
            f"key and value must have the same number of heads, got {ks[-2]} and {vs[-2]}.")
    if min(qs[-2], ks[-2]) < 1 or qs[-2] % ks[-2] != 0:
        raise ValueError(
            f"the query heads must be a multiple of the key/value heads, got {qs[-2]} query "
            f"heads and {ks[-2]} key/value heads.")
    if min(qs) < 1 or min(vs) < 1:
        raise ValueError(f"empty inputs are not supported, got shapes {qs}, {ks}, {vs}.")
    dts = [_dtype(t) for t in (query, key, value)]
    if not dts[0] == dts[1] == dts[2]:
        raise ValueError(
            f"query, key and value must have the same dtype, got {dts[0]}, {dts[1]}, {dts[2]}.")
    if not jnp.issubdtype(dts[0], jnp.floating):
        raise ValueError(f"query, key and value must be floating point, got dtype {dts[0]}.")

    if (additional_keys is None) != (additional_values is None):
        raise ValueError(
            "additional_keys and additional_values go together: got only "
            + ("additional_keys." if additional_values is None else "additional_values."))
    if additional_keys is not None:
        aks, avs = _shape(additional_keys), _shape(additional_values)
        b, h_kv, d, d_v = qs[0], ks[-2], ks[-1], vs[-1]
        if len(aks) != 4 or aks[0] != b or aks[2] != h_kv or aks[3] != d or aks[1] < 1:
            raise ValueError(
                f"additional_keys must have shape [batch={b}, S_extra, heads_kv={h_kv}, "
                f"dim={d}], got {aks}.")
        if len(avs) != 4 or avs != (b, aks[1], h_kv, d_v):
            raise ValueError(
                f"additional_values must have shape [batch={b}, S_extra={aks[1]}, "
                f"heads_kv={h_kv}, dim_v={d_v}], got {avs}.")
        for name, t in (("additional_keys", additional_keys),
                        ("additional_values", additional_values)):
            dt = _dtype(t)
            if dt != dts[0]:
                raise ValueError(f"{name} must have the dtype of query ({dts[0]}), got {dt}.")
    return n


def check_scale(scale: Any) -> None:
    """A ValueError unless ``scale`` is None or a finite real number (not a bool)."""
    if scale is None:
        return
    if not isinstance(scale, (numbers.Real, np.floating)) or isinstance(scale, bool):
        raise ValueError(f"scale must be a real number or None, got {scale!r}.")
    if not np.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale!r}.")


def make_problem(query: Any, key: Any, value: Any, kernel_size: IntOrTuple,
                 stride: IntOrTuple = 1, dilation: IntOrTuple = 1,
                 is_causal: BoolOrTuple = False, scale: float | None = None,
                 additional_keys: Any = None, additional_values: Any = None,
                 rank: int | None = None) -> Problem:
    """Validate everything the public call takes and build its :class:`Problem`."""
    n = check_tensors(query, key, value, additional_keys, additional_values, rank)
    shape = _shape(query)[1:1 + n]
    k, s, d, c = window_params(shape, kernel_size, stride, dilation, is_causal)
    head_dim = _shape(query)[-1]
    check_scale(scale)
    if scale is None:
        scale = head_dim ** -0.5
    elif (np.dtype(_dtype(query)) != np.float64
          and abs(float(scale)) * math.log2(math.e) >= float(np.finfo(np.float32).max)):
        # the kernels take scale * log2(e) in float32; XLA's scores are float32 too
        raise ValueError(f"scale {scale!r} overflows float32 (scale * log2(e) must stay below "
                         f"{float(np.finfo(np.float32).max):.3g}; float64 inputs allow more).")
    return Problem(shape=shape, kernel_size=k, stride=s, dilation=d, is_causal=c,
                   scale=float(scale))


def check_backend(backend: Any) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    return backend


def check_return_lse(return_lse: Any) -> bool:
    """``return_lse`` must be a Python or NumPy bool (a traced value cannot choose the
    outputs' structure)."""
    if not isinstance(return_lse, (bool, np.bool_)):
        raise ValueError(f"return_lse must be a bool, got {return_lse!r} (under jax.jit, make "
                         "it static: static_argnames).")
    return bool(return_lse)
