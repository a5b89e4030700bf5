// Host side of the TMA-fed kernels: the tensor maps of their operands, built per call.
#pragma once
#include <cuda.h>

#include <cstdint>

#include "local_attention_params.h"

namespace fastattn::cuda {

// A 4-d map (D, L, H, B) of 16-bit elements whose box is 64 columns (128 bytes, the 128-byte
// swizzle span) by box_rows rows, swizzled as wgmma reads it; out-of-range rows read as zeros.
// Returns false when TMA cannot describe the tensor (a base or stride that is not a multiple
// of 16 bytes, a dimension too large) or the driver lacks the entry point: the caller then
// takes a kernel that copies with cp.async.
bool encode_head_map(CUtensorMap* map, const void* base, bool bfloat16, int64_t batch,
                     int64_t heads, int64_t seq_len, int64_t head_dim,
                     const TensorStrides& strides, int box_rows);

// The backward's float32 dQ scratch, (B * H, L, D) contiguous, as a 3-d map (D, L, B * H) whose
// box is 32 columns (128 bytes) by box_rows rows in the 128-byte swizzle: the target of the
// bulk reduce-add. Rows past L of a head lie outside the box's head and are never touched.
bool encode_dq_map(CUtensorMap* map, float* base, int64_t batch_heads, int64_t seq_len,
                   int64_t head_dim, int box_rows);

}  // namespace fastattn::cuda
