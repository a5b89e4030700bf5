// Plain-old-data description of the clustering and clustered attention calls. Kernels (CPU
// and CUDA) see only these structs; csrc/clustered_torch.h fills them.
#pragma once
#include <cstdint>

#include "local_attention_params.h"

#if defined(__CUDACC__)
#define FASTATTN_HOST_DEVICE __host__ __device__
#else
#define FASTATTN_HOST_DEVICE
#endif

namespace fastattn {

// splitmix64's finaliser: a counter-based generator, so the CPU and CUDA k-means re-seed
// empty clusters identically and without shared state between threads.
FASTATTN_HOST_DEVICE inline uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// The valid query (of n) whose hash re-seeds empty cluster c of head row bh in round r
// (r = 0: initialisation, r = t + 1: the update after assignment t).
FASTATTN_HOST_DEVICE inline int64_t reseed_query(uint64_t seed, int64_t bh, int64_t r,
                                                 int64_t c, int64_t n) {
  return static_cast<int64_t>(mix64(mix64(mix64(seed + bh) + r) + c) % static_cast<uint64_t>(n));
}

struct ClusterParams {
  const void* q;
  TensorStrides q_strides;
  int64_t batch, heads, seq_len, head_dim;
  const float* planes;           // (bits, D + 1) contiguous: normal vector, then bias
  int64_t bits, clusters, iterations;
  const int32_t* query_lengths;  // (B,) or nullptr for "all L"
  const int64_t* seed;           // (1,) on the kernel's device
  uint64_t* hashes;              // (B*H, L) scratch
  uint64_t* centroids;           // (B*H, C) scratch
  int32_t* members;              // (B*H, C) scratch: queries per cluster in the last assignment
  int32_t* ones;                 // (B*H, C, bits) scratch: members with each bit set
  int64_t* labels;               // (B*H, L) out
  int64_t* counts;               // (B*H, C) out
};

// One clustered attention call, forward or backward. Each stage reads and writes a subset;
// per-cluster and per-query buffers are contiguous, in acc_t (float, or double for double).
template <typename acc_t>
struct ClusteredParams {
  const void* q;
  const void* k;
  const void* v;
  const void* grad_out;
  TensorStrides q_strides, k_strides, v_strides, grad_out_strides;
  int64_t batch, heads, seq_len, head_dim, clusters;
  int64_t topk;                  // columns of topk_idx, <= seq_len; 0: plain clustered attention
  const int32_t* key_lengths;    // (B,) or nullptr
  acc_t scale;
  const int64_t* labels;         // (B*H, L); values outside [0, C) belong to no cluster

  // grouping: perm lists each cluster's queries in ascending order, cluster c at
  // [offsets[c], offsets[c + 1]); slot C holds the queries of no cluster.
  int32_t* perm;                 // (B*H, L)
  int32_t* offsets;              // (B*H, C + 2)

  // per cluster
  acc_t* centroids;              // (B*H, C, D): scale * mean member query
  acc_t* scores;                 // (B*H, C, L): scaled scores in; fwd: probabilities off the
                                 // top-k out; bwd: grad of the scores out
  acc_t* probs_rest;             // bwd (B*H, C, L): probabilities off the top-k
  const acc_t* grad_probs;       // bwd (B*H, C, L): grad_base . v_j
  acc_t* centroid_lse;           // (B*H, C)
  acc_t* mass;                   // (B*H, C): centroid probability on its top-k keys
  int32_t* topk_idx;             // (B*H, C, topk)
  acc_t* base;                   // (B*H, C, D) fwd: centroid attention off the top-k;
                                 // bwd: grad of the scaled centroid / scale (dS @ K)
  acc_t* grad_base;              // bwd (B*H, C, D): sum of the members' grad_out
  acc_t* grad_mass;              // bwd (B*H, C)

  // per query
  void* out;
  TensorStrides out_strides;
  acc_t* lse;                    // (B*H, L): lse of the query's top-k softmax, -inf if none
  acc_t* w;                      // bwd (B*H, L): grad_out . (top-k softmax output)
  void* grad_q;
  TensorStrides grad_q_strides;
  acc_t* grad_k;                 // bwd (B*H, L, D) accumulators, hold the dense part on entry
  acc_t* grad_v;
};

}  // namespace fastattn
