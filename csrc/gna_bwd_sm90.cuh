// Hopper backward kernels (sm_90a): dQ (query tiles outer) and dK/dV (key tiles
// outer), deterministic like the sm80 pair (no atomics; the GQA query heads of a
// key/value head are summed inside the CTA in a fixed order). Same eligibility as
// the forward (fp16/bf16, D = D_v in {64, 128}, no dilation); same CTA shape: a
// producer warpgroup (TMA) and two wgmma consumer warpgroups of 64 rows each.
//
//   dQ:    128 queries x 64-key tiles.  S = Q K^T, dP = dO V^T (SS, m64n64),
//          dS = P (dP - delta), dQ += dS K (RS, K read MN-major).
//   dK/dV: 128 keys x 64-query tiles.   S^T = K Q^T, dP^T = V dO^T (SS, m64n64),
//          dV += P^T dO, dK += dS^T Q (SS: P^T and dS^T staged in shared memory,
//          dO and Q read MN-major).
// P = exp2(S * scale * log2 e - lse * log2 e), with delta = rowsum(dO * O) - dLSE
// from JAX (gna_problem.h). The dK/dV producer warp also stages each query tile's
// lse and delta in shared memory (ordinary loads, one mbarrier arrival per lane).
//
// On by default; JAX_GNA_SM90_BWD=0 turns it off (gna_sm90.cu).
#pragma once
#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "gna_fwd_sm90.cuh"

namespace gna {
namespace sm90 {

constexpr float kLog2e = 1.4426950408889634f;

// Accumulator blocks (2j, 2j+1) of a 64-row score tile as the A fragment of k16 slice j.
template <typename T, int NS>
__device__ __forceinline__ void acc_to_a(const float (&x)[8 * NS], uint32_t (&a)[NS][4]) {
#pragma unroll
  for (int j = 0; j < NS; ++j) {
    a[j][0] = Mma<T>::cvt2(x[8 * j + 0], x[8 * j + 1]);
    a[j][1] = Mma<T>::cvt2(x[8 * j + 2], x[8 * j + 3]);
    a[j][2] = Mma<T>::cvt2(x[8 * j + 4], x[8 * j + 5]);
    a[j][3] = Mma<T>::cvt2(x[8 * j + 6], x[8 * j + 7]);
  }
}

// Writes a warpgroup's 64 x D accumulator rows (scaled) into a swizzled tile of
// `rows` rows at shared memory `tile` (generic pointer), rows 64 cw .. 64 cw + 63.
template <typename T, int D>
__device__ __forceinline__ void acc_to_smem(const float (&acc)[D / 2], float scale, unsigned char* tile, int rows,
                                            int cw, int warp, int gid, int tig) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = 64 * cw + 16 * warp + gid + 8 * r;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      const int col = 8 * i + 2 * tig, half = col / 64, cc = col % 64;
      const uint32_t off = half * rows * 128 + row * 128 + ((((cc / 8) ^ (row % 8)) * 16) | ((cc % 8) * 2));
      *reinterpret_cast<uint32_t*>(tile + off) =
          Mma<T>::cvt2(acc[4 * i + 2 * r] * scale, acc[4 * i + 2 * r + 1] * scale);
    }
  }
}

// x = A B^T over the head dim, 64 x 64: A rows and B rows K-major in swizzled tiles
// whose 64-column halves lie a_half / b_half bytes apart. Issued as one commit group.
template <typename T, int D>
__device__ __forceinline__ void ss_issue(float (&x)[32], uint32_t a, uint32_t b, int a_half, int b_half) {
#if defined(GNA_SM90_ENABLED)
  const uint64_t da = desc_sw128(a, 16, 1024), db = desc_sw128(b, 16, 1024);
  wg_fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint32_t ao = (kk / 4) * a_half + (kk % 4) * 32, bo = (kk / 4) * b_half + (kk % 4) * 32;
    if (kk == 0) Wgmma<T>::ss_first(x, desc_plus(da, ao), desc_plus(db, bo));
    else Wgmma<T>::ss(x, desc_plus(da, ao), desc_plus(db, bo), 1);
  }
  wg_commit();
#endif
}

template <typename Acc>
__device__ __forceinline__ void frag_fence(Acc& a) {
  uint32_t* x = reinterpret_cast<uint32_t*>(&a);
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(Acc) / 4); ++i) asm volatile("" : "+r"(x[i])::"memory");
}

// --------------------------------------------------------------------------- dQ
template <int D, int STAGES>
struct DqLayout {
  static constexpr int kQBytes = 128 * D * 2, kQHalf = 128 * 128;  // Q, dO, dQ tiles
  static constexpr int kKBytes = 64 * D * 2, kKHalf = 64 * 128;     // K, V tiles
  static constexpr int kQ = 0, kDO = kQBytes, kK = 2 * kQBytes, kV = kK + STAGES * kKBytes;
  static constexpr int kBars = kV + STAGES * kKBytes;  // qfull, kfull[S], vfull[S], empty[S]
  static constexpr size_t smem_bytes() { return kBars + 8 * (1 + 3 * STAGES) + 1024; }
};

template <typename T, int D, int STAGES>
__global__ void __launch_bounds__(kThreads, 1)
    dq_sm90_kernel(const __grid_constant__ Params p, const __grid_constant__ CUtensorMap tq,
                   const __grid_constant__ CUtensorMap tk, const __grid_constant__ CUtensorMap tv,
                   const __grid_constant__ CUtensorMap tdo, const __grid_constant__ CUtensorMap tdq,
                   const __grid_constant__ TileDivs divs) {
#if defined(GNA_SM90_ENABLED)
  using L = DqLayout<D, STAGES>;
  constexpr int HALVES = D / 64;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t sbase = (saddr(smem_raw) + 1023) & ~1023u;
  unsigned char* gbase = smem_raw + (sbase - saddr(smem_raw));
  const uint32_t sQ = sbase + L::kQ, sDO = sbase + L::kDO, sK = sbase + L::kK, sV = sbase + L::kV;
  const uint32_t bar_q = sbase + L::kBars;
  auto bar_k = [&](int s) { return bar_q + 8 * (1 + s); };
  auto bar_v = [&](int s) { return bar_q + 8 * (1 + STAGES + s); };
  auto bar_e = [&](int s) { return bar_q + 8 * (1 + 2 * STAGES + s); };

  const int h = blockIdx.y, b = blockIdx.z + p.z0;
  const int hk = divs.group(h), bk = divs.kvb(b);
  const FwdTile tile(p, divs, blockIdx.x);
  const int wg = warpgroup_index();
  if (threadIdx.x == 0) {
    mbar_init(bar_q, 1);
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(bar_k(s), 1);
      mbar_init(bar_v(s), 1);
      mbar_init(bar_e(s), 8);
    }
    mbar_fence_init();
  }
  grid_dependency_wait();
  launch_dependents();  // after the wait: the dK/dV kernel reads its inputs at once
  __syncthreads();
  const int qc[3] = {tile.qs[0] - p.ax[0].q0, tile.qs[1] - p.ax[1].q0, tile.qs[2] - p.ax[2].q0};

  if (wg == 0) {  // ---------------------------------------------------- producer
    regs_dec<40>();
    if (threadIdx.x != 0) return;
    mbar_expect_tx(bar_q, 2 * L::kQBytes);
#pragma unroll
    for (int c = 0; c < HALVES; ++c) {
      tma_load_5d(sQ + c * L::kQHalf, &tq, bar_q, h * D + 64 * c, qc[2], qc[1], qc[0], b);
      tma_load_5d(sDO + c * L::kQHalf, &tdo, bar_q, h * D + 64 * c, qc[2], qc[1], qc[0], b);
    }
    BoxWalk walk;
    for (int it = 0; it < tile.ntiles; ++it, walk.next(tile.nkt)) {
      const int s = it % STAGES;
      if (it >= STAGES) mbar_wait(bar_e(s), ((it / STAGES) & 1) ^ 1);
      int ks[3];
      tile.key_tile(p, walk, ks);
      mbar_expect_tx(bar_k(s), L::kKBytes);
#pragma unroll
      for (int c = 0; c < HALVES; ++c)
        tma_load_5d(sK + s * L::kKBytes + c * L::kKHalf, &tk, bar_k(s), hk * D + 64 * c, ks[2], ks[1], ks[0], bk);
      mbar_expect_tx(bar_v(s), L::kKBytes);
#pragma unroll
      for (int c = 0; c < HALVES; ++c)
        tma_load_5d(sV + s * L::kKBytes + c * L::kKHalf, &tv, bar_v(s), hk * D + 64 * c, ks[2], ks[1], ks[0], bk);
    }
    return;
  }

  // ------------------------------------------------------------------ consumers
  regs_inc<232>();
  const int cw = wg - 1;
  const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int gid = lane / 4, tig = lane % 4;
  const int qsh2 = __ffs(p.ax[2].qt) - 1, qsh1 = __ffs(p.ax[1].qt) - 1;
  const int ksh2 = __ffs(p.ax[2].kt) - 1, ksh1 = __ffs(p.ax[1].kt) - 1;
  // The thread's two query rows: windows, lse (base 2) and delta.
  int wlo[2][3], whi[2][3];
  float lse2[2], dlt[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    int o[3];
    box_coords(64 * cw + 16 * warp + gid + 8 * r, qsh2, qsh1, p.ax[1].qt - 1, p.ax[2].qt - 1, o);
    tile.query_window(p, divs, o, wlo[r], whi[r]);
    int64_t tok;
    const bool ok = tile.query_token(p, o, tok);
    const int64_t at = (b * p.nq + tok) * p.H + h;
    lse2[r] = ok ? p.lse_in[at] * kLog2e : INFINITY;  // padding rows: P = 0
    dlt[r] = ok ? p.delta[at] : 0.f;
  }

  float dq[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dq[i] = 0.f;
  const float sl2 = p.scale_log2;
  const int n = tile.ntiles;  // >= 1: every query sees its own window
  auto release = [&](int stage) {
    __syncwarp();  // every lane is done with the stage
    if (lane == 0) mbar_arrive(bar_e(stage));
  };
  float sc[32], dp[32];
  uint32_t da[4][4];  // dS of the previous key tile as A fragments
  const uint64_t dk0 = desc_sw128(sK, L::kKHalf, 1024);  // K read MN-major, stage 0
  // Key tile `it` (`first`: it = 0). dQ += dS K of the previous tile is issued with
  // S = Q K^T of this one; dP = dO V^T runs under the exponentials of P. No matrix work
  // is in flight across iterations (ptxas serializes wgmma otherwise).
  BoxWalk walk;
  auto step = [&](int it, bool first) {
    const int s = it % STAGES, sp = (it + STAGES - 1) % STAGES;
    const uint32_t phase = (it / STAGES) & 1;
    mbar_wait(bar_k(s), phase);
    wg_fence();
    if (!first) {
      const uint64_t dk = desc_plus(dk0, sp * L::kKBytes);
#pragma unroll
      for (int j = 0; j < 4; ++j) Wgmma<T>::rs(dq, da[j], desc_plus(dk, j * 16 * 128));
    }
    ss_issue<T, D>(sc, sQ + cw * 64 * 128, sK + s * L::kKBytes, L::kQHalf, L::kKHalf);
    int ks[3];
    tile.key_tile(p, walk, ks);
    walk.next(tile.nkt);
#pragma unroll
    for (int a = 0; a < 3; ++a) ks[a] += p.ax[a].kv0;
    const bool full = tile.full_axes(p, ks) == kAllAxes;
    wg_wait<0>();
    reg_fence(sc);
    if (!first) {
      reg_fence(dq);
      frag_fence(da);
      release(sp);
    }
    mbar_wait(bar_v(s), phase);
    ss_issue<T, D>(dp, sDO + cw * 64 * 128, sV + s * L::kKBytes, L::kQHalf, L::kKHalf);
    // P into sc.
    if (full) {
#pragma unroll
      for (int i = 0; i < 32; ++i) sc[i] = fast_exp2(sc[i] * sl2 - lse2[(i >> 1) & 1]);
    } else {
      int lo[2][3];
      unsigned w[2][3];
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int a = 0; a < 3; ++a) {
          lo[r][a] = wlo[r][a] - ks[a];
          w[r][a] = static_cast<unsigned>(whi[r][a] - wlo[r][a]);
        }
      for_each_element<8>(lo, w, ksh2, ksh1, p.ax[1].kt - 1, p.ax[2].kt - 1, tig, [&](int i, bool vis) {
        sc[i] = vis ? fast_exp2(sc[i] * sl2 - lse2[(i >> 1) & 1]) : 0.f;
      });
    }
    wg_wait<0>();
    reg_fence(dp);
    // dS = P (dP - delta), as A fragments for dQ += dS K (K read MN-major).
#pragma unroll
    for (int i = 0; i < 32; ++i) dp[i] = sc[i] * (dp[i] - dlt[(i >> 1) & 1]);
    acc_to_a<T, 4>(dp, da);
  };
  mbar_wait(bar_q, 0);
  step(0, true);
  for (int it = 1; it < n; ++it) step(it, false);
  const int sl = (n - 1) % STAGES;
  wg_fence();
#pragma unroll
  for (int j = 0; j < 4; ++j) Wgmma<T>::rs(dq, da[j], desc_plus(dk0, sl * L::kKBytes + j * 16 * 128));
  wg_commit();
  wg_wait<0>();
  reg_fence(dq);
  frag_fence(da);
  release(sl);

  // dQ = scale * sum dS K: through the (now unused) Q tile and one TMA store.
  acc_to_smem<T, D>(dq, p.scale, gbase + L::kQ, 128, cw, warp, gid, tig);
  fence_proxy_async();
  named_sync(1, 256);
  if (threadIdx.x == 128) {
#pragma unroll
    for (int c = 0; c < HALVES; ++c) tma_store_5d(&tdq, sQ + c * L::kQHalf, h * D + 64 * c, qc[2], qc[1], qc[0], b);
    tma_store_commit_and_wait();
  }
#endif
}

// ------------------------------------------------------------------------- dK/dV
template <int D, int STAGES>
struct DkvLayout {
  static constexpr int kTBytes = 128 * D * 2, kTHalf = 128 * 128;  // K, V, dK, dV tiles
  static constexpr int kQBytes = 64 * D * 2, kQHalf = 64 * 128;     // Q, dO tiles
  static constexpr int kK = 0, kV = kTBytes, kQ = 2 * kTBytes, kDO = kQ + STAGES * kQBytes;
  static constexpr int kPBytes = 64 * 64 * 2;  // one P^T or dS^T tile
  static constexpr int kP = kDO + STAGES * kQBytes;  // [warpgroup][P^T, dS^T]
  static constexpr int kStats = kP + 4 * kPBytes;    // [S][128] floats: lse * log2 e, delta
  static constexpr int kGeo = kStats + STAGES * 512;  // [S][4] ints (3 used; one 16-byte load): the query tile start
  static constexpr int kBars = kGeo + STAGES * 16;       // kvfull, qfull[S], sfull[S], empty[S]
  static constexpr size_t smem_bytes() { return kBars + 8 * (1 + 3 * STAGES) + 1024; }
};

// The queries (in [a, b]) that see key j on one axis of the Hopper path (group 0,
// dilation 1), in closed form: windows are monotone in the query, a non-causal window
// depends on the query only through its stride group's leader (window(): c =
// clamp(leader, wl, L - 1 - wr), keys [c - wl, c + wr], with wl = window_left(k) and
// wr = window_right(k)), a causal one is [max(leader - k + 1, 0), q].
// A binary search over window() gave the same answers (each of its 15-odd
// steps divides by the stride), but in the dK/dV kernel, where every thread runs 4 per
// axis for the tile and 4 per axis for its two key rows, it was most of the prologue.
// tests/sm90_geometry_driver.cu checks both against that search and a brute force.
//
// Both take the stride's division from `sd` (FastDiv(x.s), TileDivs::s).
// First query whose window ends at or after key j; b + 1 if none.
GNA_HD int first_reaching(const Axis& x, const FastDiv& sd, int a, int b, int j) {
  int q;
  if (x.causal) {
    q = j;  // the window ends at the query
  } else {
    const int wl = window_left(x.k), wr = window_right(x.k);
    const int t = j - wr;  // needs c >= t
    if (t <= wl) {
      q = a;  // c >= wl: every window
    } else if (t > x.L - 1 - wr) {
      q = b + 1;  // c <= L - 1 - wr: none
    } else {  // leader = min(g s + s / 2, L - 1) >= t, and L - 1 >= t
      const int u = t - x.s / 2;
      q = u > 0 ? sd(u + x.s - 1) * x.s : 0;
    }
  }
  q = q > a ? q : a;
  return q > b ? b + 1 : q;
}
// Last query whose window starts at or before key j; a - 1 if none.
GNA_HD int last_reaching(const Axis& x, const FastDiv& sd, int a, int b, int j) {
  int q;
  if (j < 0) {
    q = a - 1;  // windows start at 0 or later
  } else if (x.causal) {  // lo <= j  <=>  leader = min(g s + s - 1, L - 1) <= j + k - 1
    const int u = j + x.k - 1;
    if (x.L - 1 <= u) q = b;
    else q = u - x.s + 1 >= 0 ? sd(u - x.s + 1) * x.s + x.s - 1 : a - 1;
  } else {
    const int wl = window_left(x.k), wr = window_right(x.k);
    const int u = j + wl;  // needs c <= u, where wl <= u
    if (u >= x.L - 1 - wr) {
      q = b;  // every window
    } else {  // leader = min(g s + s / 2, L - 1) <= u, and L - 1 > u
      const int v = u - x.s / 2;
      q = v >= 0 ? sd(v) * x.s + x.s - 1 : a - 1;
    }
  }
  q = q < b ? q : b;
  return q < a ? a - 1 : q;
}

// Per-CTA geometry of the dK/dV kernel: the key tile and the box of query tiles
// (query-block local tile indices) whose queries see some of its keys.
struct KeyTile {
  int ks[3], ke[3];      // first / last valid key (global) per axis
  int qt0[3], nqt[3];    // first query tile and count per axis (0 counts: no queries)
  int fa[3], fb[3];      // the queries that see every valid key of the tile: [fa, fb]
  int ntiles;
  GNA_HD KeyTile(const Params& p, const TileDivs& v, int bid) {
    ntiles = 1;
#pragma unroll
    for (int a = 2; a >= 0; --a) {
      const Axis& x = p.ax[a];
      const int r = v.nkt[a](bid);
      const int t = bid - r * x.nkt;
      bid = r;
      ks[a] = x.kv0 + t * x.kt;
      ke[a] = (ks[a] + x.kt < x.kv0 + x.kvn ? ks[a] + x.kt : x.kv0 + x.kvn) - 1;
      const int qa = first_reaching(x, v.s[a], x.q0, x.q0 + x.qn - 1, ks[a]);
      const int qb = last_reaching(x, v.s[a], x.q0, x.q0 + x.qn - 1, ke[a]);
      // Monotone windows: hi(q) >= ke from fa on, lo(q) <= ks up to fb.
      fa[a] = first_reaching(x, v.s[a], x.q0, x.q0 + x.qn - 1, ke[a]);
      fb[a] = last_reaching(x, v.s[a], x.q0, x.q0 + x.qn - 1, ks[a]);
      if (qa > qb) {
        qt0[a] = 0;
        nqt[a] = 0;
      } else {  // q0 <= qa <= qb
        qt0[a] = (qa - x.q0) >> v.qsh[a];
        nqt[a] = ((qb - x.q0) >> v.qsh[a]) - qt0[a] + 1;
      }
      ntiles *= nqt[a];
    }
  }
  // Query-block local start of query tile `t` of the box, per axis.
  GNA_HD void query_tile(const Params& p, int t, int qs[3]) const {
    const int i2 = t % nqt[2];
    const int r = t / nqt[2];
    qs[0] = (qt0[0] + r / nqt[1]) * p.ax[0].qt;
    qs[1] = (qt0[1] + r % nqt[1]) * p.ax[1].qt;
    qs[2] = (qt0[2] + i2) * p.ax[2].qt;
  }
  // The same for the walk's current tile.
  GNA_HD void query_tile(const Params& p, const BoxWalk& w, int qs[3]) const {
#pragma unroll
    for (int a = 0; a < 3; ++a) qs[a] = (qt0[a] + w.i[a]) * p.ax[a].qt;
  }
  // Whether every query of the query tile that starts at global `qs` (the valid ones)
  // sees every valid key of this tile: their windows all contain [ks, ke].
  GNA_HD bool full(const Params& p, const int qs[3]) const {
    bool f = true;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      const Axis& x = p.ax[a];
      const int qe = (qs[a] + x.qt < x.q0 + x.qn ? qs[a] + x.qt : x.q0 + x.qn) - 1;
      f &= qs[a] >= fa[a] && qe <= fb[a];
    }
    return f;
  }
};

// The dK/dV grid's block order (built on the host): block x takes key tile tile[x], the
// key tiles by descending step count (KeyTile::ntiles, the query tiles visited), ties in
// tile order. Windows clamped at the ends of the block give the key tiles there more or
// fewer steps than the interior's (1-D, window 2048, stride 256: 16 to 48 against 32), and
// in tile order the heavy ones at the end start in the grid's last wave; heaviest first
// evens out when the SMs finish. n = 0: tile order (grids of more than kMaxOrder key tiles,
// and the launch's choice on grids of many waves: gna_sm90.cu, dkv_heaviest_first). The
// launch takes it from a cache (cached_dkv_order); the geometry driver checks it.
constexpr int kMaxOrder = 1024;
struct TileOrder {
  int n;
  uint16_t tile[kMaxOrder];
};

// The order for a problem whose key tiling is in `pk` (apply_plan), `nk` key tiles.
inline void dkv_order(const Params& pk, int64_t nk, TileOrder& order) {
  order.n = 0;
  if (nk > kMaxOrder) return;
  std::vector<std::pair<int, int>> w;  // (-steps, tile)
  w.reserve(static_cast<size_t>(nk));
  const TileDivs v = tile_divs(pk);
  for (int t = 0; t < static_cast<int>(nk); ++t) w.emplace_back(-KeyTile(pk, v, t).ntiles, t);
  std::sort(w.begin(), w.end());
  for (int i = 0; i < static_cast<int>(nk); ++i) order.tile[i] = static_cast<uint16_t>(w[i].second);
  order.n = static_cast<int>(nk);
}

template <typename T, int D, int STAGES>
__global__ void __launch_bounds__(kThreads, 1)
    dkv_sm90_kernel(const __grid_constant__ Params p, const __grid_constant__ CUtensorMap tq,
                    const __grid_constant__ CUtensorMap tk, const __grid_constant__ CUtensorMap tv,
                    const __grid_constant__ CUtensorMap tdo, const __grid_constant__ CUtensorMap tdk,
                    const __grid_constant__ CUtensorMap tdv, const __grid_constant__ TileOrder order,
                    const __grid_constant__ TileDivs divs) {
#if defined(GNA_SM90_ENABLED)
  using L = DkvLayout<D, STAGES>;
  constexpr int HALVES = D / 64;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t sbase = (saddr(smem_raw) + 1023) & ~1023u;
  unsigned char* gbase = smem_raw + (sbase - saddr(smem_raw));
  const uint32_t sK = sbase + L::kK, sV = sbase + L::kV, sQ = sbase + L::kQ, sDO = sbase + L::kDO;
  float* stats = reinterpret_cast<float*>(gbase + L::kStats);
  int* geo = reinterpret_cast<int*>(gbase + L::kGeo);
  const uint32_t bar_kv = sbase + L::kBars;
  auto bar_q = [&](int s) { return bar_kv + 8 * (1 + s); };
  auto bar_s = [&](int s) { return bar_kv + 8 * (1 + STAGES + s); };
  auto bar_e = [&](int s) { return bar_kv + 8 * (1 + 2 * STAGES + s); };

  // dK / dV are stored at batch b, summed over query batches b * dkvb ... + dkvb - 1
  const int hk = blockIdx.y, b = blockIdx.z + p.z0, b0 = b * p.dkvb, bk = divs.kvb(b0);
  const int G = p.H / p.Hkv;  // query heads per key/value head
  const KeyTile tile(p, divs, order.n ? order.tile[blockIdx.x] : blockIdx.x);
  const int nsteps = p.dkvb * G * tile.ntiles;  // query batch, head, query tile
  const int wg = threadIdx.x / 128;  // not warpgroup_index(): with it ptxas spills here
  if (threadIdx.x == 0) {
    mbar_init(bar_kv, 1);
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(bar_q(s), 1);
      mbar_init(bar_s(s), 32);  // every lane of the producer warp stages lse/delta
      mbar_init(bar_e(s), 8);
    }
    mbar_fence_init();
  }
  launch_dependents();
  __syncthreads();
  const int kc[3] = {tile.ks[0] - p.ax[0].kv0, tile.ks[1] - p.ax[1].kv0, tile.ks[2] - p.ax[2].kv0};
  const int qsh2 = __ffs(p.ax[2].qt) - 1, qsh1 = __ffs(p.ax[1].qt) - 1;

  if (wg == 0) {  // ---------------------------------------------------- producer
    regs_dec<24>();
    if (threadIdx.x >= 32) return;
    const int lane = threadIdx.x;
    if (lane == 0) {
      mbar_expect_tx(bar_kv, 2 * L::kTBytes);
#pragma unroll
      for (int c = 0; c < HALVES; ++c) {
        tma_load_5d(sK + c * L::kTHalf, &tk, bar_kv, hk * D + 64 * c, kc[2], kc[1], kc[0], bk);
        tma_load_5d(sV + c * L::kTHalf, &tv, bar_kv, hk * D + 64 * c, kc[2], kc[1], kc[0], bk);
      }
    }
    BoxWalk walk;
    for (int it = 0; it < nsteps; ++it, walk.next(tile.nqt)) {
      const int s = it % STAGES;
      if (it >= STAGES) mbar_wait(bar_e(s), ((it / STAGES) & 1) ^ 1);
      const int hq = it / tile.ntiles, hb = divs.group(hq);  // hq < dkvb * G; hb = hq / G
      const int h = hk * G + hq - hb * G, bq = b0 + hb;
      int qs[3];
      tile.query_tile(p, walk, qs);
      if (lane == 0) {
        mbar_expect_tx(bar_q(s), 2 * L::kQBytes);
#pragma unroll
        for (int c = 0; c < HALVES; ++c) {
          tma_load_5d(sQ + s * L::kQBytes + c * L::kQHalf, &tq, bar_q(s), h * D + 64 * c, qs[2], qs[1], qs[0], bq);
          tma_load_5d(sDO + s * L::kQBytes + c * L::kQHalf, &tdo, bar_q(s), h * D + 64 * c, qs[2], qs[1], qs[0], bq);
        }
      }
      // lse (base 2) and delta of the tile's 64 queries; padding queries get P = 0.
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const int m = lane + 32 * k;
        int o[3];
        box_coords(m, qsh2, qsh1, p.ax[1].qt - 1, p.ax[2].qt - 1, o);
        bool ok = true;
        int64_t tok = 0;
#pragma unroll
        for (int a = 0; a < 3; ++a) {
          const int il = qs[a] + o[a];
          ok &= il < p.ax[a].qn;
          tok = tok * p.ax[a].qn + il;
        }
        const int64_t at = (bq * p.nq + tok) * p.H + h;
        stats[s * 128 + m] = ok ? p.lse_in[at] * kLog2e : INFINITY;
        stats[s * 128 + 64 + m] = ok ? p.delta[at] : 0.f;
      }
      if (lane == 0) {  // the step's query tile, so the consumers keep no walk
#pragma unroll
        for (int a = 0; a < 3; ++a) geo[4 * s + a] = qs[a] + p.ax[a].q0;
      }
      mbar_arrive(bar_s(s));
    }
    // This block ends only after the kernel ahead of it (dQ) has: see grid_dependency_wait.
    if (lane == 0) grid_dependency_wait();
    return;
  }

  // ------------------------------------------------------------------ consumers
  regs_inc<240>();
  const int cw = wg - 1;
  const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int gid = lane / 4, tig = lane % 4;
  const int ksh2 = __ffs(p.ax[2].kt) - 1, ksh1 = __ffs(p.ax[1].kt) - 1;
  // The thread's two key rows: per axis, the queries that see the key (an interval).
  int qlo[2][3], qhi[2][3];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    int o[3];
    box_coords(64 * cw + 16 * warp + gid + 8 * r, ksh2, ksh1, p.ax[1].kt - 1, p.ax[2].kt - 1, o);
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      const Axis& x = p.ax[a];
      const int j = tile.ks[a] + o[a];
      qlo[r][a] = first_reaching(x, divs.s[a], x.q0, x.q0 + x.qn - 1, j);
      qhi[r][a] = last_reaching(x, divs.s[a], x.q0, x.q0 + x.qn - 1, j);
      if (qhi[r][a] < qlo[r][a]) qlo[r][a] = qhi[r][a] = 1 << 30;  // none: never inside a query tile
    }
  }

  float dk[D / 2], dv[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dk[i] = dv[i] = 0.f;
  const float sl2 = p.scale_log2;
  float st[32], dpt[32];  // S^T, dP^T: 64 keys (rows) x 64 queries (columns)
  auto release = [&](int stage) {
    __syncwarp();  // every lane is done with the stage (and its lse/delta)
    if (lane == 0) mbar_arrive(bar_e(stage));
  };
  // P^T and dS^T of a step go to this warpgroup's shared-memory tiles, and dV += P^T dO,
  // dK += dS^T Q are SS products issued after the next step's S^T and dP^T: no A
  // fragments stay in registers, so dP^T is issued with S^T, without a wait before it.
  const int cwu = warpgroup_index() - 1;  // warp-uniform: the descriptors below go to uniform registers
  const uint32_t sP = sbase + L::kP + cwu * 2 * L::kPBytes;
  unsigned char* gP = gbase + L::kP + cw * 2 * L::kPBytes;
  auto issue_dkv = [&](int s) {
    const uint64_t ddo = desc_sw128(sDO + s * L::kQBytes, L::kQHalf, 1024);
    const uint64_t dq = desc_sw128(sQ + s * L::kQBytes, L::kQHalf, 1024);
    const uint64_t dp = desc_sw128(sP, 16, 1024), ds = desc_sw128(sP + L::kPBytes, 16, 1024);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      Wgmma<T>::ss_tb(dv, desc_plus(dp, 32 * j), desc_plus(ddo, j * 16 * 128));
      Wgmma<T>::ss_tb(dk, desc_plus(ds, 32 * j), desc_plus(dq, j * 16 * 128));
    }
    wg_commit();
  };
  // Step `it`: S^T, dP^T and the previous step's dV/dK in three commit groups; P^T runs
  // under dP^T, dS^T under dV/dK; every group retires in the step that issued it.
  auto step = [&](int it, bool first) {
    const int s = it % STAGES, sp = (it + STAGES - 1) % STAGES;
    const uint32_t phase = (it / STAGES) & 1;
    mbar_wait(bar_q(s), phase);
    ss_issue<T, D>(st, sK + cw * 64 * 128, sQ + s * L::kQBytes, L::kTHalf, L::kQHalf);
    ss_issue<T, D>(dpt, sV + cw * 64 * 128, sDO + s * L::kQBytes, L::kTHalf, L::kQHalf);
    if (!first) issue_dkv(sp);
    mbar_wait(bar_s(s), phase);
    const float* sl = stats + s * 128;
    const int* g = geo + 4 * s;  // global start of the query tile
    if (first) wg_wait<1>();
    else wg_wait<2>();
    reg_fence(st);
    auto p_of = [&](int i, bool vis) {
      st[i] = vis ? fast_exp2(st[i] * sl2 - sl[8 * (i >> 2) + 2 * tig + (i & 1)]) : 0.f;
    };
    if (tile.full(p, g)) {
#pragma unroll
      for (int i = 0; i < 32; ++i) p_of(i, true);
    } else {
      int lo[2][3];
      unsigned w[2][3];
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int a = 0; a < 3; ++a) {
          lo[r][a] = qlo[r][a] - g[a];
          w[r][a] = static_cast<unsigned>(qhi[r][a] - qlo[r][a]);
        }
      for_each_element<8>(lo, w, qsh2, qsh1, p.ax[1].qt - 1, p.ax[2].qt - 1, tig, p_of);
    }
    if (first) wg_wait<0>();
    else wg_wait<1>();
    reg_fence(dpt);
#pragma unroll
    for (int i = 0; i < 32; ++i) dpt[i] = st[i] * (dpt[i] - sl[64 + 8 * (i >> 2) + 2 * tig + (i & 1)]);
    if (!first) {
      wg_wait<0>();  // the previous dV/dK read this warpgroup's P^T and dS^T tiles
      reg_fence(dv);
      reg_fence(dk);
      release(sp);
    }
    acc_to_smem<T, 64>(st, 1.f, gP, 64, 0, warp, gid, tig);  // 64 x 64 tiles: one 64-column half
    acc_to_smem<T, 64>(dpt, 1.f, gP + L::kPBytes, 64, 0, warp, gid, tig);
    fence_proxy_async();
    named_sync(2 + cw, 128);  // the whole warpgroup's tiles are written
  };

  mbar_wait(bar_kv, 0);  // also before the epilogue overwrites K and V when nsteps = 0
  if (nsteps > 0) {
    step(0, true);
    for (int it = 1; it < nsteps; ++it) step(it, false);
    wg_fence();
    issue_dkv((nsteps - 1) % STAGES);
    wg_wait<0>();
    reg_fence(dv);
    reg_fence(dk);
    release((nsteps - 1) % STAGES);
  }

  // dK = scale * sum dS^T Q, dV: through the K and V tiles (each warpgroup overwrites
  // only the rows it read) and TMA stores that drop rows outside the key block.
  acc_to_smem<T, D>(dk, p.scale, gbase + L::kK, 128, cw, warp, gid, tig);
  acc_to_smem<T, D>(dv, 1.f, gbase + L::kV, 128, cw, warp, gid, tig);
  fence_proxy_async();
  named_sync(1, 256);
  if (threadIdx.x == 128) {
#pragma unroll
    for (int c = 0; c < HALVES; ++c) {
      tma_store_5d(&tdk, sK + c * L::kTHalf, hk * D + 64 * c, kc[2], kc[1], kc[0], b);
      tma_store_5d(&tdv, sV + c * L::kTHalf, hk * D + 64 * c, kc[2], kc[1], kc[0], b);
    }
    tma_store_commit_and_wait();
  }
#endif
}

}  // namespace sm90
}  // namespace gna
