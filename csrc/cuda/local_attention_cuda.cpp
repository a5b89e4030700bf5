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

// Rows can be copied 16 bytes at a time when the data pointer and every stride but the last
// are multiples of 16 bytes.
bool rows_aligned(const at::Tensor& t) {
  const int64_t elems = 16 / t.element_size();
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) % elems == 0 &&
         t.stride(1) % elems == 0 && t.stride(2) % elems == 0;
}

std::tuple<at::Tensor, at::Tensor> local_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window_left,
    int64_t window_right, const c10::optional<at::Tensor>& key_lengths, double scale) {
  check_qkv(q, k, v);
  check_cuda_inputs(q, /*backward=*/false);
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
    double scale) {
  check_qkv(q, k, v);
  check_cuda_inputs(q, /*backward=*/true);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "fastattn: grad_out and out must match q's shape ", q.sizes(), ", got ",
              grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "fastattn: grad_out and out must have q's dtype ", q.scalar_type());
  const c10::cuda::CUDAGuard guard(q.device());
  // Gradients arrive in any layout (autograd may hand an expanded zero-stride tensor); the
  // kernels need a contiguous head dim. q, k, v themselves are never copied.
  at::Tensor dout = grad_out.stride(-1) == 1 ? grad_out : grad_out.contiguous();
  at::Tensor o = out.stride(-1) == 1 ? out : out.contiguous();
  at::Tensor lse_c = lse.to(at::kFloat).contiguous();
  at::Tensor dlse = grad_lse.to(at::kFloat).contiguous();
  at::Tensor grad_q = at::empty(q.sizes(), q.options());
  at::Tensor grad_k = at::empty(q.sizes(), q.options());
  at::Tensor grad_v = at::empty(q.sizes(), q.options());
  if (q.numel() == 0) return {grad_q, grad_k, grad_v};
  at::Tensor delta = at::empty_like(lse_c);
  at::Tensor dq_accum = at::zeros(q.sizes(), q.options().dtype(at::kFloat));

  LocalAttentionBwdParams p;
  static_cast<LocalAttentionParams&>(p) =
      make_params(q, k, v, o, lse_c, key_lengths, window_left, window_right, scale);
  p.grad_out = dout.data_ptr();
  p.grad_lse = dlse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.grad_q = grad_q.data_ptr();
  p.grad_k = grad_k.data_ptr();
  p.grad_v = grad_v.data_ptr();
  p.grad_out_strides = strides_of(dout);
  p.grad_q_strides = strides_of(grad_q);
  p.grad_k_strides = strides_of(grad_k);
  p.grad_v_strides = strides_of(grad_v);
  const bool aligned = rows_aligned(q) && rows_aligned(k) && rows_aligned(v) && rows_aligned(dout);
  C10_CUDA_CHECK(cuda::local_attention_bwd(p, kernel_dtype(q), aligned,
                                           dq_accum.data_ptr<float>(),
                                           c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("local_attention_fwd", &local_attention_fwd_cuda);
  m.impl("local_attention_bwd", &local_attention_bwd_cuda);
}

}  // namespace fastattn
