// Torch-facing glue shared by the CPU and CUDA backends: validates tensors (the Python API
// has already produced friendly errors; these checks guard direct op calls) and fills the
// params structs.
#pragma once
#include <ATen/ATen.h>
#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "local_attention_params.h"

namespace fastattn {

// Strides of a (B, H, L, D) tensor, or of a packed (T, H, D) one (local_attention_varlen) seen
// as tensor batch 0 of (1, H, T, D).
inline TensorStrides strides_of(const at::Tensor& t) {
  if (t.dim() == 3) return {0, t.stride(1), t.stride(0)};
  return {t.stride(0), t.stride(1), t.stride(2)};
}

// Rows per head: L of (B, H, L, D), T of (T, H, D). Heads are dim 1 in both layouts.
inline int64_t rows_of(const at::Tensor& t) { return t.dim() == 3 ? t.size(0) : t.size(2); }

inline void check_head_groups(int64_t heads, int64_t kv_heads) {
  TORCH_CHECK(kv_heads == heads || (kv_heads > 0 && heads % kv_heads == 0), "fastattn: q has H=",
              heads, " heads, k and v have H_kv=", kv_heads,
              ": H must be a multiple of H_kv (GQA / MQA)");
}

// One dtype and device for q, k, v, and a contiguous last (head) dimension in each.
inline void check_dtype_device_layout(const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v) {
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "fastattn: q, k, v must have the same dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(),
              "fastattn: q, k, v must be on the same device");
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->size(-1) <= 1 || t->stride(-1) == 1,
                "fastattn: the last (head) dimension must be contiguous, got strides ",
                t->strides());
  }
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
    // Lq may differ from Lk (a KV cache: bottom-right alignment, cpu/local_attention_kernel.h).
    TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3),
                "fastattn: q, k, v must have the same B and D, got q=", q.sizes(), " k=",
                k.sizes(), " v=", v.sizes());
    check_head_groups(q.size(1), k.size(1));
  } else {
    TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(),
                "fastattn: q, k, v must have the same shape, got q=", q.sizes(), " k=", k.sizes(),
                " v=", v.sizes());
  }
  check_dtype_device_layout(q, k, v);
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

inline void check_softcap(double softcap) {
  TORCH_CHECK_VALUE(softcap >= 0 && softcap < std::numeric_limits<double>::infinity(),
                    "fastattn: softcap must be finite and >= 0 (0 = off), got ", softcap);
}

// What an ordinary and a packed batch share: pointers, strides, heads and rows, window, scale.
inline LocalAttentionParams common_params(const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, const at::Tensor& out,
                                          const at::Tensor& lse, int64_t window_left,
                                          int64_t window_right, double scale, double softcap) {
  TORCH_CHECK(window_left >= 0 && window_right >= 0,
              "fastattn: window must be >= 0, got (", window_left, ", ", window_right, ")");
  check_softcap(softcap);
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
  p.heads = q.size(1);
  p.head_dim = q.size(-1);
  p.kv_heads = k.size(1);
  p.seq_len = rows_of(q);
  p.key_seq_len = rows_of(k);
  // A side wider than every row distance is unbounded; clamped, no sum can overflow.
  const int64_t widest = std::max(p.seq_len, p.key_seq_len);
  p.window_left = std::min(window_left, widest);
  p.window_right = std::min(window_right, widest);
  p.scale = scale;
  p.softcap = softcap;
  return p;
}

inline LocalAttentionParams make_params(const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, const at::Tensor& out,
                                        const at::Tensor& lse,
                                        const c10::optional<at::Tensor>& key_lengths,
                                        int64_t window_left, int64_t window_right,
                                        double scale, double softcap = 0) {
  check_qkv(q, k, v, /*grouped_kv=*/true);
  LocalAttentionParams p =
      common_params(q, k, v, out, lse, window_left, window_right, scale, softcap);
  p.batch = q.size(0);
  p.key_lengths = lengths_ptr(key_lengths, q, "key_lengths");
  return p;
}

// q (Tq, H, D), k and v (Tk, H_kv, D) of a packed batch.
inline void check_varlen_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && k.sizes() == v.sizes(),
              "fastattn: varlen q must be (Tq, H, D), k and v (Tk, H_kv, D), got q=", q.sizes(),
              " k=", k.sizes(), " v=", v.sizes());
  TORCH_CHECK(k.size(2) == q.size(2), "fastattn: q, k, v must have the same D, got q=",
              q.sizes(), " k=", k.sizes());
  check_head_groups(q.size(1), k.size(1));
  check_dtype_device_layout(q, k, v);
}

// cu_seqlens: int32 (N + 1,) on q's device, from 0 up to `total` rows, no sequence longer
// than max_seqlen. The values are checked here where they can be read without a device sync
// (CPU); on a GPU fastattn.local_attention_varlen checks them before the op.
inline void check_cu_seqlens(const at::Tensor& cu, const char* name, const at::Tensor& q,
                             int64_t total, int64_t max_seqlen, const char* max_name) {
  TORCH_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.size(0) >= 1 &&
                  cu.is_contiguous() && cu.device() == q.device(),
              "fastattn: ", name, " must be a contiguous int32 (N + 1,) tensor on q's device, "
              "got dtype ", cu.scalar_type(), " shape ", cu.sizes(), " on ", cu.device());
  TORCH_CHECK_VALUE(max_seqlen >= 0, "fastattn: ", max_name, " must be >= 0, got ", max_seqlen);
  if (!cu.is_cpu()) return;
  const int32_t* offsets = cu.data_ptr<int32_t>();
  const int64_t n = cu.size(0) - 1;
  TORCH_CHECK_VALUE(offsets[0] == 0, "fastattn: ", name, "[0] must be 0, got ", offsets[0]);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t length = int64_t{offsets[i + 1]} - offsets[i];
    TORCH_CHECK_VALUE(length >= 0, "fastattn: ", name, " must be non-decreasing, got ", name,
                      "[", i, "]=", offsets[i], " > ", name, "[", i + 1, "]=", offsets[i + 1]);
    TORCH_CHECK_VALUE(length <= max_seqlen, "fastattn: ", max_name, "=", max_seqlen,
                      " is shorter than sequence ", i, " of ", name, " (", length, " rows)");
  }
  TORCH_CHECK_VALUE(offsets[n] == total, "fastattn: ", name,
                    "[-1] must equal the rows of its tensor (", total, "), got ", offsets[n]);
}

inline LocalAttentionParams make_varlen_params(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t window_left, int64_t window_right,
    double scale, double softcap) {
  check_varlen_qkv(q, k, v);
  check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q, q.size(0), max_seqlen_q, "max_seqlen_q");
  check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q, k.size(0), max_seqlen_k, "max_seqlen_k");
  TORCH_CHECK_VALUE(cu_seqlens_q.size(0) == cu_seqlens_k.size(0),
                    "fastattn: cu_seqlens_q and cu_seqlens_k must have the same length (N + 1), "
                    "got ", cu_seqlens_q.size(0), " and ", cu_seqlens_k.size(0));
  LocalAttentionParams p =
      common_params(q, k, v, out, lse, window_left, window_right, scale, softcap);
  p.batch = cu_seqlens_q.size(0) - 1;
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_seqlens_k.data_ptr<int32_t>();
  p.max_seqlen_q = max_seqlen_q;
  p.max_seqlen_k = max_seqlen_k;
  return p;
}

// out in q's shape, lse float32 with q's shape but D: (B, H, Lq), or (H, Tq) for a packed batch.
inline std::tuple<at::Tensor, at::Tensor> allocate_outputs(const at::Tensor& q) {
  at::Tensor out = at::empty(q.sizes(), q.options());
  const auto lse_options = q.options().dtype(at::kFloat);
  at::Tensor lse = q.dim() == 3 ? at::empty({q.size(1), q.size(0)}, lse_options)
                                : at::empty({q.size(0), q.size(1), q.size(2)}, lse_options);
  return {out, lse};
}

// With no query or no key there is nothing to run: zeros, lse -inf.
inline bool no_work(const at::Tensor& q, const at::Tensor& k, at::Tensor& out, at::Tensor& lse) {
  if (q.numel() > 0 && k.numel() > 0) return false;
  out.zero_();
  lse.fill_(-std::numeric_limits<float>::infinity());
  return true;
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
  // Heads are dim 1 of (B, H, L, D) and of packed (T, H, D): split it into (H_kv, group).
  std::vector<int64_t> grouped_shape = kv.sizes().vec();
  grouped_shape.insert(grouped_shape.begin() + 2, per_query_head.size(1) / kv_heads);
  const at::Tensor grouped = per_query_head.view(grouped_shape);
  return widen ? grouped.sum(2, false, at::kFloat).to(dtype) : grouped.sum(2);
}

// The tensors a backward call allocates or normalises, and the params pointing at them. Both
// backends share this; only the kernel launch differs.
struct LocalAttentionBackward {
  at::Tensor grad_out, out, lse, grad_lse, delta, grad_q, grad_k, grad_v;
  LocalAttentionBwdParams params{};
  bool has_work = false;  // false: the gradients are zeros already, no kernel runs

  // The gradients to return, once the kernel has run: dk and dv in k's and v's shape.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> grads(const at::Tensor& k,
                                                       const at::Tensor& v) const {
    return {grad_q, sum_kv_groups(grad_k, k), sum_kv_groups(grad_v, v)};
  }
};

// `make_params(out, lse)` builds the forward's params over the normalised out and lse.
template <typename MakeParams>
inline LocalAttentionBackward prepare_backward(const at::Tensor& grad_out,
                                               const at::Tensor& grad_lse, const at::Tensor& q,
                                               const at::Tensor& k, const at::Tensor& out,
                                               const at::Tensor& lse, MakeParams make_params) {
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
  // dK and dV per query head (k's shape with q's heads), summed per group by grads() under GQA.
  std::vector<int64_t> per_query_head = k.sizes().vec();
  per_query_head[1] = q.size(1);
  b.grad_q = at::empty(q.sizes(), q.options());
  b.grad_k = at::empty(per_query_head, q.options());
  b.grad_v = at::empty(per_query_head, q.options());
  LocalAttentionBwdParams& p = b.params;
  static_cast<LocalAttentionParams&>(p) = make_params(b.out, b.lse);  // checks the arguments
  // No query or no key (Lq or Lk may be 0 on its own): no score, and zero gradients.
  b.has_work = q.numel() > 0 && k.numel() > 0;
  if (!b.has_work) {
    for (at::Tensor* grad : {&b.grad_q, &b.grad_k, &b.grad_v}) grad->zero_();
    return b;
  }
  b.delta = at::empty_like(b.lse);
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

inline LocalAttentionBackward prepare_backward(
    const at::Tensor& grad_out, const at::Tensor& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const c10::optional<at::Tensor>& key_lengths, int64_t window_left, int64_t window_right,
    double scale, double softcap = 0) {
  check_qkv(q, k, v, /*grouped_kv=*/true);
  return prepare_backward(grad_out, grad_lse, q, k, out, lse, [&](const at::Tensor& o,
                                                                  const at::Tensor& l) {
    return make_params(q, k, v, o, l, key_lengths, window_left, window_right, scale, softcap);
  });
}

// prepare_backward of a packed batch (local_attention_varlen_bwd).
inline LocalAttentionBackward prepare_varlen_backward(
    const at::Tensor& grad_out, const at::Tensor& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, int64_t window_left, int64_t window_right, double scale,
    double softcap) {
  check_varlen_qkv(q, k, v);
  return prepare_backward(grad_out, grad_lse, q, k, out, lse, [&](const at::Tensor& o,
                                                                  const at::Tensor& l) {
    return make_varlen_params(q, k, v, o, l, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, window_left, window_right, scale, softcap);
  });
}

}  // namespace fastattn
