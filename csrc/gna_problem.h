// The one problem description every jax_gna kernel works on, and the GNA window
// math of SEMANTICS.md in the form the kernels use it (host and device).
//
// Coordinates. Every axis is padded to rank 3 (an unused axis has length 1 and
// kernel 1, which gives the window [0, 0]). The kernels never work in raw token
// coordinates along an axis: a dilated axis is split into its `d` interleaved
// groups, and a tile lives inside one group, in *group coordinates*
// (global position i = g + d * ig). Inside a group the operator is plain
// (undilated) neighborhood attention on an axis of length ceil((L - g) / d), so
// no tile ever loads a key of another dilation group.
//
// Window bounds lo(ig), hi(ig) are non-decreasing in ig (both the causal and the
// non-causal form), which is what makes the tile spans below exact:
//   keys any query of [qa, qb] can see        = [lo(qa), hi(qb)]
//   keys every query of [qa, qb] sees         = [lo(qb), hi(qa)]
//   queries that see some key of [ka, kb]     = {ig : hi(ig) >= ka and lo(ig) <= kb},
//                                               an interval (binary search).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define GNA_HD __host__ __device__ __forceinline__
#else
#define GNA_HD inline
#endif

namespace gna {

constexpr int kMaxRank = 3;
constexpr int kMaxGridZ = 65535;  // CUDA's largest grid z: batches per launch

struct Axis {
  int L;       // global length of the axis (windows are defined on it)
  int k, s, d; // kernel size, stride, dilation
  int causal;  // 0 or 1
  int q0, qn;  // query block: global origin and extent
  int kv0, kvn;// key/value block: global origin and extent
  int qt, nqt; // query tile extent (group coordinates), query tiles per dilation group
  int kt, nkt; // key tile extent, key tiles per dilation group (dK/dV pass)
};

struct Params {
  Axis ax[kMaxRank];
  int rank;
  int B, H, Hkv, D, Dv;   // B: product of all leading (batch) dims
  int kvb = 1;            // query batches per key/value batch: query batch b reads key /
                          // value batch b / kvb (1 but for broadcast keys)
  int dkvb = 1;           // query batches per dK / dV batch (divides kvb): the dK/dV
                          // kernels sum query batches z * dkvb ... z * dkvb + dkvb - 1
                          // into dK / dV batch z (1: dK / dV per query batch, at b)
  int z0 = 0;             // this launch's first grid z (batch, or dK / dV batch): a grid
                          // of more than kMaxGridZ batches runs as several launches
  float scale;            // applied to q . k
  float scale_log2;       // scale * log2(e)
  int64_t nq, nkv;        // tokens in the query-side buffers (see qpitch) / the key block
  // The query block inside the query-side buffers (q, out, lse; dq, dout in the
  // backward): per axis the buffers' extent and the block's first row in them. The
  // block is the whole buffer (qpitch = qn, qoff = 0) but in a sharded forward's
  // sub-block calls (gna_ffi.cu, device_q_range), which the backward refuses.
  int qpitch[kMaxRank], qoff[kMaxRank];
  // Element strides (all tensors are dense, heads-last, row-major spatial).
  int64_t q_tok, q_b;     // query / dQ: token stride H*D, batch stride nq*H*D
  int64_t k_tok, k_b;     // key / dK
  int64_t v_tok, v_b;     // value / dV
  int64_t o_tok, o_b;     // out / dOut
  // Buffers.
  const void* q; const void* k; const void* v;
  void* o; float* lse;
  const void* dout; const float* lse_in; const float* delta;
  void* dq; void* dk; void* dv;
  // Additional tokens (Hopper forward only, gna_sm90.cu): nx keys / values [B, nx, Hkv,
  // D] that every query sees besides its window; nx = 0: none.
  int nx = 0;
  const void* xk = nullptr; const void* xv = nullptr;
};

// Keys a non-causal window of size k reaches left / right of its center c: the window
// is [c - window_left(k), c + window_right(k)] (an even k reaches one less to the right).
GNA_HD int window_left(int k) { return k / 2; }
GNA_HD int window_right(int k) { return k / 2 + (k % 2 - 1); }

// window() with its two divisions done by the caller: Lg is the group's length
// ceil((L - g) / d), first = (ig / s) * s the first query of ig's stride group.
GNA_HD void window_at(const Axis& a, int Lg, int first, int ig, int& lo, int& hi) {
  const int wl = window_left(a.k);
  const int wr = window_right(a.k);
  if (a.causal) {
    int leader = first + a.s - 1;
    leader = leader < Lg - 1 ? leader : Lg - 1;
    lo = leader - a.k + 1 > 0 ? leader - a.k + 1 : 0;
    hi = ig;
  } else {
    int leader = first + a.s / 2;
    leader = leader < Lg - 1 ? leader : Lg - 1;
    int c = leader > wl ? leader : wl;
    c = c < Lg - 1 - wr ? c : Lg - 1 - wr;
    lo = c - wl;
    hi = c + wr;
  }
}

// Inclusive window [lo, hi] of query `ig` of dilation group `g`, in group coordinates.
GNA_HD void window(const Axis& a, int g, int ig, int& lo, int& hi) {
  window_at(a, (a.L - g + a.d - 1) / a.d, (ig / a.s) * a.s, ig, lo, hi);
}

// n / d for 0 <= n < 2^31 and a fixed divisor 1 <= d < 2^31, as a multiply-high, an add
// and a shift (Granlund and Montgomery's round-up method; the magic number is made on
// the host). A division by a runtime divisor is about 20 dependent instructions on the
// GPU, with a float reciprocal in them; kernels that need a few before their first load
// take them from here (tests/sm90_geometry_driver.cu checks it against `/`).
struct FastDiv {
  uint32_t mul = 1;  // d = 1: (0 + n) >> 0
  int shr = 0;
  FastDiv() = default;
  explicit FastDiv(int d) {
    while ((int64_t{1} << shr) < d) ++shr;
    mul = static_cast<uint32_t>(((int64_t{1} << shr) - d) * (int64_t{1} << 32) / d + 1);
  }
  GNA_HD int operator()(int n) const {
    const uint32_t u = static_cast<uint32_t>(n);
#if defined(__CUDA_ARCH__)
    const uint32_t hi = __umulhi(u, mul);
#else
    const uint32_t hi = static_cast<uint32_t>((uint64_t{u} * mul) >> 32);
#endif
    return static_cast<int>((hi + u) >> shr);
  }
};

// Group-coordinate range [first, last] of the positions of a block [origin, origin+extent)
// that lie in dilation group g; empty when last < first.
GNA_HD void group_range(int origin, int extent, int g, int d, int& first, int& last) {
  first = (origin - g + d - 1) / d;
  const int end = origin + extent - 1 - g;
  last = end >= 0 ? end / d : -1;
}

// Tile `t` (0 <= t < d * ntiles) of a block along one axis: its group, its first
// group coordinate and its last *valid* group coordinate. False if the tile is empty.
GNA_HD bool tile_of(int t, int tile, int ntiles, int origin, int extent, int d,
                    int& g, int& start, int& last) {
  g = t / ntiles;
  const int tt = t % ntiles;
  int first, blast;
  group_range(origin, extent, g, d, first, blast);
  start = first + tt * tile;
  last = start + tile - 1 < blast ? start + tile - 1 : blast;
  return start <= last;
}

}  // namespace gna
