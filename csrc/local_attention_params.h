// Plain-old-data description of one local attention call. Kernels (CPU and CUDA) see only
// this struct, never a torch tensor, so they can be reused and reasoned about in isolation.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FASTATTN_HOST_DEVICE __host__ __device__
#else
#define FASTATTN_HOST_DEVICE
#endif

namespace fastattn {

// Strides are in elements; the head dimension is always contiguous (stride 1).
struct TensorStrides {
  int64_t batch;
  int64_t head;
  int64_t seq;
};

struct LocalAttentionParams {
  const void* q;  // (B, H, L, D)
  const void* k;  // (B, kv_heads, key_seq_len, D), as v
  const void* v;
  void* out;    // (B, H, L, D), strides out_strides
  float* lse;   // (B, H, L) contiguous
  TensorStrides q_strides, k_strides, v_strides, out_strides;
  // seq_len: query rows, key_seq_len: key rows, per (batch, head). They differ for a KV cache
  // (bottom-right alignment, see the CPU kernel's sequence()); the CUDA kernels take equal
  // lengths only, for now.
  int64_t batch, heads, seq_len, head_dim, key_seq_len;
  // GQA / MQA: k and v have kv_heads heads, heads % kv_heads == 0; see kv_head().
  int64_t kv_heads;
  // Packed variable-length batches (local_attention_varlen): (batch + 1,) int32 cumulative
  // sequence offsets into the rows of one tensor batch; then `batch` counts sequences, seq_len
  // and key_seq_len are the total rows and max_seqlen_q / _k bound one sequence's rows.
  // nullptr for an ordinary batch. Read by the CPU kernels only, for now.
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  int64_t max_seqlen_q, max_seqlen_k;
  const int32_t* key_lengths;  // (B,) valid key counts, or nullptr for "all key_seq_len"
  // Clamped to [0, max(seq_len, key_seq_len)], beyond which a side is unbounded.
  int64_t window_left, window_right;
  double scale;  // double so float64 inputs keep their precision; kernels narrow as needed
  // Logit soft-capping (Gemma 2): scores s -> softcap * tanh(s / softcap) after the scale;
  // 0 = off. CPU kernels only, for now.
  double softcap;
};

// The k / v head that query head h reads: each group of heads / kv_heads consecutive query
// heads shares one (GQA; kv_heads == 1 is MQA, kv_heads == heads plain attention). Every
// kernel, CPU and CUDA, takes its k / v head from here. In 32 bits (heads < 2**31: a CUDA grid
// has a block per head and tile): a 64-bit division is a subroutine call on the GPU; here it
// cost the bf16 mma.sync forward at D = 128 67 more registers, the 32-bit one 1.
FASTATTN_HOST_DEVICE inline int64_t kv_head(const LocalAttentionParams& p, int64_t h) {
  const uint32_t group = static_cast<uint32_t>(p.heads) / static_cast<uint32_t>(p.kv_heads);
  return static_cast<uint32_t>(h) / group;
}

// n clamped to [0, rows] (no <algorithm> in device code).
FASTATTN_HOST_DEVICE inline int64_t clamp_rows(int64_t n, int64_t rows) {
  return n < 0 ? 0 : (n > rows ? rows : n);
}

// One sequence of the call: where its query and key rows are in the tensors, and where its
// queries sit among its keys. An ordinary batch has one per batch index; a packed batch
// (local_attention_varlen) one per pair of cu_seqlens entries, all in tensor batch 0.
struct Sequence {
  int64_t tb;      // batch index into the tensors
  int64_t q0, lq;  // query rows [q0, q0 + lq)
  int64_t k0, lk;  // visible key rows [k0, k0 + lk)
  int64_t k_rows;  // key rows whose gradients this sequence writes: lk, or all key_seq_len
                   // rows of an ordinary batch (those past key_lengths get zeros)
  int64_t offset;  // query i sits at key position i + offset (bottom-right alignment)
};

// The alignment rule (FlashAttention >= 2.1's bottom-right): the last query sits at the last
// visible key, offset = lk - lq. One exception keeps self-attention over a padded batch as it
// was: with as many query rows as key rows, key_lengths pads queries and keys alike, so the
// valid queries number lk too and the offset is 0.
FASTATTN_HOST_DEVICE inline Sequence sequence(const LocalAttentionParams& p, int64_t b) {
  Sequence s;
  if (p.cu_seqlens_q != nullptr) {
    s.tb = 0;
    s.q0 = p.cu_seqlens_q[b];
    s.lq = p.cu_seqlens_q[b + 1] - s.q0;
    s.k0 = p.cu_seqlens_k[b];
    s.lk = s.k_rows = p.cu_seqlens_k[b + 1] - s.k0;
    s.offset = s.lk - s.lq;
    return s;
  }
  s.tb = b;
  s.q0 = s.k0 = 0;
  s.lq = p.seq_len;
  s.k_rows = p.key_seq_len;
  s.lk = p.key_lengths == nullptr
             ? p.key_seq_len
             : clamp_rows(p.key_lengths[b], p.key_seq_len);
  s.offset = p.seq_len == p.key_seq_len ? 0 : s.lk - s.lq;
  return s;
}

struct LocalAttentionBwdParams : LocalAttentionParams {
  const void* grad_out;
  const float* grad_lse;   // (B, H, L) contiguous
  float* delta;            // (B, H, L) scratch: rowsum(grad_out * out) - grad_lse
  void* grad_q;
  // (B, H, L, D): one dK / dV per *query* head, also under GQA; the torch glue sums each
  // group into k's shape (local_attention_torch.h, LocalAttentionBackward::grads).
  void* grad_k;
  void* grad_v;
  TensorStrides grad_out_strides, grad_q_strides, grad_k_strides, grad_v_strides;
};

}  // namespace fastattn
