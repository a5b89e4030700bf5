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

std::tuple<at::Tensor, at::Tensor> local_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window_left,
    int64_t window_right, const c10::optional<at::Tensor>& key_lengths, double scale) {
  check_qkv(q, k, v, /*grouped_kv=*/true);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse.fill_(-std::numeric_limits<float>::infinity())};
  const LocalAttentionParams p =
      make_params(q, k, v, out, lse, key_lengths, window_left, window_right, scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "local_attention_fwd", [&] {
    cpu::local_attention_forward<scalar_t, at::opmath_type<scalar_t>>(p);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> local_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    int64_t window_left, int64_t window_right, const c10::optional<at::Tensor>& key_lengths,
    double scale) {
  LocalAttentionBackward b = prepare_backward(grad_out, grad_lse, q, k, v, out, lse, key_lengths,
                                              window_left, window_right, scale);
  if (q.numel() == 0) return b.grads(k, v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "local_attention_bwd", [&] {
    cpu::local_attention_backward<scalar_t, at::opmath_type<scalar_t>>(b.params);
  });
  return b.grads(k, v);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("local_attention_fwd", &local_attention_fwd_cpu);
  m.impl("local_attention_bwd", &local_attention_bwd_cpu);
}

}  // namespace fastattn
