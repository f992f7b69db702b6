"""The cuda backend's two kernel calls replaced by the xla backend, for CPU tests of the
code around them (folds, blocks, custom_vjp, delta, broadcast tokens): not a test module.
(``tests/conftest.py`` puts this folder on the import path, for Bazel's test target too.)"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jax_gna import cuda, xla


def xla_kernel_calls(monkeypatch, record) -> None:
    """Patch ``cuda._forward_call`` / ``cuda._backward_call`` with ``xla.attention``;
    ``record(kind, query, problem, dkv_sum)`` sees every call ("fwd" or "bwd"), ``query``
    as the kernels see it: its batch dims flattened into one. Keys/values with 1s in the
    query's last batch dims are broadcast over them, as the kernels read them, and dK /
    dV come back per query batch, or summed over runs of ``dkv_sum`` query batches along
    the last batch dim as the kernels do (accumulated in at least float32). The backward
    recovers d_lse from the kernels' delta = rowsum(dO * O) - d_lse."""
    def flat(problem, query, *rest):
        lead = query.shape[:query.ndim - len(problem.shape) - 2]
        n = math.prod(lead)
        out = [query.reshape((n,) + query.shape[len(lead):])]
        for x in rest:
            shared = len(lead)  # as the handler: the query's batch dims, then a tail of 1s
            while shared and x.shape[shared - 1] == 1:
                shared -= 1
            assert x.shape[:shared] == lead[:shared], (x.shape, lead)
            x = jnp.broadcast_to(x, lead + x.shape[len(lead):])
            out.append(x.reshape((n,) + x.shape[len(lead):]))
        return out, lambda y: y.reshape(lead + y.shape[1:])

    def forward(query, key, value, problem, poison=False, devices=(), into=None):
        (q, k, v), unflat = flat(problem, query, key, value)
        record("fwd", q, problem, 1)
        return tuple(map(unflat, xla.attention(q, k, v, problem)))

    def backward(query, key, value, d_out, lse, delta, problem, poison=False, devices=(),
                 dkv_sum=1):
        (q, k, v, do, dl), unflat = flat(problem, query, key, value, d_out, delta)
        record("bwd", q, problem, dkv_sum)
        (out, _), vjp = jax.vjp(lambda q, k, v: xla.attention(q, k, v, problem), q, k, v)
        dq, dk, dv = map(unflat, vjp((do, jnp.sum(do * out, axis=-1) - dl)))
        if dkv_sum > 1:  # as the handler checks: key/value broadcast on the last batch dim
            n = query.ndim - len(problem.shape) - 2
            assert key.shape[n - 1] == 1 and query.shape[n - 1] % dkv_sum == 0, dkv_sum
            acc = jnp.promote_types(dk.dtype, jnp.float32)
            dk, dv = (x.astype(acc).reshape(x.shape[:n - 1] + (-1, dkv_sum) + x.shape[n:])
                      .sum(n).astype(x.dtype) for x in (dk, dv))
        return dq, dk, dv

    monkeypatch.setattr(cuda, "_forward_call", forward)
    monkeypatch.setattr(cuda, "_backward_call", backward)
