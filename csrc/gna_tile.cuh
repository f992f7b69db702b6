// Tile addressing shared by the forward and backward kernels: multi-dimensional
// boxes in group coordinates, flattened row-major into chunks of rows, token
// offsets, cp.async row loads with zero fill, and the "is this chunk fully inside
// every window" test that lets a chunk skip the element-wise mask.
#pragma once
#include "gna_mma.cuh"
#include "gna_problem.h"

namespace gna {

// Token index in its buffer (row-major over the buffer's extents) of a point given per
// axis by its dilation group and group coordinate: keys index the key block, queries
// the query-side buffers, whose block starts at row qoff of extent qpitch.
__device__ __forceinline__ int64_t token_of(const Params& p, const int g[3], const int ig[3], bool keys) {
  int64_t tok = 0;
#pragma unroll
  for (int a = 0; a < kMaxRank; ++a) {
    const Axis& x = p.ax[a];
    const int origin = keys ? x.kv0 : x.q0 - p.qoff[a];
    const int extent = keys ? x.kvn : p.qpitch[a];
    tok = tok * extent + (g[a] + x.d * ig[a] - origin);
  }
  return tok;
}

// Row-major split of a flat index inside a box of extents e[3].
__device__ __forceinline__ void unflatten(int64_t n, const int e[3], int o[3]) {
  o[2] = static_cast<int>(n % e[2]);
  n /= e[2];
  o[1] = static_cast<int>(n % e[1]);
  o[0] = static_cast<int>(n / e[1]);
}

// Per-axis coordinate range [lo, hi] (relative to the box) that a flat range
// [c0, c1] of a box of extents e covers; conservative (a superset) where it wraps.
__device__ __forceinline__ void chunk_cover(int64_t c0, int64_t c1, const int e[3], int lo[3], int hi[3]) {
  const int64_t r0 = c0 / e[2], r1 = c1 / e[2];
  if (r0 == r1) { lo[2] = static_cast<int>(c0 % e[2]); hi[2] = static_cast<int>(c1 % e[2]); }
  else { lo[2] = 0; hi[2] = e[2] - 1; }
  const int64_t p0 = r0 / e[1], p1 = r1 / e[1];
  if (p0 == p1) { lo[1] = static_cast<int>(r0 % e[1]); hi[1] = static_cast<int>(r1 % e[1]); }
  else { lo[1] = 0; hi[1] = e[1] - 1; }
  lo[0] = static_cast<int>(p0);
  hi[0] = static_cast<int>(p1);
}

// Load ROWS rows of DP columns (the first `cols` real, the rest zero) into shared
// memory with leading dimension LD. Row r comes from base + tok[r] * tok_stride;
// tok[r] < 0 gives a zero row. cols is a multiple of 8 elements.
template <typename T, int DP, int ROWS, int NT>
__device__ __forceinline__ void load_rows(T* s, int ld, const T* base, const int64_t* tok,
                                          int64_t tok_stride, int cols) {
  constexpr int EPC = 16 / sizeof(T);
  constexpr int CPR = DP / EPC;
#pragma unroll 4
  for (int i = threadIdx.x; i < ROWS * CPR; i += NT) {
    const int r = i / CPR, c = (i % CPR) * EPC;
    const int64_t t = tok[r];
    const bool ok = t >= 0 && c < cols;
    const T* src = ok ? base + t * tok_stride + c : base;
    cp_async_16(s + r * ld + c, src, ok ? 16 : 0);
  }
}

}  // namespace gna
