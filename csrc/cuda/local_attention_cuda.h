// Torch-free entry points of the CUDA local attention kernels (defined in the .cu files of this
// folder). The torch glue (local_attention_cuda.cpp) fills the params structs and calls these
// on the current stream; they enqueue kernels and return the launch status.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "local_attention_params.h"

namespace fastattn::cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

bool supports_head_dim(int64_t head_dim, bool backward);

// rows_aligned: every row of q, k, v (and grad_out) starts on a 16-byte boundary, so tiles
// are copied with cp.async; otherwise element by element.
cudaError_t local_attention_fwd(const LocalAttentionParams& p, DType dtype, bool rows_aligned,
                                cudaStream_t stream);

// Decode (local_decode.cuh): into how many blocks the band of a call is split, or 0 where the
// decode kernel does not take the call (it takes 16-bit, D <= 128, Lq != Lk with at most 64
// query rows per kv head, no cu_seqlens; FASTATTN_DISABLE_DECODE=1 turns it off).
int64_t decode_splits(const LocalAttentionParams& p, DType dtype);

// part_out float32 (splits, B, H, Lq, D) and part_lse (splits, B, H, Lq) scratch where splits
// > 1 (nullptr otherwise).
cudaError_t local_attention_decode(const LocalAttentionParams& p, DType dtype, bool rows_aligned,
                                   int64_t splits, float* part_out, float* part_lse,
                                   cudaStream_t stream);

// dq_accum: zeroed float32 (B, H, L, D) contiguous scratch; p.delta: (B, H, L) float32 scratch.
cudaError_t local_attention_bwd(const LocalAttentionBwdParams& p, DType dtype, bool rows_aligned,
                                float* dq_accum, cudaStream_t stream);

}  // namespace fastattn::cuda
