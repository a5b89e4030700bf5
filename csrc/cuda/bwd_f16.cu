// The bwd kernels for __half, one instantiation per head dim (see local_bwd.cuh).
#include "cuda/launchers.h"
#include "cuda/local_bwd.cuh"

namespace fastattn::cuda {
template cudaError_t launch_bwd<__half>(const LocalAttentionBwdParams&, bool, float*, cudaStream_t);
}  // namespace fastattn::cuda
