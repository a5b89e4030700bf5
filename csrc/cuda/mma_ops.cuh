// Warp-level building blocks of the CUDA local attention kernels: PTX wrappers (cp.async,
// ldmatrix, mma.sync m16n8k16) and, per storage type, the fragment operations the kernels
// are written in. The kernels never name a fragment layout: they call load_a / load_b2 /
// a_from_c / mma, so one kernel template serves float16, bfloat16 and float32.
//
// float32 runs on the same bf16 tensor cores through a three-way split: x = hi + mid + lo,
// each a bfloat16 (8 significant bits each, 24 together: a float32 mantissa). A product keeps
// the six terms of order <= 2 (hi*hi, hi*mid, mid*hi, hi*lo, mid*mid, lo*hi); the dropped terms
// are below 2**-24 relative, so products carry float32 accuracy, and accumulation is float32.
// No TF32 is involved.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace fastattn::cuda {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy; reads nothing and writes zeros when !valid.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __half>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float x, float y) {
  if constexpr (std::is_same_v<T, __half>) {
    __half2 v = __floats2half2_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&v);
  } else {
    __nv_bfloat162 v = __floats2bfloat162_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&v);
  }
}

// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4): A (16 x 16) r0 = (g, 2t..2t+1),
// r1 = (g + 8, 2t..), r2 = (g, 2t + 8..), r3 = (g + 8, 2t + 8..); B (16 x 8) r0 = (k 2t..2t+1,
// n g), r1 = (k 2t + 8.., n g); C (16 x 8) c0,c1 = (g, 2t..2t+1), c2,c3 = (g + 8, 2t..).
// Shared-memory tiles are row-major with a padded leading dimension `ld` (elements).
template <typename T>
struct HalfOps {
  using Elem = T;
  struct A {
    uint32_t r[4];
  };
  struct B {
    uint32_t r[2];
  };

  // A = s[m0 .. m0+16)[k0 .. k0+16).
  static __device__ __forceinline__ void load_a(A& a, const T* s, int ld, int m0, int k0,
                                                int lane) {
    ldmatrix_x4(a.r, s + (m0 + (lane & 15)) * ld + k0 + (lane >> 4) * 8);
  }
  // A[m][k] = s[k][m]: the tile is stored transposed.
  static __device__ __forceinline__ void load_a_t(A& a, const T* s, int ld, int m0, int k0,
                                                  int lane) {
    const int mat = lane >> 3;
    ldmatrix_x4_trans(a.r, s + (k0 + (mat >> 1) * 8 + (lane & 7)) * ld + m0 + (mat & 1) * 8);
  }
  // B for n-tiles [n0, n0+8) and [n0+8, n0+16), k in [k0, k0+16), with B[k][n] = s[n][k].
  static __device__ __forceinline__ void load_b2(B& b0, B& b1, const T* s, int ld, int n0, int k0,
                                                 int lane) {
    uint32_t r[4];
    ldmatrix_x4(r, s + (n0 + (lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8);
    b0.r[0] = r[0], b0.r[1] = r[1], b1.r[0] = r[2], b1.r[1] = r[3];
  }
  // Same, with B[k][n] = s[k][n].
  static __device__ __forceinline__ void load_b2_t(B& b0, B& b1, const T* s, int ld, int n0,
                                                   int k0, int lane) {
    uint32_t r[4];
    ldmatrix_x4_trans(r, s + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0 + (lane >> 4) * 8);
    b0.r[0] = r[0], b0.r[1] = r[1], b1.r[0] = r[2], b1.r[1] = r[3];
  }
  // The A operand (16 x 16) held by two C accumulators covering columns [0, 8) and [8, 16).
  static __device__ __forceinline__ void a_from_c(A& a, const float (&c0)[4], const float (&c1)[4]) {
    a.r[0] = pack2<T>(c0[0], c0[1]);
    a.r[1] = pack2<T>(c0[2], c0[3]);
    a.r[2] = pack2<T>(c1[0], c1[1]);
    a.r[3] = pack2<T>(c1[2], c1[3]);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const A& a, const B& b) {
    mma16816<T>(c, a.r, b.r);
  }
  // Two adjacent output elements (x at p[0], y at p[1]); p is 4-byte aligned.
  static __device__ __forceinline__ void store2(T* p, float x, float y) {
    *reinterpret_cast<uint32_t*>(p) = pack2<T>(x, y);
  }
};

struct FloatOps {
  using Elem = float;
  // [0] hi, [1] mid, [2] lo parts.
  struct A {
    uint32_t r[3][4];
  };
  struct B {
    uint32_t r[3][2];
  };

  static __device__ __forceinline__ void split(float x, float y, uint32_t& hi, uint32_t& mid,
                                               uint32_t& lo) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    const float2 hf = __bfloat1622float2(h);
    const float rx = x - hf.x, ry = y - hf.y;  // exact in float32
    const __nv_bfloat162 m = __floats2bfloat162_rn(rx, ry);
    const float2 mf = __bfloat1622float2(m);
    const __nv_bfloat162 l = __floats2bfloat162_rn(rx - mf.x, ry - mf.y);
    hi = *reinterpret_cast<const uint32_t*>(&h);
    mid = *reinterpret_cast<const uint32_t*>(&m);
    lo = *reinterpret_cast<const uint32_t*>(&l);
  }
  template <int N>
  static __device__ __forceinline__ void split_into(uint32_t (&r)[3][N], int i, float x, float y) {
    split(x, y, r[0][i], r[1][i], r[2][i]);
  }
  static __device__ __forceinline__ float2 ld2(const float* p) {
    return *reinterpret_cast<const float2*>(p);
  }

  static __device__ __forceinline__ void load_a(A& a, const float* s, int ld, int m0, int k0,
                                                int lane) {
    const float* p = s + (m0 + (lane >> 2)) * ld + k0 + 2 * (lane & 3);
    const float2 v0 = ld2(p), v1 = ld2(p + 8 * ld), v2 = ld2(p + 8), v3 = ld2(p + 8 * ld + 8);
    split_into(a.r, 0, v0.x, v0.y);
    split_into(a.r, 1, v1.x, v1.y);
    split_into(a.r, 2, v2.x, v2.y);
    split_into(a.r, 3, v3.x, v3.y);
  }
  static __device__ __forceinline__ void load_a_t(A& a, const float* s, int ld, int m0, int k0,
                                                  int lane) {
    const float* p = s + (k0 + 2 * (lane & 3)) * ld + m0 + (lane >> 2);
    split_into(a.r, 0, p[0], p[ld]);
    split_into(a.r, 1, p[8], p[ld + 8]);
    split_into(a.r, 2, p[8 * ld], p[9 * ld]);
    split_into(a.r, 3, p[8 * ld + 8], p[9 * ld + 8]);
  }
  static __device__ __forceinline__ void load_b2(B& b0, B& b1, const float* s, int ld, int n0,
                                                 int k0, int lane) {
    const float* p = s + (n0 + (lane >> 2)) * ld + k0 + 2 * (lane & 3);
    const float2 v0 = ld2(p), v1 = ld2(p + 8), v2 = ld2(p + 8 * ld), v3 = ld2(p + 8 * ld + 8);
    split_into(b0.r, 0, v0.x, v0.y);
    split_into(b0.r, 1, v1.x, v1.y);
    split_into(b1.r, 0, v2.x, v2.y);
    split_into(b1.r, 1, v3.x, v3.y);
  }
  static __device__ __forceinline__ void load_b2_t(B& b0, B& b1, const float* s, int ld, int n0,
                                                   int k0, int lane) {
    const float* p = s + (k0 + 2 * (lane & 3)) * ld + n0 + (lane >> 2);
    split_into(b0.r, 0, p[0], p[ld]);
    split_into(b0.r, 1, p[8 * ld], p[9 * ld]);
    split_into(b1.r, 0, p[8], p[ld + 8]);
    split_into(b1.r, 1, p[8 * ld + 8], p[9 * ld + 8]);
  }
  static __device__ __forceinline__ void a_from_c(A& a, const float (&c0)[4], const float (&c1)[4]) {
    split_into(a.r, 0, c0[0], c0[1]);
    split_into(a.r, 1, c0[2], c0[3]);
    split_into(a.r, 2, c1[0], c1[1]);
    split_into(a.r, 3, c1[2], c1[3]);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const A& a, const B& b) {
    // Smallest terms first.
    mma16816<__nv_bfloat16>(c, a.r[2], b.r[0]);
    mma16816<__nv_bfloat16>(c, a.r[1], b.r[1]);
    mma16816<__nv_bfloat16>(c, a.r[0], b.r[2]);
    mma16816<__nv_bfloat16>(c, a.r[1], b.r[0]);
    mma16816<__nv_bfloat16>(c, a.r[0], b.r[1]);
    mma16816<__nv_bfloat16>(c, a.r[0], b.r[0]);
  }
  static __device__ __forceinline__ void store2(float* p, float x, float y) {
    *reinterpret_cast<float2*>(p) = make_float2(x, y);
  }
};

// acc (16 x N) += a (16 x 16) * B, B[k][n] = sB[n][k0 + k]: B^T is stored row-major.
template <class Ops, int N, typename T>
__device__ __forceinline__ void mma_a_bt(float (&acc)[N / 8][4], const typename Ops::A& a,
                                         const T* sB, int ld, int k0, int lane) {
#pragma unroll
  for (int np = 0; np < N / 16; ++np) {
    typename Ops::B b0, b1;
    Ops::load_b2(b0, b1, sB, ld, np * 16, k0, lane);
    Ops::mma(acc[2 * np], a, b0);
    Ops::mma(acc[2 * np + 1], a, b1);
  }
}

// acc (16 x N) += a (16 x 16) * B, B[k][n] = sB[k0 + k][n0 + n]: B is stored row-major.
template <class Ops, int N, typename T>
__device__ __forceinline__ void mma_a_b(float (&acc)[N / 8][4], const typename Ops::A& a,
                                        const T* sB, int ld, int n0, int k0, int lane) {
#pragma unroll
  for (int np = 0; np < N / 16; ++np) {
    typename Ops::B b0, b1;
    Ops::load_b2_t(b0, b1, sB, ld, n0 + np * 16, k0, lane);
    Ops::mma(acc[2 * np], a, b0);
    Ops::mma(acc[2 * np + 1], a, b1);
  }
}

// acc (16 x N) += P * B over K, P (16 x K) held as C fragments p[K / 8][4] (re-packed as A),
// B[k][n] = sB[k][n0 + n].
template <class Ops, int N, int K, typename T>
__device__ __forceinline__ void mma_c_b(float (&acc)[N / 8][4], const float (&p)[K / 8][4],
                                        const T* sB, int ld, int n0, int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    typename Ops::A a;
    Ops::a_from_c(a, p[2 * kk], p[2 * kk + 1]);
    mma_a_b<Ops, N>(acc, a, sB, ld, n0, kk * 16, lane);
  }
}

// acc (16 x N) += A * B over K, A = sA[m0 .. m0 + 16)[0 .. K), B[k][n] = sB[n][k].
template <class Ops, int N, int K, typename T>
__device__ __forceinline__ void mma_smem_bt(float (&acc)[N / 8][4], const T* sA, int ldA, int m0,
                                            const T* sB, int ldB, int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    typename Ops::A a;
    Ops::load_a(a, sA, ldA, m0, kk * 16, lane);
    mma_a_bt<Ops, N>(acc, a, sB, ldB, kk * 16, lane);
  }
}

template <int N>
__device__ __forceinline__ void zero(float (&acc)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
}

template <typename T>
struct OpsFor {
  using type = HalfOps<T>;
};
template <>
struct OpsFor<float> {
  using type = FloatOps;
};

}  // namespace fastattn::cuda
