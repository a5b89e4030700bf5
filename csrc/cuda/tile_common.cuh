// Pieces shared by the forward and backward kernels: the band arithmetic and the copy of a
// tile of rows from global to shared memory.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/mma_ops.cuh"
#include "local_attention_params.h"

namespace fastattn::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// libdevice's tanh. Under --use_fast_math (the build's flag) nvcc turns tanhf into
// tanh.approx.f32, whose relative error of 2^-11 float32 cannot afford (softcap's scores, and
// their derivative 1 - tanh^2 in the backward); called by name, it stays the accurate one.
extern "C" __device__ float __nv_tanhf(float);
__device__ __forceinline__ float accurate_tanh(float x) { return __nv_tanhf(x); }

__device__ __forceinline__ int64_t valid_keys(const LocalAttentionParams& p, int64_t b) {
  if (p.key_lengths == nullptr) return p.seq_len;
  const int64_t n = p.key_lengths[b];
  return n < 0 ? 0 : (n > p.seq_len ? p.seq_len : n);
}

// One (sequence, query head) of a call that takes the general kernels (kSeq: a KV cache, packed
// sequences, soft-capping): its Sequence's rows and alignment (local_attention_params.h, the
// rule the CPU kernels follow too) and its k / v head. SeqFwdBlock and SeqBwdBlock add a tile.
struct SeqHead {
  int64_t h, kvh, tb, keys, k_rows, offset, lq, q_row0, k_row0;
  int64_t head_row;  // (tensor batch, head) of lse, delta and the dQ scratch (p.seq_len rows)
  int64_t lse0;      // their row of the sequence's first query

  __device__ __forceinline__ SeqHead(const LocalAttentionParams& p, int64_t bh) {
    h = bh % p.heads;
    const Sequence s = sequence(p, bh / p.heads);
    kvh = kv_head(p, h);
    tb = s.tb;
    keys = s.lk;
    k_rows = s.k_rows;
    offset = s.offset;
    lq = s.lq;
    q_row0 = s.q0;
    k_row0 = s.k0;
    head_row = tb * p.heads + h;
    lse0 = head_row * p.seq_len + q_row0;
  }

  // The tensors' batch index, the tensor rows of query i and key j, the key position of
  // query 0 (as the default blocks have them: b, i, j, 0).
  __device__ __forceinline__ int64_t tensor_batch() const { return tb; }
  __device__ __forceinline__ int64_t q_row(int64_t i) const { return q_row0 + i; }
  __device__ __forceinline__ int64_t k_row(int64_t j) const { return k_row0 + j; }
  __device__ __forceinline__ int64_t position_offset() const { return offset; }
};

template <typename T>
__device__ __forceinline__ const T* head_ptr(const void* base, const TensorStrides& s, int64_t b,
                                             int64_t h) {
  return static_cast<const T*>(base) + b * s.batch + h * s.head;
}

template <typename T>
__device__ __forceinline__ T zero_of() {
  if constexpr (std::is_same_v<T, float>) {
    return 0.0f;
  } else {
    return T(0.0f);
  }
}

// Element offset of 16-byte chunk c of tile row r. Padded layout: rows of ld elements.
// kSw128 (16-bit types): the 128-byte swizzle layout wgmma reads: 64-column blocks of
// kRows x 128 bytes, chunk c of row r stored at chunk (c % 8) ^ (r % 8) of its row.
template <typename T, int kRows, bool kSw128>
__device__ __forceinline__ int chunk_offset(int r, int c, int ld) {
  if constexpr (kSw128) {
    static_assert(sizeof(T) == 2, "the swizzled layout holds 64 16-bit elements a row");
    return (c >> 3) * kRows * 64 + r * 64 + (((c & 7) ^ (r & 7)) << 3);
  } else {
    return r * ld + c * static_cast<int>(16 / sizeof(T));
  }
}

// Copies global rows [row0, row0 + kRows) of a (L, D) head (row stride `stride` elements) into
// the shared tile s. Rows at or past row_end are zero-filled and never read, so memory past the
// logical end of a tensor, or past key_lengths, is never touched.
template <typename T, int D, int kRows, int kThreads, bool kSw128 = false>
__device__ __forceinline__ void load_rows(T* s, int ld, const T* g, int64_t stride, int64_t row0,
                                          int64_t row_end, bool rows_aligned, int tid) {
  constexpr int kPer = 16 / sizeof(T), kChunks = D / kPer;
  if (rows_aligned) {
#pragma unroll
    for (int c = tid; c < kRows * kChunks; c += kThreads) {
      const int r = c / kChunks, chunk = c % kChunks;
      const int64_t row = row0 + r;
      const bool valid = row < row_end;
      cp_async16(s + chunk_offset<T, kRows, kSw128>(r, chunk, ld),
                 valid ? g + row * stride + chunk * kPer : g, valid);
    }
  } else {
    for (int c = tid; c < kRows * D; c += kThreads) {
      const int r = c / D, col = c % D;
      const int64_t row = row0 + r;
      s[chunk_offset<T, kRows, kSw128>(r, col / kPer, ld) + col % kPer] =
          row < row_end ? g[row * stride + col] : zero_of<T>();
    }
  }
}

// The four lanes of a quad hold one row of a C fragment.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

__device__ __forceinline__ bool visible(int64_t i, int64_t j, int64_t left, int64_t right,
                                        int64_t keys) {
  return j >= i - left && j <= i + right && j < keys;
}

}  // namespace fastattn::cuda
