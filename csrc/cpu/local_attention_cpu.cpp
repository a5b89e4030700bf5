// CPU backend of the local attention ops: torch glue around cpu/local_attention_kernel.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "cpu/local_attention_kernel.h"
#include "local_attention_torch.h"

namespace fastattn {
namespace {

void run_forward(const LocalAttentionParams& p, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "local_attention_fwd", [&] {
    cpu::local_attention_forward<scalar_t, at::opmath_type<scalar_t>>(p);
  });
}

void run_backward(const LocalAttentionBwdParams& p, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "local_attention_bwd", [&] {
    cpu::local_attention_backward<scalar_t, at::opmath_type<scalar_t>>(p);
  });
}

std::tuple<at::Tensor, at::Tensor> local_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window_left,
    int64_t window_right, const c10::optional<at::Tensor>& key_lengths, double scale,
    double softcap) {
  check_qkv(q, k, v, /*grouped_kv=*/true);
  auto [out, lse] = allocate_outputs(q);
  const LocalAttentionParams p =
      make_params(q, k, v, out, lse, key_lengths, window_left, window_right, scale, softcap);
  if (!no_work(q, k, out, lse)) run_forward(p, q.scalar_type());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> local_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    int64_t window_left, int64_t window_right, const c10::optional<at::Tensor>& key_lengths,
    double scale, double softcap) {
  LocalAttentionBackward b = prepare_backward(grad_out, grad_lse, q, k, v, out, lse, key_lengths,
                                              window_left, window_right, scale, softcap);
  if (b.has_work) run_backward(b.params, q.scalar_type());
  return b.grads(k, v);
}

std::tuple<at::Tensor, at::Tensor> local_attention_varlen_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, int64_t window_left, int64_t window_right, double scale,
    double softcap) {
  check_varlen_qkv(q, k, v);
  auto [out, lse] = allocate_outputs(q);
  const LocalAttentionParams p =
      make_varlen_params(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, window_left, window_right, scale, softcap);
  if (!no_work(q, k, out, lse)) run_forward(p, q.scalar_type());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> local_attention_varlen_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, int64_t window_left, int64_t window_right, double scale,
    double softcap) {
  LocalAttentionBackward b = prepare_varlen_backward(
      grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
      max_seqlen_k, window_left, window_right, scale, softcap);
  if (b.has_work) run_backward(b.params, q.scalar_type());
  return b.grads(k, v);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("local_attention_fwd", &local_attention_fwd_cpu);
  m.impl("local_attention_bwd", &local_attention_bwd_cpu);
  m.impl("local_attention_varlen_fwd", &local_attention_varlen_fwd_cpu);
  m.impl("local_attention_varlen_bwd", &local_attention_varlen_bwd_cpu);
}

}  // namespace fastattn
