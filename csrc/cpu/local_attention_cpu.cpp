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
  check_qkv(q, k, v);
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
  check_qkv(q, k, v);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "fastattn: grad_out and out must match q's shape ", q.sizes());
  at::Tensor dout = grad_out.stride(-1) == 1 ? grad_out : grad_out.contiguous();
  at::Tensor o = out.stride(-1) == 1 ? out : out.contiguous();
  at::Tensor lse_c = lse.to(at::kFloat).contiguous();
  at::Tensor dlse = grad_lse.to(at::kFloat).contiguous();
  at::Tensor grad_q = at::empty(q.sizes(), q.options());
  at::Tensor grad_k = at::empty(q.sizes(), q.options());
  at::Tensor grad_v = at::empty(q.sizes(), q.options());
  if (q.numel() == 0) return {grad_q, grad_k, grad_v};
  at::Tensor delta = at::empty_like(lse_c);

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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "local_attention_bwd", [&] {
    cpu::local_attention_backward<scalar_t, at::opmath_type<scalar_t>>(p);
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("local_attention_fwd", &local_attention_fwd_cpu);
  m.impl("local_attention_bwd", &local_attention_bwd_cpu);
}

}  // namespace fastattn
