// The fwd kernels for __nv_bfloat16, one instantiation per head dim (see fwd_dispatch.cuh).
#include "cuda/launchers.h"
#include "cuda/fwd_dispatch.cuh"

namespace fastattn::cuda {
template cudaError_t launch_fwd<__nv_bfloat16>(const LocalAttentionParams&, bool, cudaStream_t);
}  // namespace fastattn::cuda
