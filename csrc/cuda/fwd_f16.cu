// The fwd kernels for __half, one instantiation per head dim (see fwd_dispatch.cuh).
#include "cuda/launchers.h"
#include "cuda/fwd_dispatch.cuh"

namespace fastattn::cuda {
template cudaError_t launch_fwd<__half>(const LocalAttentionParams&, bool, cudaStream_t);
}  // namespace fastattn::cuda
