// Host entry points of the kernels (no XLA, no Python): one per dtype.
#pragma once
#include <cuda_runtime.h>
#include "gna_problem.h"

namespace gna {

enum class DType { kF16, kBF16, kF32 };

// Padded head dim the kernels use for head dims D, D_v (multiples of 8, <= 256).
inline int padded_head_dim(int D, int Dv) {
  const int m = D > Dv ? D : Dv;
  return m <= 32 ? 32 : m <= 64 ? 64 : m <= 128 ? 128 : 256;
}

// Forward: writes p.o and p.lse. Backward: writes p.dq, p.dk, p.dv.
cudaError_t launch_forward(DType t, const Params& p, cudaStream_t stream);
cudaError_t launch_backward(DType t, const Params& p, cudaStream_t stream);
// Hopper forward (gna_sm90.cu): launches and sets `used` when the problem and the
// device fit that path (fp16/bf16, D = D_v in {64, 128, 256}, no dilation, sm_90a code on
// a compute-capability-9.0 device, JAX_GNA_SM90 not "0"); otherwise does nothing,
// or, with JAX_GNA_SM90=force, returns cudaErrorNotSupported.
cudaError_t launch_forward_sm90(DType t, const Params& p, cudaStream_t stream, bool& used);
// Hopper backward (dQ and dK/dV kernels), same eligibility but D in {64, 128}; JAX_GNA_SM90_BWD=0 keeps
// the backward on the sm80 kernels, "force" makes a call it cannot take fail.
cudaError_t launch_backward_sm90(DType t, const Params& p, cudaStream_t stream, bool& used);

// Largest dynamic shared memory (bytes) any kernel of a call with these head dims
// asks for, and what the current device allows a block (opt-in maximum).
size_t max_smem_bytes(DType t, int D, int Dv);
int device_smem_optin();

template <typename T> cudaError_t launch_forward_t(const Params& p, cudaStream_t stream);
template <typename T> size_t max_smem_bytes_t(int D, int Dv);
template <typename T> cudaError_t launch_backward_t(const Params& p, cudaStream_t stream);

}  // namespace gna
