// Hopper (sm_90a) primitives in inline PTX: mbarriers, TMA (cp.async.bulk.tensor),
// wgmma with shared-memory descriptors, register reallocation, named barriers.
// Everything here compiles to nothing on other targets (callers guard their
// kernels with GNA_SM90_ENABLED).
//
// Shared-memory tiles for wgmma use the 128-byte swizzle: a tile of R rows and 64
// 16-bit columns is R rows of 128 bytes, and the 16-byte chunk c of row r sits at
// chunk c ^ (r % 8). Head dims above 64 are stored as D / 64 such tiles one after
// the other ("halves"). TMA writes exactly this layout (CU_TENSOR_MAP_SWIZZLE_128B
// with a 64-element inner box), and wgmma reads it through descriptors:
//   K-major (rows = M or N, 64 columns = K):   SBO = 1024 bytes (8 rows), LBO unused;
//     the k16 step s of a half starts 32 * s bytes into the row.
//   MN-major (rows = K, 64 columns = N):       SBO = 1024 bytes (8 K rows),
//     LBO = bytes between two 64-column halves; the k16 step s starts 16 rows down.
// Tiles must start on 1024-byte boundaries (the swizzle phase is the address).
#pragma once
#include <cstdint>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GNA_SM90_ENABLED 1
#endif

namespace gna {
namespace sm90 {

__device__ __forceinline__ uint32_t saddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

#if defined(GNA_SM90_ENABLED)

// ---- mbarrier ---------------------------------------------------------------------
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_fence_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Arrives on the mbarrier at the same shared-memory offset in CTA `rank` of the cluster
// (release semantics at CTA scope, the default: the caller's reads of what the barrier
// guards have completed before it, e.g. a wgmma waited for).
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t bar, uint32_t rank) {
  asm volatile(
      "{\n.reg .b32 r;\n"
      "mapa.shared::cluster.u32 r, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [r];\n}\n" ::"r"(bar),
      "r"(rank)
      : "memory");
}
// Every thread of every CTA of the cluster (mbarrier inits visible cluster-wide after it).
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// Blocks until the phase with the given parity has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}

// ---- TMA ------------------------------------------------------------------------
__device__ __forceinline__ void tma_prefetch_desc(const void* tmap) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(tmap)) : "memory");
}
// 5-D tiled load into shared memory; completes `bytes` on the mbarrier.
__device__ __forceinline__ void tma_load_5d(uint32_t dst, const void* tmap, uint32_t bar, int c0, int c1,
                                            int c2, int c3, int c4) {
  asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5, %6}], [%7];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4), "r"(bar)
      : "memory");
}
// The same load into the same shared-memory offset of every CTA of the cluster in `mask`,
// completing bytes on each one's mbarrier at `bar`'s offset.
__device__ __forceinline__ void tma_load_5d_multicast(uint32_t dst, const void* tmap, uint32_t bar, uint16_t mask,
                                                      int c0, int c1, int c2, int c3, int c4) {
  asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%2, %3, %4, %5, %6}], [%7], %8;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4), "r"(bar), "h"(mask)
      : "memory");
}
// 5-D tiled store from shared memory (elements outside the tensor are not written).
__device__ __forceinline__ void tma_store_5d(const void* tmap, uint32_t src, int c0, int c1, int c2, int c3,
                                             int c4) {
  asm volatile(
      "cp.async.bulk.tensor.5d.global.shared::cta.bulk_group [%0, {%1, %2, %3, %4, %5}], [%6];\n" ::"l"(
          reinterpret_cast<uint64_t>(tmap)),
      "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4), "r"(src)
      : "memory");
}
__device__ __forceinline__ void tma_store_commit_and_wait() {
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
  asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
}
// Generic-proxy writes to shared memory become visible to the async proxy (TMA).
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// ---- programmatic dependent launch ----------------------------------------------------
// A kernel launched with programmatic stream serialization may start before the kernel
// ahead of it in the stream has finished. grid_dependency_wait() blocks until that
// kernel has completed and its writes are visible (a no-op for a normal launch); every
// Hopper kernel calls it before its first global memory access, or (dK/dV, whose inputs
// are ready once every dQ block has passed its own wait) before it exits, so that its
// completion still implies its predecessor's. launch_dependents() lets the next
// kernel in the stream, if launched that way, start once every block has called it.
__device__ __forceinline__ void grid_dependency_wait() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }
__device__ __forceinline__ void launch_dependents() {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}

// ---- warp scheduling ----------------------------------------------------------------
template <int N> __device__ __forceinline__ void regs_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N> __device__ __forceinline__ void regs_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// ---- wgmma --------------------------------------------------------------------------
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// wg_wait<0> spelled differently (a PTX comment), for the other side of a branch that
// must keep its own wait (identical asm on both sides would be merged above the branch).
__device__ __forceinline__ void wg_wait_0_alt() {
  asm volatile("wgmma.wait_group.sync.aligned 0; // alt\n" ::: "memory");
}
// Keeps the compiler from moving accumulator accesses across an async wgmma.
template <int N> __device__ __forceinline__ void reg_fence(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Shared-memory matrix descriptor, 128-byte swizzle.
__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (static_cast<uint64_t>(sbo >> 4) << 32) | (uint64_t{1} << 62);
}
// The descriptor of the same layout `bytes` further on (a multiple of 16; shared memory
// stays below 256 KiB, so the 14-bit address field never carries): one add instead of
// rebuilding the descriptor before every wgmma.
__device__ __forceinline__ uint64_t desc_plus(uint64_t d, uint32_t bytes) { return d + (bytes >> 4); }

// The warpgroup index as a value the compiler knows is the same across the warp (so
// addresses derived from it live in uniform registers, as wgmma descriptors must).
__device__ __forceinline__ int warpgroup_index() { return __shfl_sync(0xffffffffu, threadIdx.x / 128, 0); }

#define GNA_ACC32                                                                                   \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, " \
  "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define GNA_ACC64                                                                                   \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, " \
  "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, "  \
  "%40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, "  \
  "%59, %60, %61, %62, %63}"
#define GNA_OUT8(i)                                                                                 \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]),      \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define GNA_OUT32 GNA_OUT8(0), GNA_OUT8(8), GNA_OUT8(16), GNA_OUT8(24)
#define GNA_OUT64 GNA_OUT32, GNA_OUT8(32), GNA_OUT8(40), GNA_OUT8(48), GNA_OUT8(56)
// Write-only accumulators (the first k slice of a product that starts from zero): the
// old values are not inputs, so the compiler keeps nothing alive for them.
#define GNA_NEW8(i)                                                                                 \
  "=f"(d[i]), "=f"(d[i + 1]), "=f"(d[i + 2]), "=f"(d[i + 3]), "=f"(d[i + 4]), "=f"(d[i + 5]),      \
      "=f"(d[i + 6]), "=f"(d[i + 7])
#define GNA_NEW32 GNA_NEW8(0), GNA_NEW8(8), GNA_NEW8(16), GNA_NEW8(24)
#define GNA_NEW64 GNA_NEW32, GNA_NEW8(32), GNA_NEW8(40), GNA_NEW8(48), GNA_NEW8(56)

// D[64 x N] (+)= A[64 x 16] * B[16 x N], A and B in shared memory, N = 128 (64
// accumulators) or 64 (32). ty: "f16" or "bf16". A is K-major; B is K-major (TB = 0,
// wgmma_ss_*) or MN-major, "transposed" (TB = 1, wgmma_ss_tb_*: the dK/dV kernel's
// dV += P^T dO and dK += dS^T Q with P^T and dS^T staged in shared memory).
// accumulate = 0 ignores D's old value; the _first variant (D = A B) does not read it.
#define GNA_WGMMA_SS(name, ty, n, nacc, ACC, OUT, NEW, DA, DB, FLAG, TB)                            \
  __device__ __forceinline__ void wgmma_##name##_n##n##_##ty(float (&d)[nacc], uint64_t da,         \
                                                             uint64_t db, int accumulate) {         \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " FLAG ", 0;\n"                                \
                 "wgmma.mma_async.sync.aligned.m64n" #n "k16.f32." #ty "." #ty " " ACC              \
                 ", " DA ", " DB ", p, 1, 1, 0, " #TB ";\n}\n"                                     \
                 : OUT                                                                              \
                 : "l"(da), "l"(db), "r"(accumulate));                                              \
  }                                                                                                 \
  __device__ __forceinline__ void wgmma_##name##_n##n##_##ty##_first(float (&d)[nacc], uint64_t da, \
                                                                     uint64_t db) {                 \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " FLAG ", 0;\n"                                \
                 "wgmma.mma_async.sync.aligned.m64n" #n "k16.f32." #ty "." #ty " " ACC              \
                 ", " DA ", " DB ", p, 1, 1, 0, " #TB ";\n}\n"                                     \
                 : NEW                                                                              \
                 : "l"(da), "l"(db), "r"(0));                                                       \
  }
// D[64 x N] += A[64 x 16] * B[16 x N], A from registers (the m16n8k16 A fragment of
// each warp's 16 rows), B MN-major ("transposed") in shared memory.
// TAIL names the A registers, the descriptor and the accumulate flag after the
// NACC accumulators.
#define GNA_WGMMA_RS(ty, n, nacc, ACC, OUT, TAIL, PRED)                                            \
  __device__ __forceinline__ void wgmma_rs_n##n##_##ty(float (&d)[nacc], const uint32_t (&a)[4],    \
                                                       uint64_t db) {                               \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " PRED ", 0;\n"                                  \
                 "wgmma.mma_async.sync.aligned.m64n" #n "k16.f32." #ty "." #ty " " ACC ", " TAIL  \
                 ", p, 1, 1, 1;\n}\n"                                                              \
                 : OUT                                                                              \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));                   \
  }
#define GNA_RS_TAIL32 "{%32, %33, %34, %35}, %36"
#define GNA_RS_TAIL64 "{%64, %65, %66, %67}, %68"

#define GNA_SS_N128(name, ty, TB) GNA_WGMMA_SS(name, ty, 128, 64, GNA_ACC64, GNA_OUT64, GNA_NEW64, "%64", "%65", "%66", TB)
#define GNA_SS_N64(name, ty, TB) GNA_WGMMA_SS(name, ty, 64, 32, GNA_ACC32, GNA_OUT32, GNA_NEW32, "%32", "%33", "%34", TB)
GNA_SS_N128(ss, f16, 0)
GNA_SS_N128(ss, bf16, 0)
GNA_SS_N64(ss, f16, 0)
GNA_SS_N64(ss, bf16, 0)
GNA_SS_N128(ss_tb, f16, 1)
GNA_SS_N128(ss_tb, bf16, 1)
GNA_SS_N64(ss_tb, f16, 1)
GNA_SS_N64(ss_tb, bf16, 1)
GNA_WGMMA_RS(f16, 64, 32, GNA_ACC32, GNA_OUT32, GNA_RS_TAIL32, "%37")
GNA_WGMMA_RS(bf16, 64, 32, GNA_ACC32, GNA_OUT32, GNA_RS_TAIL32, "%37")
GNA_WGMMA_RS(f16, 128, 64, GNA_ACC64, GNA_OUT64, GNA_RS_TAIL64, "%69")
GNA_WGMMA_RS(bf16, 128, 64, GNA_ACC64, GNA_OUT64, GNA_RS_TAIL64, "%69")

#endif  // GNA_SM90_ENABLED

}  // namespace sm90
}  // namespace gna
