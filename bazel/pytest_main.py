"""Entry point of the Bazel test target: runs the CPU tests with pytest.

With no arguments it runs all of tests/; `--test_arg=tests/test_xla.py` (paths from
the workspace root) or any pytest option narrows that. The tests import the jax_gna
of this Bazel tree (its runfiles), not a copy installed in site-packages: an
editable install's import redirector is removed first.
"""

import os
import sys

sys.meta_path[:] = [f for f in sys.meta_path if "Redirect" not in type(f).__name__]

import pytest  # noqa: E402

if __name__ == "__main__":
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.chdir(root)
    user = sys.argv[1:]
    paths = [a for a in user if not a.startswith("-")]
    args = ([] if paths else ["tests"]) + ["-m", "not gpu", "-p", "no:cacheprovider", "-q"] + user
    import jax_gna  # noqa: E402  (say which tree is under test)

    print(f"jax_gna under test: {os.path.dirname(jax_gna.__file__)}")
    sys.exit(pytest.main(args))
