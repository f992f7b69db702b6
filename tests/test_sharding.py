"""Sharded neighborhood attention (jax_gna.sharding) on 8 fake CPU devices.

The multi-device checks need ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
before JAX is imported, which a pytest process that already imported JAX (any other
test module) cannot do. So they run in one subprocess: this file executed as a script
(``python tests/test_sharding.py``) runs every case and prints a JSON report; the pytest
tests below start it once per session and assert case by case. The static halo math
is tested in-process.

Every case compares the sharded op (forward, log-sum-exp and the gradients of q, k, v
through both outputs) with the unsharded op in float32, and reads the compiled HLO.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 2e-6  # max |sharded - unsharded| / max |unsharded|, fp32

# name -> (spatial shape, B, H, H_kv, D or (D, D_v), window kwargs, mesh shape, mesh names,
#          data spec)
CASES = {
    "1d_data2_context4_gqa_stride": (
        (32,), 2, 4, 2, 8, dict(kernel_size=5, stride=2),
        (2, 4), ("data", "context"), ("data", "context", None)),
    "1d_data2_context4_causal_dilated": (
        (32,), 2, 2, 1, 8, dict(kernel_size=4, stride=2, dilation=2, is_causal=True),
        (2, 4), ("data", "context"), ("data", "context", None)),
    "1d_context8_even_kernel": (
        (48,), 1, 2, 2, 4, dict(kernel_size=6, stride=3),
        (8,), ("context",), (None, "context", None)),
    "2d_heads2_context2x2": (
        (16, 12), 1, 4, 2, 8,
        dict(kernel_size=(5, 3), stride=(2, 1), dilation=(1, 2), is_causal=(False, True)),
        (2, 2, 2), ("heads", "cx", "cy"), (None, "cx", "cy", "heads")),
    "1d_context8_multi_hop_halo": (
        (32,), 1, 2, 2, 4, dict(kernel_size=11, stride=2),
        (8,), ("context",), (None, "context", None)),
    "3d_context2x2x2": (
        (8, 8, 8), 1, 2, 1, 4,
        dict(kernel_size=3, stride=(1, 2, 1), is_causal=(True, False, False)),
        (2, 2, 2), ("cx", "cy", "cz"), (None, "cx", "cy", "cz", None)),
    "3d_data2_context4": (
        (4, 6, 16), 2, 2, 2, 4, dict(kernel_size=(2, 3, 5), dilation=(1, 2, 1)),
        (2, 4), ("data", "context"), ("data", None, None, "context", None)),
    # two sharded axes (the first extended before the second sends), a two-hop halo on
    # the first, values narrower than keys (D_v != D: keys and values share the exchange)
    "2d_context4x2_multi_hop_dv_differs": (
        (16, 12), 1, 2, 1, (8, 4), dict(kernel_size=(11, 9), stride=(2, 1)),
        (4, 2), ("cx", "cy"), (None, "cx", "cy", None)),
    "1d_context_over_two_mesh_axes": (
        (32,), 2, 2, 2, 4, dict(kernel_size=3),
        (2, 4), ("a", "b"), (None, ("a", "b"), None)),
    # dilated, but a shard's 6 rows are not whole groups of 4: the shards keep the
    # dilated problem (the dilated cases above fold, sharding._fold)
    "2d_context4_dilated_shards_not_whole_groups": (
        (24, 12), 1, 2, 2, 8, dict(kernel_size=(3, 5), stride=(1, 2), dilation=(4, 2)),
        (4,), ("cx",), (None, "cx", None, None)),
}
# A spatial axis split over both axes of a mesh ("x", "y"), in either order (("y", "x"):
# the data is laid out y-major while ppermute numbers the devices x-major), on a 2x4 and
# a 4x2 mesh; 8 shards, every halo wider than a shard (multi-hop), causal and strided.
TUPLE_WINDOWS = {
    "1d": ((32,), 0, dict(kernel_size=11, stride=2)),
    "1d_causal": ((32,), 0, dict(kernel_size=7, stride=3, dilation=2, is_causal=True)),
    "2d": ((16, 6), 0, dict(kernel_size=(5, 3), stride=(2, 1), is_causal=(True, False))),
    "2d_dilated": ((6, 16), 1, dict(kernel_size=(3, 7), stride=(1, 3), dilation=(2, 1))),
}


def _tuple_cases():
    cases = {}
    for mesh_shape, windows in {(2, 4): ("1d", "2d"), (4, 2): ("1d_causal", "2d_dilated")}.items():
        for order in (("y", "x"), ("x", "y")):
            for w in windows:
                shape, axis, kw = TUPLE_WINDOWS[w]
                lead = [None] * (len(shape) + 2)
                lead[1 + axis] = order
                name = f"{w}_tuple_{''.join(order)}_mesh{mesh_shape[0]}x{mesh_shape[1]}"
                cases[name] = (shape, 1, 2, 1, 4, kw, mesh_shape, ("x", "y"), tuple(lead))
    return cases


CASES.update(_tuple_cases())
# Batch / heads only: no collective at all.
LOCAL_CASES = {
    "2d_data2_context4_blocked_no_halo": (
        (8, 16), 2, 2, 2, 8, dict(kernel_size=(3, 4), stride=(1, 4)),
        (2, 4), ("data", "context"), ("data", None, "context", None)),
    "2d_data2_heads4_no_collectives": (
        (8, 8), 2, 8, 4, 8, dict(kernel_size=3, stride=(1, 2)),
        (2, 4), ("data", "heads"), ("data", None, None, "heads")),
    "1d_data4_heads2_gqa_no_collectives": (
        (16,), 4, 4, 2, 8, dict(kernel_size=5, is_causal=True),
        (4, 2), ("data", "heads"), ("data", None, "heads")),
}
EXTRA_CASES = ["explicit_shard_map_1d", "explicit_shard_map_2d_additional_kv",
               "explicit_shard_map_tuple_out_of_mesh_order",
               "error_uneven_split", "error_explicit_api", "vmap_falls_back",
               "explicit_axis_types_set_mesh", "nnx_training_step_data2_context4",
               "backend_without_backward_recomputes", "dilated_shards_fold", "auto_by_device_table",
               "auto_split_forward", "bf16_words_exchange", "dense_saved_backward",
               "tokens_one_op"]
ALL_CASES = list(CASES) + list(LOCAL_CASES) + EXTRA_CASES


# --------------------------------------------------------------------------
# pytest side.
# --------------------------------------------------------------------------

WORKERS = 2  # subprocesses in parallel (XLA compiles mostly on one core each)


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                        + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker",
                               *ALL_CASES[i::WORKERS]], env=env, cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(WORKERS)]
    merged = {}
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        lines = [l for l in out.splitlines() if l.startswith("{")]
        if proc.returncode != 0 or not lines:
            pytest.fail(f"sharding worker failed (rc={proc.returncode}):\n{out[-4000:]}\n"
                        f"{err[-4000:]}")
        merged.update(json.loads(lines[-1]))
    return merged


@pytest.mark.parametrize("case", ALL_CASES)
def test_sharded_case(report, case):
    assert case in report, f"the worker did not run {case}"
    r = report[case]
    assert r["ok"], r["msg"]


def test_halo_matches_brute_force():
    """The halo of every shard is exactly the reach of its queries' windows."""
    from jax_gna import mask
    from jax_gna.params import make_problem
    from jax_gna.sharding import plan_axis

    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.choice([2, 3, 4]))
        size = int(rng.integers(4, 13))
        length = n * size
        k = int(rng.integers(2, 8))
        d = int(rng.integers(1, 4))
        if k * d > length:
            continue
        s = int(rng.integers(1, k + 1))
        causal = bool(rng.integers(0, 2))
        x = np.zeros((1, length, 1, 2), np.float32)
        prob = make_problem(x, x, x, k, s, d, causal)
        try:
            plan = plan_axis(prob, 0, "c", n)
        except ValueError:
            continue
        ax = prob.axis(0)
        if causal:
            assert plan.right == 0
        need_l = need_r = 0
        for r in range(n):
            i = np.arange(r * size, (r + 1) * size)
            first, last = mask.window_extent(i, ax)
            need_l = max(need_l, r * size - first.min())
            need_r = max(need_r, last.max() - (r + 1) * size + 1)
            # the class problem of this shard sees exactly the same neighbors in the
            # shard's key block (global rows [start, start + block))
            c = plan.shard_class[r]
            q0, k0 = plan.q_origin[c], plan.kv_origin[c]
            assert 0 <= k0 < length and plan.shift[c] == max(0, plan.left - r * size)
            start = r * size - plan.left + plan.shift[c]
            jl = np.arange(plan.block)
            mine = mask.is_neighbor(i[:, None], start + jl[None, :], ax)
            rep = mask.is_neighbor(q0 + np.arange(size)[:, None], k0 + jl[None, :], ax)
            assert (mine == rep).all()
            # every neighbor of the shard's queries is a row of its key block that the
            # halo block holds (the block's other rows are zeros)
            lo = max(start, r * size - plan.left, 0)
            hi = min(start + plan.block, (r + 1) * size + plan.right, length)
            all_j = np.arange(length)
            nb = mask.is_neighbor(i[:, None], all_j[None, :], ax)
            assert nb[:, :lo].sum() == 0 and nb[:, hi:].sum() == 0
        assert (plan.left, plan.right) == (max(need_l, 0), max(need_r, 0))


def test_plan_errors():
    from jax_gna.params import make_problem
    from jax_gna.sharding import plan_axis

    x = np.zeros((1, 32, 1, 2), np.float32)
    prob = make_problem(x, x, x, 11)
    with pytest.raises(ValueError, match="multiple of the number of shards"):
        plan_axis(prob, 0, "context", 3)
    plan = plan_axis(prob, 0, "context", 4)
    assert (plan.left, plan.right) == (5, 5) and plan.classes == 3
    plan = plan_axis(prob, 0, "context", 8)  # halo wider than a shard: two hops
    assert (plan.left, plan.right, plan.size) == (7, 7, 4)  # border windows shift inward


def test_shard_numbering_tuple_order():
    """A spatial axis split over a tuple of mesh axes is laid out in the tuple's order
    (first name major); ppermute numbers the devices in the mesh's order. The pairs of
    shard_numbering move data between positions in the layout."""
    from jax_gna.params import make_problem
    from jax_gna.sharding import _layout, plan_axis, shard_numbering

    mesh = {"x": 2, "y": 4}  # mesh order: x major
    ppermute_index = lambda c: c["x"] * 4 + c["y"]  # noqa: E731
    _, pairs = shard_numbering(("y", "x"), mesh)  # layout: y major
    layout = [dict(y=p // 2, x=p % 2) for p in range(8)]
    moves = [(p, p + j) for j in (1, 2, 3) for p in range(8 - j)]
    assert pairs(moves) == [(ppermute_index(layout[a]), ppermute_index(layout[b]))
                            for a, b in moves]
    assert pairs([(0, 1), (1, 2)]) == [(0, 4), (4, 1)]
    _, pairs = shard_numbering(("x", "y"), mesh)  # the mesh's order: the identity
    assert pairs(moves) == moves
    # a subset of a larger mesh, out of order: ppermute numbers (a, c) a-major
    _, pairs = shard_numbering(("c", "a"), {"a": 2, "b": 3, "c": 2})
    assert pairs([(0, 1), (1, 2), (2, 3)]) == [(0, 2), (2, 1), (1, 3)]

    x = np.zeros((1, 16, 2, 8), np.float32)
    prob = make_problem(x, x, x, 5, 2)
    for names in (("b", "a"), ("a", "b")):
        plans, lead = _layout(prob, (None, names), {"a": 2, "b": 2}, x.shape, x.shape)
        assert plans[0].shards == 4 and plans[0].mesh_axes == names and lead[1] == names
        assert plans[0].mesh_shape == (("a", 2), ("b", 2))
    with pytest.raises(ValueError, match="mesh's axis sizes in the mesh's order"):
        plan_axis(prob, 0, ("b", "a"), 4)


def test_dv_case_has_a_multi_hop_halo():
    from jax_gna.sharding import halo_sizes

    shape, _, _, _, d, kw, _, _, _ = CASES["2d_context4x2_multi_hop_dv_differs"]
    halos = halo_sizes(shape, kw["kernel_size"], kw["stride"], shards={0: 4, 1: 2})
    assert min(halos[0]) > shape[0] // 4 and min(halos[1]) > 0 and d[0] != d[1], halos


def test_tuple_cases_have_multi_hop_halos():
    """Each tuple-order case needs halo rows from more than one shard away."""
    from jax_gna.sharding import halo_sizes

    for shape, axis, kw in TUPLE_WINDOWS.values():
        left, right = halo_sizes(shape, **kw, shards={axis: 8})[axis]
        assert max(left, right) > shape[axis] // 8, (shape, kw, left, right)


@pytest.mark.parametrize("shape,kw,shards,split", [
    ((32768,), dict(kernel_size=2048), (2,), True),
    ((32768,), dict(kernel_size=2048, stride=256), (4,), True),
    ((256, 256), dict(kernel_size=80, stride=16), (2, 1), True),
    ((30, 48, 80), dict(kernel_size=(18, 24, 24), stride=(16, 8, 8)), (1, 1, 2), True),
    ((160, 144), dict(kernel_size=(7, 5), stride=(2, 1), dilation=(2, 3),
                      is_causal=(False, True)), (4, 3), True),
    ((40, 36), dict(kernel_size=7), (4, 3), True),  # 8-row interiors on some shards only
    ((64,), dict(kernel_size=9, is_causal=True), (4,), True),
    ((48,), dict(kernel_size=21), (4,), False),  # no row's window stays in its shard
    ((48,), dict(kernel_size=41), (4,), False),  # a multi-hop halo
])
def test_split_calls_cover_each_shard(shape, kw, shards, split):
    """The sharded forward's calls (_split_calls) cover every query row of every shard
    exactly once, and each call's rows have their windows inside its key block on every
    axis: the shard's own rows for the first calls (they read only the shard's own keys),
    a slice of the halo block for the others."""
    from jax_gna import mask, sharding
    from jax_gna.params import make_problem

    rank = len(shape)
    q = np.zeros((1, *shape, 1, 8), np.float32)
    problem = make_problem(q, q, q, **kw)
    names = [f"m{a}" for a in range(rank)]
    sizes = dict(zip(names, shards))
    plans = [sharding.plan_axis(problem, a, names[a], n, sizes)
             for a, n in enumerate(shards) if n > 1]
    calls = sharding._split_calls(problem, plans)
    assert (calls is not None) == split
    if calls is None:
        return
    own = [c.own for c in calls]
    assert own[0] and own == sorted(own, reverse=True), own  # own-key calls first
    problems = sharding._class_problems(problem, plans)
    for combo in itertools.product(*[range(p.classes) for p in plans]):
        c = np.ravel_multi_index(combo, [p.classes for p in plans]) if plans else 0
        seen = np.zeros(problems[c].q_extent, np.int32)
        for call in calls:
            box = call.ranges[c]
            seen[tuple(slice(lo, hi) for lo, hi in box)] += 1
            if any(lo >= hi for lo, hi in box):
                continue
            for a, (lo, hi) in enumerate(box):  # every window inside the call's key block
                rows = problems[c].q_origin[a] + np.arange(lo, hi)
                first, last = mask.window_extent(rows, problem.axis(a))
                k0 = call.kv_origin[c][a]
                assert k0 <= first.min() and last.max() < k0 + call.kv_extent[a], (call, a)
            if call.own:  # the shard's own keys
                assert call.kv_origin[c] == problems[c].q_origin
                assert call.kv_extent == problems[c].q_extent
            else:  # a slice of the halo block [q0 - left, q0 + size + right)
                for j, p in enumerate(plans):
                    assert (call.start[c][j] == call.kv_origin[c][p.axis]
                            - (p.q_origin[combo[j]] - p.left) >= 0)
        assert (seen == 1).all(), (combo, np.unique(seen, return_counts=True))


def test_join_and_assemble(monkeypatch):
    """_join is jnp.concatenate (pieces of odd lengths, on any axis, bf16 and float32);
    _assemble gives every shard of a multi-hop plan its key block: the halo block moved by
    the shard class's shift, zeros beyond the halo block."""
    import jax.numpy as jnp

    from jax_gna import sharding
    from jax_gna.params import make_problem
    from jax_gna.sharding import _assemble, _join, plan_axis

    rng = np.random.default_rng(3)
    for dtype in (jnp.float32, jnp.bfloat16):
        for dim, lengths in ((1, (1023, 1, 1024)), (2, (3, 5))):
            chunks = [jnp.asarray(rng.standard_normal((2, n, 3, 4) if dim == 1 else (2, 3, n, 4)),
                                  dtype) for n in lengths]
            got = _join(chunks, dim)
            assert got.dtype == dtype
            np.testing.assert_array_equal(np.asarray(got, np.float32),
                                          np.concatenate([np.asarray(c, np.float32) for c in chunks], dim))

    x = np.zeros((1, 32, 1, 2), np.float32)
    prob = make_problem(x, x, x, 11, 2)
    plan = plan_axis(prob, 0, "c", 8)  # shards of 4 rows, halos of two hops
    assert plan.left > plan.size and plan.classes > 1 and len(set(plan.shift)) > 1
    whole = [rng.standard_normal((1, plan.block, 2, d)).astype(np.float32) for d in (3, 5)]
    numbering = sharding.shard_numbering
    for r in range(plan.shards):  # _assemble on shard r (its index, as axis_index would give)
        monkeypatch.setattr(sharding, "shard_numbering",
                            lambda *a, r=r: (lambda: jnp.int32(r), numbering(*a)[1]))
        k, v = _assemble([jnp.asarray(w) for w in whole], (plan,))
        shift = plan.shift[plan.shard_class[r]]
        for got, want in ((k, whole[0]), (v, whole[1])):
            rows = np.arange(plan.block) + shift
            ok = (rows >= 0) & (rows < plan.block)
            expect = np.where(ok[None, :, None, None], want[:, np.clip(rows, 0, plan.block - 1)], 0)
            np.testing.assert_array_equal(np.asarray(got), expect)


def test_device_table_only_for_this_program():
    """_device_classes: a table for a concrete mesh of this process's devices; none for an
    abstract mesh, or when the persistent cache may hand the program to other devices."""
    import jax
    from jax.sharding import AbstractMesh, Mesh

    from jax_gna.params import make_problem
    from jax_gna.sharding import _device_classes, plan_axis

    x = np.zeros((1, 16, 1, 2), np.float32)
    plans = (plan_axis(make_problem(x, x, x, 5), 0, "x", 1),)
    mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
    assert _device_classes(plans, mesh) == ((jax.devices()[0].local_hardware_id, 0),)
    assert _device_classes(plans, AbstractMesh((1,), ("x",))) is None
    assert _device_classes(plans, None) is None
    flag = "jax_remove_custom_partitioning_ptr_from_cache_key"
    old = getattr(jax.config, flag)
    jax.config.update(flag, True)
    try:
        assert _device_classes(plans, mesh) is None
    finally:
        jax.config.update(flag, old)


def test_halo_sizes():
    from jax_gna.sharding import halo_sizes

    # sliding window: k//2 left, k//2 + k%2 - 1 right (interior), more at the borders
    assert halo_sizes((64,), 5, shards={0: 4}) == {0: (2, 2)}
    assert halo_sizes((64,), 4, shards={0: 4}) == {0: (2, 1)}
    assert halo_sizes((64,), 5, is_causal=True, shards={0: 4}) == {0: (4, 0)}
    assert halo_sizes((64,), 5, dilation=2, shards={0: 4}) == {0: (4, 4)}
    assert halo_sizes((64,), 8, stride=8, shards={0: 4}) == {0: (0, 0)}  # blocked
    assert halo_sizes((16, 64), (3, 7), shards={1: 8}) == {1: (3, 3)}
    # the first shard's windows are shifted inward: it needs more than k // 2 on the right
    assert halo_sizes((256,), 80, shards={0: 8}) == {0: (48, 48)}
    with pytest.raises(ValueError, match="spatial axis indices"):
        halo_sizes((32,), 5, shards={1: 4})
    with pytest.raises(ValueError, match="integer shard count"):
        halo_sizes((32,), 5, shards={0: 2.5})


def test_sharded_unknown_mesh_axis():
    """A mesh axis name the mesh does not have: a ValueError naming it, before any work."""
    import jax
    from jax.sharding import Mesh

    from jax_gna import sharding

    mesh = Mesh(np.array(jax.devices()[:1]), ("c",))
    x = np.zeros((1, 8, 2, 4), np.float32)
    for kw in ({"spatial_axes": {0: "zz"}}, {"batch_axis": "zz"}, {"head_axis": ("c", "zz")}):
        with pytest.raises(ValueError, match="not an axis of the mesh"):
            sharding.neighborhood_attention_sharded(x, x, x, 3, mesh=mesh, **kw)


# --------------------------------------------------------------------------
# Worker side (a fresh process with 8 CPU devices).
# --------------------------------------------------------------------------

def _worker():  # pragma: no cover - runs in the subprocess
    import re
    import time
    import traceback

    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import jax_gna
    from jax_gna import sharding

    assert jax.device_count() == 8, jax.devices()

    def inputs(shape, b, h, h_kv, d, seed=0):
        d, d_v = (d, d) if isinstance(d, int) else d  # d: D, or (D, D_v)
        rng = np.random.default_rng(seed)
        mk = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
        q, k, v = mk(b, *shape, h, d), mk(b, *shape, h_kv, d), mk(b, *shape, h_kv, d_v)
        do, dl = mk(b, *shape, h, d_v), mk(b, *shape, h)
        return q, k, v, do, dl

    def fwd_bwd(kw, **extra):
        def f(q, k, v, do, dl):
            op = lambda q, k, v: jax_gna.neighborhood_attention(
                q, k, v, **kw, return_lse=True, backend="xla", **extra)
            (o, l), vjp = jax.vjp(op, q, k, v)
            return (o, l) + tuple(vjp((do, dl)))
        return f

    def unsharded(kw, args, **extra):
        old = sharding.set_auto_partitioning(False)
        try:
            return [np.asarray(x) for x in jax.jit(fwd_bwd(kw, **extra))(*args)]
        finally:
            sharding.set_auto_partitioning(old)

    def compare(got, want, names=("out", "lse", "dq", "dk", "dv")):
        errs = {}
        for n, a, b in zip(names, got, want):
            a = np.asarray(a)
            errs[n] = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
        worst = max(errs.values())
        assert worst < RTOL, f"relative errors {errs}"
        return errs

    def collectives(text):
        return {op: len(re.findall(rf"\b{op}(-start)?\(", text))
                for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce",
                           "reduce-scatter")}

    def run_case(cfg, expect_permute):
        shape, b, h, h_kv, d, kw, mshape, mnames, lead = cfg
        mesh = Mesh(np.array(jax.devices()[:int(np.prod(mshape))]).reshape(mshape), mnames)
        args = inputs(shape, b, h, h_kv, d)
        want = unsharded(kw, args)
        data = NamedSharding(mesh, P(*lead, None))
        lse = NamedSharding(mesh, P(*lead))
        sh = [jax.device_put(x, s) for x, s in zip(args, (data, data, data, data, lse))]
        t = time.time()
        compiled = jax.jit(fwd_bwd(kw)).lower(*sh).compile()
        t_compile = time.time() - t
        got = compiled(*sh)
        errs = compare(got, want)
        assert got[0].sharding.spec == data.spec, (got[0].sharding, data)
        assert got[2].sharding.spec == data.spec, (got[2].sharding, data)
        coll = collectives(compiled.as_text())
        if expect_permute:
            assert coll["collective-permute"] > 0, coll
            bad = {k: v for k, v in coll.items() if k != "collective-permute" and v}
        else:
            bad = {k: v for k, v in coll.items() if v}
        assert not bad, f"unexpected collectives {coll}"
        return f"max rel err {max(errs.values()):.2e} {errs}; HLO collectives {coll}; " \
               f"compile {t_compile:.1f}s"

    def explicit_1d():
        mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "context"))
        kw = dict(kernel_size=7, stride=3, dilation=2)  # shards of 8 rows: folded (xla)
        args = inputs((32,), 2, 4, 2, 8, seed=1)
        want = unsharded(kw, args)

        def f(q, k, v, do, dl):
            op = lambda q, k, v: sharding.neighborhood_attention_sharded(
                q, k, v, **kw, mesh=mesh, batch_axis="data", spatial_axes={0: "context"},
                return_lse=True, backend="xla")
            (o, l), vjp = jax.vjp(op, q, k, v)
            return (o, l) + tuple(vjp((do, dl)))

        compiled = jax.jit(f).lower(*args).compile()
        got = compiled(*args)
        errs = compare(got, want)
        coll = collectives(compiled.as_text())
        assert coll["collective-permute"] > 0 and not coll["all-to-all"], coll
        return f"max rel err {max(errs.values()):.2e}; HLO collectives {coll}"

    def explicit_2d_extra():
        mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("heads", "cx", "cy"))
        kw = dict(kernel_size=(3, 5), stride=(3, 1), is_causal=(True, False))
        q, k, v, do, dl = inputs((12, 16), 1, 4, 2, 8, seed=2)
        rng = np.random.default_rng(3)
        ak = jnp.asarray(rng.standard_normal((1, 5, 2, 8)), jnp.float32)
        av = jnp.asarray(rng.standard_normal((1, 5, 2, 8)), jnp.float32)

        def f(sharded, q, k, v, ak, av, do, dl):
            def op(q, k, v, ak, av):
                if sharded:
                    return sharding.neighborhood_attention_sharded(
                        q, k, v, **kw, mesh=mesh, head_axis="heads",
                        spatial_axes={0: "cx", 1: "cy"}, additional_keys=ak,
                        additional_values=av, return_lse=True, backend="xla")
                return jax_gna.neighborhood_attention(
                    q, k, v, **kw, additional_keys=ak, additional_values=av, return_lse=True,
                    backend="xla")
            (o, l), vjp = jax.vjp(op, q, k, v, ak, av)
            return (o, l) + tuple(vjp((do, dl)))

        old = sharding.set_auto_partitioning(False)
        want = [np.asarray(x) for x in jax.jit(lambda *a: f(False, *a))(q, k, v, ak, av, do, dl)]
        sharding.set_auto_partitioning(old)
        names = ("out", "lse", "dq", "dk", "dv", "dak", "dav")
        got = jax.jit(lambda *a: f(True, *a))(q, k, v, ak, av, do, dl)
        errs = compare(got, want, names)
        # The same through jit with sharded inputs (transparent path): the dense part
        # keeps the spatial split; the only other collective is the all-reduce of the
        # extra tokens' gradients.
        lead = (None, "cx", "cy", "heads")
        data, lse = NamedSharding(mesh, P(*lead, None)), NamedSharding(mesh, P(*lead))
        extra = NamedSharding(mesh, P(None, None, "heads", None))
        args = [jax.device_put(x, s) for x, s in zip(
            (q, k, v, ak, av, do, dl), (data, data, data, extra, extra, data, lse))]
        compiled = jax.jit(lambda *a: f(False, *a)).lower(*args).compile()
        errs2 = compare(compiled(*args), want, names)
        coll = collectives(compiled.as_text())
        assert coll["collective-permute"] > 0 and coll["all-reduce"] <= 1, coll
        assert not coll["all-gather"] and not coll["all-to-all"], coll
        return (f"shard_map: max rel err {max(errs.values()):.2e}; jit: max rel err "
                f"{max(errs2.values()):.2e}, HLO collectives {coll}")

    def explicit_tuple_order():
        """neighborhood_attention_sharded (shard_map) and Explicit axis types with a
        spatial axis split over ("y", "x") on a mesh ("x", "y"), multi-hop halos."""
        from jax.sharding import AxisType

        kw = dict(kernel_size=(3, 9), stride=(1, 2), is_causal=(False, True))
        args = inputs((4, 16), 2, 2, 2, 4, seed=6)
        want = unsharded(kw, args)
        msgs = []

        def via_sharded(mesh):  # out, lse and the gradients through the shard_map entry point
            def f(q, k, v, do, dl):
                op = lambda q, k, v: sharding.neighborhood_attention_sharded(
                    q, k, v, **kw, mesh=mesh, spatial_axes={1: ("y", "x")}, return_lse=True,
                    backend="xla")
                (o, l), vjp = jax.vjp(op, q, k, v)
                return (o, l) + tuple(vjp((do, dl)))
            return jax.jit(f)

        for shape in ((2, 4), (4, 2)):
            mesh = Mesh(np.array(jax.devices()).reshape(shape), ("x", "y"))
            errs = compare(via_sharded(mesh)(*args), want)
            msgs.append(f"shard_map {shape}: {max(errs.values()):.2e}")
        mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=(AxisType.Explicit,) * 2)
        with jax.set_mesh(mesh):
            lead = (None, None, ("y", "x"), None)
            sh = [jax.device_put(x, P(*lead, None)) for x in args[:4]]
            sh.append(jax.device_put(args[4], P(*lead)))
            compiled = jax.jit(fwd_bwd(kw)).lower(*sh).compile()
            got = compiled(*sh)
        errs = compare(got, want)
        assert got[0].sharding.spec == P(*lead, None), got[0].sharding
        coll = collectives(compiled.as_text())
        assert coll["collective-permute"] > 0 and not coll["all-gather"], coll
        msgs.append(f"set_mesh (2, 4): {max(errs.values()):.2e}; HLO collectives {coll}")

        # The same mesh, inputs not placed on it: neighborhood_attention_sharded places them
        # (shard_map reshards nothing on Explicit axes; it raised its in_specs error before)
        got = via_sharded(mesh)(*args)
        errs = compare(got, want)
        assert got[0].sharding.spec == P(*lead, None), got[0].sharding
        msgs.append(f"Explicit mesh, inputs not placed: {max(errs.values()):.2e}")
        return "max rel err " + "; ".join(msgs)

    def error_uneven():
        mesh = Mesh(np.array(jax.devices()), ("context",))
        q, k, v, _, _ = inputs((36,), 1, 2, 2, 4)
        spec = NamedSharding(mesh, P(None, "context", None, None))

        def f(q, k, v):
            q, k, v = [jax.lax.with_sharding_constraint(x, spec) for x in (q, k, v)]
            return jax_gna.na1d(q, k, v, 3, backend="xla")
        try:
            jax.jit(f).lower(q, k, v).compile()
        except Exception as e:  # raised by the partition callback, during compilation
            msg = f"{type(e).__name__}: {e}"
            assert "cannot be split into 8 equal shards" in msg, msg
            return msg[:120] + " ... " + msg[msg.index("spatial axis 0"):][:200]
        raise AssertionError("no error for a spatial length that does not split evenly")

    def error_explicit():
        mesh = Mesh(np.array(jax.devices()), ("context",))
        q, k, v, _, _ = inputs((36,), 1, 2, 2, 4)
        try:
            sharding.neighborhood_attention_sharded(q, k, v, 3, mesh=mesh,
                                                    spatial_axes={0: "context"})
        except ValueError as e:
            assert "cannot be split into 8 equal shards" in str(e), str(e)
            msg = str(e)[:300]
        else:
            raise AssertionError("no ValueError")
        # arguments that are not a mesh, a mapping, or name a mesh axis twice
        mesh2 = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "context"))
        q, k, v, _, _ = inputs((16,), 2, 2, 2, 4)
        for kw, match in [(dict(mesh=None), "mesh must be a jax.sharding.Mesh"),
                          (dict(mesh=mesh2.abstract_mesh), "not an abstract mesh"),
                          (dict(mesh=mesh2, return_lse=1), "return_lse must be a bool"),
                          (dict(mesh=mesh2, spatial_axes=["context"]), "spatial_axes must map"),
                          (dict(mesh=mesh2, batch_axis="context", spatial_axes={0: "context"}),
                           "'context' is named twice"),
                          (dict(mesh=mesh2, spatial_axes={0: ("data", "data")}),
                           "'data' is named twice")]:
            try:
                sharding.neighborhood_attention_sharded(q, k, v, 3, **kw)
            except ValueError as e:
                assert match in str(e), (kw, str(e))
            else:
                raise AssertionError(f"no ValueError for {kw}")
        return msg

    def vmap_fallback():
        q, k, v, _, _ = inputs((16,), 3, 2, 2, 4)
        f = jax.jit(jax.vmap(lambda q, k, v: jax_gna.na1d(q, k, v, 3, backend="xla")))
        got = f(q[:, None], k[:, None], v[:, None])[:, 0]
        old = sharding.set_auto_partitioning(False)
        want = jax.jit(lambda q, k, v: jax_gna.na1d(q, k, v, 3, backend="xla"))(q, k, v)
        sharding.set_auto_partitioning(old)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
        loss = lambda q: jax.vmap(lambda q, k, v: jax_gna.na1d(q, k, v, 3, backend="xla"))(
            q, k[:, None], v[:, None]).sum()
        got = jax.jit(jax.grad(loss))(q[:, None])
        old = sharding.set_auto_partitioning(False)
        want = jax.jit(jax.grad(loss))(q[:, None])
        sharding.set_auto_partitioning(old)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
        return "ok (forward and grad of vmap)"

    def dense_saved_backward():
        """The additional tokens' partitioned backward (sharding.dense_attention under jit,
        queries split over context x heads): from the saved out / lse through
        ``dense.backward`` where the dense function has one, by recomputing the forward
        where it has none; both against the unsharded xla.dense_attention."""
        from jax_gna import xla

        mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("context", "heads"))
        rng = np.random.default_rng(7)
        mk = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
        q, do, dl = mk(2, 16, 4, 8), mk(2, 16, 4, 6), mk(2, 16, 4)
        ak, av = mk(2, 5, 2, 8), mk(2, 5, 2, 6)
        seen = []

        def saved(q, k, v, scale):
            seen.append("fwd")
            return xla.dense_attention(q, k, v, scale)

        def saved_backward(*a):
            seen.append("bwd")
            return xla.dense_backward(*a)

        saved.backward = saved_backward
        bare = lambda q, k, v, scale: xla.dense_attention(q, k, v, scale)  # noqa: E731

        def f(dense, q, k, v, do, dl):
            (o, l), vjp = jax.vjp(lambda q, k, v: sharding.dense_attention(q, k, v, 0.3, dense),
                                  q, k, v)
            return (o, l) + tuple(vjp((do, dl)))

        old = sharding.set_auto_partitioning(False)
        want = [np.asarray(x) for x in jax.jit(lambda *a: f(xla.dense_attention, *a))(
            q, ak, av, do, dl)]
        sharding.set_auto_partitioning(old)
        data = NamedSharding(mesh, P(None, "context", "heads", None))
        lse = NamedSharding(mesh, P(None, "context", "heads"))
        extra = NamedSharding(mesh, P(None, None, "heads", None))
        args = [jax.device_put(x, s) for x, s in zip((q, ak, av, do, dl),
                                                        (data, extra, extra, data, lse))]
        msgs = []
        for name, dense in (("saved", saved), ("recomputed", bare)):
            compiled = jax.jit(lambda *a: f(dense, *a)).lower(*args).compile()
            errs = compare(compiled(*args), want)
            coll = collectives(compiled.as_text())
            assert coll["all-reduce"] == 1 and not coll["all-gather"], coll
            msgs.append(f"{name}: max rel err {max(errs.values()):.2e}")
        assert "bwd" in seen, seen  # the saved path ran dense.backward
        return "; ".join(msgs) + f"; HLO collectives {coll}"

    def tokens_one_op():
        """A call with additional tokens under jax.jit runs one partitioned op
        (sharding._partitioned_tokens_op): a backend's with_tokens on each shard where no
        spatial axis is split (batch x heads), the two parts and a merge where one is
        (heads x context); the backward from the merged out / lse (tokens_backward, no
        merge backward). Out, lse and the gradients of q, k, v and the tokens against
        the unsharded op, for a spy backend and backend="auto"."""
        import contextlib

        from jax.sharding import AxisType

        from jax_gna import xla
        from jax_gna.params import make_problem

        seen = []

        def impl(q, k, v, p):
            seen.append("na")
            return xla.attention(q, k, v, p)

        def with_tokens(q, k, v, xk, xv, p):
            seen.append(("with_tokens", q.shape, xk.shape))
            out, lse = xla.attention(q, k, v, p)
            return xla.merge(out, lse, *xla.dense_attention(q, xk, xv, p.scale))

        def tokens_backward(*a):
            seen.append("tokens_backward")
            return xla.dense_backward_saved(*a)

        impl.backward, impl.dense = xla.attention.backward, xla.dense_attention
        impl.with_tokens, impl.tokens_backward = with_tokens, tokens_backward
        kw = dict(kernel_size=(3, 5), stride=(1, 2), is_causal=(True, False))
        q, k, v, do, dl = inputs((8, 12), 2, 4, 2, 8, seed=11)
        rng = np.random.default_rng(12)
        ak, av = (jnp.asarray(rng.standard_normal((2, 6, 2, 8)), jnp.float32) for _ in range(2))
        names = ("out", "lse", "dq", "dk", "dv", "dak", "dav")

        def f(backend, q, k, v, ak, av, do, dl):
            def op(q, k, v, ak, av):
                if backend is None:
                    prob = make_problem(q, k, v, **kw, additional_keys=ak, additional_values=av)
                    return sharding.attention_with_tokens(impl, q, k, v, ak, av, prob)
                return jax_gna.neighborhood_attention(
                    q, k, v, **kw, additional_keys=ak, additional_values=av, return_lse=True,
                    backend=backend)
            (o, l), vjp = jax.vjp(op, q, k, v, ak, av)
            return (o, l) + tuple(vjp((do, dl)))

        old = sharding.set_auto_partitioning(False)
        want = [np.asarray(x) for x in jax.jit(lambda *a: f("xla", *a))(q, k, v, ak, av, do, dl)]
        sharding.set_auto_partitioning(old)
        report = []
        for mshape, mnames, lead, fused, explicit in [
                ((2, 2), ("data", "heads"), ("data", None, None, "heads"), True, False),
                ((2, 4), ("heads", "cx"), (None, "cx", None, "heads"), False, False),
                ((2, 2), ("data", "heads"), ("data", None, None, "heads"), True, True),
                ((2, 4), ("heads", "cx"), (None, "cx", None, "heads"), False, True)]:
            devices = np.array(jax.devices()[:int(np.prod(mshape))]).reshape(mshape)
            mesh = Mesh(devices, mnames, axis_types=(AxisType.Explicit if explicit else
                                                     AxisType.Auto,) * len(mnames))
            data, lse = NamedSharding(mesh, P(*lead, None)), NamedSharding(mesh, P(*lead))
            extra = NamedSharding(mesh, P(lead[0], None, lead[-1], None))
            args = [jax.device_put(x, s) for x, s in zip(
                (q, k, v, ak, av, do, dl), (data, data, data, extra, extra, data, lse))]
            for backend in (None, "auto"):
                seen.clear()
                with (jax.set_mesh(mesh) if explicit else contextlib.nullcontext()):
                    compiled = jax.jit(lambda *a: f(backend, *a)).lower(*args).compile()
                    got = compiled(*args)
                errs = compare(got, want, names)
                coll = collectives(compiled.as_text())
                assert not coll["all-gather"] and not coll["all-to-all"], coll
                # the tokens' gradients are summed over the spatial shards only
                assert coll["all-reduce"] == (0 if fused else 1), coll
                if backend is None:  # (jax.jit: the op's global function is traced too)
                    on_shards = [c for c in seen if c[0] == "with_tokens" and c[1] != q.shape]
                    if fused:  # the shard's blocks: half the batch and the heads
                        assert on_shards == [("with_tokens", (1, 8, 12, 2, 8), (1, 6, 1, 8))], seen
                    else:
                        assert not on_shards and "na" in seen, seen
                    # the jit path's backward from the merged statistics (shard_map: autodiff)
                    assert ("tokens_backward" in seen) != explicit, seen
                report.append(f"{mnames}{' explicit' if explicit else ''} {backend or 'spy'}: "
                              f"{max(errs.values()):.1e} {coll}")
        return "; ".join(report)

    def backend_without_backward():
        """A backend that exposes no backward: the partitioned backward recomputes the
        forward (jax.vjp) on each shard's block."""
        from jax_gna import xla
        from jax_gna.params import make_problem

        mesh = Mesh(np.array(jax.devices()[:4]), ("context",))
        kw = dict(kernel_size=5, stride=2, is_causal=True)
        args = inputs((32,), 1, 2, 2, 8, seed=5)
        want = unsharded(kw, args)
        impl = lambda q, k, v, p: xla.attention(q, k, v, p)  # noqa: E731
        assert sharding._backward_of(impl) is None

        def f(q, k, v, do, dl):
            prob = make_problem(q, k, v, **kw)
            (o, l), vjp = jax.vjp(lambda q, k, v: sharding.attention(impl, q, k, v, prob), q, k, v)
            return (o, l) + tuple(vjp((do, dl)))

        data = NamedSharding(mesh, P(None, "context", None, None))
        lse = NamedSharding(mesh, P(None, "context", None))
        sh = [jax.device_put(x, s) for x, s in zip(args, (data, data, data, data, lse))]
        compiled = jax.jit(f).lower(*sh).compile()
        errs = compare(compiled(*sh), want)
        coll = collectives(compiled.as_text())
        assert coll["collective-permute"] > 0 and not coll["all-gather"], coll
        return f"max rel err {max(errs.values()):.2e}; HLO collectives {coll}"

    def dilated_shards_fold():
        """Shards holding whole dilation groups run the undilated problem, the groups
        stacked in the batch, where the backend's fold_shards asks for it (forward and
        backward each); a backend without fold_shards, or shards of partial groups, keep
        the dilated problem. Every case against the unsharded op."""
        from jax_gna import xla
        from jax_gna.params import make_problem

        seen = []

        def spy(fold):
            def impl(q, k, v, p):
                seen.append(("fwd", p.dilation, p.is_whole, q.shape[0]))
                return xla.attention(q, k, v, p, fold_dilation=False)

            def bwd(q, k, v, o, l, do, dl, p):
                seen.append(("bwd", p.dilation, p.is_whole, q.shape[0]))
                return xla.attention.backward(q, k, v, o, l, do, dl, p)
            impl.backward = bwd
            if fold is not None:
                impl.fold_shards = lambda *a: fold
            return impl

        report = []
        for shape, kw, cx, fold, want_fold in [
                ((32, 6), dict(kernel_size=(3, 3), stride=(2, 1), dilation=(2, 2),
                               is_causal=(True, False)), 4, (True, True), ("fwd", "bwd")),
                ((32, 6), dict(kernel_size=(3, 3), dilation=(2, 2)), 4, (False, True), ("bwd",)),
                ((32, 6), dict(kernel_size=(3, 3), dilation=(2, 2)), 4, (True, False), ("fwd",)),
                ((32, 6), dict(kernel_size=(3, 3), dilation=(2, 2)), 4, None, ()),
                ((24, 6), dict(kernel_size=(3, 3), dilation=(4, 1)), 4, (True, True), ())]:
            mesh = Mesh(np.array(jax.devices()[:cx]), ("cx",))
            args = inputs(shape, 2, 2, 1, 8, seed=7)
            want = unsharded(kw, args)
            impl = spy(fold)

            def f(q, k, v, do, dl):
                prob = make_problem(q, k, v, **kw)
                (o, l), vjp = jax.vjp(lambda q, k, v: sharding.attention(impl, q, k, v, prob),
                                      q, k, v)
                return (o, l) + tuple(vjp((do, dl)))

            data = NamedSharding(mesh, P(None, "cx", None, None, None))
            lse = NamedSharding(mesh, P(None, "cx", None, None))
            sh = [jax.device_put(x, s) for x, s in zip(args, (data, data, data, data, lse))]
            seen.clear()
            compiled = jax.jit(f).lower(*sh).compile()
            errs = compare(compiled(*sh), want)
            coll = collectives(compiled.as_text())
            assert coll["collective-permute"] > 0 and not coll["all-gather"] and not coll["all-to-all"], coll
            groups = int(np.prod(kw["dilation"]))
            for pass_ in ("fwd", "bwd"):
                # each shard's problem (custom_partitioning also traces the global one,
                # whole, for its shapes); folded: undilated, groups times the batch
                calls = {(d, b) for p_, d, whole, b in seen if p_ == pass_ and not whole}
                want_calls = ({((1, 1), 2 * groups)} if pass_ in want_fold
                              else {(kw["dilation"], 2)})
                assert calls == want_calls, (shape, kw, fold, pass_, calls, want_calls)
            report.append(f"{shape} d{kw['dilation']} fold_shards={fold}: {max(errs.values()):.1e}")
        return "; ".join(report)

    def auto_run(mesh, kw, args, want, patches):
        """Forward and gradients of the ``backend="auto"`` impl, its spatial axes over
        ``("c", "a")`` and ``"b"`` of ``mesh``, against ``want``: the relative errors.
        ``patches`` (name -> function) replace those of ``cuda.attention`` while the
        impl's per-device functions are built from them and traced; both are restored."""
        from jax_gna import cuda, ops
        from jax_gna.params import make_problem

        impl, real = ops._auto_attention, {n: getattr(cuda.attention, n) for n in patches}

        def wire():
            impl.by_device, impl.backward_by_device, impl.by_device_split = (
                sharding.platform_by_device(cuda.attention, sharding.xla.attention))

        for name, fn in patches.items():
            setattr(cuda.attention, name, fn)
        wire()
        try:
            def f(q, k, v, do, dl):
                prob = make_problem(q, k, v, **kw)
                (o, l), vjp = jax.vjp(lambda q, k, v: sharding.attention(impl, q, k, v, prob),
                                      q, k, v)
                return (o, l) + tuple(vjp((do, dl)))

            lead = (None, ("c", "a"), "b")
            data, lse = NamedSharding(mesh, P(*lead, None, None)), NamedSharding(mesh, P(*lead, None))
            sh = [jax.device_put(x, s) for x, s in zip(args, (data, data, data, data, lse))]
            return compare(jax.jit(f)(*sh), want)
        finally:
            for name, fn in real.items():
                setattr(cuda.attention, name, fn)
            wire()

    def auto_by_device():
        """The ``backend="auto"`` impl's one-call path (``by_device``): on a non-CUDA
        platform its default branch switches between xla's class problems, and the
        device table it hands the CUDA branch names, for every device, the class the
        traced shard index gives there. A spatial axis over a tuple of mesh axes out of
        the mesh's order, multi-hop halos, plus a second sharded axis."""
        from jax_gna import cuda
        from jax_gna.params import make_problem

        # devices out of order: a mesh position is not a device ordinal
        devices = np.array(jax.devices())[[5, 2, 7, 0, 3, 6, 1, 4]]
        mesh = Mesh(devices.reshape(2, 2, 2), ("a", "b", "c"))
        kw = dict(kernel_size=(11, 3), stride=(2, 1), is_causal=(False, True))
        args = inputs((16, 8), 1, 2, 1, 4, seed=6)
        want = unsharded(kw, args)
        seen = []

        def spy(name, fn):
            def wrapped(*a):
                seen.append((name, a[-2], a[-1]))  # problems, devices
                return fn(*a)
            return wrapped

        errs = auto_run(mesh, kw, args, want,
                        {"by_device": spy("fwd", cuda.attention.by_device),
                         "backward_by_device": spy("bwd", cuda.attention.backward_by_device)})
        problem = make_problem(*args[:3], **kw)
        plans = (sharding.plan_axis(problem, 0, ("c", "a"), 4, dict(mesh.shape)),
                 sharding.plan_axis(problem, 1, "b", 2, dict(mesh.shape)))
        assert plans[0].left > plans[0].size and plans[0].classes * plans[1].classes > 2
        # one forward call: with a multi-hop halo every row reaches past its shard, so
        # there are no interior rows to compute first (auto_split_forward has them)
        assert sharding._split_calls(problem, plans) is None
        assert [n for n, _, _ in seen] == ["fwd", "bwd"], [n for n, _, _ in seen]
        table = sharding._device_classes(plans, mesh)
        assert seen[0][2] == seen[1][2] == table, (seen[0][2], table)
        assert seen[0][1] == sharding._class_problems(problem, plans)
        # the traced index on each device
        spec = P(("a", "b", "c"))
        idx = jax.jit(jax.shard_map(lambda x: x * 0 + sharding._branch_index(plans), mesh=mesh,
                                    in_specs=spec, out_specs=spec))(
            jax.device_put(jnp.zeros(8, jnp.int32), NamedSharding(mesh, spec)))
        traced = {s.device.local_hardware_id: int(np.asarray(s.data)[0])
                  for s in idx.addressable_shards}
        assert traced == dict(table), (traced, table)
        assert len(set(traced.values())) > 2, traced
        return f"max rel err {max(errs.values()):.2e}; device table {table}"

    def auto_split():
        """The ``backend="auto"`` impl's split forward (``by_device_split``): each shard's
        interior rows first, over its own keys, then the rest over slices of the halo
        blocks. On a non-CUDA platform its default branch runs xla on each call's boxes
        (output starting at zero: a row no call covers would show). Two sharded axes,
        one over a tuple of mesh axes out of the mesh's order, dilated and causal: its
        shards hold whole dilation groups, so they run folded (undilated, the groups in
        the batch) unless the impl's fold_shards says no."""
        from jax_gna import cuda, ops
        from jax_gna.params import make_problem

        devices = np.array(jax.devices())[[3, 6, 1, 4, 5, 2, 7, 0]]
        mesh = Mesh(devices.reshape(2, 2, 2), ("a", "b", "c"))
        kw = dict(kernel_size=(5, 3), stride=(2, 1), dilation=(1, 2), is_causal=(False, True))
        args = inputs((96, 48), 1, 2, 1, (8, 4), seed=8)
        want = unsharded(kw, args)
        problem = make_problem(*args[:3], **kw)
        plans = (sharding.plan_axis(problem, 0, ("c", "a"), 4, dict(mesh.shape)),
                 sharding.plan_axis(problem, 1, "b", 2, dict(mesh.shape)))
        folded = sharding._fold(problem, plans, args[0].shape)
        assert folded is not None
        seen, real = [], cuda.attention.by_device_split

        def spy(*a):
            seen.append(a[-3:])  # problems, calls, devices
            return real(*a)

        report, decide = [], ops._auto_attention.fold_shards
        for fold in (False, True):
            seen.clear()
            ops._auto_attention.fold_shards = lambda *a, fold=fold: (fold, fold)
            try:
                errs = auto_run(mesh, kw, args, want, {"by_device_split": spy})
            finally:
                ops._auto_attention.fold_shards = decide
            prob, pl = folded if fold else (problem, plans)
            calls = sharding._split_calls(prob, pl)
            assert len(seen) == 1 and seen[0][1:] == (calls, sharding._device_classes(pl, mesh))
            assert {p.dilation for p in seen[0][0]} == {prob.dilation}
            assert sum(c.own for c in calls) == 2 and len(calls) >= 4, calls
            report.append(f"{'folded' if fold else 'dilated'}: max rel err "
                          f"{max(errs.values()):.2e}, {len(calls)} calls")
        return "; ".join(report)

    def bf16_words():
        """bfloat16 keys and values (moved as 32-bit words, values of odd head dim as
        they are): the sharded op equals the unsharded one on the same bf16 inputs; the
        halo's gradients are summed in bf16, the unsharded op's in float32."""
        mesh = Mesh(np.array(jax.devices()[:4]), ("context",))
        kw = dict(kernel_size=(5, 3), stride=(2, 1))
        out = []
        for d in (8, (8, 3)):
            args = [x.astype(jnp.bfloat16) for x in inputs((16, 6), 2, 2, 1, d, seed=7)]
            args[4] = args[4].astype(jnp.float32)  # the lse cotangent
            want = unsharded(kw, args)
            data = NamedSharding(mesh, P(None, "context", None, None, None))
            lse = NamedSharding(mesh, P(None, "context", None, None))
            sh = [jax.device_put(x, s) for x, s in zip(args, (data, data, data, data, lse))]
            got = jax.jit(fwd_bwd(kw))(*sh)
            errs = {}
            for n, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
                a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
                errs[n] = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
            assert max(errs.values()) < 2e-2 and errs["out"] < 1e-6, errs
            assert got[0].dtype == jnp.bfloat16 and got[3].dtype == jnp.bfloat16
            out.append(f"D={d}: {errs}")
        return "; ".join(out)

    def explicit_axis_types():
        """Meshes with Explicit axis types (jax.set_mesh): the layout is known at trace
        time and the op runs under shard_map."""
        from jax.sharding import AxisType

        mesh = jax.make_mesh((2, 2, 2), ("heads", "cx", "cy"),
                             axis_types=(AxisType.Explicit,) * 3)
        kw = dict(kernel_size=(3, 5), stride=(1, 2), dilation=(2, 1))
        args = inputs((12, 16), 1, 4, 2, 8, seed=4)
        want = unsharded(kw, args)
        with jax.set_mesh(mesh):
            lead = (None, "cx", "cy", "heads")
            sh = [jax.device_put(x, P(*lead, None)) for x in args[:4]]
            sh.append(jax.device_put(args[4], P(*lead)))
            compiled = jax.jit(fwd_bwd(kw)).lower(*sh).compile()
            got = compiled(*sh)
        errs = compare(got, want)
        coll = collectives(compiled.as_text())
        assert coll["collective-permute"] > 0, coll
        assert not any(v for k, v in coll.items() if k != "collective-permute"), coll
        assert got[0].sharding.spec == P(*lead, None), got[0].sharding
        return f"max rel err {max(errs.values()):.2e}; HLO collectives {coll}"

    def nnx_training_step():
        """A Flax NNX layer's training step on a (data, context) mesh: activations
        sharded over batch and sequence, parameters replicated; the attention exchanges
        halos, the only other collective is the all-reduce of gradients and loss."""
        try:
            from flax import nnx
            from jax_gna import nn as gnn
        except ImportError as e:
            return f"skipped: {e}"
        mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "context"))
        layer = gnn.NeighborhoodAttention1D(4, 16, kernel_size=7, stride=2, num_kv_heads=2,
                                            rope=True, normalize_qk=True, backend="xla",
                                            rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(layer, nnx.Param)
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((2, 64, 16)), jnp.float32)
        y = jnp.asarray(rng.standard_normal((2, 64, 16)), jnp.float32)

        def step(params, x, y):
            def loss(p):
                return jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2)
            value, grads = jax.value_and_grad(loss)(params)
            return value, jax.tree.map(lambda a, b: a - 0.1 * b, params, grads)

        old = sharding.set_auto_partitioning(False)
        l0, p0 = jax.jit(step)(params, x, y)
        sharding.set_auto_partitioning(old)
        act = NamedSharding(mesh, P("data", "context", None))
        xs, ys = jax.device_put(x, act), jax.device_put(y, act)
        compiled = jax.jit(step).lower(params, xs, ys).compile()
        coll = collectives(compiled.as_text())
        assert coll["collective-permute"] > 0 and not coll["all-gather"], coll
        assert not coll["all-to-all"], coll
        l1, p1 = compiled(params, xs, ys)
        err = max(float(jnp.abs(a - b).max() / jnp.abs(a).max())
                  for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)))
        assert abs(float(l0) - float(l1)) < 1e-5 * abs(float(l0)) and err < RTOL, (l0, l1, err)
        return f"loss {float(l1):.6f} vs {float(l0):.6f}, max rel param err {err:.1e}; {coll}"

    jobs = {name: (lambda c=cfg: run_case(c, True)) for name, cfg in CASES.items()}
    jobs.update({name: (lambda c=cfg: run_case(c, False)) for name, cfg in LOCAL_CASES.items()})
    jobs.update({"explicit_shard_map_1d": explicit_1d,
                 "explicit_shard_map_2d_additional_kv": explicit_2d_extra,
                 "explicit_shard_map_tuple_out_of_mesh_order": explicit_tuple_order,
                 "error_uneven_split": error_uneven,
                 "error_explicit_api": error_explicit,
                 "vmap_falls_back": vmap_fallback,
                 "explicit_axis_types_set_mesh": explicit_axis_types,
                 "backend_without_backward_recomputes": backend_without_backward,
                 "dilated_shards_fold": dilated_shards_fold,
                 "auto_by_device_table": auto_by_device,
                 "auto_split_forward": auto_split,
                 "bf16_words_exchange": bf16_words,
                 "dense_saved_backward": dense_saved_backward,
                 "tokens_one_op": tokens_one_op,
                 "nnx_training_step_data2_context4": nnx_training_step})
    only = sys.argv[2:]
    report = {}
    for name, job in jobs.items():
        if only and name not in only:
            continue
        t = time.time()
        try:
            report[name] = {"ok": True, "msg": job()}
        except Exception as e:
            report[name] = {"ok": False, "msg": f"{type(e).__name__}: {e}\n"
                                                f"{traceback.format_exc()[-3000:]}"}
        print(f"# {name}: {time.time() - t:.1f}s {report[name]['msg'][:400]}", flush=True)
    print(json.dumps(report), flush=True)


if __name__ == "__main__" and "--worker" in sys.argv:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, ROOT)
    _worker()
