// Fused sliding-window attention on the CPU. Only the band is computed: each query row walks
// its own key range in chunks with an online softmax, so no buffer grows with L or the window.
// Accumulation is in acc_t (float for float/half/bfloat16, double for double).
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "local_attention_params.h"

namespace fastattn::cpu {

constexpr int64_t kKeyChunk = 64;  // scores held at once per row: bounds the stack, not L

struct Band {
  int64_t lo, hi;  // inclusive key range seen by a query; empty when lo > hi
};

inline int64_t valid_keys(const LocalAttentionParams& p, int64_t b) {
  if (p.key_lengths == nullptr) return p.seq_len;
  return std::clamp<int64_t>(p.key_lengths[b], 0, p.seq_len);
}

inline Band query_band(const LocalAttentionParams& p, int64_t i, int64_t keys) {
  return {std::max<int64_t>(0, i - p.window_left), std::min<int64_t>(keys - 1, i + p.window_right)};
}

// Queries that see key j: j - window_right <= i <= j + window_left.
inline Band key_band(const LocalAttentionParams& p, int64_t j) {
  return {std::max<int64_t>(0, j - p.window_right),
          std::min<int64_t>(p.seq_len - 1, j + p.window_left)};
}

template <typename scalar_t, typename acc_t>
inline acc_t dot(const acc_t* a, const scalar_t* b, int64_t n) {
  acc_t sum = 0;
  for (int64_t d = 0; d < n; ++d) sum += a[d] * static_cast<acc_t>(b[d]);
  return sum;
}

template <typename scalar_t, typename acc_t>
inline void load_row(acc_t* dst, const scalar_t* src, int64_t n, acc_t factor) {
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<acc_t>(src[d]) * factor;
}

template <typename scalar_t>
inline const scalar_t* row(const void* base, const TensorStrides& s, int64_t b, int64_t h,
                           int64_t i) {
  return static_cast<const scalar_t*>(base) + b * s.batch + h * s.head + i * s.seq;
}

template <typename scalar_t>
inline scalar_t* mutable_row(void* base, const TensorStrides& s, int64_t b, int64_t h,
                             int64_t i) {
  return static_cast<scalar_t*>(base) + b * s.batch + h * s.head + i * s.seq;
}

template <typename scalar_t, typename acc_t>
void local_attention_forward(const LocalAttentionParams& p) {
  const int64_t D = p.head_dim, L = p.seq_len;
  const int64_t rows = p.batch * p.heads * L;
  at::parallel_for(0, rows, 32, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q(D), acc(D), scores(kKeyChunk);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = r % L, bh = r / L, h = bh % p.heads, b = bh / p.heads;
      const Band band = query_band(p, i, valid_keys(p, b));
      scalar_t* out = mutable_row<scalar_t>(p.out, p.out_strides, b, h, i);
      if (band.lo > band.hi) {
        std::fill(out, out + D, scalar_t(0));
        p.lse[r] = -std::numeric_limits<float>::infinity();
        continue;
      }
      load_row(q.data(), row<scalar_t>(p.q, p.q_strides, b, h, i), D, static_cast<acc_t>(p.scale));
      std::fill(acc.begin(), acc.end(), acc_t(0));
      acc_t running_max = -std::numeric_limits<acc_t>::infinity(), denom = 0;
      for (int64_t j0 = band.lo; j0 <= band.hi; j0 += kKeyChunk) {
        const int64_t n = std::min(kKeyChunk, band.hi - j0 + 1);
        acc_t chunk_max = -std::numeric_limits<acc_t>::infinity();
        for (int64_t t = 0; t < n; ++t) {
          scores[t] = dot(q.data(), row<scalar_t>(p.k, p.k_strides, b, h, j0 + t), D);
          chunk_max = std::max(chunk_max, scores[t]);
        }
        const acc_t new_max = std::max(running_max, chunk_max);
        const acc_t correction = std::exp(running_max - new_max);
        denom *= correction;
        for (int64_t d = 0; d < D; ++d) acc[d] *= correction;
        for (int64_t t = 0; t < n; ++t) {
          const acc_t w = std::exp(scores[t] - new_max);
          denom += w;
          const scalar_t* v = row<scalar_t>(p.v, p.v_strides, b, h, j0 + t);
          for (int64_t d = 0; d < D; ++d) acc[d] += w * static_cast<acc_t>(v[d]);
        }
        running_max = new_max;
      }
      for (int64_t d = 0; d < D; ++d) out[d] = static_cast<scalar_t>(acc[d] / denom);
      p.lse[r] = static_cast<float>(running_max + std::log(denom));
    }
  });
}

// Backward in three passes, each parallel without atomics: delta per query row, then
// grad_q per query row, then grad_k and grad_v per key row (each key row gathers from the
// queries that see it, recomputing the probabilities from lse).
template <typename scalar_t, typename acc_t>
void local_attention_backward(const LocalAttentionBwdParams& p) {
  const int64_t D = p.head_dim, L = p.seq_len;
  const int64_t rows = p.batch * p.heads * L;
  const acc_t scale = static_cast<acc_t>(p.scale);

  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = r % L, bh = r / L, h = bh % p.heads, b = bh / p.heads;
      const scalar_t* dout = row<scalar_t>(p.grad_out, p.grad_out_strides, b, h, i);
      const scalar_t* out = row<scalar_t>(p.out, p.out_strides, b, h, i);
      acc_t sum = 0;
      for (int64_t d = 0; d < D; ++d) sum += static_cast<acc_t>(dout[d]) * static_cast<acc_t>(out[d]);
      p.delta[r] = static_cast<float>(sum) - p.grad_lse[r];
    }
  });

  at::parallel_for(0, rows, 32, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q(D), dout(D), dq(D);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = r % L, bh = r / L, h = bh % p.heads, b = bh / p.heads;
      const Band band = query_band(p, i, valid_keys(p, b));
      scalar_t* grad_q = mutable_row<scalar_t>(p.grad_q, p.grad_q_strides, b, h, i);
      std::fill(dq.begin(), dq.end(), acc_t(0));
      if (band.lo <= band.hi) {
        load_row(q.data(), row<scalar_t>(p.q, p.q_strides, b, h, i), D, scale);
        load_row(dout.data(), row<scalar_t>(p.grad_out, p.grad_out_strides, b, h, i), D, acc_t(1));
        const acc_t lse = p.lse[r], delta = p.delta[r];
        for (int64_t j = band.lo; j <= band.hi; ++j) {
          const scalar_t* k = row<scalar_t>(p.k, p.k_strides, b, h, j);
          const acc_t prob = std::exp(dot(q.data(), k, D) - lse);
          const acc_t dp = dot(dout.data(), row<scalar_t>(p.v, p.v_strides, b, h, j), D);
          const acc_t ds = prob * (dp - delta) * scale;
          for (int64_t d = 0; d < D; ++d) dq[d] += ds * static_cast<acc_t>(k[d]);
        }
      }
      for (int64_t d = 0; d < D; ++d) grad_q[d] = static_cast<scalar_t>(dq[d]);
    }
  });

  at::parallel_for(0, rows, 32, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> v(D), dk(D), dv(D), q(D);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t j = r % L, bh = r / L, h = bh % p.heads, b = bh / p.heads;
      std::fill(dk.begin(), dk.end(), acc_t(0));
      std::fill(dv.begin(), dv.end(), acc_t(0));
      if (j < valid_keys(p, b)) {
        const Band band = key_band(p, j);
        const scalar_t* k = row<scalar_t>(p.k, p.k_strides, b, h, j);
        load_row(v.data(), row<scalar_t>(p.v, p.v_strides, b, h, j), D, acc_t(1));
        for (int64_t i = band.lo; i <= band.hi; ++i) {
          const int64_t qr = bh * L + i;
          load_row(q.data(), row<scalar_t>(p.q, p.q_strides, b, h, i), D, scale);
          const scalar_t* dout = row<scalar_t>(p.grad_out, p.grad_out_strides, b, h, i);
          const acc_t prob = std::exp(dot(q.data(), k, D) -
                                      static_cast<acc_t>(p.lse[qr]));
          const acc_t dp = dot(v.data(), dout, D);
          const acc_t ds = prob * (dp - static_cast<acc_t>(p.delta[qr]));
          for (int64_t d = 0; d < D; ++d) {
            dv[d] += prob * static_cast<acc_t>(dout[d]);
            dk[d] += ds * q[d];  // q already carries the scale
          }
        }
      }
      scalar_t* grad_k = mutable_row<scalar_t>(p.grad_k, p.grad_k_strides, b, h, j);
      scalar_t* grad_v = mutable_row<scalar_t>(p.grad_v, p.grad_v_strides, b, h, j);
      for (int64_t d = 0; d < D; ++d) {
        grad_k[d] = static_cast<scalar_t>(dk[d]);
        grad_v[d] = static_cast<scalar_t>(dv[d]);
      }
    }
  });
}

}  // namespace fastattn::cpu
