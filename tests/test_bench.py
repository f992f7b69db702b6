"""The benchmark suite: FLOP counting, presets, peers, and the smoke preset end to end (CPU)."""

from __future__ import annotations

import json
import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_gna import bench, sim
from jax_gna.bench import Case


def test_case_flops_follow_semantics():
    case = Case("h", (30, 48, 80), 24, 128, (18, 24, 24), (16, 8, 8), batch=2)
    info = bench._case_info(case)
    fwd = 4 * 2 * 24 * (30 * 48 * 80) * (18 * 24 * 24) * 128
    assert info["flops"]["fwd"] == fwd
    assert info["flops"]["bwd"] == 2.5 * fwd
    assert info["flops"]["fwdbwd"] == 3.5 * fwd
    assert round(info["flop_bound"], 2) == 11.11
    assert info["tile_bound"] == pytest.approx(info["flop_bound"])  # blocked: no waste
    # Causal in time: only attended keys count.
    c = Case("c", (10, 6), 2, 16, (4, 3), is_causal=(True, False))
    per_t = sum([1, 2, 3, 4, 4, 4, 4, 4, 4, 4])
    assert bench._case_info(c)["flops"]["fwd"] == 4 * 2 * per_t * 6 * 3 * 16
    assert bench._case_info(c)["flops"]["fwd"] == sim.flops((10, 6), (4, 3),
                                                            is_causal=(True, False),
                                                            heads=2, head_dim=16)


def test_derived_metrics():
    case = Case("a", (64,), 1, 32, (8,))
    infos = {"a": bench._case_info(case)}
    recs = [{"case": "a", "dtype": "float16", "backend": "cudnn", "pass": "fwd",
             "status": "ok", "time_s": 2e-3},
            {"case": "a", "dtype": "float16", "backend": "cuda", "pass": "fwd",
             "status": "ok", "time_s": 1e-3},
            {"case": "a", "dtype": "float16", "backend": "xla", "pass": "fwd",
             "status": "skipped", "note": "x"}]
    bench._derive(recs, infos)
    assert recs[1]["speedup"] == pytest.approx(2.0)
    assert recs[1]["tflops"] == pytest.approx(4 * 64 * 8 * 32 / 1e-3 / 1e12)
    assert recs[1]["pct_bound"] == pytest.approx(200.0 / infos["a"]["tile_bound"])
    assert "speedup" not in recs[2]


def test_presets_match_issue_5():
    paper = bench.PRESETS["paper"]
    assert len(paper) == 18
    assert all(c.head_dim == 128 and c.batch == 1 for c in paper)
    one_d = [c for c in paper if c.shape == (32768,)]
    assert [(c.stride, c.heads) for c in one_d] == [((1,), 1), ((256,), 1), ((2048,), 1),
                                                    ((1,), 24), ((256,), 24), ((2048,), 24)]
    assert all(c.kernel_size == (2048,) for c in one_d)
    flux = [c for c in paper if c.shape == (256, 256)]
    assert [c.stride for c in flux] == [(1, 1), (16, 1), (16, 16)]
    assert all(c.heads == 24 and c.kernel_size == (80, 80) for c in flux)
    hy = [(c.kernel_size, c.stride) for c in paper if c.shape == (30, 48, 80)]
    assert hy == [((18, 24, 24), (1, 1, 1)), ((18, 24, 24), (2, 8, 8)),
                  ((18, 24, 24), (16, 8, 8)), ((30, 40, 40), (1, 1, 1)),
                  ((30, 40, 40), (1, 32, 8))]
    cos = [(c.kernel_size, c.stride) for c in paper if c.shape == (16, 44, 80)]
    assert cos == [((16, 32, 48), (1, 1, 1)), ((16, 32, 48), (1, 8, 16)),
                   ((16, 24, 16), (1, 1, 1)), ((16, 24, 16), (1, 8, 16))]
    assert all(c.heads == 32 for c in paper if c.shape == (16, 44, 80))
    small = bench.PRESETS["small"]
    assert [(c.shape, c.heads, c.head_dim, c.kernel_size, c.batch, c.dilation) for c in small] == [
        ((128, 128), 16, 64, (13, 13), 16, (1, 1)), ((128, 128), 16, 64, (13, 13), 16, (2, 2))]
    causal = bench.PRESETS["causal"]
    assert [c.shape for c in causal] == [(30, 32, 32), (60, 64, 64)]
    assert all(c.heads == 24 and c.is_causal == (True, False, False) for c in causal)
    # Every preset problem is a valid GNA problem.
    for cases in bench.PRESETS.values():
        for c in cases:
            sim.simulate(*c.window_args(), q_tile=128, kv_tile=128)
    from benchmarks.presets import PRESETS
    assert PRESETS is bench.PRESETS


@pytest.mark.parametrize("case", bench.PRESETS["smoke"], ids=lambda c: c.name)
def test_masked_dense_peer_matches_xla_backend(case):
    rng = np.random.default_rng(0)
    shp = (case.batch,) + case.shape
    q, k, v = (jnp.asarray(rng.standard_normal(shp + (case.heads, case.head_dim)), jnp.float32)
               for _ in range(3))
    ours = bench.attention_fn("xla", case)(q, k, v)
    dense = bench.attention_fn("masked", case)(q, k, v, bench._neighbor_mask(case))
    np.testing.assert_allclose(np.asarray(dense), np.asarray(ours), atol=2e-5, rtol=2e-5)


def test_passes_compute_gradients():
    case = bench.PRESETS["smoke"][0]
    f = bench.attention_fn("xla", case)
    x = jnp.ones((1,) + case.shape + (case.heads, case.head_dim))
    fn, args = bench.pass_fn(f, "bwd", x, x, x, x, ())
    grads = jax.jit(fn)(*args)
    fn2, args2 = bench.pass_fn(f, "fwdbwd", x, x, x, x, ())
    out, grads2 = jax.jit(fn2)(*args2)
    for g, g2 in zip(grads, grads2):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g2), atol=1e-5)
    m = bench.measure(jax.jit(f), (x, x, x), 1, 2, 0.0)
    assert m["time_s"] > 0 and m["samples"] >= 1 and m["settle_s"] == 0.0


STEP = 2.0 ** -10  # seconds one call of the stamped op takes on the fake clock (exact in binary)


@pytest.fixture
def stamped_op(monkeypatch):
    """A jittable x + 1 whose every run takes exactly STEP seconds of a fake clock that
    `bench.measure` reads, and the list of the clock's values at the start of each run:
    the timing logic tested without the host's speed in it (a wall-clock version of these
    tests once failed on a loaded CI machine)."""
    now = [0.0]
    calls = []

    def tick():
        calls.append(now[0])
        now[0] += STEP

    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    def f(x):
        jax.debug.callback(tick)
        return x + 1
    return f, calls


def test_measure_settles_before_sampling(stamped_op):
    f, calls = stamped_op
    m = bench.measure(f, (jnp.ones(4),), 1, 1, 0.0, batch_s=64 * STEP, settle_s=100 * STEP)
    assert m["settle_s"] == 100 * STEP and m["samples"] == 1 and m["inner"] == 64
    # The warm-up call, the call that sizes the batches, two settling batches (128 calls, the
    # first batch that ends past 100 steps) and the one sample.
    assert len(calls) == 2 + 2 * 64 + 64
    assert m["time_s"] == STEP


def test_measure_samples_last_about_batch_s(stamped_op):
    f, calls = stamped_op
    x = jnp.ones(4)
    m = bench.measure(f, (x,), 1, 3, target_s=250 * STEP, batch_s=100 * STEP)
    # One call sized the batches: 100 calls each; target_s // 100 steps = 2 samples.
    assert m["batch_s"] == 100 * STEP and m["inner"] == 100 and m["samples"] == 2
    assert len(calls) == 2 + 2 * 100
    assert m["time_s"] == m["min_s"] == STEP
    # At most 1000 calls a batch, and at least one.
    assert bench.measure(f, (x,), 1, 1, 0.0, batch_s=5000 * STEP)["inner"] == 1000
    assert bench.measure(f, (x,), 1, 1, 0.0, batch_s=STEP / 2)["inner"] == 1


def test_cases_filter_keeps_matching_preset_cases(tmp_path):
    rc = bench.main(["--preset", "smoke", "--cases", "2d|3d", "--backends", "xla",
                     "--passes", "fwd", "--out", str(tmp_path), "--samples", "1x1",
                     "--no-progress"])
    assert rc == 0
    data = json.loads((tmp_path / "smoke.json").read_text())
    assert [c["name"] for c in data["cases"]] == ["smoke-2d-16x16-w6x6-s2x3-d1x2",
                                                  "smoke-3d-4x8x8-w3x4x4-causal"]


def test_masked_peer_skipped_when_too_big():
    case = next(c for c in bench.PRESETS["paper"] if c.shape == (30, 48, 80))  # a 115200^2 mask
    res = bench.run([case], backends=("masked", "cudnn"), passes=("fwd",), progress=False)
    recs = res["records"]
    assert [r["status"] for r in recs] == ["skipped", "skipped"]
    assert "does not fit" in recs[0]["note"]


def test_smoke_preset_end_to_end(tmp_path):
    out = tmp_path / "results"
    rc = bench.main(["--preset", "smoke", "--backends", "xla,masked,cuda,cudnn", "--out",
                     str(out), "--samples", "1x2", "--no-progress"])
    assert rc == 0
    data = json.loads((out / "smoke.json").read_text())
    assert data["env"]["jax"] == jax.__version__
    assert len(data["cases"]) == len(bench.PRESETS["smoke"])
    by = {}
    for r in data["records"]:
        by.setdefault(r["backend"], []).append(r)
    n = len(bench.PRESETS["smoke"]) * len(bench.PASSES)
    assert len(by["xla"]) == len(by["masked"]) == n
    assert all(r["status"] == "ok" and r["time_s"] > 0 and r["tflops"] > 0
               for r in by["xla"] + by["masked"])
    if jax.default_backend() == "cpu":
        assert all(r["status"] == "skipped" for r in by["cudnn"])
    md = (out / "smoke.md").read_text()
    assert "| smoke-1d-256-w16 |" in md and "## Results" in md


def test_single_problem_from_flags(tmp_path):
    rc = bench.main(["--shape", "24", "--kernel-size", "5", "--stride", "2", "--heads", "2",
                     "--head-dim", "16", "--backends", "xla", "--passes", "fwd", "--out",
                     str(tmp_path), "--name", "one", "--samples", "1x1", "--no-progress"])
    assert rc == 0
    data = json.loads((tmp_path / "one.json").read_text())
    assert data["cases"][0]["stride"] == [2] and data["records"][0]["status"] == "ok"


@pytest.mark.parametrize("argv,message", [
    (["--shape", "64", "--kernel-size", "8", "--heads", "3", "--heads-kv", "2"], "multiple of"),
    (["--shape", "64", "--kernel-size", "80"], "must not exceed"),
    (["--shape", "64"], "--shape needs --kernel-size"),
    (["--kernel-size", "8"], "--kernel-size needs --shape"),
    (["--samples", "0x0"], "--samples must be"),
    (["--samples", "5x2"], "--samples must be"),
    (["--dtypes", "fp8"], "--dtypes fp8"),
    (["--backends", "cuda,foo"], "--backends foo"),
    (["--passes", "fwd,back"], "--passes back"),
    (["--heads", "0"], "--heads must be"),
])
def test_bench_refuses_bad_arguments(tmp_path, capsys, argv, message):
    """Arguments that cannot run end with exit status 2 and one line naming the problem,
    before any measurement (they wrote rows of "error" and exited 0, or raised)."""
    assert bench.main(argv + ["--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not list(tmp_path.iterdir())


def test_cli_check_arguments_and_failures(capsys):
    """``jax-gna check``: --repeats below 1 is an argparse error; a backend that cannot run
    the problems (cuda without the kernels) gives FAILED lines and status 1, no traceback."""
    from jax_gna import cli
    for bad in ("0", "-1"):
        with pytest.raises(SystemExit) as e:
            cli.main(["check", "--repeats", bad])
        assert e.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err
    if any(d.platform == "gpu" for d in jax.devices()):
        return
    assert cli.main(["check", "--backend", "cuda", "--repeats", "1"]) == 1
    out = capsys.readouterr().out
    assert out.count("FAILED: backend='cuda' cannot run this call") == 3, out
    assert "3 check(s) FAILED" in out


def test_chart_from_synthetic_results(tmp_path):
    pytest.importorskip("matplotlib")
    case = Case("a", (64,), 1, 32, (8,))
    infos = {"a": bench._case_info(case)}
    recs = [{"case": "a", "dtype": "float16", "backend": b, "pass": "fwd", "status": "ok",
             "time_s": t} for b, t in (("cudnn", 4e-3), ("cuda", 1e-3), ("xla", 2e-3))]
    bench._derive(recs, infos)
    result = {"name": "synthetic", "env": bench.environment(), "cases": list(infos.values()),
              "records": recs, "wall_s": 1.0,
              "config": {"backends": ["cuda", "xla", "cudnn"], "dtypes": ["float16"],
                         "passes": ["fwd"], "cuda": True, "cuda_note": ""}}
    paths = bench.write_report(result, str(tmp_path))
    assert os.path.getsize(paths["png"]) > 1000
    assert "**4.00x**" in (tmp_path / "synthetic.md").read_text()


def test_cli_sim(capsys):
    from jax_gna import cli
    assert cli.main(["sim", "--shape", "30x48x80", "--kernel-size", "18x24x24", "--stride",
                     "16x8x8", "--q-tile", "4x8x8", "--kv-tile", "2x8x8"]) == 0
    assert "11.11x worst query tile" in capsys.readouterr().out
    assert cli.main(["sim", "--shape", "256x256", "--kernel-size", "80", "--top", "3",
                     "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["search"]) == 3 and data["search"][0]["bound"] >= data["search"][1]["bound"]
    assert cli.main(["sim", "--shape", "16", "--kernel-size", "17"]) == 2
    # --waves: the wave model of the tiling given (or the search's best), both grids.
    argv = ["sim", "--shape", "32768", "--kernel-size", "2048", "--stride", "256", "--q-tile", "64",
            "--kv-tile", "128", "--waves"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "key-outer    256 x 1 CTAs on 132 SMs, query tiles per key tile 16-48" in out
    assert cli.main(argv + ["--json", "--sms", "114", "--ctas-per-tile", "2"]) == 0
    w = json.loads(capsys.readouterr().out)["waves"]
    assert [x["key_outer"] for x in w] == [False, True] and w[1]["sms"] == 114
    assert w[1]["ctas_per_tile"] == 2 and w[1]["in_order"] >= w[1]["heaviest_first"] >= w[1]["ideal"]
    assert cli.main(argv + ["--sms", "0"]) == 2


def test_cli_bench_registered():
    from jax_gna import cli
    args = cli.build_parser().parse_args(["bench", "--preset", "paper,small", "--budget-s", "5"])
    assert args.run is bench.run_from_args and args.budget_s == 5.0


def test_model_smoke_block(tmp_path):
    from jax_gna import bench_model
    case = bench_model.MODEL_PRESETS["model-smoke"]
    res = bench_model.run_model(case, backends=("xla",), passes=("fwd",), sampling=(1, 1, 0.0),
                                progress=False, name="m")
    st = {r["variant"]: r["status"] for r in res["records"]}
    assert st["no attention (ceiling)"] == "ok"
    assert all(v == "ok" for k, v in st.items() if k.startswith("GNA"))
    paths = bench_model.write_model_report(res, str(tmp_path))
    assert "GNA w3x4x4-s1 (xla)" in open(paths["md"]).read()
    # The full-size block is the one of issue 5.
    full = bench_model.MODEL_PRESETS["model"]
    assert (full.hidden, full.heads, full.head_dim, full.mlp_ratio, full.grid) == (
        3072, 24, 128, 4, (30, 48, 80))


def test_merge_peers_and_from_json(tmp_path):
    case = Case("a", (64,), 1, 32, (8,))
    infos = {"a": bench._case_info(case)}
    recs = [{"case": "a", "dtype": "float16", "backend": b, "pass": "fwd", "status": "ok",
             "time_s": t} for b, t in (("cudnn", 4e-3), ("cuda", 1e-3))]
    result = {"name": "r", "env": bench.environment(), "cases": list(infos.values()),
              "records": recs, "wall_s": 1.0,
              "config": {"backends": ["cuda", "cudnn"], "dtypes": ["float16"],
                         "passes": ["fwd"], "cuda": True, "cuda_note": ""}}
    peers = {"kind": "torch-peers", "env": {"torch": "x"}, "records": [
        {"case": "a", "dtype": "float16", "backend": "flex", "pass": "fwd", "status": "ok",
         "time_s": 2e-3},
        {"case": "other", "dtype": "float16", "backend": "flex", "pass": "fwd",
         "status": "ok", "time_s": 1.0}]}
    merged = bench.merge_peers(result, [peers])
    flex = [r for r in merged["records"] if r["backend"] == "flex"]
    assert len(flex) == 1 and flex[0]["speedup"] == pytest.approx(2.0)
    assert merged["config"]["backends"] == ["cuda", "cudnn", "flex"]
    assert len(result["records"]) == 2  # the input is not modified
    src, peer_file = tmp_path / "r.json", tmp_path / "p.json"
    src.write_text(json.dumps(result))
    peer_file.write_text(json.dumps(peers))
    out = tmp_path / "out"
    assert bench.main(["--from-json", str(src), "--merge-peers", str(peer_file), "--out",
                       str(out)]) == 0
    md = (out / "r.md").read_text()
    assert "| a | fp16 | flex |" in md and "**2.00x**" in md
    # A later file replaces the records it has; peer_env says which file each backend
    # came from, and the markdown where those peers ran.
    later = {"kind": "torch-peers", "env": {"torch": "y", "device": "GPU-B", "date": "2026-11-29"},
             "records": [{"case": "a", "dtype": "float16", "backend": "sdpa", "pass": "fwd",
                          "status": "ok", "time_s": 3e-3},
                         {"case": "a", "dtype": "float16", "backend": "flex", "pass": "fwd",
                          "status": "ok", "time_s": 1e-3}]}
    merged = bench.merge_peers(result, [peers, later])
    flex = [r for r in merged["records"] if r["backend"] == "flex"]
    assert len(flex) == 1 and flex[0]["speedup"] == pytest.approx(4.0)
    assert [e["backends"] for e in merged["peer_env"]] == [[], ["flex", "sdpa"]]
    md = bench.markdown(merged)
    assert "`flex`/`sdpa` on GPU-B, not this run's GPU (torch y, 2026-11-29)" in md
    assert "torch x" not in md  # the first file's records were all replaced


@pytest.mark.parametrize("case", bench.PRESETS["smoke"], ids=lambda c: c.name)
def test_flex_attention_mask_mod_is_the_gna_mask(case):
    torch = pytest.importorskip("torch")
    from benchmarks.torch_peers import gna_mask_mod
    n = case.tokens
    m = gna_mask_mod(case, torch)(0, 0, torch.arange(n)[:, None], torch.arange(n)[None, :])
    np.testing.assert_array_equal(m.numpy(), np.asarray(bench._neighbor_mask(case)))


def test_hopper_report(tmp_path):
    """benchmarks/hopper_report.py: per-problem rows, the backward's per-FLOP ratio
    against cuDNN dense, and the target verdicts, from a small synthetic result file."""
    from benchmarks import hopper_report

    case = {"name": "flux-256x256-w80x80-s16x16", "density": 0.1}
    rec = lambda be, ps, t, tf, sp=None: {  # noqa: E731
        "case": case["name"], "dtype": "bfloat16", "backend": be, "pass": ps, "status": "ok",
        "time_s": t, "tflops": tf, "speedup": sp, "pct_bound": 80.0}
    data = {"env": {"device": "H100", "jax": "0.11.2"}, "cases": [case], "records": [
        rec("cuda", "fwd", 9e-3, 500.0, 9.0), rec("cudnn", "fwd", 81e-3, 60.0, 1.0),
        rec("cuda", "bwd", 36e-3, 350.0, 6.5), rec("cudnn", "bwd", 234e-3, 50.0, 1.0),
        rec("cuda", "fwdbwd", 45e-3, 390.0, 7.0)]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    text = hopper_report.report(str(path))
    row = next(line for line in text.splitlines() if line.startswith("| flux-256x256-w80x80-s16x16 | bf16"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "9.00 ms" and cells[5] == "-" and cells[8] == "<= 8.00 ms: missed"
    assert cells[13] == "70%"  # 350 * 0.1 / 50: useful-FLOP rate over cuDNN's dense rate
    assert "| flux-256x256-w80x80-s16x16 | <= 8.00 ms | 9.00 ms | missed" in text
    # A forward also timed in one jit: that time (and its % SOL) is shown and judged.
    data["records"][0].update(chained_s=7.5e-3, chain=16)
    path.write_text(json.dumps(data))
    text = hopper_report.report(str(path))
    row = next(line for line in text.splitlines() if line.startswith("| flux-256x256-w80x80-s16x16 | bf16"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "9.00 ms" and cells[5] == "7.50 ms (96%)" and cells[8] == "<= 8.00 ms: met"
    assert "| flux-256x256-w80x80-s16x16 | <= 8.00 ms | 7.50 ms | met" in text
    assert "NATTEN measured" not in text
    # NATTEN's measured forward merged in: its kernel against our in-jit time, its call
    # against our time per call.
    data["records"].append(dict(rec("natten", "fwd", 10.8e-3, 400.0), natten_kernel_s=8.25e-3,
                                natten_config="q16x8-kv16x8-pp"))
    data["peer_env"] = [{"natten": "0.21.7", "device": "H100", "date": "d", "backends": ["natten"]}]
    path.write_text(json.dumps(data))
    text = hopper_report.report(str(path))
    assert "NATTEN measured (`benchmarks.natten_peer --kernel-time`: NATTEN 0.21.7" in text
    row = [line for line in text.splitlines() if line.startswith("| flux-256x256-w80x80-s16x16 | bf16")][-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:] == ["9.00 ms", "7.50 ms", "8.25 ms", "+10%", "10.80 ms", "+20%", "q16x8-kv16x8-pp"]
    # Kernel durations of scripts/kernel_profile.py beside the targets, judged on their own.
    case.update(shape=[256, 256], kernel_size=[80, 80], stride=[16, 16], heads=24)
    path.write_text(json.dumps(data))
    kpath = tmp_path / "k.json"
    kpath.write_text(json.dumps({"records": [
        {"problem": "256x256 w80x80 s16x16 H24", "dtype": "bf16", "who": "ours", "kernel_s": 7.9e-3}]}))
    text = hopper_report.report(str(path), str(kpath))
    assert "| flux-256x256-w80x80-s16x16 | <= 8.00 ms | 7.50 ms | met (NATTEN 7.9 / 10.6 ms) | 7.90 ms | met |" in text
    assert "Same GPU, kernel against kernel" not in text
    # With NATTEN's kernel in the records (--natten-best): the same-GPU table, and for fp16
    # NATTEN's published H100 figure (7.9 ms) scaled by ours / NATTEN's here.
    kpath.write_text(json.dumps({"records": [
        {"problem": "256x256 w80x80 s16x16 H24", "dtype": dt, "who": who, "kernel_s": t}
        for dt, who, t in [("bf16", "ours", 7.9e-3), ("bf16", "natten", 8.1e-3),
                           ("fp16", "ours", 8.4e-3), ("fp16", "natten", 8.0e-3)]]}))
    text = hopper_report.report(str(path), str(kpath))
    assert "Same GPU, kernel against kernel" in text
    assert "| flux-256x256-w80x80-s16x16 | bf16 | 7.90 ms | 8.10 ms | +2.5% | 7.90 ms | <= 8.00 ms | - |" in text
    assert "| flux-256x256-w80x80-s16x16 | fp16 | 8.40 ms | 8.00 ms | -4.8% | 7.90 ms | <= 8.00 ms | 8.29 ms: missed |" \
        in text
    # The same-GPU table from another file (--same-gpu): the kernel column still comes from
    # the --kernels file, the table's "ours" from the file that also holds NATTEN.
    npath = tmp_path / "n.json"
    npath.write_text(kpath.read_text())
    kpath.write_text(json.dumps({"records": [
        {"problem": "256x256 w80x80 s16x16 H24", "dtype": "bf16", "who": "ours", "kernel_s": 7.7e-3}]}))
    text = hopper_report.report(str(path), str(kpath), str(npath))
    assert "| flux-256x256-w80x80-s16x16 | <= 8.00 ms | 7.50 ms | met (NATTEN 7.9 / 10.6 ms) | 7.70 ms | met |" in text
    assert f"Same GPU, kernel against kernel (`{npath}`" in text
    assert f"`python -m benchmarks.hopper_report {path} --kernels {kpath} --same-gpu {npath}` from" in text
    assert "| flux-256x256-w80x80-s16x16 | bf16 | 7.90 ms | 8.10 ms | +2.5% | 7.90 ms | <= 8.00 ms | - |" in text
    assert "Same GPU" not in hopper_report.report(str(path), str(kpath))
    assert hopper_report.published_kernel_s("flux-256x256-w80x80-s16x16") == pytest.approx(7.9e-3)
    assert hopper_report.published_kernel_s("1d-32768-w2048-s2048") == pytest.approx(59.3e-6)


def test_fast_forward_also_timed_in_one_jit():
    """A forward under the chain threshold gets a per-op time from CHAIN forwards in one
    jitted call (positive, recorded with the chain length) and its markdown cell says so;
    the backward passes do not."""
    case = Case("t", (24,), heads=1, head_dim=8, kernel_size=(5,))
    res = bench.run([case], backends=("xla",), dtypes=("float32",), passes=("fwd", "bwd"),
                    sampling=(1, 2, 0.01), progress=False, chain_below_s=10.0)
    fwd, bwd = (next(r for r in res["records"] if r["pass"] == p) for p in ("fwd", "bwd"))
    assert fwd["status"] == "ok" and fwd["chain"] == bench.CHAIN and fwd["chained_s"] > 0
    assert "chained_s" not in bwd
    assert f"{bench.CHAIN} in one jit:" in bench.markdown(res)
