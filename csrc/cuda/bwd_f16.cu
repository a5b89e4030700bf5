// The bwd kernels for __half, one instantiation per head dim (see bwd_dispatch.cuh).
#include "cuda/bwd_dispatch.cuh"
#include "cuda/launchers.h"

namespace fastattn::cuda {
template cudaError_t launch_bwd<__half>(const LocalAttentionBwdParams&, bool, float*, cudaStream_t);
}  // namespace fastattn::cuda
