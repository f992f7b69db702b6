#!/usr/bin/env bash
# The whole GPU check of the cuda backend in one go (meant for one device call):
#   1. build libjax_gna_cuda.so and jax_gna/_gna_ffi*.so with cmake + ninja against the
#      installed jaxlib's FFI headers (no pip, no network), ptxas report in the log;
#   2. pytest -m gpu (tests/test_cuda_gpu.py and any other gpu-marked tests);
#   3. a quick benchmark (cuda backend vs cuDNN dense vs xla backend).
# Logs go to $OUT (default ./gpu_check_out): build.log, ptxas.txt, pytest.log, errors.txt
# (measured relative errors per check), bench.log, summary.txt.
#
# Env: JAX_GNA_CUDA_ARCHS (default "90a" here, the H100/H200; "80;90a" for a release),
#      GPU_CHECK_TESTS (pytest paths, default "tests"), GPU_CHECK_BENCH=0 to skip 3.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
ARCHS=${JAX_GNA_CUDA_ARCHS:-90a}
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  nvcc --version | tail -1
  $PY -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.log"

# 1. Build.
t0=$(date +%s)
BUILD=build/gpu_check
JAX_INC=$($PY -c "import jax.ffi; print(jax.ffi.include_dir())")
PYBIND_DIR=$($PY -c "import pybind11; print(pybind11.get_cmake_dir())")
(
  set -e
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DPython_EXECUTABLE="$(command -v $PY)" -Dpybind11_DIR="$PYBIND_DIR" \
    -DCMAKE_CUDA_ARCHITECTURES="$ARCHS" -DCMAKE_CUDA_FLAGS="-Xptxas=-v"
  JAX_GNA_CUDA_ARCHS="$ARCHS" ninja -C "$BUILD" -j"$(nproc)"
  cp -f "$BUILD"/libjax_gna_cuda.so "$BUILD"/_gna_ffi*.so jax_gna/
) > "$OUT/build.log" 2>&1
rc_build=$?
grep -E "Compiling entry|registers|spill" "$OUT/build.log" | sed -E 's/^ptxas info *: //' > "$OUT/ptxas.txt" || true
summary "build: rc=$rc_build in $(( $(date +%s) - t0 )) s (archs $ARCHS; FFI headers $JAX_INC)"
if [ $rc_build -ne 0 ]; then tail -40 "$OUT/build.log"; exit 1; fi
summary "spilling kernels: $(grep -c ' [1-9][0-9]* bytes spill stores' "$OUT/ptxas.txt" || true)"

# 2. Tests (in GPU_CHECK_JOBS processes when pytest-xdist is there: the time is mostly
# XLA compiling, which is CPU-bound; the processes share the GPU, so no preallocation).
# GPU_CHECK_TESTS=none builds only.
rc_test=0
if [ "${GPU_CHECK_TESTS:-tests}" != none ]; then
  t0=$(date +%s)
  JOBS=${GPU_CHECK_JOBS:-4}
  XDIST=""
  if [ "$JOBS" -gt 1 ] && $PY -c "import xdist" 2>/dev/null; then
    XDIST="-n $JOBS"
    export XLA_PYTHON_CLIENT_PREALLOCATE=false
  fi
  export JAX_GNA_TEST_LOG="$OUT/errors.txt"
  : > "$JAX_GNA_TEST_LOG"
  PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} $PY -m pytest -m gpu -rA -q -s -p no:cacheprovider $XDIST \
    ${GPU_CHECK_TESTS:-tests} > "$OUT/pytest.log" 2>&1
  rc_test=$?
  summary "pytest -m gpu: rc=$rc_test in $(( $(date +%s) - t0 )) s: $(tail -1 "$OUT/pytest.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -40 | tee -a "$OUT/summary.txt"
fi

# 3. Quick benchmark.
if [ "${GPU_CHECK_BENCH:-1}" != 0 ]; then
  PYTHONPATH=$PWD $PY - > "$OUT/bench.log" 2>&1 <<'PYEOF'
import time, numpy as np, jax, jax.numpy as jnp
from jax_gna import cuda, xla
from jax_gna.params import Problem

def bench(f, *a, n=10):
    jax.block_until_ready(f(*a))
    ts = []
    for _ in range(n):
        t = time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter() - t)
    return float(np.median(ts))

for (shape, k, s, b, h, d) in [((128, 128), (13, 13), (1, 1), 16, 16, 64),
                                ((256, 256), (80, 80), (16, 16), 1, 24, 128),
                                ((32768,), (2048,), (1,), 1, 1, 128)]:
    p = Problem(shape=shape, kernel_size=k, stride=s, dilation=(1,) * len(shape),
                is_causal=(False,) * len(shape), scale=d ** -0.5)
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q, kk, v = (jax.random.normal(x, (b, *shape, h, d), jnp.bfloat16) for x in ks)
    flops = 4 * b * h * int(np.prod(shape)) * int(np.prod(k)) * d
    fwd = jax.jit(lambda q, k, v: cuda.attention(q, k, v, p)[0])
    bwd = jax.jit(jax.grad(lambda q, k, v: jnp.sum(cuda.attention(q, k, v, p)[0].astype(jnp.float32)), argnums=(0, 1, 2)))
    n = int(np.prod(shape))
    dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q.reshape(b, n, h, d), k.reshape(b, n, h, d), v.reshape(b, n, h, d), implementation="cudnn"))
    t_f, t_b = bench(fwd, q, kk, v), bench(bwd, q, kk, v)
    try:
        t_d = bench(dense, q, kk, v)
    except Exception as e:  # noqa: BLE001
        t_d = float("nan"); print("cudnn failed:", str(e)[:200])
    print(f"{shape} k={k} s={s} B={b} H={h} D={d} bf16: cuda fwd {t_f*1e3:.3f} ms "
          f"({flops / t_f / 1e12:.1f} TFLOP/s eff), fwd+bwd {t_b*1e3:.3f} ms "
          f"({3.5 * flops / t_b / 1e12:.1f} TFLOP/s eff); cudnn dense fwd {t_d*1e3:.3f} ms "
          f"(speedup {t_d / t_f:.2f}x)")
PYEOF
  summary "bench: rc=$?"
  cat "$OUT/bench.log" | tee -a "$OUT/summary.txt"
fi
cat "$OUT/ptxas.txt" | paste - - - 2>/dev/null | sed -E 's/Compiling entry function .(_ZN3gna)?//; s/ for .sm_[0-9a]+.//' \
  | awk '{print}' | cut -c1-220 | head -60 >> "$OUT/summary.txt"
exit $(( rc_test != 0 ))
