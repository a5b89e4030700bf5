// Tensor maps for the bulk tensor copy engine, encoded through the driver entry point that the
// runtime hands out, so the library links no libcuda of its own.
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include "cuda/tensor_map.h"

namespace fastattn::cuda {
namespace {

PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault,
                                         &status) != cudaSuccess ||
        status != cudaDriverEntryPointSuccess) {
      cudaGetLastError();  // leave no sticky error for the next launch check
      ptr = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

}  // namespace

bool encode_head_map(CUtensorMap* map, const void* base, bool bfloat16, int64_t batch,
                     int64_t heads, int64_t seq_len, int64_t head_dim,
                     const TensorStrides& strides, int box_rows) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = encode_fn();
  if (encode == nullptr || reinterpret_cast<uintptr_t>(base) % 16 != 0) return false;
  constexpr int64_t kElem = 2;
  for (int64_t s : {strides.seq, strides.head, strides.batch}) {
    // The copy engine wants strides that are non-zero multiples of 16 bytes below 2**40.
    if (s <= 0 || (s * kElem) % 16 != 0 || s * kElem >= (int64_t{1} << 40)) return false;
  }
  if (seq_len >= (int64_t{1} << 31) || heads >= (int64_t{1} << 31) ||
      batch >= (int64_t{1} << 31)) {
    return false;
  }
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(head_dim), static_cast<cuuint64_t>(seq_len),
                              static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  const cuuint64_t byte_strides[3] = {static_cast<cuuint64_t>(strides.seq * kElem),
                                      static_cast<cuuint64_t>(strides.head * kElem),
                                      static_cast<cuuint64_t>(strides.batch * kElem)};
  const cuuint32_t box[4] = {64, static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t unit[4] = {1, 1, 1, 1};
  const CUresult r = encode(
      map, bfloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
      const_cast<void*>(base), dims, byte_strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
}

bool encode_dq_map(CUtensorMap* map, float* base, int64_t batch_heads, int64_t seq_len,
                   int64_t head_dim, int box_rows) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = encode_fn();
  if (encode == nullptr || reinterpret_cast<uintptr_t>(base) % 16 != 0) return false;
  constexpr int64_t kElem = 4;
  const int64_t head_bytes = seq_len * head_dim * kElem;
  if (head_bytes >= (int64_t{1} << 40) || seq_len >= (int64_t{1} << 31) ||
      batch_heads >= (int64_t{1} << 31)) {
    return false;
  }
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(head_dim), static_cast<cuuint64_t>(seq_len),
                              static_cast<cuuint64_t>(batch_heads)};
  const cuuint64_t byte_strides[2] = {static_cast<cuuint64_t>(head_dim * kElem),
                                      static_cast<cuuint64_t>(head_bytes)};
  const cuuint32_t box[3] = {32, static_cast<cuuint32_t>(box_rows), 1};
  const cuuint32_t unit[3] = {1, 1, 1};
  const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 3, base, dims, byte_strides, box,
                            unit, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
}

}  // namespace fastattn::cuda
