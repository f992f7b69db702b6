"""Shared test set-up: tests marked ``gpu`` run only where JAX sees a CUDA GPU; this
folder on the import path, so that test modules import the helpers beside them
(``kernel_fakes``, ``gpu_checks``) under Bazel's test target too, whose runfiles do not
put it there."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _have_gpu() -> bool:
    import jax

    try:
        return len(jax.devices("gpu")) > 0
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if not any("gpu" in item.keywords for item in items):
        return
    if _have_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
