// Hopper forward kernel (sm_90a): O and LSE with TMA loads, an mbarrier pipeline and
// wgmma, for fp16/bf16, head dim D = D_v in {64, 128, 256}, no dilation.
//
// One CTA (3 warpgroups) per (query tile, head, batch), or per (`items` query tiles, head,
// batch) in fwd_items_sm90_kernel (short CTAs: the next tile loads while the last one
// finishes; see fwd_sm90_body's MULTI):
//   warpgroup 0   producer: one thread issues the TMA loads (Q once per query tile,
//                 then K and V of every key tile into a ring of STAGES slots);
//   warpgroups 1,2 consumers: each owns 64 of the tile's 128 queries, computes
//                 S = Q K^T with wgmma from shared memory, the online softmax in
//                 registers, and O += P V with P from registers.
// Query tiles are boxes of 128 tokens, key tiles of KT = 128 tokens (64 at D = 256,
// where the 64 x 256 O accumulator takes half the registers, and at D <= 128 where the
// host finds that they visit far fewer key columns, gna_sm90.cu); power-of-two extents
// per axis, chosen on the host, read straight from the [B, *spatial, H, D] tensors by
// 5-D TMA boxes (head dim, x, y, t, batch): no token permutation. Boxes that
// reach past the block are zero-filled by TMA; the output tile goes back through
// shared memory and a TMA store per consumer warpgroup (its 64 rows), which drops rows
// outside the block.
//
// The key tiles a query tile visits are the tile-grid box that covers the union of
// its queries' windows (the windows are monotone, so that is [lo(first), hi(last)]
// per axis, gna_problem.h); tiles inside the intersection of all windows skip the
// element mask, the others build it as bits per row on the axes where they are not
// inside (window_bits). fwd_tokens_sm90_kernel (the same body) visits the call's
// additional tokens too, as key tiles after the window's.
#pragma once
#include <cuda.h>
#include <cfloat>
#include "gna_mma.cuh"
#include "gna_problem.h"
#include "gna_sm90.cuh"

// GNA_FWD_TIMELINE=1 (a measurement build, scripts/fwd_timeline.py): the first thread of
// each consumer warpgroup records %globaltimer at eight points of each query tile's life
// (in shared memory), the producer when it issued the tile's Q load, and at the CTA's end
// they are written over the lse of each tile's rows: warpgroup 0's with the SM, the key
// tile count and the Q load over the tile's queries 0-10, warpgroup 1's over queries
// 64-71. Point 0 is the CTA's entry; with several query tiles per CTA
// (fwd_items_sm90_kernel) the others are per tile (fwd_timeline.py's handover reads them
// per tile), for the CTA's first Stamps::kTiles tiles.
#ifndef GNA_FWD_TIMELINE
#define GNA_FWD_TIMELINE 0
#endif

namespace gna {
namespace sm90 {

struct Stamps {
  static constexpr int kPoints = 8;               // per consumer warpgroup and query tile
  static constexpr int kTiles = 8;                // query tiles of a CTA stamped (its first 8)
  static constexpr int kWords = 2 * kPoints + 1;  // per tile: both warpgroups' points, the Q load
  uint32_t at;  // shared address of kTiles x kWords words (past the barriers)
  // Point i of query tile j of threads 128 and 256 (the consumer warpgroups' first threads).
  __device__ __forceinline__ void take(int j, int i) const {
    if (j >= kTiles) return;
    asm volatile(
        "{\n .reg .pred p, q;\n .reg .u32 t;\n .reg .u32 x;\n mov.u32 x, %%tid.x;\n"
        " setp.eq.u32 p, x, 128;\n setp.eq.u32 q, x, 256;\n mov.u32 t, %%globaltimer_lo;\n"
        " @p st.shared.u32 [%0], t;\n @q st.shared.u32 [%1], t;\n}\n"
        ::"r"(at + 4 * (kWords * j + i)), "r"(at + 4 * (kWords * j + i + kPoints))
        : "memory");
  }
  // The producer's stamp of query tile j's Q load (issued).
  __device__ __forceinline__ void take_q(int j) const {
    if (j >= kTiles) return;
    asm volatile("{\n .reg .u32 t;\n mov.u32 t, %%globaltimer_lo;\n st.shared.u32 [%0], t;\n}\n" ::"r"(
                     at + 4 * (kWords * j + 2 * kPoints))
                 : "memory");
  }
  // Word i of query tile j (i < 2 kPoints: point i % kPoints of warpgroup i / kPoints).
  __device__ __forceinline__ uint32_t get(int j, int i) const {
    uint32_t v;
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(at + 4 * (kWords * j + i)));
    return v;
  }
};

constexpr int kTileTokens = 128;  // queries per tile (and keys, except at D = 256)
// The forward's online softmax keeps its row maximum until a key tile raises it by more
// than this (log2 units; FlashAttention-4's trick): the rescale of O is then skipped in
// most tiles. P stays <= 256: no overflow in the fp16/bf16 P operand or the fp32 sums.
constexpr float kRescaleLog2 = 8.f;
constexpr int kThreads = 384;

// Keys per forward key tile at head dim D by default (the additional tokens' kernel
// always; the host may pick 64 at D <= 128 too).
template <int D>
constexpr int fwd_key_tokens() { return D > 128 ? 64 : 128; }

// QSLOTS: Q tiles in shared memory (2 where a CTA runs several query tiles and they fit,
// the next one's Q loading while the last one's O leaves through the other slot; see
// fwd_sm90_body). MULTI: a CTA runs several query tiles (an empty barrier per Q slot).
// PAIR: pairs of CTAs share the K/V loads (an exchange barrier per stage).
template <int D, int KEYS, int STAGES, int QSLOTS = 1, bool MULTI = (QSLOTS > 1), bool PAIR = false>
struct FwdLayout {
  static constexpr int KT = KEYS;
  static constexpr int kQBytes = kTileTokens * D * 2;  // the Q tile (16-bit), later O
  static constexpr int kKVBytes = KT * D * 2;          // one K or V tile
  static constexpr int kQHalf = kTileTokens * 128;     // 64 columns of the Q tile
  static constexpr int kKVHalf = KT * 128;             // 64 columns of a K or V tile
  static constexpr int kQ = 0;
  static constexpr int kK = QSLOTS * kQBytes;
  static constexpr int kV = kK + STAGES * kKVBytes;
  // Barriers: qfull[QSLOTS] (and qempty[QSLOTS] where MULTI), kfull[S], vfull[S],
  // empty[S] (and exchange[S] where PAIR).
  static constexpr int kQBars = MULTI ? 2 * QSLOTS : QSLOTS;
  static constexpr int kBars = kV + STAGES * kKVBytes;
  static constexpr int kNBars = kQBars + (PAIR ? 4 : 3) * STAGES;
  static constexpr int kStamps = kBars + 256;  // GNA_FWD_TIMELINE's stamps (Stamps)
  static_assert(8 * kNBars <= kStamps - kBars, "the stamps lie past the barriers");
  static constexpr size_t smem_bytes() {
    return (GNA_FWD_TIMELINE ? kStamps + 4 * Stamps::kWords * Stamps::kTiles : kBars + 8 * kNBars) +
           1024;
  }
};

template <typename T> struct Wgmma;
#if defined(GNA_SM90_ENABLED)
template <> struct Wgmma<__half> {
  static __device__ __forceinline__ void ss(float (&d)[64], uint64_t a, uint64_t b, int acc) {
    wgmma_ss_n128_f16(d, a, b, acc);
  }
  static __device__ __forceinline__ void ss_first(float (&d)[64], uint64_t a, uint64_t b) {
    wgmma_ss_n128_f16_first(d, a, b);
  }
  static __device__ __forceinline__ void ss(float (&d)[32], uint64_t a, uint64_t b, int acc) {
    wgmma_ss_n64_f16(d, a, b, acc);
  }
  static __device__ __forceinline__ void ss_first(float (&d)[32], uint64_t a, uint64_t b) {
    wgmma_ss_n64_f16_first(d, a, b);
  }
  static __device__ __forceinline__ void rs(float (&d)[64], const uint32_t (&a)[4], uint64_t b) {
    wgmma_rs_n128_f16(d, a, b);
  }
  static __device__ __forceinline__ void rs(float (&d)[32], const uint32_t (&a)[4], uint64_t b) {
    wgmma_rs_n64_f16(d, a, b);
  }
  static __device__ __forceinline__ void ss_tb(float (&d)[64], uint64_t a, uint64_t b) {
    wgmma_ss_tb_n128_f16(d, a, b, 1);
  }
  static __device__ __forceinline__ void ss_tb(float (&d)[32], uint64_t a, uint64_t b) {
    wgmma_ss_tb_n64_f16(d, a, b, 1);
  }
};
template <> struct Wgmma<__nv_bfloat16> {
  static __device__ __forceinline__ void ss(float (&d)[64], uint64_t a, uint64_t b, int acc) {
    wgmma_ss_n128_bf16(d, a, b, acc);
  }
  static __device__ __forceinline__ void ss_first(float (&d)[64], uint64_t a, uint64_t b) {
    wgmma_ss_n128_bf16_first(d, a, b);
  }
  static __device__ __forceinline__ void ss(float (&d)[32], uint64_t a, uint64_t b, int acc) {
    wgmma_ss_n64_bf16(d, a, b, acc);
  }
  static __device__ __forceinline__ void ss_first(float (&d)[32], uint64_t a, uint64_t b) {
    wgmma_ss_n64_bf16_first(d, a, b);
  }
  static __device__ __forceinline__ void rs(float (&d)[64], const uint32_t (&a)[4], uint64_t b) {
    wgmma_rs_n128_bf16(d, a, b);
  }
  static __device__ __forceinline__ void rs(float (&d)[32], const uint32_t (&a)[4], uint64_t b) {
    wgmma_rs_n64_bf16(d, a, b);
  }
  static __device__ __forceinline__ void ss_tb(float (&d)[64], uint64_t a, uint64_t b) {
    wgmma_ss_tb_n128_bf16(d, a, b, 1);
  }
  static __device__ __forceinline__ void ss_tb(float (&d)[32], uint64_t a, uint64_t b) {
    wgmma_ss_tb_n64_bf16(d, a, b, 1);
  }
};
#endif

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float fast_rcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float fast_log2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// A 4 x 4 transpose across a quad (the 4 lanes of tig = lane % 4): slot u of lane t
// goes to slot t of lane u. Two butterfly stages; stage k swaps bit k between lane and
// slot where they differ.
__device__ __forceinline__ void quad_transpose(uint32_t (&x)[4], int tig) {
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int m = 1 << k;
    const bool up = (tig >> k) & 1;
#pragma unroll
    for (int lo = 0; lo < 4; ++lo) {
      if (lo & m) continue;
      const int hi = lo | m;
      const uint32_t got = __shfl_xor_sync(0xffffffffu, up ? x[lo] : x[hi], m);
      if (up) x[lo] = got;
      else x[hi] = got;
    }
  }
}

// In-tile coordinates per axis of element m of a tile box (elements row-major; the
// extents of axes 1 and 2 are powers of two: shifts sh1, sh2, masks m1, m2).
GNA_HD void box_coords(int m, int sh2, int sh1, int m1, int m2, int (&o)[3]) {
  o[0] = m >> (sh2 + sh1);
  o[1] = (m >> sh2) & m1;
  o[2] = m & m2;
}

// Element mask of a thread's 2 rows x (8 NB) columns of a score tile (the backward
// kernels'; the forward's is window_bits below). Rows are given per axis by the interval
// of column coordinates they see, relative to the column tile's start ([lo, lo + w],
// unsigned compare); columns by their in-tile coordinates (power-of-two extents: shifts
// sh2, sh1 and masks m1, m2). f(index, visible).
template <int NB, typename F>
__device__ __forceinline__ void for_each_element(const int (&lo)[2][3], const unsigned (&w)[2][3], int sh2,
                                                 int sh1, int m1, int m2, int tig, F&& f) {
  int tcol;  // opaque: keeps the loop-invariant column coordinates out of registers
  asm volatile("mov.b32 %0, %1;" : "=r"(tcol) : "r"(2 * tig));
#pragma unroll
  for (int i = 0; i < NB; ++i) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      int n[3];
      box_coords(8 * i + tcol + e, sh2, sh1, m1, m2, n);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const bool vis = static_cast<unsigned>(n[0] - lo[r][0]) <= w[r][0] &&
                         static_cast<unsigned>(n[1] - lo[r][1]) <= w[r][1] &&
                         static_cast<unsigned>(n[2] - lo[r][2]) <= w[r][2];
        f(4 * i + 2 * r + e, vis);
      }
    }
  }
}

// Element masks as bits. A thread of an m64nN accumulator tile holds, for its rows r = 0,
// 1, the columns 8 j + 2 tig + e (j < N / 8, e = 0, 1): accumulator 4 j + 2 r + e. The
// columns c of a tile box (flat, row-major, power-of-two extents n[a]) have coordinate
// (c mod per) >> sh on axis a, per = n[a] << sh[a] being the axis's period in columns.
// A row that sees the coordinates [lo, hi] of axis a sees the columns with (c mod per) in
// [A, B) = [lo << sh, (hi + 1) << sh); for c = 8 j + c0 (c0 = 2 tig + e) that is a range
// of j mod (per / 8), repeated every per / 8 bits, where per >= 8, and all or none of
// them where per < 8 (c mod per = c0 mod per). ColLayout holds per axis n, sh, q = per /
// 8 (0 where per < 8), pm = per - 1 and rep (a 1 every q bits), made on the host.
struct ColLayout {
  int n[3], sh[3], q[3], pm[3];
  uint32_t rep[3];
};
inline ColLayout col_layout(const int (&n)[3]) {
  ColLayout c;
  for (int a = 2, sh = 0; a >= 0; sh += __builtin_ctz(static_cast<unsigned>(n[a])), --a) {
    const int per = n[a] << sh;
    c.n[a] = n[a];
    c.sh[a] = sh;
    c.pm[a] = per - 1;
    c.q[a] = per >= 8 ? per / 8 : 0;
    c.rep[a] = 0;
    for (int b = 0; c.q[a] > 0 && b < 32; b += c.q[a]) c.rep[a] |= 1u << b;
  }
  return c;
}

// Bit j of vis[r][e]: whether row r sees column 8 j + 2 tig + e of the tile, the row
// seeing tile-relative coordinates [lo[r][a], hi[r][a]] on axis a (any integers; empty
// where hi < lo). Axes whose bit is set in `skip` are not tested (the caller knows the
// tile lies inside every row's window there).
GNA_HD void window_bits(const ColLayout& cl, const int (&lo)[2][3], const int (&hi)[2][3], int skip, int tig,
                        uint32_t (&vis)[2][2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) vis[r][0] = vis[r][1] = ~0u;
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    if (skip >> a & 1) continue;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      int l = lo[r][a] < 0 ? 0 : lo[r][a], h = hi[r][a] + 1;  // h: one past the last
      l = l < cl.n[a] ? l : cl.n[a];
      h = h < l ? l : h < cl.n[a] ? h : cl.n[a];
      const int A = l << cl.sh[a], B = h << cl.sh[a];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c0 = 2 * tig + e;
        if (cl.q[a] > 0) {
          vis[r][e] &= ((1u << ((B - c0 + 7) >> 3)) - (1u << ((A - c0 + 7) >> 3))) * cl.rep[a];
        } else {
          const int c = c0 & cl.pm[a];
          if (c < A || c >= B) vis[r][e] = 0u;
        }
      }
    }
  }
}
// Whether accumulator i is inside its row's window (window_bits).
GNA_HD bool window_bit(const uint32_t (&vis)[2][2], int i) {
  return (vis[(i >> 1) & 1][i & 1] >> (i >> 2)) & 1u;
}
// Per-axis test results (bit a: axis a), all axes.
constexpr int kAllAxes = 7;

// Row-major walk over a box of n[0] x n[1] x n[2] tiles without divisions: the in-box
// index per axis of the current step; next() wraps to the start after the last tile.
struct BoxWalk {
  int i[3] = {0, 0, 0};
  GNA_HD void next(const int (&n)[3]) {
    if (++i[2] < n[2]) return;
    i[2] = 0;
    if (++i[1] < n[1]) return;
    i[1] = 0;
    if (++i[0] == n[0]) i[0] = 0;
  }
};

// The divisors of the Hopper kernels' tile geometry (FwdTile, KeyTile) and head
// mapping, made on the host once the plan is applied (tile_divs): with them the
// prologue before the first TMA load has no division instruction. Query and key tiles
// and strides per axis, query heads per K/V head, query batches per K/V batch, and
// log2 of the tile extents (powers of two on this path).
// kcol: the key tiles' column layout (the forward's window_bits).
struct TileDivs {
  FastDiv nqt[3], nkt[3], s[3], group, kvb;
  int qsh[3], ksh[3];
  ColLayout kcol;
};
inline TileDivs tile_divs(const Params& p) {
  TileDivs v;
  for (int a = 0; a < 3; ++a) {
    v.nqt[a] = FastDiv(p.ax[a].nqt);
    v.nkt[a] = FastDiv(p.ax[a].nkt);
    v.s[a] = FastDiv(p.ax[a].s);
    v.qsh[a] = __builtin_ctz(static_cast<unsigned>(p.ax[a].qt));
    v.ksh[a] = __builtin_ctz(static_cast<unsigned>(p.ax[a].kt));
  }
  const int kt[3] = {p.ax[0].kt, p.ax[1].kt, p.ax[2].kt};
  v.kcol = col_layout(kt);
  v.group = FastDiv(p.H / p.Hkv);
  v.kvb = FastDiv(p.kvb);
  return v;
}

// window() on this path (group 0 of an undilated axis: the group is the axis, Lg = L),
// with the stride division from `v`.
GNA_HD void window_sm90(const Axis& x, const TileDivs& v, int a, int ig, int& lo, int& hi) {
  window_at(x, x.L, v.s[a](ig) * x.s, ig, lo, hi);
}

// Per-CTA geometry: the query tile, the key-tile box it visits, the window
// intersection. Coordinates are global (no dilation on this path).
struct FwdTile {
  int qs[3], qe[3];      // first / last valid query of the tile per axis
  int kt0[3], nkt[3];    // first key tile index (key-block local) and count per axis
  int ilo[3], ihi[3];    // keys every valid query of the tile sees
  int ntiles;

  GNA_HD FwdTile(const Params& p, const TileDivs& v, int bid) {
#pragma unroll
    for (int a = 2; a >= 0; --a) {
      const Axis& x = p.ax[a];
      const int r = v.nqt[a](bid);
      const int t = bid - r * x.nqt;
      bid = r;
      qs[a] = x.q0 + t * x.qt;
      qe[a] = min(qs[a] + x.qt, x.q0 + x.qn) - 1;
      int lo0, hi0, lo1, hi1;
      window_sm90(x, v, a, qs[a], lo0, hi0);
      window_sm90(x, v, a, qe[a], lo1, hi1);
      // Windows lie inside the key block (gna_ffi.cu checks it): lo0 - kv0 >= 0.
      kt0[a] = (lo0 - x.kv0) >> v.ksh[a];
      nkt[a] = ((hi1 - x.kv0) >> v.ksh[a]) - kt0[a] + 1;
      ilo[a] = lo1;
      ihi[a] = hi0;
    }
    ntiles = nkt[0] * nkt[1] * nkt[2];
  }
  // Key-block local start of key tile `it` (row-major over the box) per axis.
  GNA_HD void key_tile(const Params& p, int it, int ks[3]) const {
    const int i2 = it % nkt[2];
    const int r = it / nkt[2];
    const int i1 = r % nkt[1];
    const int i0 = r / nkt[1];
    ks[0] = (kt0[0] + i0) * p.ax[0].kt;
    ks[1] = (kt0[1] + i1) * p.ax[1].kt;
    ks[2] = (kt0[2] + i2) * p.ax[2].kt;
  }
  // The same for the walk's current tile.
  GNA_HD void key_tile(const Params& p, const BoxWalk& w, int ks[3]) const {
#pragma unroll
    for (int a = 0; a < 3; ++a) ks[a] = (kt0[a] + w.i[a]) * p.ax[a].kt;
  }
  // Query `o` (in-tile coordinates per axis) of the tile: whether it lies in the block,
  // and its token index in the query-side buffers (row-major over their extents).
  GNA_HD bool query_token(const Params& p, const int (&o)[3], int64_t& tok) const {
    bool valid = true;
    tok = 0;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      const int ig = qs[a] + o[a];
      valid &= ig <= qe[a];
      tok = tok * p.qpitch[a] + (ig - p.ax[a].q0 + p.qoff[a]);
    }
    return valid;
  }
  // The window of the tile's query `o` (in-tile coordinates) per axis: keys [lo, hi].
  GNA_HD void query_window(const Params& p, const TileDivs& v, const int (&o)[3], int (&lo)[3], int (&hi)[3]) const {
#pragma unroll
    for (int a = 0; a < 3; ++a) window_sm90(p.ax[a], v, a, qs[a] + o[a], lo[a], hi[a]);
  }
  // Per axis (bit a), whether every valid query of the tile sees every key of the key
  // tile that starts at global `ks` on that axis (kAllAxes: the element mask is skipped;
  // padded key tiles never qualify).
  GNA_HD int full_axes(const Params& p, const int ks[3]) const {
    int f = 0;
#pragma unroll
    for (int a = 0; a < 3; ++a) f |= (ks[a] >= ilo[a] && ks[a] + p.ax[a].kt - 1 <= ihi[a]) << a;
    return f;
  }
};

// The forward's body. EXTRA: the call's additional tokens (p.nx of them, [B, nx, Hkv, D]
// read through the maps txk / txv as (Hkv*D, nx, 1, 1, B) with boxes of (64, KT, 1, 1, 1):
// a key tile's shared-memory layout) are ceil(nx / KT) more key tiles after the window's,
// every query sees all of them (the last masked past nx, whose rows TMA zero-fills): out
// and lse come out over the window and the tokens together. Without EXTRA the maps are
// not read (null). MULTI: the CTA runs `items` query tiles one after the other
// (blockIdx.x + j * gridDim.x; fewer in the last CTAs), its TMA ring and the consumers' turns
// running on across them, so the tensor cores do not wait for a new CTA's start at every
// query tile; the next tile's Q and first key tiles load while the last one's softmax and
// epilogue run. Its Q slots (QSLOTS):
//  - 2: tile j takes slot j % 2, its O leaves through that slot (as in the one-tile
//    kernel), which takes tile j + 2's Q once both warpgroups' TMA stores have read it;
//  - 1 (where a second slot would cost a ring stage: D = 128 with 128-token key tiles):
//    the slot takes the next Q as soon as every consumer warp's last S = Q K^T of the
//    tile has completed, and O goes from registers straight to global memory (no
//    staging), so the next Q loads under the last P V, the softmax and the epilogue.
template <typename T, int D, int KEYS, int STAGES, bool EXTRA, bool MULTI = false, int QSLOTS = MULTI ? 2 : 1,
          bool PAIR = false>
__device__ __forceinline__ void fwd_sm90_body(const Params& p, const CUtensorMap& tq, const CUtensorMap& tk,
                                              const CUtensorMap& tv, const CUtensorMap& to, const TileDivs& divs,
                                              const CUtensorMap* txk, const CUtensorMap* txv, int items = 1,
                                              int pair_axis = 0) {
#if defined(GNA_SM90_ENABLED)
  static_assert(!(MULTI && EXTRA), "several query tiles per CTA without additional tokens only");
  static_assert(QSLOTS == (MULTI ? QSLOTS : 1) && QSLOTS >= 1 && QSLOTS <= 2, "one Q slot, or MULTI with 1 or 2");
  // O from registers to global memory, the Q slot released after the last S (QSLOTS 1).
  constexpr bool DIRECT = MULTI && QSLOTS == 1;
  using L = FwdLayout<D, KEYS, STAGES, QSLOTS, MULTI, PAIR>;
  constexpr int HALVES = D / 64;
  static_assert(!PAIR || (!MULTI && !EXTRA && HALVES == 2), "pairs: one query tile per CTA, K/V in two halves");
  constexpr int KT = L::KT;      // keys per key tile
  constexpr int NS = KT / 2;     // S accumulators per thread (64 rows x KT per warpgroup)
  constexpr int NB = KT / 8;     // 8-column blocks of S
  constexpr int NK = KT / 16;    // k16 slices of P
  // O: 64 rows x D per warpgroup as NG column groups of OW accumulators per thread
  // (one wgmma of N = D, or 128-column groups at D = 256).
  constexpr int NG = D > 128 ? D / 128 : 1;
  constexpr int OW = D / 2 / NG;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t sbase = (saddr(smem_raw) + 1023) & ~1023u;
  unsigned char* gbase = smem_raw + (sbase - saddr(smem_raw));
  const uint32_t sQ = sbase + L::kQ, sK = sbase + L::kK, sV = sbase + L::kV;
  const uint32_t bar_q = sbase + L::kBars;
  // Q slot q (query tile j of the CTA takes slot j % QSLOTS): full, and (MULTI) empty
  // again once the consumers are done with it (QSLOTS 2: both warpgroups' O left it; 1:
  // every consumer warp's last S has read it).
  auto bar_qf = [&](int q) { return bar_q + 8 * q; };
  [[maybe_unused]] auto bar_qe = [&](int q) { return bar_q + 8 * (QSLOTS + q); };
  auto bar_k = [&](int s) { return bar_q + 8 * (L::kQBars + s); };
  auto bar_v = [&](int s) { return bar_q + 8 * (L::kQBars + STAGES + s); };
  auto bar_e = [&](int s) { return bar_q + 8 * (L::kQBars + 2 * STAGES + s); };
  // PAIR: the other CTA's producer arrives here once its copy of stage s is free.
  [[maybe_unused]] auto bar_x = [&](int s) { return bar_q + 8 * (L::kQBars + 3 * STAGES + s); };

  const int h = blockIdx.y, b = blockIdx.z + p.z0;
  const int hk = divs.group(h), bk = divs.kvb(b);
  // The CTA's query tiles: first + j * step for j < nitems, strided (MULTI: step =
  // gridDim.x), so that CTAs running side by side work on neighbouring query tiles, whose
  // key tiles overlap, as in the one-tile kernel. (Consecutive tiles per CTA, x * items +
  // j, made the side-by-side tiles `items` apart: on 1-D window 1024, 2 heads, batch 8 and
  // 8 per CTA their key tiles no longer fit in L2, +13%; session 37.)
  int first = blockIdx.x;
  // PAIR: the cluster's two CTAs (x = 2k + rank) take query tiles 2i and 2i + 1 along
  // pair_axis, whose key tiles are the same (gna::pair_axis): each CTA loads one 64-column
  // half of every K and V tile into both CTAs' shared memory (TMA multicast). With an odd
  // count of tiles along the axis the last one is alone (`paired` false): its cluster's
  // second CTA leaves at once and the first runs as the one-tile kernel does.
  [[maybe_unused]] const uint32_t rank = blockIdx.x & 1;
  [[maybe_unused]] bool paired = false;
  if constexpr (PAIR) {
    // (Selects, not arrays indexed by pair_axis, which would live in local memory.)
    const int na = pair_axis == 0 ? p.ax[0].nqt : pair_axis == 1 ? p.ax[1].nqt : p.ax[2].nqt;
    const int np = (na + 1) / 2;  // clusters along the axis
    const int n1 = pair_axis == 1 ? np : p.ax[1].nqt, n2 = pair_axis == 2 ? np : p.ax[2].nqt;
    int k = blockIdx.x >> 1;
    int t2 = k % n2;
    k /= n2;
    int t1 = k % n1, t0 = k / n1;
    const int ta = pair_axis == 0 ? t0 : pair_axis == 1 ? t1 : t2;
    paired = 2 * ta + 1 < na;
    if (!paired && rank == 1) return;
    const int r = static_cast<int>(rank);
    if (pair_axis == 0) t0 = 2 * t0 + r;
    else if (pair_axis == 1) t1 = 2 * t1 + r;
    else t2 = 2 * t2 + r;
    first = (t0 * p.ax[1].nqt + t1) * p.ax[2].nqt + t2;
  }
  int step = 1, nitems = 1;
  if constexpr (MULTI) {
    const int nqt = p.ax[0].nqt * p.ax[1].nqt * p.ax[2].nqt;
    step = gridDim.x;
    nitems = (nqt - 1 - first) / step + 1;  // >= 1: gridDim.x = ceil(nqt / items) <= nqt
    nitems = nitems < items ? nitems : items;
  }
  const FwdTile tile0(p, divs, first);
  const int wg = warpgroup_index();
  [[maybe_unused]] const Stamps stamp{sbase + L::kStamps};
  if (GNA_FWD_TIMELINE) stamp.take(0, 0);

  if (threadIdx.x == 0) {
    mbar_init(bar_q, 1);
    if constexpr (MULTI) {
      for (int q = 1; q < QSLOTS; ++q) mbar_init(bar_qf(q), 1);
      // One arrival per consumer warpgroup (QSLOTS 2) or per consumer warp (1).
      for (int q = 0; q < QSLOTS; ++q) mbar_init(bar_qe(q), DIRECT ? 8 : 2);
    }
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(bar_k(s), 1);
      mbar_init(bar_v(s), 1);
      mbar_init(bar_e(s), 8);  // one arrival per consumer warp
      if constexpr (PAIR) mbar_init(bar_x(s), 1);  // the other CTA's producer
    }
    mbar_fence_init();
  }
  grid_dependency_wait();
  launch_dependents();
  if (PAIR && paired)
    cluster_sync();  // the other CTA's barriers are ready before any load or arrival on them
  else
    __syncthreads();

  if (wg == 0) {  // ---------------------------------------------------- producer
    regs_dec<40>();
    // Waits until ring stage it % STAGES may take load `it`: this CTA's consumers have
    // released it and, PAIR, so have the other CTA's (its producer says so, once per load,
    // rather than each of its consumer warps on every key tile: those remote arrivals in
    // the consumers' loop cost what the shared loads saved, session 40).
    auto stage_free = [&](int it) {
      if (it < STAGES) return;  // the ring's first pass
      const int s = it % STAGES;
      const uint32_t phase = ((it / STAGES) & 1) ^ 1;
      mbar_wait(bar_e(s), phase);
      if (PAIR && paired) {
        mbar_arrive_cluster(bar_x(s), rank ^ 1);
        mbar_wait(bar_x(s), phase);
      }
    };
    if (threadIdx.x != 0) return;
    tma_prefetch_desc(&tq);
    tma_prefetch_desc(&tk);
    tma_prefetch_desc(&tv);
    int it = 0;  // position in the ring, across the CTA's query tiles
    // Query tile j's Q, into slot j % QSLOTS once query tile j - QSLOTS is done with it.
    auto load_q = [&](const FwdTile& tile, int j) {
      const int qslot = j % QSLOTS;
      if (MULTI && j >= QSLOTS) mbar_wait(bar_qe(qslot), (j / QSLOTS - 1) & 1);
      if (GNA_FWD_TIMELINE) stamp.take_q(j);
      mbar_expect_tx(bar_qf(qslot), L::kQBytes);
#pragma unroll
      for (int c = 0; c < HALVES; ++c)
        tma_load_5d(sQ + qslot * L::kQBytes + c * L::kQHalf, &tq, bar_qf(qslot), h * D + 64 * c,
                    tile.qs[2] - p.ax[2].q0, tile.qs[1] - p.ax[1].q0, tile.qs[0] - p.ax[0].q0, b);
    };
    // A K or V tile into the ring stage at dst, with its transaction count: both 64-column
    // halves, or (PAIR) this CTA's half into both CTAs, the other half coming from the other.
    auto load_kv = [&](uint32_t dst, const void* map, uint32_t bar, int a2, int a1, int a0, int batch) {
      mbar_expect_tx(bar, L::kKVBytes);
      if (PAIR && paired) {
        const int c = static_cast<int>(rank);
        tma_load_5d_multicast(dst + c * L::kKVHalf, map, bar, 3, hk * D + 64 * c, a2, a1, a0, batch);
      } else {
#pragma unroll
        for (int c = 0; c < HALVES; ++c)
          tma_load_5d(dst + c * L::kKVHalf, map, bar, hk * D + 64 * c, a2, a1, a0, batch);
      }
    };
    for (int j = 0; j < nitems; ++j) {
      const FwdTile tile = j == 0 ? tile0 : FwdTile(p, divs, first + j * step);
      // DIRECT: the next tile's Q after its first key tile, whose ring slot is freed by an
      // earlier P V than the last S the Q slot waits for.
      const bool q_late = DIRECT && j > 0;
      if (!q_late) load_q(tile, j);
      BoxWalk walk;
      for (int t = 0; t < tile.ntiles; ++t, ++it, walk.next(tile.nkt)) {
        const int s = it % STAGES;
        stage_free(it);
        int ks[3];
        tile.key_tile(p, walk, ks);
        load_kv(sK + s * L::kKVBytes, &tk, bar_k(s), ks[2], ks[1], ks[0], bk);
        load_kv(sV + s * L::kKVBytes, &tv, bar_v(s), ks[2], ks[1], ks[0], bk);
        if (q_late && t == 0) load_q(tile, j);  // (a query tile visits at least one key tile)
      }
    }
    // PAIR: one more exchange per stage of the ring's last loads, so that neither CTA
    // leaves before the other's consumers have released (i.e. received) its last
    // multicasts into them: a CTA's distributed shared memory operations complete before
    // it exits.
    if (PAIR && paired)
      for (int end = it + STAGES; it < end; ++it) stage_free(it);
    if constexpr (EXTRA) {
      tma_prefetch_desc(txk);
      tma_prefetch_desc(txv);
      const int n = it + (p.nx + KT - 1) / KT;
      for (int x0 = 0; it < n; ++it, x0 += KT) {
        const int s = it % STAGES;
        stage_free(it);
        load_kv(sK + s * L::kKVBytes, txk, bar_k(s), x0, 0, 0, b);
        load_kv(sV + s * L::kKVBytes, txv, bar_v(s), x0, 0, 0, b);
      }
    }
    return;
  }

  // ------------------------------------------------------------------ consumers
  regs_inc<232>();
  const int cw = wg - 1;                       // consumer warpgroup: query rows 64cw..64cw+63
  const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int gid = lane / 4, tig = lane % 4;
  // Tile extents are powers of two: in-tile coordinates by shifts and masks.
  const int qsh2 = __ffs(p.ax[2].qt) - 1, qsh1 = __ffs(p.ax[1].qt) - 1;

  // In-tile coordinates of query row m (rows are row-major in the tile box).
  auto row_coords = [&](int m, int (&o)[3]) { box_coords(m, qsh2, qsh1, p.ax[1].qt - 1, p.ax[2].qt - 1, o); };
  FwdTile tile = tile0;  // the current query tile
  int qslot = 0;         // its Q slot
  int base = 0;          // the ring position of its first key tile
  int wlo[2][3], whi[2][3];
  float o_acc[NG][OW];
  float m_run[2], l_run[2];
  // A query tile's start: this thread's two query rows' windows per axis (validity and
  // token index are recomputed in the epilogue rather than held through the loop), O
  // and the softmax state cleared.
  auto start_tile = [&] {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      int o[3];
      row_coords(64 * cw + 16 * warp + gid + 8 * r, o);
      tile.query_window(p, divs, o, wlo[r], whi[r]);
    }
#pragma unroll
    for (int g = 0; g < NG; ++g)
#pragma unroll
      for (int i = 0; i < OW; ++i) o_acc[g][i] = 0.f;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      m_run[r] = -INFINITY;
      l_run[r] = 0.f;
    }
  };
  start_tile();
  const float sl2 = p.scale_log2;
  // With a positive scale, the row maximum of the raw scores is the maximum of the
  // scaled ones, so the scale folds into the exponent's FFMA (no multiply per score);
  // otherwise (scale <= 0) the scores are scaled first, as the mask path always does.
  const bool fold = sl2 > 0.f;
  const float pre = fold ? 1.f : sl2, post = fold ? sl2 : 1.f;

  // wgmma descriptors of this warpgroup's Q rows and of the K and V tiles of stage 0;
  // stage s and the k slices are constant offsets from them.
  uint64_t dq0 = desc_sw128(sQ + cw * 64 * 128, 16, 1024);  // (MULTI: of the current Q slot)
  const uint64_t dk0 = desc_sw128(sK, 16, 1024);
  const uint64_t dv0 = desc_sw128(sV, L::kKVHalf, 1024);
  // S = Q K^T for key tile `it` of the query tile (64 x KT per warpgroup), issued
  // asynchronously.
  auto issue_s = [&](int it, float(&sc)[NS]) {
    const int s = (base + it) % STAGES;
    mbar_wait(bar_k(s), ((base + it) / STAGES) & 1);
    const uint64_t dk = desc_plus(dk0, s * L::kKVBytes);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint64_t a = desc_plus(dq0, (kk / 4) * L::kQHalf + (kk % 4) * 32);
      const uint64_t b = desc_plus(dk, (kk / 4) * L::kKVHalf + (kk % 4) * 32);
      if (kk == 0) Wgmma<T>::ss_first(sc, a, b);
      else Wgmma<T>::ss(sc, a, b, 1);
    }
    wg_commit();
  };
  // O += P V for key tile `it`, issued asynchronously (column group g of O reads
  // V's 64-column halves 2g, 2g+1).
  auto issue_pv = [&](int it, const uint32_t(&pa)[NK][4]) {
    const int s = (base + it) % STAGES;
    mbar_wait(bar_v(s), ((base + it) / STAGES) & 1);
    const uint64_t dv = desc_plus(dv0, s * L::kKVBytes);
    wg_fence();
#pragma unroll
    for (int j = 0; j < NK; ++j)
#pragma unroll
      for (int g = 0; g < NG; ++g) Wgmma<T>::rs(o_acc[g], pa[j], desc_plus(dv, 2 * g * L::kKVHalf + j * 16 * 128));
    wg_commit();
  };
  // The next key tile of the softmax (tiles in order, `it`): its global start and, per
  // axis (bit a), whether it lies inside every window on that axis (kAllAxes: on all, no
  // element mask). Computed before waiting on the scores it masks. EXTRA: past the
  // window's tiles, the tokens' tiles are full but the last one where nx is not a
  // multiple of KT; that one sets xcols, the tokens it holds (0 otherwise).
  BoxWalk walk;
  [[maybe_unused]] int xcols = 0;
  auto next_tile = [&](int it, int (&ks)[3]) {
    if constexpr (EXTRA) {
      if (it >= tile.ntiles) {
        const int left = p.nx - (it - tile.ntiles) * KT;
        xcols = left < KT ? left : 0;
        return left >= KT ? kAllAxes : 0;
      }
    }
    tile.key_tile(p, walk, ks);
    walk.next(tile.nkt);
#pragma unroll
    for (int a = 0; a < 3; ++a) ks[a] += p.ax[a].kv0;
    return tile.full_axes(p, ks);
  };
  // Mask (partial tiles only) and online softmax of the key tile at global `ks`:
  // updates m_run, l_run, turns sc into unnormalized probabilities, returns the rescale
  // factors of O.
  auto softmax = [&](const int (&ks)[3], int full, float(&sc)[NS], float(&alpha)[2]) {
    if (full == kAllAxes) {
      if (!fold) {
#pragma unroll
        for (int i = 0; i < NS; ++i) sc[i] *= sl2;
      }
    } else if (EXTRA && xcols > 0) {
      // The tokens' last tile: columns past the tokens are padding (accumulator i of a
      // row holds column 8 (i / 4) + 2 tig + i % 2).
#pragma unroll
      for (int i = 0; i < NS; ++i) sc[i] = 8 * (i / 4) + 2 * tig + i % 2 < xcols ? sc[i] * pre : -INFINITY;
    } else {
      // The element mask (window_bits; axes on which the tile lies inside every
      // window are skipped).
      int lo[2][3], hi[2][3];
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int a = 0; a < 3; ++a) {
          lo[r][a] = wlo[r][a] - ks[a];
          hi[r][a] = whi[r][a] - ks[a];
        }
      uint32_t vis[2][2];
      window_bits(divs.kcol, lo, hi, full, tig, vis);
#pragma unroll
      for (int i = 0; i < NS; ++i)
        sc[i] = window_bit(vis, i) ? sc[i] * pre : -INFINITY;
    }
    // Rows r = 0, 1 are accumulator slots {0,1} and {2,3} of each 8-column block.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int i = 0; i < NB; ++i) mx = fmaxf(mx, fmaxf(sc[4 * i + 2 * r], sc[4 * i + 2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // Lazy rescaling: m_run stays the reference until a tile's maximum exceeds it by
      // more than kRescaleLog2, so P <= 2^kRescaleLog2 and O is rescaled only then.
      const float m_tile = mx * post;
      const float m_new = m_tile > m_run[r] + kRescaleLog2 ? m_tile : m_run[r];
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      alpha[r] = fast_exp2(m_run[r] - m_use);
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < NB; ++i) {
        sc[4 * i + 2 * r] = fast_exp2(fmaf(sc[4 * i + 2 * r], post, -m_use));
        sc[4 * i + 2 * r + 1] = fast_exp2(fmaf(sc[4 * i + 2 * r + 1], post, -m_use));
        sum += sc[4 * i + 2 * r] + sc[4 * i + 2 * r + 1];
      }
      l_run[r] = l_run[r] * alpha[r] + sum;
      m_run[r] = m_new;
    }
  };
  // P as A fragments: k16 slice j holds keys 16j..16j+15 = accumulator blocks 2j, 2j+1.
  auto to_a = [&](const float(&sc)[NS], uint32_t(&pa)[NK][4]) {
#pragma unroll
    for (int j = 0; j < NK; ++j) {
      pa[j][0] = Mma<T>::cvt2(sc[8 * j + 0], sc[8 * j + 1]);
      pa[j][1] = Mma<T>::cvt2(sc[8 * j + 2], sc[8 * j + 3]);
      pa[j][2] = Mma<T>::cvt2(sc[8 * j + 4], sc[8 * j + 5]);
      pa[j][3] = Mma<T>::cvt2(sc[8 * j + 6], sc[8 * j + 7]);
    }
  };
  auto pa_fence = [](uint32_t(&pa)[NK][4]) {
#pragma unroll
    for (int j = 0; j < NK; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) asm volatile("" : "+r"(pa[j][i])::"memory");
  };
  // Ping-pong: the two consumer warpgroups take turns issuing their matrix work
  // (named barriers 2 and 3), so one's softmax runs under the other's wgmma.
  auto turn_wait = [&] { named_sync(2 + cw, 256); };
  auto turn_pass = [&] { named_arrive(2 + (1 - cw), 256); };
  auto release = [&](int it) {
    if (lane == 0) mbar_arrive(bar_e((base + it) % STAGES));
  };
  // DIRECT: this warp's S of the query tile have completed: the Q slot may take the next
  // tile's Q.
  auto release_q = [&] {
    if (lane == 0) mbar_arrive(bar_qe(0));
  };

  for (int j = 0; j < nitems; ++j) {
    if (j > 0) {  // (MULTI)
      tile = FwdTile(p, divs, first + j * step);
      walk = BoxWalk{};
      qslot = j % QSLOTS;
      dq0 = desc_sw128(sQ + qslot * L::kQBytes + cw * 64 * 128, 16, 1024);
      start_tile();
    }

    // Pipeline: S of tile `it` is issued with P V of tile it-1, and the softmax of
    // `it` runs while that P V is in flight.
    float sc[NS], alpha[2];
    uint32_t pa[NK][4];
    int ks[3];
    const int n = EXTRA ? tile.ntiles + (p.nx + KT - 1) / KT : tile.ntiles;
    // Warpgroup 0 goes first; the turns run on across the CTA's query tiles.
    if (cw == 1 && j == 0) turn_pass();
    mbar_wait(bar_qf(qslot), (j / QSLOTS) & 1);
    if (GNA_FWD_TIMELINE) stamp.take(j, 1);
    turn_wait();
    issue_s(0, sc);
    turn_pass();
    int full = next_tile(0, ks);
    wg_wait<0>();
    if (GNA_FWD_TIMELINE) stamp.take(j, 2);
    reg_fence(sc);
    softmax(ks, full, sc, alpha);
    to_a(sc, pa);
    for (int it = 1; it < n; ++it) {
      turn_wait();
      issue_s(it, sc);
      issue_pv(it - 1, pa);
      turn_pass();
      full = next_tile(it, ks);
      wg_wait<1>();
      reg_fence(sc);
      softmax(ks, full, sc, alpha);
      // The softmax is what runs under P V: it must finish before the wait on P V. The
      // fence keeps the compiler front end from sinking it below; ptxas would still hoist
      // the wait above it (seen in the SASS and in Nsight Compute's stall samples, session
      // 5), unless the wait sits behind a branch: the O rescale's, with a wait on each side
      // (spelled differently, so the two are not merged back above the branch).
      reg_fence(sc);
      reg_fence(alpha);
      // Rescale O unless no row of the warp has a new reference maximum (alpha = 1
      // exactly: the skipped multiplies would change nothing; with lazy rescaling few
      // tiles after the first set one).
      if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
        wg_wait<0>();
#pragma unroll
        for (int g = 0; g < NG; ++g) reg_fence(o_acc[g]);
#pragma unroll
        for (int g = 0; g < NG; ++g)
#pragma unroll
          for (int i = 0; i < OW / 4; ++i) {
            o_acc[g][4 * i] *= alpha[0];
            o_acc[g][4 * i + 1] *= alpha[0];
            o_acc[g][4 * i + 2] *= alpha[1];
            o_acc[g][4 * i + 3] *= alpha[1];
          }
      } else {
        wg_wait_0_alt();
      }
#pragma unroll
      for (int g = 0; g < NG; ++g) reg_fence(o_acc[g]);
      pa_fence(pa);
      release(it - 1);
      to_a(sc, pa);
    }
    if (GNA_FWD_TIMELINE) stamp.take(j, 3);
    // (After the loop rather than at its last S's wait: a branch there slows the loop.)
    if (DIRECT) release_q();
    turn_wait();
    issue_pv(n - 1, pa);
    if (cw == 0 || j + 1 < nitems) turn_pass();  // warpgroup 1's last pass would have no matching wait
    wg_wait<0>();
    if (GNA_FWD_TIMELINE) stamp.take(j, 4);
#pragma unroll
    for (int g = 0; g < NG; ++g) reg_fence(o_acc[g]);
    release(n - 1);

    // Epilogue: normalize, write this warpgroup's 64 rows into its rows of the (now
    // unused) Q tile in the swizzled layout, then a TMA store of them: the `to` map's box
    // is half a tile (rows 64cw..64cw+63 of the tile form a box), so the two warpgroups
    // store independently (DIRECT: each thread stores its O to global memory, the Q slot
    // holding the next Q by now). The reciprocal and the lse's log are the approximate MUFU
    // forms (about 1 ulp and 2^-22 absolute in log2): O is rounded to 16 bits right after, and
    // together they take ~150 instructions out of the epilogue, which is on the critical
    // path of every CTA (session 18: 1-D one-head forward -0.6%).
    float l_row[2], inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = l_run[r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      l_row[r] = l;
      inv[r] = l > 0.f ? fast_rcp(l) : 0.f;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l = l_row[r];
      const int row = 64 * cw + 16 * warp + gid + 8 * r;
      int o[3];
      int64_t tok;
      if constexpr (DIRECT) {
        row_coords(row, o);
        // Per 32 columns (4 blocks of 8), the quad's 4 x 4 column pairs transposed
        // (thread tig then holds block tig's 8 columns): 16-byte stores, a row's 64 bytes
        // per quad and instruction (4-byte stores took 2.2-2.7 us per tile, session 37).
        const bool valid = tile.query_token(p, o, tok);
        T* orow = static_cast<T*>(p.o) + b * p.o_b + (valid ? tok : 0) * p.o_tok + h * D;
#pragma unroll
        for (int g = 0; g < NG; ++g)
#pragma unroll
          for (int m = 0; m < OW / 16; ++m) {
            uint32_t x[4];  // slot u: block 4m + u, columns 2 tig, 2 tig + 1
#pragma unroll
            for (int u = 0; u < 4; ++u)
              x[u] = Mma<T>::cvt2(o_acc[g][4 * (4 * m + u) + 2 * r] * inv[r],
                                  o_acc[g][4 * (4 * m + u) + 2 * r + 1] * inv[r]);
            quad_transpose(x, tig);  // slot u: block 4m + tig, columns 2u, 2u + 1
            if (valid)
              *reinterpret_cast<uint4*>(orow + (D / NG) * g + 32 * m + 8 * tig) = make_uint4(x[0], x[1], x[2], x[3]);
          }
      } else {
#pragma unroll
        for (int g = 0; g < NG; ++g)
#pragma unroll
          for (int i = 0; i < OW / 4; ++i) {
            const int col = (D / NG) * g + 8 * i + 2 * tig, half = col / 64, cc = col % 64;
            const uint32_t off = half * L::kQHalf + row * 128 + ((((cc / 8) ^ (row % 8)) * 16) | ((cc % 8) * 2));
            *reinterpret_cast<uint32_t*>(gbase + L::kQ + qslot * L::kQBytes + off) =
                Mma<T>::cvt2(o_acc[g][4 * i + 2 * r] * inv[r], o_acc[g][4 * i + 2 * r + 1] * inv[r]);
          }
        row_coords(row, o);
      }
      const bool valid = tile.query_token(p, o, tok);
      if (tig == 0 && valid) {
        const float lse = l > 0.f ? (m_run[r] + fast_log2(l)) * 0.69314718055994531f : -INFINITY;
        p.lse[(b * p.nq + tok) * p.H + h] = lse;
      }
    }
    if (GNA_FWD_TIMELINE) stamp.take(j, 5);
    if constexpr (DIRECT) {
      if (GNA_FWD_TIMELINE) {
        __syncwarp();  // the lanes' lse stores before the stamps overwrite them
        stamp.take(j, 6);
      }
    } else {
      fence_proxy_async();
      named_sync(4 + cw, 128);  // this warpgroup's O rows are written
      if (GNA_FWD_TIMELINE) stamp.take(j, 6);
      if (threadIdx.x % 128 == 0) {
        int o[3];
        row_coords(64 * cw, o);
#pragma unroll
        for (int c = 0; c < HALVES; ++c)
          tma_store_5d(&to, sQ + qslot * L::kQBytes + c * L::kQHalf + cw * 64 * 128, h * D + 64 * c,
                       tile.qs[2] + o[2] - p.ax[2].q0, tile.qs[1] + o[1] - p.ax[1].q0,
                       tile.qs[0] + o[0] - p.ax[0].q0, b);
        tma_store_commit_and_wait();
        if (MULTI) mbar_arrive(bar_qe(qslot));  // the slot's O is read: it may take the next Q
      }
    }
    if (GNA_FWD_TIMELINE) stamp.take(j, 7);
    base += n;
  }
  // The stamps over the lse of the tiles' first rows, once the CTA's tiles are done (written
  // after each tile, they lengthened the handover between two tiles of a CTA: 2.94-3.07 us
  // against 2.08 us at 2 per CTA, session 38). With one tile per CTA they still sit between
  // its last stamp and its exit, in the gap before the next CTA.
  if (GNA_FWD_TIMELINE && threadIdx.x % 128 == 0) {
    uint32_t sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    const int npt = Stamps::kPoints, nval = cw == 0 ? npt + 3 : npt;
    for (int j = 0; j < nitems && j < Stamps::kTiles; ++j) {
      tile = FwdTile(p, divs, first + j * step);
      const int n = EXTRA ? tile.ntiles + (p.nx + KT - 1) / KT : tile.ntiles;
      for (int i = 0; i < nval; ++i) {
        int o[3];
        row_coords(64 * cw + i, o);
        int64_t tok;
        const uint32_t v = i == 0        ? stamp.get(0, npt * cw)  // the CTA's entry
                           : i < npt      ? stamp.get(j, i + npt * cw)
                           : i == npt     ? sm
                           : i == npt + 1 ? static_cast<uint32_t>(n)
                                          : stamp.get(j, 2 * npt);
        if (tile.query_token(p, o, tok)) p.lse[(b * p.nq + tok) * p.H + h] = __uint_as_float(v);
      }
    }
  }
#endif
}

template <typename T, int D, int KEYS, int STAGES>
__global__ void __launch_bounds__(kThreads, 1)
    fwd_sm90_kernel(const __grid_constant__ Params p, const __grid_constant__ CUtensorMap tq,
                    const __grid_constant__ CUtensorMap tk, const __grid_constant__ CUtensorMap tv,
                    const __grid_constant__ CUtensorMap to, const __grid_constant__ TileDivs divs) {
  fwd_sm90_body<T, D, KEYS, STAGES, false>(p, tq, tk, tv, to, divs, nullptr, nullptr);
}

// The one-tile forward in clusters of two CTAs whose query tiles (2i, 2i + 1 along
// pair_axis) visit the same key tiles, each K/V tile loaded once for both (fwd_sm90_body's
// PAIR); launched with cluster dimensions (2, 1, 1).
template <typename T, int D, int KEYS, int STAGES>
__global__ void __launch_bounds__(kThreads, 1)
    fwd_pair_sm90_kernel(const __grid_constant__ Params p, const __grid_constant__ CUtensorMap tq,
                         const __grid_constant__ CUtensorMap tk, const __grid_constant__ CUtensorMap tv,
                         const __grid_constant__ CUtensorMap to, const __grid_constant__ TileDivs divs,
                         int pair_axis) {
  fwd_sm90_body<T, D, KEYS, STAGES, false, false, 1, true>(p, tq, tk, tv, to, divs, nullptr, nullptr, 1, pair_axis);
}

// The forward with `items` query tiles per CTA (the grid's x extent covers
// ceil(query tiles / items)) and QSLOTS Q slots (fwd_sm90_body).
template <typename T, int D, int KEYS, int STAGES, int QSLOTS>
__global__ void __launch_bounds__(kThreads, 1)
    fwd_items_sm90_kernel(const __grid_constant__ Params p, const __grid_constant__ CUtensorMap tq,
                          const __grid_constant__ CUtensorMap tk, const __grid_constant__ CUtensorMap tv,
                          const __grid_constant__ CUtensorMap to, const __grid_constant__ TileDivs divs, int items) {
  fwd_sm90_body<T, D, KEYS, STAGES, false, true, QSLOTS>(p, tq, tk, tv, to, divs, nullptr, nullptr, items);
}

// The forward with the call's additional tokens as extra key tiles (p.nx of them), at
// the default key tile only.
template <typename T, int D, int STAGES>
__global__ void __launch_bounds__(kThreads, 1)
    fwd_tokens_sm90_kernel(const __grid_constant__ Params p, const __grid_constant__ CUtensorMap tq,
                           const __grid_constant__ CUtensorMap tk, const __grid_constant__ CUtensorMap tv,
                           const __grid_constant__ CUtensorMap to, const __grid_constant__ TileDivs divs,
                           const __grid_constant__ CUtensorMap txk, const __grid_constant__ CUtensorMap txv) {
  fwd_sm90_body<T, D, fwd_key_tokens<D>(), STAGES, true>(p, tq, tk, tv, to, divs, &txk, &txv);
}

}  // namespace sm90
}  // namespace gna
