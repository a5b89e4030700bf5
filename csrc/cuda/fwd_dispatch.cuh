// Which forward kernel runs a call: the warp-specialized TMA kernel (local_fwd_ws.cuh) for
// 16-bit D in {64, 128} on Hopper when TMA can describe the inputs, else the one-warpgroup
// wgmma kernel (Hopper, same head dims), else the mma.sync kernel (local_fwd.cuh). A KV cache,
// packed sequences or soft-capping take the same choice in their general variants (kSeq: the
// Hopper kernel walking a SeqFwdBlock, or the mma.sync one); decode has its own kernel
// (local_decode.cuh, chosen by the glue).
#pragma once
#include "cuda/local_fwd.cuh"
#include "cuda/local_fwd_ws.cuh"

namespace fastattn::cuda {

template <typename T, int D>
cudaError_t launch_fwd_d(const LocalAttentionParams& p, bool rows_aligned, cudaStream_t stream) {
  if (needs_sequence_kernel(p)) {
    if constexpr (sizeof(T) == 2 && (D == 64 || D == 128)) {
      cudaError_t err = cudaSuccess;
      if (rows_aligned && use_wgmma() && use_ws_forward() && use_ws_sequences() &&
          launch_fwd_ws<T, D, true>(p, stream, &err)) {
        return err;
      }
    }
    return launch_fwd_kernel<FwdConfig<T, D>>(local_fwd_kernel<T, D, true>, p, rows_aligned,
                                              stream);
  }
  if constexpr (sizeof(T) == 2 && (D == 64 || D == 128)) {
    if (use_wgmma()) {
      cudaError_t err = cudaSuccess;
      if (rows_aligned && use_ws_forward() && launch_fwd_ws<T, D>(p, stream, &err)) return err;
      return launch_fwd_kernel<WgmmaFwdConfig<T, D>>(local_fwd_wgmma_kernel<T, D>, p, rows_aligned,
                                                     stream);
    }
  }
  return launch_fwd_kernel<FwdConfig<T, D>>(local_fwd_kernel<T, D>, p, rows_aligned, stream);
}

template <typename T>
cudaError_t launch_fwd(const LocalAttentionParams& p, bool rows_aligned, cudaStream_t stream) {
  switch (p.head_dim) {
    case 16: return launch_fwd_d<T, 16>(p, rows_aligned, stream);
    case 32: return launch_fwd_d<T, 32>(p, rows_aligned, stream);
    case 64: return launch_fwd_d<T, 64>(p, rows_aligned, stream);
    case 96: return launch_fwd_d<T, 96>(p, rows_aligned, stream);
    case 128: return launch_fwd_d<T, 128>(p, rows_aligned, stream);
    case 256: return launch_fwd_d<T, 256>(p, rows_aligned, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastattn::cuda
