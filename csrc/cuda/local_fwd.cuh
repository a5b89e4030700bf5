// Forward of sliding-window attention, FlashAttention-2 style.
//
// One block of 4 warps owns kBr = 64 consecutive queries of one (batch, head); each warp owns
// 16 of them. The block walks only the key tiles of its band, [q0 - left, q0 + 63 + right]
// clipped to [0, key_lengths[b]), kBc keys at a time, double-buffered through cp.async. Per
// tile: S = Q K^T on the tensor cores, online softmax in registers (base-2 exponent, scale
// folded in), O += P V with P re-packed from the S accumulators without touching shared
// memory. Tiles that lie inside every one of a warp's rows' windows skip the mask entirely.
// Nothing grows with L or the window; each output element is written once, in a fixed order,
// so the forward is deterministic.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda/kernel_switches.h"
#include "cuda/tile_common.cuh"
#include "cuda/wgmma.cuh"

namespace fastattn::cuda {

template <typename T, int D>
struct FwdConfig {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBr = 16 * kWarps;
  // Key tile: as wide as the registers of the O accumulator (D / 2 floats a lane) allow.
  static constexpr int kBc = (sizeof(T) == 2 ? D <= 128 : D <= 64) ? 64 : 32;
  // Rows padded by 16 bytes (8 halves) / 32 bytes (8 floats) spread over the banks for
  // ldmatrix and for the float2 fragment loads (FwdTiles).
  static constexpr int kLd = D + 8;
  // Q fragments stay in registers when they are cheap (16-bit types, D <= 128).
  static constexpr bool kQInRegs = sizeof(T) == 2 && D <= 128;
  static constexpr size_t kSmem = sizeof(T) * kLd * (kBr + 4 * kBc);
};

// What a forward block needs to know about its 64 queries and their band.
template <typename T>
struct FwdBlock {
  int64_t b, h, kvh, bh, q0, keys, lo;  // kvh: the k / v head of query head h (GQA)
  int n_tiles;
  const T *q, *k, *v;

  // work: the index of the (batch, head, query tile) triple, query tiles of a head adjacent.
  __device__ __forceinline__ FwdBlock(const LocalAttentionParams& p, int64_t work, int64_t q_tiles,
                                      int br, int bc) {
    const int64_t tile = work % q_tiles;
    bh = work / q_tiles;
    b = bh / p.heads;
    h = bh % p.heads;
    kvh = kv_head(p, h);
    keys = valid_keys(p, b);
    q0 = tile * br;
    lo = q0 - p.window_left > 0 ? q0 - p.window_left : 0;
    const int64_t last = q0 + br - 1 + p.window_right;
    const int64_t hi = last < keys - 1 ? last : keys - 1;
    n_tiles = hi >= lo ? static_cast<int>((hi - lo + bc) / bc) : 0;
    q = head_ptr<T>(p.q, p.q_strides, b, h);
    k = head_ptr<T>(p.k, p.k_strides, b, kvh);
    v = head_ptr<T>(p.v, p.v_strides, b, kvh);
  }

  // The head's query rows (rows past them are zero-filled and not stored), its output rows
  // and the lse index of query qi: what store_rows and FwdTiles ask of a block.
  __device__ __forceinline__ int64_t query_rows(const LocalAttentionParams& p) const {
    return p.seq_len;
  }
  __device__ __forceinline__ T* out_head(const LocalAttentionParams& p) const {
    return static_cast<T*>(p.out) + b * p.out_strides.batch + h * p.out_strides.head;
  }
  __device__ __forceinline__ int64_t lse_index(const LocalAttentionParams& p, int64_t qi) const {
    return bh * p.seq_len + qi;
  }
  // For the Hopper forward's tensor copies: the tensors' batch index, the tensor rows of a query
  // and of a key, the key position of query 0, and whether the keys past `keys` are real memory
  // (key_lengths) that the copy of V must not take.
  __device__ __forceinline__ int64_t tensor_batch() const { return b; }
  __device__ __forceinline__ int64_t q_row(int64_t i) const { return i; }
  __device__ __forceinline__ int64_t k_row(int64_t j) const { return j; }
  __device__ __forceinline__ int64_t position_offset() const { return 0; }
  __device__ __forceinline__ bool keys_end_in_memory(const LocalAttentionParams& p) const {
    return keys < p.seq_len;
  }
};

// FwdBlock for the calls of the general kernels (kSeq, issue 14): a KV cache (Lq != Lk, queries
// bottom-right aligned), packed sequences (cu_seqlens), soft-capping. A query tile of one
// SeqHead: q0 and the rows are the sequence's own, and query i sits at key position i + offset.
template <typename T>
struct SeqFwdBlock : SeqHead {
  int64_t q0, lo;
  int n_tiles;
  const T *q, *k, *v;
  T* out;

  __device__ __forceinline__ SeqFwdBlock(const LocalAttentionParams& p, int64_t work,
                                         int64_t q_tiles, int br, int bc)
      : SeqHead(p, work / q_tiles) {
    q0 = work % q_tiles * br;
    const int64_t first = q0 + offset - p.window_left;
    lo = first > 0 ? first : 0;
    const int64_t last = q0 + br - 1 + offset + p.window_right;
    const int64_t hi = last < keys - 1 ? last : keys - 1;
    n_tiles = q0 < lq && hi >= lo ? static_cast<int>((hi - lo + bc) / bc) : 0;
    q = head_ptr<T>(p.q, p.q_strides, tb, h) + q_row0 * p.q_strides.seq;
    k = head_ptr<T>(p.k, p.k_strides, tb, kvh) + k_row0 * p.k_strides.seq;
    v = head_ptr<T>(p.v, p.v_strides, tb, kvh) + k_row0 * p.v_strides.seq;
    out = static_cast<T*>(p.out) + tb * p.out_strides.batch + h * p.out_strides.head +
          q_row0 * p.out_strides.seq;
  }

  __device__ __forceinline__ int64_t query_rows(const LocalAttentionParams&) const { return lq; }
  __device__ __forceinline__ T* out_head(const LocalAttentionParams&) const { return out; }
  __device__ __forceinline__ int64_t lse_index(const LocalAttentionParams&, int64_t qi) const {
    return lse0 + qi;
  }
  // Past a sequence's keys lie the next sequence's rows, or a cache's unfilled ones.
  __device__ __forceinline__ bool keys_end_in_memory(const LocalAttentionParams&) const {
    return true;
  }
};

// Query rows per sequence that the grid covers: the longest sequence's of a packed batch.
inline int64_t grid_query_rows(const LocalAttentionParams& p) {
  return p.cu_seqlens_q != nullptr ? p.max_seqlen_q : p.seq_len;
}

// Whether a call needs SeqFwdBlock (the kSeq kernel): anything but one query per key row, no
// cu_seqlens and no soft-capping.
inline bool needs_sequence_kernel(const LocalAttentionParams& p) {
  return p.cu_seqlens_q != nullptr || p.seq_len != p.key_seq_len || p.softcap > 0;
}

// The Hopper kernels take those calls too (their kSeq variants), unless
// FASTATTN_DISABLE_WS_SEQ=1 gives them to the mma.sync ones (for comparison, and to test both).
inline bool use_ws_sequences() { return !switch_set("FASTATTN_DISABLE_WS_SEQ"); }

// The forward's shared-memory tiles: Q, and K/V in two stages (tile n in stage n % 2), in the
// padded layout (row stride ld) or, with kSw128, the swizzled layout wgmma reads.
template <typename T, int D, int kBr, int kBc, int kThreads, bool kSw128>
struct FwdTiles {
  static constexpr int kLd = kSw128 ? D : D + 8;
  static constexpr size_t kElems = static_cast<size_t>(kLd) * (kBr + 4 * kBc);
  T *q, *k, *v;

  __device__ __forceinline__ explicit FwdTiles(T* smem)
      : q(smem), k(smem + kBr * kLd), v(smem + (kBr + 2 * kBc) * kLd) {}
  __device__ __forceinline__ const T* k_stage(int n) const { return k + (n & 1) * kBc * kLd; }
  __device__ __forceinline__ const T* v_stage(int n) const { return v + (n & 1) * kBc * kLd; }

  template <class Block>
  __device__ __forceinline__ void load_kv(const LocalAttentionParams& p, const Block& blk, int n,
                                          bool rows_aligned, int tid) {
    const int64_t k0 = blk.lo + static_cast<int64_t>(n) * kBc;
    T* ks = k + (n & 1) * kBc * kLd;
    T* vs = v + (n & 1) * kBc * kLd;
    load_rows<T, D, kBc, kThreads, kSw128>(ks, kLd, blk.k, p.k_strides.seq, k0, blk.keys,
                                           rows_aligned, tid);
    load_rows<T, D, kBc, kThreads, kSw128>(vs, kLd, blk.v, p.v_strides.seq, k0, blk.keys,
                                           rows_aligned, tid);
  }
  // Q and the first K/V tile, as two cp.async groups.
  template <class Block>
  __device__ __forceinline__ void start(const LocalAttentionParams& p, const Block& blk,
                                        bool rows_aligned, int tid) {
    load_rows<T, D, kBr, kThreads, kSw128>(q, kLd, blk.q, p.q_strides.seq, blk.q0,
                                           blk.query_rows(p), rows_aligned, tid);
    cp_async_commit();
    if (blk.n_tiles > 0) load_kv(p, blk, 0, rows_aligned, tid);
    cp_async_commit();
  }
  // Before tile n: prefetches tile n + 1 into the other stage and waits for tile n (and Q).
  template <class Block>
  __device__ __forceinline__ void next(const LocalAttentionParams& p, const Block& blk, int n,
                                       bool rows_aligned, int tid) {
    if (n + 1 < blk.n_tiles) {
      load_kv(p, blk, n + 1, rows_aligned, tid);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
  }
};

// The scores of one key tile for the two rows (w0 + g, w0 + g + 8) a lane holds, masked to the
// band and key_lengths (-inf outside; nothing to do when the tile is interior to every row of
// the warp) and, with kScale, multiplied by scale_log2 (base-2 units) on the way. w0 is a key
// position (a query row plus the block's offset where queries are bottom-right aligned).
// kSoftcap (needs kScale): each scaled score x becomes softcap * tanh(x / softcap) first, in
// base-2 units, with accurate_tanh (tile_common.cuh), not tanh.approx.
template <int kBc, bool kScale, bool kSoftcap = false>
__device__ __forceinline__ void mask_scores(float (&s)[kBc / 8][4], const LocalAttentionParams& p,
                                            int64_t keys, int64_t w0, int64_t k0,
                                            float scale_log2, int lane) {
  if constexpr (kSoftcap) {
    static_assert(kScale, "the cap applies to scaled scores");
    const float softcap = static_cast<float>(p.softcap);
    const float to_unit = static_cast<float>(p.scale) / softcap, to_log2 = softcap * kLog2e;
#pragma unroll
    for (int i = 0; i < kBc / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] = to_log2 * accurate_tanh(s[i][e] * to_unit);
    mask_scores<kBc, false>(s, p, keys, w0, k0, scale_log2, lane);
    return;
  }
  const int g = lane >> 2, t = lane & 3;
  const int64_t left = p.window_left, right = p.window_right;
  const bool interior = k0 >= w0 + 15 - left && k0 + kBc - 1 <= w0 + right && k0 + kBc - 1 < keys;
  if (interior) {
    if constexpr (kScale) {
#pragma unroll
      for (int i = 0; i < kBc / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[i][e] *= scale_log2;
    }
  } else {
    // In 32 bits, relative to the lane's first (query, key): kj - qi and the key's column stay
    // within L + 2 tiles of 0 (a tensor of 2**31 rows would not fit in device memory).
    const int rel = static_cast<int>(k0 - w0) + 2 * t - g;
    const int columns = static_cast<int>(keys - k0 < kBc ? keys - k0 : kBc) - 2 * t;
    const int lo = -static_cast<int>(left), hi = static_cast<int>(right);
#pragma unroll
    for (int i = 0; i < kBc / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int d = rel + i * 8 + (e & 1) - (e >> 1) * 8, column = i * 8 + (e & 1);
        const float score = kScale ? s[i][e] * scale_log2 : s[i][e];
        s[i][e] = d >= lo && d <= hi && column < columns ? score : -INFINITY;
      }
  }
}

// One key tile of the online softmax for the two rows (w0 + g, w0 + g + 8) a lane holds: masks
// s, updates the running max and sum, and leaves the unnormalised probabilities in s and, per
// row, the factor by which the output accumulated so far must be rescaled. The scores go to
// base-2 units (times scale_log2) first, or, with kFoldScale, the max stays in raw score units
// and scale and max are applied by one FFMA per score (max(c s) = c max(s) needs c > 0: the
// caller keeps other scales on the default path, and scales row_max by scale_log2 at the end).
// kChains: the row max and the row sum are each kept in that many partial values, combined at
// the end, instead of one serial chain of 2 kBc / 8 dependent FMNMX / FADD (for a consumer
// warp that has no other warp to hide their latency behind; kernel-notes, v3i).
template <int kBc, bool kFoldScale = false, int kChains = 1, bool kSoftcap = false>
__device__ __forceinline__ void online_softmax(float (&s)[kBc / 8][4], float (&row_max)[2],
                                               float (&row_sum)[2], float (&correction)[2],
                                               const LocalAttentionParams& p, int64_t keys,
                                               int64_t w0, int64_t k0, float scale_log2,
                                               int lane) {
  static_assert((kBc / 8) % kChains == 0, "the tile's column pairs split evenly over chains");
  static_assert(!(kSoftcap && kFoldScale), "soft-capping takes the default softmax");
  mask_scores<kBc, !kFoldScale, kSoftcap>(s, p, keys, w0, k0, scale_log2, lane);
  // x - m in base-2 units (the compiler would keep a multiply-add by 1 as an FFMA).
  const auto shifted = [&](float x, float m, float m_scaled) {
    return kFoldScale ? fmaf(x, scale_log2, -m_scaled) : x - m;
  };
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float part[kChains];
#pragma unroll
    for (int c = 0; c < kChains; ++c) part[c] = -INFINITY;
#pragma unroll
    for (int i = 0; i < kBc / 8; ++i) {
      part[i % kChains] = fmaxf(part[i % kChains], fmaxf(s[i][2 * r], s[i][2 * r + 1]));
    }
    float mx = part[0];
#pragma unroll
    for (int c = 1; c < kChains; ++c) mx = fmaxf(mx, part[c]);
    const float new_max = fmaxf(row_max[r], quad_max(mx));
    // A row that has seen only masked keys keeps max -inf; subtract 0 so exp2 gives 0, not NaN.
    const float base = new_max == -INFINITY ? 0.f : new_max;
    const float base_scaled = kFoldScale ? base * scale_log2 : base;
    correction[r] = exp2f(kFoldScale ? (row_max[r] - base) * scale_log2 : row_max[r] - base);
    row_max[r] = new_max;
#pragma unroll
    for (int c = 0; c < kChains; ++c) part[c] = 0.f;
#pragma unroll
    for (int i = 0; i < kBc / 8; ++i) {
      s[i][2 * r] = exp2f(shifted(s[i][2 * r], base, base_scaled));
      s[i][2 * r + 1] = exp2f(shifted(s[i][2 * r + 1], base, base_scaled));
      part[i % kChains] += s[i][2 * r] + s[i][2 * r + 1];
    }
    float sum = part[0];
#pragma unroll
    for (int c = 1; c < kChains; ++c) sum += part[c];
    row_sum[r] = row_sum[r] * correction[r] + sum;
  }
}

// o's two rows times their correction.
template <int D>
__device__ __forceinline__ void rescale_rows(float (&o)[D / 8][4], const float (&correction)[2]) {
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
    o[i][0] *= correction[0];
    o[i][1] *= correction[0];
    o[i][2] *= correction[1];
    o[i][3] *= correction[1];
  }
}

// online_softmax, then o rescaled.
template <int kBc, int D, bool kSoftcap = false>
__device__ __forceinline__ void softmax_tile(float (&s)[kBc / 8][4], float (&o)[D / 8][4],
                                             float (&row_max)[2], float (&row_sum)[2],
                                             const LocalAttentionParams& p, int64_t keys,
                                             int64_t w0, int64_t k0, float scale_log2, int lane) {
  float correction[2];
  online_softmax<kBc, false, 1, kSoftcap>(s, row_max, row_sum, correction, p, keys, w0, k0,
                                          scale_log2, lane);
  rescale_rows<D>(o, correction);
}

// out = o / sum and lse for the lane's two rows (queries past the head's rows are not stored).
template <class Ops, typename T, int D, class Block>
__device__ __forceinline__ void store_rows(const LocalAttentionParams& p, const Block& blk,
                                           const float (&o)[D / 8][4], const float (&row_max)[2],
                                           const float (&row_sum)[2], int64_t w0, int lane) {
  const int g = lane >> 2, t = lane & 3;
  T* og = blk.out_head(p);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t qi = w0 + g + 8 * r;
    const float sum = quad_sum(row_sum[r]);
    if (qi >= blk.query_rows(p)) continue;
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    T* orow = og + qi * p.out_strides.seq + 2 * t;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) Ops::store2(orow + i * 8, o[i][2 * r] * inv, o[i][2 * r + 1] * inv);
    if (t == 0) {
      p.lse[blk.lse_index(p, qi)] = sum > 0.f ? (row_max[r] + __log2f(sum)) * kLn2 : -INFINITY;
    }
  }
}

// kSeq: the general variant (SeqFwdBlock: KV cache, packed sequences, soft-capping), for the
// calls the other kernels do not take.
template <typename T, int D, bool kSeq = false>
__global__ void __launch_bounds__(FwdConfig<T, D>::kThreads)
    local_fwd_kernel(const LocalAttentionParams p, const int64_t q_tiles, const bool rows_aligned) {
  using Cfg = FwdConfig<T, D>;
  using Block = std::conditional_t<kSeq, SeqFwdBlock<T>, FwdBlock<T>>;
  using Ops = typename OpsFor<T>::type;
  constexpr int kBr = Cfg::kBr, kBc = Cfg::kBc, kLd = Cfg::kLd, kThreads = Cfg::kThreads;
  extern __shared__ __align__(16) unsigned char smem[];
  FwdTiles<T, D, kBr, kBc, kThreads, false> tiles(reinterpret_cast<T*>(smem));
  static_assert(decltype(tiles)::kLd == kLd && decltype(tiles)::kElems * sizeof(T) == Cfg::kSmem);
  const T* sQ = tiles.q;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const Block blk(p, blockIdx.x, q_tiles, kBr, kBc);
  if constexpr (kSeq) {
    if (blk.q0 >= blk.lq) return;  // past a shorter sequence's queries: nothing to store
  }
  tiles.start(p, blk, rows_aligned, tid);

  float o[D / 8][4];
  zero(o);
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
  const int64_t w0 = blk.q0 + warp * 16;  // this warp's first query
  int64_t w0_position = w0;              // ... and its key position
  if constexpr (kSeq) w0_position += blk.offset;
  typename Ops::A qf[Cfg::kQInRegs ? D / 16 : 1];

  for (int n = 0; n < blk.n_tiles; ++n) {
    tiles.next(p, blk, n, rows_aligned, tid);
    __syncthreads();
    const T* cK = tiles.k_stage(n);
    const T* cV = tiles.v_stage(n);
    if constexpr (Cfg::kQInRegs) {
      if (n == 0) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) Ops::load_a(qf[kk], sQ, kLd, warp * 16, kk * 16, lane);
      }
    }
    float s[kBc / 8][4];
    zero(s);
    if constexpr (Cfg::kQInRegs) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) mma_a_bt<Ops, kBc>(s, qf[kk], cK, kLd, kk * 16, lane);
    } else {
      mma_smem_bt<Ops, kBc, D>(s, sQ, kLd, warp * 16, cK, kLd, lane);
    }
    const int64_t k0 = blk.lo + static_cast<int64_t>(n) * kBc;
    if (kSeq && p.softcap > 0) {
      softmax_tile<kBc, D, kSeq>(s, o, row_max, row_sum, p, blk.keys, w0_position, k0, scale_log2,
                                 lane);
    } else {
      softmax_tile<kBc, D>(s, o, row_max, row_sum, p, blk.keys, w0_position, k0, scale_log2, lane);
    }
    mma_c_b<Ops, D, kBc>(o, s, cV, kLd, 0, lane);
    __syncthreads();  // the next iteration's prefetch overwrites this stage
  }
  if (blk.n_tiles == 0) cp_async_wait<0>();
  store_rows<Ops, T, D>(p, blk, o, row_max, row_sum, w0, lane);
}

// P (the unnormalised probabilities in s) as the register A operand of P V.
template <typename T, int kBc>
__device__ __forceinline__ void pack_probabilities(uint32_t (&pa)[kBc / 16][4],
                                                   const float (&s)[kBc / 8][4]) {
#pragma unroll
  for (int kk = 0; kk < kBc / 16; ++kk) {
    typename HalfOps<T>::A a;
    HalfOps<T>::a_from_c(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
    for (int e = 0; e < 4; ++e) pa[kk][e] = a.r[e];
  }
}

// The same algorithm on Hopper's warpgroup MMA (sm_90a), for 16-bit types and D in {64, 128}.
// The block is one warpgroup (4 warps, 64 queries, warp w owning rows 16w..16w+15, exactly the
// rows it owns above). Q, K, V tiles sit in the 128-byte swizzle layout; S = Q K^T reads Q and K
// from shared memory through descriptors, O += P V takes P from registers (the S accumulators
// re-packed, as above) and V, MN-major, from shared memory. Each wgmma reads its B tile once
// for 64 rows, where mma.sync re-reads it through ldmatrix for every 16 rows.
template <typename T, int D>
struct WgmmaFwdConfig {
  static constexpr int kThreads = 128, kBr = 64, kBc = 64;
  static constexpr size_t kSmem = 1024 + sizeof(T) * D * (kBr + 4 * kBc);  // + alignment slack
};

template <typename T, int D>
__global__ void __launch_bounds__(128)
    local_fwd_wgmma_kernel(const LocalAttentionParams p, const int64_t q_tiles,
                           const bool rows_aligned) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Cfg = WgmmaFwdConfig<T, D>;
  using Ops = HalfOps<T>;
  constexpr int kBr = Cfg::kBr, kBc = Cfg::kBc, kThreads = Cfg::kThreads;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // The swizzle pattern is a function of the shared address: atoms must be 1024-byte aligned.
  unsigned char* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  FwdTiles<T, D, kBr, kBc, kThreads, true> tiles(reinterpret_cast<T*>(smem));
  static_assert(decltype(tiles)::kElems * sizeof(T) + 1024 == Cfg::kSmem);
  const T* sQ = tiles.q;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const FwdBlock<T> blk(p, blockIdx.x, q_tiles, kBr, kBc);
  tiles.start(p, blk, rows_aligned, tid);

  float o[D / 8][4];
  zero(o);
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
  const int64_t w0 = blk.q0 + warp * 16;

  for (int n = 0; n < blk.n_tiles; ++n) {
    tiles.next(p, blk, n, rows_aligned, tid);
    fence_proxy_async();
    __syncthreads();
    const T* cK = tiles.k_stage(n);
    const T* cV = tiles.v_stage(n);

    float s[kBc / 8][4];
    wgmma_fence();
    wgmma_qk<T, D, kBc>(s, sQ, kBr * 64, cK, kBc * 64);
    wgmma_commit();
    wgmma_wait<0>();
    fence_accumulators(s);

    softmax_tile<kBc, D>(s, o, row_max, row_sum, p, blk.keys, w0,
                         blk.lo + static_cast<int64_t>(n) * kBc, scale_log2, lane);

    uint32_t pa[kBc / 16][4];
    pack_probabilities<T, kBc>(pa, s);
    wgmma_fence();
    wgmma_pv<T, D, kBc>(o, pa, cV);
    wgmma_commit();
    wgmma_wait<0>();
    fence_accumulators(o);
    __syncthreads();  // the next iteration's prefetch overwrites this stage
  }
  if (blk.n_tiles == 0) cp_async_wait<0>();
  store_rows<Ops, T, D>(p, blk, o, row_max, row_sum, w0, lane);
#else
  __trap();  // launched only where the sm_90a code is present (see use_wgmma)
#endif
}

// wgmma is used when this library was built for sm_90a, the device is a Hopper GPU, and
// FASTATTN_DISABLE_WGMMA is unset (a switch for comparing with the mma.sync kernel).
inline bool use_wgmma() {
#if defined(FASTATTN_SM90A)
  if (switch_set("FASTATTN_DISABLE_WGMMA")) return false;
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  return major == 9 && minor == 0;
#else
  return false;
#endif
}

template <typename Cfg, typename Kernel>
cudaError_t launch_fwd_kernel(Kernel kernel, const LocalAttentionParams& p, bool rows_aligned,
                              cudaStream_t stream) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(Cfg::kSmem));
  if (err != cudaSuccess) return err;
  const int64_t q_tiles = (grid_query_rows(p) + Cfg::kBr - 1) / Cfg::kBr;
  const int64_t blocks = q_tiles * p.batch * p.heads;
  kernel<<<static_cast<unsigned>(blocks), Cfg::kThreads, Cfg::kSmem, stream>>>(p, q_tiles,
                                                                             rows_aligned);
  return cudaGetLastError();
}

}  // namespace fastattn::cuda
