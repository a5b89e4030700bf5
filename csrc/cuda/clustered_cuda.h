// Torch-free entry points of the CUDA clustering and clustered attention kernels
// (clustered_kernels.cu). T is float, __half or __nv_bfloat16; the torch glue
// (clustered_cuda.cpp) fills the params and calls these on the current stream. Each returns
// the launch status.
#pragma once
#include <cuda_runtime.h>

#include "clustered_params.h"

namespace fastattn::cuda::clustered {

// The largest head dim the warp-per-query kernels hold in registers (8 values per lane).
constexpr int64_t kMaxHeadDim = 256;

template <typename T>
cudaError_t cluster(const ClusterParams& p, cudaStream_t stream);

template <typename T>
cudaError_t aggregate(const ClusteredParams<float>& p, const void* x, const TensorStrides& s,
                      float* dst, float factor, bool mean, cudaStream_t stream);

cudaError_t rows_forward(const ClusteredParams<float>& p, cudaStream_t stream);
cudaError_t rows_backward(const ClusteredParams<float>& p, cudaStream_t stream);

template <typename T>
cudaError_t query_forward(const ClusteredParams<float>& p, cudaStream_t stream);

template <typename T>
cudaError_t prepass(const ClusteredParams<float>& p, cudaStream_t stream);

// dq_scratch: float32 (B*H, L, D), needed (non-null) when p.topk > 32.
template <typename T>
cudaError_t query_backward(const ClusteredParams<float>& p, float* dq_scratch,
                           cudaStream_t stream);

}  // namespace fastattn::cuda::clustered
