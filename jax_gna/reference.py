"""A float64 NumPy brute force of the operator, written straight from SEMANTICS.md.

It shares no code with the backends (its window rule is its own scalar loop), so
the tests can hold every backend, and :mod:`jax_gna.mask`, against it. It builds a
dense ``[tokens, tokens]`` mask: for small problems only.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def axis_windows(length: int, kernel_size: int, stride: int, dilation: int,
                 is_causal: bool) -> list[list[int]]:
    """For each position ``i`` of one axis, the sorted list of key positions it sees."""
    k, s, d = kernel_size, stride, dilation
    wl = k // 2
    wr = k // 2 + (k % 2 - 1)
    out = []
    for i in range(length):
        g, ig = i % d, i // d
        group_len = math.ceil((length - g) / d)
        if is_causal:
            leader = min((ig // s) * s + s - 1, group_len - 1)
            lo, hi = max(leader - k + 1, 0), ig
        else:
            leader = min((ig // s) * s + s // 2, group_len - 1)
            c = min(max(leader, wl), group_len - 1 - wr)
            lo, hi = c - wl, c + wr
        out.append([jg * d + g for jg in range(lo, hi + 1)])
    return out


def neighbor_mask(shape: Sequence[int], kernel_size: Sequence[int], stride: Sequence[int],
                  dilation: Sequence[int], is_causal: Sequence[bool]) -> np.ndarray:
    """Dense ``[N, N]`` boolean mask over row-major flattened tokens: ``mask[i, j]`` iff key
    ``j`` is a neighbor of query ``i`` on every axis."""
    result = np.ones((1, 1), dtype=bool)
    for a, length in enumerate(shape):
        m = np.zeros((length, length), dtype=bool)
        for i, keys in enumerate(axis_windows(length, kernel_size[a], stride[a], dilation[a],
                                              is_causal[a])):
            m[i, keys] = True
        # Row-major flattening: the last axis varies fastest.
        result = (result[:, None, :, None] & m[None, :, None, :]).reshape(
            result.shape[0] * length, result.shape[1] * length)
    return result


def _flat(x: np.ndarray, n_spatial: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x.reshape((x.shape[0], -1) + x.shape[1 + n_spatial:])


def attention(query, key, value, kernel_size, stride, dilation, is_causal, scale=None,
              additional_keys=None, additional_values=None, d_out=None, d_lse=None):
    """The exact operator in float64.

    ``kernel_size``/``stride``/``dilation``/``is_causal`` are per-axis tuples. Returns
    ``(out, lse)``, and if ``d_out`` is given (``d_lse`` optional) also the gradients
    ``(dq, dk, dv[, d_additional_keys, d_additional_values])``.
    """
    query = np.asarray(query)
    n_sp = query.ndim - 3
    spatial = query.shape[1:1 + n_sp]
    q, k, v = _flat(query, n_sp), _flat(key, n_sp), _flat(value, n_sp)
    b, n, h, d = q.shape
    h_kv, d_v = k.shape[2], v.shape[3]
    scale = d ** -0.5 if scale is None else scale
    m = neighbor_mask(spatial, kernel_size, stride, dilation, is_causal)
    n_extra = 0
    if additional_keys is not None:
        ak = np.asarray(additional_keys, dtype=np.float64)
        av = np.asarray(additional_values, dtype=np.float64)
        n_extra = ak.shape[1]
        k = np.concatenate([k, ak], axis=1)
        v = np.concatenate([v, av], axis=1)
        m = np.concatenate([m, np.ones((n, n_extra), dtype=bool)], axis=1)
    group = h // h_kv
    out = np.zeros((b, n, h, d_v))
    lse = np.zeros((b, n, h))
    grads = d_out is not None
    if grads:
        do = _flat(d_out, n_sp)
        dlse = (np.zeros((b, n, h)) if d_lse is None
                else np.asarray(d_lse, np.float64).reshape(b, n, h))
        dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for bi in range(b):
        for hi in range(h):
            kh = hi // group
            s = scale * q[bi, :, hi] @ k[bi, :, kh].T
            s = np.where(m, s, -np.inf)
            mx = s.max(axis=1, keepdims=True)
            e = np.exp(s - mx)
            tot = e.sum(axis=1, keepdims=True)
            p = e / tot
            o = p @ v[bi, :, kh]
            out[bi, :, hi] = o
            lse[bi, :, hi] = (mx + np.log(tot))[:, 0]
            if grads:
                g_o = do[bi, :, hi]
                dv[bi, :, kh] += p.T @ g_o
                dp = g_o @ v[bi, :, kh].T
                delta = (g_o * o).sum(axis=1, keepdims=True) - dlse[bi, :, hi][:, None]
                ds = p * (dp - delta)
                dq[bi, :, hi] = scale * ds @ k[bi, :, kh]
                dk[bi, :, kh] += scale * ds.T @ q[bi, :, hi]
    out = out.reshape((b,) + tuple(spatial) + (h, d_v))
    lse = lse.reshape((b,) + tuple(spatial) + (h,))
    if not grads:
        return out, lse
    shape_k = (b,) + tuple(spatial) + (h_kv,)
    result = [dq.reshape((b,) + tuple(spatial) + (h, d)),
              dk[:, :n].reshape(shape_k + (d,)), dv[:, :n].reshape(shape_k + (d_v,))]
    if n_extra:
        result += [dk[:, n:], dv[:, n:]]
    return out, lse, tuple(result)
