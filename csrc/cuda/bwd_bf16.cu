// The bwd kernels for __nv_bfloat16, one instantiation per head dim (see bwd_dispatch.cuh).
#include "cuda/bwd_dispatch.cuh"
#include "cuda/launchers.h"

namespace fastattn::cuda {
template cudaError_t launch_bwd<__nv_bfloat16>(const LocalAttentionBwdParams&, bool, float*, cudaStream_t);
}  // namespace fastattn::cuda
