// Kernels for one element type (see gna_launch.cuh).
#include "gna_launch.cuh"

namespace gna {
template cudaError_t launch_forward_t<__nv_bfloat16>(const Params&, cudaStream_t);
template cudaError_t launch_backward_t<__nv_bfloat16>(const Params&, cudaStream_t);
template size_t max_smem_bytes_t<__nv_bfloat16>(int, int);
}  // namespace gna
