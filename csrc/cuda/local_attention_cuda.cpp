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

#include "cuda/kernel_switches.h"
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
  TORCH_CHECK(cuda::supports_head_dim(q.size(-1), backward), "fastattn: CUDA local attention ",
              backward ? "backward" : "forward", " supports head dims 16, 32, 64, 96, 128",
              backward ? "" : ", 256", "; got D=", q.size(-1));
}

// A KV cache (Lq != Lk), packed sequences and soft-capping (issue 14). The CPU kernels take
// them. On CUDA the mma.sync forward and backward take them in their general variants (kSeq),
// which have compiled but not yet run on a GPU: until their tests have passed there they run
// only where FASTATTN_UNVERIFIED_CUDA_FEATURES=1 is set (the tests set it), and otherwise
// these calls raise rather than risk a wrong answer.
constexpr const char* kUnverifiedSwitch = "FASTATTN_UNVERIFIED_CUDA_FEATURES";

void check_cuda_features(bool kv_cache, bool packed, double softcap) {
  if (!kv_cache && !packed && softcap == 0) return;
  const char* feature = packed ? "local_attention_varlen" : kv_cache ? "Lq != Lk (a KV cache)"
                                                                     : "softcap";
  TORCH_CHECK_NOT_IMPLEMENTED(cuda::switch_set(kUnverifiedSwitch), "fastattn: ", feature,
                              " on CUDA has not been verified on a GPU yet; set ",
                              kUnverifiedSwitch, "=1 to run it anyway, or run on the CPU");
}

// Rows can be copied 16 bytes at a time when the data pointer and every stride but the last
// are multiples of 16 bytes.
bool rows_aligned(const at::Tensor& t) {
  const int64_t elems = 16 / t.element_size();
  bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) aligned = aligned && t.stride(d) % elems == 0;
  return aligned;
}

std::tuple<at::Tensor, at::Tensor> run_forward(const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v, at::Tensor out,
                                               at::Tensor lse, const LocalAttentionParams& p) {
  if (no_work(q, k, out, lse)) return {out, lse};
  const bool aligned = rows_aligned(q) && rows_aligned(k) && rows_aligned(v);
  const cuda::DType dtype = kernel_dtype(q);
  const int64_t splits = cuda::decode_splits(p, dtype);
  if (splits > 0) {
    // Each split's normalised output and lse, merged by the decode's second pass.
    at::Tensor part_out, part_lse;
    if (splits > 1) {
      part_out = at::empty({splits, q.numel()}, q.options().dtype(at::kFloat));
      part_lse = at::empty({splits, lse.numel()}, q.options().dtype(at::kFloat));
    }
    C10_CUDA_CHECK(cuda::local_attention_decode(
        p, dtype, aligned, splits, splits > 1 ? part_out.data_ptr<float>() : nullptr,
        splits > 1 ? part_lse.data_ptr<float>() : nullptr, c10::cuda::getCurrentCUDAStream()));
  } else {
    C10_CUDA_CHECK(cuda::local_attention_fwd(p, dtype, aligned,
                                             c10::cuda::getCurrentCUDAStream()));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward(const at::Tensor& q,
                                                            const at::Tensor& k,
                                                            const at::Tensor& v,
                                                            LocalAttentionBackward& b) {
  if (!b.has_work) return b.grads(k, v);
  // The float32 dQ scratch, zeroed by the delta pre-pass before the main kernel adds into it, in
  // the order of lse's rows, by which the kernels index it: (B, H, L, D), or (H, Tq, D) for a
  // packed batch (whose last pass writes grad_q back in q's (Tq, H, D) order).
  const at::Tensor dq_accum =
      q.dim() == 3 ? at::empty({q.size(1), q.size(0), q.size(2)}, q.options().dtype(at::kFloat))
                   : at::empty(q.sizes(), q.options().dtype(at::kFloat));
  const bool aligned =
      rows_aligned(q) && rows_aligned(k) && rows_aligned(v) && rows_aligned(b.grad_out);
  C10_CUDA_CHECK(cuda::local_attention_bwd(b.params, kernel_dtype(q), aligned,
                                           dq_accum.data_ptr<float>(),
                                           c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return b.grads(k, v);
}

std::tuple<at::Tensor, at::Tensor> local_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window_left,
    int64_t window_right, const c10::optional<at::Tensor>& key_lengths, double scale,
    double softcap) {
  check_qkv(q, k, v, /*grouped_kv=*/true);
  check_cuda_inputs(q, /*backward=*/false);
  check_cuda_features(k.size(2) != q.size(2), false, softcap);
  const c10::cuda::CUDAGuard guard(q.device());
  auto [out, lse] = allocate_outputs(q);
  const LocalAttentionParams p =
      make_params(q, k, v, out, lse, key_lengths, window_left, window_right, scale, softcap);
  return run_forward(q, k, v, out, lse, p);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> local_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    int64_t window_left, int64_t window_right, const c10::optional<at::Tensor>& key_lengths,
    double scale, double softcap) {
  check_qkv(q, k, v, /*grouped_kv=*/true);
  check_cuda_inputs(q, /*backward=*/true);
  check_cuda_features(k.size(2) != q.size(2), false, softcap);
  const c10::cuda::CUDAGuard guard(q.device());
  LocalAttentionBackward b = prepare_backward(grad_out, grad_lse, q, k, v, out, lse, key_lengths,
                                              window_left, window_right, scale, softcap);
  return run_backward(q, k, v, b);
}

std::tuple<at::Tensor, at::Tensor> local_attention_varlen_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, int64_t window_left, int64_t window_right, double scale,
    double softcap) {
  check_varlen_qkv(q, k, v);
  check_cuda_inputs(q, /*backward=*/false);
  check_cuda_features(false, /*packed=*/true, softcap);
  const c10::cuda::CUDAGuard guard(q.device());
  auto [out, lse] = allocate_outputs(q);
  // cu_seqlens' values are not read here (a device sync): fastattn.local_attention_varlen
  // checks them in eager mode; a direct op call is trusted, as FlashAttention trusts them.
  const LocalAttentionParams p =
      make_varlen_params(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, window_left, window_right, scale, softcap);
  return run_forward(q, k, v, out, lse, p);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> local_attention_varlen_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, int64_t window_left, int64_t window_right, double scale,
    double softcap) {
  check_varlen_qkv(q, k, v);
  check_cuda_inputs(q, /*backward=*/true);
  check_cuda_features(false, /*packed=*/true, softcap);
  const c10::cuda::CUDAGuard guard(q.device());
  LocalAttentionBackward b = prepare_varlen_backward(
      grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
      max_seqlen_k, window_left, window_right, scale, softcap);
  return run_backward(q, k, v, b);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("local_attention_fwd", &local_attention_fwd_cuda);
  m.impl("local_attention_bwd", &local_attention_bwd_cuda);
  m.impl("local_attention_varlen_fwd", &local_attention_varlen_fwd_cuda);
  m.impl("local_attention_varlen_bwd", &local_attention_varlen_bwd_cuda);
}

}  // namespace fastattn
