// Torch-facing glue shared by the CPU and CUDA backends: validates tensors (the Python API
// has already produced friendly errors; these checks guard direct op calls) and fills the
// params structs.
#pragma once
#include <ATen/ATen.h>
#include <algorithm>
#include <tuple>

#include "local_attention_params.h"

namespace fastattn {

inline TensorStrides strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2)};
}

// grouped_kv: k and v may have H_kv heads dividing q's H (GQA / MQA, local attention);
// otherwise q, k, v must have one shape (clustered attention).
inline void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      bool grouped_kv = false) {
  TORCH_CHECK(q.dim() == 4, "fastattn: q must be (B, H, L, D), got ", q.sizes());
  if (grouped_kv) {
    TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes(),
                "fastattn: k and v must have the same (B, H_kv, L, D) shape, got k=", k.sizes(),
                " v=", v.sizes());
    TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3),
                "fastattn: q, k, v must have the same B, L and D, got q=", q.sizes(), " k=",
                k.sizes(), " v=", v.sizes());
    const int64_t heads = q.size(1), kv_heads = k.size(1);
    TORCH_CHECK(kv_heads == heads || (kv_heads > 0 && heads % kv_heads == 0), "fastattn: q has H=",
                heads, " heads, k and v have H_kv=", kv_heads,
                ": H must be a multiple of H_kv (GQA / MQA)");
  } else {
    TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(),
                "fastattn: q, k, v must have the same shape, got q=", q.sizes(), " k=", k.sizes(),
                " v=", v.sizes());
  }
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "fastattn: q, k, v must have the same dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(),
              "fastattn: q, k, v must be on the same device");
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->size(3) <= 1 || t->stride(3) == 1,
                "fastattn: the last (head) dimension must be contiguous, got strides ",
                t->strides());
  }
}

// The data of an optional (B,) int32 lengths tensor (key_lengths, query_lengths), or nullptr.
inline const int32_t* lengths_ptr(const c10::optional<at::Tensor>& lengths, const at::Tensor& q,
                                  const char* name) {
  if (!lengths.has_value()) return nullptr;
  const at::Tensor& t = *lengths;
  TORCH_CHECK(t.scalar_type() == at::kInt && t.dim() == 1 && t.size(0) == q.size(0) &&
                  t.is_contiguous() && t.device() == q.device(),
              "fastattn: ", name, " must be a contiguous int32 (B,) tensor on q's device, got "
              "dtype ", t.scalar_type(), " shape ", t.sizes());
  return t.data_ptr<int32_t>();
}

inline LocalAttentionParams make_params(const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, const at::Tensor& out,
                                        const at::Tensor& lse,
                                        const c10::optional<at::Tensor>& key_lengths,
                                        int64_t window_left, int64_t window_right,
                                        double scale) {
  check_qkv(q, k, v, /*grouped_kv=*/true);
  TORCH_CHECK(window_left >= 0 && window_right >= 0,
              "fastattn: window must be >= 0, got (", window_left, ", ", window_right, ")");
  LocalAttentionParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.q_strides = strides_of(q);
  p.k_strides = strides_of(k);
  p.v_strides = strides_of(v);
  p.out_strides = strides_of(out);
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.seq_len = q.size(2);
  p.head_dim = q.size(3);
  p.kv_heads = k.size(1);
  p.cu_seqlens_q = p.cu_seqlens_k = nullptr;
  p.key_lengths = lengths_ptr(key_lengths, q, "key_lengths");
  p.window_left = std::min<int64_t>(window_left, p.seq_len);
  p.window_right = std::min<int64_t>(window_right, p.seq_len);
  p.scale = scale;
  return p;
}

// dK or dV per query head (B, H, L, D) summed over each group of H / H_kv query heads into
// k's shape (B, H_kv, L, D), in float32 for 16-bit dtypes, rounded once.
//
// Why a sum after the kernel rather than the kernels adding into (B, H_kv, L, D): the groups'
// query heads run in different blocks (threads, on the CPU), so adding in place would need
// atomics (float32 scratch for 16-bit types) and would make dK / dV depend on the order the
// blocks finish in. Written per query head, as FlashAttention 2 does for GQA, every kernel
// stays as it is, and the sum runs in a fixed order: dK and dV stay deterministic. The cost is
// a (B, H, L, D) buffer and one pass over it.
inline at::Tensor sum_kv_groups(const at::Tensor& per_query_head, const at::Tensor& kv) {
  const int64_t kv_heads = kv.size(1);
  if (kv_heads == per_query_head.size(1)) return per_query_head;
  const at::ScalarType dtype = per_query_head.scalar_type();
  const bool widen = dtype == at::kHalf || dtype == at::kBFloat16;
  // check_qkv: kv_heads > 0 divides H here (H = 0 leaves empty groups, which sum to zeros).
  const at::Tensor grouped = per_query_head.view(
      {kv.size(0), kv_heads, per_query_head.size(1) / kv_heads, kv.size(2), kv.size(3)});
  return widen ? grouped.sum(2, false, at::kFloat).to(dtype) : grouped.sum(2);
}

// The tensors a backward call allocates or normalises, and the params pointing at them. Both
// backends share this; only the kernel launch differs.
struct LocalAttentionBackward {
  at::Tensor grad_out, out, lse, grad_lse, delta, grad_q, grad_k, grad_v;
  LocalAttentionBwdParams params{};

  // The gradients to return, once the kernel has run: dk and dv in k's and v's shape.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> grads(const at::Tensor& k,
                                                       const at::Tensor& v) const {
    return {grad_q, sum_kv_groups(grad_k, k), sum_kv_groups(grad_v, v)};
  }
};

inline LocalAttentionBackward prepare_backward(
    const at::Tensor& grad_out, const at::Tensor& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const c10::optional<at::Tensor>& key_lengths, int64_t window_left, int64_t window_right,
    double scale) {
  check_qkv(q, k, v, /*grouped_kv=*/true);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "fastattn: grad_out and out must match q's shape ", q.sizes(), ", got ",
              grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "fastattn: grad_out and out must have q's dtype ", q.scalar_type());
  LocalAttentionBackward b;
  // Gradients arrive in any layout (autograd may hand an expanded zero-stride tensor); the
  // kernels need a contiguous head dim. q, k, v themselves are never copied.
  b.grad_out = grad_out.stride(-1) == 1 ? grad_out : grad_out.contiguous();
  b.out = out.stride(-1) == 1 ? out : out.contiguous();
  b.lse = lse.to(at::kFloat).contiguous();
  b.grad_lse = grad_lse.to(at::kFloat).contiguous();
  // dK and dV per query head (q's shape), summed per group by grads() under GQA.
  b.grad_q = at::empty(q.sizes(), q.options());
  b.grad_k = at::empty(q.sizes(), q.options());
  b.grad_v = at::empty(q.sizes(), q.options());
  if (q.numel() == 0) return b;
  b.delta = at::empty_like(b.lse);
  LocalAttentionBwdParams& p = b.params;
  static_cast<LocalAttentionParams&>(p) =
      make_params(q, k, v, b.out, b.lse, key_lengths, window_left, window_right, scale);
  p.grad_out = b.grad_out.data_ptr();
  p.grad_lse = b.grad_lse.data_ptr<float>();
  p.delta = b.delta.data_ptr<float>();
  p.grad_q = b.grad_q.data_ptr();
  p.grad_k = b.grad_k.data_ptr();
  p.grad_v = b.grad_v.data_ptr();
  p.grad_out_strides = strides_of(b.grad_out);
  p.grad_q_strides = strides_of(b.grad_q);
  p.grad_k_strides = strides_of(b.grad_k);
  p.grad_v_strides = strides_of(b.grad_v);
  return b;
}

}  // namespace fastattn
