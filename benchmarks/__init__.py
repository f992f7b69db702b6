"""The jax_gna benchmark suite (``python -m benchmarks.run``); the machinery lives in
:mod:`jax_gna.bench` so that the installed ``jax-gna bench`` runs it too."""
