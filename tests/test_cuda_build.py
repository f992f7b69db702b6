"""CPU checks of the cuda backend (run in CI, no GPU needed).

- the CUDA sources compile with nvcc (compile only, one arch; skipped without nvcc);
- the custom calls lower for the cuda platform with the right attributes, with or
  without the compiled library;
- the fallback and error paths when the library or a GPU is missing.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jax_gna import cuda
from jax_gna.params import Problem

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def _problem(shape=(12, 10), k=(3, 4), s=(1, 2), d=(2, 1), c=(False, True), **kw):
    return Problem(shape=tuple(shape), kernel_size=tuple(k), stride=tuple(s), dilation=tuple(d),
                   is_causal=tuple(c), scale=0.125, **kw)


def _lower(fn, *args) -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


# --------------------------------------------------------------------------
# nvcc compiles the sources.
# --------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_sources_compile(tmp_path):
    import jax.ffi
    inc = jax.ffi.include_dir()
    arch = os.environ.get("JAX_GNA_TEST_ARCH", "sm_80")
    sources = sorted(CSRC.glob("*.cu"))
    assert sources, "no CUDA sources in csrc/"

    def compile_one(src):
        cmd = ["nvcc", "-std=c++17", "-O2", f"-arch={arch}", "--expt-relaxed-constexpr",
               f"-I{CSRC}", "-isystem", inc, "-Xcompiler", "-fPIC", "-c", str(src),
               "-o", str(tmp_path / (src.stem + ".o"))]
        r = subprocess.run(cmd, capture_output=True, text=True)
        return src.name, r.returncode, r.stderr

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as ex:
        results = list(ex.map(compile_one, sources))
    failed = [(n, err) for n, rc, err in results if rc != 0]
    assert not failed, "\n".join(f"{n}:\n{err[-3000:]}" for n, err in failed)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_sm90_kernels_compile_without_spills(tmp_path):
    """The Hopper kernels build for sm_90a with no register spills (ptxas report)."""
    import jax.ffi
    cmd = ["nvcc", "-std=c++17", "-O3", "-arch=sm_90a", "--expt-relaxed-constexpr", f"-I{CSRC}",
           "-isystem", jax.ffi.include_dir(), "-Xcompiler", "-fPIC", "-Xptxas", "-v", "-c",
           str(CSRC / "gna_sm90.cu"), "-o", str(tmp_path / "gna_sm90.o")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    reports = re.findall(r"Compiling entry function '(\w*sm90\w*)'.*?(\d+) bytes spill stores, (\d+) bytes spill loads",
                         r.stderr, re.S)
    # forward: 2 dtypes x head dims 64/128/256, and 64-token key tiles at 64/128;
    # with additional tokens: 2 dtypes x 64/128/256; several query tiles per CTA: 2 dtypes x
    # (64, 128) x (64/128-token key tiles); pairs of query tiles in clusters: 2 dtypes x 128 x
    # (64/128-token key tiles); backward: 2 dtypes x 64/128 x (dQ, dK/dV)
    assert sum("fwd_sm90" in name for name, _, _ in reports) == 10, r.stderr[-3000:]
    assert sum("fwd_tokens_sm90" in name for name, _, _ in reports) == 6, r.stderr[-3000:]
    assert sum("fwd_items_sm90" in name for name, _, _ in reports) == 8, r.stderr[-3000:]
    assert sum("fwd_pair_sm90" in name for name, _, _ in reports) == 4, r.stderr[-3000:]
    assert len(reports) == 36, r.stderr[-3000:]
    spilled = [name for name, st, ld in reports if int(st) or int(ld)]
    assert not spilled, f"register spills in {spilled}"


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_python_module_compiles(tmp_path):
    pybind11 = pytest.importorskip("pybind11")
    import jax.ffi
    import sysconfig
    cmd = ["c++", "-std=c++17", "-fsyntax-only", f"-I{CSRC}", "-isystem", jax.ffi.include_dir(),
           "-isystem", pybind11.get_include(), "-isystem", sysconfig.get_paths()["include"],
           str(CSRC / "python_module.cc")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


# --------------------------------------------------------------------------
# Lowering for the cuda platform (no GPU, no library needed).
# --------------------------------------------------------------------------

def _inputs(problem, b=2, h=4, h_kv=2, d=32, d_v=16, dtype=jnp.float16):
    q = jnp.zeros((b, *problem.q_extent, h, d), dtype)
    k = jnp.zeros((b, *problem.kv_extent, h_kv, d), dtype)
    v = jnp.zeros((b, *problem.kv_extent, h_kv, d_v), dtype)
    return q, k, v


def _int_array(text: str, name: str) -> list[int]:
    """The int64 array attribute ``name`` of the custom call (dense or splat form)."""
    m = re.search(rf"\b{name} = (?:dense<\[?([-0-9, ]+)\]?> : tensor<(\d+)xi64>|array<i64: ([-0-9, ]+)>)",
                  text)
    assert m, f"int64 array attribute {name} not found in\n{text}"
    if m.group(3) is not None:
        return [int(x) for x in m.group(3).split(",")]
    vals = [int(x) for x in m.group(1).split(",")]
    n = int(m.group(2))
    return vals * n if len(vals) == 1 else vals


def test_forward_lowers_with_attributes():
    p = _problem(q_origin=(2, 0), q_extent=(8, 10), kv_origin=(0, 0), kv_extent=(12, 10))
    q, k, v = _inputs(p)
    text = _lower(lambda q, k, v: cuda.attention(q, k, v, p), q, k, v)
    assert "jax_gna_fwd" in text
    for name, want in (("shape", "12, 10"), ("kernel_size", "3, 4"), ("stride", "1, 2"),
                       ("dilation", "2, 1"), ("is_causal", "0, 1"), ("q_origin", "2, 0"),
                       ("q_extent", "8, 10"), ("kv_origin", "0, 0"), ("kv_extent", "12, 10")):
        assert _int_array(text, name) == [int(x) for x in want.split(", ")], name
    assert re.search(r"scale = 1\.250*e-01 : f32", text), text
    # Results: out in the input dtype with D_v, lse in float32.
    assert "tensor<2x8x10x4x16xf16>" in text and "tensor<2x8x10x4xf32>" in text


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_gradient_lowers_to_backward_call(dtype):
    p = _problem(shape=(20,), k=(5,), s=(2,), d=(1,), c=(True,))
    q, k, v = _inputs(p, dtype=dtype)

    def loss(q, k, v):
        out, lse = cuda.attention(q, k, v, p)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

    text = _lower(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
    assert "jax_gna_fwd" in text and "jax_gna_bwd" in text
    assert text.count("custom_call_target") >= 2 or text.count("stablehlo.custom_call") >= 2


def test_vmap_folds_into_batch():
    p = _problem(shape=(16,), k=(3,), s=(1,), d=(1,), c=(False,))
    q, k, v = _inputs(p, b=2)
    stack = lambda x: jnp.stack([x, x, x])  # noqa: E731
    text = _lower(jax.vmap(lambda q, k, v: cuda.attention(q, k, v, p)), stack(q), stack(k), stack(v))
    assert "jax_gna_fwd" in text and "tensor<3x2x16x4x16xf16>" in text


def test_poisoned_variant_aliases_outputs():
    p = _problem(shape=(16,), k=(3,), s=(1,), d=(1,), c=(False,))
    q, k, v = _inputs(p)
    text = _lower(lambda q, k, v: cuda._attention_poisoned(q, k, v, p), q, k, v)
    assert "jax_gna_fwd_aliased" in text and "output_operand_alias" in text


# --------------------------------------------------------------------------
# Availability and support checks.
# --------------------------------------------------------------------------

def test_import_and_reason_on_this_machine():
    reason = cuda.unavailable_reason()
    assert isinstance(reason, str)
    assert cuda.available() == (reason == "")
    try:
        has_gpu = len(jax.devices("gpu")) > 0
    except RuntimeError:
        has_gpu = False
    if not has_gpu:
        assert not cuda.available() and reason


def test_library_missing(monkeypatch):
    monkeypatch.setattr(cuda, "_load_library", lambda: (None, "the jax_gna CUDA library is not built (test)"))
    assert not cuda.available()
    assert "not built" in cuda.unavailable_reason()
    # Lowering still works without the library (nothing is registered).
    p = _problem(shape=(16,), k=(3,), s=(1,), d=(1,), c=(False,))
    q, k, v = _inputs(p)
    assert "jax_gna_fwd" in _lower(lambda q, k, v: cuda.attention(q, k, v, p), q, k, v)


def test_command_buffer_switch_picks_the_handlers(monkeypatch):
    """JAX_GNA_COMMAND_BUFFER=0 registers the handlers XLA calls on every execution, the
    default the command-buffer-compatible ones."""
    asked = []

    class Lib:
        def registrations(self, command_buffer=True):
            asked.append(command_buffer)
            return {}

    monkeypatch.setattr(cuda, "_load_library", lambda: (Lib(), ""))
    for env in ("0", None, "1"):
        if env is None:
            monkeypatch.delenv("JAX_GNA_COMMAND_BUFFER", raising=False)
        else:
            monkeypatch.setenv("JAX_GNA_COMMAND_BUFFER", env)
        monkeypatch.setattr(cuda, "_registered", False)
        cuda._register()
    assert asked == [False, True, True]


def test_library_exports_both_handler_sets():
    """The built library hands out two different handlers per FFI target (with and
    without the command-buffer trait) and counts handler runs (none without a GPU)."""
    import ctypes
    lib, reason = cuda._load_library()
    if lib is None:
        pytest.skip(reason)
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    with_cb, plain = lib.registrations(True), lib.registrations(False)
    names = {"jax_gna_fwd", "jax_gna_bwd", "jax_gna_fwd_aliased", "jax_gna_bwd_aliased",
             "jax_gna_fwd_tokens", "jax_gna_fwd_tokens_aliased"}
    assert set(with_cb) == set(plain) == names
    pointers = {get(c, None) for c in list(with_cb.values()) + list(plain.values())}
    assert len(pointers) == 12 and None not in pointers
    assert isinstance(lib.handler_runs(), int)


def test_library_import_failure_is_reported(monkeypatch):
    cuda._load_library.cache_clear()
    import jax_gna
    monkeypatch.delattr(jax_gna, "_gna_ffi", raising=False)
    monkeypatch.setitem(sys.modules, "jax_gna._gna_ffi", None)  # import raises ImportError
    try:
        assert not cuda.available()
        assert "not built or cannot be imported" in cuda.unavailable_reason()
    finally:
        cuda._load_library.cache_clear()


@pytest.mark.parametrize("d,d_v,dtype,expect", [
    (64, 64, jnp.float16, None),
    (72, 40, jnp.bfloat16, None),
    (256, 256, jnp.float16, None),
    (36, 64, jnp.float16, "not a multiple of 8"),
    (64, 20, jnp.float16, "not a multiple of 8"),
    (264, 64, jnp.float16, "larger than 256"),
    (64, 64, jnp.float64, "dtype"),
])
def test_unsupported_reason(d, d_v, dtype, expect):
    p = _problem()
    qs, ks, vs = (2, 12, 10, 4, d), (2, 12, 10, 2, d), (2, 12, 10, 2, d_v)
    r = cuda.unsupported_reason(p, qs, ks, vs, dtype)
    if expect is None:
        assert r is None
    else:
        assert r is not None and expect in r


def test_cpu_execution_fails_cleanly():
    """Running the custom call where no CUDA handler exists raises (never crashes)."""
    try:
        if len(jax.devices("gpu")) > 0:
            pytest.skip("a GPU is present")
    except RuntimeError:
        pass
    p = _problem(shape=(16,), k=(3,), s=(1,), d=(1,), c=(False,))
    q, k, v = _inputs(p)
    with pytest.raises(Exception):
        jax.block_until_ready(jax.jit(lambda q, k, v: cuda.attention(q, k, v, p))(q, k, v))


def test_attribute_dtypes_are_explicit():
    attrs = cuda._attrs(_problem())
    for name, val in attrs.items():
        if name == "scale":
            assert isinstance(val, np.float32)
        else:
            assert isinstance(val, np.ndarray) and val.dtype == np.int64, name


def test_export_for_cuda():
    """jax.export for the cuda platform (forward and gradient), with the custom calls
    allowed explicitly (jax.export only trusts its own list of stable targets)."""
    from jax import export
    p = _problem(shape=(16,), k=(3,), s=(1,), d=(1,), c=(False,))
    q, k, v = _inputs(p)

    def loss(q, k, v):
        out, lse = cuda.attention(q, k, v, p)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

    checks = cuda.export_disabled_checks()
    exp = export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["cuda"],
                        disabled_checks=checks)(q, k, v)
    text = exp.mlir_module()
    assert "jax_gna_fwd" in text and "jax_gna_bwd" in text
    assert exp.platforms == ("cuda",)
    pytest.importorskip("flatbuffers")
    again = export.deserialize(exp.serialize())
    assert "jax_gna_bwd" in again.mlir_module()


def test_kernel_path_mirrors_the_hopper_eligibility(monkeypatch):
    """cuda.kernel_path (used by explain) states which kernels run, as csrc/gna_sm90.cu decides."""
    monkeypatch.delenv("JAX_GNA_SM90", raising=False)
    monkeypatch.delenv("JAX_GNA_SM90_BWD", raising=False)
    monkeypatch.setattr(cuda, "_compute_capability", lambda: "")  # no dilation fold
    p2 = _problem((64, 64), (13, 13), (1, 1), (1, 1), (False, False))
    hopper = cuda.kernel_path(p2, (1, 64, 64, 4, 128), (1, 64, 64, 4, 128), jnp.bfloat16)
    assert hopper.startswith("forward and backward: Hopper kernels")
    monkeypatch.setenv("JAX_GNA_SM90_BWD", "0")
    text = cuda.kernel_path(p2, (1, 64, 64, 4, 128), (1, 64, 64, 4, 128), jnp.bfloat16)
    assert text.startswith("forward: Hopper kernel") and "backward: sm80 kernels" in text, text
    monkeypatch.delenv("JAX_GNA_SM90_BWD")
    text = cuda.kernel_path(p2, (1, 64, 64, 4, 256), (1, 64, 64, 4, 256), jnp.float16)
    assert text.startswith("forward: Hopper kernel") and "backward: sm80 kernels (head dim 256)" in text, text
    cases = [
        (p2, (1, 64, 64, 4, 128), (1, 64, 64, 4, 128), jnp.float32, "dtype float32"),
        (p2, (1, 64, 64, 4, 32), (1, 64, 64, 4, 32), jnp.float16, "head dims 32/32"),
        (p2, (1, 64, 64, 4, 256), (1, 64, 64, 4, 128), jnp.float16, "head dims 256/128"),
        (p2, (1, 64, 64, 4, 128), (1, 64, 64, 4, 64), jnp.float16, "head dims 128/64"),
        (_problem((64, 64), (5, 5), (1, 1), (2, 1), (False, False)), (1, 64, 64, 4, 64),
         (1, 64, 64, 4, 64), jnp.float16, "dilation"),
        (_problem((5, 7), (3, 3), (1, 1), (1, 1), (False, False)), (1, 5, 7, 4, 64),
         (1, 5, 7, 4, 64), jnp.float16, "smaller than a 128-token tile"),  # 8 x 8 < 128
    ]
    for p, qs, vs, dt, why in cases:
        text = cuda.kernel_path(p, qs, vs, dt)
        assert text.startswith("forward and backward: sm80 kernels") and why in text, text
    # A batch above 65535 (CUDA's largest grid z): the Hopper kernels in several launches.
    text = cuda.kernel_path(p2, (2, 32768, 64, 64, 4, 128), (2, 32768, 64, 64, 4, 128), jnp.bfloat16)
    assert text.startswith("forward and backward: Hopper"), text
    # 8 x 10 fits an 8 x 16 tile; 1-D with 100 tokens one 128-token tile.
    p8 = _problem((8, 10), (3, 3), (1, 1), (1, 1), (False, False))
    assert cuda.kernel_path(p8, (1, 8, 10, 4, 64), (1, 8, 10, 4, 64), jnp.float16).startswith("forward and backward: Hopper")
    p1 = _problem((100,), (7,), (1,), (1,), (False,))
    assert cuda.kernel_path(p1, (1, 100, 2, 64), (1, 100, 2, 64), jnp.float16).startswith("forward and backward: Hopper")
    monkeypatch.setenv("JAX_GNA_SM90", "0")
    assert "JAX_GNA_SM90=0" in cuda.kernel_path(p2, (1, 64, 64, 4, 128), (1, 64, 64, 4, 128), jnp.bfloat16)
