// CUDA backend of the local attention ops: torch glue around the torch-free kernels of this
// folder. Every launch runs on the current stream of q's device (so CUDA graphs, streams and
// torch.compile see it), under a device guard, and is checked. The stream comes from c10's
// header: ATen/cuda/CUDAContext.h needs cuSPARSE/cuBLAS headers a bare toolkit may lack.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "cuda/local_attention_cuda.h"
#include "local_attention_torch.h"

namespace fastattn {
namespace {

cuda::DType kernel_dtype(const at::Tensor& q) {
  switch (q.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "fastattn: CUDA local attention supports float32, float16 and bfloat16, "
                         "got ", q.scalar_type());
  }
}

void check_cuda_inputs(const at::Tensor& q, bool backward) {
  TORCH_CHECK(q.is_cuda(), "fastattn: expected CUDA tensors, got ", q.device());
  TORCH_CHECK(cuda::supports_head_dim(q.size(3), backward), "fastattn: CUDA local attention ",
              backward ? "backward" : "forward", " supports head dims 16, 32, 64, 96, 128",
              backward ? "" : ", 256", "; got D=", q.size(3));
}

// What the CUDA kernels do not take yet (issue 14; the CPU kernels do): a KV cache (Lq != Lk)
// and soft-capping. Packed batches have no CUDA kernel (local_attention_varlen_unsupported).
void check_cuda_features(const at::Tensor& q, const at::Tensor& k, double softcap) {
  TORCH_CHECK_NOT_IMPLEMENTED(
      k.size(2) == q.size(2), "fastattn: the CUDA kernels take as many query rows as key rows "
      "for now, got Lq=", q.size(2), " and Lk=", k.size(2), "; Lq != Lk (KV cache) runs on the CPU");
  TORCH_CHECK_NOT_IMPLEMENTED(softcap == 0, "fastattn: the CUDA kernels do not take softcap yet "
                              "(got softcap=", softcap, "); it runs on the CPU");
}

// Rows can be copied 16 bytes at a time when the data pointer and every stride but the last
// are multiples of 16 bytes.
bool rows_aligned(const at::Tensor& t) {
  const int64_t elems = 16 / t.element_size();
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) % elems == 0 &&
         t.stride(1) % elems == 0 && t.stride(2) % elems == 0;
}

std::tuple<at::Tensor, at::Tensor> local_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window_left,
    int64_t window_right, const c10::optional<at::Tensor>& key_lengths, double scale,
    double softcap) {
  check_qkv(q, k, v, /*grouped_kv=*/true);
  check_cuda_inputs(q, /*backward=*/false);
  check_cuda_features(q, k, softcap);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse.fill_(-std::numeric_limits<float>::infinity())};
  const LocalAttentionParams p =
      make_params(q, k, v, out, lse, key_lengths, window_left, window_right, scale);
  const bool aligned = rows_aligned(q) && rows_aligned(k) && rows_aligned(v);
  C10_CUDA_CHECK(cuda::local_attention_fwd(p, kernel_dtype(q), aligned,
                                           c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> local_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    int64_t window_left, int64_t window_right, const c10::optional<at::Tensor>& key_lengths,
    double scale, double softcap) {
  check_qkv(q, k, v, /*grouped_kv=*/true);
  check_cuda_inputs(q, /*backward=*/true);
  check_cuda_features(q, k, softcap);
  const c10::cuda::CUDAGuard guard(q.device());
  LocalAttentionBackward b = prepare_backward(grad_out, grad_lse, q, k, v, out, lse, key_lengths,
                                              window_left, window_right, scale);
  if (!b.has_work) return b.grads(k, v);
  // Zeroed by the backward's delta pre-pass, before the main kernel adds into it.
  at::Tensor dq_accum = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  const bool aligned =
      rows_aligned(q) && rows_aligned(k) && rows_aligned(v) && rows_aligned(b.grad_out);
  C10_CUDA_CHECK(cuda::local_attention_bwd(b.params, kernel_dtype(q), aligned,
                                           dq_accum.data_ptr<float>(),
                                           c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return b.grads(k, v);
}

// A direct op call with CUDA tensors gets this error rather than "no kernel for CUDA".
[[noreturn]] void local_attention_varlen_unsupported() {
  TORCH_CHECK_NOT_IMPLEMENTED(false, "fastattn: local_attention_varlen has no CUDA kernel yet; "
                              "it runs on the CPU");
}

std::tuple<at::Tensor, at::Tensor> local_attention_varlen_fwd_cuda(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    int64_t, int64_t, int64_t, int64_t, double, double) {
  local_attention_varlen_unsupported();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> local_attention_varlen_bwd_cuda(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
    int64_t, int64_t, double, double) {
  local_attention_varlen_unsupported();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("local_attention_fwd", &local_attention_fwd_cuda);
  m.impl("local_attention_bwd", &local_attention_bwd_cuda);
  m.impl("local_attention_varlen_fwd", &local_attention_varlen_fwd_cuda);
  m.impl("local_attention_varlen_bwd", &local_attention_varlen_bwd_cuda);
}

}  // namespace fastattn
