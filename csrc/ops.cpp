// Every fastattn op schema, declared once. Backends only add implementations
// (TORCH_LIBRARY_IMPL in cpu/ and cuda/); Python adds fake and autograd (fastattn/_ops.py).
#include <torch/library.h>

TORCH_LIBRARY(fastattn, m) {
  // Sliding-window attention. Query i sees key j iff i - window_left <= j <= i + window_right
  // and j < key_lengths[b]. lse is float32 (B, H, L); -inf where a query sees no key.
  m.def(
      "local_attention_fwd(Tensor q, Tensor k, Tensor v, int window_left, int window_right, "
      "Tensor? key_lengths, float scale) -> (Tensor out, Tensor lse)");
  // grad_lse lets a caller differentiate through the returned lse as well as out.
  m.def(
      "local_attention_bwd(Tensor grad_out, Tensor grad_lse, Tensor q, Tensor k, Tensor v, "
      "Tensor out, Tensor lse, int window_left, int window_right, Tensor? key_lengths, "
      "float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}
