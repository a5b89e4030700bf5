// CPU backend of the clustering and clustered attention ops: the driver of
// csrc/clustered_torch.h over the loops of cpu/clustered_kernel.h.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "clustered_torch.h"
#include "cpu/clustered_kernel.h"

namespace fastattn {
namespace {

struct CpuBackend {
  template <typename F>
  static void dispatch(at::ScalarType type, F&& f) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, "fastattn_clustered",
                                    [&] { f(scalar_t{}); });
  }

  // a is float/double; b may be any floating dtype (k or v): compute in a's dtype.
  static at::Tensor mm(const at::Tensor& a, const at::Tensor& b) {
    return at::matmul(a, b.to(a.scalar_type())).contiguous();
  }

  template <typename scalar_t>
  static void cluster(const ClusterParams& p) { cpu::cluster<scalar_t>(p); }
  template <typename acc_t>
  static void group(const ClusteredParams<acc_t>& p, const at::Tensor&, const at::Tensor&,
                    const at::Tensor&) {
    cpu::group(p);
  }
  template <typename scalar_t, typename acc_t>
  static void aggregate(const ClusteredParams<acc_t>& p, const void* x, const TensorStrides& s,
                        acc_t* dst, acc_t factor, bool mean) {
    cpu::aggregate<scalar_t>(p, x, s, dst, factor, mean);
  }
  template <typename acc_t>
  static void rows_forward(const ClusteredParams<acc_t>& p) { cpu::rows_forward(p); }
  template <typename acc_t>
  static void rows_backward(const ClusteredParams<acc_t>& p) { cpu::rows_backward(p); }
  template <typename scalar_t, typename acc_t>
  static void query_forward(const ClusteredParams<acc_t>& p) { cpu::query_forward<scalar_t>(p); }
  template <typename scalar_t, typename acc_t>
  static void prepass(const ClusteredParams<acc_t>& p) { cpu::prepass<scalar_t>(p); }
  template <typename scalar_t, typename acc_t>
  static void query_backward(const ClusteredParams<acc_t>& p) {
    cpu::query_backward<scalar_t>(p);
  }
};

using Driver = ClusteredDriver<CpuBackend>;

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("cluster", &Driver::cluster);
  m.impl("clustered_attention_fwd", &Driver::forward);
  m.impl("clustered_attention_bwd", &Driver::backward);
}

}  // namespace fastattn
