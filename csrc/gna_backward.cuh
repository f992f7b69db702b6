// Backward kernels, deterministic (no atomics): dQ with query tiles outer, dK/dV
// with key tiles outer.
//
// Inputs: Q, K, V, dO, LSE and delta = rowsum(dO * O) - dLSE (fp32, from JAX), so
//   P = exp(scale * QK^T - LSE),  dP = dO V^T,  dS = P * (dP - delta),
//   dQ = scale * dS K,  dK = scale * dS^T Q,  dV = P^T dO.
// The dQ pass walks key chunks exactly like the forward. The dK/dV pass takes a
// box of 64 keys (same tile shapes, group coordinates), finds per axis the interval
// of queries whose windows reach it (binary search on the monotone window bounds),
// and walks that query box in chunks of QN, for every query head of its KV head
// (GQA sums happen in registers, in a fixed order).
#pragma once
#include "gna_forward.cuh"

namespace gna {

template <typename T, int DP, int KN>
struct DqCfg {  // K/V chunks double-buffered like the forward
  static constexpr int QM = 64, NT = 128;
  static constexpr int LD = DP + 16 / sizeof(T);
  static constexpr size_t smem_bytes() {
    return sizeof(T) * (2 * QM + 4 * KN) * LD + sizeof(int64_t) * (QM + 2 * KN) + sizeof(int) * 6 * KN;
  }
};

template <typename T, int DP, int KN>
__global__ void __launch_bounds__(128) dq_kernel(const Params p) {
  using C = DqCfg<T, DP, KN>;
  using M = Mma<T>;
  constexpr int QM = C::QM, NT = C::NT, LD = C::LD;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + QM * LD;
  T* sKbuf = sdO + QM * LD;          // [2][KN][LD]
  T* sVbuf = sKbuf + 2 * KN * LD;    // [2][KN][LD]
  int64_t* sQtok = reinterpret_cast<int64_t*>(sVbuf + 2 * KN * LD);
  int64_t* sKtokbuf = sQtok + QM;    // [2][KN]
  int* sKcbuf = reinterpret_cast<int*>(sKtokbuf + 2 * KN);  // [2][3][KN]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gid = lane >> 2, tig = lane & 3;
  const int h = blockIdx.y, b = blockIdx.z + p.z0;
  const int hk = h / (p.H / p.Hkv);

  int g[3], qs[3], qe[3];
  if (!query_tile(p, blockIdx.x, g, qs, qe)) return;
  const int tq[3] = {p.ax[0].qt, p.ax[1].qt, p.ax[2].qt};
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

  if (tid < QM) {
    int o[3], ig[3];
    unflatten(tid, tq, o);
    bool ok = true;
#pragma unroll
    for (int a = 0; a < 3; ++a) { ig[a] = qs[a] + o[a]; ok &= ig[a] <= qe[a]; }
    sQtok[tid] = ok ? token_of(p, g, ig, false) : -1;
  }
  int wlo[2][3], whi[2][3];
  bool rvalid[2];
  int64_t rtok[2];
  float lse2[2], dlt[2];
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
  for (int r = 0; r < 2; ++r) {
    rtok[r] = sQtok[warp * 16 + gid + 8 * r];
    if (rvalid[r]) {
      const int64_t i = (b * p.nq + rtok[r]) * p.H + h;
      lse2[r] = p.lse_in[i] * 1.4426950408889634f;
      dlt[r] = p.delta[i];
    } else {
      lse2[r] = 0.f;
      dlt[r] = 0.f;
    }
  }

  const T* qbase = static_cast<const T*>(p.q) + b * p.q_b + static_cast<int64_t>(h) * p.D;
  const T* dobase = static_cast<const T*>(p.dout) + b * p.o_b + static_cast<int64_t>(h) * p.Dv;
  const int bk = b / p.kvb;  // the key/value batch this query batch reads
  const T* kbase = static_cast<const T*>(p.k) + bk * p.k_b + static_cast<int64_t>(hk) * p.D;
  const T* vbase = static_cast<const T*>(p.v) + bk * p.v_b + static_cast<int64_t>(hk) * p.Dv;
  load_rows<T, DP, QM, NT>(sQ, LD, qbase, sQtok, p.q_tok, p.D);
  load_rows<T, DP, QM, NT>(sdO, LD, dobase, sQtok, p.o_tok, p.Dv);
  cp_async_commit();

  float dq[DP / 8][4];
#pragma unroll
  for (int n = 0; n < DP / 8; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;

  key_chunk_rows(p, g, klo, kext, nk, 0, KN, sKtokbuf, sKcbuf);
  __syncthreads();
  load_rows<T, DP, KN, NT>(sKbuf, LD, kbase, sKtokbuf, p.k_tok, p.D);
  load_rows<T, DP, KN, NT>(sVbuf, LD, vbase, sKtokbuf, p.v_tok, p.Dv);
  cp_async_commit();

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

    float s[KN / 8][4], dp[KN / 8][4];
#pragma unroll
    for (int n = 0; n < KN / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < DP / M::K; ++kk) {
      uint32_t aq[4], ao[4];
      M::load_a(sQ, LD, warp * 16, kk * M::K, aq);
      M::load_a(sdO, LD, warp * 16, kk * M::K, ao);
#pragma unroll
      for (int n = 0; n < KN / 8; ++n) {
        uint32_t bf[2];
        M::load_b_nk(sK, LD, n * 8, kk * M::K, bf);
        M::mma(s[n], aq, bf);
        M::load_b_nk(sV, LD, n * 8, kk * M::K, bf);
        M::mma(dp[n], ao, bf);
      }
    }
#pragma unroll
    for (int n = 0; n < KN / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        float pr = exp2f(s[n][e] * p.scale_log2 - lse2[r]);
        if (!full) {
          const int col = n * 8 + 2 * tig + (e & 1);
          bool vis = true;
#pragma unroll
          for (int a = 0; a < 3; ++a) {
            const int j = sKc[a * KN + col];
            vis &= (j >= wlo[r][a]) && (j <= whi[r][a]);
          }
          pr = vis ? pr : 0.f;
        }
        s[n][e] = pr * (dp[n][e] - dlt[r]);  // dS
      }
    }
#pragma unroll
    for (int ks = 0; ks < KN / M::K; ++ks) {
      uint32_t af[4];
      M::a_from_acc(s, ks, af);
#pragma unroll
      for (int n = 0; n < DP / 8; n += 2) {
        uint32_t bf[2][2];
        M::load_b_kn2(sK, LD, ks * M::K, n * 8, bf);
        M::mma(dq[n], af, bf[0]);
        M::mma(dq[n + 1], af, bf[1]);
      }
    }
    __syncthreads();  // this buffer is refilled two chunks from now
  }

  T* dqbase = static_cast<T*>(p.dq) + b * p.q_b + static_cast<int64_t>(h) * p.D;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (!rvalid[r]) continue;
    T* row = dqbase + rtok[r] * p.q_tok;
#pragma unroll
    for (int n = 0; n < DP / 8; ++n) {
      const int col = n * 8 + 2 * tig;
      if (col < p.D) store2<T>(row + col, dq[n][2 * r] * p.scale, dq[n][2 * r + 1] * p.scale);
    }
  }
}

// ---------------------------------------------------------------------------
// dK / dV. MODE bit 1: dK, bit 2: dV (large head dims run the two as separate
// launches to stay in registers).
// ---------------------------------------------------------------------------

template <typename T, int DP, int QN>
struct DkvCfg {
  static constexpr int KM = 64, NT = 128;
  static constexpr int LD = DP + 16 / sizeof(T);
  static constexpr size_t smem_bytes() {
    return sizeof(T) * (2 * KM + 2 * QN) * LD + sizeof(int64_t) * (KM + QN) +
           sizeof(int) * 6 * QN + sizeof(float) * 2 * QN;
  }
};

// First ig in [lo, hi] with window(ig).hi >= k (hi + 1 if none).
__device__ __forceinline__ int first_reaching(const Axis& x, int g, int lo, int hi, int k) {
  int a = lo, b = hi + 1;
  while (a < b) {
    const int m = (a + b) >> 1;
    int wl, wh;
    window(x, g, m, wl, wh);
    if (wh >= k) b = m; else a = m + 1;
  }
  return a;
}
// Last ig in [lo, hi] with window(ig).lo <= k (lo - 1 if none).
__device__ __forceinline__ int last_reaching(const Axis& x, int g, int lo, int hi, int k) {
  int a = lo - 1, b = hi;
  while (a < b) {
    const int m = (a + b + 1) >> 1;
    int wl, wh;
    window(x, g, m, wl, wh);
    if (wl <= k) a = m; else b = m - 1;
  }
  return a;
}

template <typename T, int DP, int QN, int MODE>
__global__ void __launch_bounds__(128) dkv_kernel(const Params p) {
  using C = DkvCfg<T, DP, QN>;
  using M = Mma<T>;
  constexpr int KM = C::KM, NT = C::NT, LD = C::LD;
  constexpr bool DK = MODE & 1, DV = MODE & 2;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + KM * LD;
  T* sQ = sV + KM * LD;
  T* sdO = sQ + QN * LD;
  int64_t* sKtok = reinterpret_cast<int64_t*>(sdO + QN * LD);
  int64_t* sQtok = sKtok + KM;
  int* sQw = reinterpret_cast<int*>(sQtok + QN);  // [6][QN]: window lo (axes 0-2), hi (axes 0-2)
  float* sLse = reinterpret_cast<float*>(sQw + 6 * QN);
  float* sDelta = sLse + QN;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gid = lane >> 2, tig = lane & 3;
  const int hk = blockIdx.y, b = blockIdx.z + p.z0;
  const int G = p.H / p.Hkv;

  // Key tile.
  int g[3], ks[3], ke[3], t[3];
  {
    int64_t bid = blockIdx.x;
#pragma unroll
    for (int a = 2; a >= 0; --a) {
      const int n = p.ax[a].d * p.ax[a].nkt;
      t[a] = static_cast<int>(bid % n);
      bid /= n;
    }
  }
  bool any = true;
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    const Axis& x = p.ax[a];
    any &= tile_of(t[a], x.kt, x.nkt, x.kv0, x.kvn, x.d, g[a], ks[a], ke[a]);
  }
  if (!any) return;
  const int tk[3] = {p.ax[0].kt, p.ax[1].kt, p.ax[2].kt};

  // Queries (of this CTA's groups) whose windows reach the tile's keys.
  int qlo[3], qext[3];
  bool nonempty = true;
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    const Axis& x = p.ax[a];
    int f, l;
    group_range(x.q0, x.qn, g[a], x.d, f, l);
    const int qa = f <= l ? first_reaching(x, g[a], f, l, ks[a]) : 0;
    const int qb = f <= l ? last_reaching(x, g[a], f, l, ke[a]) : -1;
    qlo[a] = qa;
    qext[a] = qb - qa + 1;
    nonempty &= qb >= qa;
  }
  const int64_t nqb = nonempty ? static_cast<int64_t>(qext[0]) * qext[1] * qext[2] : 0;

  if (tid < KM) {
    int o[3], jg[3];
    unflatten(tid, tk, o);
    bool ok = true;
#pragma unroll
    for (int a = 0; a < 3; ++a) { jg[a] = ks[a] + o[a]; ok &= jg[a] <= ke[a]; }
    sKtok[tid] = ok ? token_of(p, g, jg, true) : -1;
  }
  // This thread's two key rows: group coordinates (-1: padding row).
  int kc[2][3];
  bool rvalid[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    int o[3];
    unflatten(warp * 16 + gid + 8 * r, tk, o);
    bool ok = true;
#pragma unroll
    for (int a = 0; a < 3; ++a) { kc[r][a] = ks[a] + o[a]; ok &= kc[r][a] <= ke[a]; }
    rvalid[r] = ok;
    if (!ok) kc[r][0] = -1;
  }
  __syncthreads();

  const int bk = b * p.dkvb / p.kvb;  // dK / dV are written at b: query batches b * dkvb, ...
  const T* kbase = static_cast<const T*>(p.k) + bk * p.k_b + static_cast<int64_t>(hk) * p.D;
  const T* vbase = static_cast<const T*>(p.v) + bk * p.v_b + static_cast<int64_t>(hk) * p.Dv;
  load_rows<T, DP, KM, NT>(sK, LD, kbase, sKtok, p.k_tok, p.D);
  load_rows<T, DP, KM, NT>(sV, LD, vbase, sKtok, p.v_tok, p.Dv);
  cp_async_commit();

  float dk[DK ? DP / 8 : 1][4], dv[DV ? DP / 8 : 1][4];
#pragma unroll
  for (int n = 0; n < (DK ? DP / 8 : 1); ++n) dk[n][0] = dk[n][1] = dk[n][2] = dk[n][3] = 0.f;
#pragma unroll
  for (int n = 0; n < (DV ? DP / 8 : 1); ++n) dv[n][0] = dv[n][1] = dv[n][2] = dv[n][3] = 0.f;

  for (int hh = 0; hh < p.dkvb * G; ++hh) {  // query batch, head
    const int h = hk * G + hh % G, bq = b * p.dkvb + hh / G;
    const T* qbase = static_cast<const T*>(p.q) + bq * p.q_b + static_cast<int64_t>(h) * p.D;
    const T* dobase = static_cast<const T*>(p.dout) + bq * p.o_b + static_cast<int64_t>(h) * p.Dv;
    for (int64_t c0 = 0; c0 < nqb; c0 += QN) {
      if (tid < QN) {
        const int64_t n = c0 + tid;
        if (n < nqb) {
          int o[3], ig[3];
          unflatten(n, qext, o);
#pragma unroll
          for (int a = 0; a < 3; ++a) {
            ig[a] = qlo[a] + o[a];
            window(p.ax[a], g[a], ig[a], sQw[a * QN + tid], sQw[(3 + a) * QN + tid]);
          }
          const int64_t tok = token_of(p, g, ig, false);
          sQtok[tid] = tok;
          const int64_t i = (bq * p.nq + tok) * p.H + h;
          sLse[tid] = p.lse_in[i] * 1.4426950408889634f;
          sDelta[tid] = p.delta[i];
        } else {
          sQtok[tid] = -1;
#pragma unroll
          for (int a = 0; a < 3; ++a) { sQw[a * QN + tid] = 1; sQw[(3 + a) * QN + tid] = 0; }
          sLse[tid] = INFINITY;
          sDelta[tid] = 0.f;
        }
      }
      __syncthreads();
      load_rows<T, DP, QN, NT>(sQ, LD, qbase, sQtok, p.q_tok, p.D);
      load_rows<T, DP, QN, NT>(sdO, LD, dobase, sQtok, p.o_tok, p.Dv);
      cp_async_commit();
      cp_async_wait_all();
      __syncthreads();

      // Full: every key of the tile is in the window of every query of the chunk.
      bool full = c0 + QN <= nqb;
      {
        int lo[3], hi[3];
        chunk_cover(c0, c0 + QN - 1, qext, lo, hi);
#pragma unroll
        for (int a = 0; a < 3; ++a) {
          int l0, h0, l1, h1;
          window(p.ax[a], g[a], qlo[a] + lo[a], l0, h0);
          window(p.ax[a], g[a], qlo[a] + hi[a], l1, h1);
          full &= (l1 <= ks[a]) && (h0 >= ke[a]);
        }
      }

      float s[QN / 8][4], dp[QN / 8][4];
#pragma unroll
      for (int n = 0; n < QN / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < DP / M::K; ++kk) {
        uint32_t ak[4], av[4];
        M::load_a(sK, LD, warp * 16, kk * M::K, ak);
        if (DK) M::load_a(sV, LD, warp * 16, kk * M::K, av);
#pragma unroll
        for (int n = 0; n < QN / 8; ++n) {
          uint32_t bf[2];
          M::load_b_nk(sQ, LD, n * 8, kk * M::K, bf);
          M::mma(s[n], ak, bf);
          if (DK) {
            M::load_b_nk(sdO, LD, n * 8, kk * M::K, bf);
            M::mma(dp[n], av, bf);
          }
        }
      }
      // P^T (in s) and dS^T (in dp).
#pragma unroll
      for (int n = 0; n < QN / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1, col = n * 8 + 2 * tig + (e & 1);
          float pr = exp2f(s[n][e] * p.scale_log2 - sLse[col]);
          if (!full) {
            bool vis = true;
#pragma unroll
            for (int a = 0; a < 3; ++a)
              vis &= (kc[r][a] >= sQw[a * QN + col]) && (kc[r][a] <= sQw[(3 + a) * QN + col]);
            pr = vis ? pr : 0.f;
          }
          s[n][e] = pr;
          if (DK) dp[n][e] = pr * (dp[n][e] - sDelta[col]);
        }
      }
#pragma unroll
      for (int kq = 0; kq < QN / M::K; ++kq) {
        uint32_t ap[4], ad[4];
        if (DV) M::a_from_acc(s, kq, ap);
        if (DK) M::a_from_acc(dp, kq, ad);
#pragma unroll
        for (int n = 0; n < DP / 8; n += 2) {
          uint32_t bf[2][2];
          if (DV) {
            M::load_b_kn2(sdO, LD, kq * M::K, n * 8, bf);
            M::mma(dv[n], ap, bf[0]);
            M::mma(dv[n + 1], ap, bf[1]);
          }
          if (DK) {
            M::load_b_kn2(sQ, LD, kq * M::K, n * 8, bf);
            M::mma(dk[n], ad, bf[0]);
            M::mma(dk[n + 1], ad, bf[1]);
          }
        }
      }
      __syncthreads();
    }
  }

  // Write (zeros where no query reaches a key).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (!rvalid[r]) continue;
    const int64_t tok = sKtok[warp * 16 + gid + 8 * r];
    if (DK) {
      T* row = static_cast<T*>(p.dk) + b * p.k_b + static_cast<int64_t>(hk) * p.D + tok * p.k_tok;
#pragma unroll
      for (int n = 0; n < DP / 8; ++n) {
        const int col = n * 8 + 2 * tig;
        if (col < p.D) store2<T>(row + col, dk[n][2 * r] * p.scale, dk[n][2 * r + 1] * p.scale);
      }
    }
    if (DV) {
      T* row = static_cast<T*>(p.dv) + b * p.v_b + static_cast<int64_t>(hk) * p.Dv + tok * p.v_tok;
#pragma unroll
      for (int n = 0; n < DP / 8; ++n) {
        const int col = n * 8 + 2 * tig;
        if (col < p.Dv) store2<T>(row + col, dv[n][2 * r], dv[n][2 * r + 1]);
      }
    }
  }
}

}  // namespace gna
