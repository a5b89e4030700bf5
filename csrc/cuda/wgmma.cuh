// Hopper warpgroup MMA (wgmma, sm_90a) wrappers for the forward and backward kernels, and the
// shared-memory matrix descriptors they read. Inline PTX takes no arrays, so the accumulator
// operand lists are spelled out once by macros: d[i][0..3] is the accumulator of columns
// [8i, 8i+8) in mma.m16n8 C-fragment order (rows g and g + 8 of the warp's 16), which is also
// the A-fragment order of a register A. Only compiled for sm_90a (FASTATTN_SM90A); callers
// guard with __CUDA_ARCH_FEAT_SM90_ALL.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace fastattn::cuda {

// Descriptor of a K-major or MN-major tile stored in the 128-byte swizzle layout (rows of
// 128 bytes, 16-byte chunk c of row r at chunk c ^ (r % 8), 1024-byte aligned atoms of 8 rows).
// lbo: bytes between 64-element column blocks (MN-major); sbo: bytes between 8-row groups.
__device__ __forceinline__ uint64_t sw128_desc(const void* smem, uint32_t lbo, uint32_t sbo) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>((lbo & 0x3FFFF) >> 4) << 16) |
         (static_cast<uint64_t>((sbo & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}

// The descriptor of a tile `elements` further on in shared memory: the address field (bits
// 0-13, in 16-byte units) of a descriptor built once plus a constant, instead of a descriptor
// rebuilt from the address at every k-step (its masks and shifts were 12-15% of the Hopper
// kernels' uniform-datapath instructions in SASS: kernel-notes, v3g / b7). No carry leaves the
// field: shared addresses stay below 2^18 bytes, the field's reach.
template <typename T>
__device__ __forceinline__ uint64_t desc_advance(uint64_t desc, int elements) {
  return desc + static_cast<uint64_t>((elements * static_cast<int>(sizeof(T))) >> 4);
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// Waits until at most N committed groups of this warpgroup are still in flight.
template <int N = 0>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving reads of the accumulators above a wgmma_wait.
template <int N>
__device__ __forceinline__ void fence_accumulators(float (&d)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[i][e])::"memory");
}
// Orders ordinary / cp.async writes to shared memory before reads by wgmma (the async proxy).
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Accumulator operand lists: 8 column groups (N = 64, operands %0..%31) and 16 (N = 128).
#define FA_ACC4(i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define FA_ACC_N64 \
  FA_ACC4(0), FA_ACC4(1), FA_ACC4(2), FA_ACC4(3), FA_ACC4(4), FA_ACC4(5), FA_ACC4(6), FA_ACC4(7)
#define FA_ACC_N128                                                                         \
  FA_ACC_N64, FA_ACC4(8), FA_ACC4(9), FA_ACC4(10), FA_ACC4(11), FA_ACC4(12), FA_ACC4(13), \
      FA_ACC4(14), FA_ACC4(15)
#define FA_REGS_N64                                                                      \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23," \
  "%24,%25,%26,%27,%28,%29,%30,%31}"
#define FA_REGS_N128                                                                        \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,"    \
  "%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45," \
  "%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}"

// d (64 x N) (+)= A (64 x 16) * B (16 x N), A and B in shared memory, both K-major (TRANS
// "0, 0") or both MN-major ("1, 1"). DA, DB, ACCUM: the operand numbers of desc_a, desc_b and
// accumulate (after the 4N/8 accumulators).
#define FA_WGMMA_SS(SHAPE, DT, REGS, ACC, DA, DB, ACCUM, TRANS)                     \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " ACCUM ", 0;\n"                    \
               "wgmma.mma_async.sync.aligned." SHAPE ".f32." DT "." DT " " REGS      \
               ", " DA ", " DB ", p, 1, 1, " TRANS ";\n}\n"                           \
               : ACC                                                                   \
               : "l"(desc_a), "l"(desc_b), "r"(accumulate))
// d (64 x N) += A (64 x 16, registers, m16n8k16 A-fragment order) * B (16 x N); B MN-major in
// shared memory (row k holds B[k][0 .. N)). AREGS, DB, ONE: the operand numbers of a, desc_b
// and the constant 1 that sets the accumulate predicate.
#define FA_WGMMA_RS(SHAPE, DT, REGS, ACC, AREGS, DB, ONE)                           \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " ONE ", 0;\n"                      \
               "wgmma.mma_async.sync.aligned." SHAPE ".f32." DT "." DT " " REGS      \
               ", " AREGS ", " DB ", p, 1, 1, 1;\n}\n"                                \
               : ACC                                                                   \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))

// kMnMajor: A and B are MN-major (A stored as its transpose, K rows of M elements; B as K rows
// of N elements), as the backward's dQ = dS K reads dS^T and K.
template <typename T, int N, bool kMnMajor = false>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 8][4], uint64_t desc_a, uint64_t desc_b,
                                         int accumulate) {
  static_assert(N == 64 || N == 128);
  constexpr bool kHalf = std::is_same_v<T, __half>;
  if constexpr (N == 64 && kHalf && kMnMajor) {
    FA_WGMMA_SS("m64n64k16", "f16", FA_REGS_N64, FA_ACC_N64, "%32", "%33", "%34", "1, 1");
  } else if constexpr (N == 64 && kMnMajor) {
    FA_WGMMA_SS("m64n64k16", "bf16", FA_REGS_N64, FA_ACC_N64, "%32", "%33", "%34", "1, 1");
  } else if constexpr (N == 64 && kHalf) {
    FA_WGMMA_SS("m64n64k16", "f16", FA_REGS_N64, FA_ACC_N64, "%32", "%33", "%34", "0, 0");
  } else if constexpr (N == 64) {
    FA_WGMMA_SS("m64n64k16", "bf16", FA_REGS_N64, FA_ACC_N64, "%32", "%33", "%34", "0, 0");
  } else if constexpr (kMnMajor) {
    static_assert(N == 64, "the MN-major form is only instantiated at N = 64");
  } else if constexpr (kHalf) {
    FA_WGMMA_SS("m64n128k16", "f16", FA_REGS_N128, FA_ACC_N128, "%64", "%65", "%66", "0, 0");
  } else {
    FA_WGMMA_SS("m64n128k16", "bf16", FA_REGS_N128, FA_ACC_N128, "%64", "%65", "%66", "0, 0");
  }
}

template <typename T, int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 8][4], const uint32_t (&a)[4],
                                         uint64_t desc_b) {
  static_assert(N == 64 || N == 128);
  if constexpr (N == 64 && std::is_same_v<T, __half>) {
    FA_WGMMA_RS("m64n64k16", "f16", FA_REGS_N64, FA_ACC_N64, "{%32,%33,%34,%35}", "%36", "%37");
  } else if constexpr (N == 64) {
    FA_WGMMA_RS("m64n64k16", "bf16", FA_REGS_N64, FA_ACC_N64, "{%32,%33,%34,%35}", "%36", "%37");
  } else if constexpr (std::is_same_v<T, __half>) {
    FA_WGMMA_RS("m64n128k16", "f16", FA_REGS_N128, FA_ACC_N128, "{%64,%65,%66,%67}", "%68", "%69");
  } else {
    FA_WGMMA_RS("m64n128k16", "bf16", FA_REGS_N128, FA_ACC_N128, "{%64,%65,%66,%67}", "%68", "%69");
  }
}

#undef FA_WGMMA_RS
#undef FA_WGMMA_SS
#undef FA_REGS_N128
#undef FA_REGS_N64
#undef FA_ACC_N128
#undef FA_ACC_N64
#undef FA_ACC4

// S (64 x kBc) = Q (64 x D) K^T for one warpgroup: Q and K tiles in the 128-byte swizzle layout
// (D / 64 column blocks, q_block / k_block elements apart). k-step kk reads 32 bytes at
// (kk % 4) of each 128-byte row of column block kk / 4.
template <typename T, int D, int kBc>
__device__ __forceinline__ void wgmma_qk(float (&s)[kBc / 8][4], const T* q, int q_block,
                                         const T* k, int k_block) {
  const uint64_t da0 = sw128_desc(q, 16, 1024), db0 = sw128_desc(k, 16, 1024);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint64_t da = desc_advance<T>(da0, (kk / 4) * q_block + (kk % 4) * 16);
    const uint64_t db = desc_advance<T>(db0, (kk / 4) * k_block + (kk % 4) * 16);
    wgmma_ss<T, kBc>(s, da, db, kk > 0);
  }
}

// O (64 x D) += P (64 x kBc, registers) V (kBc x D, MN-major, swizzled): key step kk is 16 rows
// (2048 bytes) down; V's column blocks are kBc * 128 bytes apart.
template <typename T, int D, int kBc>
__device__ __forceinline__ void wgmma_pv(float (&o)[D / 8][4], const uint32_t (&pa)[kBc / 16][4],
                                         const T* v) {
  const uint64_t dv0 = sw128_desc(v, kBc * 128, 1024);
#pragma unroll
  for (int kk = 0; kk < kBc / 16; ++kk) {
    wgmma_rs<T, D>(o, pa[kk], desc_advance<T>(dv0, kk * 16 * 64));
  }
}

// D (64 x 64) = A (64 x kK) B (kK x 64), both MN-major and swizzled, each stored as kK rows of
// 64 elements (one 128-byte column block; its rows rows * 128 bytes from the next block):
// the backward's dQ tile = dS K, read from dS^T and K as they lie in shared memory.
template <typename T, int kK>
__device__ __forceinline__ void wgmma_mn_major(float (&d)[8][4], const T* a, int a_rows,
                                               const T* b, int b_rows) {
  const uint64_t da0 = sw128_desc(a, a_rows * 128, 1024), db0 = sw128_desc(b, b_rows * 128, 1024);
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    wgmma_ss<T, 64, true>(d, desc_advance<T>(da0, kk * 16 * 64), desc_advance<T>(db0, kk * 16 * 64),
                          kk > 0);
  }
}

}  // namespace fastattn::cuda
