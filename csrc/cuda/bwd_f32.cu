// The bwd kernels for float, one instantiation per head dim (see bwd_dispatch.cuh).
#include "cuda/bwd_dispatch.cuh"
#include "cuda/launchers.h"

namespace fastattn::cuda {
template cudaError_t launch_bwd<float>(const LocalAttentionBwdParams&, bool, float*, cudaStream_t);
}  // namespace fastattn::cuda
