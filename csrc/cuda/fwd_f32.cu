// The fwd kernels for float, one instantiation per head dim (see fwd_dispatch.cuh).
#include "cuda/launchers.h"
#include "cuda/fwd_dispatch.cuh"

namespace fastattn::cuda {
template cudaError_t launch_fwd<float>(const LocalAttentionParams&, bool, cudaStream_t);
}  // namespace fastattn::cuda
