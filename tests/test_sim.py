"""The speed-of-light simulator: published values, brute force, FLOP counting."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from jax_gna import sim
from jax_gna.mask import is_neighbor
from jax_gna.params import Axis


# --------------------------------------------------------------------------
# Published values (GNA paper / NATTEN simulator).
# --------------------------------------------------------------------------

@pytest.mark.parametrize("shape, kernel, stride, q_tile, kv_tile, expected", [
    ((30, 48, 80), (18, 24, 24), 1, (4, 8, 8), (2, 8, 8), 3.27),          # HunyuanVideo NA
    ((30, 48, 80), (18, 24, 24), (16, 8, 8), (4, 8, 8), (2, 8, 8), 11.11),  # HunyuanVideo GNA
    ((256, 256), (80, 80), 1, (16, 16), (16, 8), 6.10),                  # FLUX NA
])
def test_known_values(shape, kernel, stride, q_tile, kv_tile, expected):
    r = sim.simulate(shape, kernel, stride, q_tile=q_tile, kv_tile=kv_tile)
    assert round(r.bound, 2) == expected
    assert r.bound == r.tile_bound
    assert r.tile_bound <= r.tile_bound_avg + 1e-12


def test_known_value_details():
    r = sim.simulate((30, 48, 80), (18, 24, 24), q_tile=(4, 8, 8), kv_tile=(2, 8, 8))
    assert (r.n_q_tiles, r.n_kv_tiles) == (8 * 6 * 10, 15 * 6 * 10)
    assert r.visited_worst == 11 * 5 * 5
    assert r.flop_bound == pytest.approx(30 * 48 * 80 / (18 * 24 * 24))
    blocked = sim.simulate((30, 48, 80), (18, 24, 24), (16, 8, 8), q_tile=(4, 8, 8),
                           kv_tile=(2, 8, 8))
    assert blocked.masked_total == 0 and blocked.tile_bound == pytest.approx(blocked.flop_bound)


def test_grouped_dilation_is_independent_problems():
    # Dilation 2x2 on 128x128 = four undilated 64x64 problems, each tiled on its own.
    dil = sim.simulate((128, 128), 13, 1, 2, q_tile=(8, 16), kv_tile=(16, 8))
    one = sim.simulate((64, 64), 13, q_tile=(8, 16), kv_tile=(16, 8))
    assert dil.visited_worst == one.visited_worst
    assert dil.n_q_tiles == 4 * one.n_q_tiles and dil.visited_total == 4 * one.visited_total
    assert dil.bound == pytest.approx(4 * one.bound)
    inter = sim.simulate((128, 128), 13, 1, 2, q_tile=(8, 16), kv_tile=(16, 8),
                         layout="interleaved")
    assert inter.bound < dil.bound
    with pytest.raises(ValueError, match="layout"):
        sim.simulate((16,), 4, layout="packed")


def test_padding_counts_as_work():
    # 30 keys in tiles of 32: one tile that holds 2 padding keys.
    r = sim.simulate((30,), 30, q_tile=32, kv_tile=32)
    assert r.n_kv_tiles == r.visited_worst == 1
    assert r.bound == pytest.approx(30 / 32)


def test_self_attention_is_dense():
    r = sim.simulate((16, 12), (16, 12), q_tile=(4, 4), kv_tile=(8, 2))
    assert r.bound == 1.0 and r.flop_bound == 1.0 and r.masked_total == 0


# --------------------------------------------------------------------------
# Per-axis counting vs brute force over the whole token grid.
# --------------------------------------------------------------------------

def _neighbor_matrix(axes):
    """[N, N] bool over all tokens (row-major), by brute force."""
    coords = np.array(list(itertools.product(*[range(ax.length) for ax in axes])))
    m = np.ones((len(coords), len(coords)), bool)
    for a, ax in enumerate(axes):
        m &= is_neighbor(coords[:, a][:, None], coords[:, a][None, :], ax)
    return coords, m


def _tile_ids(axes, coords, tile, layout):
    """Per token, the id of its tile (tiles of each dilation group apart if grouped)."""
    ids, dims = [], []
    for a, (ax, t) in enumerate(zip(axes, tile)):
        c = coords[:, a]
        if layout == "interleaved" or ax.dilation == 1:
            ids.append(c // t)
            dims.append(-(-ax.length // t))
            continue
        d = ax.dilation
        counts = [-(-((ax.length - g + d - 1) // d) // t) for g in range(d)]
        offsets = np.concatenate([[0], np.cumsum(counts)])
        ids.append(offsets[c % d] + (c // d) // t)
        dims.append(sum(counts))
    return np.ravel_multi_index(tuple(ids), dims)


def _brute_force(axes, qt, kt, layout="interleaved"):
    coords, m = _neighbor_matrix(axes)
    q_id = _tile_ids(axes, coords, qt, layout)
    k_id = _tile_ids(axes, coords, kt, layout)
    nq, nk = q_id.max() + 1, k_id.max() + 1  # (ids are dense: every tile holds a token)
    visited = np.zeros((nq, nk), bool)
    full = np.ones((nq, nk), bool)
    for qi in range(nq):
        rows = m[q_id == qi]
        for ki in range(nk):
            block = rows[:, k_id == ki]
            visited[qi, ki] = block.any()
            full[qi, ki] = block.all()
    per_q = visited.sum(axis=1)
    return dict(visited_total=int(visited.sum()),
                masked_total=int((visited & ~full).sum()),
                visited_worst=int(per_q.max()),
                visited_avg=float(per_q.mean()),
                pairs=int(m.sum()), visited=visited)


def _random_problem(rng):
    rank = int(rng.integers(1, 4))
    axes, qt, kt = [], [], []
    for _ in range(rank):
        L = int(rng.integers(4, 14 if rank == 3 else 24))
        d = int(rng.integers(1, 3)) if L >= 8 else 1
        k = int(rng.integers(2, L // d + 1))
        s = int(rng.integers(1, k + 1))
        c = bool(rng.integers(0, 2))
        axes.append(Axis(L, k, s, d, c))
        qt.append(int(rng.integers(1, 6)))
        kt.append(int(rng.integers(1, 6)))
    return axes, tuple(qt), tuple(kt)


@pytest.mark.parametrize("layout", sim.LAYOUTS)
@pytest.mark.parametrize("seed", range(40))
def test_matches_brute_force(seed, layout):
    rng = np.random.default_rng(seed)
    axes, qt, kt = _random_problem(rng)
    shape = tuple(ax.length for ax in axes)
    args = (shape, tuple(ax.kernel_size for ax in axes), tuple(ax.stride for ax in axes),
            tuple(ax.dilation for ax in axes), tuple(ax.is_causal for ax in axes))
    r = sim.simulate(*args, q_tile=qt, kv_tile=kt, layout=layout)
    bf = _brute_force(axes, qt, kt, layout)
    assert r.visited_total == bf["visited_total"]
    assert r.masked_total == bf["masked_total"]
    assert r.visited_worst == bf["visited_worst"]
    assert r.visited_avg == pytest.approx(bf["visited_avg"])
    assert sim.attended_pairs(*args) == bf["pairs"]
    assert r.density == pytest.approx(bf["pairs"] / math.prod(shape) ** 2)
    # The wave model's steps per CTA, in block order (tile ids are row-major).
    np.testing.assert_array_equal(sim.schedule(r).steps, bf["visited"].sum(axis=1))
    np.testing.assert_array_equal(sim.schedule(r, key_outer=True).steps, bf["visited"].sum(axis=0))


def test_schedule_list_model():
    """CTAs start on the first free SM in launch order; heaviest first can finish sooner."""
    r = sim.simulate((6,), 6, q_tile=2, kv_tile=2)  # dense: 3 query tiles of 3 steps
    s = sim.schedule(r, sms=2)
    assert list(s.steps) == [3, 3, 3] and s.in_order == 6 and s.ideal == 4.5
    assert sim.schedule(r, sms=2, ctas_per_tile=2).in_order == 9
    assert sim.schedule(r, sms=8).in_order == 3  # more SMs than CTAs
    # 1-D, window 2048, stride 256, the dK/dV kernel's tiles: the windows clamp at the ends,
    # so key tiles there take 16 to 48 steps against 32; in block order the heavy ones at the
    # end start in the second of two waves.
    r = sim.simulate((32768,), 2048, 256, q_tile=64, kv_tile=128)
    k = sim.schedule(r, key_outer=True)
    assert (k.steps.min(), k.steps.max(), k.steps.mean()) == (16, 48, 32)
    assert list(k.steps[:16]) == [16, 20, 20, 24, 24, 28, 28, 32, 32, 36, 36, 40, 40, 44, 44, 48]
    assert (k.in_order, k.heaviest_first) == (80, 64) and k.ideal == pytest.approx(256 * 32 / 132)
    q = sim.schedule(r)  # query-outer: every query tile sees 2048 keys
    assert q.in_order == q.heaviest_first == 64 and set(q.steps) == {16}
    assert "16-48 (mean 32.00): finish at 80 steps" in k.summary()
    with pytest.raises(ValueError, match="must be >= 1"):
        sim.schedule(r, sms=0)


# --------------------------------------------------------------------------
# FLOP counting (SEMANTICS.md "Reference numbers").
# --------------------------------------------------------------------------

def test_flops_non_causal():
    shape, kernel = (30, 48, 80), (18, 24, 24)
    expected = 4 * 2 * 24 * math.prod(shape) * math.prod(kernel) * 128
    assert sim.flops(shape, kernel, batch=2, heads=24, head_dim=128) == expected
    # Stride and dilation do not change it.
    assert sim.flops(shape, kernel, (16, 8, 8), batch=2, heads=24) == expected
    assert sim.flops((32, 32), 8, 1, 2, heads=1, head_dim=64) == 4 * 1024 * 64 * 64
    assert sim.flops(shape, kernel, batch=2, heads=24, pass_="bwd") == 2.5 * expected
    assert sim.flops(shape, kernel, batch=2, heads=24, pass_="fwdbwd") == 3.5 * expected
    # D_v != D: 2*D + 2*D_v per pair.
    assert sim.flops((64,), 8, head_dim=64, head_dim_v=32) == 2 * 64 * 8 * (64 + 32)
    with pytest.raises(ValueError):
        sim.flops((64,), 8, pass_="both")


def test_flops_causal_counts_attended_keys():
    # One axis, L = 10, k = 4, s = 1, causal: windows of SEMANTICS.md.
    sizes = [1, 2, 3, 4, 4, 4, 4, 4, 4, 4]
    assert sim.attended_pairs((10,), 4, is_causal=True) == sum(sizes)
    # Strided causal (k=4, s=2): [0,0] [0,1] [0,2] [0,3] [2,4] [2,5] [4,6] [4,7] [6,8] [6,9].
    assert sim.attended_pairs((10,), 4, 2, is_causal=True) == sum(
        [1, 2, 3, 4, 3, 4, 3, 4, 3, 4])
    # Causal only in time: product of the per-axis counts.
    per_t = sim.attended_pairs((10,), 4, is_causal=True)
    assert sim.attended_pairs((10, 6), (4, 3), is_causal=(True, False)) == per_t * 6 * 3
    assert sim.flops((10, 6), (4, 3), is_causal=(True, False), head_dim=16) == (
        4 * per_t * 6 * 3 * 16)
    r = sim.simulate((10, 6), (4, 3), is_causal=(True, False), q_tile=2, kv_tile=2)
    assert r.flop_bound == pytest.approx(60 * 60 / (per_t * 18))


def test_dense_flops():
    assert sim.dense_flops((8, 8), heads=2, head_dim=32) == 4 * 2 * 64 * 64 * 32
    assert sim.dense_flops((8,), head_dim=16, is_causal=True) == 2 * 36 * 32


# --------------------------------------------------------------------------
# Tile search.
# --------------------------------------------------------------------------

def test_tile_shapes():
    assert sorted(sim.tile_shapes(8, (16, 16))) == [(1, 8), (2, 4), (4, 2), (8, 1)]
    assert sim.tile_shapes(128, (32768,)) == [(128,)]
    assert all(math.prod(t) == 64 for t in sim.tile_shapes(64, (30, 48, 80)))


def test_best_tiles_is_the_best_candidate():
    shape, kernel = (30, 48, 80), (18, 24, 24)
    best = sim.best_tiles(shape, kernel, q_tile_size=128, kv_tile_size=128)
    assert math.prod(best.q_tile) == 128 and math.prod(best.kv_tile) == 128
    for qt in sim.tile_shapes(128, shape)[::5]:
        for kt in sim.tile_shapes(128, shape)[::5]:
            assert sim.simulate(shape, kernel, q_tile=qt, kv_tile=kt).bound <= best.bound + 1e-12
    top = sim.best_tiles(shape, kernel, top=5)
    assert len(top) == 5 and top[0].bound == best.bound
    assert all(a.bound >= b.bound for a, b in zip(top, top[1:]))
    # Blocked GNA: the tiles that fit the stride groups reach the FLOP bound.
    blk = sim.best_tiles(shape, kernel, (16, 8, 8), q_tile_size=128, kv_tile_size=128)
    assert blk.bound == pytest.approx(blk.flop_bound)
    # Explicit candidates.
    one = sim.best_tiles(shape, kernel, q_tiles=[(4, 8, 8)], kv_tiles=[(2, 8, 8)])
    assert round(one.bound, 2) == 3.27


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="kernel_size"):
        sim.simulate((16,), 17)
    with pytest.raises(ValueError, match="q_tile"):
        sim.simulate((16, 16), 4, q_tile=(4, 4, 4))
    with pytest.raises(ValueError):
        sim.simulate((16,), 4, q_tile=0)


def test_as_dict_and_summary():
    r = sim.simulate((256, 256), (80, 80), q_tile=(16, 16), kv_tile=(16, 8))
    d = r.as_dict()
    assert d["q_tile"] == [16, 16] and d["bound"] == r.bound
    import json
    json.dumps(d)
    assert "6.10x" in r.summary()
