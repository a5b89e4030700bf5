// The bwd kernels for float, one instantiation per head dim (see local_bwd.cuh).
#include "cuda/launchers.h"
#include "cuda/local_bwd.cuh"

namespace fastattn::cuda {
template cudaError_t launch_bwd<float>(const LocalAttentionBwdParams&, bool, float*, cudaStream_t);
}  // namespace fastattn::cuda
