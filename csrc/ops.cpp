// Every fastattn op schema, declared once. Backends only add implementations
// (TORCH_LIBRARY_IMPL in cpu/ and cuda/); Python adds fake and autograd (fastattn/_ops.py).
#include <torch/library.h>

TORCH_LIBRARY(fastattn, m) {
  // Sliding-window attention, q (B, H, Lq, D), k and v (B, H_kv, Lk, D). Query i sits at key
  // position p = i + offset (offset 0 if Lq == Lk, else keys(b) - Lq: bottom-right) and sees
  // key j iff p - window_left <= j <= p + window_right and j < keys(b) = key_lengths[b] (or Lk).
  // softcap > 0 maps the scaled scores s to softcap * tanh(s / softcap); 0 is off.
  // lse is float32 (B, H, Lq); -inf where a query sees no key.
  m.def(
      "local_attention_fwd(Tensor q, Tensor k, Tensor v, int window_left, int window_right, "
      "Tensor? key_lengths, float scale, float softcap=0.0) -> (Tensor out, Tensor lse)");
  // grad_lse lets a caller differentiate through the returned lse as well as out.
  m.def(
      "local_attention_bwd(Tensor grad_out, Tensor grad_lse, Tensor q, Tensor k, Tensor v, "
      "Tensor out, Tensor lse, int window_left, int window_right, Tensor? key_lengths, "
      "float scale, float softcap=0.0) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // Packed variable-length batch: q (Tq, H, D), k and v (Tk, H_kv, D); sequence n owns rows
  // [cu_seqlens[n], cu_seqlens[n + 1]) of each, bottom-right aligned as above; lse (H, Tq).
  m.def(
      "local_attention_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, int window_left, "
      "int window_right, float scale, float softcap) -> (Tensor out, Tensor lse)");
  m.def(
      "local_attention_varlen_bwd(Tensor grad_out, Tensor grad_lse, Tensor q, Tensor k, "
      "Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, int window_left, int window_right, float scale, "
      "float softcap) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");

  // Clustering of the queries (not differentiable): LSH by the rows of planes (bits, D + 1:
  // normal, then bias), then Lloyd k-means in Hamming space. seed is a (1,) int64 tensor on
  // q's device that picks re-seeding queries for empty clusters. labels (B, H, L) int64 is -1
  // for queries past query_lengths; counts (B, H, clusters) int64.
  m.def(
      "cluster(Tensor q, Tensor planes, Tensor seed, Tensor? query_lengths, int clusters, "
      "int iterations) -> (Tensor labels, Tensor counts)");
  // Clustered attention given labels (B, H, L). topk == 0: every query gets its centroid's
  // output; topk > 0 (improved): exact attention over its cluster's top-k keys, weighted by the
  // centroid's mass on them, plus the centroid's attention over the other keys. Besides out,
  // the outputs are what the backward needs (float32, or float64 for float64 inputs):
  // lse (B, H, L) of each query's top-k softmax, centroid_lse and mass (B, H, clusters),
  // topk_idx (B, H, clusters, topk) int32, ascending key indices, -1 past the valid keys.
  m.def(
      "clustered_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor labels, int clusters, "
      "int topk, Tensor? key_lengths, float scale) -> (Tensor out, Tensor lse, "
      "Tensor centroid_lse, Tensor mass, Tensor topk_idx)");
  m.def(
      "clustered_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor labels, "
      "Tensor lse, Tensor centroid_lse, Tensor mass, Tensor topk_idx, int clusters, "
      "Tensor? key_lengths, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}
