// Clustering and clustered attention on the CPU: the stages of csrc/clustered_torch.h as
// plain loops, parallel over head rows, cluster rows or query rows. Accumulation is in acc_t
// (float for float/half/bfloat16, double for double); sums over a cluster's members run in
// ascending query order, so every result is deterministic.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "clustered_params.h"
#include "cpu/local_attention_kernel.h"

namespace fastattn::cpu {

inline int64_t valid_length(const int32_t* lengths, int64_t b, int64_t seq_len) {
  return lengths == nullptr ? seq_len : std::clamp<int64_t>(lengths[b], 0, seq_len);
}

// Bit t is set iff x lies strictly above hyperplane t: <x, normal_t> > bias_t. planes_t is
// (D + 1, 64), transposed, so the inner loop over the 64 projections vectorises; each
// projection still sums over d in order, as the CUDA kernel does.
FASTATTN_CLONED_HELPER uint64_t hash_row(const float* x, const float* planes_t, int64_t D, int64_t bits) {
  float s[64] = {};
  for (int64_t d = 0; d < D; ++d) {
    const float* plane = planes_t + d * 64;
    for (int t = 0; t < 64; ++t) s[t] += x[d] * plane[t];
  }
  uint64_t code = 0;
  for (int64_t t = 0; t < bits; ++t) {
    code |= static_cast<uint64_t>(s[t] > planes_t[D * 64 + t]) << t;
  }
  return code;
}

// Nearest centroid in Hamming distance; ties go to the lowest cluster index. In the x86-64-v3
// clone the popcount is one instruction; the baseline build calls libgcc's bit-twiddling
// __popcountdi2, which took more time than anything else in a CPU clustered call.
FASTATTN_CLONED_HELPER int32_t nearest(uint64_t code, const uint64_t* centroids, int64_t C) {
  int32_t best = 0;
  int best_distance = 65;
  for (int64_t c = 0; c < C; ++c) {
    const int distance = __builtin_popcountll(code ^ centroids[c]);
    if (distance < best_distance) {
      best_distance = distance;
      best = static_cast<int32_t>(c);
    }
  }
  return best;
}

// Hashing and k-means of the (batch, head) rows [begin, end).
template <typename scalar_t>
FASTATTN_CPU_CLONES void cluster_heads(const ClusterParams& p, const float* planes_t, int64_t begin,
                                       int64_t end) {
  const int64_t L = p.seq_len, D = p.head_dim, C = p.clusters, bits = p.bits;
  const uint64_t seed = static_cast<uint64_t>(*p.seed);
  std::vector<float> x(D);
  std::vector<int32_t> label(L);
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / p.heads, h = bh % p.heads;
    const int64_t n = valid_length(p.query_lengths, b, L);
    uint64_t* hash = p.hashes + bh * L;
    uint64_t* centroid = p.centroids + bh * C;
    int32_t* members = p.members + bh * C;
    int32_t* ones = p.ones + bh * C * bits;
    std::fill(members, members + C, 0);
    for (int64_t i = 0; i < n; ++i) {
      load_row(x.data(), row<scalar_t>(p.q, p.q_strides, b, h, i), D, 1.0f);
      hash[i] = hash_row(x.data(), planes_t, D, bits);
    }
    for (int64_t c = 0; n > 0 && c < C; ++c) {
      centroid[c] = hash[c < n ? c : reseed_query(seed, bh, 0, c, n)];
    }
    for (int64_t t = 0; n > 0; ++t) {
      const bool update = t < p.iterations;
      std::fill(members, members + C, 0);
      if (update) std::fill(ones, ones + C * bits, 0);
      for (int64_t i = 0; i < n; ++i) {
        const int32_t c = nearest(hash[i], centroid, C);
        label[i] = c;
        ++members[c];
        if (update) {
          for (uint64_t rest = hash[i]; rest != 0; rest &= rest - 1) {
            ++ones[c * bits + __builtin_ctzll(rest)];
          }
        }
      }
      if (!update) break;
      // Majority vote per bit (a tie gives 0); an empty cluster restarts at a random query.
      for (int64_t c = 0; c < C; ++c) {
        if (members[c] == 0) {
          centroid[c] = hash[reseed_query(seed, bh, t + 1, c, n)];
          continue;
        }
        uint64_t code = 0;
        for (int64_t bit = 0; bit < bits; ++bit) {
          code |= static_cast<uint64_t>(2 * ones[c * bits + bit] > members[c]) << bit;
        }
        centroid[c] = code;
      }
    }
    for (int64_t i = 0; i < L; ++i) p.labels[bh * L + i] = i < n ? label[i] : -1;
    for (int64_t c = 0; c < C; ++c) p.counts[bh * C + c] = members[c];
  }
}

template <typename scalar_t>
void cluster(const ClusterParams& p) {
  const int64_t D = p.head_dim, bits = p.bits;
  std::vector<float> planes_t((D + 1) * 64, 0.f);
  for (int64_t t = 0; t < bits; ++t) {
    for (int64_t d = 0; d <= D; ++d) planes_t[d * 64 + t] = p.planes[t * (D + 1) + d];
  }
  at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
    cluster_heads<scalar_t>(p, planes_t.data(), begin, end);
  });
}

// Counting sort of the queries by label: stable, so members keep ascending query order.
template <typename acc_t>
void group(const ClusteredParams<acc_t>& p) {
  const int64_t L = p.seq_len, C = p.clusters;
  at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> cursor(C + 1);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t* labels = p.labels + bh * L;
      int32_t* offsets = p.offsets + bh * (C + 2);
      int32_t* perm = p.perm + bh * L;
      auto slot = [&](int64_t i) { return labels[i] >= 0 && labels[i] < C ? labels[i] : C; };
      std::fill(cursor.begin(), cursor.end(), 0);
      for (int64_t i = 0; i < L; ++i) ++cursor[slot(i)];
      offsets[0] = 0;
      for (int64_t c = 0; c <= C; ++c) {
        offsets[c + 1] = offsets[c] + cursor[c];
        cursor[c] = offsets[c];
      }
      for (int64_t i = 0; i < L; ++i) perm[cursor[slot(i)]++] = static_cast<int32_t>(i);
    }
  });
}

template <typename acc_t>
inline int64_t members_of(const ClusteredParams<acc_t>& p, int64_t bh, int64_t c) {
  const int32_t* offsets = p.offsets + bh * (p.clusters + 2);
  return offsets[c + 1] - offsets[c];
}

// dst[bh, c] = factor * (mean ? mean : sum) of the rows of x of cluster c's members.
template <typename scalar_t, typename acc_t>
void aggregate(const ClusteredParams<acc_t>& p, const void* x, const TensorStrides& strides,
               acc_t* dst, acc_t factor, bool mean) {
  const int64_t L = p.seq_len, D = p.head_dim, C = p.clusters;
  at::parallel_for(0, p.batch * p.heads * C, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bh = r / C, c = r % C, b = bh / p.heads, h = bh % p.heads;
      acc_t* out = dst + r * D;
      std::fill(out, out + D, acc_t(0));
      const int32_t* member = p.perm + bh * L + p.offsets[bh * (C + 2) + c];
      const int64_t count = members_of(p, bh, c);
      for (int64_t m = 0; m < count; ++m) {
        const scalar_t* src = row<scalar_t>(x, strides, b, h, member[m]);
        for (int64_t d = 0; d < D; ++d) out[d] += static_cast<acc_t>(src[d]);
      }
      const acc_t f = mean && count > 0 ? factor / static_cast<acc_t>(count) : factor;
      for (int64_t d = 0; d < D; ++d) out[d] *= f;
    }
  });
}

// The top-k keys of a score row: highest scores first, ties to the lower key index, only
// keys below `valid`. Written to `top` in ascending key order, padded with -1.
template <typename acc_t>
void select_top(const acc_t* s, int64_t valid, int64_t topk, std::vector<int32_t>& idx,
                int32_t* top) {
  const int64_t kk = std::min(topk, valid);
  idx.resize(valid);
  std::iota(idx.begin(), idx.end(), 0);
  auto before = [s](int32_t a, int32_t b) { return s[a] > s[b] || (s[a] == s[b] && a < b); };
  if (kk < valid) std::nth_element(idx.begin(), idx.begin() + kk, idx.end(), before);
  std::sort(idx.begin(), idx.begin() + kk);
  std::copy(idx.begin(), idx.begin() + kk, top);
  std::fill(top + kk, top + topk, -1);
}

// Per centroid row: lse over the valid keys, top-k keys and their probability mass; the
// scores become probabilities, zero on the top-k and the invalid keys.
template <typename acc_t>
void rows_forward(const ClusteredParams<acc_t>& p) {
  const int64_t L = p.seq_len, C = p.clusters, K = p.topk;
  at::parallel_for(0, p.batch * p.heads * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> idx;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t valid = valid_length(p.key_lengths, r / (p.heads * C), L);
      acc_t* s = p.scores + r * L;
      int32_t* top = p.topk_idx + r * K;
      if (valid == 0) {
        std::fill(s, s + L, acc_t(0));
        std::fill(top, top + K, -1);
        p.centroid_lse[r] = -std::numeric_limits<acc_t>::infinity();
        p.mass[r] = 0;
        continue;
      }
      const acc_t max = *std::max_element(s, s + valid);
      acc_t sum = 0;
      for (int64_t j = 0; j < valid; ++j) sum += std::exp(s[j] - max);
      const acc_t lse = max + std::log(sum);
      select_top(s, valid, K, idx, top);
      acc_t mass = 0;
      for (int64_t t = 0; t < K && top[t] >= 0; ++t) mass += std::exp(s[top[t]] - lse);
      for (int64_t j = 0; j < valid; ++j) s[j] = std::exp(s[j] - lse);
      std::fill(s + valid, s + L, acc_t(0));
      for (int64_t t = 0; t < K && top[t] >= 0; ++t) s[top[t]] = 0;
      p.centroid_lse[r] = lse;
      p.mass[r] = mass;
    }
  });
}

template <typename acc_t>
inline int64_t top_count(const int32_t* top, int64_t K) {
  int64_t n = 0;
  while (n < K && top[n] >= 0) ++n;
  return n;
}

// out_i = base_c + mass_c * softmax over the top-k keys of c of (scale q_i . k_j) v_j.
template <typename scalar_t, typename acc_t>
void query_forward(const ClusteredParams<acc_t>& p) {
  const int64_t L = p.seq_len, D = p.head_dim, C = p.clusters, K = p.topk;
  at::parallel_for(0, p.batch * p.heads * L, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q(D), acc(D), o(D), scores(K);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bh = r / L, i = r % L, b = bh / p.heads, h = bh % p.heads;
      const int64_t c = p.labels[r];
      scalar_t* out = mutable_row<scalar_t>(p.out, p.out_strides, b, h, i);
      p.lse[r] = -std::numeric_limits<acc_t>::infinity();
      if (c < 0 || c >= C) {
        std::fill(out, out + D, scalar_t(0));
        continue;
      }
      const int64_t cr = bh * C + c;
      std::copy(p.base + cr * D, p.base + (cr + 1) * D, acc.begin());
      const int32_t* top = p.topk_idx + cr * K;
      const int64_t n = top_count<acc_t>(top, K);
      if (n > 0) {
        load_row(q.data(), row<scalar_t>(p.q, p.q_strides, b, h, i), D, p.scale);
        acc_t max = -std::numeric_limits<acc_t>::infinity();
        for (int64_t t = 0; t < n; ++t) {
          scores[t] = dot(q.data(), row<scalar_t>(p.k, p.k_strides, b, h, top[t]), D);
          max = std::max(max, scores[t]);
        }
        acc_t denom = 0;
        std::fill(o.begin(), o.end(), acc_t(0));
        for (int64_t t = 0; t < n; ++t) {
          const acc_t e = std::exp(scores[t] - max);
          denom += e;
          const scalar_t* v = row<scalar_t>(p.v, p.v_strides, b, h, top[t]);
          for (int64_t d = 0; d < D; ++d) o[d] += e * static_cast<acc_t>(v[d]);
        }
        const acc_t weight = p.mass[cr] / denom;
        for (int64_t d = 0; d < D; ++d) acc[d] += weight * o[d];
        p.lse[r] = max + std::log(denom);
      }
      for (int64_t d = 0; d < D; ++d) out[d] = static_cast<scalar_t>(acc[d]);
    }
  });
}

// Calls f(t, j, prob, grad_out . v_j) for each top-k key of query r; returns false if none.
template <typename scalar_t, typename acc_t, typename F>
bool for_each_top_key(const ClusteredParams<acc_t>& p, int64_t r, const acc_t* q,
                      const acc_t* dout, F&& f) {
  const int64_t L = p.seq_len, D = p.head_dim, C = p.clusters, K = p.topk;
  const int64_t bh = r / L, b = bh / p.heads, h = bh % p.heads, c = p.labels[r];
  if (c < 0 || c >= C) return false;
  const int32_t* top = p.topk_idx + (bh * C + c) * K;
  const int64_t n = top_count<acc_t>(top, K);
  for (int64_t t = 0; t < n; ++t) {
    const acc_t prob = std::exp(dot(q, row<scalar_t>(p.k, p.k_strides, b, h, top[t]), D) -
                                p.lse[r]);
    f(top[t], prob, dot(dout, row<scalar_t>(p.v, p.v_strides, b, h, top[t]), D));
  }
  return n > 0;
}

// w_i = grad_out_i . (query i's top-k softmax output); grad_mass_c = sum of its members' w.
template <typename scalar_t, typename acc_t>
void prepass(const ClusteredParams<acc_t>& p) {
  const int64_t L = p.seq_len, D = p.head_dim, C = p.clusters;
  at::parallel_for(0, p.batch * p.heads * L, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q(D), dout(D);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bh = r / L, i = r % L, b = bh / p.heads, h = bh % p.heads;
      acc_t w = 0;
      if (p.topk > 0) {
        load_row(q.data(), row<scalar_t>(p.q, p.q_strides, b, h, i), D, p.scale);
        load_row(dout.data(), row<scalar_t>(p.grad_out, p.grad_out_strides, b, h, i), D,
                 acc_t(1));
        for_each_top_key<scalar_t>(p, r, q.data(), dout.data(),
                                   [&](int32_t, acc_t prob, acc_t dp) { w += prob * dp; });
      }
      p.w[r] = w;
    }
  });
  at::parallel_for(0, p.batch * p.heads * C, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bh = r / C, c = r % C;
      const int32_t* member = p.perm + bh * L + p.offsets[bh * (C + 2) + c];
      acc_t sum = 0;
      for (int64_t m = 0; m < members_of(p, bh, c); ++m) sum += p.w[bh * L + member[m]];
      p.grad_mass[r] = sum;
    }
  });
}

// Softmax backward of each centroid row. The upstream gradient of probability j is
// grad_probs_j (= grad_base . v_j) off the top-k and grad_mass on it.
template <typename acc_t>
void rows_backward(const ClusteredParams<acc_t>& p) {
  const int64_t L = p.seq_len, C = p.clusters, K = p.topk;
  at::parallel_for(0, p.batch * p.heads * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> in_top(L, 0);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t valid = valid_length(p.key_lengths, r / (p.heads * C), L);
      acc_t* s = p.scores + r * L;
      acc_t* rest = p.probs_rest + r * L;
      const acc_t* g = p.grad_probs + r * L;
      const int32_t* top = p.topk_idx + r * K;
      const int64_t n = top_count<acc_t>(top, K);
      const acc_t lse = p.centroid_lse[r], dm = p.grad_mass[r];
      for (int64_t t = 0; t < n; ++t) in_top[top[t]] = 1;
      acc_t delta = 0;
      for (int64_t j = 0; j < valid; ++j) delta += std::exp(s[j] - lse) * (in_top[j] ? dm : g[j]);
      for (int64_t j = 0; j < valid; ++j) {
        const acc_t prob = std::exp(s[j] - lse);
        s[j] = prob * ((in_top[j] ? dm : g[j]) - delta);
        rest[j] = in_top[j] ? acc_t(0) : prob;
      }
      std::fill(s + valid, s + L, acc_t(0));
      std::fill(rest + valid, rest + L, acc_t(0));
      for (int64_t t = 0; t < n; ++t) in_top[top[t]] = 0;
    }
  });
}

// grad_q_i = scale / count_c * (dS @ K)_c + the top-k softmax's gradient; the top-k
// softmax's key and value gradients are added to grad_k / grad_v. Parallel over head rows,
// so that no two threads add to one key.
template <typename scalar_t, typename acc_t>
void query_backward(const ClusteredParams<acc_t>& p) {
  const int64_t L = p.seq_len, D = p.head_dim, C = p.clusters;
  at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q(D), dout(D), dq(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.heads, h = bh % p.heads;
      for (int64_t i = 0; i < L; ++i) {
        const int64_t r = bh * L + i, c = p.labels[r];
        scalar_t* grad_q = mutable_row<scalar_t>(p.grad_q, p.grad_q_strides, b, h, i);
        std::fill(dq.begin(), dq.end(), acc_t(0));
        if (c >= 0 && c < C) {
          const int64_t cr = bh * C + c;
          const acc_t factor = p.scale / static_cast<acc_t>(members_of(p, bh, c));
          for (int64_t d = 0; d < D; ++d) dq[d] = factor * p.base[cr * D + d];
          const acc_t mass = p.mass[cr], delta = p.mass[cr] * p.w[r];
          load_row(q.data(), row<scalar_t>(p.q, p.q_strides, b, h, i), D, p.scale);
          load_row(dout.data(), row<scalar_t>(p.grad_out, p.grad_out_strides, b, h, i), D,
                   acc_t(1));
          for_each_top_key<scalar_t>(p, r, q.data(), dout.data(),
                                     [&](int32_t j, acc_t prob, acc_t dp) {
            const acc_t ds = prob * (mass * dp - delta);
            const scalar_t* k = row<scalar_t>(p.k, p.k_strides, b, h, j);
            acc_t* dk = p.grad_k + (bh * L + j) * D;
            acc_t* dv = p.grad_v + (bh * L + j) * D;
            for (int64_t d = 0; d < D; ++d) {
              dq[d] += p.scale * ds * static_cast<acc_t>(k[d]);
              dk[d] += ds * q[d];  // q carries the scale
              dv[d] += mass * prob * dout[d];
            }
          });
        }
        for (int64_t d = 0; d < D; ++d) grad_q[d] = static_cast<scalar_t>(dq[d]);
      }
    }
  });
}

}  // namespace fastattn::cpu
