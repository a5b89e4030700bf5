// Which backward kernel runs a call: the Hopper wgmma kernel (local_bwd_ws.cuh) for 16-bit
// D in {64, 128} when TMA can describe q and grad_out, else the mma.sync kernel
// (local_bwd.cuh); around either, the delta pre-pass and the dQ conversion. A KV cache or packed
// sequences take the same choice in their general variants (kSeq); soft-capping takes the
// mma.sync one.
#pragma once
#include "cuda/local_bwd.cuh"
#include "cuda/local_bwd_ws.cuh"

namespace fastattn::cuda {

template <typename T, int D>
cudaError_t launch_bwd_d(const LocalAttentionBwdParams& p, bool rows_aligned, float* dq_accum,
                         cudaStream_t stream) {
  if constexpr (sizeof(T) == 2 && (D == 64 || D == 128)) {
    cudaError_t err = cudaSuccess;
    if (!needs_sequence_kernel(p) && rows_aligned && use_wgmma() && use_ws_backward() &&
        launch_bwd_ws<T, D>(p, dq_accum, stream, &err)) {
      return err;
    }
    // A KV cache or packed sequences, not soft-capped (the Hopper backward has no cap).
    if (needs_sequence_kernel(p) && p.softcap == 0 && rows_aligned && use_wgmma() &&
        use_ws_backward() && use_ws_sequences() &&
        launch_bwd_ws<T, D, true>(p, dq_accum, stream, &err)) {
      return err;
    }
  }
  using Cfg = BwdConfig<T, D>;
  const bool general = needs_sequence_kernel(p);
  auto kernel = general ? local_bwd_kernel<T, D, true> : local_bwd_kernel<T, D>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(Cfg::kSmem));
  if (err != cudaSuccess) return err;
  // Key tiles per (sequence, head): of the longest sequence's keys in a packed batch.
  const int64_t key_rows = !general ? p.seq_len
                           : p.cu_seqlens_k != nullptr ? p.max_seqlen_k
                                                       : p.key_seq_len;
  const int64_t k_tiles = (key_rows + Cfg::kBc - 1) / Cfg::kBc;
  kernel<<<static_cast<unsigned>(k_tiles * p.batch * p.heads), Cfg::kThreads, Cfg::kSmem, stream>>>(
      p, dq_accum, k_tiles, rows_aligned);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const LocalAttentionBwdParams& p, bool rows_aligned, float* dq_accum,
                       cudaStream_t stream) {
  const bool general = needs_sequence_kernel(p);
  const int64_t rows = query_rows_of_tensors(p);
  const bool vector = rows_are_16_byte_chunks(p.grad_out, p.grad_out_strides, p.head_dim,
                                              sizeof(T)) &&
                      rows_are_16_byte_chunks(p.out, p.out_strides, p.head_dim, sizeof(T));
  // One 16-byte chunk a lane where rows allow: 8 lanes a row up to D = 64 (16-bit), 16 above.
  if (p.head_dim <= 64) {
    auto delta = general ? local_bwd_delta_kernel<T, 8, true> : local_bwd_delta_kernel<T, 8>;
    delta<<<static_cast<unsigned>((rows + 31) / 32), 256, 0, stream>>>(p, dq_accum, vector);
  } else {
    auto delta = general ? local_bwd_delta_kernel<T, 16, true> : local_bwd_delta_kernel<T, 16>;
    delta<<<static_cast<unsigned>((rows + 15) / 16), 256, 0, stream>>>(p, dq_accum, vector);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  switch (p.head_dim) {
    case 16: err = launch_bwd_d<T, 16>(p, rows_aligned, dq_accum, stream); break;
    case 32: err = launch_bwd_d<T, 32>(p, rows_aligned, dq_accum, stream); break;
    case 64: err = launch_bwd_d<T, 64>(p, rows_aligned, dq_accum, stream); break;
    case 96: err = launch_bwd_d<T, 96>(p, rows_aligned, dq_accum, stream); break;
    case 128: err = launch_bwd_d<T, 128>(p, rows_aligned, dq_accum, stream); break;
    default: return cudaErrorInvalidValue;
  }
  if (err != cudaSuccess) return err;
  const int64_t n = rows * p.head_dim;
  const int64_t blocks = (n / 8 + 255) / 256 < 65536 ? (n / 8 + 255) / 256 : 65536;
  if (p.cu_seqlens_q != nullptr) {
    local_bwd_dq_packed_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
        dq_accum, static_cast<T*>(p.grad_q), n, p.seq_len, p.head_dim, p.grad_q_strides,
        static_cast<float>(p.scale));
  } else {
    local_bwd_dq_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
        dq_accum, static_cast<T*>(p.grad_q), n, static_cast<float>(p.scale));
  }
  return cudaGetLastError();
}

}  // namespace fastattn::cuda
