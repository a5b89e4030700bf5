// The decode kernels' entry points (local_decode.cuh): which calls they take, how far the band
// is split, and the launches.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "cuda/kernel_switches.h"
#include "cuda/local_attention_cuda.h"
#include "cuda/local_decode.cuh"

namespace fastattn::cuda {
namespace {

// The packed rows of a kv head's group that one decode block holds at most, times 4 row tiles:
// beyond that the general forward's 64-row tiles waste nothing.
constexpr int64_t kMaxDecodeRows = 64;

template <typename T, int D>
cudaError_t launch_decode(const LocalAttentionParams& p, bool rows_aligned, int64_t splits,
                          float* part_out, float* part_lse, cudaStream_t stream) {
  using Cfg = DecodeConfig<T, D>;
  auto kernel = local_decode_kernel<T, D>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(Cfg::kSmem));
  if (err != cudaSuccess) return err;
  const int64_t row_tiles = (decode_rows(p) + Cfg::kRows - 1) / Cfg::kRows;
  const int64_t blocks = p.batch * p.kv_heads * row_tiles * splits;
  kernel<<<static_cast<unsigned>(blocks), Cfg::kThreads, Cfg::kSmem, stream>>>(
      p, row_tiles, splits, part_out, part_lse, rows_aligned);
  err = cudaGetLastError();
  if (err != cudaSuccess || splits == 1) return err;
  const int64_t n = p.batch * p.heads * p.seq_len * p.head_dim;
  const int64_t combine_blocks = (n + 255) / 256 < 65536 ? (n + 255) / 256 : 65536;
  local_decode_combine_kernel<T><<<static_cast<unsigned>(combine_blocks), 256, 0, stream>>>(
      p, splits, part_out, part_lse);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_decode_t(const LocalAttentionParams& p, bool rows_aligned, int64_t splits,
                            float* part_out, float* part_lse, cudaStream_t stream) {
  switch (p.head_dim) {
    case 16: return launch_decode<T, 16>(p, rows_aligned, splits, part_out, part_lse, stream);
    case 32: return launch_decode<T, 32>(p, rows_aligned, splits, part_out, part_lse, stream);
    case 64: return launch_decode<T, 64>(p, rows_aligned, splits, part_out, part_lse, stream);
    case 96: return launch_decode<T, 96>(p, rows_aligned, splits, part_out, part_lse, stream);
    case 128: return launch_decode<T, 128>(p, rows_aligned, splits, part_out, part_lse, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

int64_t decode_splits(const LocalAttentionParams& p, DType dtype) {
  const bool takes = dtype != DType::kFloat32 && p.head_dim <= 128 &&
                     p.cu_seqlens_q == nullptr && p.seq_len != p.key_seq_len &&
                     decode_rows(p) <= kMaxDecodeRows && !switch_set("FASTATTN_DISABLE_DECODE");
  if (!takes) return 0;
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    sms = 132;
  }
  // About three blocks an SM (74 KB of shared memory each at D = 128), each split keeping two
  // key tiles at least: the band of a row tile spans its queries' positions plus the window.
  using Cfg = DecodeConfig<__half, 128>;
  const int64_t group = p.heads / p.kv_heads;
  const int64_t row_tiles = (decode_rows(p) + Cfg::kRows - 1) / Cfg::kRows;
  const int64_t spread = (Cfg::kRows + group - 1) / group;
  const int64_t band = std::min<int64_t>(p.key_seq_len, p.window_left + p.window_right + spread);
  const int64_t band_tiles = (band + Cfg::kBc - 1) / Cfg::kBc;
  const int64_t base = p.batch * p.kv_heads * row_tiles;
  const int64_t wanted = (3 * static_cast<int64_t>(sms) + base - 1) / std::max<int64_t>(base, 1);
  return std::clamp<int64_t>(wanted, 1, std::max<int64_t>(1, band_tiles / 2));
}

cudaError_t local_attention_decode(const LocalAttentionParams& p, DType dtype, bool rows_aligned,
                                   int64_t splits, float* part_out, float* part_lse,
                                   cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16:
      return launch_decode_t<__half>(p, rows_aligned, splits, part_out, part_lse, stream);
    case DType::kBFloat16:
      return launch_decode_t<__nv_bfloat16>(p, rows_aligned, splits, part_out, part_lse, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastattn::cuda
