// Forward of sliding-window attention on Hopper (sm_90a), 16-bit types, D in {64, 128}:
// warp-specialized, TMA-fed, ping-pong scheduled (FlashAttention-3's schedule, for a band).
//
// A block of three warpgroups owns 128 queries of one (batch, head) at a time (persistent: it
// takes query tiles blockIdx.x, + gridDim.x, ...):
// - warpgroup 0 is the producer: one thread issues bulk tensor copies (TMA) of each K / V tile
//   of the band into a ring of kStages stages, each completing on its own mbarrier ("full"),
//   and reuses a stage once both consumers have released it ("empty"). Each query tile's Q is
//   loaded the same way: by that thread before the tile's K / V, into one buffer (v3g, the
//   default), or (kQWarp, FASTATTN_WS_FWD_Q_WARP=1; kernel-notes, v3h: not yet measured) by a
//   second warp into kQBuffers buffers (two at D = 64), so that the K / V stream never waits
//   for a Q buffer to be released. It gives its registers away (setmaxnreg) to the consumers.
// - warpgroups 1 and 2 are consumers, 64 queries each, over the same key tiles. Per tile n:
//   S = Q K_n^T and O += P_{n-1} V_{n-1} are issued together as wgmma, then the softmax of S_n
//   runs while those products are on the tensor cores (intra-warpgroup overlap). Two named
//   barriers make the consumers take turns issuing their products (ping-pong), so one's
//   softmax overlaps the other's matrix work.
// The band is [q0 - left, q0 + 127 + right] clipped to [0, key_lengths[b]), in tiles of kBc
// keys starting at its first key (the origin wastes nothing on the left edge). Tiles past L
// read zeros (TMA); keys past key_lengths are masked, and the V rows of the tile that holds
// that boundary are copied by the producer warp with zeros past it, so padding (whatever it
// holds, NaN included) never reaches the output. Same semantics, same output order and the
// same store code as the other forward kernels: deterministic.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cuda/hopper_sync.cuh"
#include "cuda/kernel_switches.h"
#include "cuda/local_fwd.cuh"
#include "cuda/phase_trace.cuh"
#include "cuda/tensor_map.h"
#include "cuda/wgmma.cuh"

namespace fastattn::cuda {

// kQWarp: Q loaded by its own producer warp into kQBuffers buffers (v3h,
// FASTATTN_WS_FWD_Q_WARP=1); false: by the K / V thread before the tile's K / V, into one buffer
// (v3g, the default until v3h is measured on a GPU).
template <typename T, int D, bool kQWarp = false>
struct WsFwdConfig {
  static constexpr int kThreads = 384, kBr = 128, kBc = 128;
  static constexpr int kStages = D == 64 ? 4 : 3;
  // A second Q buffer fits beside 4 stages at D = 64; at D = 128 it would cost the third stage.
  static constexpr int kQBuffers = kQWarp && D == 64 ? 2 : 1;
  static constexpr int kProducerRegs = 40, kConsumerRegs = 232;  // 128 * (40 + 2 * 232) <= 64K
  static constexpr int kTileBytes = kBc * D * static_cast<int>(sizeof(T));
  static constexpr int kQBytes = kBr * D * static_cast<int>(sizeof(T));
  // Q buffers, K stages, V stages, then the mbarriers; + 1024 bytes of alignment slack.
  static constexpr size_t kBarrierOffset = kQBuffers * kQBytes + 2 * kStages * kTileBytes;
  static constexpr size_t kSmem = 1024 + kBarrierOffset + 8 * (2 * kQBuffers + 3 * kStages);
  static_assert(kSmem <= 227 * 1024, "more shared memory than a Hopper block can have");
};

struct FwdTensorMaps {
  CUtensorMap q, k, v;
};

// The block's shared memory: Q, the K and V rings (D / 64 column blocks per tile, each rows x
// 128 bytes in the 128-byte swizzle layout), and the barriers.
template <typename T, int D, bool kQWarp>
struct WsFwdSmem {
  using Cfg = WsFwdConfig<T, D, kQWarp>;
  T* q;
  T* k;
  T* v;
  uint64_t* q_full;
  uint64_t* q_empty;
  uint64_t* k_full;
  uint64_t* v_full;
  uint64_t* empty;

  __device__ __forceinline__ explicit WsFwdSmem(unsigned char* base)
      : q(reinterpret_cast<T*>(base)),
        k(reinterpret_cast<T*>(base + Cfg::kQBuffers * Cfg::kQBytes)),
        v(reinterpret_cast<T*>(base + Cfg::kQBuffers * Cfg::kQBytes +
                               Cfg::kStages * Cfg::kTileBytes)),
        q_full(reinterpret_cast<uint64_t*>(base + Cfg::kBarrierOffset)),
        q_empty(q_full + Cfg::kQBuffers),
        k_full(q_full + 2 * Cfg::kQBuffers),
        v_full(k_full + Cfg::kStages),
        empty(v_full + Cfg::kStages) {}
  __device__ __forceinline__ T* k_stage(int s) const { return k + s * Cfg::kBc * D; }
  __device__ __forceinline__ T* v_stage(int s) const { return v + s * Cfg::kBc * D; }
  __device__ __forceinline__ T* q_buffer(int s) const { return q + s * Cfg::kBr * D; }
};

// The i-th query tile a block loads goes to buffer i % kQBuffers; its barriers' phase.
template <class Cfg>
__device__ __forceinline__ int q_slot(int i) { return i % Cfg::kQBuffers; }
template <class Cfg>
__device__ __forceinline__ uint32_t q_phase(int i) {
  return static_cast<uint32_t>((i / Cfg::kQBuffers) & 1);
}

// Where a block stands in its stream of work: K/V tiles through the ring so far (the ring's
// stage and phase continue from one query tile to the next) and Q tiles loaded so far.
struct WsProgress {
  int kv_tiles = 0;
  int q_tiles = 0;
};

// A query tile's Q, once the consumers are done with the tile that last used its buffer.
template <typename T, int D, bool kQWarp, class Block>
__device__ __forceinline__ void ws_produce_q(const FwdTensorMaps& maps, const Block& blk,
                                             const WsFwdSmem<T, D, kQWarp>& sm, WsProgress& at,
                                             int lane) {
  using Cfg = WsFwdConfig<T, D, kQWarp>;
  const int slot = q_slot<Cfg>(at.q_tiles);
  if (at.q_tiles >= Cfg::kQBuffers) {
    mbar_wait(&sm.q_empty[slot], q_phase<Cfg>(at.q_tiles - Cfg::kQBuffers));
  }
  if (lane == 0) {
    mbar_arrive_expect_tx(&sm.q_full[slot], Cfg::kQBytes);
#pragma unroll
    for (int cb = 0; cb < D / 64; ++cb) {
      tma_load_4d(sm.q_buffer(slot) + cb * Cfg::kBr * 64, &maps.q, &sm.q_full[slot], cb * 64,
                  static_cast<int>(blk.q_row(blk.q0)), static_cast<int>(blk.h),
                  static_cast<int>(blk.tensor_batch()));
    }
  }
  ++at.q_tiles;
}

// The K / V producer warp, for one query tile: every K / V tile of the band through the ring
// (and first the tile's Q, where no Q warp does that).
template <typename T, int D, bool kQWarp, class Block>
__device__ __forceinline__ void ws_produce(const LocalAttentionParams& p, const FwdTensorMaps& maps,
                                           const Block& blk, const WsFwdSmem<T, D, kQWarp>& sm,
                                           WsProgress& at, int lane) {
  using Cfg = WsFwdConfig<T, D, kQWarp>;
  constexpr int kBc = Cfg::kBc, kStages = Cfg::kStages;
  const int kvh = static_cast<int>(blk.kvh), b = static_cast<int>(blk.tensor_batch());
  if constexpr (!kQWarp) ws_produce_q<T, D, kQWarp>(maps, blk, sm, at, lane);
  for (int n = 0; n < blk.n_tiles; ++n, ++at.kv_tiles) {
    const int stage = at.kv_tiles % kStages;
    if (at.kv_tiles >= kStages) mbar_wait(&sm.empty[stage], ((at.kv_tiles / kStages) - 1) & 1);
    const int64_t k0 = blk.lo + static_cast<int64_t>(n) * kBc;
    T* ks = sm.k_stage(stage);
    T* vs = sm.v_stage(stage);
    if (lane == 0) {
      mbar_arrive_expect_tx(&sm.k_full[stage], Cfg::kTileBytes);
#pragma unroll
      for (int cb = 0; cb < D / 64; ++cb) {
        tma_load_4d(ks + cb * kBc * 64, &maps.k, &sm.k_full[stage], cb * 64,
                    static_cast<int>(blk.k_row(k0)), kvh, b);
      }
    }
    // Keys in [key_lengths[b], L) are real memory that TMA would read: the tile that holds
    // that boundary is copied here, zeros past it (masked K rows need no such care: their
    // scores are replaced, not multiplied).
    if (k0 + kBc > blk.keys && blk.keys_end_in_memory(p)) {
      constexpr int kChunks = D / 8;
      for (int c = lane; c < kBc * kChunks; c += 32) {
        const int r = c / kChunks, chunk = c % kChunks;
        const int64_t row = k0 + r;
        uint4 value = make_uint4(0, 0, 0, 0);
        if (row < blk.keys) {
          value = *reinterpret_cast<const uint4*>(blk.v + row * p.v_strides.seq + chunk * 8);
        }
        *reinterpret_cast<uint4*>(vs + chunk_offset<T, kBc, true>(r, chunk, 0)) = value;
      }
      fence_proxy_async();
      __syncwarp();
      if (lane == 0) mbar_arrive(&sm.v_full[stage]);
    } else if (lane == 0) {
      mbar_arrive_expect_tx(&sm.v_full[stage], Cfg::kTileBytes);
#pragma unroll
      for (int cb = 0; cb < D / 64; ++cb) {
        tma_load_4d(vs + cb * kBc * 64, &maps.v, &sm.v_full[stage], cb * 64,
                    static_cast<int>(blk.k_row(k0)), kvh, b);
      }
    }
  }
}

// One consumer warpgroup (wg 0 or 1: queries q0 + 64 wg ..) over one query tile: the pipelined
// loop over the band, then the store.
// kFoldScale: the softmax with scale and max in one FFMA (online_softmax), the default where the
// scale is positive (3-6% off the forward at D = 128: kernel-notes, v3e).
// The phases a consumer's time is split into by the trace build (FASTATTN_WS_FWD_TRACE): per
// round (key tile n >= 1) the wait for K_n, for its turn (the other consumer's products
// issued), S_n and P_{n-1} V_{n-1} issued (with the wait for V_{n-1} between them), S_n ready,
// the softmax, P V done, then the stage released and O rescaled; per query tile the first
// round, the last P V, and the store.
enum FwdPhase {
  kFwdWaitK,
  kFwdTurn,
  kFwdIssueS,
  kFwdWaitV,
  kFwdIssuePv,
  kFwdSReady,
  kFwdSoftmax,
  kFwdPvDone,
  kFwdRescale,
  kFwdFirst,
  kFwdLast,
  kFwdStore,
  kFwdPhases
};
template <bool kTrace>
using FwdTrace = PhaseTrace<kFwdPhases, kTrace>;

// kSoftcap (with the exact softmax only): soft-capped scores (the calls of SeqFwdBlock).
template <typename T, int D, bool kFoldScale, bool kQWarp, bool kTrace, int kChains,
          bool kSoftcap, class Block>
__device__ __forceinline__ void ws_consume(const LocalAttentionParams& p, const Block& blk,
                                           const WsFwdSmem<T, D, kQWarp>& sm, WsProgress& at,
                                           FwdTrace<kTrace>& trace, int wg, int tid) {
  using Cfg = WsFwdConfig<T, D, kQWarp>;
  constexpr int kBc = Cfg::kBc, kStages = Cfg::kStages, kQBlock = Cfg::kBr * 64;
  const int lane = tid & 31, warp = tid >> 5;
  const int64_t w0 = blk.q0 + 64 * wg + 16 * warp;  // this warp's first query
  const int64_t w0_position = w0 + blk.position_offset();  // ... and its key position
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
  const int q_buf = q_slot<Cfg>(at.q_tiles);
  const T* q = sm.q_buffer(q_buf) + wg * 64 * 64;
  float o[D / 8][4];
  zero(o);
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f}, correction[2];
  const int n_tiles = blk.n_tiles;
  if (n_tiles > 0) {
    // Ping-pong: consumer wg issues its products after bar 1 + wg and then lets the other go.
    const int self = 1 + wg, other = 2 - wg;
    const int first = at.kv_tiles;
    auto stage_of = [&](int n) { return (first + n) % kStages; };
    auto phase_of = [&](int n) { return static_cast<uint32_t>(((first + n) / kStages) & 1); };
    // Once S of the last tile is in registers, Q may be replaced by the next query tile's.
    auto release_q_after = [&](int n) {
      if (n == n_tiles - 1) {
        __syncwarp();
        if (lane == 0) mbar_arrive(&sm.q_empty[q_buf]);
      }
    };
    trace.mark(kFwdStore);  // the previous tile's store ends where this tile starts
    if (wg == 1) named_arrive(1, 256);
    mbar_wait(&sm.q_full[q_buf], q_phase<Cfg>(at.q_tiles));
    float s[kBc / 8][4];
    uint32_t pa[kBc / 16][4];

    mbar_wait(&sm.k_full[stage_of(0)], phase_of(0));
    named_sync(self, 256);
    wgmma_fence();
    wgmma_qk<T, D, kBc>(s, q, kQBlock, sm.k_stage(stage_of(0)), kBc * 64);
    wgmma_commit();
    named_arrive(other, 256);
    wgmma_wait<0>();
    fence_accumulators(s);
    release_q_after(0);
    online_softmax<kBc, kFoldScale, kChains, kSoftcap>(s, row_max, row_sum, correction, p,
                                                       blk.keys, w0_position, blk.lo, scale_log2,
                                                       lane);
    pack_probabilities<T, kBc>(pa, s);
    trace.mark(kFwdFirst);

    for (int n = 1; n < n_tiles; ++n) {
      const int stage = stage_of(n), prev = stage_of(n - 1);
      mbar_wait(&sm.k_full[stage], phase_of(n));
      trace.mark(kFwdWaitK);
      named_sync(self, 256);
      trace.mark(kFwdTurn);
      wgmma_fence();
      wgmma_qk<T, D, kBc>(s, q, kQBlock, sm.k_stage(stage), kBc * 64);
      wgmma_commit();
      trace.mark(kFwdIssueS);
      mbar_wait(&sm.v_full[prev], phase_of(n - 1));
      trace.mark(kFwdWaitV);
      wgmma_pv<T, D, kBc>(o, pa, sm.v_stage(prev));
      wgmma_commit();
      named_arrive(other, 256);
      trace.mark(kFwdIssuePv);
      wgmma_wait<1>();  // S_n is ready; P_{n-1} V_{n-1} may still run
      fence_accumulators(s);
      trace.mark(kFwdSReady);
      release_q_after(n);
      online_softmax<kBc, kFoldScale, kChains, kSoftcap>(
          s, row_max, row_sum, correction, p, blk.keys, w0_position,
          blk.lo + static_cast<int64_t>(n) * kBc, scale_log2, lane);
      trace.mark(kFwdSoftmax);
      wgmma_wait<0>();
      fence_accumulators(o);
      trace.mark(kFwdPvDone);
      __syncwarp();
      if (lane == 0) mbar_arrive(&sm.empty[prev]);  // this warp is done with K/V_{n-1}
      rescale_rows<D>(o, correction);
      pack_probabilities<T, kBc>(pa, s);
      trace.mark(kFwdRescale);
    }
    const int last = stage_of(n_tiles - 1);
    mbar_wait(&sm.v_full[last], phase_of(n_tiles - 1));
    named_sync(self, 256);
    wgmma_fence();
    wgmma_pv<T, D, kBc>(o, pa, sm.v_stage(last));
    wgmma_commit();
    // Consumer 1 arrived once ahead at the start: its last turn hands over nothing.
    if (wg == 0) named_arrive(other, 256);
    wgmma_wait<0>();
    fence_accumulators(o);
    __syncwarp();
    if (lane == 0) mbar_arrive(&sm.empty[last]);
    trace.mark(kFwdLast);
    at.kv_tiles += n_tiles;
    ++at.q_tiles;
    if constexpr (kFoldScale) {  // the store wants the max scaled, base 2
      row_max[0] *= scale_log2;
      row_max[1] *= scale_log2;
    }
  }
  store_rows<HalfOps<T>, T, D>(p, blk, o, row_max, row_sum, w0, lane);
}

// The trace build's report: for a few blocks spread over the grid, one line per consumer (its
// first warp) with the cycles per round of each loop phase and per query tile of the rest.
template <bool kTrace>
__device__ void print_fwd_trace(const FwdTrace<kTrace>& trace, int d, bool q_warp, int wg,
                                int tiles, int rounds, int tid) {
  if constexpr (kTrace) {
    if (tid != 0 || tiles == 0 || blockIdx.x % (gridDim.x / 4 + 1) != 0) return;
    const auto round = [&](int ph) { return rounds ? trace.sum[ph] / rounds : 0ull; };
    const auto tile = [&](int ph) { return trace.sum[ph] / tiles; };
    printf("ws_fwd trace D=%d qwarp %d block %u wg %d tiles %d rounds %d | cycles/round: waitK "
           "%llu turn %llu issueS %llu waitV %llu issuePV %llu S %llu softmax %llu PV %llu "
           "rescale %llu | cycles/tile: first %llu last %llu store %llu | total/round %llu\n",
           d, q_warp ? 1 : 0, blockIdx.x, wg, tiles, rounds, round(kFwdWaitK), round(kFwdTurn),
           round(kFwdIssueS), round(kFwdWaitV), round(kFwdIssuePv), round(kFwdSReady),
           round(kFwdSoftmax), round(kFwdPvDone), round(kFwdRescale), tile(kFwdFirst),
           tile(kFwdLast), tile(kFwdStore), rounds ? (trace.last - trace.first) / rounds : 0ull);
  }
}

// Persistent: each block walks the work items blockIdx.x, blockIdx.x + gridDim.x, ..., so the
// blocks resident at one time hold neighbouring query tiles of a head (their bands overlap in
// L2), and the producer loads the next tile's Q and K/V while the consumers store this one.
// kChains: the softmax's row max and sum in that many partial chains (v3i: 4; 1 is v3g).
// kSeq: the calls of SeqFwdBlock (KV cache, packed sequences), with kSoftcap where capped.
template <typename T, int D, bool kFoldScale, bool kQWarp, bool kTrace = false, int kChains = 1,
          bool kSeq = false, bool kSoftcap = false>
__global__ void __launch_bounds__(384, 1)
    local_fwd_ws_kernel(const __grid_constant__ LocalAttentionParams p,
                        const __grid_constant__ FwdTensorMaps maps, const int64_t q_tiles) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Cfg = WsFwdConfig<T, D, kQWarp>;
  using Block = std::conditional_t<kSeq, SeqFwdBlock<T>, FwdBlock<T>>;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // The swizzle pattern is a function of the shared address: atoms must be 1024-byte aligned.
  unsigned char* base = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  const WsFwdSmem<T, D, kQWarp> sm(base);
  const int warpgroup = threadIdx.x / 128, tid = threadIdx.x % 128;
  const int64_t work_items = q_tiles * p.batch * p.heads;
  if (threadIdx.x == 0) {
    tma_prefetch_descriptor(&maps.q);
    tma_prefetch_descriptor(&maps.k);
    tma_prefetch_descriptor(&maps.v);
    for (int s = 0; s < Cfg::kQBuffers; ++s) {
      mbar_init(&sm.q_full[s], 1);
      mbar_init(&sm.q_empty[s], 8);  // one arrival per consumer warp
    }
    for (int s = 0; s < Cfg::kStages; ++s) {
      mbar_init(&sm.k_full[s], 1);
      mbar_init(&sm.v_full[s], 1);
      mbar_init(&sm.empty[s], 8);
    }
    fence_barrier_init();
  }
  __syncthreads();
  WsProgress at;
  if (warpgroup == 0) {
    regs_decrease<Cfg::kProducerRegs>();
    // Warp 0 streams K / V (and Q, without kQWarp); warp 1 streams Q (kQWarp).
    if (tid < (kQWarp ? 64 : 32)) {
      for (int64_t work = blockIdx.x; work < work_items; work += gridDim.x) {
        const Block blk(p, work, q_tiles, Cfg::kBr, Cfg::kBc);
        if (blk.n_tiles > 0) {
          if (!kQWarp || tid < 32) {
            ws_produce<T, D, kQWarp>(p, maps, blk, sm, at, tid % 32);
          } else {
            ws_produce_q<T, D, kQWarp>(maps, blk, sm, at, tid % 32);
          }
        }
      }
    }
  } else {
    regs_increase<Cfg::kConsumerRegs>();
    FwdTrace<kTrace> trace;
    trace.start();
    int rounds = 0, tiles = 0;
    for (int64_t work = blockIdx.x; work < work_items; work += gridDim.x) {
      const Block blk(p, work, q_tiles, Cfg::kBr, Cfg::kBc);
      ws_consume<T, D, kFoldScale, kQWarp, kTrace, kChains, kSoftcap>(p, blk, sm, at, trace,
                                                                      warpgroup - 1, tid);
      rounds += blk.n_tiles > 1 ? blk.n_tiles - 1 : 0;
      tiles += blk.n_tiles > 0;
    }
    if constexpr (kTrace) {
      trace.mark(kFwdStore);
      print_fwd_trace(trace, D, kQWarp, warpgroup - 1, tiles, rounds, tid);
    }
  }
#else
  __trap();  // launched only where the sm_90a code is present (see use_wgmma)
#endif
}

// The warp-specialized kernel is the default where it applies; FASTATTN_DISABLE_WS=1 takes the
// one-warpgroup wgmma kernel instead (for comparison).
inline bool use_ws_forward() { return !switch_set("FASTATTN_DISABLE_WS"); }

// One launch of the persistent kernel: a block per SM at most, the shared memory of kQWarp's layout.
// kTrace: the trace build, kChains > 1: v3i's softmax (both with the folded softmax only).
// kSeq: the SeqFwdBlock kernel; kSoftcap: its soft-capped variant (exact softmax).
template <typename T, int D, bool kQWarp, bool kTrace = false, int kChains = 1, bool kSeq = false,
          bool kSoftcap = false>
cudaError_t launch_fwd_ws_kernel(const LocalAttentionParams& p, const FwdTensorMaps& maps,
                                 bool folds, cudaStream_t stream) {
  using Cfg = WsFwdConfig<T, D, kQWarp>;
  auto kernel = local_fwd_ws_kernel<T, D, false, kQWarp, false, 1, kSeq, kSoftcap>;
  if constexpr (kTrace || kChains > 1) {
    kernel = local_fwd_ws_kernel<T, D, true, kQWarp, kTrace, kChains>;
  } else if constexpr (!kSoftcap) {
    if (folds) kernel = local_fwd_ws_kernel<T, D, true, kQWarp, false, 1, kSeq>;
  }
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(Cfg::kSmem));
  if (err != cudaSuccess) return err;
  int device = 0, sms = 0;
  if ((err = cudaGetDevice(&device)) != cudaSuccess ||
      (err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess) {
    return err;
  }
  const int64_t q_tiles = (grid_query_rows(p) + Cfg::kBr - 1) / Cfg::kBr;
  const int64_t blocks = std::min<int64_t>(q_tiles * p.batch * p.heads, sms);
  kernel<<<static_cast<unsigned>(blocks), Cfg::kThreads, Cfg::kSmem, stream>>>(p, maps, q_tiles);
  return cudaGetLastError();
}

// Launches the warp-specialized forward if TMA can describe q, k and v; false otherwise.
// kSeq: for the calls of SeqFwdBlock (KV cache, packed sequences, soft-capping).
template <typename T, int D, bool kSeq = false>
bool launch_fwd_ws(const LocalAttentionParams& p, cudaStream_t stream, cudaError_t* err) {
  using Cfg = WsFwdConfig<T, D>;  // the tile shape does not depend on kQWarp
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  // A packed batch is one tensor batch of T rows; its batch stride (0) is never used, and any
  // non-zero one the copy engine accepts will do.
  const int64_t batches = p.cu_seqlens_q != nullptr ? 1 : p.batch;
  const auto strides = [&](TensorStrides s, int64_t rows) {
    if (batches == 1 && s.batch == 0) s.batch = rows * s.seq;
    return s;
  };
  FwdTensorMaps maps;
  if (!encode_head_map(&maps.q, p.q, kBf16, batches, p.heads, p.seq_len, D,
                       strides(p.q_strides, p.seq_len), Cfg::kBr) ||
      !encode_head_map(&maps.k, p.k, kBf16, batches, p.kv_heads, p.key_seq_len, D,
                       strides(p.k_strides, p.key_seq_len), Cfg::kBc) ||
      !encode_head_map(&maps.v, p.v, kBf16, batches, p.kv_heads, p.key_seq_len, D,
                       strides(p.v_strides, p.key_seq_len), Cfg::kBc)) {
    return false;
  }
  if constexpr (kSeq) {
    const bool folds = p.scale > 0.0 && p.softcap == 0 && !switch_set("FASTATTN_WS_FWD_EXACT");
    *err = p.softcap > 0 ? launch_fwd_ws_kernel<T, D, false, false, 1, true, true>(p, maps, false,
                                                                                    stream)
                         : launch_fwd_ws_kernel<T, D, false, false, 1, true>(p, maps, folds, stream);
    return true;
  }
  // The folded softmax needs a positive scale; FASTATTN_WS_FWD_EXACT=1 takes the exact one.
  // FASTATTN_WS_FWD_Q_WARP=1: Q by its own producer warp (v3h; the default once measured faster).
  const bool folds = p.scale > 0.0 && !switch_set("FASTATTN_WS_FWD_EXACT");
  const bool q_warp = switch_set("FASTATTN_WS_FWD_Q_WARP");
  // FASTATTN_WS_FWD_TRACE=1 prints where a round's time goes (bfloat16, folded softmax).
  if constexpr (kBf16) {
    if (folds && switch_set("FASTATTN_WS_FWD_TRACE")) {
      *err = q_warp ? launch_fwd_ws_kernel<T, D, true, true>(p, maps, folds, stream)
                    : launch_fwd_ws_kernel<T, D, false, true>(p, maps, folds, stream);
      return true;
    }
  }
  // FASTATTN_WS_FWD_CHAINS=1: the softmax's max and sum in 4 partial chains (v3i, not yet
  // measured; v3g's Q loading).
  if (folds && switch_set("FASTATTN_WS_FWD_CHAINS")) {
    *err = launch_fwd_ws_kernel<T, D, false, false, 4>(p, maps, folds, stream);
    return true;
  }
  *err = q_warp
             ? launch_fwd_ws_kernel<T, D, true>(p, maps, folds, stream)
             : launch_fwd_ws_kernel<T, D, false>(p, maps, folds, stream);
  return true;
}

}  // namespace fastattn::cuda
