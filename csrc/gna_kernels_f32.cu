// Kernels for one element type (see gna_launch.cuh).
#include "gna_launch.cuh"

namespace gna {
template cudaError_t launch_forward_t<float>(const Params&, cudaStream_t);
template cudaError_t launch_backward_t<float>(const Params&, cudaStream_t);
template size_t max_smem_bytes_t<float>(int, int);
}  // namespace gna
