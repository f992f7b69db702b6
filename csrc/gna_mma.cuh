// Warp-level matrix primitives for sm80+: cp.async tile loads and mma.sync.
//
//   fp16 / bf16: mma.sync m16n8k16, fp32 accumulation.
//   fp32:        mma.sync m16n8k8 TF32 with the 3xTF32 split (a = big + small,
//                a*b ~ big*big + big*small + small*big), accurate to about fp32
//                rounding (the small*small term, ~2^-22 relative, is dropped).
//
// Fragments (lane = 4 * gid + tig):
//   C (16x8, fp32):  c0,c1: row gid, cols 2tig, 2tig+1;  c2,c3: row gid+8.
//   A from smem (row-major [m][k]), B from smem as X^T (X row-major [n][k]) or as X
//   (X row-major [k][n]). When A is built from C-layout registers (P, dS), the k
//   order inside a step may be permuted as long as B's k rows are permuted the same
//   way; the fp32 path uses that (k index tig <-> key 2tig, tig+4 <-> key 2tig+1).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace gna {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global->shared; src_bytes = 0 writes zeros (src not read).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::); }
// Wait until at most N committed groups are still in flight.
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <typename T> struct Mma;

template <typename T> struct Mma16 {
  static constexpr int K = 16;  // k per mma
  static __device__ __forceinline__ uint32_t ld32(const T* p) {
    return *reinterpret_cast<const uint32_t*>(p);
  }
  static __device__ __forceinline__ uint32_t pack(T lo, T hi) {
    uint16_t l = *reinterpret_cast<uint16_t*>(&lo), h = *reinterpret_cast<uint16_t*>(&hi);
    return static_cast<uint32_t>(l) | (static_cast<uint32_t>(h) << 16);
  }
  // A: rows r0..r0+15, cols k0..k0+15 of a row-major tile.
  static __device__ __forceinline__ void load_a(const T* s, int ld, int r0, int k0, uint32_t a[4]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const T* p = s + (r0 + g) * ld + k0 + 2 * t;
    a[0] = ld32(p);
    a[1] = ld32(p + 8 * ld);
    a[2] = ld32(p + 8);
    a[3] = ld32(p + 8 * ld + 8);
  }
  // B = X^T, X row-major [n][k]: n0..n0+7, k0..k0+15.
  static __device__ __forceinline__ void load_b_nk(const T* s, int ld, int n0, int k0, uint32_t b[2]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const T* p = s + (n0 + g) * ld + k0 + 2 * t;
    b[0] = ld32(p);
    b[1] = ld32(p + 8);
  }
  // B = X, X row-major [k][n]: k0..k0+15, n0..n0+7 (ldmatrix.trans of two 8x8 blocks:
  // lanes 0-7 address rows k0..k0+7, lanes 8-15 rows k0+8..k0+15; 16-byte aligned rows).
  static __device__ __forceinline__ void load_b_kn(const T* s, int ld, int k0, int n0, uint32_t b[2]) {
    const int lane = threadIdx.x & 31;
    const T* p = s + (k0 + (lane & 15)) * ld + n0;
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(b[0]), "=r"(b[1])
                 : "r"(smem_addr(p)));
  }
  // Two B fragments (n-tiles n0 and n0+8) of X row-major [k][n] in one ldmatrix.x4.trans.
  static __device__ __forceinline__ void load_b_kn2(const T* s, int ld, int k0, int n0, uint32_t b[2][2]) {
    const int lane = threadIdx.x & 31, mi = lane >> 3;
    const T* p = s + (k0 + (lane & 7) + (mi & 1) * 8) * ld + n0 + (mi >> 1) * 8;
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(b[0][0]), "=r"(b[0][1]), "=r"(b[1][0]), "=r"(b[1][1])
                 : "r"(smem_addr(p)));
  }
};

template <> struct Mma<__half> : Mma16<__half> {
  static __device__ __forceinline__ uint32_t cvt2(float x, float y) {
    __half2 h = __floats2half2_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  // A (16 x 16 keys) from C-layout accumulators c[2*ks], c[2*ks+1].
  static __device__ __forceinline__ void a_from_acc(const float (*c)[4], int ks, uint32_t a[4]) {
    a[0] = cvt2(c[2 * ks][0], c[2 * ks][1]);
    a[1] = cvt2(c[2 * ks][2], c[2 * ks][3]);
    a[2] = cvt2(c[2 * ks + 1][0], c[2 * ks + 1][1]);
    a[3] = cvt2(c[2 * ks + 1][2], c[2 * ks + 1][3]);
  }
  static __device__ __forceinline__ void mma(float c[4], const uint32_t a[4], const uint32_t b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

template <> struct Mma<__nv_bfloat16> : Mma16<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t cvt2(float x, float y) {
    __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void a_from_acc(const float (*c)[4], int ks, uint32_t a[4]) {
    a[0] = cvt2(c[2 * ks][0], c[2 * ks][1]);
    a[1] = cvt2(c[2 * ks][2], c[2 * ks][3]);
    a[2] = cvt2(c[2 * ks + 1][0], c[2 * ks + 1][1]);
    a[3] = cvt2(c[2 * ks + 1][2], c[2 * ks + 1][3]);
  }
  static __device__ __forceinline__ void mma(float c[4], const uint32_t a[4], const uint32_t b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

template <> struct Mma<float> {
  static constexpr int K = 8;
  static __device__ __forceinline__ uint32_t f2u(float x) { return __float_as_uint(x); }
  static __device__ __forceinline__ void load_a(const float* s, int ld, int r0, int k0, uint32_t a[4]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const float* p = s + (r0 + g) * ld + k0 + t;
    a[0] = f2u(p[0]);
    a[1] = f2u(p[8 * ld]);
    a[2] = f2u(p[4]);
    a[3] = f2u(p[8 * ld + 4]);
  }
  static __device__ __forceinline__ void load_b_nk(const float* s, int ld, int n0, int k0, uint32_t b[2]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const float* p = s + (n0 + g) * ld + k0 + t;
    b[0] = f2u(p[0]);
    b[1] = f2u(p[4]);
  }
  // Permuted k order (see the file comment): k index t <-> row 2t, t+4 <-> row 2t+1.
  static __device__ __forceinline__ void load_b_kn(const float* s, int ld, int k0, int n0, uint32_t b[2]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const float* p = s + (k0 + 2 * t) * ld + n0 + g;
    b[0] = f2u(p[0]);
    b[1] = f2u(p[ld]);
  }
  static __device__ __forceinline__ void load_b_kn2(const float* s, int ld, int k0, int n0, uint32_t b[2][2]) {
    load_b_kn(s, ld, k0, n0, b[0]);
    load_b_kn(s, ld, k0, n0 + 8, b[1]);
  }
  static __device__ __forceinline__ void a_from_acc(const float (*c)[4], int ks, uint32_t a[4]) {
    a[0] = f2u(c[ks][0]);
    a[1] = f2u(c[ks][2]);
    a[2] = f2u(c[ks][1]);
    a[3] = f2u(c[ks][3]);
  }
  static __device__ __forceinline__ uint32_t tf32(uint32_t x) {
    uint32_t r;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "r"(x));
    return r;
  }
  static __device__ __forceinline__ void mma1(float c[4], const uint32_t a[4], const uint32_t b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
  static __device__ __forceinline__ void mma(float c[4], const uint32_t a[4], const uint32_t b[2]) {
    uint32_t ab[4], as[4], bb[2], bs[2];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      ab[i] = tf32(a[i]);
      as[i] = tf32(f2u(__uint_as_float(a[i]) - __uint_as_float(ab[i])));
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      bb[i] = tf32(b[i]);
      bs[i] = tf32(f2u(__uint_as_float(b[i]) - __uint_as_float(bb[i])));
    }
    mma1(c, as, bb);
    mma1(c, ab, bs);
    mma1(c, ab, bb);
  }
};

template <typename T> __device__ __forceinline__ void store2(T* p, float x, float y);
template <> __device__ __forceinline__ void store2<__half>(__half* p, float x, float y) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(x, y);
}
template <> __device__ __forceinline__ void store2<__nv_bfloat16>(__nv_bfloat16* p, float x, float y) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(x, y);
}
template <> __device__ __forceinline__ void store2<float>(float* p, float x, float y) {
  *reinterpret_cast<float2*>(p) = make_float2(x, y);
}

}  // namespace gna
