// Torch-facing glue shared by the CPU and CUDA backends: validates tensors (the Python API
// has already produced friendly errors; these checks guard direct op calls) and fills the
// params structs.
#pragma once
#include <ATen/ATen.h>
#include <algorithm>

#include "local_attention_params.h"

namespace fastattn {

inline TensorStrides strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2)};
}

inline void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4, "fastattn: q must be (B, H, L, D), got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "fastattn: q, k, v must have the same shape, got q=", q.sizes(), " k=", k.sizes(),
              " v=", v.sizes());
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

inline LocalAttentionParams make_params(const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, const at::Tensor& out,
                                        const at::Tensor& lse,
                                        const c10::optional<at::Tensor>& key_lengths,
                                        int64_t window_left, int64_t window_right,
                                        double scale) {
  check_qkv(q, k, v);
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
  p.key_lengths = nullptr;
  if (key_lengths.has_value()) {
    const at::Tensor& kl = *key_lengths;
    TORCH_CHECK(kl.scalar_type() == at::kInt && kl.dim() == 1 && kl.size(0) == q.size(0) &&
                    kl.is_contiguous() && kl.device() == q.device(),
                "fastattn: key_lengths must be a contiguous int32 (B,) tensor on q's device, "
                "got dtype ", kl.scalar_type(), " shape ", kl.sizes());
    p.key_lengths = kl.data_ptr<int32_t>();
  }
  p.window_left = std::min<int64_t>(window_left, p.seq_len);
  p.window_right = std::min<int64_t>(window_right, p.seq_len);
  p.scale = scale;
  return p;
}

}  // namespace fastattn
