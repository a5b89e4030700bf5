// dtype / head-dim dispatch of the torch-free CUDA entry points.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/launchers.h"
#include "cuda/local_attention_cuda.h"

namespace fastattn::cuda {

bool supports_head_dim(int64_t head_dim, bool backward) {
  switch (head_dim) {
    case 16: case 32: case 64: case 96: case 128: return true;
    case 256: return !backward;
    default: return false;
  }
}

cudaError_t local_attention_fwd(const LocalAttentionParams& p, DType dtype, bool rows_aligned,
                                cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_fwd<float>(p, rows_aligned, stream);
    case DType::kFloat16: return launch_fwd<__half>(p, rows_aligned, stream);
    case DType::kBFloat16: return launch_fwd<__nv_bfloat16>(p, rows_aligned, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t local_attention_bwd(const LocalAttentionBwdParams& p, DType dtype, bool rows_aligned,
                                float* dq_accum, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_bwd<float>(p, rows_aligned, dq_accum, stream);
    case DType::kFloat16: return launch_bwd<__half>(p, rows_aligned, dq_accum, stream);
    case DType::kBFloat16: return launch_bwd<__nv_bfloat16>(p, rows_aligned, dq_accum, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastattn::cuda
