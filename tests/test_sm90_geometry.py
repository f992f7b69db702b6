"""The Hopper kernels' tile geometry, run on the CPU (no GPU needed).

``tests/sm90_geometry_driver.cu`` is compiled with nvcc as a host program around the
kernels' own ``FwdTile`` / ``KeyTile`` code (``csrc/gna_fwd_sm90.cuh``,
``csrc/gna_bwd_sm90.cuh``) and the planner (``csrc/gna_plan.h``). For every tile plan
the kernels use (128x128 forward, 128x64 dQ, 64x128 dK/dV) it checks against a brute
force over the window math that each visible (query, key) pair lies in exactly one
visited tile, that "full" tiles (no element mask) are exactly the fully visible ones
(per axis for the query-outer kernels), that the forward's element mask as bits
(``window_bits``) equals the brute force for every thread, and that the per-key query
intervals of the dK/dV kernel are exact; and that the kernels' divisions by host-made
magic numbers (``FastDiv``, ``csrc/gna_problem.h``) equal integer division.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import numpy as np
import pytest

from jax_gna import mask
from jax_gna.params import Problem

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed")
    exe = tmp_path_factory.mktemp("geometry") / "sm90_geometry"
    cmd = ["nvcc", "-std=c++17", "-O2", "--expt-relaxed-constexpr", f"-I{ROOT / 'csrc'}",
           str(ROOT / "tests" / "sm90_geometry_driver.cu"), "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return str(exe)


def _line(shape, k, s, c, q_origin=None, q_extent=None, slack=0) -> str:
    n = len(shape)
    p = Problem(shape=tuple(shape), kernel_size=tuple(k), stride=tuple(s), dilation=(1,) * n,
                is_causal=tuple(bool(x) for x in c), scale=1.0)
    q_origin = q_origin or (0,) * n
    q_extent = q_extent or tuple(shape)
    fields = [str(n)]
    for a in range(n):
        i = np.arange(q_origin[a], q_origin[a] + q_extent[a])
        first, last = mask.window_extent(i, p.axis(a))
        kv0 = max(0, int(first.min()) - slack)
        kv1 = min(shape[a], int(last.max()) + 1 + slack)
        fields += [str(x) for x in (shape[a], k[a], s[a], int(bool(c[a])), q_origin[a], q_extent[a],
                                    kv0, kv1 - kv0)]
    return " ".join(fields)


def _random_lines(seed: int, count: int) -> list[str]:
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(count):
        n = int(rng.integers(1, 4))
        shape = [int(rng.integers(3, {1: 600, 2: 48, 3: 20}[n])) for _ in range(n)]
        k = [int(rng.integers(2, L + 1)) for L in shape]
        s = [int(rng.integers(1, kk + 1)) for kk in k]
        c = [bool(rng.integers(0, 2)) for _ in range(n)]
        if rng.random() < 0.4:  # a block (a shard), maybe with a slack key block
            q0 = [int(rng.integers(0, L)) for L in shape]
            qn = [int(rng.integers(1, L - o + 1)) for L, o in zip(shape, q0)]
            lines.append(_line(shape, k, s, c, q0, qn, slack=int(rng.integers(0, 9))))
        else:
            lines.append(_line(shape, k, s, c))
    return lines


CASES = [
    _line((2048,), (256,), (64,), (False,)),
    _line((4096,), (1024,), (128,), (False,)),  # edge key tiles heavier and lighter (block order)
    _line((1000,), (129,), (1,), (True,)),
    _line((64, 48), (13, 13), (1, 1), (False, False)),
    _line((64, 64), (16, 16), (8, 8), (False, False)),
    _line((33, 70), (9, 17), (3, 5), (True, False)),
    _line((20, 23), (5, 4), (2, 1), (False, True)),
    _line((8, 16, 24), (4, 8, 8), (4, 8, 8), (False, False, False)),
    _line((10, 12, 20), (5, 7, 9), (1, 1, 1), (True, False, False)),
    _line((6, 9, 10), (3, 4, 5), (1, 2, 3), (True, False, True)),
    _line((40, 30), (5, 4), (1, 2), (False, True), (10, 5), (12, 17)),
    _line((40, 30), (5, 4), (1, 2), (False, True), (30, 0), (6, 30), slack=40),
]


def _run(driver, lines):
    r = subprocess.run([driver], input="\n".join(lines) + "\n", capture_output=True, text=True)
    out = r.stdout.strip().splitlines()
    assert r.returncode == 0 and len(out) == len(lines), r.stdout[-3000:] + r.stderr[-2000:]
    return out


def test_named_cases(driver):
    out = _run(driver, CASES)
    assert all(o.startswith("ok") for o in out), out
    # The plans exist for these problems (none is below a 128-token tile).
    assert all(o.endswith("3 plans") for o in out), out


def test_random_cases(driver):
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print("seed", seed)
    lines = _random_lines(seed, 60)
    out = _run(driver, lines)
    assert all(o.startswith("ok") for o in out), (seed, out)


def test_a_wrong_geometry_is_caught(driver):
    """The brute force can fail: a key block that misses windows makes visits fall outside."""
    bad = _line((512,), (9,), (1,), (False,), (100,), (200,)).split()
    bad[7], bad[8] = str(int(bad[7]) + 3), str(int(bad[8]) - 3)  # shrink the key block
    r = subprocess.run([driver], input=" ".join(bad) + "\n", capture_output=True, text=True)
    assert r.returncode == 1 and "FAIL" in r.stdout, r.stdout


def test_fast_div(driver):
    """The kernels' host-made divisions (FastDiv) equal `/` over divisors and numerators
    up to 2^31 - 1 (near multiples of the divisor, the ends, and scattered values)."""
    r = subprocess.run([driver, "--fast-div"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout[-3000:] + r.stderr[-2000:]
    assert int(r.stdout.split()[1]) > 500_000, r.stdout
