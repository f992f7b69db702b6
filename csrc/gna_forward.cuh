// Forward kernel: O and LSE.
//
// One CTA (4 warps) per (query tile, head, batch). A query tile is a box of 64
// queries in group coordinates (see gna_problem.h); warp w owns rows 16w..16w+15.
// The CTA walks the box of keys that the tile's windows reach, [lo(first), hi(last)]
// per axis, flattened row-major into chunks of KN keys. A chunk whose keys are all
// inside every query's window (the intersection box [lo(last), hi(first)]) skips
// the element-wise mask; the others evaluate the exact GNA predicate per element.
// Online softmax in base 2 with fp32 accumulation; fully masked rows are safe.
#pragma once
#include <cfloat>
#include "gna_tile.cuh"

namespace gna {


// K/V chunks are double-buffered (the next chunk's cp.async runs under this chunk's
// math). Q fragments stay in registers for 16-bit types up to head dim 128.
template <typename T, int DP, int KN>
struct FwdCfg {
  static constexpr int QM = 64, NT = 128;
  static constexpr int LD = DP + 16 / sizeof(T);
  static constexpr bool kQInRegs = sizeof(T) == 2 && DP <= 128;
  static constexpr size_t smem_bytes() {
    return sizeof(T) * (QM + 4 * KN) * LD + sizeof(int64_t) * (QM + 2 * KN) + sizeof(int) * 6 * KN;
  }
};

// Key rows of chunk c0 (flat index into the key box) for the CTA's groups: token
// offsets (-1 past the end) and group coordinates (-1 past the end).
__device__ __forceinline__ void key_chunk_rows(const Params& p, const int g[3], const int klo[3],
                                               const int kext[3], int64_t nk, int64_t c0, int KN,
                                               int64_t* tok, int* kc) {
  const int tid = threadIdx.x;
  if (tid < KN) {
    const int64_t n = c0 + tid;
    if (n < nk) {
      int o[3], jg[3];
      unflatten(n, kext, o);
#pragma unroll
      for (int a = 0; a < 3; ++a) { jg[a] = klo[a] + o[a]; kc[a * KN + tid] = jg[a]; }
      tok[tid] = token_of(p, g, jg, true);
    } else {
      tok[tid] = -1;
#pragma unroll
      for (int a = 0; a < 3; ++a) kc[a * KN + tid] = -1;
    }
  }
}

// Decode a CTA's query tile. Returns false for an empty tile.
__device__ __forceinline__ bool query_tile(const Params& p, int64_t bid, int g[3], int qs[3], int qe[3]) {
  int t[3];
#pragma unroll
  for (int a = 2; a >= 0; --a) {
    const int n = p.ax[a].d * p.ax[a].nqt;
    t[a] = static_cast<int>(bid % n);
    bid /= n;
  }
  bool ok = true;
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    const Axis& x = p.ax[a];
    ok &= tile_of(t[a], x.qt, x.nqt, x.q0, x.qn, x.d, g[a], qs[a], qe[a]);
  }
  return ok;
}

template <typename T, int DP, int KN>
__global__ void __launch_bounds__(128) fwd_kernel(const Params p) {
  using C = FwdCfg<T, DP, KN>;
  using M = Mma<T>;
  constexpr int QM = C::QM, NT = C::NT, LD = C::LD;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sKbuf = sQ + QM * LD;           // [2][KN][LD]
  T* sVbuf = sKbuf + 2 * KN * LD;    // [2][KN][LD]
  int64_t* sQtok = reinterpret_cast<int64_t*>(sVbuf + 2 * KN * LD);
  int64_t* sKtokbuf = sQtok + QM;    // [2][KN]
  int* sKcbuf = reinterpret_cast<int*>(sKtokbuf + 2 * KN);  // [2][3][KN] key group coordinates

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gid = lane >> 2, tig = lane & 3;
  const int h = blockIdx.y, b = blockIdx.z + p.z0;
  const int hk = h / (p.H / p.Hkv);

  int g[3], qs[3], qe[3];
  if (!query_tile(p, blockIdx.x, g, qs, qe)) return;
  const int tq[3] = {p.ax[0].qt, p.ax[1].qt, p.ax[2].qt};

  // Key box reached by the tile, and the box every query of the tile sees.
  int klo[3], kext[3], ilo[3], ihi[3];
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    int lo0, hi0, lo1, hi1;
    window(p.ax[a], g[a], qs[a], lo0, hi0);
    window(p.ax[a], g[a], qe[a], lo1, hi1);
    klo[a] = lo0;
    kext[a] = hi1 - lo0 + 1;
    ilo[a] = lo1;
    ihi[a] = hi0;
  }
  const int64_t nk = static_cast<int64_t>(kext[0]) * kext[1] * kext[2];

  // Query rows of the tile.
  if (tid < QM) {
    int o[3], ig[3];
    unflatten(tid, tq, o);
    bool ok = true;
#pragma unroll
    for (int a = 0; a < 3; ++a) { ig[a] = qs[a] + o[a]; ok &= ig[a] <= qe[a]; }
    sQtok[tid] = ok ? token_of(p, g, ig, false) : -1;
  }
  // This thread's two query rows: windows per axis (empty for padding rows).
  int wlo[2][3], whi[2][3];
  bool rvalid[2];
  int64_t rtok[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    int o[3];
    unflatten(warp * 16 + gid + 8 * r, tq, o);
    bool ok = true;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      const int ig = qs[a] + o[a];
      ok &= ig <= qe[a];
      window(p.ax[a], g[a], ig, wlo[r][a], whi[r][a]);
    }
    rvalid[r] = ok;
    if (!ok) { wlo[r][0] = 1; whi[r][0] = 0; }
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < 2; ++r) rtok[r] = sQtok[warp * 16 + gid + 8 * r];

  const T* qbase = static_cast<const T*>(p.q) + b * p.q_b + static_cast<int64_t>(h) * p.D;
  const int bk = b / p.kvb;
  const T* kbase = static_cast<const T*>(p.k) + bk * p.k_b + static_cast<int64_t>(hk) * p.D;
  const T* vbase = static_cast<const T*>(p.v) + bk * p.v_b + static_cast<int64_t>(hk) * p.Dv;
  load_rows<T, DP, QM, NT>(sQ, LD, qbase, sQtok, p.q_tok, p.D);
  cp_async_commit();

  float o_acc[DP / 8][4];
#pragma unroll
  for (int n = 0; n < DP / 8; ++n) o_acc[n][0] = o_acc[n][1] = o_acc[n][2] = o_acc[n][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

  // Prologue: chunk 0 in flight.
  key_chunk_rows(p, g, klo, kext, nk, 0, KN, sKtokbuf, sKcbuf);
  __syncthreads();
  load_rows<T, DP, KN, NT>(sKbuf, LD, kbase, sKtokbuf, p.k_tok, p.D);
  load_rows<T, DP, KN, NT>(sVbuf, LD, vbase, sKtokbuf, p.v_tok, p.Dv);
  cp_async_commit();

  uint32_t qf[C::kQInRegs ? DP / M::K : 1][4];
  if constexpr (C::kQInRegs) {  // Q (the older group) has landed: keep its fragments
    cp_async_wait<1>();
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < DP / M::K; ++kk) M::load_a(sQ, LD, warp * 16, kk * M::K, qf[kk]);
  }
  int buf = 0;
  for (int64_t c0 = 0; c0 < nk; c0 += KN, buf ^= 1) {
    const T* sK = sKbuf + buf * KN * LD;
    const T* sV = sVbuf + buf * KN * LD;
    const int* sKc = sKcbuf + buf * 3 * KN;
    if (c0 + KN < nk) {  // prefetch the next chunk into the other buffer
      key_chunk_rows(p, g, klo, kext, nk, c0 + KN, KN, sKtokbuf + (buf ^ 1) * KN, sKcbuf + (buf ^ 1) * 3 * KN);
      __syncthreads();
      load_rows<T, DP, KN, NT>(sKbuf + (buf ^ 1) * KN * LD, LD, kbase, sKtokbuf + (buf ^ 1) * KN, p.k_tok, p.D);
      load_rows<T, DP, KN, NT>(sVbuf + (buf ^ 1) * KN * LD, LD, vbase, sKtokbuf + (buf ^ 1) * KN, p.v_tok, p.Dv);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    bool full = c0 + KN <= nk;
    {
      int lo[3], hi[3];
      chunk_cover(c0, c0 + KN - 1, kext, lo, hi);
#pragma unroll
      for (int a = 0; a < 3; ++a) full &= (klo[a] + lo[a] >= ilo[a]) && (klo[a] + hi[a] <= ihi[a]);
    }

    float s[KN / 8][4];
#pragma unroll
    for (int n = 0; n < KN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < DP / M::K; ++kk) {
      uint32_t af[4];
      if constexpr (C::kQInRegs) {
#pragma unroll
        for (int i = 0; i < 4; ++i) af[i] = qf[C::kQInRegs ? kk : 0][i];
      } else {
        M::load_a(sQ, LD, warp * 16, kk * M::K, af);
      }
#pragma unroll
      for (int n = 0; n < KN / 8; ++n) {
        uint32_t bf[2];
        M::load_b_nk(sK, LD, n * 8, kk * M::K, bf);
        M::mma(s[n], af, bf);
      }
    }
#pragma unroll
    for (int n = 0; n < KN / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[n][e] * p.scale_log2;
        if (!full) {
          const int r = e >> 1, col = n * 8 + 2 * tig + (e & 1);
          bool vis = true;
#pragma unroll
          for (int a = 0; a < 3; ++a) {
            const int j = sKc[a * KN + col];
            vis &= (j >= wlo[r][a]) && (j <= whi[r][a]);
          }
          x = vis ? x : -INFINITY;
        }
        s[n][e] = x;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < KN / 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[r], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(m_run[r] - m_use);
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < KN / 8; ++n) {
        s[n][2 * r] = exp2f(s[n][2 * r] - m_use);
        s[n][2 * r + 1] = exp2f(s[n][2 * r + 1] - m_use);
        sum += s[n][2 * r] + s[n][2 * r + 1];
      }
      l_run[r] = l_run[r] * alpha + sum;
      m_run[r] = m_new;
#pragma unroll
      for (int n = 0; n < DP / 8; ++n) { o_acc[n][2 * r] *= alpha; o_acc[n][2 * r + 1] *= alpha; }
    }
#pragma unroll
    for (int ks = 0; ks < KN / M::K; ++ks) {
      uint32_t af[4];
      M::a_from_acc(s, ks, af);
#pragma unroll
      for (int n = 0; n < DP / 8; n += 2) {
        uint32_t bf[2][2];
        M::load_b_kn2(sV, LD, ks * M::K, n * 8, bf);
        M::mma(o_acc[n], af, bf[0]);
        M::mma(o_acc[n + 1], af, bf[1]);
      }
    }
    __syncthreads();  // this buffer is refilled two chunks from now
  }

  T* obase = static_cast<T*>(p.o) + b * p.o_b + static_cast<int64_t>(h) * p.Dv;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (!rvalid[r]) continue;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    T* orow = obase + rtok[r] * p.o_tok;
#pragma unroll
    for (int n = 0; n < DP / 8; ++n) {
      const int col = n * 8 + 2 * tig;
      if (col < p.Dv) store2<T>(orow + col, o_acc[n][2 * r] * inv, o_acc[n][2 * r + 1] * inv);
    }
    if (tig == 0) {
      const float lse = l > 0.f ? m_run[r] * 0.69314718055994531f + logf(l) : -INFINITY;
      p.lse[(b * p.nq + rtok[r]) * p.H + h] = lse;
    }
  }
}

}  // namespace gna
