// Backward of sliding-window attention, FlashAttention-2 style, keys as the rows.
//
// One block of 4 warps owns kBc = 64 keys of one (batch, head); each warp owns 16 keys and
// keeps their dK and dV in registers for the whole band. The block walks the query tiles
// that see any of its keys, [k0 - right, k0 + 63 + left], kBq queries at a time
// (double-buffered Q, dO, lse, delta). Per tile, with every product on the tensor cores:
//   S^T = K Q^T, P^T = exp(S^T - lse), dV += P^T dO, dP^T = V dO^T,
//   dS^T = P^T (dP^T - delta), dK += dS^T Q,
// then dS^T goes through shared memory so the block can form dQ_tile = dS K, which is added
// with float32 atomics into a (B, H, L, D) float32 scratch (zeroed by the delta pre-pass) and
// converted (times the scale) to the output dtype by a last small kernel.
//
// Why atomics rather than a separate dQ pass: a dQ pass recomputes S and dP (two of the five
// products, +40% tensor work); the atomics cost one float2 reduction per dQ element per key
// block that sees it, i.e. (window + kBq) / kBc adds per element, which L2 absorbs. The price
// is that dQ is not bitwise reproducible (float addition order); dK, dV and the forward are.
//
// GQA: a block works for one *query* head (reading its kv head's K and V) and stores that
// head's share of dK and dV into a per-query-head buffer; the torch glue sums the shares of
// a group (local_attention_torch.h, sum_kv_groups), so no two blocks write one row.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda/tile_common.cuh"

namespace fastattn::cuda {

template <typename T, int D>
struct BwdConfig {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBc = 16 * kWarps;
  static constexpr int kBq = ((sizeof(T) == 2 && D <= 64) || D <= 32) ? 64 : 32;
  static constexpr int kLd = D + 8;
  static constexpr int kLdS = kBq + 8;  // dS^T tile, (kBc, kBq)
  // dQ_tile (kBq x D) split over the warps: kWarpsM row groups of 16 x kWarpsN column groups.
  static constexpr int kWarpsM = kBq / 16;
  static constexpr int kWarpsN = kWarps / kWarpsM;
  static constexpr int kDn = D / kWarpsN;
  static_assert(kDn % 16 == 0, "each warp's dQ columns must be whole 16-column steps");
  static constexpr size_t kSmem =
      sizeof(T) * (2 * kBc * kLd + 4 * kBq * kLd + kBc * kLdS) + sizeof(float) * 4 * kBq;
};

__device__ __forceinline__ void atomic_add2(float* p, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(x, y));
#else
  atomicAdd(p, x);
  atomicAdd(p + 1, y);
#endif
}

// Query rows of q's tensor, (B, H, L) or packed (1, H, T): those of lse, delta and the dQ
// scratch.
__host__ __device__ __forceinline__ int64_t query_rows_of_tensors(const LocalAttentionParams& p,
                                                                  bool packed_possible = true) {
  const int64_t batches = packed_possible && p.cu_seqlens_q != nullptr ? 1 : p.batch;
  return batches * p.heads * p.seq_len;
}

// One query's lse (base 2) and delta as the backward reads them: lse = -inf (a query that sees
// nothing) and rows past L become +inf, so that P = exp2(s - inf) = 0; delta past L is 0.
struct QueryStats {
  float lse = 0.f, delta = 0.f;

  QueryStats() = default;
  __device__ __forceinline__ QueryStats(const LocalAttentionBwdParams& p, int64_t bh, int64_t i) {
    const float value = i < p.seq_len ? p.lse[bh * p.seq_len + i] : -INFINITY;
    lse = value == -INFINITY ? INFINITY : value * kLog2e;
    delta = i < p.seq_len ? p.delta[bh * p.seq_len + i] : 0.f;
  }
  // Row `index` of lse and delta, or a row past the queries (`valid` false).
  __device__ __forceinline__ QueryStats(const LocalAttentionBwdParams& p, int64_t index,
                                        bool valid) {
    const float value = valid ? p.lse[index] : -INFINITY;
    lse = value == -INFINITY ? INFINITY : value * kLog2e;
    delta = valid ? p.delta[index] : 0.f;
  }
};

// What a backward block needs to know about its kBc keys and the queries that see them.
struct BwdBlock {
  int64_t b, h, kvh, bh, k0, keys, qlo;  // kvh: the k / v head of query head h (GQA)
  int n_tiles;  // query tiles of bq rows from qlo; none when the block lies past key_lengths

  // work: the index of the (batch, head, key tile) triple, key tiles of a head adjacent.
  __device__ __forceinline__ BwdBlock(const LocalAttentionParams& p, int64_t work, int64_t k_tiles,
                                      int bc, int bq) {
    const int64_t tile = work % k_tiles;
    bh = work / k_tiles;
    b = bh / p.heads;
    h = bh % p.heads;
    kvh = kv_head(p, h);
    keys = valid_keys(p, b);
    k0 = tile * bc;
    const int64_t last_key = (k0 + bc < keys ? k0 + bc : keys) - 1;
    qlo = k0 - p.window_right > 0 ? k0 - p.window_right : 0;
    const int64_t qhi = last_key + p.window_left < p.seq_len - 1 ? last_key + p.window_left
                                                                 : p.seq_len - 1;
    n_tiles = last_key >= k0 && qhi >= qlo ? static_cast<int>((qhi - qlo + bq) / bq) : 0;
  }

  // The head's key rows whose dK / dV the block stores, and where they go.
  __device__ __forceinline__ int64_t key_rows(const LocalAttentionParams& p) const {
    return p.seq_len;
  }
  __device__ __forceinline__ int64_t query_rows(const LocalAttentionParams& p) const {
    return p.seq_len;
  }
  template <typename T>
  __device__ __forceinline__ T* grad_head(void* base, const TensorStrides& s) const {
    return static_cast<T*>(base) + b * s.batch + h * s.head;
  }
  // As SeqHead has them: the tensors' batch index, the tensor rows of query i and key j, the
  // key position of query 0; and query i's lse and delta, the dQ scratch's head (its rows are
  // q_row's), whether a query tile runs past the queries into rows of the tensor that are not
  // this block's (never, here).
  __device__ __forceinline__ int64_t tensor_batch() const { return b; }
  __device__ __forceinline__ int64_t q_row(int64_t i) const { return i; }
  __device__ __forceinline__ int64_t k_row(int64_t j) const { return j; }
  __device__ __forceinline__ int64_t position_offset() const { return 0; }
  __device__ __forceinline__ QueryStats stats(const LocalAttentionBwdParams& p, int64_t i) const {
    return QueryStats(p, bh, i);
  }
  __device__ __forceinline__ int64_t dq_head() const { return bh; }
  __device__ __forceinline__ bool overruns_queries(int64_t, int) const { return false; }
  __device__ __forceinline__ int overruns_from(int64_t) const { return 0; }
};

// BwdBlock for the calls the fast kernels do not take yet (see SeqFwdBlock): a key tile of one
// Sequence, key and query rows counted from the sequence's first, queries at key position
// i + offset. lse0: the lse / delta / dQ-scratch row of the sequence's first query.
struct SeqBwdBlock : SeqHead {
  int64_t k0, qlo;
  int n_tiles;

  __device__ __forceinline__ SeqBwdBlock(const LocalAttentionParams& p, int64_t work,
                                         int64_t k_tiles, int bc, int bq)
      : SeqHead(p, work / k_tiles) {
    k0 = work % k_tiles * bc;
    // Queries that see one of the keys [k0, last_key]: key - right <= i + offset <= key + left.
    const int64_t last_key = (k0 + bc < keys ? k0 + bc : keys) - 1;
    const int64_t first_query = k0 - p.window_right - offset;
    qlo = first_query > 0 ? first_query : 0;
    const int64_t last_query = last_key + p.window_left - offset;
    const int64_t qhi = last_query < lq - 1 ? last_query : lq - 1;
    n_tiles = last_key >= k0 && qhi >= qlo ? static_cast<int>((qhi - qlo + bq) / bq) : 0;
  }

  __device__ __forceinline__ int64_t key_rows(const LocalAttentionParams&) const { return k_rows; }
  __device__ __forceinline__ int64_t query_rows(const LocalAttentionParams&) const { return lq; }
  template <typename T>
  __device__ __forceinline__ T* grad_head(void* base, const TensorStrides& s) const {
    return static_cast<T*>(base) + tb * s.batch + h * s.head + k_row0 * s.seq;
  }
  __device__ __forceinline__ QueryStats stats(const LocalAttentionBwdParams& p, int64_t i) const {
    return QueryStats(p, lse0 + i, i < lq);
  }
  __device__ __forceinline__ int64_t dq_head() const { return head_row; }
  // A tile of bq queries from i0 that runs past the sequence's last query holds rows that are
  // not its own: the next sequence's, or rows past the tensor.
  __device__ __forceinline__ bool overruns_queries(int64_t i0, int bq) const {
    return i0 + bq > lq;
  }
  // The first row of such a tile (from i0) that is not the sequence's.
  __device__ __forceinline__ int overruns_from(int64_t i0) const {
    return static_cast<int>(lq - i0);
  }
};

// dK (times the scale) and dV of the lane's two key rows (kw0 + g, kw0 + g + 8); rows past the
// head's key rows are not stored.
template <class Ops, typename T, int D, class Block>
__device__ __forceinline__ void store_key_rows(const LocalAttentionBwdParams& p,
                                               const Block& blk, const float (&dk)[D / 8][4],
                                               const float (&dv)[D / 8][4], int64_t kw0,
                                               int lane) {
  const int g = lane >> 2, t = lane & 3;
  const float scale = static_cast<float>(p.scale);
  T* dkg = blk.template grad_head<T>(p.grad_k, p.grad_k_strides);
  T* dvg = blk.template grad_head<T>(p.grad_v, p.grad_v_strides);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t kj = kw0 + g + 8 * r;
    if (kj >= blk.key_rows(p)) continue;
    T* krow = dkg + kj * p.grad_k_strides.seq + 2 * t;
    T* vrow = dvg + kj * p.grad_v_strides.seq + 2 * t;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      Ops::store2(krow + i * 8, dk[i][2 * r] * scale, dk[i][2 * r + 1] * scale);
      Ops::store2(vrow + i * 8, dv[i][2 * r], dv[i][2 * r + 1]);
    }
  }
}

// Soft-capping in the backward (kSeq): s[i][e] holds P = exp2(c' t - lse) with c' = softcap
// log2(e) and t = tanh(x / softcap) of the scaled score x. dS needs 1 - t^2, recovered from P
// itself (t = (log2 P + lse) / c') instead of holding t in kBq / 2 more registers a thread;
// where P = 0 the factor does not matter.
template <int kBq>
__device__ __forceinline__ void uncap_gradient(float (&ds)[kBq / 8][4],
                                               const float (&prob)[kBq / 8][4],
                                               const float* lse, float softcap_log2, int lane) {
  const int t = lane & 3;
#pragma unroll
  for (int i = 0; i < kBq / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float unit = (log2f(prob[i][e]) + lse[i * 8 + 2 * t + (e & 1)]) / softcap_log2;
      ds[i][e] = prob[i][e] > 0.f ? ds[i][e] * (1.f - unit * unit) : 0.f;
    }
}

// kSeq: the general variant (SeqBwdBlock: KV cache, packed sequences, soft-capping), for the
// calls the other kernels do not take.
template <typename T, int D, bool kSeq = false>
__global__ void __launch_bounds__(BwdConfig<T, D>::kThreads)
    local_bwd_kernel(const LocalAttentionBwdParams p, float* __restrict__ dq_accum,
                     const int64_t k_tiles, const bool rows_aligned) {
  using Cfg = BwdConfig<T, D>;
  using Block = std::conditional_t<kSeq, SeqBwdBlock, BwdBlock>;
  using Ops = typename OpsFor<T>::type;
  constexpr int kBc = Cfg::kBc, kBq = Cfg::kBq, kLd = Cfg::kLd, kLdS = Cfg::kLdS;
  constexpr int kThreads = Cfg::kThreads;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + kBc * kLd;
  T* sQ = sV + kBc * kLd;     // 2 stages
  T* sdO = sQ + 2 * kBq * kLd;  // 2 stages
  T* sdS = sdO + 2 * kBq * kLd;
  float* sLse = reinterpret_cast<float*>(sdS + kBc * kLdS);  // 2 stages, log2 units
  float* sDelta = sLse + 2 * kBq;                              // 2 stages

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const Block blk(p, blockIdx.x, k_tiles, kBc, kBq);
  if constexpr (kSeq) {
    if (blk.k0 >= blk.k_rows) return;  // past a shorter sequence's keys: nothing to store
  }
  const int64_t h = blk.h, keys = blk.keys, k0 = blk.k0, qlo = blk.qlo;
  const int n_tiles = blk.n_tiles;
  const int64_t left = p.window_left, right = p.window_right;
  // The queries' rows, the query offset (queries sit at key position i + offset), the tensor
  // rows of the first query and key, and the dQ-scratch row of the first query.
  const int64_t L = blk.query_rows(p), offset = blk.position_offset(), b = blk.tensor_batch();
  const int64_t q_row0 = blk.q_row(0), k_row0 = blk.k_row(0);
  const int64_t stats0 = blk.dq_head() * p.seq_len + q_row0;
  const T* qg = head_ptr<T>(p.q, p.q_strides, b, h) + q_row0 * p.q_strides.seq;
  const T* kg = head_ptr<T>(p.k, p.k_strides, b, blk.kvh) + k_row0 * p.k_strides.seq;
  const T* vg = head_ptr<T>(p.v, p.v_strides, b, blk.kvh) + k_row0 * p.v_strides.seq;
  const T* dog = head_ptr<T>(p.grad_out, p.grad_out_strides, b, h) + q_row0 * p.grad_out_strides.seq;
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
  const bool capped = kSeq && p.softcap > 0;
  const float cap_unit = static_cast<float>(p.scale / p.softcap);  // read only where capped
  const float cap_log2 = static_cast<float>(p.softcap) * kLog2e;

  auto load_q_tile = [&](int n) {
    const int64_t i0 = qlo + static_cast<int64_t>(n) * kBq;
    const int st = n & 1;
    load_rows<T, D, kBq, kThreads>(sQ + st * kBq * kLd, kLd, qg, p.q_strides.seq, i0, L,
                                   rows_aligned, tid);
    load_rows<T, D, kBq, kThreads>(sdO + st * kBq * kLd, kLd, dog, p.grad_out_strides.seq, i0, L,
                                   rows_aligned, tid);
    if (tid < kBq) {
      const QueryStats stats = blk.stats(p, i0 + tid);
      sLse[st * kBq + tid] = stats.lse;
      sDelta[st * kBq + tid] = stats.delta;
    }
  };

  if (n_tiles > 0) {
    load_rows<T, D, kBc, kThreads>(sK, kLd, kg, p.k_strides.seq, k0, keys, rows_aligned, tid);
    load_rows<T, D, kBc, kThreads>(sV, kLd, vg, p.v_strides.seq, k0, keys, rows_aligned, tid);
    load_q_tile(0);
  }
  cp_async_commit();

  float dk[D / 8][4], dv[D / 8][4];
  zero(dk);
  zero(dv);
  const int64_t kw0 = k0 + warp * 16;  // this warp's first key
  const int wm = warp % Cfg::kWarpsM, wn = warp / Cfg::kWarpsM;

  for (int n = 0; n < n_tiles; ++n) {
    if (n + 1 < n_tiles) {
      load_q_tile(n + 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int st = n & 1;
    const T* cQ = sQ + st * kBq * kLd;
    const T* cdO = sdO + st * kBq * kLd;
    const float* cLse = sLse + st * kBq;
    const float* cDelta = sDelta + st * kBq;
    const int64_t i0 = qlo + static_cast<int64_t>(n) * kBq;
    const int64_t p0 = i0 + offset;  // the tile's first query's key position

    // S^T = K Q^T (16 keys x kBq queries per warp).
    float s[kBq / 8][4];
    zero(s);
    mma_smem_bt<Ops, kBq, D>(s, sK, kLd, warp * 16, cQ, kLd, lane);
    // P^T; element (key kw0 + g + 8 (e >> 1), query i0 + 8 i + 2 t + (e & 1)).
    const bool interior = kw0 >= p0 + kBq - 1 - left && kw0 + 15 <= p0 + right && kw0 + 15 < keys;
#pragma unroll
    for (int i = 0; i < kBq / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = i * 8 + 2 * t + (e & 1);
        // The scaled score in base-2 units; capped: softcap tanh(x / softcap) of it.
        const float x =
            capped ? cap_log2 * accurate_tanh(s[i][e] * cap_unit) : s[i][e] * scale_log2;
        const float prob = exp2f(x - cLse[col]);
        s[i][e] = interior || visible(p0 + col, kw0 + g + (e >> 1) * 8, left, right, keys) ? prob
                                                                                            : 0.f;
      }
    // dV += P^T dO.
    mma_c_b<Ops, D, kBq>(dv, s, cdO, kLd, 0, lane);
    // dP^T = V dO^T, then dS^T = P^T (dP^T - delta) in place.
    float ds[kBq / 8][4];
    zero(ds);
    mma_smem_bt<Ops, kBq, D>(ds, sV, kLd, warp * 16, cdO, kLd, lane);
#pragma unroll
    for (int i = 0; i < kBq / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) ds[i][e] = s[i][e] * (ds[i][e] - cDelta[i * 8 + 2 * t + (e & 1)]);
    if (capped) uncap_gradient<kBq>(ds, s, cLse, cap_log2, lane);
    // dK += dS^T Q (the scale is applied once at the end).
    mma_c_b<Ops, D, kBq>(dk, ds, cQ, kLd, 0, lane);
    // dS^T to shared memory, rows = keys, for the block-wide dQ product.
#pragma unroll
    for (int i = 0; i < kBq / 8; ++i)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        Ops::store2(sdS + (warp * 16 + g + 8 * r) * kLdS + i * 8 + 2 * t, ds[i][2 * r],
                    ds[i][2 * r + 1]);
    __syncthreads();

    // dQ_tile[wm rows][wn columns] = dS K over the block's 64 keys.
    float dq[Cfg::kDn / 8][4];
    zero(dq);
#pragma unroll
    for (int kk = 0; kk < kBc / 16; ++kk) {
      typename Ops::A a;
      Ops::load_a_t(a, sdS, kLdS, wm * 16, kk * 16, lane);
      mma_a_b<Ops, Cfg::kDn>(dq, a, sK, kLd, wn * Cfg::kDn, kk * 16, lane);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t qi = i0 + wm * 16 + g + 8 * r;
      if (qi >= L) continue;
      float* dst = dq_accum + (stats0 + qi) * D + wn * Cfg::kDn + 2 * t;
#pragma unroll
      for (int i = 0; i < Cfg::kDn / 8; ++i) atomic_add2(dst + i * 8, dq[i][2 * r], dq[i][2 * r + 1]);
    }
    // The next iteration's loads target the other stage; its first barrier orders this
    // iteration's reads of sdS before the next writes.
  }
  if (n_tiles == 0) cp_async_wait<0>();

  store_key_rows<Ops, T, D>(p, blk, dk, dv, kw0, lane);
}

// delta = rowsum(dO * O) - grad_lse, kLanes lanes a row; where every row of dO and O starts on a
// 16-byte boundary (vector), each lane reads 16 bytes of both at a time. The same pass zeroes
// the row's float32 dQ scratch, which the main kernel adds into.
// kSeq: rows of a packed batch too (one tensor batch of p.seq_len rows, p.batch sequences).
template <typename T, int kLanes, bool kSeq = false>
__global__ void local_bwd_delta_kernel(const LocalAttentionBwdParams p,
                                       float* __restrict__ dq_accum, const bool vector) {
  static_assert(kLanes == 8 || kLanes == 16);
  constexpr int kPer = 16 / static_cast<int>(sizeof(T));
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kLanes;
  const int lane = threadIdx.x % kLanes;
  const unsigned group = ((1u << kLanes) - 1) << ((threadIdx.x & 31) & ~(kLanes - 1));
  const int64_t rows = query_rows_of_tensors(p, kSeq);
  if (row >= rows) return;
  const int64_t i = row % p.seq_len, bh = row / p.seq_len;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const T* dO = head_ptr<T>(p.grad_out, p.grad_out_strides, b, h) + i * p.grad_out_strides.seq;
  const T* o = head_ptr<T>(p.out, p.out_strides, b, h) + i * p.out_strides.seq;
  float sum = 0.f;
  if (vector) {
    for (int64_t d = lane * kPer; d < p.head_dim; d += kLanes * kPer) {
      T x[kPer], y[kPer];
      *reinterpret_cast<uint4*>(x) = *reinterpret_cast<const uint4*>(dO + d);
      *reinterpret_cast<uint4*>(y) = *reinterpret_cast<const uint4*>(o + d);
#pragma unroll
      for (int e = 0; e < kPer; ++e) sum += static_cast<float>(x[e]) * static_cast<float>(y[e]);
    }
  } else {
    for (int64_t d = lane; d < p.head_dim; d += kLanes) {
      sum += static_cast<float>(dO[d]) * static_cast<float>(o[d]);
    }
  }
  // Rows of D floats, D a multiple of 4, in a contiguous allocation: whole float4s.
  float4* scratch = reinterpret_cast<float4*>(dq_accum + row * p.head_dim);
  for (int64_t c = lane; c < p.head_dim / 4; c += kLanes) {
    scratch[c] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
#pragma unroll
  for (int off = kLanes / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(group, sum, off);
  if (lane == 0) p.delta[row] = sum - p.grad_lse[row];
}

// Whether every row of a (B, H, L, D) tensor starts on a 16-byte boundary and holds whole
// 16-byte chunks.
inline bool rows_are_16_byte_chunks(const void* base, const TensorStrides& s, int64_t head_dim,
                                    int64_t elem) {
  const int64_t per = 16 / elem;
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && head_dim % per == 0 &&
         s.seq % per == 0 && s.head % per == 0 && s.batch % per == 0;
}

// grad_q = scale * dq_accum in the output dtype, 8 elements a step: both are contiguous, from
// torch's allocator (16-byte aligned), and n is a multiple of 8 (every head dim is).
template <typename T>
__global__ void local_bwd_dq_kernel(const float* __restrict__ dq_accum, T* __restrict__ grad_q,
                                    int64_t n, float scale) {
  const int64_t steps = n / 8;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < steps;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float4 lo = reinterpret_cast<const float4*>(dq_accum)[2 * c];
    const float4 hi = reinterpret_cast<const float4*>(dq_accum)[2 * c + 1];
    const float values[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    alignas(16) T out[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) out[e] = static_cast<T>(values[e] * scale);
#pragma unroll
    for (int v = 0; v < static_cast<int>(sizeof(out)) / 16; ++v) {
      reinterpret_cast<uint4*>(grad_q + 8 * c)[v] = reinterpret_cast<const uint4*>(out)[v];
    }
  }
}

// The same for a packed batch, whose dQ scratch is in lse's row order (H, Tq, D) while grad_q
// is q's (Tq, H, D) (any strides, contiguous D): 8 elements of one row a step.
template <typename T>
__global__ void local_bwd_dq_packed_kernel(const float* __restrict__ dq_accum,
                                           T* __restrict__ grad_q, int64_t n, int64_t rows,
                                           int64_t head_dim, TensorStrides grad_q_strides,
                                           float scale) {
  const int64_t steps = n / 8;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < steps;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = 8 * c / head_dim, col = 8 * c % head_dim;
    const int64_t h = row / rows, i = row % rows;
    T* dst = grad_q + h * grad_q_strides.head + i * grad_q_strides.seq + col;
#pragma unroll
    for (int e = 0; e < 8; ++e) dst[e] = static_cast<T>(dq_accum[8 * c + e] * scale);
  }
}

}  // namespace fastattn::cuda
