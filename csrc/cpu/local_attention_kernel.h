// Fused sliding-window attention on the CPU, in tiles. A work item is a tile of query rows
// (forward, grad_q) or key rows (grad_k, grad_v); it walks the keys (queries) its band touches
// in chunks held in acc_t scratch, so no buffer grows with L or the window. Accumulation is in
// acc_t (float for float/half/bfloat16, double for double).
//
// Why tiles: the first version walked one row at a time with a dot product per (query, key)
// pair. A dot product is a reduction, which the compiler must keep in order without
// -ffast-math, so each one ran at the latency of a chain of D dependent adds (about 1 GFLOP/s).
// Here every inner loop runs along a contiguous row of scratch with no reduction: scores are
// x[d] * yt[d][c] summed over d into s[c] (the other side held transposed), and outputs are
// w[c] * rows[c][d] summed into y[d]. Both vectorize, and a chunk is converted to acc_t once
// for all the rows of a tile instead of once per pair.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "local_attention_params.h"

// The tile loops are compiled twice, for x86-64-v3 (AVX2 + FMA) and the baseline, and the
// loader picks one by the features of the CPU it runs on (an ifunc): 8-wide fused
// multiply-adds where the CPU has them, without building the extension for one machine.
// ("arch=haswell" would not do: its resolver asks whether the CPU *is* a Haswell.) GCC 12 is
// the first to accept ISA levels here; other compilers build the baseline only.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    __GNUC__ >= 12
#define FASTATTN_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FASTATTN_CPU_CLONES
#endif
// Helpers of cloned loops are inlined into each clone, so that they take its instructions.
#define FASTATTN_CLONED_HELPER inline __attribute__((always_inline))

namespace fastattn::cpu {

constexpr int64_t kRowTile = 32;  // rows of one work item
constexpr int64_t kChunk = 64;    // keys (queries) per chunk of the other side

struct Band {
  int64_t lo, hi;  // inclusive range; empty when lo > hi
};

// Work items per (sequence, head): tiles of kRowTile rows of the longest sequence's queries
// (forward, grad_q) or keys (grad_k, grad_v); a shorter sequence's surplus items do nothing.
inline int64_t row_tiles(int64_t rows) { return (rows + kRowTile - 1) / kRowTile; }
inline int64_t query_tiles(const LocalAttentionParams& p) {
  return row_tiles(p.cu_seqlens_q != nullptr ? p.max_seqlen_q : p.seq_len);
}
inline int64_t key_tiles(const LocalAttentionParams& p) {
  return row_tiles(p.cu_seqlens_q != nullptr ? p.max_seqlen_k : p.key_seq_len);
}

// Keys seen by the sequence's queries [i, i + n): the union of their bands, each
// [pos - left, pos + right] at pos = query + offset, within the visible keys.
inline Band keys_seen(const LocalAttentionParams& p, const Sequence& s, int64_t i, int64_t n = 1) {
  return {std::max<int64_t>(0, i + s.offset - p.window_left),
          std::min<int64_t>(s.lk - 1, i + n - 1 + s.offset + p.window_right)};
}

// Queries that see one of the keys [j, j + n): j - right <= i + offset <= j + left.
inline Band queries_seeing(const LocalAttentionParams& p, const Sequence& s, int64_t j,
                           int64_t n = 1) {
  return {std::max<int64_t>(0, j - p.window_right - s.offset),
          std::min<int64_t>(s.lq - 1, j + n - 1 + p.window_left - s.offset)};
}

// The part of `band` inside the chunk [start, start + n), relative to start.
inline Band within_chunk(Band band, int64_t start, int64_t n) {
  return {std::max<int64_t>(band.lo, start) - start, std::min<int64_t>(band.hi, start + n - 1) - start};
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

// Row helpers of the per-row clustered kernels (cpu/clustered_kernel.h).
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

// exp for the probabilities. std::exp does not vectorize; this branch-free float version does
// (Cody-Waite reduction to [-ln2/2, ln2/2], then Cephes' degree-6 polynomial: about 1 ulp).
// Arguments here are finite and <= 0 (score - max, score - lse); below -87.3 the result is
// about the smallest normal float instead of a denormal or 0: at most 1.2e-38 against a row sum
// of at least 1. The clamp is on the integer exponent because a float compare in the loop
// would keep GCC from vectorizing it without -fno-trapping-math.
FASTATTN_CLONED_HELPER float exp_of(float x) {
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  poly = poly * r * r + r + 1.0f;
  int32_t e = static_cast<int32_t>(n);
  e = e < -126 ? -126 : (e > 127 ? 127 : e);
  const int32_t bits = (e + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return poly * two_n;
}

inline double exp_of(double x) { return std::exp(x); }

// n rows of D values, starting at `first`, into acc_t scratch: row-major rows[c * D + d] and/or
// transposed cols[d * kChunk + c] (either may be null); every value times `factor`.
template <typename scalar_t, typename acc_t>
FASTATTN_CLONED_HELPER void load_chunk(acc_t* rows, acc_t* cols, const void* base, const TensorStrides& s,
                       int64_t b, int64_t h, int64_t first, int64_t n, int64_t D, acc_t factor) {
  for (int64_t c = 0; c < n; ++c) {
    const scalar_t* src = row<scalar_t>(base, s, b, h, first + c);
    for (int64_t d = 0; d < D; ++d) {
      const acc_t x = static_cast<acc_t>(src[d]) * factor;
      if (rows) rows[c * D + d] = x;
      if (cols) cols[d * kChunk + c] = x;
    }
  }
}

// s[c] = sum_d x[d] * cols[d][c] for c in [band.lo, band.hi]. All kChunk columns are summed at
// once, in a local array that the compiler keeps in vector registers across d: one load and
// one fused multiply-add per 8 columns and no store until the end (summing into s[] in memory
// made every multiply-add wait on a store). Columns outside the band are computed and dropped.
template <typename acc_t>
FASTATTN_CLONED_HELPER void scores(acc_t* __restrict s, const acc_t* __restrict x,
                                 const acc_t* __restrict cols, int64_t D, Band band) {
  acc_t sum[kChunk] = {};
  for (int64_t d = 0; d < D; ++d) {
    const acc_t xd = x[d];
    const acc_t* col = cols + d * kChunk;
    for (int64_t c = 0; c < kChunk; ++c) sum[c] += xd * col[c];
  }
  for (int64_t c = band.lo; c <= band.hi; ++c) s[c] = sum[c];
}

// sum of s[c] for c in [band.lo, band.hi], in 8 interleaved partial sums: a single running sum
// is a chain of dependent adds that the compiler may not reorder.
template <typename acc_t>
FASTATTN_CLONED_HELPER acc_t band_sum(const acc_t* s, Band band) {
  acc_t part[8] = {};
  int64_t c = band.lo;
  for (; c + 8 <= band.hi + 1; c += 8)
    for (int k = 0; k < 8; ++k) part[k] += s[c + k];
  for (; c <= band.hi; ++c) part[0] += s[c];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// y[d] += sum_c w[c] * rows[c][d] for c in [band.lo, band.hi], 32 values of y at a time held
// in registers across c (the same reason as in scores()).
template <typename acc_t>
FASTATTN_CLONED_HELPER void accumulate(acc_t* __restrict y, const acc_t* __restrict w,
                                     const acc_t* __restrict rows, int64_t D, Band band) {
  constexpr int64_t kWidth = 32;
  int64_t d0 = 0;
  for (; d0 + kWidth <= D; d0 += kWidth) {
    acc_t sum[kWidth];
    for (int64_t k = 0; k < kWidth; ++k) sum[k] = y[d0 + k];
    for (int64_t c = band.lo; c <= band.hi; ++c) {
      const acc_t wc = w[c];
      const acc_t* src = rows + c * D + d0;
      for (int64_t k = 0; k < kWidth; ++k) sum[k] += wc * src[k];
    }
    for (int64_t k = 0; k < kWidth; ++k) y[d0 + k] = sum[k];
  }
  for (int64_t c = band.lo; c <= band.hi && d0 < D; ++c) {
    const acc_t wc = w[c];
    const acc_t* src = rows + c * D;
    for (int64_t d = d0; d < D; ++d) y[d] += wc * src[d];
  }
}

// Logit soft-capping: s[c] -> softcap * tanh(s[c] / softcap) over the band. The backward keeps
// the tanh values (`tanh_out`, or null) for the derivative 1 - tanh^2.
template <typename acc_t>
inline void cap_scores(acc_t* s, acc_t* tanh_out, acc_t softcap, Band band) {
  for (int64_t c = band.lo; c <= band.hi; ++c) {
    const acc_t t = std::tanh(s[c] / softcap);
    if (tanh_out != nullptr) tanh_out[c] = t;
    s[c] = softcap * t;
  }
}

// Work item `item` of the query-side passes: up to kRowTile query rows of one (sequence, head).
struct QueryTile {
  int64_t bh, h, kvh, i0, rows;  // kvh: h's k / v head; rows: 0 past the sequence's queries
  Sequence seq;
  Band keys;  // the keys the tile's queries see (the union of their bands)

  int64_t lse_index(const LocalAttentionParams& p, int64_t r) const {
    return (seq.tb * p.heads + h) * p.seq_len + seq.q0 + i0 + r;
  }
};

inline QueryTile query_tile(const LocalAttentionParams& p, int64_t item, int64_t tiles) {
  QueryTile t;
  t.bh = item / tiles;
  t.h = t.bh % p.heads;
  t.seq = sequence(p, t.bh / p.heads);
  t.kvh = kv_head(p, t.h);
  t.i0 = (item % tiles) * kRowTile;
  t.rows = std::clamp<int64_t>(t.seq.lq - t.i0, 0, kRowTile);
  t.keys = keys_seen(p, t.seq, t.i0, t.rows);
  return t;
}

// Forward of the work items [begin, end): tiles of kRowTile query rows.
template <typename scalar_t, typename acc_t>
FASTATTN_CPU_CLONES void forward_tiles(const LocalAttentionParams& p, int64_t begin, int64_t end) {
  const int64_t D = p.head_dim, tiles = query_tiles(p);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const acc_t softcap = static_cast<acc_t>(p.softcap);
  std::vector<acc_t> q(kRowTile * D), acc(kRowTile * D), kt(D * kChunk), v(kChunk * D),
      s(kChunk), row_max(kRowTile), denom(kRowTile);
  for (int64_t item = begin; item < end; ++item) {
    const QueryTile t = query_tile(p, item, tiles);
    if (t.rows == 0) continue;
    const Sequence& seq = t.seq;
    const int64_t h = t.h, m = t.rows;
    load_chunk<scalar_t, acc_t>(q.data(), nullptr, p.q, p.q_strides, seq.tb, h, seq.q0 + t.i0,
                                m, D, static_cast<acc_t>(p.scale));
    std::fill(acc.begin(), acc.end(), acc_t(0));
    std::fill(row_max.begin(), row_max.end(), neg_inf);
    std::fill(denom.begin(), denom.end(), acc_t(0));
    for (int64_t j0 = t.keys.lo; j0 <= t.keys.hi; j0 += kChunk) {
      const int64_t n = std::min(kChunk, t.keys.hi - j0 + 1);
      load_chunk<scalar_t, acc_t>(nullptr, kt.data(), p.k, p.k_strides, seq.tb, t.kvh,
                                  seq.k0 + j0, n, D, acc_t(1));
      load_chunk<scalar_t, acc_t>(v.data(), nullptr, p.v, p.v_strides, seq.tb, t.kvh,
                                  seq.k0 + j0, n, D, acc_t(1));
      for (int64_t r = 0; r < m; ++r) {
        const Band cols = within_chunk(keys_seen(p, seq, t.i0 + r), j0, n);
        if (cols.lo > cols.hi) continue;
        scores(s.data(), q.data() + r * D, kt.data(), D, cols);
        if (softcap > 0) cap_scores<acc_t>(s.data(), nullptr, softcap, cols);
        acc_t chunk_max = neg_inf;
        for (int64_t c = cols.lo; c <= cols.hi; ++c) chunk_max = std::max(chunk_max, s[c]);
        const acc_t new_max = std::max(row_max[r], chunk_max);
        if (row_max[r] != neg_inf && row_max[r] != new_max) {
          const acc_t correction = std::exp(row_max[r] - new_max);
          denom[r] *= correction;
          for (int64_t d = 0; d < D; ++d) acc[r * D + d] *= correction;
        }
        row_max[r] = new_max;
        for (int64_t c = cols.lo; c <= cols.hi; ++c) s[c] = exp_of(s[c] - new_max);
        denom[r] += band_sum(s.data(), cols);
        accumulate(acc.data() + r * D, s.data(), v.data(), D, cols);
      }
    }
    for (int64_t r = 0; r < m; ++r) {
      scalar_t* out = mutable_row<scalar_t>(p.out, p.out_strides, seq.tb, h, seq.q0 + t.i0 + r);
      float* lse = p.lse + t.lse_index(p, r);
      if (denom[r] == acc_t(0)) {  // the query sees no key
        std::fill(out, out + D, scalar_t(0));
        *lse = -std::numeric_limits<float>::infinity();
        continue;
      }
      for (int64_t d = 0; d < D; ++d) out[d] = static_cast<scalar_t>(acc[r * D + d] / denom[r]);
      *lse = static_cast<float>(row_max[r] + std::log(denom[r]));
    }
  }
}

template <typename scalar_t, typename acc_t>
void local_attention_forward(const LocalAttentionParams& p) {
  at::parallel_for(0, p.batch * p.heads * query_tiles(p), 1, [&](int64_t begin, int64_t end) {
    forward_tiles<scalar_t, acc_t>(p, begin, end);
  });
}

// The probabilities of a band from its scaled scores s: P = exp(s' - lse), s' the (capped)
// score; lse per column (a chunk of queries) or one for the band (a query row). With softcap,
// `tanh_of` receives tanh(s / softcap) for the score's derivative.
template <typename acc_t>
FASTATTN_CLONED_HELPER void probabilities(acc_t* s, acc_t* tanh_of, acc_t softcap,
                                          const acc_t* lse, bool lse_per_column, Band band) {
  if (softcap > 0) cap_scores<acc_t>(s, tanh_of, softcap, band);
  if (lse_per_column) {
    for (int64_t c = band.lo; c <= band.hi; ++c) s[c] = exp_of(s[c] - lse[c]);
    return;
  }
  const acc_t row_lse = lse[0];
  for (int64_t c = band.lo; c <= band.hi; ++c) s[c] = exp_of(s[c] - row_lse);
}

// dS = P (dP - delta) becomes the gradient of the raw score: times 1 - tanh^2 under softcap.
template <typename acc_t>
FASTATTN_CLONED_HELPER void uncap_gradient(acc_t* ds, const acc_t* tanh_of, acc_t softcap,
                                           Band band) {
  if (softcap <= 0) return;
  for (int64_t c = band.lo; c <= band.hi; ++c) ds[c] *= acc_t(1) - tanh_of[c] * tanh_of[c];
}

  // grad_q[i] = scale * sum_j dS[i,j] k[j],  dS[i,j] = P[i,j] (dP[i,j] - delta[i]) (x 1 - tanh^2)
template <typename scalar_t, typename acc_t>
FASTATTN_CPU_CLONES void grad_q_tiles(const LocalAttentionBwdParams& p, int64_t begin, int64_t end) {
  const int64_t D = p.head_dim, tiles = query_tiles(p);
  const acc_t scale = static_cast<acc_t>(p.scale), softcap = static_cast<acc_t>(p.softcap);
  std::vector<acc_t> q(kRowTile * D), dout(kRowTile * D), dq(kRowTile * D), k(kChunk * D),
      kt(D * kChunk), vt(D * kChunk), prob(kChunk), dp(kChunk), tanh_of(kChunk);
  for (int64_t item = begin; item < end; ++item) {
    const QueryTile t = query_tile(p, item, tiles);
    if (t.rows == 0) continue;
    const Sequence& seq = t.seq;
    const int64_t h = t.h, m = t.rows, q_row = seq.q0 + t.i0;
    load_chunk<scalar_t, acc_t>(q.data(), nullptr, p.q, p.q_strides, seq.tb, h, q_row, m, D,
                                scale);
    load_chunk<scalar_t, acc_t>(dout.data(), nullptr, p.grad_out, p.grad_out_strides, seq.tb, h,
                                q_row, m, D, acc_t(1));
    std::fill(dq.begin(), dq.end(), acc_t(0));
    for (int64_t j0 = t.keys.lo; j0 <= t.keys.hi; j0 += kChunk) {
      const int64_t n = std::min(kChunk, t.keys.hi - j0 + 1);
      load_chunk<scalar_t, acc_t>(k.data(), kt.data(), p.k, p.k_strides, seq.tb, t.kvh,
                                  seq.k0 + j0, n, D, acc_t(1));
      load_chunk<scalar_t, acc_t>(nullptr, vt.data(), p.v, p.v_strides, seq.tb, t.kvh,
                                  seq.k0 + j0, n, D, acc_t(1));
      for (int64_t r = 0; r < m; ++r) {
        const Band cols = within_chunk(keys_seen(p, seq, t.i0 + r), j0, n);
        if (cols.lo > cols.hi) continue;
        const acc_t lse = p.lse[t.lse_index(p, r)], delta = p.delta[t.lse_index(p, r)];
        scores(prob.data(), q.data() + r * D, kt.data(), D, cols);
        scores(dp.data(), dout.data() + r * D, vt.data(), D, cols);
        probabilities(prob.data(), tanh_of.data(), softcap, &lse, false, cols);
        for (int64_t c = cols.lo; c <= cols.hi; ++c) prob[c] *= (dp[c] - delta) * scale;
        uncap_gradient(prob.data(), tanh_of.data(), softcap, cols);
        accumulate(dq.data() + r * D, prob.data(), k.data(), D, cols);
      }
    }
    for (int64_t r = 0; r < m; ++r) {
      scalar_t* grad_q = mutable_row<scalar_t>(p.grad_q, p.grad_q_strides, seq.tb, h, q_row + r);
      for (int64_t d = 0; d < D; ++d) grad_q[d] = static_cast<scalar_t>(dq[r * D + d]);
    }
  }
}

  // grad_v[j] = sum_i P[i,j] dout[i];  grad_k[j] = sum_i dS[i,j] scale q[i]
template <typename scalar_t, typename acc_t>
FASTATTN_CPU_CLONES void grad_kv_tiles(const LocalAttentionBwdParams& p, int64_t begin, int64_t end) {
  const int64_t D = p.head_dim, tiles = key_tiles(p);
  const acc_t scale = static_cast<acc_t>(p.scale), softcap = static_cast<acc_t>(p.softcap);
  std::vector<acc_t> k(kRowTile * D), v(kRowTile * D), dk(kRowTile * D), dv(kRowTile * D),
      q(kChunk * D), qt(D * kChunk), dout(kChunk * D), doutt(D * kChunk), lse(kChunk),
      delta(kChunk), prob(kChunk), dp(kChunk), tanh_of(kChunk);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t bh = item / tiles, h = bh % p.heads;
    const Sequence seq = sequence(p, bh / p.heads);
    const int64_t j0 = (item % tiles) * kRowTile;
    const int64_t written = std::clamp<int64_t>(seq.k_rows - j0, 0, kRowTile);
    if (written == 0) continue;
    const int64_t m = std::clamp<int64_t>(seq.lk - j0, 0, kRowTile);  // visible key rows
    const int64_t lse_row0 = (seq.tb * p.heads + h) * p.seq_len + seq.q0;
    std::fill(dk.begin(), dk.end(), acc_t(0));
    std::fill(dv.begin(), dv.end(), acc_t(0));
    if (m > 0) {
      const Band tile_queries = queries_seeing(p, seq, j0, m);
      const int64_t kvh = kv_head(p, h);
      load_chunk<scalar_t, acc_t>(k.data(), nullptr, p.k, p.k_strides, seq.tb, kvh, seq.k0 + j0,
                                  m, D, acc_t(1));
      load_chunk<scalar_t, acc_t>(v.data(), nullptr, p.v, p.v_strides, seq.tb, kvh, seq.k0 + j0,
                                  m, D, acc_t(1));
      for (int64_t i0 = tile_queries.lo; i0 <= tile_queries.hi; i0 += kChunk) {
        const int64_t n = std::min(kChunk, tile_queries.hi - i0 + 1);
        load_chunk<scalar_t, acc_t>(q.data(), qt.data(), p.q, p.q_strides, seq.tb, h,
                                    seq.q0 + i0, n, D, scale);
        load_chunk<scalar_t, acc_t>(dout.data(), doutt.data(), p.grad_out, p.grad_out_strides,
                                    seq.tb, h, seq.q0 + i0, n, D, acc_t(1));
        for (int64_t c = 0; c < n; ++c) {
          lse[c] = p.lse[lse_row0 + i0 + c];
          delta[c] = p.delta[lse_row0 + i0 + c];
        }
        for (int64_t r = 0; r < m; ++r) {
          const Band cols = within_chunk(queries_seeing(p, seq, j0 + r), i0, n);
          if (cols.lo > cols.hi) continue;
          scores(prob.data(), k.data() + r * D, qt.data(), D, cols);
          scores(dp.data(), v.data() + r * D, doutt.data(), D, cols);
          probabilities(prob.data(), tanh_of.data(), softcap, lse.data(), true, cols);
          accumulate(dv.data() + r * D, prob.data(), dout.data(), D, cols);
          for (int64_t c = cols.lo; c <= cols.hi; ++c) prob[c] *= dp[c] - delta[c];
          uncap_gradient(prob.data(), tanh_of.data(), softcap, cols);
          accumulate(dk.data() + r * D, prob.data(), q.data(), D, cols);  // q carries the scale
        }
      }
    }
    for (int64_t r = 0; r < written; ++r) {
      const int64_t key_row = seq.k0 + j0 + r;
      scalar_t* grad_k = mutable_row<scalar_t>(p.grad_k, p.grad_k_strides, seq.tb, h, key_row);
      scalar_t* grad_v = mutable_row<scalar_t>(p.grad_v, p.grad_v_strides, seq.tb, h, key_row);
      for (int64_t d = 0; d < D; ++d) {
        grad_k[d] = static_cast<scalar_t>(dk[r * D + d]);
        grad_v[d] = static_cast<scalar_t>(dv[r * D + d]);
      }
    }
  }
}

// Backward in three passes, each parallel without atomics: delta per query row; grad_q per
// tile of query rows; grad_k and grad_v per tile of key rows (each key row gathers from the
// queries that see it). Probabilities are recomputed from lse.
template <typename scalar_t, typename acc_t>
void local_attention_backward(const LocalAttentionBwdParams& p) {
  const int64_t D = p.head_dim, L = p.seq_len;
  // Every query row of the tensors: a packed batch is tensor batch 0 alone.
  const int64_t tensor_batches = p.cu_seqlens_q != nullptr ? 1 : p.batch;
  const int64_t rows = tensor_batches * p.heads * L;

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

  at::parallel_for(0, p.batch * p.heads * query_tiles(p), 1, [&](int64_t begin, int64_t end) {
    grad_q_tiles<scalar_t, acc_t>(p, begin, end);
  });
  at::parallel_for(0, p.batch * p.heads * key_tiles(p), 1, [&](int64_t begin, int64_t end) {
    grad_kv_tiles<scalar_t, acc_t>(p, begin, end);
  });
}

}  // namespace fastattn::cpu
