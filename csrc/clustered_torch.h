// Torch-facing driver of clustering and clustered attention, shared by the CPU and CUDA
// backends. A Backend supplies the kernels (stages over ClusteredParams), a dtype dispatch
// and `mm`, the dense centroid x key products. Those products are plain batched GEMMs
// (C centroids against all L keys): a vendor GEMM (MKL / cuBLAS) beats anything hand-written
// here, so they stay GEMMs and only the sparse and data-dependent parts are kernels.
//
// Forward:  group queries by label -> centroids (scale * mean) -> S = centroids @ K^T (GEMM)
//           -> per row: lse, top-k, mass, S := probabilities off the top-k -> base = S @ V
//           (GEMM) -> per query: out = base_c + mass_c * top-k softmax attention.
// Backward: the same, reversed; gradients reach q through the centroids and the top-k
//           softmax, and k and v through both; the clustering itself is constant.
#pragma once
#include <ATen/ATen.h>

#include <limits>
#include <tuple>
#include <type_traits>

#include "clustered_params.h"
#include "local_attention_torch.h"

namespace fastattn {

template <typename scalar_t>
using clustered_acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline void check_labels(const at::Tensor& labels, const at::Tensor& q, int64_t clusters) {
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 3 &&
                  labels.size(0) == q.size(0) && labels.size(1) == q.size(1) &&
                  labels.size(2) == q.size(2) && labels.device() == q.device(),
              "fastattn: labels must be an int64 (B, H, L) tensor on q's device, got dtype ",
              labels.scalar_type(), " shape ", labels.sizes());
  TORCH_CHECK(clusters >= 1, "fastattn: clusters must be >= 1, got ", clusters);
}

template <typename acc_t>
acc_t* acc_ptr(const at::Tensor& t) {
  return t.data_ptr<acc_t>();
}

template <class Backend>
struct ClusteredDriver {
  static std::tuple<at::Tensor, at::Tensor> cluster(
      const at::Tensor& q, const at::Tensor& planes, const at::Tensor& seed,
      const c10::optional<at::Tensor>& query_lengths, int64_t clusters, int64_t iterations) {
    TORCH_CHECK(q.dim() == 4 && (q.size(3) <= 1 || q.stride(3) == 1),
                "fastattn: q must be (B, H, L, D) with a contiguous last dim, got ", q.sizes());
    const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
    TORCH_CHECK(clusters >= 1, "fastattn: clusters must be >= 1, got ", clusters);
    TORCH_CHECK(iterations >= 0, "fastattn: iterations must be >= 0, got ", iterations);
    TORCH_CHECK(planes.scalar_type() == at::kFloat && planes.dim() == 2 &&
                    planes.size(1) == D + 1 && planes.size(0) >= 1 && planes.size(0) <= 64 &&
                    planes.device() == q.device(),
                "fastattn: planes must be float32 (bits, D + 1) with 1 <= bits <= 64 on q's "
                "device, got dtype ", planes.scalar_type(), " shape ", planes.sizes());
    TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1 && seed.device() == q.device(),
                "fastattn: seed must be a one-element int64 tensor on q's device");
    const auto ints = q.options().dtype(at::kLong);
    at::Tensor labels = at::empty({B, H, L}, ints);
    at::Tensor counts = at::empty({B, H, clusters}, ints);
    if (B * H == 0) return {labels, counts};
    if (L == 0) return {labels, counts.zero_()};
    at::Tensor planes_c = planes.contiguous();
    at::Tensor seed_c = seed.reshape({1}).contiguous();
    at::Tensor hashes = at::empty({B * H, L}, ints);
    at::Tensor centroids = at::empty({B * H, clusters}, ints);
    at::Tensor members = at::empty({B * H, clusters}, ints.dtype(at::kInt));
    at::Tensor ones = at::empty({B * H, clusters, planes.size(0)}, ints.dtype(at::kInt));
    ClusterParams p{};
    p.q = q.data_ptr();
    p.q_strides = strides_of(q);
    p.batch = B;
    p.heads = H;
    p.seq_len = L;
    p.head_dim = D;
    p.planes = planes_c.data_ptr<float>();
    p.bits = planes.size(0);
    p.clusters = clusters;
    p.iterations = iterations;
    p.query_lengths = lengths_ptr(query_lengths, q, "query_lengths");
    p.seed = seed_c.data_ptr<int64_t>();
    p.hashes = reinterpret_cast<uint64_t*>(hashes.data_ptr<int64_t>());
    p.centroids = reinterpret_cast<uint64_t*>(centroids.data_ptr<int64_t>());
    p.members = members.data_ptr<int32_t>();
    p.ones = ones.data_ptr<int32_t>();
    p.labels = labels.data_ptr<int64_t>();
    p.counts = counts.data_ptr<int64_t>();
    Backend::dispatch(q.scalar_type(), [&](auto tag) {
      Backend::template cluster<decltype(tag)>(p);
    });
    return {labels, counts};
  }

  template <typename acc_t>
  static ClusteredParams<acc_t> params(const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const at::Tensor& labels,
                                       int64_t clusters, int64_t topk,
                                       const c10::optional<at::Tensor>& key_lengths,
                                       double scale, at::Tensor& perm, at::Tensor& offsets) {
    ClusteredParams<acc_t> p{};
    p.q = q.data_ptr();
    p.k = k.data_ptr();
    p.v = v.data_ptr();
    p.q_strides = strides_of(q);
    p.k_strides = strides_of(k);
    p.v_strides = strides_of(v);
    p.batch = q.size(0);
    p.heads = q.size(1);
    p.seq_len = q.size(2);
    p.head_dim = q.size(3);
    p.clusters = clusters;
    p.topk = topk;
    p.key_lengths = lengths_ptr(key_lengths, q, "key_lengths");
    p.scale = static_cast<acc_t>(scale);
    p.labels = labels.data_ptr<int64_t>();
    const auto ints = q.options().dtype(at::kInt);
    perm = at::empty({p.batch * p.heads, p.seq_len}, ints);
    offsets = at::empty({p.batch * p.heads, clusters + 2}, ints);
    p.perm = perm.data_ptr<int32_t>();
    p.offsets = offsets.data_ptr<int32_t>();
    return p;
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
      const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& labels_in,
      int64_t clusters, int64_t topk, const c10::optional<at::Tensor>& key_lengths,
      double scale) {
    check_qkv(q, k, v);
    check_labels(labels_in, q, clusters);
    TORCH_CHECK(topk >= 0, "fastattn: topk must be >= 0, got ", topk);
    const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), C = clusters;
    topk = std::min(topk, L);
    const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const auto fopts = q.options().dtype(acc);
    at::Tensor out = at::empty(q.sizes(), q.options());
    at::Tensor lse = at::empty({B, H, L}, fopts);
    at::Tensor centroid_lse = at::empty({B, H, C}, fopts);
    at::Tensor mass = at::empty({B, H, C}, fopts);
    at::Tensor topk_idx = at::empty({B, H, C, topk}, q.options().dtype(at::kInt));
    if (B * H * L == 0) return {out, lse, centroid_lse.fill_(-std::numeric_limits<double>::infinity()), mass.zero_(), topk_idx};
    at::Tensor labels = labels_in.contiguous();
    Backend::dispatch(q.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      using acc_t = clustered_acc_t<scalar_t>;
      at::Tensor perm, offsets;
      auto p = params<acc_t>(q, k, v, labels, C, topk, key_lengths, scale, perm, offsets);
      Backend::template group<acc_t>(p, labels, perm, offsets);
      at::Tensor centroids = at::empty({B, H, C, D}, fopts);
      Backend::template aggregate<scalar_t, acc_t>(p, p.q, p.q_strides, acc_ptr<acc_t>(centroids),
                                                   p.scale, true);
      at::Tensor scores = Backend::mm(centroids, k.transpose(-1, -2));
      p.scores = acc_ptr<acc_t>(scores);
      p.centroid_lse = acc_ptr<acc_t>(centroid_lse);
      p.mass = acc_ptr<acc_t>(mass);
      p.topk_idx = topk_idx.data_ptr<int32_t>();
      Backend::template rows_forward<acc_t>(p);
      at::Tensor base = Backend::mm(scores, v);
      p.base = acc_ptr<acc_t>(base);
      p.out = out.data_ptr();
      p.out_strides = strides_of(out);
      p.lse = acc_ptr<acc_t>(lse);
      Backend::template query_forward<scalar_t, acc_t>(p);
    });
    return {out, lse, centroid_lse, mass, topk_idx};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& grad_out_in, const at::Tensor& q, const at::Tensor& k,
      const at::Tensor& v, const at::Tensor& labels_in, const at::Tensor& lse_in,
      const at::Tensor& centroid_lse_in, const at::Tensor& mass_in,
      const at::Tensor& topk_idx_in, int64_t clusters,
      const c10::optional<at::Tensor>& key_lengths, double scale) {
    check_qkv(q, k, v);
    check_labels(labels_in, q, clusters);
    const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), C = clusters;
    TORCH_CHECK(grad_out_in.sizes() == q.sizes(), "fastattn: grad_out must match q's shape ",
                q.sizes(), ", got ", grad_out_in.sizes());
    TORCH_CHECK(topk_idx_in.dim() == 4 && topk_idx_in.size(2) == C &&
                    topk_idx_in.scalar_type() == at::kInt,
                "fastattn: topk_idx must be int32 (B, H, clusters, topk), got ",
                topk_idx_in.sizes());
    const int64_t topk = topk_idx_in.size(3);
    TORCH_CHECK(topk <= L, "fastattn: topk_idx has ", topk, " columns, more than L = ", L);
    const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const auto fopts = q.options().dtype(acc);
    at::Tensor grad_q = at::empty(q.sizes(), q.options());
    if (B * H * L * D == 0) {
      return {grad_q.zero_(), at::zeros(q.sizes(), q.options()), at::zeros(q.sizes(), q.options())};
    }
    at::Tensor grad_out = grad_out_in.stride(-1) == 1 ? grad_out_in : grad_out_in.contiguous();
    grad_out = grad_out.to(q.scalar_type());
    at::Tensor labels = labels_in.contiguous();
    at::Tensor lse = lse_in.to(acc).contiguous();
    at::Tensor centroid_lse = centroid_lse_in.to(acc).contiguous();
    at::Tensor mass = mass_in.to(acc).contiguous();
    at::Tensor topk_idx = topk_idx_in.contiguous();
    at::Tensor grad_k, grad_v;
    Backend::dispatch(q.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      using acc_t = clustered_acc_t<scalar_t>;
      at::Tensor perm, offsets;
      auto p = params<acc_t>(q, k, v, labels, C, topk, key_lengths, scale, perm, offsets);
      p.grad_out = grad_out.data_ptr();
      p.grad_out_strides = strides_of(grad_out);
      p.lse = acc_ptr<acc_t>(lse);
      p.centroid_lse = acc_ptr<acc_t>(centroid_lse);
      p.mass = acc_ptr<acc_t>(mass);
      p.topk_idx = topk_idx.data_ptr<int32_t>();
      Backend::template group<acc_t>(p, labels, perm, offsets);
      at::Tensor centroids = at::empty({B, H, C, D}, fopts);
      at::Tensor grad_base = at::empty({B, H, C, D}, fopts);
      Backend::template aggregate<scalar_t, acc_t>(p, p.q, p.q_strides, acc_ptr<acc_t>(centroids),
                                                   p.scale, true);
      Backend::template aggregate<scalar_t, acc_t>(p, p.grad_out, p.grad_out_strides,
                                                   acc_ptr<acc_t>(grad_base), acc_t(1), false);
      at::Tensor w = at::empty({B, H, L}, fopts);
      at::Tensor grad_mass = at::empty({B, H, C}, fopts);
      p.w = acc_ptr<acc_t>(w);
      p.grad_mass = acc_ptr<acc_t>(grad_mass);
      Backend::template prepass<scalar_t, acc_t>(p);
      at::Tensor scores = Backend::mm(centroids, k.transpose(-1, -2));
      at::Tensor grad_probs = Backend::mm(grad_base, v.transpose(-1, -2));
      at::Tensor probs_rest = at::empty_like(scores);
      p.scores = acc_ptr<acc_t>(scores);
      p.grad_probs = acc_ptr<acc_t>(grad_probs);
      p.probs_rest = acc_ptr<acc_t>(probs_rest);
      Backend::template rows_backward<acc_t>(p);
      at::Tensor grad_centroids = Backend::mm(scores, k);
      at::Tensor grad_k_acc = Backend::mm(scores.transpose(-1, -2), centroids);
      at::Tensor grad_v_acc = Backend::mm(probs_rest.transpose(-1, -2), grad_base);
      p.base = acc_ptr<acc_t>(grad_centroids);
      p.grad_k = acc_ptr<acc_t>(grad_k_acc);
      p.grad_v = acc_ptr<acc_t>(grad_v_acc);
      p.grad_q = grad_q.data_ptr();
      p.grad_q_strides = strides_of(grad_q);
      Backend::template query_backward<scalar_t, acc_t>(p);
      grad_k = grad_k_acc.to(q.scalar_type());
      grad_v = grad_v_acc.to(q.scalar_type());
    });
    return {grad_q, grad_k, grad_v};
  }
};

}  // namespace fastattn
