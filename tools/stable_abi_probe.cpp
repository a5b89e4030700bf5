// tools/stable_abi_probe.sh: a stable-ABI op shaped like ours (Tensor, Tensor?, int, float in; a
// tuple of tensors out; parallel_for), to check that one build loads under several torch versions.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>
#include <optional>
#include <tuple>

using torch::stable::Tensor;

std::tuple<Tensor, Tensor> scaled(const Tensor& q, std::optional<Tensor> lengths, int64_t n,
                                  double scale) {
  STD_TORCH_CHECK(q.scalar_type() == torch::headeronly::ScalarType::Float, "float32 only");
  Tensor out = torch::stable::empty_like(q);
  Tensor q_c = torch::stable::contiguous(q);
  const float* src = q_c.const_data_ptr<float>();
  float* dst = out.mutable_data_ptr<float>();
  torch::stable::parallel_for(0, q.numel(), 1024, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) dst[i] = src[i] * static_cast<float>(scale) + n;
  });
  Tensor count = torch::stable::new_zeros(q, {1});
  return {out, count};
}

STABLE_TORCH_LIBRARY(probe, m) {
  m.def("scaled(Tensor q, Tensor? lengths, int n, float scale) -> (Tensor, Tensor)");
}
STABLE_TORCH_LIBRARY_IMPL(probe, CPU, m) { m.impl("scaled", TORCH_BOX(&scaled)); }
