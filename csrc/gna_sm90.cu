// Host side of the Hopper forward path: eligibility, tile shapes, TMA descriptors,
// launch. The kernels are compiled for every target but have a body only for sm_90a
// (gna_sm90.cuh); a problem takes this path only on a compute-capability-9.0 device
// whose kernel image is sm_90 code, otherwise the sm80 kernels run.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>

#include "gna_fwd_sm90.cuh"
#include "gna_launch.h"
#include "gna_plan.h"

namespace gna {
namespace {

using sm90::FwdLayout;

template <typename T, int D>
constexpr int stages_of() { return D == 64 ? 4 : 3; }

template <typename T, int D>
void* fwd_kernel_ptr() {
  return reinterpret_cast<void*>(sm90::fwd_sm90_kernel<T, D, stages_of<T, D>()>);
}

PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) !=
            cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      f = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// [B, n0, n1, n2, H, D] as the 5-D tensor (H*D, n2, n1, n0, B) with a box of
// (64, t2, t1, t0, 1) and the 128-byte swizzle.
bool make_map(CUtensorMap* m, DType dt, const void* ptr, int B, const int n[3], int HD, const int t[3]) {
  const cuuint64_t dims[5] = {static_cast<cuuint64_t>(HD), static_cast<cuuint64_t>(n[2]),
                              static_cast<cuuint64_t>(n[1]), static_cast<cuuint64_t>(n[0]),
                              static_cast<cuuint64_t>(B)};
  const cuuint64_t tok = static_cast<cuuint64_t>(HD) * 2;
  const cuuint64_t strides[4] = {tok, tok * n[2], tok * n[2] * n[1], tok * n[2] * n[1] * n[0]};
  const cuuint32_t box[5] = {64, static_cast<cuuint32_t>(t[2]), static_cast<cuuint32_t>(t[1]),
                             static_cast<cuuint32_t>(t[0]), 1};
  const cuuint32_t estr[5] = {1, 1, 1, 1, 1};
  auto fn = encode_fn();
  if (!fn) return false;
  const CUresult r = fn(m, dt == DType::kF16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 5,
                        const_cast<void*>(ptr), dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
                        CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
}

// Whether the current device is compute capability 9.0 and `kern` has sm_90 code.
bool sm90_device(void* kern) {
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  if (major != 9 || minor != 0) return false;
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, kern) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return attr.binaryVersion == 90;
}

// JAX_GNA_SM90: "0" turns the Hopper path off; "force" makes a forward call that
// cannot take it fail (cudaErrorNotSupported) instead of running the sm80 kernels,
// which is how the GPU tests prove which kernel they checked.
enum class Mode { kOff, kAuto, kForce };
Mode mode_from_env() {
  const char* e = std::getenv("JAX_GNA_SM90");
  if (!e) return Mode::kAuto;
  if (std::strcmp(e, "0") == 0 || std::strcmp(e, "off") == 0) return Mode::kOff;
  if (std::strcmp(e, "force") == 0) return Mode::kForce;
  return Mode::kAuto;
}

template <typename T, int D>
cudaError_t fwd_sm90(DType dt, Params p, const Plan& plan, cudaStream_t stream, bool& used) {
  constexpr int S = stages_of<T, D>();
  void* kern = fwd_kernel_ptr<T, D>();
  if (!sm90_device(kern)) return cudaSuccess;
  int64_t nqtiles = 1;
  int qn[3], kn[3];
  for (int a = 0; a < 3; ++a) {
    Axis& x = p.ax[a];
    x.qt = plan.qt[a];
    x.nqt = (x.qn + x.qt - 1) / x.qt;
    x.kt = plan.kt[a];
    x.nkt = (x.kvn + x.kt - 1) / x.kt;
    nqtiles *= x.nqt;
    qn[a] = x.qn;
    kn[a] = x.kvn;
  }
  if (nqtiles >= (int64_t{1} << 31)) return cudaSuccess;
  CUtensorMap tq, tk, tv, to;
  if (!make_map(&tq, dt, p.q, p.B, qn, p.H * D, plan.qt) || !make_map(&tk, dt, p.k, p.B, kn, p.Hkv * D, plan.kt) ||
      !make_map(&tv, dt, p.v, p.B, kn, p.Hkv * D, plan.kt) || !make_map(&to, dt, p.o, p.B, qn, p.H * D, plan.qt))
    return cudaSuccess;  // not representable as TMA boxes: the sm80 kernels run
  const size_t smem = FwdLayout<D, S>::smem_bytes();
  cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (e != cudaSuccess) return e;
  used = true;
  sm90::fwd_sm90_kernel<T, D, S><<<dim3(static_cast<unsigned>(nqtiles), p.H, p.B), sm90::kThreads, smem, stream>>>(
      p, tq, tk, tv, to);
  return cudaGetLastError();
}

cudaError_t try_forward_sm90(DType dt, const Params& p, cudaStream_t stream, bool& used) {
  if (dt == DType::kF32 || p.D != p.Dv || (p.D != 64 && p.D != 128)) return cudaSuccess;
  for (int a = 0; a < 3; ++a)
    if (p.ax[a].d != 1) return cudaSuccess;
  const Plan plan = cached_plan(p);
  if (!plan.ok) return cudaSuccess;
  if (dt == DType::kF16)
    return p.D == 64 ? fwd_sm90<__half, 64>(dt, p, plan, stream, used) : fwd_sm90<__half, 128>(dt, p, plan, stream, used);
  return p.D == 64 ? fwd_sm90<__nv_bfloat16, 64>(dt, p, plan, stream, used)
                   : fwd_sm90<__nv_bfloat16, 128>(dt, p, plan, stream, used);
}

}  // namespace

cudaError_t launch_forward_sm90(DType dt, const Params& p, cudaStream_t stream, bool& used) {
  used = false;
  const Mode mode = mode_from_env();
  if (mode == Mode::kOff) return cudaSuccess;
  const cudaError_t e = try_forward_sm90(dt, p, stream, used);
  if (e == cudaSuccess && !used && mode == Mode::kForce) return cudaErrorNotSupported;
  return e;
}

}  // namespace gna
