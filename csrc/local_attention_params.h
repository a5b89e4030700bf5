// Plain-old-data description of one local attention call. Kernels (CPU and CUDA) see only
// this struct, never a torch tensor, so they can be reused and reasoned about in isolation.
#pragma once
#include <cstdint>

namespace fastattn {

// Strides are in elements; the head dimension is always contiguous (stride 1).
struct TensorStrides {
  int64_t batch;
  int64_t head;
  int64_t seq;
};

struct LocalAttentionParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;    // (B, H, L, D), strides out_strides
  float* lse;   // (B, H, L) contiguous
  TensorStrides q_strides, k_strides, v_strides, out_strides;
  int64_t batch, heads, seq_len, head_dim;
  // Not read by any kernel yet; here so that GQA (k/v with kv_heads <= heads) and packed
  // variable-length batches (cumulative sequence offsets, (B + 1,) int32) plug into the same
  // struct. Today: kv_heads == heads, no offsets.
  int64_t kv_heads;
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  const int32_t* key_lengths;  // (B,) valid key counts, or nullptr for "all L"
  int64_t window_left, window_right;  // already clamped to [0, seq_len]
  double scale;  // double so float64 inputs keep their precision; kernels narrow as needed
};

struct LocalAttentionBwdParams : LocalAttentionParams {
  const void* grad_out;
  const float* grad_lse;   // (B, H, L) contiguous
  float* delta;            // (B, H, L) scratch: rowsum(grad_out * out) - grad_lse
  void* grad_q;
  void* grad_k;
  void* grad_v;
  TensorStrides grad_out_strides, grad_q_strides, grad_k_strides, grad_v_strides;
};

}  // namespace fastattn
