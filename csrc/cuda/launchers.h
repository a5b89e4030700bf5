// Per-dtype launchers, each explicitly instantiated in its own translation unit
// (fwd_*.cu, bwd_*.cu) so that the kernels of different dtypes compile in parallel.
#pragma once
#include <cuda_runtime.h>

#include "local_attention_params.h"

namespace fastattn::cuda {

template <typename T>
cudaError_t launch_fwd(const LocalAttentionParams& p, bool rows_aligned, cudaStream_t stream);

template <typename T>
cudaError_t launch_bwd(const LocalAttentionBwdParams& p, bool rows_aligned, float* dq_accum,
                       cudaStream_t stream);

}  // namespace fastattn::cuda
