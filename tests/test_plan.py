"""The Hopper tile planner (csrc/gna_plan.h) against the simulator (jax_gna.sim).

Issue 5 asks that the kernels choose their tile shapes with the simulator, "or with
the same math". This test compiles tests/plan_driver.cc (host-only C++, no CUDA),
which fills a ``gna::Params`` as csrc/gna_ffi.cu's ``make_params`` does and calls
``gna::choose_tiles``, and checks on 37 problems (the dilation-1 problems of the
``paper`` preset of jax_gna/bench.py, seeded random full-grid problems of rank 1-3
with causal/stride mixes, and query/key blocks with non-zero origins as a shard
sees them):

* visits: for every candidate pair of tile shapes, the C++ count of visited
  (query tile, key tile) pairs equals the simulator's (``axis_tiles`` per axis,
  ``SimResult.visited_total`` for the chosen pair);
* masks: the C++ count of tiles that skip the element mask equals the simulator's
  ``full`` counts with one documented difference (below);
* the choice: the C++ plan's objective ``visits + 0.25 * masked`` is the minimum
  of that objective over every candidate that ``sim.tile_shapes(128, lengths)``
  gives with power-of-two extents (ties may pick different shapes, so objective
  values are compared, not shapes).

Two conventions differ, both on purpose, and the test pins them:

1. A key tile that runs past the end of the key block (the last tile of an axis
   whose length the extent does not divide) always needs the element mask in the
   kernel: TMA zero-fills the padding keys, whose scores (0) must be masked out of
   the softmax. ``gna_plan.h`` (and the kernel's own ``full`` test in
   gna_fwd_sm90.cuh) therefore counts it as masked, while ``sim`` calls a tile full
   when every *real* key is seen ("the bounds checks of padded elements are not
   counted as element masks", sim's module docstring). Visits never differ. With
   sim's per-axis ``full`` matrix restricted to the key tiles that do not run past
   the axis end, the counts agree exactly. With sim's raw counts the optimum can
   differ: see ``test_raw_sim_convention_changes_one_paper_choice``.
2. ``sim.tile_shapes`` allows extents up to twice an axis length; the planner caps
   them at the smallest power of two >= the length (``pow2_cap``). The two
   power-of-two sets differ only by the extent ``2n`` on an axis whose length ``n``
   is a power of two (a tile that is half padding); the test checks that and that
   those extra candidates never beat the plan here.

Blocks (``q0``/``kv0`` > 0 or extents shorter than the axis): the planner aligns
query tiles at the query-block origin and key tiles at the key-block origin, while
``sim`` aligns both at the grid origin and tiles the whole grid, so sim's counts do
not apply. For those problems (and, as a cross-check, the small full-grid ones) the
counts are compared with a direct element-wise count written from the window
definition of SEMANTICS.md (``jax_gna.mask.is_neighbor``).
"""

from __future__ import annotations

import itertools
import math
import os
import random
import shutil
import subprocess

import numpy as np
import pytest

from jax_gna import sim
from jax_gna.bench import PRESETS
from jax_gna.mask import is_neighbor, window
from jax_gna.params import Axis

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TILE = 128


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


# --------------------------------------------------------------------------
# Problems: (name, [(L, k, s, causal, q0, qn, kv0, kvn) per axis]).
# --------------------------------------------------------------------------

def _full(shape, kernel, stride, causal):
    return [(L, k, s, int(c), 0, L, 0, L) for L, k, s, c in zip(shape, kernel, stride, causal)]


def _paper_problems():
    out = []
    for c in PRESETS["paper"]:
        if any(d != 1 for d in c.dilation):
            continue
        out.append((c.name, _full(c.shape, c.kernel_size, c.stride, c.is_causal)))
    return out


def _random_full(rng: random.Random, n: int):
    out = []
    while len(out) < n:
        rank = 1 + len(out) % 3
        lo_len = {1: 96, 2: 8, 3: 4}[rank]
        hi_len = {1: 300, 2: 40, 3: 20}[rank]
        shape = [rng.randint(lo_len, hi_len) for _ in range(rank)]
        if math.prod(shape) < TILE:
            continue
        kernel = [rng.randint(2, L) for L in shape]
        stride = [rng.choice([1, 1, rng.randint(1, k)]) for k in kernel]
        causal = [rng.random() < 0.35 for _ in range(rank)]
        name = "rand-{}-k{}-s{}-c{}".format(
            "x".join(map(str, shape)), "x".join(map(str, kernel)), "x".join(map(str, stride)),
            "".join("T" if c else "F" for c in causal))
        out.append((name, _full(shape, kernel, stride, causal)))
    return out


def _block_axis(rng: random.Random, L: int, k: int, s: int, c: int, sharded: bool):
    """A query block and the smallest key block holding its windows plus a random halo."""
    ax = Axis(L, k, s, 1, bool(c))
    if sharded:
        qn = rng.randint(max(1, L // 4), max(1, L // 2))
        q0 = rng.randint(1, L - qn)
    else:
        q0, qn = 0, L
    lo, _ = window(q0, ax)
    _, hi = window(q0 + qn - 1, ax)
    kv0 = max(0, int(lo) - rng.randint(0, 3))
    kv_end = min(L, int(hi) + 1 + rng.randint(0, 3))
    return (L, k, s, c, q0, qn, kv0, kv_end - kv0)


def _shard(L, k, s, c, q0, qn):
    ax = Axis(L, k, s, 1, bool(c))
    lo, _ = window(q0, ax)
    _, hi = window(q0 + qn - 1, ax)
    return (L, k, s, c, q0, qn, int(lo), int(hi) - int(lo) + 1)


def _random_blocks(rng: random.Random, n: int):
    out = []
    while len(out) < n:
        rank = 1 + len(out) % 3
        shape = [rng.randint({1: 300, 2: 24, 3: 8}[rank], {1: 900, 2: 64, 3: 32}[rank])
                 for _ in range(rank)]
        kernel = [rng.randint(2, max(2, L // 2)) for L in shape]
        stride = [rng.choice([1, rng.randint(1, k)]) for k in kernel]
        causal = [int(rng.random() < 0.35) for _ in range(rank)]
        sharded = [rng.random() < 0.6 for _ in range(rank)]
        sharded[rng.randrange(rank)] = True  # at least one axis is a real block
        axes = [_block_axis(rng, *p, sh) for p, sh in zip(zip(shape, kernel, stride, causal), sharded)]
        if math.prod(a[5] for a in axes) < TILE:
            continue
        name = "block-" + "_".join(
            f"L{L}k{k}s{s}{'c' if c else ''}q{q0}+{qn}kv{kv0}+{kvn}"
            for L, k, s, c, q0, qn, kv0, kvn in axes)
        out.append((name, axes))
    return out


_RNG = random.Random(20240505)
PROBLEMS = (
    _paper_problems()
    + _random_full(_RNG, 9)
    + [("tiny-8x8-k3x3", _full((8, 8), (3, 3), (1, 1), (False, False)))]  # < 128 tokens
    + [
        # Shard-like blocks: a query block and the smallest key block holding its
        # windows (the HunyuanVideo one: the second half of the time axis).
        ("shard-hunyuan-t1of2", [_shard(30, 18, 1, 0, 15, 15), _shard(48, 24, 1, 0, 0, 48),
                                 _shard(80, 24, 1, 0, 0, 80)]),
        ("shard-flux-row-causal", [_shard(256, 80, 1, 1, 128, 64), _shard(256, 80, 1, 0, 0, 256)]),
        ("shard-1d-causal-s16", [_shard(4096, 512, 16, 1, 1024, 1024)]),
    ]
    + _random_blocks(_RNG, 9)
)
NAMES = [p[0] for p in PROBLEMS]
BY_NAME = dict(PROBLEMS)


def _is_full_grid(axes) -> bool:
    return all(q0 == 0 and qn == L and kv0 == 0 and kvn == L for L, _, _, _, q0, qn, kv0, kvn in axes)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _pow2_cap(n: int) -> int:
    c = 1
    while c < n and c < TILE:
        c *= 2
    return c


# --------------------------------------------------------------------------
# The C++ driver.
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler (g++, c++ or clang++; or $CXX)")
    exe = str(tmp_path_factory.mktemp("plan") / "plan_driver")
    cmd = [cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-I", os.path.join(ROOT, "csrc"),
           os.path.join(HERE, "plan_driver.cc"), "-o", exe]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}"
    return exe


def _run_driver(exe, problems):
    """The driver's output per problem: (name, axes) or (name, axes, (ctas, sms)), the
    latter also asking for the forward's query tiles per CTA."""
    lines = [" ".join([str(len(pr[1]))] + [" ".join(map(str, a)) for a in pr[1]] +
                      [" ".join(map(str, x)) for x in pr[2:]])
             for pr in problems]
    r = subprocess.run([exe, "all"], input="\n".join(lines) + "\n", capture_output=True,
                       text=True, check=True)
    out, cur = [], None
    for line in r.stdout.splitlines():
        t = line.split()
        if t[0] == "plan":
            cur = {"ok": t[1] == "1", "qt": tuple(map(int, t[2:5])), "kt": tuple(map(int, t[5:8])),
                   "visits": int(t[8]), "full": int(t[9]), "cost": float(t[10]), "cands": {}}
        elif t[0] == "keys":
            cur["keys"] = (float(t[1]), float(t[2]), t[3] == "1")
        elif t[0] == "pair":
            cur["pair"] = (int(t[1]), int(t[2]))
        elif t[0] == "items":
            cur["items"] = (int(t[1]), int(t[2]), int(t[3]))
        elif t[0] == "pairs":
            cur["pairs"] = (int(t[1]), int(t[2]), t[3] == "1")
        elif t[0] == "cand":
            cur["cands"][(tuple(map(int, t[1:4])), tuple(map(int, t[4:7])))] = (int(t[7]), int(t[8]))
        else:
            assert t[0] == "end", line
            out.append(cur)
    assert len(out) == len(problems)
    return out


@pytest.fixture(scope="module")
def plans(driver):
    """name -> the driver's plan, with shapes cut to the problem's rank."""
    res = {}
    for (name, axes), r in zip(PROBLEMS, _run_driver(driver, PROBLEMS)):
        off = 3 - len(axes)
        for shp in (r["qt"], r["kt"]):
            assert all(e == 1 for e in shp[:off]) or not r["ok"], (name, r)
        cands = {}
        for (q, k), vf in r["cands"].items():
            assert q[:off] == (1,) * off and k[:off] == (1,) * off, (name, q, k)
            cands[(q[off:], k[off:])] = vf
        r = dict(r, qt=r["qt"][off:], kt=r["kt"][off:], cands=cands)
        res[name] = r
    return res


# --------------------------------------------------------------------------
# The two independent counts.
# --------------------------------------------------------------------------

def _axes(axes):
    return [Axis(L, k, s, 1, bool(c)) for L, k, s, c, *_ in axes]


def _sim_counts(axes, qt, kt):
    """(visits, full as sim counts it, full with padded key tiles masked) from sim.axis_tiles."""
    v = f_sim = f_pad = 1
    for ax, q, k in zip(_axes(axes), qt, kt):
        t = sim.axis_tiles(ax, q, k)
        whole = (np.arange(t.n_kv_tiles) + 1) * k <= ax.length  # key tiles with no padding
        v *= int(t.visited.sum())
        f_sim *= int(t.full.sum())
        f_pad *= int(t.full[:, whole].sum())
    return v, f_sim, f_pad


def _direct_axis(axis, q_tile, kv_tile):
    """Per-axis (visits, full-real, full-padded) from the element-wise window definition,
    query tiles aligned at the query-block origin, key tiles at the key-block origin."""
    L, k, s, c, q0, qn, kv0, kvn = axis
    ax = Axis(L, k, s, 1, bool(c))
    i = np.arange(q0, q0 + qn)
    j = np.arange(kv0, kv0 + kvn)
    nbr = is_neighbor(i[:, None], j[None, :], ax)
    # Every window of the block lies in the key block (make_params rejects the rest).
    assert nbr.sum() == sum(int(h - lo + 1) for lo, h in zip(*window(i, ax)))
    # Tile the [query, key] neighbor matrix; padding rows and columns are neutral for
    # "any" and "all", except that a padding key is never seen (the "padded" count).
    n_qt, n_kt = -(-qn // q_tile), -(-kvn // kv_tile)
    rq, rk = n_qt * q_tile - qn, n_kt * kv_tile - kvn

    def tiles(m, fill_rows, fill_cols):
        m = np.pad(m, ((0, rq), (0, rk)), constant_values=fill_cols)
        m[qn:] = fill_rows
        return m.reshape(n_qt, q_tile, n_kt, kv_tile)

    visited = tiles(nbr, False, False).any(axis=(1, 3))
    full_real = tiles(nbr, True, True).all(axis=(1, 3))
    full_pad = tiles(nbr, True, False).all(axis=(1, 3))
    assert not (full_real & ~visited).any()
    return int(visited.sum()), int(full_real.sum()), int(full_pad.sum())


def _direct_counts(axes, qt, kt):
    v = f_real = f_pad = 1
    for axis, q, k in zip(axes, qt, kt):
        a, b, c = _direct_axis(axis, q, k)
        v, f_real, f_pad = v * a, f_real * b, f_pad * c
    return v, f_real, f_pad


def _sim_pow2_candidates(lengths):
    return [t for t in sim.tile_shapes(TILE, lengths) if all(_is_pow2(e) for e in t)]


def _all_pow2_shapes(rank):
    exps = range(8)
    return {tuple(2 ** e for e in c) for c in itertools.product(exps, repeat=rank)
            if sum(c) == 7}


def _objective4(visits, full):
    """4 * (visits + 0.25 * masked), an integer."""
    return 5 * visits - full


# --------------------------------------------------------------------------
# Tests.
# --------------------------------------------------------------------------

def test_problem_mix():
    full = [n for n, a in PROBLEMS if _is_full_grid(a)]
    blocks = [n for n, a in PROBLEMS if not _is_full_grid(a)]
    assert len(PROBLEMS) >= 30 and len(blocks) >= 10
    assert {len(a) for _, a in PROBLEMS} == {1, 2, 3}
    assert any(any(x[3] for x in a) for _, a in PROBLEMS)   # causal
    assert any(any(x[2] > 1 for x in a) for _, a in PROBLEMS)  # strided
    assert any(any(x[4] > 0 for x in BY_NAME[n]) for n in blocks)  # non-zero origins
    assert len(full) >= 20


@pytest.mark.parametrize("name", NAMES)
def test_candidate_set(plans, name):
    """The planner's candidates are sim.tile_shapes's power-of-two ones, less extents 2n on
    power-of-two axes of length n (sim allows up to twice the length, the planner pow2_cap)."""
    axes = BY_NAME[name]
    qlen = [a[5] for a in axes]
    klen = [a[7] for a in axes]
    r = plans[name]

    def expected(lengths):
        return {t for t in _sim_pow2_candidates(lengths)
                if all(e <= n or not _is_pow2(n) for e, n in zip(t, lengths))
                and all(e <= 2 * n for e, n in zip(t, lengths))}

    # sim.tile_shapes falls back to every factorization when none fits (a grid under
    # one tile); the planner then has no plan and the Hopper path is not taken.
    eq, ek = expected(qlen), expected(klen)
    for shapes, lengths in ((eq, qlen), (ek, klen)):  # the same set as pow2_cap gives
        assert shapes == {t for t in _all_pow2_shapes(len(lengths))
                          if all(e <= _pow2_cap(n) for e, n in zip(t, lengths))}
    got = set(r["cands"])
    assert got == {(q, k) for q in eq for k in ek}
    assert r["ok"] == bool(got)
    if r["ok"]:
        assert (r["qt"], r["kt"]) in got
        assert math.prod(r["qt"]) == math.prod(r["kt"]) == TILE


@pytest.mark.parametrize("name", [n for n in NAMES if _is_full_grid(BY_NAME[n])])
def test_counts_match_sim(plans, name):
    """Full grids: for every candidate pair, visits equal sim's; full tiles equal sim's
    with the key tiles that run past the axis end counted as masked (and equal sim's
    raw count whenever no key tile runs past the end)."""
    axes = BY_NAME[name]
    r = plans[name]
    for (qt, kt), (v, f) in r["cands"].items():
        sv, sf, sf_pad = _sim_counts(axes, qt, kt)
        assert v == sv, (qt, kt)
        assert f == sf_pad, (qt, kt)
        if all(a[0] % e == 0 for a, e in zip(axes, kt)):
            assert f == sf, (qt, kt)
    if r["ok"]:
        s = sim.simulate([a[0] for a in axes], [a[1] for a in axes], [a[2] for a in axes], 1,
                         [bool(a[3]) for a in axes], q_tile=r["qt"], kv_tile=r["kt"])
        assert r["visits"] == s.visited_total
        assert r["visits"] - r["full"] >= s.masked_total
        assert r["cost"] == pytest.approx(r["visits"] + 0.25 * (r["visits"] - r["full"]), abs=0)


@pytest.mark.parametrize("name", [n for n in NAMES if _is_full_grid(BY_NAME[n])])
def test_choice_is_sim_optimum(plans, name):
    """Full grids: the plan's objective is the minimum over sim's power-of-two candidates
    (computed from sim's per-axis counts, padded key tiles masked as the kernel does),
    including the extents 2n that the planner leaves out."""
    axes = BY_NAME[name]
    lengths = [a[0] for a in axes]
    r = plans[name]
    cands = _sim_pow2_candidates(lengths)
    if not r["ok"]:
        assert all(any(e > _pow2_cap(n) for e, n in zip(t, lengths)) for t in cands)
        return
    best = min(_objective4(v, f_pad) for q in cands for k in cands
               for v, _, f_pad in [_sim_counts(axes, q, k)])
    assert _objective4(r["visits"], r["full"]) == best
    assert 4 * r["cost"] == best


@pytest.mark.parametrize("name", [n for n in NAMES  # the element-wise count: axes <= 4096
                                  if max(a[5] * a[7] for a in BY_NAME[n]) <= 1 << 24])
def test_counts_and_choice_direct(plans, name):
    """Counts and optimum against a direct element-wise count from the window definition,
    query tiles aligned at the query-block origin and key tiles at the key-block origin
    (the only check that applies to blocks; on full grids it cross-checks sim)."""
    axes = BY_NAME[name]
    r = plans[name]
    if not r["ok"]:
        assert not r["cands"]
        return
    costs = {}
    for (qt, kt), (v, f) in r["cands"].items():
        dv, _, df_pad = _direct_counts(axes, qt, kt)
        assert (v, f) == (dv, df_pad), (qt, kt)
        costs[(qt, kt)] = _objective4(dv, df_pad)
    assert _objective4(r["visits"], r["full"]) == min(costs.values())
    if _is_full_grid(axes):  # the direct count and sim agree on full grids
        for qt, kt in list(r["cands"])[::7]:
            assert _direct_counts(axes, qt, kt) == _sim_counts(axes, qt, kt)


def test_raw_sim_convention_changes_one_paper_choice(plans):
    """With sim's raw counts (a padded key tile is full when every real key is seen),
    HunyuanVideo 30x48x80 with window 30x40x40 (the window spans the whole time axis)
    prefers 32x4x1 tiles: one 32-frame key tile covers the 30 frames, and every query
    sees all of them. The kernel must mask the two zero-filled padding frames, so the
    planner counts all of those tiles as masked and picks 2x16x4 / 2x8x8 instead."""
    name = "hunyuan-30x48x80-w30x40x40-s1x1x1"
    axes = BY_NAME[name]
    r = plans[name]
    cands = _sim_pow2_candidates([a[0] for a in axes])
    raw = {(q, k): _sim_counts(axes, q, k) for q in cands for k in cands}
    raw_best = min(raw, key=lambda qk: (_objective4(raw[qk][0], raw[qk][1]), qk))
    assert raw_best == ((32, 4, 1), (32, 4, 1))
    v, f_sim, f_pad = raw[raw_best]
    assert f_pad == 0 and f_sim > 0  # partly unmasked for sim, all masked in the kernel
    time_axis = sim.axis_tiles(Axis(30, 30, 1, 1, False), 32, 32)
    assert time_axis.full.all() and time_axis.n_kv_tiles == 1  # the 30 real frames: all seen
    assert _objective4(v, f_sim) < _objective4(*raw[(r["qt"], r["kt"])][:2])
    assert _objective4(v, f_pad) > _objective4(r["visits"], r["full"])
    # Every other dilation-1 paper problem: the raw sim optimum has the planner's value.
    for other, _ in _paper_problems():
        if other == name:
            continue
        ax = BY_NAME[other]
        c = _sim_pow2_candidates([a[0] for a in ax])
        vals = [_objective4(*_sim_counts(ax, q, k)[:2]) for q in c for k in c]
        p = plans[other]
        assert min(vals) == _objective4(*_sim_counts(ax, p["qt"], p["kt"])[:2]), other


# The forward's key tiles at head dims <= 128, on the problems measured with both
# (benchmarks/results/short-key-tiles-h200.md): (name, shape, window, stride, ratio of key
# columns 64-token / 128-token plan as that file gives it, 64-token tiles chosen).
KEY_TILE_CASES = [
    ("1d-16384-w33", (16384,), (33,), (1,), 0.668, True),
    ("1d-16384-w129", (16384,), (129,), (1,), 0.668, True),
    ("1d-16384-w193", (16384,), (193,), (1,), 1.000, False),
    ("1d-16384-w385", (16384,), (385,), (1,), 0.802, False),
    ("2d-128-w7", (128, 128), (7, 7), (1, 1), 0.758, True),
    ("2d-128-w13", (128, 128), (13, 13), (1, 1), 0.767, True),
    ("2d-128-w21", (128, 128), (21, 21), (1, 1), 0.824, False),
    ("2d-64-w7", (64, 64), (7, 7), (1, 1), 0.808, False),
    ("3d-8x64x64-w3", (8, 64, 64), (3, 3, 3), (1, 1, 1), 0.762, True),
    ("3d-16x32x32-w3x7x7", (16, 32, 32), (3, 7, 7), (1, 1, 1), 1.000, False),
    ("2d-256-w80-s1", (256, 256), (80, 80), (1, 1), 0.940, False),
    ("3d-30x48x80-s1", (30, 48, 80), (18, 24, 24), (1, 1, 1), 0.913, False),
    ("1d-32768-w2048-s1", (32768,), (2048,), (1,), 1.000, False),
    ("2d-256-w80-s16", (256, 256), (80, 80), (16, 16), 1.000, False),
]


def _plans_by_name(driver, rows):
    """name -> the driver's output, one run for all rows: (name, shape, window, stride)
    of non-causal problems over the whole grid, optionally followed by (ctas, sms)."""
    problems = [(name, _full(shape, window, stride, (False,) * len(shape)), *tail)
                for name, shape, window, stride, *tail in rows]
    return {p[0]: r for p, r in zip(problems, _run_driver(driver, problems))}


@pytest.fixture(scope="module")
def key_tile_plans(driver):
    return _plans_by_name(driver, [c[:4] for c in KEY_TILE_CASES])


@pytest.mark.parametrize("name,ratio,short", [(c[0], c[4], c[5]) for c in KEY_TILE_CASES],
                         ids=[c[0] for c in KEY_TILE_CASES])
def test_forward_key_tiles(key_tile_plans, name, ratio, short):
    """``gna::short_keys_pay`` (the Hopper forward's choice of 64-token key tiles at head
    dims <= 128) on the problems measured with both, and the column ratios behind it as
    the results file quotes them; the 128-token plan's visits are the plan line's. Every
    problem at <= 0.8 of the columns was faster with 64-token tiles; of those above, two
    were too (1-D window 385 at 0.802 by 6.9%, 2-D 64x64 window 7 at 0.808 by 1.2%) and
    the rest slower (2-D window 21 at 0.824 by 3.1%): the threshold 0.8 stays below them."""
    r = key_tile_plans[name]
    v128, v64, got = r["keys"]
    assert v128 == r["visits"]
    assert round(64 * v64 / (128 * v128), 3) == ratio
    assert got == short


# The forward's query tiles per CTA (gna::forward_items) on the problems measured with
# several counts (H200, 132 SMs, bf16; benchmarks/results/fwd-items-h200.md): name,
# shape, window, stride, batches x heads, the chosen count. Only where the forward has
# the kernel: head dim 64, or 128 with 64-token key tiles (keys picks them).
ITEMS_CASES = [
    ("1d-16384-w33-b8h16", (16384,), (33,), (1,), 128, 8),           # 8: -16.5%, 4: -14.5%
    ("1d-16384-w129-b8h16", (16384,), (129,), (1,), 128, 8),         # 8: -16.1 / -16.9%
    ("1d-4096-w129-b8h16", (4096,), (129,), (1,), 128, 8),           # 8: -15.1%
    ("1d-4096-w129-b8h4", (4096,), (129,), (1,), 32, 8),             # 8: -21.0%, 2: -5.5%
    ("2d-128-w7-b16h16", (128, 128), (7, 7), (1, 1), 256, 8),        # D 64; 8: -5.5 / -5.6%
    ("2d-128-w7-b1h16", (128, 128), (7, 7), (1, 1), 16, 8),          # D 64; 8: -4.5 / -4.6%, 4: -3.6%
    ("2d-128-w21-b16h16", (128, 128), (21, 21), (1, 1), 256, 8),     # D 64; 8: -3.3%, 4: -3.4%
    ("3d-8x64x64-w3-b16h16", (8, 64, 64), (3, 3, 3), (1, 1, 1), 256, 8),  # D 64; 8: -6.6%
    ("1d-32768-w2048-s1-h1", (32768,), (2048,), (1,), 1, 2),         # D 64; 2: -4.4%, 8: +263%
]


@pytest.fixture(scope="module")
def item_plans(driver):
    return _plans_by_name(driver, [(*c[:4], (c[4], 132)) for c in ITEMS_CASES])


@pytest.mark.parametrize("name,items", [(c[0], c[5]) for c in ITEMS_CASES], ids=[c[0] for c in ITEMS_CASES])
def test_forward_items(item_plans, name, items):
    """``gna::forward_items`` on the problems measured with several query tiles per CTA: 8
    wherever 8 was the fastest count measured, and 2 on the one-head 1-D problem whose 256
    query tiles would leave 32 CTAs at 8 (3.6x slower there; 2 was 4.4% faster than 1)."""
    assert item_plans[name]["items"][1] == items


# The same for the kernel with one Q slot (head dim 128, 128-token key tiles; sessions 37-38,
# benchmarks/results/fwd-items-h200.md): counts 1/2/4/8 forced, kernel time against 1
# (strided query tiles where marked, consecutive ones otherwise).
ONE_SLOT_CASES = [
    ("1d-2048-w257-b8h16", (2048,), (257,), (1,), 128, 8),           # 8: -16.0% strided, 4: -10.9%
    ("1d-16384-w385-b8h16", (16384,), (385,), (1,), 128, 8),         # 8: -8.1%, 4: -8.5%
    ("1d-4096-w257-b8h4", (4096,), (257,), (1,), 32, 8),             # 8: -18.1%
    ("1d-8192-w1024-b8h2", (8192,), (1024,), (1,), 16, 8),           # 8: -10.4% strided (+13.3% not)
    ("2d-64-w7-b16h16", (64, 64), (7, 7), (1, 1), 256, 8),           # 8: -8.7%
    ("3d-32-w5-b16h4", (32, 32, 32), (5, 5, 5), (1, 1, 1), 64, 8),   # 8: -4.9%
    ("1d-32768-w2048-s2048-h1", (32768,), (2048,), (2048,), 1, 2),   # 2: -2.4% (fp16 -2.8%)
    ("1d-32768-w2048-s1-h1", (32768,), (2048,), (1,), 1, 2),         # 2: -3.1% (fp16 -2.6%)
    ("1d-32768-w2048-s2048-h24", (32768,), (2048,), (2048,), 24, 8),  # 8: -1.6%, 4: -0.8%, 2: +1.0%
    ("1d-32768-w2048-s1-h24", (32768,), (2048,), (1,), 24, 8),       # 8: -1.2%, 4: -0.4%
    ("1d-65536-w2048-s2048-h1", (65536,), (2048,), (2048,), 1, 4),   # 4: -5.7%, 2: -3.6%
    ("1d-32768-w4096-s1-h1", (32768,), (4096,), (1,), 1, 1),         # 2: -1.3% (under the margin)
    ("2d-256-w80-s16-h1", (256, 256), (80, 80), (16, 16), 1, 1),     # 4: -1.7%, 2: -0.8% (under it)
    ("2d-256-w80-s16-h24", (256, 256), (80, 80), (16, 16), 24, 1),   # 2: +2.3%
    ("2d-256-w80-s1-h24", (256, 256), (80, 80), (1, 1), 24, 1),      # 2: +0.6%
    ("3d-w18x24x24-s16x8x8-h24", (30, 48, 80), (18, 24, 24), (16, 8, 8), 24, 1),  # 2: +1.5%
    ("3d-w18x24x24-s1-h24", (30, 48, 80), (18, 24, 24), (1, 1, 1), 24, 1),  # 2: +3.2%
]


@pytest.fixture(scope="module")
def one_slot_plans(driver):
    return _plans_by_name(driver, [(*c[:4], (c[4], 132)) for c in ONE_SLOT_CASES])


@pytest.mark.parametrize("name,items", [(c[0], c[5]) for c in ONE_SLOT_CASES], ids=[c[0] for c in ONE_SLOT_CASES])
def test_forward_items_one_slot(one_slot_plans, name, items):
    """``gna::forward_items`` with the one-slot kernel's cost per further query tile
    (kOneSlotItemTiles) and the 2% margin: 8 on the short CTAs where it was fastest, 2 on
    the 1-D one-head paper problems and 8 on the 1-D 24-head ones (2.4-3.1% and 1.2-1.6%
    faster, session 38), 1 on the multi-dimensional 24-head ones (2 per CTA slower) and
    where the measured gain was under 2% on one head."""
    r = one_slot_plans[name]
    assert r["keys"][2] == 0  # 128-token key tiles: the one-slot kernel
    assert r["items"][2] == items


# gna::pair_axis (the Hopper forward's pairs of query tiles with the same key tiles, run in
# clusters of two CTAs): shape, window, stride, causal, the axis with 128- and with 64-token
# key tiles (0-2 of the 3-D padded shape). The first six are tests/test_cuda_gpu.py's
# PAIR_CASES, which need pairs (the last two with an odd count of query tiles along the
# axis: the last one is alone); then a problem with pairs along two axes; then the paper
# problems (block-sparse ones pair, stride 1 does not; the 3-D block-sparse one along its
# first axis, 15 query tiles).
PAIR_AXIS_CASES = [
    ((4096,), (512,), (512,), (False,), (2, 2)),
    ((64, 64), (16, 16), (16, 16), (False, False), (1, 1)),
    ((8, 16, 32), (8, 8, 16), (1, 8, 16), (False,) * 3, (0, 0)),
    ((48, 96), (24, 40), (16, 32), (True, False), (1, 1)),
    ((1408,), (256,), (256,), (False,), (2, 2)),
    ((14, 16, 16), (10, 8, 8), (8, 8, 8), (False,) * 3, (0, 0)),
    # pairs along both axes: 3 tiles along the fastest, 4 along the other, which wins
    ((32, 48), (16, 32), (16, 32), (False, False), (1, 1)),
    ((32768,), (2048,), (2048,), (False,), (2, 2)),
    ((32768,), (2048,), (1,), (False,), (-1, -1)),
    ((256, 256), (80, 80), (16, 16), (False, False), (1, 1)),
    ((256, 256), (80, 80), (1, 1), (False, False), (-1, -1)),
    ((30, 48, 80), (18, 24, 24), (16, 8, 8), (False,) * 3, (0, 0)),
    ((30, 48, 80), (18, 24, 24), (1, 1, 1), (False,) * 3, (-1, -1)),
]


def test_pair_axis(driver):
    """``gna::pair_axis`` on problems with and without pairs, against a brute force over
    the plan's query tiles: of the axes where tiles 2i and 2i + 1 (where both exist) visit
    the same key tiles along it, the one whose pairs cover the most of its tiles, the
    fastest of equals."""
    problems = [(f"p{i}", _full(shape, w, s, c)) for i, (shape, w, s, c, _) in enumerate(PAIR_AXIS_CASES)]
    for (shape, w, s, c, want), r in zip(PAIR_AXIS_CASES, _run_driver(driver, problems)):
        assert r["pair"] == want, (shape, w, s, r["pair"])
        off = 3 - len(shape)
        found, covered = -1, 0.0
        for a in reversed(range(len(shape))):
            qt, kt = r["qt"][off + a], r["kt"][off + a]
            n = -(-shape[a] // qt)
            if n < 2:
                continue
            ax = Axis(shape[a], w[a], s[a], 1, c[a])
            ranges = []
            for i in range(n):
                q, qe = i * qt, min((i + 1) * qt, shape[a]) - 1
                ranges.append((int(window(q, ax)[0]) // kt, int(window(qe, ax)[1]) // kt))
            pairs_cover = n // 2 * 2 / n
            if all(ranges[i] == ranges[i + 1] for i in range(0, n - 1, 2)) and pairs_cover > covered:
                found, covered = off + a, pairs_cover
        assert r["pair"][0] == found, (shape, w, s, found)


# gna::pairs_pay (whether the Hopper forward's one-tile path runs its pairs: past 1.75
# waves and with at least 16 key tiles per query tile) on the problems measured with pairs
# (JAX_GNA_FWD_PAIR=force) and without (=0): name, shape, window, stride, heads, the
# choice. H200, bf16, kernel time of pairs against none (benchmarks/results/pairs-h200.md
# sections 10, 12, 13 and 14); every one of them runs one query tile per CTA at head dim 128.
PAIR_GATE_CASES = [
    ("2d-64-w16-s16-h1", (64, 64), (16, 16), (16, 16), 1, False),         # 2 tiles, 32 CTAs: +10.6%
    ("2d-128-w32-s32-h1", (128, 128), (32, 32), (32, 32), 1, False),      # 8 tiles, 128 CTAs: +3.3%
    ("2d-128-w32-s32-h3", (128, 128), (32, 32), (32, 32), 3, False),      # 8 tiles, 384 CTAs: +4.8%
    ("2d-64-w16-s16-h12", (64, 64), (16, 16), (16, 16), 12, False),       # 2 tiles, 384 CTAs: +5.0%
    ("3d-16x32x32-w8x16x16-h1", (16, 32, 32), (8, 16, 16), (8, 16, 16), 1, False),  # 16 tiles: +2.7%
    ("3d-16x32x32-w8x16x16-h3", (16, 32, 32), (8, 16, 16), (8, 16, 16), 3, True),   # -0.8% (+1.6% jit)
    ("2d-128-w80-s16-h1", (128, 128), (80, 80), (16, 16), 1, False),      # 50 tiles, 128 CTAs: +0.9%
    ("2d-192x128-w80-s16-h1", (192, 128), (80, 80), (16, 16), 1, False),  # 192 CTAs: +1.1%
    ("2d-128-w80-s16-h2", (128, 128), (80, 80), (16, 16), 2, True),       # -4.7% (+0.4% jit)
    ("2d-128-w80-s16-h4", (128, 128), (80, 80), (16, 16), 4, True),       # -2.4%
    ("2d-128-w80-s16-h8", (128, 128), (80, 80), (16, 16), 8, True),       # +2.1% (rounds 651-717 us)
    ("2d-256-w80-s16-h24", (256, 256), (80, 80), (16, 16), 24, True),     # -2.3%
    ("3d-w18x24x24-s16x8x8-h24", (30, 48, 80), (18, 24, 24), (16, 8, 8), 24, True),    # -1.3%
    ("cosmos-h24", (16, 44, 80), (16, 32, 48), (1, 8, 16), 24, True),     # -2.8%
    ("hunyuan-h24", (30, 48, 80), (30, 40, 40), (1, 32, 8), 24, True),    # -4.3%
    # 128 key tiles per query tile, 220 CTAs per head (session 44, four rounds)
    ("3d-16x44x40-h1", (16, 44, 40), (16, 32, 32), (1, 8, 16), 1, False),  # 1.67 waves: +1.2%
    ("3d-16x44x40-h2", (16, 44, 40), (16, 32, 32), (1, 8, 16), 2, True),   # 3.3 waves: -3.0%
    ("3d-16x44x40-h3", (16, 44, 40), (16, 32, 32), (1, 8, 16), 3, True),   # 5.0 waves: -3.2%
    ("3d-16x44x40-h4", (16, 44, 40), (16, 32, 32), (1, 8, 16), 4, True),   # 6.7 waves: -1.7%
    ("3d-16x44x40-h5", (16, 44, 40), (16, 32, 32), (1, 8, 16), 5, True),   # 8.3 waves: -2.4%
]


@pytest.fixture(scope="module")
def pair_gate_plans(driver):
    return _plans_by_name(driver, [(*c[:4], (c[4], 132)) for c in PAIR_GATE_CASES])


@pytest.mark.parametrize("name,shape,heads,pays", [(c[0], c[1], c[4], c[5]) for c in PAIR_GATE_CASES],
                         ids=[c[0] for c in PAIR_GATE_CASES])
def test_pairs_pay(pair_gate_plans, name, shape, heads, pays):
    """``gna::pairs_pay`` on the problems measured with and without pairs: none in one
    wave (2.7-10.6% slower there with few key tiles per query tile, 0.9% with 50), nor at
    1.45 and 1.67 waves (1.1% and 1.2% slower in every round), nor with 2 or 8 key tiles
    per query tile in 2.9 waves (5.0%, 4.8% slower); pairs from 16 key tiles per query tile
    past 1.75 waves (the paper problems 1.3-4.3% faster, 3.3-8.3 waves with 128 key tiles
    1.7-3.2%; the smaller ones within their noise). All run one query tile per CTA at head
    dim 128, so the gate decides their kernel; the pair grid's CTA count is checked."""
    r = pair_gate_plans[name]
    assert r["keys"][2] == 0 and r["items"][2] == 1  # 128-token key tiles, one tile per CTA
    axis, ctas, got = r["pairs"]
    off = 3 - len(shape)
    assert axis >= off
    n = [-(-shape[a] // r["qt"][off + a]) for a in range(len(shape))]
    along = n[axis - off]
    assert ctas == heads * math.prod(n) // along * 2 * ((along + 1) // 2)
    assert got == pays
