// Max active clusters of a 384-thread kernel with the forward's shared memory, cluster 1 and 2.
#include <cstdio>
#include <cuda_runtime.h>
__global__ void k(int* x) { extern __shared__ int s[]; if (x) x[0] = s[threadIdx.x]; }
int main() {
  const size_t smem = 3 * 65536 + 32768 + 1024 + 256;
  cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  for (int c = 1; c <= 4; c *= 2) {
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(264); cfg.blockDim = dim3(384); cfg.dynamicSmemBytes = smem;
    cudaLaunchAttribute a[1]; a[0].id = cudaLaunchAttributeClusterDimension; a[0].val.clusterDim = {(unsigned)c, 1, 1};
    cfg.attrs = a; cfg.numAttrs = 1;
    int n = -1;
    cudaError_t e = cudaOccupancyMaxActiveClusters(&n, k, &cfg);
    std::printf("cluster %d: max active clusters %d (%s)\n", c, n, cudaGetErrorString(e));
  }
  int sms = 0; cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  std::printf("SMs %d\n", sms);
}
