"""The cuda backend's two kernel calls replaced by the xla backend, for CPU tests of the
code around them (folds, blocks, custom_vjp, delta): not a test module."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_gna import cuda, xla


def xla_kernel_calls(monkeypatch, record) -> None:
    """Patch ``cuda._forward_call`` / ``cuda._backward_call`` with ``xla.attention``;
    ``record(kind, query, problem)`` sees every call ("fwd" or "bwd"). The backward
    recovers d_lse from the kernels' delta = rowsum(dO * O) - d_lse."""
    def forward(query, key, value, problem, poison=False, devices=(), into=None):
        record("fwd", query, problem)
        return xla.attention(query, key, value, problem)

    def backward(query, key, value, d_out, lse, delta, problem, poison=False, devices=()):
        record("bwd", query, problem)
        (out, _), vjp = jax.vjp(lambda q, k, v: xla.attention(q, k, v, problem), query, key, value)
        return vjp((d_out, jnp.sum(d_out * out, axis=-1) - delta))

    monkeypatch.setattr(cuda, "_forward_call", forward)
    monkeypatch.setattr(cuda, "_backward_call", backward)
