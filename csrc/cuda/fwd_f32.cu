// The fwd kernels for float, one instantiation per head dim (see local_fwd.cuh).
#include "cuda/launchers.h"
#include "cuda/local_fwd.cuh"

namespace fastattn::cuda {
template cudaError_t launch_fwd<float>(const LocalAttentionParams&, bool, cudaStream_t);
}  // namespace fastattn::cuda
