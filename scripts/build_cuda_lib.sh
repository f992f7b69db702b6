#!/usr/bin/env bash
# Build only libjax_gna_cuda.so (the kernels and FFI handlers, no Python in it) here, on a
# machine with nvcc but no GPU, into jax_gna/, with the ptxas report in build/dev<archs>/ptxas.txt.
# Carry jax_gna/libjax_gna_cuda.so to the GPU and run scripts/device_session.sh's `module`
# stage there, which compiles the small pybind11 module against it in seconds.
# usage: JAX_GNA_CUDA_ARCHS=90a bash scripts/build_cuda_lib.sh   (default 90a, the H100/H200)
# A variant for an A/B: JAX_GNA_EXTRA_CUDA_FLAGS (added to nvcc's flags) and JAX_GNA_BUILD_TAG
# (its own build folder); with a tag the library stays in that folder and jax_gna/ is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCHS=${JAX_GNA_CUDA_ARCHS:-90a}
TAG=${JAX_GNA_BUILD_TAG:-}
BUILD=build/dev${ARCHS//;/_}${TAG:+-$TAG}
mkdir -p build
PY=${PYTHON:-python3}
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -Dpybind11_DIR="$($PY -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
  -DCMAKE_CUDA_ARCHITECTURES="$ARCHS" -DCMAKE_CUDA_FLAGS="-Xptxas=-v ${JAX_GNA_EXTRA_CUDA_FLAGS:-}" > "$BUILD.cmake.log"
JAX_GNA_CUDA_ARCHS="$ARCHS" ninja -C "$BUILD" -j"$(nproc)" jax_gna_cuda > "$BUILD/build.log" 2>&1 \
  || { tail -40 "$BUILD/build.log"; exit 1; }
grep -E "Compiling entry|registers|spill" "$BUILD/build.log" | sed -E 's/^ptxas info *: //' > "$BUILD/ptxas.txt" || true
[ -n "$TAG" ] || cp -f "$BUILD/libjax_gna_cuda.so" jax_gna/
echo "built $([ -n "$TAG" ] && echo "$BUILD" || echo jax_gna)/libjax_gna_cuda.so ($ARCHS); spilling kernels:" \
  "$(grep -c ' [1-9][0-9]* bytes spill stores' "$BUILD/ptxas.txt" || true)"
