"""Flax layers for 1-D, 2-D and 3-D generalized neighborhood attention.

Three ways to use the operator in a Flax model:

* NNX modules :class:`NeighborhoodAttention1D`, :class:`NeighborhoodAttention2D`,
  :class:`NeighborhoodAttention3D` (one implementation, :class:`NeighborhoodAttention`,
  with the number of spatial axes fixed by the subclass).
* Linen modules with the same arguments: :class:`NeighborhoodAttention1DLinen`,
  :class:`NeighborhoodAttention2DLinen`, :class:`NeighborhoodAttention3DLinen`
  (:class:`NeighborhoodAttentionLinen` is the shared one). Same parameter names and
  shapes as the NNX modules, and the same math (both call :func:`apply_attention`),
  so weights move between the two unchanged.
* :func:`make_attention_fn`: a drop-in ``attention_fn`` for Flax's own
  ``nnx.MultiHeadAttention`` / ``linen.MultiHeadDotProductAttention``, for users who
  keep Flax's projections.

A layer maps ``x`` ``[B, *spatial, C]`` to ``[B, *spatial, out_features]``:

1. project ``x`` to queries ``[B, *spatial, H, D]`` and keys/values
   ``[B, *spatial, H_kv, D]`` (``D = qkv_features // num_heads``; ``H_kv =
   num_kv_heads`` < ``H`` is grouped-query attention);
2. optionally RMS-normalize queries and keys over ``D`` (``normalize_qk``; a learned
   scale of ``D`` entries each, shared by all heads);
3. optionally rotate queries and keys by a multi-axis rotary position embedding
   (``rope``): the head dim is split into one chunk per spatial axis, each of
   ``2 * (D // (2 * rank))`` features, rotated by the token's coordinate on that axis
   ("rotate half" pairing inside the chunk, frequencies ``rope_theta ** (-2i / chunk)``);
   features left over at the end of the head dim are not rotated;
4. :func:`jax_gna.neighborhood_attention` with the layer's ``kernel_size``, ``stride``,
   ``dilation``, ``is_causal`` and ``backend``, plus optional additional tokens that every
   query sees (below);
5. project the ``[B, *spatial, H, D]`` result to ``out_features``.

Additional (global) tokens, given at call time:

* ``context`` ``[B, S, C_ctx]``: token features (e.g. text embeddings). They are projected
  to keys and values by the layer's own ``context_key`` / ``context_value`` projections
  when the layer was built with ``context_features=C_ctx``, otherwise by the layer's
  ``key`` / ``value`` projections (then ``C_ctx`` must equal ``in_features``). Their keys
  are normalized like the other keys when ``normalize_qk`` is on, and never rotated (they
  have no position on the grid).
* ``additional_keys`` / ``additional_values`` ``[B, S, H_kv, D]``: ready keys and values,
  used exactly as given (no projection, normalization or rotation), cast to the
  compute dtype.

Both may be given; the projected context tokens come first. Every query attends to
every additional token, in the same softmax as its neighborhood (SEMANTICS.md).

Parameters and their logical axis names (NNX ``nnx.with_partitioning`` metadata,
Linen ``nn.with_logical_partitioning`` boxes; map the names to mesh axes with
``flax.linen.logical_axis_rules`` / ``nnx.logical_axis_rules`` and shard as usual):

=======================  ============================  ===================================
parameter                shape                         logical axes
=======================  ============================  ===================================
``query_kernel``         ``[in_features, H, D]``       ``("embed", "heads", "head_dim")``
``query_bias``           ``[H, D]``                    ``("heads", "head_dim")``
``key_kernel``           ``[in_features, H_kv, D]``    ``("embed", "kv_heads", "head_dim")``
``key_bias``             ``[H_kv, D]``                 ``("kv_heads", "head_dim")``
``value_kernel``         ``[in_features, H_kv, D]``    ``("embed", "kv_heads", "head_dim")``
``value_bias``           ``[H_kv, D]``                 ``("kv_heads", "head_dim")``
``out_kernel``           ``[H, D, out_features]``      ``("heads", "head_dim", "embed")``
``out_bias``             ``[out_features]``            ``("embed",)``
``query_norm_scale``     ``[D]``                       ``("head_dim",)``
``key_norm_scale``       ``[D]``                       ``("head_dim",)``
``context_key_kernel``   ``[context_features, H_kv, D]`` ``("embed", "kv_heads", "head_dim")``
``context_key_bias``     ``[H_kv, D]``                 ``("kv_heads", "head_dim")``
``context_value_kernel`` ``[context_features, H_kv, D]`` ``("embed", "kv_heads", "head_dim")``
``context_value_bias``   ``[H_kv, D]``                 ``("kv_heads", "head_dim")``
=======================  ============================  ===================================

Biases exist only with ``use_bias=True``, the norm scales only with
``normalize_qk=True``, the ``context_*`` parameters only with ``context_features``.
A typical tensor-parallel rule set is ``(("heads", "model"), ("kv_heads", "model"),
("embed", None), ("head_dim", None))`` (shard heads, replicate the rest).

NNX parameters are created with Flax's eager sharding (sharded at creation) only when a
mesh is active (``jax.set_mesh``) and logical axis rules are set
(``nnx.logical_axis_rules``); otherwise they only carry the metadata (replicated), so
the layer also builds on a single device, or under a mesh without rules (e.g. data
parallel only), with no setup. ``nnx.get_partition_spec(state)``
gives their ``PartitionSpec`` either way.

Initializers: ``kernel_init(key, (fan_in, fan_out), param_dtype)`` is called with the
flattened 2-D shape (``fan_in = in_features``, ``fan_out = H * D`` for the input
projections, ``fan_in = H * D`` for the output projection) and reshaped, as Flax's
``DenseGeneral`` does, so fan-in based initializers see the true fan-in.
``bias_init`` gets the parameter's own shape.

Dtypes follow Flax: ``param_dtype`` for storage; the computation runs in ``dtype``, or,
when it is None, in the result type of the input and the parameters.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen
from flax import nnx
from flax.core import meta as flax_meta
from flax.core import spmd as flax_spmd

from .ops import na1d, na2d, na3d
from .params import BoolOrTuple, IntOrTuple, check_backend, check_scale, check_window

__all__ = [
    "NeighborhoodAttention", "NeighborhoodAttention1D", "NeighborhoodAttention2D",
    "NeighborhoodAttention3D", "NeighborhoodAttentionLinen", "NeighborhoodAttention1DLinen",
    "NeighborhoodAttention2DLinen", "NeighborhoodAttention3DLinen", "AttentionConfig",
    "apply_attention", "rope_tables", "apply_rope", "make_attention_fn", "LOGICAL_AXES",
]

Array = jax.Array
Initializer = Callable[..., Array]
DType = Any

_OPS = {1: na1d, 2: na2d, 3: na3d}

default_kernel_init: Initializer = jax.nn.initializers.lecun_normal()
default_bias_init: Initializer = jax.nn.initializers.zeros

#: Logical axis names of every parameter (see the module docstring).
LOGICAL_AXES: dict[str, tuple[str, ...]] = {
    "query_kernel": ("embed", "heads", "head_dim"),
    "query_bias": ("heads", "head_dim"),
    "key_kernel": ("embed", "kv_heads", "head_dim"),
    "key_bias": ("kv_heads", "head_dim"),
    "value_kernel": ("embed", "kv_heads", "head_dim"),
    "value_bias": ("kv_heads", "head_dim"),
    "out_kernel": ("heads", "head_dim", "embed"),
    "out_bias": ("embed",),
    "query_norm_scale": ("head_dim",),
    "key_norm_scale": ("head_dim",),
    "context_key_kernel": ("embed", "kv_heads", "head_dim"),
    "context_key_bias": ("kv_heads", "head_dim"),
    "context_value_kernel": ("embed", "kv_heads", "head_dim"),
    "context_value_bias": ("kv_heads", "head_dim"),
}

_RMS_EPS = 1e-6


# --------------------------------------------------------------------------
# Configuration and the shared math.
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Everything static about one layer (checked once, at construction).

    Attributes:
      num_spatial_dims: 1, 2 or 3.
      num_heads, num_kv_heads: query heads ``H`` and key/value heads ``H_kv``.
      in_features, qkv_features, out_features: feature sizes; ``head_dim =
        qkv_features // num_heads``.
      kernel_size, stride, dilation, is_causal: per-axis GNA parameters.
      use_bias, normalize_qk, rope, rope_theta: see the layer classes.
      context_features: feature size of ``context`` tokens with their own projections,
        or None.
      backend: passed to :func:`jax_gna.neighborhood_attention`.
    """

    num_spatial_dims: int
    num_heads: int
    num_kv_heads: int
    in_features: int
    qkv_features: int
    out_features: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]
    use_bias: bool = True
    normalize_qk: bool = False
    rope: bool = False
    rope_theta: float = 10000.0
    context_features: int | None = None
    backend: str = "auto"

    @property
    def head_dim(self) -> int:
        return self.qkv_features // self.num_heads

    @classmethod
    def create(cls, num_spatial_dims: int, num_heads: int, in_features: int, *,
               kernel_size: IntOrTuple, qkv_features: int | None = None,
               out_features: int | None = None, num_kv_heads: int | None = None,
               stride: IntOrTuple = 1, dilation: IntOrTuple = 1,
               is_causal: BoolOrTuple = False, use_bias: bool = True,
               normalize_qk: bool = False, rope: bool = False, rope_theta: float = 10000.0,
               context_features: int | None = None, backend: str = "auto"
               ) -> "AttentionConfig":
        """Validate the layer arguments (raising ``ValueError``) and normalize them."""
        if num_spatial_dims not in (1, 2, 3):
            raise ValueError(f"num_spatial_dims must be 1, 2 or 3, got {num_spatial_dims!r}.")
        r = num_spatial_dims

        def positive(name: str, v: Any) -> int:
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}.")
            return int(v)

        num_heads = positive("num_heads", num_heads)
        in_features = positive("in_features", in_features)
        qkv_features = positive("qkv_features",
                                in_features if qkv_features is None else qkv_features)
        out_features = positive("out_features",
                                in_features if out_features is None else out_features)
        num_kv_heads = positive("num_kv_heads",
                                num_heads if num_kv_heads is None else num_kv_heads)
        if qkv_features % num_heads:
            raise ValueError(f"qkv_features={qkv_features} must be divisible by "
                             f"num_heads={num_heads}.")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of "
                             f"num_kv_heads={num_kv_heads}.")
        if context_features is not None:
            context_features = positive("context_features", context_features)
        for name, flag in (("use_bias", use_bias), ("normalize_qk", normalize_qk),
                           ("rope", rope)):
            if not isinstance(flag, (bool, np.bool_)):
                raise ValueError(f"{name} must be a bool, got {flag!r}.")
        k, s, d, c = check_window(r, kernel_size, stride, dilation, is_causal)
        head_dim = qkv_features // num_heads
        if rope and head_dim < 2 * r:
            raise ValueError(f"rope needs head_dim >= 2 * num_spatial_dims = {2 * r}, got "
                             f"head_dim={head_dim} (qkv_features={qkv_features}, "
                             f"num_heads={num_heads}).")
        if (not isinstance(rope_theta, (numbers.Real, np.floating)) or isinstance(rope_theta, bool)
                or not np.isfinite(float(rope_theta)) or float(rope_theta) <= 0):
            raise ValueError(f"rope_theta must be a positive finite number, got {rope_theta!r}.")
        check_backend(backend)
        return cls(r, num_heads, num_kv_heads, in_features, qkv_features, out_features,
                   k, s, d, c, bool(use_bias), bool(normalize_qk), bool(rope),
                   float(rope_theta), context_features, backend)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every parameter this layer has (see the module docstring)."""
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        shapes = {"query_kernel": (self.in_features, h, d),
                  "key_kernel": (self.in_features, hkv, d),
                  "value_kernel": (self.in_features, hkv, d),
                  "out_kernel": (h, d, self.out_features)}
        if self.use_bias:
            shapes.update(query_bias=(h, d), key_bias=(hkv, d), value_bias=(hkv, d),
                          out_bias=(self.out_features,))
        if self.normalize_qk:
            shapes.update(query_norm_scale=(d,), key_norm_scale=(d,))
        if self.context_features is not None:
            shapes.update(context_key_kernel=(self.context_features, hkv, d),
                          context_value_kernel=(self.context_features, hkv, d))
            if self.use_bias:
                shapes.update(context_key_bias=(hkv, d), context_value_bias=(hkv, d))
        return shapes


def _kernel_fan_in_axes(name: str) -> int:
    """How many leading axes of a kernel are its fan-in (2 for the output projection)."""
    return 2 if name == "out_kernel" else 1


def _init_param(name: str, shape: tuple[int, ...], kernel_init: Initializer,
                bias_init: Initializer) -> Initializer:
    """The initializer of one parameter, as ``init(key, shape, dtype)``."""
    if name.endswith("_kernel"):
        n_in = _kernel_fan_in_axes(name)

        def init(key: Array, shape: Sequence[int], dtype: DType = jnp.float32) -> Array:
            flat = (math.prod(shape[:n_in]), math.prod(shape[n_in:]))
            return jnp.reshape(kernel_init(key, flat, dtype), shape)
        return init
    if name.endswith("_norm_scale"):
        return jax.nn.initializers.ones
    return bias_init


def rope_tables(spatial: Sequence[int], head_dim: int, theta: float = 10000.0,
                dtype: Any = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Cosine and sine tables of the multi-axis rotary embedding, NumPy in ``dtype``
    (computed in float64).

    Returns ``(cos, sin)``, each ``[*spatial, rank * chunk // 2]`` where ``chunk = 2 *
    (head_dim // (2 * rank))`` features of the head dim belong to each axis.
    """
    rank = len(spatial)
    chunk = 2 * (head_dim // (2 * rank))
    inv_freq = theta ** (-np.arange(0, chunk, 2, dtype=np.float64) / chunk)  # [chunk/2]
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in spatial], indexing="ij")
    angles = np.concatenate([g[..., None] * inv_freq for g in grids], axis=-1)
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def apply_rope(x: Array, theta: float = 10000.0) -> Array:
    """Rotate ``x`` ``[B, *spatial, H, D]`` by the multi-axis rotary embedding.

    Axis ``a`` owns features ``[a * chunk, (a + 1) * chunk)`` of the head dim, ``chunk =
    2 * (D // (2 * rank))``; inside a chunk feature ``i`` pairs with ``i + chunk // 2``
    ("rotate half"). Features from ``rank * chunk`` on are returned unchanged. Computed
    in float32, or float64 for float64 inputs.
    """
    spatial = x.shape[1:-2]
    rank, d = len(spatial), x.shape[-1]
    chunk = 2 * (d // (2 * rank))
    half = chunk // 2
    acc = jnp.promote_types(x.dtype, jnp.float32)
    cos, sin = rope_tables(spatial, d, theta, acc)
    cos = jnp.asarray(cos)[..., None, :]  # broadcast over heads
    sin = jnp.asarray(sin)[..., None, :]
    xf = x.astype(acc)
    parts = []
    for a in range(rank):
        x1 = xf[..., a * chunk:a * chunk + half]
        x2 = xf[..., a * chunk + half:(a + 1) * chunk]
        c, s = cos[..., a * half:(a + 1) * half], sin[..., a * half:(a + 1) * half]
        parts += [x1 * c - x2 * s, x2 * c + x1 * s]
    parts.append(xf[..., rank * chunk:])
    return jnp.concatenate(parts, axis=-1).astype(x.dtype)


def _rms_norm(x: Array, scale: Array) -> Array:
    acc = jnp.promote_types(x.dtype, jnp.float32)  # float64 stays float64
    xf = x.astype(acc)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + _RMS_EPS)
    return (y * scale.astype(acc)).astype(x.dtype)


def _project(x: Array, p: Mapping[str, Array], name: str, dtype: DType) -> Array:
    y = jnp.einsum("...c,chd->...hd", x, p[f"{name}_kernel"].astype(dtype))
    if f"{name}_bias" in p:
        y = y + p[f"{name}_bias"].astype(dtype)
    return y


def apply_attention(cfg: AttentionConfig, params: Mapping[str, Array], x: Array,
                    context: Array | None = None, *, additional_keys: Array | None = None,
                    additional_values: Array | None = None, dtype: DType | None = None,
                    out_sharding: Any = None) -> Array:
    """The layer's forward pass as a pure function of its parameters.

    Both the NNX and the Linen modules call this. ``params`` maps the names of the
    module docstring to arrays. ``x`` is ``[*batch, *spatial, in_features]`` (one or
    more leading batch axes); ``context`` ``[*batch, S, C_ctx]``, ``additional_keys`` /
    ``additional_values`` ``[*batch, S, H_kv, D]``. Returns ``[*batch, *spatial,
    out_features]`` in the compute dtype. ``out_sharding`` (a ``PartitionSpec`` or
    ``NamedSharding`` of that result) goes to the output projection, as Flax's
    ``MultiHeadAttention`` takes it: on a mesh with ``Explicit`` axes that splits the
    heads, JAX needs it to place the sum over heads.
    """
    r = cfg.num_spatial_dims
    if x.ndim < r + 2:
        raise ValueError(f"a {r}-D neighborhood attention layer expects inputs "
                         f"[batch, {r} spatial axes, features], got shape {x.shape}.")
    if x.shape[-1] != cfg.in_features:
        raise ValueError(f"the input has {x.shape[-1]} features (shape {x.shape}), the layer "
                         f"expects in_features={cfg.in_features}.")
    batch, spatial = x.shape[:-(r + 1)], x.shape[-(r + 1):-1]
    nb = math.prod(batch)
    if dtype is None:
        dtype = jnp.result_type(x.dtype, *[p.dtype for p in params.values()])
    x = x.reshape((nb, *spatial, cfg.in_features)).astype(dtype)

    q = _project(x, params, "query", dtype)
    k = _project(x, params, "key", dtype)
    v = _project(x, params, "value", dtype)
    if cfg.normalize_qk:
        q = _rms_norm(q, params["query_norm_scale"])
        k = _rms_norm(k, params["key_norm_scale"])
    if cfg.rope:
        q = apply_rope(q, cfg.rope_theta)
        k = apply_rope(k, cfg.rope_theta)

    extra_k, extra_v = [], []
    if context is not None:
        if context.ndim != len(batch) + 2 or context.shape[:len(batch)] != batch:
            raise ValueError(f"context must have shape [{', '.join(map(str, batch))}, S, "
                             f"C_ctx] (the batch axes of the input), got {context.shape}.")
        if context.shape[-2] == 0:
            raise ValueError(f"context must hold at least one token, got shape {context.shape} "
                             "(pass context=None for none).")
        c_in = cfg.context_features if cfg.context_features is not None else cfg.in_features
        if context.shape[-1] != c_in:
            raise ValueError(
                f"context has {context.shape[-1]} features (shape {context.shape}); this layer "
                f"projects context tokens with "
                + (f"context_features={c_in}" if cfg.context_features is not None else
                   f"its key/value projections (in_features={c_in}); build it with "
                   "context_features=... for context of another width") + ".")
        ctx = context.reshape((nb,) + context.shape[len(batch):]).astype(dtype)
        prefix = "context_" if cfg.context_features is not None else ""
        ck = _project(ctx, params, prefix + "key", dtype)
        cv = _project(ctx, params, prefix + "value", dtype)
        if cfg.normalize_qk:
            ck = _rms_norm(ck, params["key_norm_scale"])
        extra_k.append(ck)
        extra_v.append(cv)
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("additional_keys and additional_values go together; got only one.")
    if additional_keys is not None:
        for name, t in (("additional_keys", additional_keys),
                        ("additional_values", additional_values)):
            want = (*batch, None, cfg.num_kv_heads, cfg.head_dim)
            if t.ndim != len(want) or any(w is not None and w != n for w, n in zip(want, t.shape)):
                raise ValueError(f"{name} must have shape [{', '.join(map(str, batch))}, S, "
                                 f"{cfg.num_kv_heads}, {cfg.head_dim}], got {t.shape}.")
        extra_k.append(additional_keys.reshape((nb,) + additional_keys.shape[len(batch):])
                       .astype(dtype))
        extra_v.append(additional_values.reshape((nb,) + additional_values.shape[len(batch):])
                       .astype(dtype))
    ak = jnp.concatenate(extra_k, axis=1) if extra_k else None
    av = jnp.concatenate(extra_v, axis=1) if extra_v else None

    o = _OPS[r](q, k, v, cfg.kernel_size, cfg.stride, cfg.dilation, cfg.is_causal,
                additional_keys=ak, additional_values=av, backend=cfg.backend)
    o = o.reshape((*batch, *spatial) + o.shape[-2:])
    placed = {} if out_sharding is None else {"out_sharding": out_sharding}  # (newer JAX only)
    y = jnp.einsum("...hd,hdo->...o", o, params["out_kernel"].astype(dtype), **placed)
    if "out_bias" in params:
        y = y + params["out_bias"].astype(dtype)
    return y


# --------------------------------------------------------------------------
# Flax NNX.
# --------------------------------------------------------------------------

class NeighborhoodAttention(nnx.Module):
    """Multi-head generalized neighborhood attention over ``num_spatial_dims`` axes (NNX).

    Use :class:`NeighborhoodAttention1D` / ``2D`` / ``3D``, or this class with
    ``num_spatial_dims``. See the module docstring for the computation, the parameters
    and their logical sharding axes.

    Args:
      num_heads: query heads ``H``.
      in_features: features ``C`` of the input.
      kernel_size, stride, dilation: int or one int per spatial axis (SEMANTICS.md).
      is_causal: bool or one bool per spatial axis.
      qkv_features: total query/key/value features, ``H * head_dim``; default
        ``in_features``.
      out_features: output features; default ``in_features``.
      num_kv_heads: key/value heads (grouped-query attention); default ``num_heads``.
      use_bias: biases in the projections.
      normalize_qk: RMS-normalize queries and keys over the head dim (learned scale).
      rope: multi-axis rotary position embedding on queries and keys.
      rope_theta: the rotary base.
      context_features: give the layer its own key/value projections for ``context``
        tokens of this width.
      dtype: computation dtype (None: from the input and the parameters).
      param_dtype: parameter dtype.
      kernel_init, bias_init: initializers (see the module docstring).
      backend: ``"auto"``, ``"xla"`` or ``"cuda"``.
      num_spatial_dims: 1, 2 or 3; fixed by the 1D/2D/3D subclasses.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    NUM_SPATIAL_DIMS: ClassVar[int | None] = None

    def __init__(self, num_heads: int, in_features: int, *, kernel_size: IntOrTuple,
                 stride: IntOrTuple = 1, dilation: IntOrTuple = 1,
                 is_causal: BoolOrTuple = False, qkv_features: int | None = None,
                 out_features: int | None = None, num_kv_heads: int | None = None,
                 use_bias: bool = True, normalize_qk: bool = False, rope: bool = False,
                 rope_theta: float = 10000.0, context_features: int | None = None,
                 dtype: DType | None = None, param_dtype: DType = jnp.float32,
                 kernel_init: Initializer = default_kernel_init,
                 bias_init: Initializer = default_bias_init, backend: str = "auto",
                 num_spatial_dims: int | None = None, rngs: nnx.Rngs):
        fixed = type(self).NUM_SPATIAL_DIMS
        if fixed is not None and num_spatial_dims not in (None, fixed):
            raise ValueError(f"{type(self).__name__} has {fixed} spatial axes, got "
                             f"num_spatial_dims={num_spatial_dims}.")
        rank = fixed if fixed is not None else num_spatial_dims
        if rank is None:
            raise ValueError("NeighborhoodAttention needs num_spatial_dims (1, 2 or 3); or use "
                             "NeighborhoodAttention1D/2D/3D.")
        self.config = AttentionConfig.create(
            rank, num_heads, in_features, kernel_size=kernel_size, qkv_features=qkv_features,
            out_features=out_features, num_kv_heads=num_kv_heads, stride=stride,
            dilation=dilation, is_causal=is_causal, use_bias=use_bias,
            normalize_qk=normalize_qk, rope=rope, rope_theta=rope_theta,
            context_features=context_features, backend=backend)
        self.dtype = dtype
        self.param_dtype = param_dtype
        # Shard at creation (Flax's eager sharding) only under a mesh with logical axis
        # rules (without rules the logical names would be read as mesh axes); otherwise
        # keep just the metadata so the layer builds with no setup.
        rules = flax_spmd.get_logical_axis_rules()
        eager = None if flax_meta.global_mesh_defined() and rules else False
        for name, shape in self.config.param_shapes().items():
            init = nnx.with_partitioning(_init_param(name, shape, kernel_init, bias_init),
                                         LOGICAL_AXES[name])
            setattr(self, name, nnx.Param(init(rngs.params(), shape, param_dtype),
                                          eager_sharding=eager))

    @property
    def num_spatial_dims(self) -> int:
        return self.config.num_spatial_dims

    def __call__(self, x: Array, context: Array | None = None, *,
                 additional_keys: Array | None = None,
                 additional_values: Array | None = None, out_sharding: Any = None) -> Array:
        """Attend: ``x`` ``[B, *spatial, in_features]`` -> ``[B, *spatial, out_features]``.

        Args:
          x: the input grid; more than one leading batch axis is allowed.
          context: optional ``[B, S, C_ctx]`` tokens every query also attends to,
            projected to keys/values (module docstring).
          additional_keys, additional_values: optional ready ``[B, S, H_kv, D]`` keys and
            values every query also attends to, used as given.
          out_sharding: the output's sharding on a mesh with ``Explicit`` axes (e.g.
            ``P("data")``), needed there where the heads are sharded
            (:func:`apply_attention`); as Flax's ``MultiHeadAttention`` takes it.
        """
        params = {name: getattr(self, name)[...] for name in self.config.param_shapes()}
        return apply_attention(self.config, params, x, context,
                               additional_keys=additional_keys,
                               additional_values=additional_values, dtype=self.dtype,
                               out_sharding=out_sharding)


class NeighborhoodAttention1D(NeighborhoodAttention):
    """1-D neighborhood attention (NNX): ``[B, L, C]`` -> ``[B, L, out_features]``.

    Arguments as :class:`NeighborhoodAttention`.
    """

    NUM_SPATIAL_DIMS = 1


class NeighborhoodAttention2D(NeighborhoodAttention):
    """2-D neighborhood attention (NNX): ``[B, X, Y, C]`` -> ``[B, X, Y, out_features]``.

    Arguments as :class:`NeighborhoodAttention`.
    """

    NUM_SPATIAL_DIMS = 2


class NeighborhoodAttention3D(NeighborhoodAttention):
    """3-D neighborhood attention (NNX): ``[B, X, Y, Z, C]`` -> ``[B, X, Y, Z, out_features]``.

    Arguments as :class:`NeighborhoodAttention`.
    """

    NUM_SPATIAL_DIMS = 3


# --------------------------------------------------------------------------
# Flax Linen.
# --------------------------------------------------------------------------

class NeighborhoodAttentionLinen(linen.Module):
    """Multi-head generalized neighborhood attention (Linen).

    Same arguments, parameter names, shapes, logical axes and math as
    :class:`NeighborhoodAttention` (without ``rngs``: Linen takes keys at ``init``).
    ``in_features`` may be left None and is then taken from the input. Parameters
    are ``nn.with_logical_partitioning`` boxes (``nn.get_partition_spec`` /
    ``nn.logical_to_mesh_sharding`` read them); ``module.apply`` unboxes them.
    """

    num_heads: int
    kernel_size: IntOrTuple
    in_features: int | None = None
    stride: IntOrTuple = 1
    dilation: IntOrTuple = 1
    is_causal: BoolOrTuple = False
    qkv_features: int | None = None
    out_features: int | None = None
    num_kv_heads: int | None = None
    use_bias: bool = True
    normalize_qk: bool = False
    rope: bool = False
    rope_theta: float = 10000.0
    context_features: int | None = None
    dtype: DType | None = None
    param_dtype: DType = jnp.float32
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = default_bias_init
    backend: str = "auto"
    num_spatial_dims: int | None = None

    NUM_SPATIAL_DIMS: ClassVar[int | None] = None

    def config(self, in_features: int) -> AttentionConfig:
        """The validated :class:`AttentionConfig` for inputs of ``in_features``."""
        fixed = type(self).NUM_SPATIAL_DIMS
        if fixed is not None and self.num_spatial_dims != fixed:
            raise ValueError(f"{type(self).__name__} has {fixed} spatial axes, got "
                             f"num_spatial_dims={self.num_spatial_dims}.")
        if self.num_spatial_dims is None:
            raise ValueError("NeighborhoodAttentionLinen needs num_spatial_dims (1, 2 or 3); "
                             "or use NeighborhoodAttention1DLinen/2DLinen/3DLinen.")
        if self.in_features is not None and self.in_features != in_features:
            raise ValueError(f"the input has {in_features} features, the layer expects "
                             f"in_features={self.in_features}.")
        return AttentionConfig.create(
            self.num_spatial_dims, self.num_heads, in_features, kernel_size=self.kernel_size,
            qkv_features=self.qkv_features, out_features=self.out_features,
            num_kv_heads=self.num_kv_heads, stride=self.stride, dilation=self.dilation,
            is_causal=self.is_causal, use_bias=self.use_bias, normalize_qk=self.normalize_qk,
            rope=self.rope, rope_theta=self.rope_theta,
            context_features=self.context_features, backend=self.backend)

    @linen.compact
    def __call__(self, x: Array, context: Array | None = None, *,
                 additional_keys: Array | None = None,
                 additional_values: Array | None = None, out_sharding: Any = None) -> Array:
        """Attend: ``x`` ``[B, *spatial, C]`` -> ``[B, *spatial, out_features]``.

        Same arguments as :meth:`NeighborhoodAttention.__call__`.
        """
        cfg = self.config(x.shape[-1])
        params = {}
        for name, shape in cfg.param_shapes().items():
            init = linen.with_logical_partitioning(
                _init_param(name, shape, self.kernel_init, self.bias_init), LOGICAL_AXES[name])
            params[name] = self.param(name, init, shape, self.param_dtype)
        return apply_attention(cfg, params, x, context, additional_keys=additional_keys,
                               additional_values=additional_values, dtype=self.dtype,
                               out_sharding=out_sharding)


class NeighborhoodAttention1DLinen(NeighborhoodAttentionLinen):
    """1-D neighborhood attention (Linen); arguments as :class:`NeighborhoodAttentionLinen`."""

    NUM_SPATIAL_DIMS: ClassVar[int | None] = 1
    num_spatial_dims: int | None = 1


class NeighborhoodAttention2DLinen(NeighborhoodAttentionLinen):
    """2-D neighborhood attention (Linen); arguments as :class:`NeighborhoodAttentionLinen`."""

    NUM_SPATIAL_DIMS: ClassVar[int | None] = 2
    num_spatial_dims: int | None = 2


class NeighborhoodAttention3DLinen(NeighborhoodAttentionLinen):
    """3-D neighborhood attention (Linen); arguments as :class:`NeighborhoodAttentionLinen`."""

    NUM_SPATIAL_DIMS: ClassVar[int | None] = 3
    num_spatial_dims: int | None = 3


# --------------------------------------------------------------------------
# Drop-in attention_fn for Flax's own multi-head attention.
# --------------------------------------------------------------------------

def make_attention_fn(kernel_size: IntOrTuple, stride: IntOrTuple = 1,
                      dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False, *,
                      num_spatial_dims: int | None = None, scale: float | None = None,
                      backend: str = "auto") -> Callable[..., Array]:
    """An ``attention_fn`` for ``nnx.MultiHeadAttention`` / ``linen.MultiHeadDotProductAttention``.

    Flax's multi-head attention projects only the last axis, so for an input ``[B, X, Y,
    C]`` it calls ``attention_fn(query, key, value, **kwargs)`` with ``query``
    ``[B, X, Y, H, D]``: exactly the layout of :func:`jax_gna.neighborhood_attention`. The
    returned function runs neighborhood attention over the last ``num_spatial_dims`` axes
    before the heads and treats all axes in front of them as batch axes. When
    ``num_spatial_dims`` is None it is ``len(kernel_size)`` if that is a tuple, else
    ``query.ndim - 3`` (a single batch axis).

    The keyword arguments of Flax's ``dot_product_attention`` are accepted, with its
    defaults (``deterministic=False``); those that would change the result without a
    neighborhood-attention equivalent are refused rather than silently dropped: a
    non-None ``mask`` or ``bias`` raises ``ValueError`` (the neighborhood is the mask),
    and so do attention dropout (``dropout_rate > 0`` without ``deterministic=True``) and
    custom einsums (``einsum_dot_general``, ``qk_attn_weights_einsum``,
    ``attn_weights_value_einsum``). ``dtype`` casts query/key/value before the op (through
    ``promote_dtype`` where one is given, as NNX's function does);
    ``precision``, ``broadcast_dropout``, ``dropout_rng``, ``force_fp32_for_softmax`` (the
    softmax is float32 or wider anyway) and ``module`` (attention weights are never
    materialized, so ``sow_weights`` records nothing) are ignored. Other keywords raise
    ``TypeError``. ``is_causal=True`` from the caller (NNX passes it) makes every axis
    causal; otherwise the ``is_causal`` given here applies.

    Args:
      kernel_size, stride, dilation, is_causal: GNA parameters (SEMANTICS.md).
      num_spatial_dims: number of spatial axes (1, 2 or 3), see above.
      scale: score scale; default ``D ** -0.5`` (what Flax's own attention uses).
      backend: ``"auto"``, ``"xla"`` or ``"cuda"``.

    Returns:
      ``attention_fn(query, key, value, bias=None, mask=None, ...) -> out``
      with ``out`` of the shape of ``query`` (value's head dim).
    """
    check_backend(backend)
    if num_spatial_dims is not None and num_spatial_dims not in (1, 2, 3):
        raise ValueError(f"num_spatial_dims must be 1, 2 or 3, got {num_spatial_dims!r}.")
    if num_spatial_dims is None and isinstance(kernel_size, (tuple, list)):
        num_spatial_dims = len(kernel_size)
    # the window checked now where its rank is known (scalars are the same on every axis)
    known = num_spatial_dims
    if known is None and not any(isinstance(x, (tuple, list))
                                 for x in (stride, dilation, is_causal)):
        known = 1
    if known in (1, 2, 3):  # (other ranks are refused when it is called)
        check_window(known, kernel_size, stride, dilation, is_causal)
    check_scale(scale)
    configured_causal = is_causal

    def attention_fn(query: Array, key: Array, value: Array, bias: Array | None = None,
                     mask: Array | None = None, broadcast_dropout: bool = True,
                     dropout_rng: Array | None = None, dropout_rate: float = 0.0,
                     deterministic: bool = False, dtype: DType | None = None,
                     precision: Any = None, module: Any = None,
                     force_fp32_for_softmax: bool = False,
                     einsum_dot_general: Callable[..., Array] | None = None,
                     qk_attn_weights_einsum: Callable[..., Array] | None = None,
                     attn_weights_value_einsum: Callable[..., Array] | None = None,
                     promote_dtype: Callable[..., Any] | None = None,
                     is_causal: bool = False) -> Array:
        """Neighborhood attention with Flax's ``attention_fn`` calling convention."""
        custom = [name for name, f in (("einsum_dot_general", einsum_dot_general),
                                       ("qk_attn_weights_einsum", qk_attn_weights_einsum),
                                       ("attn_weights_value_einsum", attn_weights_value_einsum))
                  if f is not None]
        if custom:
            raise ValueError(f"neighborhood attention runs its own kernels; {', '.join(custom)} "
                             "cannot replace its matrix products.")
        if mask is not None:
            raise ValueError("neighborhood attention defines its own mask; a mask was passed "
                             "to the attention_fn (use the layer without mask= / decode).")
        if bias is not None:
            raise ValueError("neighborhood attention does not take an additive attention bias.")
        if dropout_rate > 0.0 and not deterministic:
            raise ValueError("attention-weight dropout is not supported by neighborhood "
                             f"attention (dropout_rate={dropout_rate}); set dropout_rate=0 or "
                             "deterministic=True (the default is False, as in Flax's "
                             "dot_product_attention).")
        r = num_spatial_dims if num_spatial_dims is not None else query.ndim - 3
        if r not in (1, 2, 3):
            raise ValueError(f"neighborhood attention takes 1, 2 or 3 spatial axes, got {r} "
                             f"(query shape {query.shape}, kernel_size {kernel_size!r}); pass "
                             "num_spatial_dims, or a query [batch, *spatial, heads, head_dim].")
        if query.ndim < r + 3:
            raise ValueError(f"query must be [batch..., {r} spatial axes, heads, head_dim], "
                             f"got shape {query.shape}.")
        if promote_dtype is not None:  # NNX's hook: (arrays, dtype=) -> arrays
            query, key, value = promote_dtype((query, key, value), dtype=dtype)
        elif dtype is not None:
            query, key, value = (t.astype(dtype) for t in (query, key, value))
        lead = query.shape[:-(r + 2)]
        nb = math.prod(lead)

        def flat(t: Array) -> Array:
            if t.shape[:len(lead)] != lead:
                raise ValueError(f"query, key and value must share their leading axes, got "
                                 f"{query.shape}, {key.shape}, {value.shape}.")
            return t.reshape((nb,) + t.shape[len(lead):])

        causal = True if is_causal is True else configured_causal
        out = _OPS[r](flat(query), flat(key), flat(value), kernel_size, stride, dilation,
                      causal, scale, backend=backend)
        return out.reshape(lead + out.shape[1:])

    return attention_fn
