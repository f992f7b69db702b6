"""What the GPU tests (``test_cuda_gpu.py``, ``test_sharding_gpu.py``) share: tolerances,
the relative error, a forward+backward with additional tokens. Not a test module."""

from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp

TOL = {  # relative L2 error (out, lse, grads) vs a float32 reference
    jnp.float32: (2e-5, 2e-5, 5e-5),
    jnp.float16: (4e-3, 1e-4, 1e-2),
    jnp.bfloat16: (2.5e-2, 5e-4, 5e-2),
}


def rel(a, b) -> float:
    """Relative L2 error of ``a`` against ``b``; ``a`` must be finite (outputs start
    poisoned, so an element no kernel wrote is NaN or inf)."""
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    assert np.isfinite(a).all(), "NaN or inf in the kernel output (unwritten or broken)"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def fwd_bwd(op):
    """``(q, k, v, ak, av, do, dl) -> (out, lse, dq, dk, dv, d_ak, d_av)`` of
    ``op(q, k, v, ak, av) -> (out, lse)`` (``ak``/``av``: the additional tokens)."""
    def f(q, k, v, ak, av, do, dl):
        (o, l), vjp = jax.vjp(op, q, k, v, ak, av)
        return (o, l) + tuple(vjp((do.astype(o.dtype), dl)))
    return f


def assert_close_bf16(got, ref, tokens: int, label: str = "") -> dict:
    """``fwd_bwd``'s outputs against a reference's within the bfloat16 tolerances (the
    tokens' two gradients only where there are tokens); returns the errors."""
    names = ("out", "lse", "dq", "dk", "dv", "d_tokens_k", "d_tokens_v")[:7 if tokens else 5]
    errs = {n: rel(a, r) for n, a, r in zip(names, got, ref)}
    print(label, tokens, errs)
    t_out, t_lse, t_grad = TOL[jnp.bfloat16]
    assert errs["out"] < t_out and errs["lse"] < t_lse, errs
    assert max(errs[n] for n in names[2:]) < t_grad, errs
    return errs
