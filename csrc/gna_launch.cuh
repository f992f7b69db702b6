// Launch configuration of the kernels for one element type (included by the
// per-dtype translation units, so the three dtypes compile in parallel).
//
//   forward, dQ:  64 queries x KN keys a step (kn_of below)
//   dK/dV:        64 keys x QN queries a step; head dim 256 (and fp32 128) runs
//                 dK and dV as two launches so the accumulators stay in registers.
#pragma once
#include "gna_backward.cuh"
#include "gna_launch.h"

namespace gna {

// grid.z may exceed CUDA's limit: one launch per kMaxGridZ batches (Params::z0).
template <typename Kern>
inline cudaError_t launch(Kern kern, dim3 grid, size_t smem, cudaStream_t stream, const Params& p) {
  if (grid.x == 0) return cudaSuccess;
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  Params part = p;
  for (unsigned z0 = 0; z0 < grid.z; z0 += kMaxGridZ) {
    part.z0 = static_cast<int>(z0);
    const unsigned nz = grid.z - z0 < kMaxGridZ ? grid.z - z0 : kMaxGridZ;
    kern<<<dim3(grid.x, grid.y, nz), 128, smem, stream>>>(part);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

inline dim3 query_grid(const Params& p) {
  int64_t n = 1;
  for (int a = 0; a < kMaxRank; ++a) n *= static_cast<int64_t>(p.ax[a].d) * p.ax[a].nqt;
  return dim3(static_cast<unsigned>(n), p.H, p.B);
}
inline dim3 key_grid(const Params& p) {
  int64_t n = 1;
  for (int a = 0; a < kMaxRank; ++a) n *= static_cast<int64_t>(p.ax[a].d) * p.ax[a].nkt;
  return dim3(static_cast<unsigned>(n), p.Hkv, p.B / p.dkvb);  // dK / dV batches
}

// Keys per step of the query-outer kernels and queries per step of dK/dV, per element
// type and padded head dim (shared memory: fp32 D=128 fits an A100, D=256 an H100).
template <typename T, int DP>
constexpr int kn_of() {
  return sizeof(T) == 2 ? (DP == 256 ? 32 : 64) : (DP == 32 ? 64 : DP == 256 ? 16 : 32);
}
template <typename T, int DP>
constexpr int qn_of() { return DP <= 64 ? 64 : 32; }
template <typename T, int DP>
constexpr bool split_of() { return DP == 256 || (sizeof(T) == 4 && DP == 128); }

template <typename T, int DP>
inline cudaError_t fwd_dp(const Params& p, cudaStream_t s) {
  constexpr int KN = kn_of<T, DP>();
  return launch(fwd_kernel<T, DP, KN>, query_grid(p), FwdCfg<T, DP, KN>::smem_bytes(), s, p);
}

template <typename T, int DP>
inline cudaError_t bwd_dp(const Params& p, cudaStream_t s) {
  constexpr int KN = kn_of<T, DP>(), QN = qn_of<T, DP>();
  cudaError_t e = launch(dq_kernel<T, DP, KN>, query_grid(p), DqCfg<T, DP, KN>::smem_bytes(), s, p);
  if (e != cudaSuccess) return e;
  const size_t sm = DkvCfg<T, DP, QN>::smem_bytes();
  if constexpr (split_of<T, DP>()) {
    e = launch(dkv_kernel<T, DP, QN, 1>, key_grid(p), sm, s, p);
    if (e != cudaSuccess) return e;
    return launch(dkv_kernel<T, DP, QN, 2>, key_grid(p), sm, s, p);
  } else {
    return launch(dkv_kernel<T, DP, QN, 3>, key_grid(p), sm, s, p);
  }
}

template <typename T, int DP>
constexpr size_t smem_dp() {
  constexpr int KN = kn_of<T, DP>(), QN = qn_of<T, DP>();
  constexpr size_t a = FwdCfg<T, DP, KN>::smem_bytes(), b = DqCfg<T, DP, KN>::smem_bytes(),
                   c = DkvCfg<T, DP, QN>::smem_bytes();
  return a > b ? (a > c ? a : c) : (b > c ? b : c);
}

template <typename T>
cudaError_t launch_forward_t(const Params& p, cudaStream_t s) {
  switch (padded_head_dim(p.D, p.Dv)) {
    case 32: return fwd_dp<T, 32>(p, s);
    case 64: return fwd_dp<T, 64>(p, s);
    case 128: return fwd_dp<T, 128>(p, s);
    default: return fwd_dp<T, 256>(p, s);
  }
}

template <typename T>
cudaError_t launch_backward_t(const Params& p, cudaStream_t s) {
  switch (padded_head_dim(p.D, p.Dv)) {
    case 32: return bwd_dp<T, 32>(p, s);
    case 64: return bwd_dp<T, 64>(p, s);
    case 128: return bwd_dp<T, 128>(p, s);
    default: return bwd_dp<T, 256>(p, s);
  }
}

template <typename T>
size_t max_smem_bytes_t(int D, int Dv) {
  switch (padded_head_dim(D, Dv)) {
    case 32: return smem_dp<T, 32>();
    case 64: return smem_dp<T, 64>();
    case 128: return smem_dp<T, 128>();
    default: return smem_dp<T, 256>();
  }
}

}  // namespace gna
