#!/usr/bin/env bash
# Builds jax_gna's native part for Bazel with the same sources and flags as the
# CMake build (CMakeLists.txt): libjax_gna_cuda.so (CUDA kernels + XLA FFI handlers,
# no Python) and the pybind11 module _gna_ffi that hands Python the handler capsules.
#
# usage: build_native.sh OUT_LIB OUT_MODULE LOCAL_REPO_DIR CSRC_DIR
# JAX_GNA_CUDA_ARCHS (e.g. "80;90a", the default) picks the GPU targets.
set -euo pipefail
out_lib=$1 out_module=$2 local_repo=$3 csrc=$4
nvcc=${NVCC:-nvcc}
archs=${JAX_GNA_CUDA_ARCHS:-80;90a}
gencode=()
for a in ${archs//;/ }; do
  gencode+=("-gencode=arch=compute_${a},code=sm_${a}")
done
objdir=$(mktemp -d)
trap 'rm -rf "$objdir"' EXIT
flags=(-std=c++17 -O3 -DNDEBUG --expt-relaxed-constexpr -lineinfo -Xcompiler=-fPIC
       "${gencode[@]}" -I"$csrc" -isystem "$local_repo/ffi")
objs=()
for src in "$csrc"/*.cu; do
  obj="$objdir/$(basename "$src").o"
  "$nvcc" "${flags[@]}" -c "$src" -o "$obj" &
  objs+=("$obj")
done
wait
"$nvcc" -shared "${gencode[@]}" -cudart shared "${objs[@]}" -o "$out_lib"
lib_dir=$(cd "$(dirname "$out_lib")" && pwd)
${CXX:-g++} -std=c++17 -O3 -DNDEBUG -fPIC -shared -fvisibility=hidden \
  -I"$csrc" -isystem "$local_repo/ffi" -isystem "$local_repo/pybind11" \
  -isystem "$local_repo/python" "$csrc/python_module.cc" \
  -L"$lib_dir" -l:"$(basename "$out_lib")" -Wl,-rpath,'$ORIGIN' -o "$out_module"
