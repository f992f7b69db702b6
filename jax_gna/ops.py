"""The public functional op: validate once, build one :class:`Problem`, dispatch once."""

from __future__ import annotations

import logging
from typing import Any, Callable

import jax
import numpy as np

from . import sharding, xla
from .params import (BoolOrTuple, IntOrTuple, Problem, check_backend, check_return_lse,
                     make_problem)

log = logging.getLogger("jax_gna")

Impl = Callable[[jax.Array, jax.Array, jax.Array, Problem], tuple[jax.Array, jax.Array]]


def _cuda_module():
    """The CUDA backend module, or None where it cannot even be imported."""
    try:
        from . import cuda
    except ImportError:  # pragma: no cover - the module always imports on a sane install
        return None
    return cuda


def _cuda_status(problem: Problem, query: Any, key: Any, value: Any) -> str | None:
    """None if the CUDA kernels can run this call here, else why not."""
    cuda = _cuda_module()
    if cuda is None:
        return "the CUDA backend module is missing"
    if not cuda.available():
        return cuda.unavailable_reason()
    return cuda.unsupported_reason(problem, query.shape, key.shape, value.shape, query.dtype)


def select(backend: str, problem: Problem, query: Any, key: Any, value: Any
           ) -> tuple[str, str, Impl]:
    """Pick the implementation: ``(name, why, impl)``.

    ``"auto"`` uses the CUDA kernels when they are built, a CUDA GPU is visible and
    they cover this configuration; the choice between them and ``xla`` is then made
    per lowering platform (``lax.platform_dependent``), so the same jitted function
    also runs on the CPU.
    """
    check_backend(backend)
    if backend == "xla":
        return "xla", "backend='xla' was requested", xla.attention
    return _select_with(backend, _cuda_status(problem, query, key, value))


def _select_with(backend: str, reason: str | None) -> tuple[str, str, Impl]:
    """:func:`select` for ``"cuda"`` or ``"auto"``, given :func:`_cuda_status`'s answer."""
    if backend == "cuda":
        if reason is not None:
            raise ValueError(f"backend='cuda' cannot run this call: {reason}.")
        return "cuda", "backend='cuda' was requested", _cuda_module().attention
    if reason is not None:
        return "xla", f"the CUDA kernels do not apply ({reason})", xla.attention
    return "cuda", "CUDA kernels on NVIDIA GPUs, xla elsewhere", _auto_attention


def _auto_attention(q: jax.Array, k: jax.Array, v: jax.Array, problem: Problem
                    ) -> tuple[jax.Array, jax.Array]:
    """The CUDA kernels where the call is lowered for CUDA, ``xla`` elsewhere."""
    cuda = _cuda_module()
    return jax.lax.platform_dependent(
        q, k, v, cuda=lambda *a: cuda.attention(*a, problem),
        default=lambda *a: xla.attention(*a, problem))


if _cuda_module() is not None:  # its backward, so that sharded calls recompute nothing
    _auto_attention.backward = sharding.platform_backward(_cuda_module().attention,
                                                          xla.attention)
    # the same kernel calls for every shard of a sharded call (sharding.local_attention)
    (_auto_attention.by_device, _auto_attention.backward_by_device,
     _auto_attention.by_device_split) = sharding.platform_by_device(_cuda_module().attention,
                                                                    xla.attention)

    def _auto_fold_shards(*args):
        """Fold a sharded dilated call as the kernels would where the process sees a
        CUDA GPU, as ``xla`` would where it sees none (decided while tracing)."""
        cuda = _cuda_module()
        return (cuda.attention if cuda._compute_capability() else xla.attention).fold_shards(*args)

    _auto_attention.fold_shards = _auto_fold_shards

    def _auto_dense(q, k, v, scale):
        """The additional tokens: the kernels on CUDA, ``xla`` elsewhere."""
        return jax.lax.platform_dependent(
            q, k, v, cuda=lambda *a: _cuda_module().dense_attention(*a, scale),
            default=lambda *a: xla.dense_attention(*a, scale))

    def _auto_dense_backward(q, k, v, out, lse, d_out, d_lse, scale):
        """Its backward: from the saved ``out``/``lse`` on CUDA (no forward recomputed),
        by recomputing the forward elsewhere (``xla.dense_backward``)."""
        return jax.lax.platform_dependent(
            q, k, v, out, lse, d_out, d_lse,
            cuda=lambda *a: _cuda_module().dense_backward(*a, scale),
            default=lambda *a: xla.dense_backward(*a, scale))

    _auto_dense.backward = _auto_dense_backward
    _auto_attention.dense = _auto_dense

    def _auto_with_tokens(q, k, v, xk, xv, problem):
        """The call with its additional tokens: the kernels on CUDA (one Hopper forward
        where ``cuda.tokens_blocker`` allows), ``xla`` and a merge elsewhere."""
        def default(q, k, v, xk, xv):
            out, lse = xla.attention(q, k, v, problem)
            return xla.merge(out, lse, *xla.dense_attention(q, xk, xv, problem.scale))

        return jax.lax.platform_dependent(
            q, k, v, xk, xv, default=default,
            cuda=lambda *a: _cuda_module().attention_with_tokens(*a, problem))

    _auto_attention.with_tokens = _auto_with_tokens

    def _auto_tokens_backward(q, k, v, out, lse, d_out, d_lse, scale):
        """The tokens' part of a backward from the merged ``out``/``lse``: the kernels'
        on CUDA, ``xla.dense_backward_saved`` elsewhere."""
        return jax.lax.platform_dependent(
            q, k, v, out, lse, d_out, d_lse,
            cuda=lambda *a: _cuda_module().tokens_backward(*a, scale),
            default=lambda *a: xla.dense_backward_saved(*a, scale))

    _auto_attention.tokens_backward = _auto_tokens_backward


def _compute(query, key, value, additional_keys, additional_values, impl: Impl,
             problem: Problem, partitioning: bool = True) -> tuple[jax.Array, jax.Array]:
    # ``partitioning`` (sharding.set_auto_partitioning, read while tracing) is only a key
    # of the compiled cache below, so that changing it takes effect on eager calls too.
    if additional_keys is not None:
        return sharding.attention_with_tokens(impl, query, key, value, additional_keys,
                                              additional_values, problem)
    return sharding.attention(impl, query, key, value, problem)  # impl, partitioned


# Eager calls run compiled (once per shape and configuration), not op by op.
_compute_jit = jax.jit(_compute, static_argnames=("impl", "problem", "partitioning"))


def neighborhood_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                           kernel_size: IntOrTuple, stride: IntOrTuple = 1,
                           dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False,
                           scale: float | None = None, *, additional_keys: jax.Array | None = None,
                           additional_values: jax.Array | None = None, return_lse: bool = False,
                           backend: str = "auto"):
    """Generalized neighborhood attention over 1, 2 or 3 spatial axes.

    Each query attends to the keys in its window on every spatial axis (SEMANTICS.md):
    ``kernel_size`` keys per axis, shifted inward at borders, with per-axis ``stride``
    (queries in a stride group share their leader's window), ``dilation`` and causal
    masking. Together these cover sliding-window, strided and blocked attention.

    Args:
      query: ``[B, *spatial, H, D]``; ``len(spatial)`` is 1, 2 or 3.
      key: ``[B, *spatial, H_kv, D]`` with ``H % H_kv == 0`` (grouped-query attention).
      value: ``[B, *spatial, H_kv, D_v]``.
      kernel_size, stride, dilation: an int (every axis) or one int per spatial axis.
      is_causal: a bool or one bool per spatial axis.
      scale: multiplies ``q . k``; default ``D ** -0.5``.
      additional_keys, additional_values: optional ``[B, S_extra, H_kv, D(_v)]`` extra
        tokens every query attends to (never causally masked), in the same softmax.
      return_lse: also return the log-sum-exp of the scaled scores.
      backend: ``"auto"``, ``"xla"`` (portable pure JAX) or ``"cuda"`` (fused kernels).

    Returns:
      ``out`` ``[B, *spatial, H, D_v]`` in the input dtype, or ``(out, lse)`` with
      ``lse`` ``[B, *spatial, H]`` float32 (float64 for float64 inputs).

    Raises:
      ValueError: for any input SEMANTICS.md rejects, before any computation, or for
        ``backend="cuda"`` where the kernels cannot run.
    """
    return _attention(query, key, value, kernel_size, stride, dilation, is_causal, scale,
                      additional_keys, additional_values, return_lse, backend, None)


def _attention(query, key, value, kernel_size, stride, dilation, is_causal, scale,
               additional_keys, additional_values, return_lse, backend, rank: int | None):
    """:func:`neighborhood_attention`, with ``rank`` (1, 2 or 3: ``na1d`` ... ``na3d``, which
    refuse other ranks; None: any) checked by ``make_problem``."""
    check_return_lse(return_lse)
    problem = make_problem(query, key, value, kernel_size, stride, dilation, is_causal, scale,
                           additional_keys, additional_values, rank=rank)
    name, why, impl = select(backend, problem, query, key, value)
    log.debug("jax_gna: %s backend (%s) for %s", name, why, problem)
    args = (query, key, value, additional_keys, additional_values)
    traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(args))
    out, lse = (_compute if traced else _compute_jit)(
        *args, impl=impl, problem=problem, partitioning=sharding.auto_partitioning())
    return (out, lse) if return_lse else out


def _fixed_rank(rank: int):
    def op(query: jax.Array, key: jax.Array, value: jax.Array, kernel_size: IntOrTuple,
           stride: IntOrTuple = 1, dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False,
           scale: float | None = None, *, additional_keys: jax.Array | None = None,
           additional_values: jax.Array | None = None, return_lse: bool = False,
           backend: str = "auto"):
        return _attention(query, key, value, kernel_size, stride, dilation, is_causal, scale,
                          additional_keys, additional_values, return_lse, backend, rank)

    op.__name__ = op.__qualname__ = f"na{rank}d"
    op.__doc__ = (f"{rank}-D generalized neighborhood attention: inputs "
                  f"``[B, {', '.join('XYZ'[:rank] if rank > 1 else 'L')}, H, D]``.\n\n"
                  "Same arguments and results as :func:`neighborhood_attention`; raises "
                  f"``ValueError`` unless the inputs have exactly {rank} spatial axes.")
    return op


na1d = _fixed_rank(1)
na2d = _fixed_rank(2)
na3d = _fixed_rank(3)


def explain(query: Any, key: Any, value: Any, kernel_size: IntOrTuple, stride: IntOrTuple = 1,
            dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False, scale: float | None = None,
            *, additional_keys: Any = None, additional_values: Any = None,
            return_lse: bool = False, backend: str = "auto") -> str:
    """Say which backend a call with these arguments would use, and why (for ``cuda``:
    which kernels, and where the additional tokens run).

    Takes the same arguments as :func:`neighborhood_attention` (arrays or
    ``jax.ShapeDtypeStruct``; ``return_lse`` changes nothing here); runs nothing. Raises
    ``ValueError`` for inputs the op rejects; for ``backend="cuda"`` where the kernels
    cannot run it says why (``"cuda: cannot run this call (...): <reason>"``, the reason
    the op's ValueError gives).
    """
    problem = make_problem(query, key, value, kernel_size, stride, dilation, is_causal, scale,
                           additional_keys, additional_values)
    check_return_lse(return_lse)
    check_backend(backend)
    if backend == "xla":
        name, why, _ = select(backend, problem, query, key, value)
    else:
        reason = _cuda_status(problem, query, key, value)
        if backend == "cuda" and reason is not None:
            return f"cuda: cannot run this call (neighborhood_attention raises ValueError): {reason}"
        name, why, _ = _select_with(backend, reason)
    if name == "cuda":
        cuda = _cuda_module()
        why += "; " + cuda.kernel_path(problem, query.shape, value.shape, query.dtype)
        if additional_keys is not None:
            shapes = (query.shape, additional_keys.shape, additional_values.shape, query.dtype)
            fused = cuda.tokens_blocker(problem, *shapes)
            blocker = cuda.dense_blocker(*shapes)
            if fused is None:
                where = ("the kernels" if blocker is None else
                         f"XLA ({blocker}; xla.dense_backward_saved)")
                why += ("; additional tokens: extra key tiles of the Hopper forward (one kernel; "
                        "a call sharded along a spatial axis runs them apart on each shard), "
                        "their backward on " + where + " from the merged out and lse")
            elif blocker is None:
                why += ("; additional tokens: on the kernels (the queries in blocks of "
                        f"{additional_keys.shape[1]}, cuda.dense_attention; not as key tiles "
                        f"of the forward: {fused})")
            else:
                why += f"; additional tokens: XLA's dense attention ({blocker})"
    return f"{name}: {why}"
