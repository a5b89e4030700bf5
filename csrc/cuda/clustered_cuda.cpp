// CUDA backend of the clustering and clustered attention ops: the driver of
// csrc/clustered_torch.h over the kernels of clustered_kernels.cu. Every launch runs on the
// current stream of q's device, under a device guard, and is checked. (c10's stream header,
// not ATen/cuda/CUDAContext.h, which needs the cuBLAS headers a bare CUDA toolkit may lack.)
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>
#include <torch/version.h>

#include "clustered_torch.h"
#include "cuda/clustered_cuda.h"

namespace fastattn {
namespace {

namespace kernels = cuda::clustered;

template <typename scalar_t>
struct Native;
template <>
struct Native<float> { using type = float; };
template <>
struct Native<c10::Half> { using type = __half; };
template <>
struct Native<c10::BFloat16> { using type = __nv_bfloat16; };

template <typename scalar_t>
using native_t = typename Native<scalar_t>::type;

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// (B, H, M, K) x (B, H, K, N) -> (B, H, M, N) as batched GEMMs with a float32 result
// (aten::bmm.dtype, torch >= 2.8: half / bfloat16 operands, float32 accumulation and output).
at::Tensor bmm_float(const at::Tensor& a, const at::Tensor& b) {
  const int64_t B = a.size(0), H = a.size(1), M = a.size(2), K = a.size(3), N = b.size(3);
  const at::Tensor a3 = a.reshape({B * H, M, K}), b3 = b.reshape({B * H, K, N});
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
  const at::Tensor out = a.scalar_type() == at::kFloat ? at::bmm(a3, b3)
                                                       : at::bmm(a3, b3, at::kFloat);
#else
  const at::Tensor out = at::bmm(a3.to(at::kFloat), b3.to(at::kFloat));
#endif
  return out.view({B, H, M, N});
}

struct CudaBackend {
  template <typename F>
  static void dispatch(at::ScalarType type, F&& f) {
    switch (type) {
      case at::kFloat: return f(float{});
      case at::kHalf: return f(c10::Half{});
      case at::kBFloat16: return f(c10::BFloat16{});
      default:
        TORCH_CHECK(false, "fastattn: CUDA clustered attention supports float32, float16 and "
                           "bfloat16, got ", type);
    }
  }

  // a is float32; b is float32, or the inputs' half / bfloat16 (k or v, exact in that
  // dtype). A float32 b runs a float32 GEMM (TF32 only if the user enabled it globally).
  // Otherwise the GEMMs run on the tensor cores with float32 accumulation and output, and a
  // is rounded to b's dtype. A small a (per-cluster rows: centroids, their gradients) is
  // split into a_hi + a_lo, two GEMMs for ~16 significant bits, so that scores and the
  // top-k choice are nearly float32-exact. A large a (the C x L probabilities or their
  // gradient) is rounded once, as FlashAttention rounds P and dS: splitting it would cost
  // more memory traffic than the GEMMs themselves.
  static at::Tensor mm(const at::Tensor& a, const at::Tensor& b) {
    if (b.scalar_type() == at::kFloat) return at::matmul(a, b).contiguous();
    const at::Tensor hi = a.to(b.scalar_type());
    at::Tensor out = bmm_float(hi, b);
    if (a.numel() <= b.numel()) out.add_(bmm_float((a - hi.to(at::kFloat)).to(b.scalar_type()), b));
    return out;
  }

  template <typename scalar_t>
  static void cluster(const ClusterParams& p) {
    C10_CUDA_CHECK(kernels::cluster<native_t<scalar_t>>(p, stream()));
  }

  // A stable sort by cluster (slot C for no cluster) gives members in ascending query order;
  // offsets are the first position of each slot.
  template <typename acc_t>
  static void group(const ClusteredParams<acc_t>& p, const at::Tensor& labels,
                    const at::Tensor& perm, const at::Tensor& offsets) {
    const int64_t C = p.clusters;
    const at::Tensor flat = labels.view({-1, labels.size(2)});
    const at::Tensor slot = at::where((flat >= 0) & (flat < C), flat, C).to(at::kInt);
    auto [sorted, order] = at::sort(slot, /*stable=*/true, /*dim=*/-1, /*descending=*/false);
    perm.copy_(order);
    const at::Tensor bounds = at::arange(C + 2, slot.options()).expand({slot.size(0), C + 2});
    offsets.copy_(at::searchsorted(sorted, bounds.contiguous(), /*out_int32=*/true));
  }

  template <typename scalar_t, typename acc_t>
  static void aggregate(const ClusteredParams<acc_t>& p, const void* x, const TensorStrides& s,
                        acc_t* dst, acc_t factor, bool mean) {
    C10_CUDA_CHECK(kernels::aggregate<native_t<scalar_t>>(p, x, s, dst, factor, mean, stream()));
  }
  template <typename acc_t>
  static void rows_forward(const ClusteredParams<acc_t>& p) {
    C10_CUDA_CHECK(kernels::rows_forward(p, stream()));
  }
  template <typename acc_t>
  static void rows_backward(const ClusteredParams<acc_t>& p) {
    C10_CUDA_CHECK(kernels::rows_backward(p, stream()));
  }
  template <typename scalar_t, typename acc_t>
  static void query_forward(const ClusteredParams<acc_t>& p) {
    C10_CUDA_CHECK(kernels::query_forward<native_t<scalar_t>>(p, stream()));
  }
  template <typename scalar_t, typename acc_t>
  static void prepass(const ClusteredParams<acc_t>& p) {
    C10_CUDA_CHECK(kernels::prepass<native_t<scalar_t>>(p, stream()));
  }
  template <typename scalar_t, typename acc_t>
  static void query_backward(const ClusteredParams<acc_t>& p) {
    at::Tensor scratch;
    if (p.topk > 32) {
      scratch = at::empty({p.batch * p.heads * p.seq_len * p.head_dim},
                          at::TensorOptions().device(at::kCUDA, c10::cuda::current_device())
                              .dtype(at::kFloat));
    }
    C10_CUDA_CHECK(kernels::query_backward<native_t<scalar_t>>(
        p, scratch.defined() ? scratch.data_ptr<float>() : nullptr, stream()));
  }
};

using Driver = ClusteredDriver<CudaBackend>;

void check_cuda(const at::Tensor& q) {
  TORCH_CHECK(q.is_cuda(), "fastattn: expected CUDA tensors, got ", q.device());
  TORCH_CHECK(q.size(3) <= kernels::kMaxHeadDim, "fastattn: CUDA clustered attention supports "
              "head dims up to ", kernels::kMaxHeadDim, ", got D=", q.size(3));
}

std::tuple<at::Tensor, at::Tensor> cluster_cuda(const at::Tensor& q, const at::Tensor& planes,
                                                const at::Tensor& seed,
                                                const c10::optional<at::Tensor>& query_lengths,
                                                int64_t clusters, int64_t iterations) {
  check_cuda(q);
  const c10::cuda::CUDAGuard guard(q.device());
  return Driver::cluster(q, planes, seed, query_lengths, clusters, iterations);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& labels,
    int64_t clusters, int64_t topk, const c10::optional<at::Tensor>& key_lengths, double scale) {
  check_cuda(q);
  const c10::cuda::CUDAGuard guard(q.device());
  return Driver::forward(q, k, v, labels, clusters, topk, key_lengths, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& centroid_lse,
    const at::Tensor& mass, const at::Tensor& topk_idx, int64_t clusters,
    const c10::optional<at::Tensor>& key_lengths, double scale) {
  check_cuda(q);
  const c10::cuda::CUDAGuard guard(q.device());
  return Driver::backward(grad_out, q, k, v, labels, lse, centroid_lse, mass, topk_idx,
                          clusters, key_lengths, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("cluster", &cluster_cuda);
  m.impl("clustered_attention_fwd", &forward_cuda);
  m.impl("clustered_attention_bwd", &backward_cuda);
}

}  // namespace fastattn
