// Backward of sliding-window attention on Hopper (sm_90a), 16-bit types, D in {64, 128}:
// wgmma products, a TMA producer and two consumer warpgroups (FlashAttention-3's backward, for
// a band).
//
// A block owns kBc = 128 keys of one (batch, head); consumer warpgroup w (w = 0, 1) owns keys
// k0 + 64 w .. k0 + 64 w + 63 and keeps their dK and dV (64 x D each) in registers for the whole
// band. K and V are copied once with cp.async, zeros past key_lengths, so padding (NaN
// included) never reaches dQ = dS K. One producer thread streams the query tiles that see any
// of the block's keys, kBq queries at a time, Q and dO by TMA (zeros past L) through a ring of
// kStages stages on mbarriers; the consumers copy each tile's lse (base 2) and delta into one of
// two small buffers a tile ahead. Per tile, in each consumer:
//   S^T = K Q^T and dP^T = V dO^T      shared-memory wgmma, issued together
//   P^T = exp2(S^T scale log2e - lse)  masked to the band;  dV += P^T dO   (P^T in registers)
//   dS^T = P^T (dP^T - delta);         dK += dS^T Q                        (dS^T in registers)
// dS^T also goes to shared memory (two buffers, alternating), and after one barrier between
// the consumers each computes half of dQ_tile = dS K (kBq x D: by query rows at D = 64 where
// kBq = 128, by columns of D at D = 128 where kBq = 64) and stages it in shared memory, while
// the rest of dK runs (half of dK's columns go before the barrier, half after dQ: kSplitDk); a
// writer warp of the producer warpgroup adds it into the float32 (B, H, L, D) scratch with one
// bulk reduce-add (TMA) per box, which the L2 applies far faster than per-thread atomics
// (kernel-notes: 30% of the kernel's time at D = 128). The additions land in no fixed order:
// dQ is not bitwise reproducible; dK and dV are. Under GQA, as in local_bwd.cuh, a block's dK
// and dV are its query head's share, summed per group by the torch glue.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <type_traits>

#include "cuda/hopper_sync.cuh"
#include "cuda/kernel_switches.h"
#include "cuda/local_bwd.cuh"
#include "cuda/local_fwd.cuh"
#include "cuda/phase_trace.cuh"
#include "cuda/tensor_map.h"
#include "cuda/wgmma.cuh"

namespace fastattn::cuda {

// How a consumer orders a tile's last products, and who adds its dQ half into the scratch.
// kOrder: kLockstep issues dK before the consumers' barrier and waits for everything after the
// dQ product, then stages dQ; kDkAfterDq issues dK after dQ (FlashAttention-3's order) and
// stages dQ while dK runs; kSplitDk (D = 128) issues half of dK's columns before the barrier and
// half after dQ, under the staging. kDqWriter: a warp of the producer warpgroup issues the
// reduce-adds, so a consumer only waits for its staging buffer to be free (a named barrier
// with that warp) instead of for its slowest warp.
enum class BwdOrder { kLockstep, kDkAfterDq, kSplitDk };
// kTrace: per-phase cycle counts of each consumer's first warp printed for a few blocks
// (FASTATTN_WS_BWD_TRACE, bfloat16, the default order; a development aid).
template <BwdOrder kOrder_, bool kDqWriter_, bool kTrace_ = false>
struct WsBwdSchedule {
  static constexpr BwdOrder kOrder = kOrder_;
  static constexpr bool kDqWriter = kDqWriter_, kTrace = kTrace_;
};
using WsBwdDefaultSchedule = WsBwdSchedule<BwdOrder::kSplitDk, true>;  // measured fastest

template <typename T, int D, class Schedule = WsBwdDefaultSchedule>
struct WsBwdConfig {
  static constexpr int kThreads = 384, kBc = 128;
  static constexpr int kBq = D == 64 ? 128 : 64;
  static constexpr int kStages = 2;  // 3 at D = 128 measured no faster (kernel-notes)
  static constexpr BwdOrder kOrder = D == 128 || Schedule::kOrder != BwdOrder::kSplitDk
                                         ? Schedule::kOrder
                                         : BwdOrder::kDkAfterDq;  // dK is 64 columns at D = 64
  static constexpr bool kDqWriter = Schedule::kDqWriter;
  // At D = 128, dV += P^T dO is issued as soon as P^T is packed and runs while dS^T is
  // formed. At D = 64 the S^T and dP^T accumulators are 64 x 128: keeping P^T packed beside
  // them spills, so dS^T is formed first and both register products are issued together.
  static constexpr bool kDvOverlap = D == 128;
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;  // 128 * (24 + 2 * 240) <= 64K
  static constexpr int kKvBytes = kBc * D * static_cast<int>(sizeof(T));
  static constexpr int kQBytes = kBq * D * static_cast<int>(sizeof(T));
  static constexpr int kDsBytes = kBc * kBq * static_cast<int>(sizeof(T));
  static constexpr int kDqBytes = 64 * 64 * static_cast<int>(sizeof(float));  // one consumer's
  // K, V, the Q and dO stages, two dS^T buffers, the two dQ halves, then lse and delta (two
  // tiles each), the mbarriers; + 1024 bytes of alignment slack. Every tile is a multiple of
  // 1024 bytes (the swizzle atom).
  static constexpr size_t kDqOffset = 2 * kKvBytes + 2 * kStages * kQBytes + 2 * kDsBytes;
  static constexpr size_t kStatsOffset = kDqOffset + 2 * kDqBytes;
  static constexpr size_t kBarrierOffset = kStatsOffset + 4 * kBq * sizeof(float);
  static constexpr size_t kSmem = 1024 + kBarrierOffset + 8 * 2 * kStages;
  static_assert(kBq * D == 2 * 64 * 64, "dQ_tile must split into one 64 x 64 half per consumer");
  static_assert(kSmem <= 227 * 1024, "more shared memory than a Hopper block can have");
};

struct BwdTensorMaps {
  CUtensorMap q, dout, dq;
};

// The block's shared memory. K, V (kBc rows), Q, dO (kBq rows) and dS^T (kBc rows of kBq
// queries) are D / 64 (kBq / 64) column blocks of rows x 128 bytes in the 128-byte swizzle; each
// consumer's dQ half is two boxes of 64 rows x 32 floats, also swizzled (bank-conflict free
// stores of the accumulator fragments).
template <typename T, int D, class Schedule>
struct WsBwdSmem {
  using Cfg = WsBwdConfig<T, D, Schedule>;
  T *k, *v, *q, *dout, *ds;
  float *dq, *lse, *delta;
  uint64_t *full, *empty;

  __device__ __forceinline__ explicit WsBwdSmem(unsigned char* base)
      : k(reinterpret_cast<T*>(base)),
        v(reinterpret_cast<T*>(base + Cfg::kKvBytes)),
        q(reinterpret_cast<T*>(base + 2 * Cfg::kKvBytes)),
        dout(reinterpret_cast<T*>(base + 2 * Cfg::kKvBytes + Cfg::kStages * Cfg::kQBytes)),
        ds(reinterpret_cast<T*>(base + 2 * Cfg::kKvBytes + 2 * Cfg::kStages * Cfg::kQBytes)),
        dq(reinterpret_cast<float*>(base + Cfg::kDqOffset)),
        lse(reinterpret_cast<float*>(base + Cfg::kStatsOffset)),
        delta(lse + 2 * Cfg::kBq),
        full(reinterpret_cast<uint64_t*>(base + Cfg::kBarrierOffset)),
        empty(full + Cfg::kStages) {}
  __device__ __forceinline__ T* q_stage(int s) const { return q + s * Cfg::kBq * D; }
  __device__ __forceinline__ T* do_stage(int s) const { return dout + s * Cfg::kBq * D; }
  __device__ __forceinline__ T* ds_buffer(int n) const {
    return ds + (n & 1) * Cfg::kBc * Cfg::kBq;
  }
  __device__ __forceinline__ float* dq_half(int wg) const { return dq + wg * 64 * 64; }
  __device__ __forceinline__ float* lse_of(int n) const { return lse + (n & 1) * Cfg::kBq; }
  __device__ __forceinline__ float* delta_of(int n) const { return delta + (n & 1) * Cfg::kBq; }
};

// The producer (one thread): every query tile of the band through the ring.
template <typename T, int D, class Schedule, class Block>
__device__ __forceinline__ void ws_bwd_produce(const BwdTensorMaps& maps, const Block& blk,
                                               const WsBwdSmem<T, D, Schedule>& sm) {
  using Cfg = WsBwdConfig<T, D, Schedule>;
  constexpr int kBq = Cfg::kBq, kStages = Cfg::kStages;
  const int h = static_cast<int>(blk.h), b = static_cast<int>(blk.tensor_batch());
  for (int n = 0; n < blk.n_tiles; ++n) {
    const int stage = n % kStages;
    if (n >= kStages) mbar_wait(&sm.empty[stage], ((n / kStages) - 1) & 1);
    const int i0 = static_cast<int>(blk.q_row(blk.qlo)) + n * kBq;
    mbar_arrive_expect_tx(&sm.full[stage], 2 * Cfg::kQBytes);
#pragma unroll
    for (int cb = 0; cb < D / 64; ++cb) {
      tma_load_4d(sm.q_stage(stage) + cb * kBq * 64, &maps.q, &sm.full[stage], cb * 64, i0, h, b);
      tma_load_4d(sm.do_stage(stage) + cb * kBq * 64, &maps.dout, &sm.full[stage], cb * 64, i0, h,
                  b);
    }
  }
}

// P^T of the warp's 16 keys (kw0 ..) x kBq queries (i0 ..) in place of S^T; element (key
// kw0 + g + 8 (e >> 1), query i0 + 8 i + 2 t + (e & 1)). lse: the tile's, base 2.
template <int kBq>
__device__ __forceinline__ void bwd_probabilities(float (&s)[kBq / 8][4], const float* lse,
                                                  const LocalAttentionParams& p, int64_t keys,
                                                  int64_t kw0, int64_t i0, float scale_log2,
                                                  int lane) {
  const int g = lane >> 2, t = lane & 3;
  const int64_t left = p.window_left, right = p.window_right;
  const bool interior = kw0 - (i0 + kBq - 1) >= -left && kw0 + 15 - i0 <= right && kw0 + 15 < keys;
  // In 32 bits, relative to the lane's first (key, query), as in the forward's online_softmax.
  const int rel = static_cast<int>(kw0 - i0) + g - 2 * t;
  const int64_t keys_left = keys - kw0;
  const int rows = static_cast<int>(keys_left < 16 ? keys_left : 16) - g;
  const int lo = -static_cast<int>(left), hi = static_cast<int>(right);
  // A branch, not a per-element select: an interior warp (most of a wide band's tiles) then
  // runs one FFMA and one exp2 per score instead of also computing the mask it does not need.
  if (interior) {
#pragma unroll
    for (int i = 0; i < kBq / 8; ++i) {
      const float2 l = *reinterpret_cast<const float2*>(lse + i * 8 + 2 * t);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[i][e] = exp2f(fmaf(s[i][e], scale_log2, -((e & 1) ? l.y : l.x)));
      }
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < kBq / 8; ++i) {
    const float2 l = *reinterpret_cast<const float2*>(lse + i * 8 + 2 * t);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float prob = exp2f(fmaf(s[i][e], scale_log2, -((e & 1) ? l.y : l.x)));
      const int d = rel + (e >> 1) * 8 - i * 8 - (e & 1);
      s[i][e] = d >= lo && d <= hi && (e >> 1) * 8 < rows ? prob : 0.f;
    }
  }
}

// Rows [first, kRows) of two swizzled (kRows x D) tiles set to zero by `threads` threads.
template <typename T, int D, int kRows>
__device__ __forceinline__ void zero_rows_from(T* a, T* b, int first, int tid, int threads) {
  constexpr int kChunks = D / 8;  // 16-byte chunks a row
  for (int c = tid; c < (kRows - first) * kChunks; c += threads) {
    const int r = first + c / kChunks, chunk = c % kChunks;
    const int at = chunk_offset<T, kRows, true>(r, chunk, 0);
    *reinterpret_cast<uint4*>(a + at) = make_uint4(0, 0, 0, 0);
    *reinterpret_cast<uint4*>(b + at) = make_uint4(0, 0, 0, 0);
  }
}

// dS^T (registers, A-fragment order: dsa[kk][2 j + r] holds row g + 8 r, columns 16 kk + 8 j
// + 2 t, + 1) into the swizzled (kBc rows x kBq queries) buffer, rows row0 .. row0 + 15.
template <typename T, int kBc, int kBq>
__device__ __forceinline__ void store_ds_transposed(T* ds, const uint32_t (&dsa)[kBq / 16][4],
                                                    int row0, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int kk = 0; kk < kBq / 16; ++kk)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int column_group = 2 * kk + j;  // 8 queries
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = row0 + g + 8 * r;
        const int chunk = (column_group % 8) ^ (row & 7);
        T* dst = ds + (column_group / 8) * kBc * 64 + row * 64 + (chunk << 3) + 2 * t;
        *reinterpret_cast<uint32_t*>(dst) = dsa[kk][2 * j + r];
      }
    }
}

// The accumulator fragments of one consumer's dQ half (64 x 64) into its two swizzled boxes
// (32 columns each): element (row, column) at box column / 32, row * 32 + 16-byte chunk
// ((column % 32) / 4) ^ (row % 8).
__device__ __forceinline__ void stage_dq_half(float* dq, const float (&acc)[8][4], int warp,
                                              int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = 16 * warp + g + 8 * r, chunk = 2 * (j % 4) + (t >> 1);
      float* dst = dq + (j / 4) * 64 * 32 + row * 32 + ((chunk ^ (row & 7)) << 2) + (t & 1) * 2;
      *reinterpret_cast<float2*>(dst) = make_float2(acc[j][2 * r], acc[j][2 * r + 1]);
    }
}

// The rows of a consumer's dQ half (accumulator fragments) from `valid` on set to 0: on a tile
// that runs past a sequence's last query, those rows are the next sequence's, and their dS^T is
// 0, but 0 x NaN (a non-finite K of this sequence) is NaN.
__device__ __forceinline__ void zero_dq_rows_from(float (&acc)[8][4], int valid, int warp,
                                                  int lane) {
  const int g = lane >> 2;
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (16 * warp + g + 8 * r >= valid) acc[j][2 * r] = acc[j][2 * r + 1] = 0.f;
    }
}

// Named barriers: 1 between the two consumers (dS^T in place); per consumer wg, 2 + wg among
// its own warps (no writer warp), or 2 + wg "dQ half staged" and 4 + wg "staging buffer free"
// between it and the writer warp (128 + 32 threads).
constexpr int kConsumerBarrier = 1, kWriterThreads = 160;
__device__ __forceinline__ int dq_staged_barrier(int wg) { return 2 + wg; }
__device__ __forceinline__ int dq_free_barrier(int wg) { return 4 + wg; }

// The two boxes of one consumer's dQ half (query rows i0 + 64 m_block .., columns
// 64 d_block ..) added into the float32 scratch from its staging buffer, as one bulk group;
// rows past L fall outside the head and are skipped by the copy engine.
__device__ __forceinline__ void reduce_add_dq_half(const CUtensorMap* map, const float* stage,
                                                   int64_t i0, int m_block, int d_block,
                                                   int head) {
  const int row = static_cast<int>(i0) + m_block * 64;
  tma_reduce_add_3d(map, stage, d_block * 64, row, head);
  tma_reduce_add_3d(map, stage + 64 * 32, d_block * 64 + 32, row, head);
  bulk_commit();
}

// This consumer's half of dQ_tile: query rows [64 m_block, + 64), columns [64 d_block, + 64)
// (by rows at D = 64 where kBq = 128, by columns at D = 128 where kBq = 64).
template <int kBq>
__device__ __forceinline__ int dq_m_block(int wg) { return kBq == 128 ? wg : 0; }
template <int kBq>
__device__ __forceinline__ int dq_d_block(int wg) { return kBq == 128 ? 0 : wg; }

// One consumer's half of a dQ tile on its way to the scratch: staged in shared memory once the
// previous tile's reduce-add has read the buffer, then added, by the leader thread or (kWriter)
// by the writer warp.
template <bool kWriter>
struct DqHalfAdder {
  const CUtensorMap* map;
  float* stage;
  int wg, m_block, d_block, head;
  bool leader;

  __device__ __forceinline__ void add(const float (&dq)[8][4], int64_t i0, int warp,
                                      int lane) const {
    if constexpr (kWriter) {
      named_sync(dq_free_barrier(wg), kWriterThreads);
      stage_dq_half(stage, dq, warp, lane);
      fence_proxy_async();
      named_arrive(dq_staged_barrier(wg), kWriterThreads);
    } else {
      if (leader) bulk_wait_read<0>();
      named_sync(dq_staged_barrier(wg), 128);
      stage_dq_half(stage, dq, warp, lane);
      fence_proxy_async();
      named_sync(dq_staged_barrier(wg), 128);
      if (leader) reduce_add_dq_half(map, stage, i0, m_block, d_block, head);
    }
  }
};

// The writer warp (kDqWriter): for every tile, both consumers' dQ halves as they are staged;
// a buffer is handed back as soon as its reduce-add has read it.
template <typename T, int D, class Schedule, class Block>
__device__ __forceinline__ void ws_bwd_write_dq(const BwdTensorMaps& maps, const Block& blk,
                                                const WsBwdSmem<T, D, Schedule>& sm, int lane) {
  constexpr int kBq = WsBwdConfig<T, D, Schedule>::kBq;
  if (blk.n_tiles == 0) return;
  const int head = static_cast<int>(blk.dq_head());
  named_arrive(dq_free_barrier(0), kWriterThreads);
  named_arrive(dq_free_barrier(1), kWriterThreads);
  for (int n = 0; n < blk.n_tiles; ++n) {
    const int64_t i0 = blk.q_row(blk.qlo) + static_cast<int64_t>(n) * kBq;  // a scratch row
#pragma unroll
    for (int wg = 0; wg < 2; ++wg) {
      named_sync(dq_staged_barrier(wg), kWriterThreads);
      if (lane == 0) {
        reduce_add_dq_half(&maps.dq, sm.dq_half(wg), i0, dq_m_block<kBq>(wg),
                           dq_d_block<kBq>(wg), head);
      }
    }
    // Each consumer's next staging waits for its buffer (one arrival per tile it stages).
    if (lane == 0) bulk_wait_read<1>();
    __syncwarp();
    if (n + 1 < blk.n_tiles) named_arrive(dq_free_barrier(0), kWriterThreads);
    if (lane == 0) bulk_wait_read<0>();
    __syncwarp();
    if (n + 1 < blk.n_tiles) named_arrive(dq_free_barrier(1), kWriterThreads);
  }
  if (lane == 0) bulk_wait<0>();
}

// One consumer warpgroup (wg 0 or 1) over the whole band, then the dK / dV store.
template <typename T, int D, class Schedule, class Block>
__device__ __forceinline__ void ws_bwd_consume(const LocalAttentionBwdParams& p,
                                               const BwdTensorMaps& maps, const Block& blk,
                                               const WsBwdSmem<T, D, Schedule>& sm, int wg,
                                               int tid) {
  using Cfg = WsBwdConfig<T, D, Schedule>;
  constexpr int kBc = Cfg::kBc, kBq = Cfg::kBq, kStages = Cfg::kStages;
  constexpr BwdOrder kOrder = Cfg::kOrder;
  constexpr int kConsumers = 256;
  const int lane = tid & 31, warp = tid >> 5, t = lane & 3;
  const int ctid = wg * 128 + tid;  // among the consumers
  const int64_t kw0 = blk.k0 + 64 * wg + 16 * warp;  // this warp's first key
  float dk[D / 8][4], dv[D / 8][4];
  zero(dk);
  zero(dv);
  if (blk.n_tiles > 0) {
    const T* kg = head_ptr<T>(p.k, p.k_strides, blk.tensor_batch(), blk.kvh) +
                  blk.k_row(0) * p.k_strides.seq;
    const T* vg = head_ptr<T>(p.v, p.v_strides, blk.tensor_batch(), blk.kvh) +
                  blk.k_row(0) * p.v_strides.seq;
    load_rows<T, D, kBc, kConsumers, true>(sm.k, 0, kg, p.k_strides.seq, blk.k0, blk.keys, true,
                                           ctid);
    load_rows<T, D, kBc, kConsumers, true>(sm.v, 0, vg, p.v_strides.seq, blk.k0, blk.keys, true,
                                           ctid);
    cp_async_commit();
    if (ctid < kBq) {
      const QueryStats first = blk.stats(p, blk.qlo + ctid);
      sm.lse_of(0)[ctid] = first.lse;
      sm.delta_of(0)[ctid] = first.delta;
    }
    cp_async_wait<0>();
    fence_proxy_async();  // the copies are read by wgmma (the async proxy)
    named_sync(kConsumerBarrier, kConsumers);
  }
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
  const T* k_rows = sm.k + wg * 64 * 64;  // this warpgroup's 64 keys of each column block
  const T* v_rows = sm.v + wg * 64 * 64;
  const int m_block = dq_m_block<kBq>(wg), d_block = dq_d_block<kBq>(wg);
  const DqHalfAdder<Cfg::kDqWriter> dq_adder{&maps.dq, sm.dq_half(wg), wg, m_block, d_block,
                                             static_cast<int>(blk.dq_head()), tid == 0};
  // wait for the stage, S^T ready, softmax (+ dV issued), dP^T ready, dS^T (stored, dK
  // issued), barrier, dQ ready, dQ staged, the tile's products done.
  enum Phase { kWaitStage, kS, kSoftmax, kDp, kDs, kBarrier, kDq, kStage, kDone, kPhases };
  PhaseTrace<kPhases, Schedule::kTrace> trace;
  trace.start();

  for (int n = 0; n < blk.n_tiles; ++n) {
    const int stage = n % kStages;
    const int64_t i0 = blk.qlo + static_cast<int64_t>(n) * kBq;
    // The next tile's lse and delta, stored before this tile's barrier (their buffer was last
    // read two tiles ago, before the previous barrier).
    const bool stats_loader = ctid < kBq && n + 1 < blk.n_tiles;
    const QueryStats next = stats_loader ? blk.stats(p, i0 + kBq + ctid) : QueryStats();
    mbar_wait(&sm.full[stage], (n / kStages) & 1);
    trace.mark(kWaitStage);
    const T* q = sm.q_stage(stage);
    const T* dout = sm.do_stage(stage);
    if (blk.overruns_queries(i0, kBq)) {
      // The tile's rows past the sequence's queries are another sequence's: P^T and dS^T are 0
      // there, but 0 x NaN is NaN in dV += P^T dO and dK += dS^T Q, so they become zeros first.
      zero_rows_from<T, D, kBq>(sm.q_stage(stage), sm.do_stage(stage), blk.overruns_from(i0),
                                ctid, kConsumers);
      fence_proxy_async();
      named_sync(kConsumerBarrier, kConsumers);
    }

    float s[kBq / 8][4], dp[kBq / 8][4];
    wgmma_fence();
    wgmma_qk<T, D, kBq>(s, k_rows, kBc * 64, q, kBq * 64);
    wgmma_commit();
    wgmma_qk<T, D, kBq>(dp, v_rows, kBc * 64, dout, kBq * 64);
    wgmma_commit();
    // S^T is ready; dP^T may still run (at D = 128: see kDvOverlap).
    wgmma_wait<Cfg::kDvOverlap ? 1 : 0>();
    fence_accumulators(s);
    trace.mark(kS);
    bwd_probabilities<kBq>(s, sm.lse_of(n), p, blk.keys, kw0, i0 + blk.position_offset(),
                           scale_log2, lane);
    uint32_t pa[kBq / 16][4];
    if constexpr (Cfg::kDvOverlap) {
      pack_probabilities<T, kBq>(pa, s);
      wgmma_fence();
      wgmma_pv<T, D, kBq>(dv, pa, dout);
      wgmma_commit();
      trace.mark(kSoftmax);
      wgmma_wait<1>();  // dP^T is ready; dV may still run
    }
    fence_accumulators(dp);
    trace.mark(kDp);

    const float* delta = sm.delta_of(n);
#pragma unroll
    for (int i = 0; i < kBq / 8; ++i) {
      const float2 dl = *reinterpret_cast<const float2*>(delta + i * 8 + 2 * t);
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[i][e] = s[i][e] * (dp[i][e] - ((e & 1) ? dl.y : dl.x));
    }
    if constexpr (!Cfg::kDvOverlap) pack_probabilities<T, kBq>(pa, s);
    uint32_t dsa[kBq / 16][4];
    pack_probabilities<T, kBq>(dsa, dp);
    store_ds_transposed<T, kBc, kBq>(sm.ds_buffer(n), dsa, 64 * wg + 16 * warp, lane);
    // dK += dS^T Q (the scale is applied once, at the store): all of it, half of its columns
    // or none of it before the barrier, the rest after the dQ product.
    float(&dk_lo)[8][4] = *reinterpret_cast<float(*)[8][4]>(&dk[0]);
    float(&dk_hi)[8][4] = *reinterpret_cast<float(*)[8][4]>(&dk[D / 8 - 8]);
    wgmma_fence();
    if constexpr (!Cfg::kDvOverlap) wgmma_pv<T, D, kBq>(dv, pa, dout);
    if constexpr (kOrder == BwdOrder::kLockstep) wgmma_pv<T, D, kBq>(dk, dsa, q);
    if constexpr (kOrder == BwdOrder::kSplitDk) wgmma_pv<T, 64, kBq>(dk_lo, dsa, q);
    wgmma_commit();
    if (stats_loader) {
      sm.lse_of(n + 1)[ctid] = next.lse;
      sm.delta_of(n + 1)[ctid] = next.delta;
    }
    // Both halves of dS^T in place (and, through the buffers' alternation, the dQ products of
    // two tiles ago done with the buffer this tile wrote).
    fence_proxy_async();
    trace.mark(kDs);
    named_sync(kConsumerBarrier, kConsumers);
    trace.mark(kBarrier);
    float dq[8][4];
    wgmma_fence();
    wgmma_mn_major<T, kBc>(dq, sm.ds_buffer(n) + m_block * kBc * 64, kBc, sm.k + d_block * kBc * 64,
                           kBc);
    wgmma_commit();
    // This warp is done with the stage once every product that read it is.
    auto release_stage = [&] {
      fence_accumulators(dk);
      fence_accumulators(dv);
      __syncwarp();
      if (lane == 0) mbar_arrive(&sm.empty[stage]);
    };
    auto drop_foreign_rows = [&] {
      if (blk.overruns_queries(i0, kBq)) {
        zero_dq_rows_from(dq, blk.overruns_from(i0) - 64 * m_block, warp, lane);
      }
    };
    if constexpr (kOrder == BwdOrder::kLockstep) {
      wgmma_wait<0>();
      fence_accumulators(dq);
      release_stage();
      drop_foreign_rows();
      dq_adder.add(dq, blk.q_row(i0), warp, lane);
    } else {
      if constexpr (kOrder == BwdOrder::kDkAfterDq) wgmma_pv<T, D, kBq>(dk, dsa, q);
      if constexpr (kOrder == BwdOrder::kSplitDk) wgmma_pv<T, 64, kBq>(dk_hi, dsa, q + kBq * 64);
      wgmma_commit();
      wgmma_wait<1>();  // dQ is ready; dK still runs while dQ is staged
      fence_accumulators(dq);
      trace.mark(kDq);
      drop_foreign_rows();
      dq_adder.add(dq, blk.q_row(i0), warp, lane);
      trace.mark(kStage);
      wgmma_wait<0>();
      release_stage();
      trace.mark(kDone);
    }
  }
  if constexpr (Schedule::kTrace) {
    // A few blocks spread over the grid (and the launch's waves), one line per consumer.
    if (tid == 0 && blk.n_tiles > 0 && blockIdx.x % (gridDim.x / 4 + 1) == 0) {
      const auto per = [&](int ph) { return trace.sum[ph] / blk.n_tiles; };
      printf("ws_bwd trace D=%d block %u wg %d tiles %d cycles/tile: wait %llu S %llu softmax "
             "%llu dP %llu dS %llu barrier %llu dQ %llu stage %llu done %llu | loop %llu\n",
             D, blockIdx.x, wg, blk.n_tiles, per(kWaitStage), per(kS), per(kSoftmax), per(kDp),
             per(kDs), per(kBarrier), per(kDq), per(kStage), per(kDone),
             (trace.last - trace.first) / blk.n_tiles);
    }
  }
  // The reduce-adds are done with shared memory before it goes (the writer warp waits itself).
  if (!Cfg::kDqWriter && tid == 0 && blk.n_tiles > 0) bulk_wait<0>();
  store_key_rows<HalfOps<T>, T, D>(p, blk, dk, dv, kw0, lane);
}

// kSeq: the calls of SeqBwdBlock (KV cache, packed sequences; not soft-capping).
template <typename T, int D, class Schedule, bool kSeq = false>
__global__ void __launch_bounds__(384, 1)
    local_bwd_ws_kernel(const __grid_constant__ LocalAttentionBwdParams p,
                        const __grid_constant__ BwdTensorMaps maps, const int64_t k_tiles) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Cfg = WsBwdConfig<T, D, Schedule>;
  using Block = std::conditional_t<kSeq, SeqBwdBlock, BwdBlock>;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // The swizzle pattern is a function of the shared address: atoms must be 1024-byte aligned.
  unsigned char* base = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  const WsBwdSmem<T, D, Schedule> sm(base);
  const int warpgroup = threadIdx.x / 128, tid = threadIdx.x % 128;
  const Block blk(p, blockIdx.x, k_tiles, Cfg::kBc, Cfg::kBq);
  if constexpr (kSeq) {
    if (blk.k0 >= blk.k_rows) return;  // past a shorter sequence's keys: nothing to store
  }
  if (threadIdx.x == 0) {
    tma_prefetch_descriptor(&maps.q);
    tma_prefetch_descriptor(&maps.dout);
    tma_prefetch_descriptor(&maps.dq);
    for (int s = 0; s < Cfg::kStages; ++s) {
      mbar_init(&sm.full[s], 1);   // the producer's arrival with the byte count
      mbar_init(&sm.empty[s], 8);  // one arrival per consumer warp
    }
    fence_barrier_init();
  }
  __syncthreads();
  if (warpgroup == 0) {
    regs_decrease<Cfg::kProducerRegs>();
    if (tid == 0) ws_bwd_produce<T, D, Schedule>(maps, blk, sm);
    if (Cfg::kDqWriter && tid / 32 == 1) ws_bwd_write_dq<T, D, Schedule>(maps, blk, sm, tid % 32);
  } else {
    regs_increase<Cfg::kConsumerRegs>();
    ws_bwd_consume<T, D, Schedule>(p, maps, blk, sm, warpgroup - 1, tid);
  }
#else
  __trap();  // launched only where the sm_90a code is present (see use_wgmma)
#endif
}

// The Hopper backward is the default where it applies; FASTATTN_DISABLE_WS_BWD=1 takes the
// mma.sync backward instead (for comparison).
inline bool use_ws_backward() { return !switch_set("FASTATTN_DISABLE_WS_BWD"); }

template <typename T, int D, class Schedule, bool kSeq = false>
cudaError_t launch_bwd_ws_kernel(const LocalAttentionBwdParams& p, const BwdTensorMaps& maps,
                                 cudaStream_t stream) {
  using Cfg = WsBwdConfig<T, D, Schedule>;
  auto kernel = local_bwd_ws_kernel<T, D, Schedule, kSeq>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(Cfg::kSmem));
  if (err != cudaSuccess) return err;
  // Key tiles per (sequence, head): of the longest sequence's keys in a packed batch.
  const int64_t key_rows = !kSeq ? p.seq_len
                           : p.cu_seqlens_k != nullptr ? p.max_seqlen_k
                                                       : p.key_seq_len;
  const int64_t k_tiles = (key_rows + Cfg::kBc - 1) / Cfg::kBc;
  kernel<<<static_cast<unsigned>(k_tiles * p.batch * p.heads), Cfg::kThreads, Cfg::kSmem, stream>>>(
      p, maps, k_tiles);
  return cudaGetLastError();
}

template <typename T, int D, bool kDqWriter>
cudaError_t launch_bwd_ws_order(BwdOrder order, const LocalAttentionBwdParams& p,
                                const BwdTensorMaps& maps, cudaStream_t stream) {
  switch (order) {
    case BwdOrder::kLockstep:
      return launch_bwd_ws_kernel<T, D, WsBwdSchedule<BwdOrder::kLockstep, kDqWriter>>(p, maps,
                                                                                      stream);
    case BwdOrder::kDkAfterDq:
      return launch_bwd_ws_kernel<T, D, WsBwdSchedule<BwdOrder::kDkAfterDq, kDqWriter>>(p, maps,
                                                                                       stream);
    default:
      return launch_bwd_ws_kernel<T, D, WsBwdSchedule<BwdOrder::kSplitDk, kDqWriter>>(p, maps,
                                                                                     stream);
  }
}

// Launches the Hopper backward if TMA can describe q, grad_out and the dQ scratch; false
// otherwise. The schedule is WsBwdDefaultSchedule unless switches name another (for
// comparison): FASTATTN_WS_BWD_LOCKSTEP or FASTATTN_WS_BWD_DK_AFTER_DQ (the order),
// FASTATTN_WS_BWD_NO_DQ_WRITER (the consumers' leaders issue the reduce-adds);
// FASTATTN_WS_BWD_TRACE prints per-phase cycle counts (bfloat16, the default schedule).
// kSeq: for the calls of SeqBwdBlock (KV cache, packed sequences), in the default schedule.
template <typename T, int D, bool kSeq = false>
bool launch_bwd_ws(const LocalAttentionBwdParams& p, float* dq_accum, cudaStream_t stream,
                   cudaError_t* err) {
  using Cfg = WsBwdConfig<T, D>;  // kBq does not depend on the schedule
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  // A packed batch is one tensor batch of T rows; its batch stride (0) is never used, and any
  // non-zero one the copy engine accepts will do.
  const int64_t batches = p.cu_seqlens_q != nullptr ? 1 : p.batch;
  const auto strides = [&](TensorStrides s) {
    if (batches == 1 && s.batch == 0) s.batch = p.seq_len * s.seq;
    return s;
  };
  BwdTensorMaps maps;
  if (!encode_head_map(&maps.q, p.q, kBf16, batches, p.heads, p.seq_len, D,
                       strides(p.q_strides), Cfg::kBq) ||
      !encode_head_map(&maps.dout, p.grad_out, kBf16, batches, p.heads, p.seq_len, D,
                       strides(p.grad_out_strides), Cfg::kBq) ||
      !encode_dq_map(&maps.dq, dq_accum, batches * p.heads, p.seq_len, D, 64)) {
    return false;
  }
  if constexpr (kSeq) {
    *err = launch_bwd_ws_kernel<T, D, WsBwdDefaultSchedule, true>(p, maps, stream);
    return true;
  }
  using Order = BwdOrder;
  const Order order = switch_set("FASTATTN_WS_BWD_LOCKSTEP")      ? Order::kLockstep
                      : switch_set("FASTATTN_WS_BWD_DK_AFTER_DQ") ? Order::kDkAfterDq
                                                                  : WsBwdDefaultSchedule::kOrder;
  const bool writer =
      WsBwdDefaultSchedule::kDqWriter && !switch_set("FASTATTN_WS_BWD_NO_DQ_WRITER");
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    if (switch_set("FASTATTN_WS_BWD_TRACE")) {
      *err = launch_bwd_ws_kernel<T, D, WsBwdSchedule<BwdOrder::kSplitDk, true, true>>(p, maps,
                                                                                      stream);
      return true;
    }
  }
  *err = writer ? launch_bwd_ws_order<T, D, true>(order, p, maps, stream)
                : launch_bwd_ws_order<T, D, false>(order, p, maps, stream);
  return true;
}

}  // namespace fastattn::cuda
