"""The PyTorch peers' harness (benchmarks/torch_peers.py, natten_peer.py) and the minimal
NATTEN build's source rewrite (scripts/natten_minimal.py), on CPU. Parts that run
PyTorch skip where it is not installed."""

from __future__ import annotations

import importlib.util
import json
import os
import time

import numpy as np
import pytest

from jax_gna.bench import Case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name: str):
    """scripts/<name>.py as a module (the scripts folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_time_limit_interrupts_and_is_recognised_when_wrapped():
    from benchmarks.torch_peers import _is_timeout, _Timeout, time_limit

    t0 = time.perf_counter()
    with pytest.raises(_Timeout):
        with time_limit(0.05):
            while time.perf_counter() - t0 < 5:
                pass
    assert time.perf_counter() - t0 < 2
    with time_limit(None):  # no limit: a no-op
        pass
    with time_limit(5):  # the alarm is cleared on exit
        pass
    time.sleep(0.01)
    try:
        try:
            raise _Timeout("problem time limit (1 s) reached")
        except _Timeout as e:
            raise RuntimeError("LoweringException: wrapped") from e
    except RuntimeError as wrapped:
        assert _is_timeout(wrapped)
    assert _is_timeout(RuntimeError("InductorError: _Timeout: problem time limit"))
    assert not _is_timeout(ValueError("other"))


def test_write_split_one_file_per_preset(tmp_path):
    from benchmarks.torch_peers import write_split

    result = {"kind": "torch-peers", "env": {}, "records": [
        {"case": "a", "dtype": "float16", "backend": "flex", "pass": "fwd", "status": "ok",
         "time_s": 1e-3},
        {"case": "b", "dtype": "float16", "backend": "flex", "pass": "fwd", "status": "skipped"}]}
    paths = write_split(result, {"p1": ["a"], "p2": ["b", "c"]}, str(tmp_path), suffix="natten")
    assert [os.path.basename(p) for p in paths] == ["p1-natten.json", "p2-natten.json"]
    p1 = json.loads((tmp_path / "p1-natten.json").read_text())
    assert p1["name"] == "p1" and [r["case"] for r in p1["records"]] == ["a"]
    assert not list(tmp_path.glob("*.tmp"))


def test_run_reports_after_every_problem_and_honours_limits():
    torch = pytest.importorskip("torch")
    from benchmarks import torch_peers

    cases = [Case("t1", (32,), 1, 16, (5,)), Case("t2", (4, 6), 1, 16, (3, 3))]
    seen = []
    res = torch_peers.run(cases, peers=("sdpa",), dtypes=("float32",), passes=("fwd",),
                          sampling=(1, 2, 0.001), progress=False,
                          on_update=lambda r: seen.append(len(r["records"])))
    assert seen == [1, 2]
    assert [r["status"] for r in res["records"]] == ["ok", "ok"]
    assert all(r["tflops"] > 0 for r in res["records"])
    # A spent budget: every measurement is recorded as skipped, none is lost.
    res = torch_peers.run(cases, peers=("sdpa",), dtypes=("float32",), passes=("fwd",),
                          sampling=(1, 2, 0.001), progress=False,
                          deadline=time.perf_counter() - 1)
    assert [r["status"] for r in res["records"]] == ["skipped", "skipped"]
    assert torch.__version__


_GENERATED = """#ifdef NATTEN_WITH_CUTLASS
#include <natten/natten.h>
namespace natten { 
namespace cuda { 


///////////////////////////////////////////////////////////////////
// banner
///////////////////////////////////////////////////////////////////

__global__ void __launch_bounds__(
    K<1, 32>::kNumThreads,
    K<1, 32>::kMinBlocksPerSm)
fna1d_keepme_cm_0(typename K<1, 32>::Params p) {
#ifdef __CUDA_ARCH__
  if (!p.advance_to_block()) {
    return;
  }
  K<1, 32>::attention_kernel(p);
#endif
}


void hopper_fna2d_float16_dropme(
      void* ptr_Q,
      cute::tuple<int, int> q_shape,
      at::TensorOptions tensor_options) {
  auto workspace = at::empty({bytes}, tensor_options.dtype(at::ScalarType::Byte));
  kernel.run(args, workspace_ptr, stream);
}

} // namespace cuda 
} // namespace natten 
#endif 
"""


def test_natten_minimal_keeps_named_kernels_and_stubs_the_rest(tmp_path):
    nm = _script("natten_minimal")
    cat = tmp_path / "autogen" / "src" / "cuda" / "fna"
    cat.mkdir(parents=True)
    (cat / "source_0.cu").write_text(_GENERATED)
    (cat / "source_1.cu").write_text(_GENERATED.replace("keepme", "other").replace(
        "dropme", "keepme_too"))
    res = nm.rewrite_autogen(str(tmp_path / "autogen"), r"keepme")
    assert res == {"fna": (2, 2)}
    files = sorted(os.listdir(cat))
    assert files == ["keep_0.cu", "keep_1.cu", "stubs_0.cu"]
    keep0, keep1, stubs = ((cat / f).read_text() for f in files)
    for text in (keep0, keep1, stubs):  # header and footer kept, braces balanced
        assert text.startswith("#ifdef NATTEN_WITH_CUTLASS") and text.rstrip().endswith("#endif")
        assert text.count("{") == text.count("}")
    assert "K<1, 32>::attention_kernel(p);" in keep0 and "fna1d_keepme_cm_0" in keep0
    assert "kernel.run(args" in keep1 and "hopper_fna2d_float16_keepme_too" in keep1
    assert "fna1d_other_cm_0(typename K<1, 32>::Params p) {}" in stubs
    assert "attention_kernel" not in stubs and "kernel.run" not in stubs
    assert 'throw std::runtime_error("jax_gna minimal NATTEN build: kernel ' \
           'hopper_fna2d_float16_dropme was not compiled");' in stubs


def test_natten_minimal_patches_setup(tmp_path):
    nm = _script("natten_minimal")
    setup = ('        subprocess.check_call(\n            [\n                "python",\n'
             '                script_path,\n'
             '            autogen_kernel_instantitations(\n'
             '                cuda_arch_list=cuda_arch_list,\n            )\n'
             '\n            # Set up cmake\n')
    (tmp_path / "setup.py").write_text(setup)
    nm.patch_setup(str(tmp_path))
    out = (tmp_path / "setup.py").read_text()
    assert '"python",' not in out and "sys.executable," in out
    assert 'os.getenv("NATTEN_KEEP_KERNELS")' in out
    with pytest.raises(SystemExit):
        (tmp_path / "s2").mkdir()
        (tmp_path / "s2" / "setup.py").write_text("print('other version')\n")
        nm.patch_setup(str(tmp_path / "s2"))


def test_natten_peer_config_names_and_fallback():
    from benchmarks import natten_peer

    class Sched:
        name = "WarpSpecializedCooperative"

    assert natten_peer._cfg_str(None) == "default"
    assert natten_peer._cfg_str((((2, 8, 8), (2, 8, 8)), Sched())) == \
        "q2x8x8-kv2x8x8-WarpSpecializedCooperative"
    # Without NATTEN's config module: the default configuration only.
    assert natten_peer._configs(None, None)[0] is None


def test_kernel_profile_medians_from_a_chrome_trace():
    """torch_peers.kernel_medians (used by natten_peer --kernel-time and
    scripts/kernel_profile.py) reads kernel durations (us) from torch.profiler's chrome
    trace: median and launches per call per kernel name; other categories are ignored."""
    from benchmarks.torch_peers import kernel_medians
    kp = _script("kernel_profile")
    trace = {"traceEvents": [
        {"cat": "kernel", "name": "fwd", "dur": 60.0},
        {"cat": "kernel", "name": "fwd", "dur": 58.0},
        {"cat": "kernel", "name": "fwd", "dur": 70.0},
        {"cat": "kernel", "name": "perm", "dur": 5.0},
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "dur": 4.0},
        {"ph": "M", "name": "process_name"}]}
    got = kernel_medians(trace, calls=3)
    assert set(got) == {"fwd", "perm"}
    assert got["fwd"] == (pytest.approx(60e-6), 1.0)
    assert got["perm"] == (pytest.approx(5e-6), pytest.approx(1 / 3))
    # Its printed lines back into records (per call: launches / calls, / 16 in one jit)
    # and the markdown row comparing NATTEN's kernel with ours.
    text = "\n".join([
        "32768 w2048 s2048 H1 bf16 ours:      55.0 us x20 void fwd<bf16>(Params)",
        "32768 w2048 s2048 H1 bf16 ours x16 in one jit:      54.0 us x320 void fwd<bf16>(Params)",
        "32768 w2048 s2048 H1 bf16 natten:      57.2 us x20 void fmha<bf16>",
        "32768 w2048 s2048 H1 bf16 natten:       6.0 us x60 void tokperm<bf16>",
        "a warning line"])
    recs = {r["who"]: r for r in kp.records_from_text(text)}
    assert set(recs) == {"ours", "ours x16 in one jit", "natten"}
    assert recs["ours x16 in one jit"]["kernels"] == [["void fwd<bf16>(Params)", pytest.approx(54e-6), 1.0]]
    assert recs["natten"]["kernel_s"] == pytest.approx(57.2e-6)
    assert recs["natten"]["gpu_s"] == pytest.approx(57.2e-6 + 3 * 6e-6)
    row = kp.markdown(list(recs.values())).splitlines()[2]
    assert row == "| 32768 w2048 s2048 H1 | bf16 | 55.0 us | 54.0 us | 57.2 us | 75.2 us | +4.0% |"
    # With cuDNN dense profiled too, a last column: its GPU time per call.
    recs = kp.records_from_text(text + "\n32768 w2048 s2048 H1 bf16 cudnn:     880.0 us x20 void flash")
    lines = kp.markdown(recs).splitlines()
    assert lines[0].endswith("| cuDNN dense: GPU time per call |")
    assert lines[2].endswith("| +4.0% | 880.0 us |")
    # --backward: every kernel of our backward, in a table of its own below.
    recs = kp.records_from_text(text + "\n" + "\n".join([
        "32768 w2048 s2048 H1 bf16 ours bwd:     120.0 us x20 void dkv<bf16>(Params)",
        "32768 w2048 s2048 H1 bf16 ours bwd:      85.0 us x20 void dq<bf16>(Params)",
        "32768 w2048 s2048 H1 bf16 ours bwd:       5.0 us x20 loop_multiply_reduce_fusion"]))
    bwd = next(r for r in recs if r["who"] == "ours bwd")
    assert bwd["kernel_s"] == pytest.approx(120e-6) and bwd["gpu_s"] == pytest.approx(210e-6)
    lines = kp.markdown(recs).splitlines()
    assert lines[2] == "| 32768 w2048 s2048 H1 | bf16 | 55.0 us | 54.0 us | 57.2 us | 75.2 us | +4.0% |"
    assert lines[-1] == ("| 32768 w2048 s2048 H1 | bf16 | dkv<bf16> 120.0 us; dq<bf16> 85.0 us; "
                         "loop_multiply_reduce_fusion 5.0 us | 210.0 us |")
    assert kp.short("void gna::sm90::dq_sm90_kernel<__nv_bfloat16, 128, 3>(gna::Params, "
                    "CUtensorMap_st)") == "dq_sm90_kernel<__nv_bfloat16, 128, 3>"


def test_kernel_profile_round_mantissa():
    """--inputs mantissaN: values keep their sign and scale, and keep N mantissa bits after
    the leading one (bf16 inputs are exactly representable, so the rounding is exact)."""
    import jax.numpy as jnp
    kp = _script("kernel_profile")
    x = jnp.asarray([1.0, -1.75, 1.8125, 3.3, 0.0, -0.1, 1e-3], jnp.float16)
    y = np.asarray(kp.round_mantissa(x, 2), np.float64)
    assert kp.round_mantissa(x, 2).dtype == jnp.float16
    want = []
    for v in np.asarray(x, np.float64):
        m, e = np.frexp(v)
        want.append(np.ldexp(np.round(m * 8) / 8, e))
    np.testing.assert_array_equal(y, want)
    assert y[1] == -1.75 and y[2] == 1.75 and y[3] == 3.5 and y[4] == 0.0
    # A malformed --inputs is refused by the argument parser, before torch or a GPU is needed.
    with pytest.raises(SystemExit):
        kp.main(["--inputs", "mantissa"])
    # Every result has at most 3 significant bits.
    for v in y[y != 0]:
        m, _ = np.frexp(abs(v))
        assert (m * 8) == np.round(m * 8)


def test_chain_gaps_summary():
    """scripts/chain_gaps.py's summary: gaps inside a call and between calls are told apart
    by the kernel's position in its call, and negative gaps (overlap) are kept."""
    summary = _script("chain_gaps").summary
    ev = [(0.0, 10.0), (11.0, 21.0), (30.0, 40.0), (41.0, 51.0)]  # 2 kernels per call
    s = summary(ev, 2)
    assert "kernel  10.00 us" in s and "gap inside a call   1.00 us" in s, s
    assert "between calls   9.00 us" in s and "span per op  12.75 us (4 kernels)" in s, s
    s = summary([(0.0, 10.0), (8.0, 18.0)], 2)  # the second launch starts before the first ends
    assert "gap inside a call  -2.00 us" in s and "between calls      -" in s, s


def test_ptxas_report_columns():
    """scripts/ptxas_report.py names each kernel template's integer parameters by kernel
    (the forward's second one is its key tile, not its stages; a kernel it does not name
    gets head dim, key tokens, stages, Q slots in order) and counts spills."""
    rows = _script("ptxas_report").rows

    def entry(mangled, regs, spill):
        return (f"ptxas info    : Compiling entry function '_ZN3gna4sm90{mangled}' for 'sm_90a'\n"
                f"ptxas info    : Function properties for x\n    0 bytes stack frame, {spill} bytes spill stores, "
                f"{spill} bytes spill loads\nptxas info    : Used {regs} registers, used 1 barriers\n")
    log = (entry("15fwd_sm90_kernelI13__nv_bfloat16Li128ELi64ELi6EEEvNS_6ParamsE", 168, 0)
           + entry("21fwd_items_sm90_kernelI6__halfLi128ELi128ELi3ELi1EEEvNS_6ParamsEi", 168, 8)
           + entry("14dq_sm90_kernelI6__halfLi64ELi4EEEvNS_6ParamsE", 168, 0)
           + entry("19fwd_new_sm90_kernelI6__halfLi128ELi64ELi6EEEvNS_6ParamsE", 168, 0))
    assert list(rows(log)) == [
        ("fwd_sm90_kernel", "bf16", 128, 64, 6, "-", "sm_90a", 168, 0, 0, 0),
        ("fwd_items_sm90_kernel", "fp16", 128, 128, 3, 1, "sm_90a", 168, 0, 8, 8),
        ("dq_sm90_kernel", "fp16", 64, "-", 4, "-", "sm_90a", 168, 0, 0, 0),
        ("fwd_new_sm90_kernel", "fp16", 128, 64, 6, "-", "sm_90a", 168, 0, 0, 0),  # not named: in order
    ]


def test_lib_ab_table(tmp_path):
    """scripts/lib_ab.py: records of builds and rounds (NAME_ROUND.json) become one row per
    (problem, dtype, kernel) with each build's rounds in order and the change of its mean
    against the `base` build; the backward's row sums its kernels (gpu_s)."""
    lib_ab = _script("lib_ab")

    def rec(prob, who, s):
        return {"problem": prob, "dtype": "bf16", "who": who, "kernel_s": s}
    for name, rnd, t in [("base", 1, 50e-6), ("base", 2, 52e-6), ("knob", 1, 49e-6),
                         ("knob", 2, 49e-6), ("base", 10, 54e-6)]:
        recs = [rec("1-D", "ours", t), rec("2-D", "ours", 100 * t)]
        if name == "base":
            recs.append(rec("1-D", "ours x16 in one jit", t - 1e-6))
        recs.append({**rec("1-D", "ours bwd", 2 * t), "gpu_s": 3 * t})  # summed kernels: gpu_s
        (tmp_path / f"{name}_{rnd}.json").write_text(json.dumps({"calls": 20, "records": recs}))
    (tmp_path / "notes.json").write_text("{}")  # not NAME_ROUND: ignored
    builds, times = lib_ab.load(str(tmp_path))
    assert builds == ["base", "knob"]
    assert times[("1-D", "bf16", "ours")] == {"base": [50e-6, 52e-6, 54e-6], "knob": [49e-6, 49e-6]}
    t = lib_ab.table(builds, times)
    assert "| 1-D | bf16 | ours | 50.0, 52.0, 54.0 | 49.0, 49.0 (-5.8%) |" in t, t
    assert "| 2-D | bf16 | ours | 5.000e3, 5.200e3, 5.400e3 | 4.900e3, 4.900e3 (-5.8%) |" in t, t
    assert "| 1-D | bf16 | ours x16 in one jit | 49.0, 51.0, 53.0 | - |" in t, t
    assert "| 1-D | bf16 | ours bwd | 150.0, 156.0, 162.0 | 147.0, 147.0 (-5.8%) |" in t, t
    assert "knob (vs base)" in t.splitlines()[0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        lib_ab.load(str(tmp_path / "empty"))


def test_fwd_timeline_stamps():
    """scripts/fwd_timeline.py reads the timeline build's stamps back out of the lse:
    warpgroup 0's eight stamps, the SM, the key-tile count and the producer's Q-load stamp
    over each tile's queries 0-10, warpgroup 1's eight stamps over queries 64-71, relative
    to the first entry and across the 32-bit wrap of %globaltimer_lo."""
    ft = _script("fwd_timeline")
    tokens, heads = 256, 2  # two tiles per head
    raw = np.full((tokens, heads), 0x7F7FFFFF, np.uint32)  # a large real lse elsewhere
    base = 2**32 - 500  # the first entry, 500 ns before the counter wraps
    for h in range(heads):
        for t in range(2):
            start = base + 1000 * (2 * h + t)
            raw[128 * t:128 * t + 8, h] = (start + 10 * np.arange(8)) % 2**32
            raw[128 * t + 8, h], raw[128 * t + 9, h] = 7 + t, 16
            raw[128 * t + 10, h] = (start + 5) % 2**32  # the Q load went out
            raw[128 * t + 64:128 * t + 72, h] = (start + 20 * np.arange(8)) % 2**32
    ns, sm, n, q = ft.stamps(raw.view(np.float32), tokens, heads)
    assert ns.shape == (4, 2, ft.POINTS)
    np.testing.assert_array_equal(ns[:, 0, 0], [0, 1000, 2000, 3000])  # head-major tiles
    np.testing.assert_array_equal(ns[3, 0], 3000 + 10 * np.arange(8))  # wrapped stamps
    np.testing.assert_array_equal(ns[1, 1], 1000 + 20 * np.arange(8))
    np.testing.assert_array_equal(sm, [7, 8, 7, 8])
    assert (n == 16).all()
    np.testing.assert_array_equal(q, [5, 1005, 2005, 3005])  # across the wrap too
    with pytest.raises(SystemExit):  # a normal build's lse: no stamps
        ft.stamps(np.zeros((tokens, heads), np.float32) + 3.5, tokens, heads)
