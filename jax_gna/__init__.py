"""jax_gna: generalized neighborhood attention for JAX.

Public API: :func:`na1d`, :func:`na2d`, :func:`na3d`, :func:`neighborhood_attention`
and :func:`explain`. The Flax layers live in :mod:`jax_gna.nn`.
"""

from .ops import explain, na1d, na2d, na3d, neighborhood_attention

__version__ = "0.1.0"

__all__ = ["na1d", "na2d", "na3d", "neighborhood_attention", "explain", "__version__"]
