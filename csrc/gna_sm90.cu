// Host side of the Hopper kernels (forward and backward): eligibility, tile
// shapes (gna_plan.h), TMA descriptors, launch. The kernels are compiled for every target but have a body only for sm_90a
// (gna_sm90.cuh); a problem takes this path only on a compute-capability-9.0 device
// whose kernel image is sm_90 code, otherwise the sm80 kernels run.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include "gna_bwd_sm90.cuh"
#include "gna_launch.h"
#include "gna_plan.h"

namespace gna {
namespace {

using sm90::FwdLayout;

// TMA ring depth (what fits in 227 KiB of shared memory beside the Q tile).
template <typename T, int D>
constexpr int stages_of() { return D == 64 ? 4 : D == 128 ? 3 : 2; }
// The dK/dV kernel's ring of 64-query Q/dO tiles (beside its 128-key K and V tiles and
// the 32 KiB of P^T and dS^T tiles).
template <int D>
constexpr int dkv_stages() { return D == 128 ? 3 : 4; }
// Dynamic shared memory a Hopper block may opt into (227 KiB).
constexpr size_t kMaxSmem = 227 * 1024;


template <typename Kern>
cudaError_t set_smem(Kern kern, size_t smem) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kern), cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(smem));
}

// The Hopper kernels are launched with programmatic stream serialization (programmatic
// dependent launch): each may start while the kernel ahead of it in the stream finishes
// (see grid_dependency_wait in gna_sm90.cuh); the dK/dV kernel then runs under the dQ
// kernel's last wave. JAX_GNA_PDL=0 launches them normally.
bool pdl_from_env() {
  const char* e = std::getenv("JAX_GNA_PDL");
  return !(e && std::strcmp(e, "0") == 0);
}

// grid.z may exceed CUDA's limit: one launch per kMaxGridZ batches (Params::z0), each
// waiting for the one before it as any two launches do (see grid_dependency_wait).
// `cluster` > 1: clusters of that many CTAs along x (grid.x a multiple of it).
template <typename... KArgs, typename... Args>
cudaError_t launch_sm90_cluster(void (*kern)(KArgs...), dim3 grid, size_t smem, cudaStream_t stream, bool pdl,
                                unsigned cluster, Params p, const Args&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.blockDim = dim3(sm90::kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  int n = 0;
  if (pdl) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n++].val.clusterDim = {cluster, 1, 1};
  }
  cfg.attrs = attr;
  cfg.numAttrs = n;
  for (unsigned z0 = 0; z0 < grid.z; z0 += kMaxGridZ) {
    p.z0 = static_cast<int>(z0);
    cfg.gridDim = dim3(grid.x, grid.y, grid.z - z0 < kMaxGridZ ? grid.z - z0 : kMaxGridZ);
    if (cudaError_t e = cudaLaunchKernelEx(&cfg, kern, p, args...); e != cudaSuccess) return e;
  }
  return cudaSuccess;
}
template <typename... KArgs, typename... Args>
cudaError_t launch_sm90(void (*kern)(KArgs...), dim3 grid, size_t smem, cudaStream_t stream, bool pdl, Params p,
                        const Args&... args) {
  return launch_sm90_cluster(kern, grid, smem, stream, pdl, 1, p, args...);
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
// (64, t2, t1, t0, 1) and the 128-byte swizzle. With `pitch` (the buffer's extents) and
// `off` (the block's first row in it), the tensor is that block of a larger buffer.
bool make_map(CUtensorMap* m, DType dt, const void* ptr, int B, const int n[3], int HD, const int t[3],
              const int* pitch = nullptr, const int* off = nullptr) {
  if (!pitch) pitch = n;
  const cuuint64_t dims[5] = {static_cast<cuuint64_t>(HD), static_cast<cuuint64_t>(n[2]),
                              static_cast<cuuint64_t>(n[1]), static_cast<cuuint64_t>(n[0]),
                              static_cast<cuuint64_t>(B)};
  const cuuint64_t tok = static_cast<cuuint64_t>(HD) * 2;
  const cuuint64_t strides[4] = {tok, tok * pitch[2], tok * pitch[2] * pitch[1], tok * pitch[2] * pitch[1] * pitch[0]};
  if (off)
    ptr = static_cast<const char*>(ptr) + off[2] * strides[0] + off[1] * strides[1] + off[0] * strides[2];
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

// The forward's TMA ring: twice the stages at 64-token key tiles where D <= 128 (the same
// bytes in flight).
template <typename T, int D, int KT>
constexpr int fwd_stages() { return KT < sm90::fwd_key_tokens<D>() ? 2 * stages_of<T, D>() : stages_of<T, D>(); }

// The forward's plan (128-query tiles). At D <= 128 without additional tokens, 64-token
// key tiles where they visit at most 80% of the key columns that 128-token tiles do
// (short_keys_pay, gna_plan.h); otherwise the kernel's default key tiles. A 64-token tile
// costs more than half a 128-token one (H200, bf16, kernel time, each forced on the same
// problem: per key column 1.13-1.19x on the paper problems, 1.12-1.33x on small windows),
// so they win only by a wide margin. Measured, with the ratio of key columns: 1-D windows
// 33-129 (0.67) -10 to -12% at D 64 and 128, 3-D 8x64x64 window 3 D 64 (0.76) -12.6%, 2-D
// 128x128 window 7 D 64 (0.76) -5.5%, window 13 (0.77) -1.5%; past 0.8: 1-D window 385
// (0.80) -6.9%, 2-D 64x64 window 7 D 128 (0.81) -1.2%, 128x128 window 21 D 64 (0.82)
// +3.1%, the paper problems (0.91-1.0) +5 to +19%
// (benchmarks/results/short-key-tiles-h200.md). The choice is cached with the plan: one
// cache lookup per call. JAX_GNA_FWD_KEYS (a measurement and test switch, read per call):
// "64" or "128" forces the key tiles at D <= 128 without additional tokens.
Plan fwd_plan(const Params& p) {
  const int keys = p.D > 128 ? 64 : 128;
  if (p.nx > 0 || p.D > 128) return cached_plan(p, sm90::kTileTokens, keys);
  const char* e = std::getenv("JAX_GNA_FWD_KEYS");
  if (e && std::strcmp(e, "64") == 0) return cached_plan(p, sm90::kTileTokens, 64);
  if (e && std::strcmp(e, "128") == 0) return cached_plan(p, sm90::kTileTokens, 128);
  static HostCache<Plan> cache;
  return cache.get(geometry_key(p, {sm90::kTileTokens, 0}), [&] {
    const Plan k128 = choose_tiles(p, sm90::kTileTokens, 128), k64 = choose_tiles(p, sm90::kTileTokens, 64);
    return short_keys_pay(k128, k64) ? k64 : k128;
  });
}

// Key tokens per tile of a plan (its per-axis extents multiply to the tile's tokens).
int key_tokens(const Plan& plan) { return plan.kt[0] * plan.kt[1] * plan.kt[2]; }

// The ring of the forward that runs several query tiles per CTA with two Q slots: what
// fits beside them, at most fwd_stages.
template <typename T, int D, int KT>
constexpr int fwd_items_stages() {
  constexpr size_t q = 2 * sm90::kTileTokens * D * 2, kv = 2 * KT * D * 2;
  constexpr int fit = static_cast<int>((kMaxSmem - q - 1024 - 320) / kv);
  return fit < fwd_stages<T, D, KT>() ? fit : fwd_stages<T, D, KT>();
}

// Streaming multiprocessors of the current device (0 if the query fails).
int sm_count() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

// Query tiles per CTA of the forward (D <= 128, no additional tokens): gna::forward_items
// (gna_plan.h), for the kernel with one Q slot (`one_slot`) or two. JAX_GNA_FWD_ITEMS (a
// measurement and test switch, read per call): a count >= 1 forces it.
int fwd_items(const Params& p, const Plan& plan, int64_t nqtiles, bool one_slot) {
  if (const char* e = std::getenv("JAX_GNA_FWD_ITEMS")) {
    const int n = std::atoi(e);
    if (n >= 1) return n;
  }
  return forward_items(nqtiles, plan.visits, int64_t{p.H} * p.B, sm_count(),
                       one_slot ? kOneSlotItemTiles : 0.0);
}

// Whether the forward runs pairs of query tiles in clusters of two CTAs sharing each K/V
// load (fwd_pair_sm90_kernel), where gna::pair_axis finds pairs: the K/V traffic into shared
// memory costs 10-13% of the block-sparse forwards' time under the power cap (measured with
// the GNA_FWD_NOLOAD build, session 39). JAX_GNA_FWD_PAIR (a measurement and test switch,
// read per call): "0" never; "force": pairs where gna::pairs_pay says no too, and a
// forward on the Hopper path that runs no pair kernel fails (cudaErrorNotSupported, as
// JAX_GNA_SM90=force does), so the GPU tests can prove the pairs ran (a failed cluster
// launch falls back to the one-tile kernel, same bits).
enum class PairMode { kOff, kOn, kForce };
PairMode fwd_pair_mode() {
  const char* e = std::getenv("JAX_GNA_FWD_PAIR");
  if (!e) return PairMode::kOn;
  if (std::strcmp(e, "0") == 0) return PairMode::kOff;
  return std::strcmp(e, "force") == 0 ? PairMode::kForce : PairMode::kOn;
}

// gna::pair_axis of a problem with its plan applied, cached like the plans.
int cached_pair_axis(const Params& p) {
  static HostCache<int> cache;
  return cache.get(geometry_key(p, {p.ax[0].qt, p.ax[1].qt, p.ax[2].qt, p.ax[0].kt, p.ax[1].kt, p.ax[2].kt}),
                   [&] { return pair_axis(p); });
}

template <typename T, int D, int KT>
cudaError_t fwd_sm90(DType dt, Params p, const Plan& plan, cudaStream_t stream, bool& used) {
  constexpr int S = fwd_stages<T, D, KT>();
  auto kern = sm90::fwd_sm90_kernel<T, D, KT, S>;
  if (!sm90_device(reinterpret_cast<void*>(kern))) return cudaSuccess;
  const int64_t nqtiles = apply_plan(p, plan, true);
  if (nqtiles >= (int64_t{1} << 31)) return cudaSuccess;
  int qn[3], kn[3], half[3];
  for (int a = 0; a < 3; ++a) { qn[a] = p.ax[a].qn; kn[a] = p.ax[a].kvn; half[a] = plan.qt[a]; }
  // Each consumer warpgroup stores its 64 rows of the tile: the first axis of extent > 1
  // halved (rows are row-major in the tile, so each half is a box).
  for (int a = 0; a < 3; ++a)
    if (half[a] > 1) { half[a] /= 2; break; }
  CUtensorMap tq, tk, tv, to;
  const int Bkv = p.B / p.kvb;
  if (!make_map(&tq, dt, p.q, p.B, qn, p.H * D, plan.qt, p.qpitch, p.qoff) ||
      !make_map(&tk, dt, p.k, Bkv, kn, p.Hkv * D, plan.kt) || !make_map(&tv, dt, p.v, Bkv, kn, p.Hkv * D, plan.kt) ||
      !make_map(&to, dt, p.o, p.B, qn, p.H * D, half, p.qpitch, p.qoff))
    return cudaSuccess;  // not representable as TMA boxes: the sm80 kernels run
  static_assert(FwdLayout<D, KT, S>::smem_bytes() <= kMaxSmem, "forward tiles exceed shared memory");
  const size_t smem = FwdLayout<D, KT, S>::smem_bytes();
  const dim3 grid(static_cast<unsigned>(nqtiles), p.H, p.B);
  const PairMode pairs = fwd_pair_mode();
  if constexpr (D <= 128) {
    // Two Q slots where a ring of at least 3 stages fits beside them; otherwise (D = 128
    // with 128-token key tiles: 2 of 3 stages would be left, measured 11-34% slower per
    // tile, session 36) one Q slot beside the whole ring (fwd_sm90_body's DIRECT).
    constexpr int QS = fwd_items_stages<T, D, KT>() >= 3 ? 2 : 1;
    if (const int items = p.nx == 0 ? fwd_items(p, plan, nqtiles, QS == 1) : 1; items > 1) {
      constexpr int SI = QS == 2 ? fwd_items_stages<T, D, KT>() : S;
      using LI = FwdLayout<D, KT, SI, QS, true>;
      auto ki = sm90::fwd_items_sm90_kernel<T, D, KT, SI, QS>;
      static_assert(LI::smem_bytes() <= kMaxSmem, "forward tiles exceed shared memory");
      const size_t smem_i = LI::smem_bytes();
      if (pairs == PairMode::kForce) return cudaErrorNotSupported;
      if (cudaError_t e = set_smem(ki, smem_i); e != cudaSuccess) return e;
      used = true;
      const dim3 grid_i(static_cast<unsigned>((nqtiles + items - 1) / items), p.H, p.B);
      return launch_sm90(ki, grid_i, smem_i, stream, pdl_from_env(), p, tq, tk, tv, to, sm90::tile_divs(p), items);
    }
  }
  if (p.nx > 0) {  // the additional tokens as extra key tiles: [B, nx, Hkv, D] as 1-D blocks
    if (pairs == PairMode::kForce) return cudaErrorNotSupported;
    if constexpr (KT != sm90::fwd_key_tokens<D>()) {
      return cudaErrorNotSupported;  // fwd_plan takes the default key tiles with tokens
    } else {
      auto kx = sm90::fwd_tokens_sm90_kernel<T, D, S>;
      CUtensorMap txk, txv;
      const int xn[3] = {1, 1, p.nx}, xt[3] = {1, 1, KT};
      if (!make_map(&txk, dt, p.xk, p.B, xn, p.Hkv * D, xt) || !make_map(&txv, dt, p.xv, p.B, xn, p.Hkv * D, xt))
        return cudaSuccess;
      if (cudaError_t e = set_smem(kx, smem); e != cudaSuccess) return e;
      used = true;
      return launch_sm90(kx, grid, smem, stream, pdl_from_env(), p, tq, tk, tv, to, sm90::tile_divs(p), txk, txv);
    }
  }
  if constexpr (D == 128) {
    const int axis = pairs != PairMode::kOff ? cached_pair_axis(p) : -1;
    // A cluster per pair along the axis (and per lone last tile of an odd count), where
    // gna::pairs_pay (past 1.75 waves, long enough query tiles) or under "force".
    const int64_t clusters = axis >= 0 ? pair_clusters(p, axis, nqtiles) : 0;
    if (axis >= 0 && 2 * clusters < (int64_t{1} << 31) &&
        (pairs == PairMode::kForce || pairs_pay(2 * clusters * p.H * p.B, sm_count(), plan.visits, nqtiles))) {
      using LP = FwdLayout<D, KT, S, 1, false, true>;
      static_assert(LP::smem_bytes() <= kMaxSmem, "forward tiles exceed shared memory");
      auto kp = sm90::fwd_pair_sm90_kernel<T, D, KT, S>;
      if (cudaError_t e = set_smem(kp, LP::smem_bytes()); e != cudaSuccess) return e;
      used = true;
      const dim3 grid_p(static_cast<unsigned>(2 * clusters), p.H, p.B);
      if (launch_sm90_cluster(kp, grid_p, LP::smem_bytes(), stream, pdl_from_env(), 2, p, tq, tk, tv, to,
                              sm90::tile_divs(p), axis) == cudaSuccess)
        return cudaSuccess;
      // No cluster of two fits (e.g. an MPS or MIG share without two SMs of one GPC): the
      // one-tile kernel below (a partial launch's tiles are written twice, the same bits).
      cudaGetLastError();
    }
  }
  if (pairs == PairMode::kForce) return cudaErrorNotSupported;
  if (cudaError_t e = set_smem(kern, smem); e != cudaSuccess) return e;
  used = true;
  return launch_sm90(kern, grid, smem, stream, pdl_from_env(), p, tq, tk, tv, to, sm90::tile_divs(p));
}

// Whether a dK/dV grid of `ctas` blocks launches its key tiles heaviest first: by default
// on grids of at most kOrderWaves waves (CTAs per SM). JAX_GNA_DKV_ORDER (a measurement
// switch, read per call): "0" always tile order, "1" always heaviest first.
constexpr int64_t kOrderWaves = 16;
bool dkv_heaviest_first(int64_t ctas) {
  const char* e = std::getenv("JAX_GNA_DKV_ORDER");
  if (e && std::strcmp(e, "0") == 0) return false;
  if (e && std::strcmp(e, "1") == 0) return true;
  return ctas <= kOrderWaves * sm_count();
}

// The dK/dV grid's block order (sm90::dkv_order) for the key tiling in `pk`, cached like
// the plans: building it visits every key tile, which would cost more host time per call
// than the launch itself. Returned by value (about 2 KB, copied into the launch anyway).
sm90::TileOrder cached_dkv_order(const Params& pk, int64_t nk) {
  static HostCache<sm90::TileOrder> cache;
  std::vector<int> key = geometry_key(pk, {static_cast<int>(nk)});
  for (int a = 0; a < 3; ++a) key.insert(key.end(), {pk.ax[a].qt, pk.ax[a].nqt, pk.ax[a].kt, pk.ax[a].nkt});
  return cache.get(key, [&] {
    sm90::TileOrder order;
    sm90::dkv_order(pk, nk, order);
    return order;
  });
}

// Backward: dQ with 128-query x 64-key tiles, dK/dV with 128-key x 64-query tiles.
template <typename T, int D>
cudaError_t bwd_sm90(DType dt, const Params& p, cudaStream_t stream, bool& used) {
  constexpr int S = stages_of<T, D>(), SK = dkv_stages<D>();
  auto kdq = sm90::dq_sm90_kernel<T, D, S>;
  auto kdkv = sm90::dkv_sm90_kernel<T, D, SK>;
  if (!sm90_device(reinterpret_cast<void*>(kdq))) return cudaSuccess;
  const Plan plq = cached_plan(p, 128, 64), plk = cached_plan(p, 64, 128);
  if (!plq.ok || !plk.ok) return cudaSuccess;
  Params pq = p, pk = p;
  const int64_t nq = apply_plan(pq, plq, true), nk = apply_plan(pk, plk, false);
  if (nq >= (int64_t{1} << 31) || nk >= (int64_t{1} << 31)) return cudaSuccess;
  int qn[3], kn[3];
  for (int a = 0; a < 3; ++a) { qn[a] = p.ax[a].qn; kn[a] = p.ax[a].kvn; }
  const int HD = p.H * D, KD = p.Hkv * D, Bkv = p.B / p.kvb, Bdkv = p.B / p.dkvb;
  CUtensorMap q1, k1, v1, do1, dq1, q2, k2, v2, do2, dk2, dv2;
  const bool ok = make_map(&q1, dt, p.q, p.B, qn, HD, plq.qt) && make_map(&k1, dt, p.k, Bkv, kn, KD, plq.kt) &&
                  make_map(&v1, dt, p.v, Bkv, kn, KD, plq.kt) && make_map(&do1, dt, p.dout, p.B, qn, HD, plq.qt) &&
                  make_map(&dq1, dt, p.dq, p.B, qn, HD, plq.qt) && make_map(&q2, dt, p.q, p.B, qn, HD, plk.qt) &&
                  make_map(&k2, dt, p.k, Bkv, kn, KD, plk.kt) && make_map(&v2, dt, p.v, Bkv, kn, KD, plk.kt) &&
                  make_map(&do2, dt, p.dout, p.B, qn, HD, plk.qt) && make_map(&dk2, dt, p.dk, Bdkv, kn, KD, plk.kt) &&
                  make_map(&dv2, dt, p.dv, Bdkv, kn, KD, plk.kt);
  if (!ok) return cudaSuccess;
  static_assert(sm90::DqLayout<D, S>::smem_bytes() <= kMaxSmem, "dQ tiles exceed shared memory");
  static_assert(sm90::DkvLayout<D, SK>::smem_bytes() <= kMaxSmem, "dK/dV tiles exceed shared memory");
  const size_t sq = sm90::DqLayout<D, S>::smem_bytes(), sk = sm90::DkvLayout<D, SK>::smem_bytes();
  if (cudaError_t e = set_smem(kdq, sq); e != cudaSuccess) return e;
  if (cudaError_t e = set_smem(kdkv, sk); e != cudaSuccess) return e;
  used = true;
  const bool pdl = pdl_from_env();
  if (cudaError_t e = launch_sm90(kdq, dim3(static_cast<unsigned>(nq), p.H, p.B), sq, stream, pdl, pq, q1, k1, v1,
                                  do1, dq1, sm90::tile_divs(pq));
      e != cudaSuccess)
    return e;
  // Heaviest first on grids of few waves, where the last wave's imbalance is a large share
  // of the time (H200, bf16, forward+backward, tile order -> heaviest first: 1-D window
  // 2048 stride 256, 1 head 308 -> 280 us, 8 heads (15.5 waves) 2.223 -> 2.180 ms; 2-D
  // s16x16 1 head 1.641 -> 1.570 ms). Longer grids keep tile order, which runs neighbouring
  // key tiles (they read the same query tiles) side by side: there heaviest first measured
  // -1.0% to +1.7% (2-D s16x16 and 3-D s16x8x8 with 24 heads), for a model gain under 1%,
  // and on the 2-D grid it drops the L2 hit rate from 93.8% to 82.3% (DRAM reads 1.8 ->
  // 5.5 GB per launch; Nsight Compute, benchmarks/results/dkv-order-h200.md).
  sm90::TileOrder order;
  order.n = 0;
  if (dkv_heaviest_first(nk * p.Hkv * Bdkv)) order = cached_dkv_order(pk, nk);
  return launch_sm90(kdkv, dim3(static_cast<unsigned>(nk), p.Hkv, Bdkv), sk, stream, pdl, pk, q2, k2, v2, do2, dk2,
                     dv2, order, sm90::tile_divs(pk));
}

// fp16/bf16, D = D_v, no dilation; head dims {64, 128, 256} forward, {64, 128} backward.
bool eligible(DType dt, const Params& p, bool backward) {
  if (dt == DType::kF32 || p.D != p.Dv || (p.D != 64 && p.D != 128 && (backward || p.D != 256))) return false;
  for (int a = 0; a < 3; ++a)
    if (p.ax[a].d != 1) return false;
  return true;
}

template <typename T>
cudaError_t fwd_sm90_dim(DType dt, const Params& p, cudaStream_t stream, bool& used) {
  const Plan plan = fwd_plan(p);
  if (!plan.ok) return cudaSuccess;
  const bool short_keys = key_tokens(plan) == 64;
  if (p.D == 256) return fwd_sm90<T, 256, 64>(dt, p, plan, stream, used);
  if (p.D == 64)
    return short_keys ? fwd_sm90<T, 64, 64>(dt, p, plan, stream, used)
                      : fwd_sm90<T, 64, 128>(dt, p, plan, stream, used);
  return short_keys ? fwd_sm90<T, 128, 64>(dt, p, plan, stream, used)
                    : fwd_sm90<T, 128, 128>(dt, p, plan, stream, used);
}

cudaError_t try_forward_sm90(DType dt, const Params& p, cudaStream_t stream, bool& used) {
  if (!eligible(dt, p, false)) return cudaSuccess;
  return dt == DType::kF16 ? fwd_sm90_dim<__half>(dt, p, stream, used)
                           : fwd_sm90_dim<__nv_bfloat16>(dt, p, stream, used);
}

cudaError_t try_backward_sm90(DType dt, const Params& p, cudaStream_t stream, bool& used) {
  if (!eligible(dt, p, true)) return cudaSuccess;
  if (dt == DType::kF16)
    return p.D == 64 ? bwd_sm90<__half, 64>(dt, p, stream, used) : bwd_sm90<__half, 128>(dt, p, stream, used);
  return p.D == 64 ? bwd_sm90<__nv_bfloat16, 64>(dt, p, stream, used) : bwd_sm90<__nv_bfloat16, 128>(dt, p, stream, used);
}

// JAX_GNA_SM90_BWD: "0" keeps the backward on the sm80 kernels (the forward may still
// take the Hopper path); "force" makes a backward call the Hopper kernels cannot take
// fail. JAX_GNA_SM90=0 turns both off.
Mode bwd_mode_from_env() {
  if (mode_from_env() == Mode::kOff) return Mode::kOff;
  const char* e = std::getenv("JAX_GNA_SM90_BWD");
  if (e && std::strcmp(e, "0") == 0) return Mode::kOff;
  if (e && std::strcmp(e, "force") == 0) return Mode::kForce;
  return Mode::kAuto;
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

cudaError_t launch_backward_sm90(DType dt, const Params& p, cudaStream_t stream, bool& used) {
  used = false;
  const Mode mode = bwd_mode_from_env();
  if (mode == Mode::kOff) return cudaSuccess;
  const cudaError_t e = try_backward_sm90(dt, p, stream, used);
  if (e == cudaSuccess && !used && mode == Mode::kForce) return cudaErrorNotSupported;
  return e;
}

}  // namespace gna
