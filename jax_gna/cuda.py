"""The ``cuda`` backend: fused GNA kernels (csrc/) called through XLA's FFI.

Contract (the public op dispatches here):

- :func:`available` / :func:`unavailable_reason`: is the compiled library importable
  and a CUDA GPU visible.
- :func:`unsupported_reason`: ``None`` when the kernels cover a configuration,
  otherwise a short reason (the op then falls back to ``xla`` or raises).
- :func:`attention`: ``(out, lse)`` for one :class:`~jax_gna.params.Problem`,
  differentiable (``jax.custom_vjp``), the lse cotangent included;
  :func:`attention_with_tokens` the same with additional tokens in the softmax.

Importing this module never touches the GPU or the library; the FFI targets are
registered on first use. Lowering does not need the library either, so the
custom calls can be lowered and exported for CUDA on a machine without a GPU
(``jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))``); compiling and
running them needs it.

Kernels (sm80+): fp16/bf16 through ``mma.sync`` m16n8k16, fp32 through TF32
``mma.sync`` m16n8k8 with the 3xTF32 split (about fp32 accuracy); fp32
accumulation and softmax; head dims that are multiples of 8 up to 256 (the
kernels pad to 32/64/128/256 internally). The backward is deterministic (no
atomics): one pass for dQ with query tiles outer, one for dK/dV with key tiles
outer.

The FFI handlers are registered as command-buffer compatible: XLA may record a jitted
function's calls into a CUDA graph and replay them without calling the handler
(``JAX_GNA_COMMAND_BUFFER=0`` before the first call turns that off). The Hopper kernels
are launched with programmatic dependent launch (``JAX_GNA_PDL=0`` turns it off); the
Hopper dK/dV kernel takes its key tiles heaviest first on short grids
(``JAX_GNA_DKV_ORDER=0``/``1``: always tile order / always heaviest first). The Hopper
forward at head dims 64 and 128 takes 64-token key tiles instead of 128-token ones where
they visit at most 80% of the key columns (small windows; ``JAX_GNA_FWD_KEYS=64``/``128``
forces either, for calls without additional tokens), and where CTAs would be short it runs
several query tiles per CTA (``JAX_GNA_FWD_ITEMS=n`` forces n where that kernel exists:
head dims 64 and 128, without additional tokens).
"""

from __future__ import annotations

import functools
import math
import os
import threading
from typing import Any, Sequence

import numpy as np

import jax
import jax.numpy as jnp

from . import dilation, xla
from .params import Problem

__all__ = ["available", "unavailable_reason", "unsupported_reason", "attention",
           "attention_with_tokens"]

FWD_TARGET = "jax_gna_fwd"
BWD_TARGET = "jax_gna_bwd"
FWD_TOKENS_TARGET = "jax_gna_fwd_tokens"
_SUPPORTED_DTYPES = (np.dtype(np.float16), np.dtype(jnp.bfloat16), np.dtype(np.float32))
_MAX_HEAD_DIM = 256
# The kernels' largest batch (all leading dims; the FFI's limit: a grid of more than
# 65535 runs as several launches, Params::z0); cuda.dense_attention's calls take at most
# this many query blocks.
_MAX_BATCH = 2 ** 31 - 1

_lock = threading.Lock()
_registered = False


@functools.lru_cache(maxsize=1)
def _load_library() -> tuple[Any, str]:
    """(module, "") or (None, reason). Cached: the import is tried once."""
    try:
        from . import _gna_ffi  # noqa: PLC0415
    except ImportError as e:  # not built (no nvcc at install time) or broken
        return None, (f"the jax_gna CUDA library is not built or cannot be imported ({e}); "
                      "reinstall jax_gna on a machine with nvcc (CUDA 12+) to build it")
    return _gna_ffi, ""


def _gpu_reason() -> str:
    try:
        gpus = jax.devices("gpu")
    except RuntimeError as e:
        return f"no CUDA GPU is visible to JAX ({e})"
    if not gpus or not any(getattr(d, "platform", "") == "gpu" for d in gpus):
        return "no CUDA GPU is visible to JAX"
    if any("rocm" in str(getattr(d, "client", "")).lower() for d in gpus):
        return "the GPU is not an NVIDIA CUDA GPU"
    return ""


def unavailable_reason() -> str:
    """Why the cuda backend cannot run here ("" when it can)."""
    lib, reason = _load_library()
    if lib is None:
        return reason
    return _gpu_reason()


def available() -> bool:
    """True when the compiled library imports and JAX sees a CUDA GPU."""
    return unavailable_reason() == ""


def _register() -> None:
    """Register the FFI targets with XLA once (no-op without the library)."""
    global _registered
    if _registered:
        return
    with _lock:
        if _registered:
            return
        lib, _ = _load_library()
        if lib is None:
            return
        command_buffer = os.environ.get("JAX_GNA_COMMAND_BUFFER", "1") != "0"
        for name, capsule in lib.registrations(command_buffer).items():
            jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
        _registered = True


def unsupported_reason(problem: Problem, query_shape, key_shape, value_shape, dtype) -> str | None:
    """None if the kernels cover this configuration, else a short reason."""
    dt = np.dtype(dtype)
    if dt not in _SUPPORTED_DTYPES:
        return f"dtype {dt} is not supported (float16, bfloat16, float32)"
    n = problem.rank
    if n not in (1, 2, 3):
        return f"{n} spatial axes (1, 2 or 3 supported)"
    qs, ks, vs = tuple(query_shape), tuple(key_shape), tuple(value_shape)
    if len(qs) < n + 3 or len(ks) != len(qs) or len(vs) != len(qs):
        return f"shapes {qs}, {ks}, {vs} do not have {n} spatial axes after the batch dims"
    d, d_v = qs[-1], vs[-1]
    for name, x in (("head dim", d), ("value head dim", d_v)):
        if x % 8:
            return f"{name} {x} is not a multiple of 8"
        if x > _MAX_HEAD_DIM:
            return f"{name} {x} is larger than {_MAX_HEAD_DIM}"
    batch = int(np.prod(qs[:len(qs) - n - 2]))
    if batch > _MAX_BATCH or qs[-2] > 65535:
        return f"batch {batch} of 2^31 or more, or heads {qs[-2]} above 65535"
    if max(problem.shape) >= 2 ** 30:
        return "an axis of 2^30 tokens or more"
    lib, _ = _load_library()
    have = _device_smem_optin()
    if lib is not None and have > 0 and hasattr(lib, "max_smem_bytes"):
        need = int(lib.max_smem_bytes(dt.name, int(d), int(d_v)))
        if need > have:
            return (f"{dt.name} with head dims {d}/{d_v} needs {need // 1024} KiB of shared memory "
                    f"per block, the GPU allows {have // 1024} KiB")
    return None


def _hopper_blockers(problem: Problem, query_shape, value_shape, dtype) -> list[str]:
    """Why the Hopper forward kernel cannot take this problem (empty: it can, on a
    compute capability 9.0 GPU). Mirrors the checks of ``csrc/gna_sm90.cu``."""
    dt = np.dtype(dtype)
    d, d_v = int(query_shape[-1]), int(value_shape[-1])
    why = []
    if dt not in (np.dtype(np.float16), np.dtype(jnp.bfloat16)):
        why.append(f"dtype {dt.name}")
    dims = (64, 128, 256)
    if d != d_v or d not in dims:
        why.append(f"head dims {d}/{d_v} ({' or '.join(f'{x}/{x}' for x in dims)})")
    if any(x != 1 for x in problem.dilation):
        why.append("dilation")

    def tiles_fit(extent, tokens) -> bool:  # power-of-two boxes, each axis <= next pow2
        return int(np.prod([min(1 << max(int(n) - 1, 0).bit_length(), tokens) for n in extent])) >= tokens

    key_tokens = 64 if d == 256 else 128
    if not (tiles_fit(problem.q_extent, 128) and tiles_fit(problem.kv_extent, key_tokens)):
        why.append("blocks smaller than a 128-token tile")
    if os.environ.get("JAX_GNA_SM90") in ("0", "off"):
        why.append("JAX_GNA_SM90=0")
    return why


@functools.lru_cache(maxsize=1)
def _compute_capability() -> str:
    """The first visible CUDA GPU's compute capability ("9.0"), "" without one."""
    if _gpu_reason():
        return ""
    return str(getattr(jax.devices("gpu")[0], "compute_capability", ""))


# A forward that is not differentiated folds only windows of at least this many keys:
# below, the layout transform and the pieces' launches cost more than the Hopper kernel
# saves (scripts/dilation_ab.py).
FOLD_FORWARD_MIN_KEYS = 128


def fold_dilation(problem: Problem, query_shape, value_shape, dtype) -> tuple[bool, bool]:
    """``(forward, backward)``: whether :func:`attention` runs that pass of a dilated
    problem as undilated pieces on the Hopper kernels (:mod:`jax_gna.dilation`: the
    dilation groups stacked in the batch by a layout transform in XLA) instead of on the
    sm80 kernels, which take dilation directly. ``forward`` is for a forward that is not
    differentiated; under differentiation the forward runs as pieces when either is true
    (the backward then reuses its pieces of q, k, v, out and lse). The op partitioned by
    ``custom_partitioning`` (``jax_gna.sharding``, batch/head-sharded inputs under
    ``jax.jit``) runs its forward undifferentiated and its backward from the saved out and
    lse (:func:`_backward`), so there each pass follows its own flag.

    Both need a whole-grid (unsharded) problem with dilation whose every piece the Hopper
    forward takes, one batch axis whose size times the groups stays below 2^31 (the
    kernels' largest batch; under ``jax.vmap`` the mapped axis multiplies it too, unseen
    here), a visible GPU of compute capability 9.0 and no ``JAX_GNA_FOLD_DILATION=0`` in the environment (read while
    tracing). A spatially sharded call folds on each shard where
    its shards hold whole dilation groups, by the same rules (``jax_gna.sharding``). The
    forward also needs a window of at least :data:`FOLD_FORWARD_MIN_KEYS` keys (or
    ``JAX_GNA_FOLD_DILATION=always``, for measurements); the backward head dim 64 or 128
    (the Hopper backward's) and no ``JAX_GNA_SM90_BWD=0``."""
    if not dilation.applies(problem, query_shape):
        return False, False
    return _fold_flags([sub for _, sub in dilation.pieces(problem)], query_shape, value_shape, dtype,
                       int(np.prod(problem.dilation)))


def _fold_flags(problems, query_shape, value_shape, dtype, groups: int) -> tuple[bool, bool]:
    """``(forward, backward)`` as :func:`fold_dilation` says them, for the undilated
    ``problems`` a dilated call would run instead, its ``groups`` dilation groups stacked
    in the batch of ``query_shape``: the pieces of a whole grid, or the shards' blocks of
    a spatially sharded call (``attention.fold_shards``, which ``jax_gna.sharding``
    asks)."""
    no = (False, False)
    if os.environ.get("JAX_GNA_FOLD_DILATION") in ("0", "off"):
        return no
    if _compute_capability() != "9.0":
        return no
    if int(query_shape[0]) * int(groups) > _MAX_BATCH:  # groups join the batch
        return no
    if any(_hopper_blockers(sub, query_shape, value_shape, dtype) for sub in problems):
        return no
    forward = (int(np.prod(problems[0].kernel_size)) >= FOLD_FORWARD_MIN_KEYS
               or os.environ.get("JAX_GNA_FOLD_DILATION") == "always")
    backward = int(query_shape[-1]) in (64, 128) and os.environ.get("JAX_GNA_SM90_BWD") != "0"
    return forward, backward


def kernel_path(problem: Problem, query_shape, value_shape, dtype) -> str:
    """Which CUDA kernels a call covered by this backend runs, in words.

    The forward runs the Hopper kernel (``csrc/gna_fwd_sm90.cuh``: TMA + wgmma) on
    compute capability 9.0 GPUs for fp16/bf16, head dims ``D == D_v`` in {64, 128,
    256} (256 with 64-token key tiles, 64 and 128 with 128-token ones, or 64-token ones
    where those visit far fewer key columns), no dilation and blocks large enough for its
    tiles, unless the environment has ``JAX_GNA_SM90=0``; everything else runs the
    sm80 kernels. The backward takes the Hopper kernels (``csrc/gna_bwd_sm90.cuh``) on
    the same problems with head dim 64 or 128, unless ``JAX_GNA_SM90_BWD=0``. A dilated
    problem's passes run as undilated pieces on the Hopper kernels where
    :func:`fold_dilation` says so.
    """
    d = int(query_shape[-1])
    fold_fwd, fold_bwd = fold_dilation(problem, query_shape, value_shape, dtype)
    if fold_fwd or fold_bwd:
        pieces = ("on this compute capability 9.0 GPU, as undilated pieces (the dilation groups "
                  "stacked in the batch by a layout transform, jax_gna.dilation)")
        fwd = (f"Hopper kernel (TMA + wgmma) {pieces}" if fold_fwd else
               f"sm80 kernels (a window of fewer than {FOLD_FORWARD_MIN_KEYS} keys), or, when "
               f"differentiated, the Hopper kernel {pieces}")
        bwd = (f"Hopper kernels {pieces}" if fold_bwd else
               "sm80 kernels, on the pieces when the forward ran as pieces ("
               + ("JAX_GNA_SM90_BWD=0" if d in (64, 128) else f"head dim {d}") + ")")
        return f"forward: {fwd}; backward: {bwd}"
    why = _hopper_blockers(problem, query_shape, value_shape, dtype)
    if why:
        return "forward and backward: sm80 kernels (Hopper forward not applicable: " + ", ".join(why) + ")"
    where = "on compute capability 9.0 GPUs, sm80 kernels elsewhere"
    if d == 256:
        return f"forward: Hopper kernel (TMA + wgmma) {where}; backward: sm80 kernels (head dim 256)"
    if os.environ.get("JAX_GNA_SM90_BWD") == "0":
        return f"forward: Hopper kernel (TMA + wgmma) {where}; backward: sm80 kernels (JAX_GNA_SM90_BWD=0)"
    return f"forward and backward: Hopper kernels (TMA + wgmma) {where}"


@functools.lru_cache(maxsize=1)
def _device_smem_optin() -> int:
    """Opt-in shared memory per block of the current GPU (-1 if unknown)."""
    lib, _ = _load_library()
    if lib is None or not hasattr(lib, "device_smem_optin") or _gpu_reason():
        return -1
    return int(lib.device_smem_optin())


# Per-device problems of a sharded call: ``(device ordinal, q_origin, kv_origin, q_range)``
# per device, ``q_range`` empty (the whole query block) or ``lo, hi`` per spatial axis (the
# rows of the query buffer the call computes; forward only, all devices or none);
# empty for an ordinary call.
DeviceTable = tuple[tuple[int, tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...]


def _attrs(problem: Problem, devices: DeviceTable = ()) -> dict[str, Any]:
    i64 = lambda t: np.asarray(t, dtype=np.int64)  # noqa: E731
    return dict(
        shape=i64(problem.shape),
        kernel_size=i64(problem.kernel_size),
        stride=i64(problem.stride),
        dilation=i64(problem.dilation),
        is_causal=i64([int(bool(c)) for c in problem.is_causal]),
        q_origin=i64(problem.q_origin),
        q_extent=i64(problem.q_extent),
        kv_origin=i64(problem.kv_origin),
        kv_extent=i64(problem.kv_extent),
        scale=np.float32(problem.scale),
        device_ordinals=i64([d for d, _, _, _ in devices]),
        device_q_origin=i64([x for _, q0, _, _ in devices for x in q0]),
        device_kv_origin=i64([x for _, _, k0, _ in devices for x in k0]),
        device_q_range=i64([x for _, _, _, r in devices for x in r]),
    )


def _vary_like(x: jax.Array, *refs: jax.Array) -> jax.Array:
    """``x`` made varying over every manual mesh axis that one of ``refs`` varies over
    (inside ``shard_map``; a no-op elsewhere). A ``custom_vjp``'s gradients must have
    its inputs' types: the additional tokens are the same on every spatial shard, the
    queries are not, so the tokens are cast to varying first (the transpose of that cast
    sums their per-shard gradients); an FFI call's results come out typed invariant, so
    the kernels' outputs are cast to their inputs' type."""
    def varying(a):  # the manual axes an array varies over (older JAX: .vma)
        aval = jax.typeof(a)
        axes = getattr(aval, "manual_axis_type", None)
        return set(axes.varying) if axes is not None else set(getattr(aval, "vma", ()))

    missing = tuple(sorted(set().union(*map(varying, refs)) - varying(x)))
    if not missing:
        return x
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, missing, to="varying")
    return jax.lax.pvary(x, missing)  # older JAX


def _forward_results(query, value) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """A forward call's results: out ``[..., D_v]`` in the query's dtype, lse in float32."""
    return (jax.ShapeDtypeStruct(query.shape[:-1] + (value.shape[-1],), query.dtype),
            jax.ShapeDtypeStruct(query.shape[:-1], jnp.float32))


def _nan_like(results) -> tuple[jax.Array, ...]:
    """NaN-filled buffers of ``results``' shapes and dtypes: the poisoned outputs (test hook)."""
    return tuple(jnp.full(r.shape, jnp.nan, r.dtype) for r in results)


def _forward_call(query, key, value, problem: Problem, poison: bool = False,
                  devices: DeviceTable = (), into=None):
    """``(out, lse)``; with ``into`` (an earlier call's ``(out, lse)``) the call writes its
    rows into those buffers (aliased) and the other rows keep their values."""
    _register()
    results = _forward_results(query, value)
    if poison or into is not None:  # poison: test hook, outputs start as NaN
        o0, l0 = into if into is not None else _nan_like(results)
        call = jax.ffi.ffi_call(FWD_TARGET + "_aliased", results, vmap_method="broadcast_all",
                                input_output_aliases={3: 0, 4: 1})
        outs = call(query, key, value, o0, l0, **_attrs(problem, devices))
    else:
        call = jax.ffi.ffi_call(FWD_TARGET, results, vmap_method="broadcast_all")
        outs = call(query, key, value, **_attrs(problem, devices))
    # inside shard_map, typed like the inputs (an FFI call's results are typed invariant)
    return tuple(_vary_like(x, query, key, value) for x in outs)


def _backward_call(query, key, value, dout, lse, delta, problem: Problem, poison: bool = False,
                   devices: DeviceTable = (), dkv_sum: int = 1):
    """``(dq, dk, dv)``. dK / dV per query batch: the key/value's shape, but for keys
    broadcast over the query's last batch dims (1s there: see :func:`dense_attention`),
    which the caller sums; there the kernels sum each run of ``dkv_sum`` query batches
    along the last batch dim (it divides that dim and key/value have 1 there), so dK /
    dV have ``1 / dkv_sum`` of the query's batches on it."""
    _register()
    lead = query.shape[:query.ndim - len(problem.shape) - 2]
    if dkv_sum > 1:
        assert lead and lead[-1] % dkv_sum == 0 and key.shape[len(lead) - 1] == 1, (lead, dkv_sum)
        lead = lead[:-1] + (lead[-1] // dkv_sum,)
    results = (jax.ShapeDtypeStruct(query.shape, query.dtype),
               jax.ShapeDtypeStruct(lead + key.shape[len(lead):], key.dtype),
               jax.ShapeDtypeStruct(lead + value.shape[len(lead):], value.dtype))
    if poison:
        # Three different fills: XLA merges equal fills of equal shapes into one buffer,
        # and a call with that buffer aliased to two of its outputs wrote dV over dK on
        # an H200 (scripts/poison_alias_probe.py; benchmarks/results/extra-tokens-h200.md).
        fills = (jnp.nan, jnp.inf, -jnp.inf)
        inits = [jnp.full(r.shape, f, r.dtype) for r, f in zip(results, fills)]
        call = jax.ffi.ffi_call(BWD_TARGET + "_aliased", results, vmap_method="broadcast_all",
                                input_output_aliases={6: 0, 7: 1, 8: 2})
        outs = call(query, key, value, dout, lse, delta, *inits, **_attrs(problem, devices))
    else:
        call = jax.ffi.ffi_call(BWD_TARGET, results, vmap_method="broadcast_all")
        outs = call(query, key, value, dout, lse, delta, **_attrs(problem, devices))
    return tuple(_vary_like(x, query, key, value, dout) for x in outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _attention(query, key, value, problem, poison, devices):
    return _forward_call(query, key, value, problem, poison, devices)


def _attention_fwd(query, key, value, problem, poison, devices):
    out, lse = _forward_call(query, key, value, problem, poison, devices)
    return (out, lse), (query, key, value, out, lse)


def _attention_bwd(problem, poison, devices, res, cts, dkv_sum: int = 1):
    query, key, value, out, lse = res
    dout, dlse = cts
    dout = dout.astype(query.dtype)
    # delta = rowsum(dO * O) - dLSE, so that dS = P * (dP - delta) also carries the
    # gradient that flows into the returned log-sum-exp.
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    delta = delta - dlse.astype(jnp.float32)
    return _backward_call(query, key, value, dout, lse, delta, problem, poison, devices, dkv_sum)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _forward_fn(poison: bool):
    return lambda q, k, v, p: _forward_call(q, k, v, p, poison)


def _backward_fn(poison: bool):
    return lambda q, k, v, o, l, do, dl, p: _attention_bwd(p, poison, (), (q, k, v, o, l), (do, dl))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _folded(query, key, value, problem, poison, fold_forward):
    """A dilated problem that :func:`fold_dilation` folds in some pass. Not differentiated
    (inference), its forward runs as pieces where ``fold_forward``; under differentiation
    always (:func:`_folded_fwd`)."""
    if fold_forward:
        return dilation.attention(_forward_fn(poison), query, key, value, problem)
    return _forward_call(query, key, value, problem, poison)


def _folded_fwd(query, key, value, problem, poison, fold_forward):
    # The forward as pieces whatever the window (the pieces of q, k and v serve both
    # passes), and the pieces saved for the backward.
    del fold_forward
    return dilation.forward(_forward_fn(poison), query, key, value, problem)


def _folded_bwd(problem, poison, fold_forward, saved, cts):
    del fold_forward
    return dilation.backward_saved(_backward_fn(poison), saved, *cts, problem)


_folded.defvjp(_folded_fwd, _folded_bwd)


def _run(query, key, value, problem: Problem, poison: bool):
    fold_forward, fold_backward = fold_dilation(problem, query.shape, value.shape, query.dtype)
    if fold_forward or fold_backward:
        return _folded(query, key, value, problem, poison, fold_forward)
    return _attention(query, key, value, problem, poison, ())


def attention(query, key, value, problem: Problem):
    """Neighborhood attention of one query block over one key block.

    query ``[B, *q_extent, H, D]``, key ``[B, *kv_extent, H_kv, D]``, value
    ``[B, *kv_extent, H_kv, D_v]``; returns ``out [B, *q_extent, H, D_v]`` (input dtype)
    and ``lse [B, *q_extent, H]`` (float32, natural log). Windows use global
    coordinates (``problem.q_origin`` / ``kv_origin``); every query's window must lie
    inside the key block (the kernels check it and fail otherwise). A dilated whole-grid
    problem may run as undilated pieces (:func:`fold_dilation`).
    """
    return _run(query, key, value, problem, False)


def export_disabled_checks() -> list:
    """What to pass as ``disabled_checks`` to ``jax.export.export`` for a function that
    calls the kernels: ``jax.export`` only trusts custom calls on its own list, so the
    kernels' targets (forward, backward, forward with tokens) must be allowed explicitly. The exported module needs this library
    (same FFI targets) wherever it is deserialized and run."""
    from jax import export  # noqa: PLC0415

    return [export.DisabledSafetyCheck.custom_call(n)
            for n in (FWD_TARGET, BWD_TARGET, FWD_TOKENS_TARGET)]


def _backward(query, key, value, out, lse, d_out, d_lse, problem: Problem, poison: bool = False):
    """``(dq, dk, dv)`` from a saved forward: the backend backward protocol
    (``attention.backward``) that the sharded op uses to skip recomputing the forward.
    Folds dilation where :func:`fold_dilation` says so for the backward. ``poison``: the
    test hook of :func:`_attention_poisoned`."""
    bwd = _backward_fn(poison)
    if fold_dilation(problem, query.shape, value.shape, query.dtype)[1]:
        return dilation.backward(bwd, query, key, value, out, lse, d_out, d_lse, problem)
    return bwd(query, key, value, out, lse, d_out, d_lse, problem)


def _device_table(problems, devices, call=None) -> DeviceTable:
    """Each device's origins (``problems[c]`` for ``(ordinal, c)`` in ``devices``); with a
    ``jax_gna.sharding.SplitCall``, its key origins and query rows."""
    return tuple((int(ordinal), tuple(problems[c].q_origin),
                  tuple(problems[c].kv_origin if call is None else call.kv_origin[c]),
                  () if call is None else tuple(x for lo_hi in call.ranges[c] for x in lo_hi))
                 for ordinal, c in devices)


def _by_device(query, key, value, index, problems, devices, poison: bool = False):
    """One kernel call for every shard of a sharded op (``jax_gna.sharding``): the shards'
    ``problems`` differ only in their origins, and the device with ordinal ``o`` runs
    ``problems[c]`` for each ``(o, c)`` in ``devices`` (the FFI handler picks it on the
    host, so no conditional runs on the GPU). ``index`` (this shard's entry of
    ``problems``, traced) is not needed here; the portable fallback switches on it.
    ``poison``: the test hook of :func:`_attention_poisoned`."""
    del index
    return _attention(query, key, value, problems[0], poison, _device_table(problems, devices))


def _backward_by_device(query, key, value, out, lse, d_out, d_lse, index, problems, devices,
                        poison: bool = False):
    """The backward of :func:`_by_device` from its saved ``(out, lse)``."""
    del index
    return _attention_bwd(problems[0], poison, _device_table(problems, devices),
                          (query, key, value, out, lse), (d_out, d_lse))


def _by_device_split(query, blocks, index, problems, calls, devices, poison: bool = False):
    """The forward of :func:`_by_device` in sub-block calls (``jax_gna.sharding._split_calls``):
    ``calls[i]`` computes its rows (``ranges``) of each shard's queries over the key and
    value block ``blocks[i]``; the first run over the shard's own keys, so they need not
    wait for the halo exchange that builds the others' blocks. The calls write into one
    pair of buffers (aliased). Forward only (the sharded op's backward is
    :func:`_backward_by_device`)."""
    del index
    base, into = problems[0], None
    for (key, value), call in zip(blocks, calls):
        into = _forward_call(query, key, value, base.replace(kv_extent=call.kv_extent), poison,
                             _device_table(problems, devices, call), into)
    return into


# Additional tokens (every query over all S of them) run on the kernels
# (``dense_attention``) from DENSE_MIN_KEYS tokens on, from DENSE_SOME_KEYS with at most
# DENSE_SOME_HEADS query heads, and from DENSE_FEW_KEYS with at most S / 4; else as
# XLA's dense attention (``xla.dense_attention``). The kernels' blocks have S queries,
# so their query tiles of 128 are part empty below 128 tokens; their time grows with the
# heads much faster than XLA's. Measured on an H200, bf16, head dim 128,
# forward+backward, 1-D and 2-D (sessions 28-29, benchmarks/results/extra-tokens-h200.md):
# the kernels win from 16 tokens with 1 head; with the tokens' dK / dV summed in runs
# (session 29) from 32 tokens with 8 and 16 heads, at 32 and 48 tokens with 24 heads
# they are within 5% of XLA either way, from 64 they win with 24.
DENSE_MIN_KEYS = 64
DENSE_SOME_KEYS, DENSE_SOME_HEADS = 32, 16
DENSE_FEW_KEYS = 16
# The tokens' dK/dV launch sums the blocks of a batch entry in runs (_dkv_sum), chosen by a
# wave model: the GPU's streaming multiprocessors (one dK/dV CTA fits per SM), and a
# CTA's fixed cost (loading its key tile, storing dK/dV) in query steps of 64 tokens per
# head. Fitted on an H200 (132 SMs, bf16, head dim 128, session 30): the dK/dV kernel's
# time over five run lengths on each of six grids was 1.63-1.93 us per modelled step
# (within 7% on a grid); the fixed cost 2.6 (benchmarks/results/extra-tokens-h200.md).
_SMS: int | None = None  # None: the first visible GPU's count (132, an H100/H200 SXM's, without one)
_DKV_FIXED_STEPS = 2.6


@functools.lru_cache(maxsize=1)
def _device_sms() -> int:
    """The first visible CUDA GPU's streaming multiprocessors (132 where JAX does not say)."""
    if _gpu_reason():
        return 132
    return int(getattr(jax.devices("gpu")[0], "core_count", 0) or 132)


def _dkv_sum(b: int, m: int, s: int, h_kv: int, group: int = 1) -> int:
    """Query blocks each dK / dV CTA of a tokens' backward call sums (``b`` batch entries
    of ``m`` blocks of ``s`` queries, ``h_kv`` key heads of ``group`` query heads each):
    the divisor ``n`` of ``m`` with the least modelled time, waves x CTA length:
    ``ceil(ctas / n / SMs) * (_DKV_FIXED_STEPS + n * steps)``, one CTA per key tile of
    128 tokens and run, ``steps = ceil(s / 64) * group`` per block. Ties go to the longer
    run (fewer partial sums). Few long CTAs where the grid is small, no more than a wave's
    worth of runs where it is large."""
    ctas = b * m * h_kv * -(-s // 128)  # one run per block
    steps = -(-s // 64) * group
    sms = _SMS if _SMS is not None else _device_sms()

    def cost(n: int) -> tuple[float, int]:
        return -(-(ctas // n) // sms) * (_DKV_FIXED_STEPS + n * steps), -n

    return min((n for n in range(1, m + 1) if m % n == 0), key=cost)


def _token_grid(tokens: int, scale: float = 1.0) -> Problem:
    """The 1-D problem of :func:`dense_attention`: ``tokens`` positions, each window all of them."""
    return Problem(shape=(tokens,), kernel_size=(tokens,), stride=(1,), dilation=(1,),
                   is_causal=(False,), scale=scale)


def dense_blocker(query_shape, key_shape, value_shape, dtype) -> str | None:
    """Why :func:`dense_attention` leaves these additional tokens (``key_shape`` ``[B, S,
    H_kv, D]``) to XLA; None when they run on the kernels."""
    spatial, s = tuple(query_shape[1:-2]), int(key_shape[1])
    if len(spatial) not in (1, 2, 3):
        return f"{len(spatial)} spatial axes"
    h, d, h_kv, d_v = query_shape[-2], query_shape[-1], key_shape[-2], value_shape[-1]
    some = s >= DENSE_SOME_KEYS and h <= DENSE_SOME_HEADS
    few = s >= DENSE_FEW_KEYS and 4 * h <= s
    if s < max(DENSE_MIN_KEYS, 2) and not (some or few):
        return (f"{s} tokens with {h} heads (the kernels from {DENSE_MIN_KEYS} tokens, from "
                f"{DENSE_SOME_KEYS} with at most {DENSE_SOME_HEADS} heads, or from "
                f"{DENSE_FEW_KEYS} with at most tokens / 4 heads), where XLA is faster")
    if math.prod(spatial) < s:
        return f"fewer queries ({math.prod(spatial)}) than tokens ({s})"
    return unsupported_reason(_token_grid(s), (1, s, h, d), (1, s, h_kv, d), (1, s, h_kv, d_v), dtype)


def _dense_blocks(x: jax.Array, rank: int, s: int) -> jax.Array:
    """``[B, *spatial, *rest]`` (``rank`` spatial axes, ``N`` tokens) -> ``[B, m, s,
    *rest]``: zero-padded to ``m`` whole blocks of ``s`` tokens."""
    b, rest = x.shape[0], x.shape[1 + rank:]
    n = math.prod(x.shape[1:1 + rank])
    m = -(-n // s)
    x = x.reshape((b, n) + rest)
    if m * s != n:
        x = jnp.pad(x, [(0, 0), (0, m * s - n)] + [(0, 0)] * len(rest))
    return x.reshape((b, m, s) + rest)


def _dense_unblock(x: jax.Array, spatial: Sequence[int]) -> jax.Array:
    """The inverse of :func:`_dense_blocks`: ``[B, m, s, *rest]`` -> ``[B, *spatial, *rest]``."""
    n, b = math.prod(spatial), x.shape[0]
    return x.reshape((b, -1) + x.shape[3:])[:, :n].reshape((b, *spatial) + x.shape[3:])


def _batch_chunks(b: int, m: int) -> list[list[tuple[slice, slice]]]:
    """The kernels' calls over ``b`` batch entries of ``m`` query blocks, at most
    ``_MAX_BATCH`` blocks each: rows of ``(batch slice, block slice)``, the rows along
    the batch, a row's calls along its blocks (whole batch entries per call where ``m``
    allows, else one entry's blocks in pieces)."""
    if m > _MAX_BATCH:
        return [[(slice(i, i + 1), slice(j, j + _MAX_BATCH)) for j in range(0, m, _MAX_BATCH)]
                for i in range(b)]
    per = _MAX_BATCH // m
    return [[(slice(i, i + per), slice(None))] for i in range(0, b, per)]


def _cat(xs: list, axis: int) -> jax.Array:
    return jnp.concatenate(xs, axis) if len(xs) > 1 else xs[0]


def _dense_forward(query, key, value, scale, poison):
    rank, s = query.ndim - 3, key.shape[1]
    grid = _token_grid(s, scale)
    q = _dense_blocks(query, rank, s)
    # The tokens [B, 1, S, ...]: the kernels read them for all m blocks of their batch
    # entry (no copy per block)
    k, v = key[:, None], value[:, None]
    rows = [[_forward_call(q[i, j], k[i], v[i], grid, poison) for i, j in row]
            for row in _batch_chunks(*q.shape[:2])]
    out, lse = (_cat([_cat([call[n] for call in row], 1) for row in rows], 0) for n in (0, 1))
    spatial = query.shape[1:1 + rank]
    return _dense_unblock(out, spatial), _dense_unblock(lse, spatial)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _dense(query, key, value, scale, poison):
    return _dense_forward(query, key, value, scale, poison)


def _dense_fwd(query, key, value, scale, poison):
    out, lse = _dense_forward(query, key, value, scale, poison)
    return (out, lse), (query, key, value, out, lse)


def _dense_bwd(scale, poison, residuals, cotangents):
    return dense_backward(*residuals, *cotangents, scale, poison)


_dense.defvjp(_dense_fwd, _dense_bwd)


def dense_attention(query, key, value, scale: float, poison: bool = False):
    """Every query over all ``S`` tokens of ``key``/``value`` (``[B, S, H_kv, D]``), with
    the log-sum-exp: the additional tokens of the public op, on the kernels. The queries
    ``[B, *spatial, H, D]`` (``N`` tokens) are padded with zeros to a multiple of ``S``
    and cut into ``m`` blocks of ``S`` (``[B, m, S, H, D]``, the blocks a batch dim),
    each a 1-D problem on ``S`` positions whose window (``kernel_size = S``) is every
    key. The kernels read the tokens as ``[B, 1, S, H_kv, D]``, broadcast over the
    blocks without a copy (until session 28 a copy of ``N x H_kv x (D + D_v)`` elements
    per pass: a third of the forward's time with 512 tokens on 2-D 256x256). Falls back
    to ``xla.dense_attention`` with few tokens for the heads (``DENSE_MIN_KEYS``), with
    fewer queries than tokens, or where the kernels do not take the shapes or dtype.
    Its backward is :func:`dense_backward`. ``poison``: the test hook of
    :func:`_attention_poisoned`.

    (A first version ran the last ``N % S`` queries as one short query block over the
    tokens, a separate call. Its poisoned test runs gave wrong key gradients: XLA had
    merged the NaN fills of dK and dV into one buffer, aliased to both outputs, see
    :func:`_backward_call`. Padding is one call and faster.)"""
    if dense_blocker(query.shape, key.shape, value.shape, query.dtype):
        return xla.dense_attention(query, key, value, scale)
    return _dense(query, _vary_like(key, query), _vary_like(value, query), scale, poison)


def dense_backward(query, key, value, out, lse, d_out, d_lse, scale: float, poison: bool = False):
    """``(dq, dk, dv)`` of :func:`dense_attention` from its saved ``out`` and ``lse``: the
    same blocks on the backward kernels (no forward recomputed), the tokens' gradients
    summed over the blocks: the kernels sum runs of blocks (``_dkv_sum``), float32 the
    rest. ``xla.dense_backward`` where
    :func:`dense_attention` falls back to XLA. The protocol's ``dense.backward``
    (``jax_gna.sharding``)."""
    if dense_blocker(query.shape, key.shape, value.shape, query.dtype):
        return xla.dense_backward(query, key, value, out, lse, d_out, d_lse, scale)
    rank, s = query.ndim - 3, key.shape[1]
    grid = _token_grid(s, scale)
    q, o, l, do, dl = (_dense_blocks(x, rank, s) for x in (query, out, lse, d_out, d_lse))
    k, v = key[:, None], value[:, None]  # read by all blocks of their batch entry
    group = query.shape[-2] // key.shape[-2]
    dq, dk, dv = [], [], []
    for row in _batch_chunks(*q.shape[:2]):
        # each call's dK / dV per run of blocks, summed over the runs in float32
        calls = [_attention_bwd(grid, poison, (), (q[i, j], k[i], v[i], o[i, j], l[i, j]),
                                (do[i, j], dl[i, j]), _dkv_sum(*q[i, j].shape[:2], s, k.shape[-2], group))
                 for i, j in row]
        dq.append(_cat([c[0] for c in calls], 1))
        dk.append(sum(c[1].astype(jnp.float32).sum(axis=1) for c in calls))
        dv.append(sum(c[2].astype(jnp.float32).sum(axis=1) for c in calls))
    return (_dense_unblock(_cat(dq, 0), query.shape[1:1 + rank]),
            _cat(dk, 0).astype(key.dtype), _cat(dv, 0).astype(value.dtype))


dense_attention.backward = dense_backward


# The additional tokens as extra key tiles of the Hopper forward (``csrc/gna_fwd_sm90.cuh``,
# EXTRA): one kernel gives out / lse over each query's window and the tokens together, in
# place of the neighborhood forward, the tokens' own forward over the queries again and
# their merge in XLA (:func:`attention_with_tokens`).

def tokens_blocker(problem: Problem, query_shape, key_shape, value_shape, dtype) -> str | None:
    """Why :func:`attention_with_tokens` runs the additional tokens (``key_shape`` /
    ``value_shape``: ``[B, S, H_kv, D(_v)]``) apart from the neighborhood attention
    (:func:`attention`, :func:`dense_attention` and ``xla.merge``) rather than as extra key
    tiles of the Hopper forward; None when it fuses them: a compute capability 9.0 GPU
    whose Hopper forward takes the problem, and no ``JAX_GNA_FUSED_TOKENS=0`` in the
    environment (read while tracing)."""
    if os.environ.get("JAX_GNA_FUSED_TOKENS") in ("0", "off"):
        return "JAX_GNA_FUSED_TOKENS=0"
    if _compute_capability() != "9.0":
        return "not a compute capability 9.0 GPU"
    why = _hopper_blockers(problem, query_shape, value_shape, dtype)
    if why:
        return "the Hopper forward does not apply (" + ", ".join(why) + ")"
    return None


def _forward_tokens_call(query, key, value, extra_keys, extra_values, problem: Problem,
                         poison: bool = False):
    """``(out, lse)`` over each query's window and the additional tokens, one kernel."""
    _register()
    results = _forward_results(query, value)
    args = (query, key, value, extra_keys, extra_values)
    if poison:  # test hook: outputs start as NaN
        call = jax.ffi.ffi_call(FWD_TOKENS_TARGET + "_aliased", results,
                                vmap_method="broadcast_all", input_output_aliases={5: 0, 6: 1})
        outs = call(*args, *_nan_like(results), **_attrs(problem))
    else:
        call = jax.ffi.ffi_call(FWD_TOKENS_TARGET, results, vmap_method="broadcast_all")
        outs = call(*args, **_attrs(problem))
    return tuple(_vary_like(x, *args) for x in outs)


def tokens_backward(query, extra_keys, extra_values, out, lse, d_out, d_lse, scale: float,
                    poison: bool = False):
    """``(dq, dk, dv)`` of the additional tokens' part of an attention merged with them
    (the tokens ``[B, S, H_kv, D]``), from the merged ``out`` / ``lse``: on
    :func:`dense_backward`'s kernels where :func:`dense_blocker` allows, else
    ``xla.dense_backward_saved`` (few tokens for the heads; no forward recomputed either
    way). The protocol's ``tokens_backward`` (``jax_gna.sharding``)."""
    args = (query, extra_keys, extra_values, out, lse, d_out, d_lse, scale)
    if dense_blocker(query.shape, extra_keys.shape, extra_values.shape, query.dtype) is None:
        return dense_backward(*args, poison)
    return xla.dense_backward_saved(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention_tokens(query, key, value, extra_keys, extra_values, problem, poison):
    return _forward_tokens_call(query, key, value, extra_keys, extra_values, problem, poison)


def _attention_tokens_fwd(query, key, value, extra_keys, extra_values, problem, poison):
    out, lse = _forward_tokens_call(query, key, value, extra_keys, extra_values, problem, poison)
    return (out, lse), (query, key, value, extra_keys, extra_values, out, lse)


def _attention_tokens_bwd(problem, poison, res, cts):
    # Each part's gradients from the merged out / lse: P = exp(s - lse) over a part's keys
    # is the merged softmax restricted to them, and delta = rowsum(dO o) - dLSE is the
    # whole row's, so the two backward passes give exactly the union's gradients (no
    # per-part outputs, no merge backward).
    # The tokens' part on the kernels where dense_attention would take them, else (few
    # tokens for the heads) on XLA from the same saved statistics.
    query, key, value, extra_keys, extra_values, out, lse = res
    dq, dk, dv = _attention_bwd(problem, poison, (), (query, key, value, out, lse), cts)
    dqx, dxk, dxv = tokens_backward(query, extra_keys, extra_values, out, lse, *cts,
                                    problem.scale, poison)
    return (dq.astype(jnp.float32) + dqx).astype(dq.dtype), dk, dv, dxk, dxv


_attention_tokens.defvjp(_attention_tokens_fwd, _attention_tokens_bwd)


def _with_tokens(query, key, value, extra_keys, extra_values, problem: Problem,
                 poison: bool = False):
    if tokens_blocker(problem, query.shape, extra_keys.shape, extra_values.shape,
                      query.dtype) is None:
        return _attention_tokens(query, key, value, extra_keys, extra_values, problem, poison)
    out, lse = _run(query, key, value, problem, poison)
    return xla.merge(out, lse, *dense_attention(query, extra_keys, extra_values, problem.scale,
                                                poison))


def attention_with_tokens(query, key, value, extra_keys, extra_values, problem: Problem):
    """:func:`attention` merged with :func:`dense_attention` over the additional tokens
    ``extra_keys`` / ``extra_values`` (``[B, S, H_kv, D(_v)]``): ``(out, lse)`` over each
    query's window and the tokens together. Where :func:`tokens_blocker` allows (the
    Hopper forward's problems on a compute capability 9.0 GPU) the tokens are
    extra key tiles of the Hopper forward (one kernel) and the backward runs both parts
    from the merged out / lse (the tokens' part on the kernels, or for few tokens
    ``xla.dense_backward_saved``); elsewhere the two parts and ``xla.merge``. A whole grid
    (``jax_gna.sharding`` calls it on each shard of a call sharded along batch or heads
    only)."""
    return _with_tokens(query, key, value, extra_keys, extra_values, problem)


attention.backward = _backward
attention.dense = dense_attention
attention.with_tokens = attention_with_tokens
attention.tokens_backward = tokens_backward
attention.fold_shards = _fold_flags
attention.by_device = _by_device
attention.backward_by_device = _backward_by_device
attention.by_device_split = _by_device_split


def _attention_poisoned(query, key, value, problem: Problem):
    """Test hook: like :func:`attention`, but the kernels' output buffers start as NaN
    (the backward's dK and dV as +inf and -inf), in every pass and sharded call (its
    protocol attributes are poisoned too), so an element no kernel writes shows as
    NaN or inf."""
    return _run(query, key, value, problem, True)


_attention_poisoned.backward = functools.partial(_backward, poison=True)
_attention_poisoned.dense = functools.partial(dense_attention, poison=True)
_attention_poisoned.dense.backward = functools.partial(dense_backward, poison=True)
_attention_poisoned.with_tokens = functools.partial(_with_tokens, poison=True)
_attention_poisoned.tokens_backward = functools.partial(tokens_backward, poison=True)
_attention_poisoned.fold_shards = _fold_flags
_attention_poisoned.by_device = functools.partial(_by_device, poison=True)
_attention_poisoned.backward_by_device = functools.partial(_backward_by_device, poison=True)
_attention_poisoned.by_device_split = functools.partial(_by_device_split, poison=True)
