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
    ``record(kind, query, problem)`` sees every call ("fwd" or "bwd"), ``query`` as the
    kernels see it: its batch dims flattened into one. Keys/values with 1s in the
    query's last batch dims are broadcast over them, as the kernels read them, and dK /
    dV come back per query batch. The backward recovers d_lse from the kernels' delta =
    rowsum(dO * O) - d_lse."""
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
        record("fwd", q, problem)
        return tuple(map(unflat, xla.attention(q, k, v, problem)))

    def backward(query, key, value, d_out, lse, delta, problem, poison=False, devices=()):
        (q, k, v, do, dl), unflat = flat(problem, query, key, value, d_out, delta)
        record("bwd", q, problem)
        (out, _), vjp = jax.vjp(lambda q, k, v: xla.attention(q, k, v, problem), q, k, v)
        return tuple(map(unflat, vjp((do, jnp.sum(do * out, axis=-1) - dl))))

    monkeypatch.setattr(cuda, "_forward_call", forward)
    monkeypatch.setattr(cuda, "_backward_call", backward)
