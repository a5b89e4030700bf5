// CUDA kernels of clustering and clustered attention (see csrc/clustered_torch.h for the
// stages). Layout choices:
// - k-means: one thread per query, centroids staged in shared memory; bit votes are summed
//   in shared memory per block and flushed with one global atomic per (cluster, bit), so
//   global atomics scale with blocks, not queries. Integer sums: the result is deterministic.
// - centroid rows (B*H*C rows of L scores): one block per row; the top-k is a 4-pass radix
//   select on order-preserving integer keys, then an ordered compaction, so the selection
//   is exact (ties to the lower key index) and written in ascending key order.
// - queries: one block per cluster, a warp per member query; lanes split the cluster's
//   top-k keys for the scores and the head dim for the outputs. Members of a cluster share
//   their top-k keys, so those rows stay in L1. In the backward, a single warp owns a
//   cluster and sums its key / value gradients in shared memory before one atomic flush.
// Floating sums run in a fixed order (fixed thread assignment and reduction trees), so the
// forward is deterministic; the backward's key / value flush uses float atomics.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cstdint>

#include "cuda/clustered_cuda.h"

namespace fastattn::cuda::clustered {
namespace {

constexpr int kWarp = 32;
constexpr int kDPerLane = kMaxHeadDim / kWarp;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename T>
__device__ __forceinline__ const T* row_of(const void* base, const TensorStrides& s, int64_t b,
                                           int64_t h, int64_t i) {
  return static_cast<const T*>(base) + b * s.batch + h * s.head + i * s.seq;
}

__device__ __forceinline__ int64_t valid_length(const int32_t* lengths, int64_t b, int64_t L) {
  if (lengths == nullptr) return L;
  const int64_t n = lengths[b];
  return n < 0 ? 0 : (n > L ? L : n);
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int o = kWarp / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
  for (int o = kWarp / 2; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// Block-wide reductions and scans with a fixed tree: deterministic. `scratch` holds 32 slots.
template <typename Op>
__device__ float block_reduce(float x, float* scratch, Op op) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = (blockDim.x + kWarp - 1) / kWarp;
  for (int o = kWarp / 2; o > 0; o >>= 1) x = op(x, __shfl_xor_sync(0xffffffffu, x, o));
  __syncthreads();
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  float total = scratch[0];
  for (int w = 1; w < warps; ++w) total = op(total, scratch[w]);
  return total;
}

__device__ int block_exclusive_scan(int x, int* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = (blockDim.x + kWarp - 1) / kWarp;
  int inclusive = x;
  for (int o = 1; o < kWarp; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, inclusive, o);
    if (lane >= o) inclusive += y;
  }
  __syncthreads();
  if (lane == kWarp - 1) scratch[warp] = inclusive;
  __syncthreads();
  int before = 0;
  for (int w = 0; w < warp; ++w) before += scratch[w];
  (void)warps;
  return before + inclusive - x;
}

// ---- clustering ----------------------------------------------------------------------------

constexpr int kHashThreads = 128;

// Bit t of a query's hash is set iff <q, normal_t> > bias_t; planes are staged transposed
// ([d][t]) so that every thread of the block reads the same word (a broadcast). Products and
// sums are rounded separately, in order over d (no fused multiply-add), as the CPU kernel
// computes them on x86-64: both devices hash alike and so cluster alike.
template <typename T>
__global__ void hash_kernel(ClusterParams p) {
  extern __shared__ float planes_t[];  // (D + 1) x bits
  const int64_t D = p.head_dim, bits = p.bits, L = p.seq_len;
  for (int64_t e = threadIdx.x; e < bits * (D + 1); e += blockDim.x) {
    const int64_t t = e / (D + 1), d = e % (D + 1);
    planes_t[d * bits + t] = p.planes[e];
  }
  __syncthreads();
  const int64_t bh = blockIdx.y, i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  if (i >= valid_length(p.query_lengths, b, L)) return;
  const T* q = row_of<T>(p.q, p.q_strides, b, h, i);
  float acc[64];
#pragma unroll
  for (int t = 0; t < 64; ++t) acc[t] = 0.f;
  for (int64_t d = 0; d < D; ++d) {
    const float x = to_float(q[d]);
    const float* plane = planes_t + d * bits;
#pragma unroll
    for (int t = 0; t < 64; ++t) {
      if (t < bits) acc[t] = __fadd_rn(acc[t], __fmul_rn(x, plane[t]));
    }
  }
  uint64_t code = 0;
  const float* bias = planes_t + D * bits;
#pragma unroll
  for (int t = 0; t < 64; ++t) {
    if (t < bits) code |= static_cast<uint64_t>(acc[t] > bias[t]) << t;
  }
  p.hashes[bh * L + i] = code;
}

__global__ void init_centroids_kernel(ClusterParams p) {
  const int64_t C = p.clusters, L = p.seq_len;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= p.batch * p.heads * C) return;
  const int64_t bh = e / C, c = e % C;
  const int64_t n = valid_length(p.query_lengths, bh / p.heads, L);
  if (n == 0) return;
  const int64_t i = c < n ? c : reseed_query(static_cast<uint64_t>(*p.seed), bh, 0, c, n);
  p.centroids[e] = p.hashes[bh * L + i];
}

constexpr int kAssignThreads = 512;
constexpr int kAssignPerThread = 2;
constexpr int kCentroidTile = 2048;

// One k-means assignment. update: count members and bit votes for the next centroids;
// otherwise (the last assignment): write labels (-1 past query_lengths) and member counts.
__global__ void assign_kernel(ClusterParams p, bool update, bool votes_in_shared) {
  extern __shared__ unsigned char assign_smem[];
  uint64_t* tile = reinterpret_cast<uint64_t*>(assign_smem);
  int32_t* s_members = reinterpret_cast<int32_t*>(tile + kCentroidTile);
  int32_t* s_ones = s_members + p.clusters;
  const int64_t C = p.clusters, L = p.seq_len, bits = p.bits;
  const int64_t bh = blockIdx.y, b = bh / p.heads;
  const int64_t n = valid_length(p.query_lengths, b, L);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kAssignThreads * kAssignPerThread;
  if (votes_in_shared) {
    for (int64_t e = threadIdx.x; e < C * (1 + (update ? bits : 0)); e += blockDim.x) {
      s_members[e] = 0;
    }
  }
  uint64_t code[kAssignPerThread];
  int best[kAssignPerThread], best_distance[kAssignPerThread];
#pragma unroll
  for (int u = 0; u < kAssignPerThread; ++u) {
    const int64_t i = first + u * kAssignThreads + threadIdx.x;
    code[u] = i < n ? p.hashes[bh * L + i] : 0;
    best[u] = 0;
    best_distance[u] = 65;
  }
  const bool any = first < n;
  for (int64_t c0 = 0; any && c0 < C; c0 += kCentroidTile) {
    const int count = static_cast<int>(C - c0 < kCentroidTile ? C - c0 : kCentroidTile);
    __syncthreads();
    for (int c = threadIdx.x; c < count; c += blockDim.x) tile[c] = p.centroids[bh * C + c0 + c];
    __syncthreads();
    for (int c = 0; c < count; ++c) {
      const uint64_t centroid = tile[c];
#pragma unroll
      for (int u = 0; u < kAssignPerThread; ++u) {
        const int distance = __popcll(code[u] ^ centroid);
        if (distance < best_distance[u]) {  // strict: ties keep the lower cluster
          best_distance[u] = distance;
          best[u] = static_cast<int>(c0 + c);
        }
      }
    }
  }
  __syncthreads();
  int32_t* members = votes_in_shared ? s_members : p.members + bh * C;
  int32_t* ones = votes_in_shared ? s_ones : p.ones + bh * C * bits;
#pragma unroll
  for (int u = 0; u < kAssignPerThread; ++u) {
    const int64_t i = first + u * kAssignThreads + threadIdx.x;
    if (i >= L) continue;
    if (!update) p.labels[bh * L + i] = i < n ? best[u] : -1;
    if (i >= n) continue;
    atomicAdd(members + best[u], 1);
    if (update) {
      for (uint64_t rest = code[u]; rest != 0; rest &= rest - 1) {
        atomicAdd(ones + best[u] * bits + (__ffsll(static_cast<long long>(rest)) - 1), 1);
      }
    }
  }
  if (!votes_in_shared || !any) return;
  __syncthreads();
  for (int64_t e = threadIdx.x; e < C; e += blockDim.x) {
    if (s_members[e] != 0) atomicAdd(p.members + bh * C + e, s_members[e]);
  }
  for (int64_t e = threadIdx.x; update && e < C * bits; e += blockDim.x) {
    if (s_ones[e] != 0) atomicAdd(p.ones + bh * C * bits + e, s_ones[e]);
  }
}

// Majority vote per bit (a tie gives 0); an empty cluster restarts at a random valid query.
// Clears the votes for the next assignment.
__global__ void update_kernel(ClusterParams p, int64_t round) {
  const int64_t C = p.clusters, L = p.seq_len, bits = p.bits;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= p.batch * p.heads * C) return;
  const int64_t bh = e / C, c = e % C;
  const int64_t n = valid_length(p.query_lengths, bh / p.heads, L);
  const int32_t members = p.members[e];
  int32_t* ones = p.ones + e * bits;
  if (n > 0) {
    if (members == 0) {
      const int64_t i = reseed_query(static_cast<uint64_t>(*p.seed), bh, round, c, n);
      p.centroids[e] = p.hashes[bh * L + i];
    } else {
      uint64_t code = 0;
      for (int64_t bit = 0; bit < bits; ++bit) {
        code |= static_cast<uint64_t>(2 * ones[bit] > members) << bit;
      }
      p.centroids[e] = code;
    }
  }
  p.members[e] = 0;
  for (int64_t bit = 0; bit < bits; ++bit) ones[bit] = 0;
}

__global__ void counts_kernel(ClusterParams p) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e < p.batch * p.heads * p.clusters) p.counts[e] = p.members[e];
}

// ---- per-cluster aggregation ---------------------------------------------------------------

// dst[bh, c] = factor * (mean or sum) of the members' rows; threads (d, slice): slice s sums
// members s, s + slices, ... in order, then slices are added in order.
template <typename T>
__global__ void aggregate_kernel(ClusteredParams<float> p, const void* x, TensorStrides st,
                                 float* dst, float factor, bool mean) {
  extern __shared__ float partial[];  // slices x D
  const int64_t C = p.clusters, L = p.seq_len, D = p.head_dim;
  const int64_t c = blockIdx.x, bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
  const int32_t* offsets = p.offsets + bh * (C + 2);
  const int32_t* perm = p.perm + bh * L;
  const int begin = offsets[c], end = offsets[c + 1];
  const int slices = blockDim.y, slice = threadIdx.y;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float sum = 0.f;
    for (int m = begin + slice; m < end; m += slices) {
      sum += to_float(row_of<T>(x, st, b, h, perm[m])[d]);
    }
    partial[slice * D + d] = sum;
  }
  __syncthreads();
  if (slice != 0) return;
  const int count = end - begin;
  const float f = mean && count > 0 ? factor / static_cast<float>(count) : factor;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float sum = 0.f;
    for (int s = 0; s < slices; ++s) sum += partial[s * D + d];
    dst[(bh * C + c) * D + d] = f * sum;
  }
}

// ---- centroid rows -------------------------------------------------------------------------

constexpr int kRowThreads = 256;

// Float -> unsigned key with the same order (negative floats reversed; -0 counts as +0, so
// that it ties with +0 as the float comparison does).
__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t u = f == 0.f ? 0u : __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__global__ void __launch_bounds__(kRowThreads) rows_forward_kernel(ClusteredParams<float> p) {
  __shared__ float fscratch[32];
  __shared__ int iscratch[32];
  __shared__ unsigned hist[256];
  __shared__ uint32_t s_prefix;
  __shared__ int s_remaining;
  const int64_t L = p.seq_len, K = p.topk, C = p.clusters;
  const int64_t r = blockIdx.x;
  const int64_t valid = valid_length(p.key_lengths, r / (p.heads * C), L);
  float* s = p.scores + r * L;
  int32_t* top = p.topk_idx + r * K;
  const int tid = threadIdx.x;
  if (valid == 0) {
    for (int64_t j = tid; j < L; j += blockDim.x) s[j] = 0.f;
    for (int64_t t = tid; t < K; t += blockDim.x) top[t] = -1;
    if (tid == 0) {
      p.centroid_lse[r] = -INFINITY;
      p.mass[r] = 0.f;
    }
    return;
  }
  float m = -INFINITY;
  for (int64_t j = tid; j < valid; j += blockDim.x) m = fmaxf(m, s[j]);
  m = block_reduce(m, fscratch, [](float a, float b) { return fmaxf(a, b); });
  float sum = 0.f;
  for (int64_t j = tid; j < valid; j += blockDim.x) sum += __expf(s[j] - m);
  sum = block_reduce(sum, fscratch, [](float a, float b) { return a + b; });
  const float lse = m + __logf(sum);

  const int64_t kk = K < valid ? K : valid;
  const bool select_all = kk == valid;
  uint32_t threshold = 0;
  int take_equal = 0;
  if (kk > 0 && !select_all) {
    // Radix select of the kk-th largest key, 8 bits at a time from the top.
    uint32_t prefix = 0, mask = 0;
    int remaining = static_cast<int>(kk);
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int e = tid; e < 256; e += blockDim.x) hist[e] = 0;
      __syncthreads();
      for (int64_t j = tid; j < valid; j += blockDim.x) {
        const uint32_t u = order_key(s[j]);
        if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 255u], 1u);
      }
      __syncthreads();
      if (tid == 0) {
        int above = 0;
        for (int bin = 255; bin >= 0; --bin) {
          if (above + static_cast<int>(hist[bin]) >= remaining) {
            s_prefix = prefix | (static_cast<uint32_t>(bin) << shift);
            s_remaining = remaining - above;
            break;
          }
          above += hist[bin];
        }
      }
      __syncthreads();
      prefix = s_prefix;
      remaining = s_remaining;
      mask |= 255u << shift;
    }
    threshold = prefix;
    take_equal = remaining;
  }
  // Ordered compaction over contiguous chunks: keys above the threshold, and the first
  // take_equal keys equal to it (lowest indices), in ascending key order.
  const int64_t chunk = (valid + blockDim.x - 1) / blockDim.x;
  const int64_t j0 = tid * chunk, j1 = j0 + chunk < valid ? j0 + chunk : valid;
  int above = 0, equal = 0;
  if (kk > 0 && !select_all) {
    for (int64_t j = j0; j < j1; ++j) {
      const uint32_t u = order_key(s[j]);
      above += u > threshold;
      equal += u == threshold;
    }
  }
  const int equal_before = block_exclusive_scan(equal, iscratch);
  int take = equal_before >= take_equal ? 0 : min(equal, take_equal - equal_before);
  const int picked = select_all ? static_cast<int>(j1 > j0 ? j1 - j0 : 0) : above + take;
  int position = block_exclusive_scan(kk > 0 ? picked : 0, iscratch);
  float mass = 0.f;
  for (int64_t j = j0; j < j1; ++j) {
    const float prob = __expf(s[j] - lse);
    bool chosen = false;
    if (kk > 0) {
      if (select_all) {
        chosen = true;
      } else {
        const uint32_t u = order_key(s[j]);
        chosen = u > threshold || (u == threshold && take-- > 0);
      }
    }
    if (chosen) {
      top[position++] = static_cast<int32_t>(j);
      mass += prob;
    }
    s[j] = chosen ? 0.f : prob;
  }
  for (int64_t j = valid + tid; j < L; j += blockDim.x) s[j] = 0.f;
  for (int64_t t = kk + tid; t < K; t += blockDim.x) top[t] = -1;
  mass = block_reduce(mass, fscratch, [](float a, float b) { return a + b; });
  if (tid == 0) {
    p.centroid_lse[r] = lse;
    p.mass[r] = mass;
  }
}

// Softmax backward of a centroid row: upstream gradient grad_probs_j off the top-k,
// grad_mass on it. Top-k membership is a bitmask in shared memory.
__global__ void __launch_bounds__(kRowThreads) rows_backward_kernel(ClusteredParams<float> p) {
  extern __shared__ uint32_t in_top[];
  __shared__ float fscratch[32];
  const int64_t L = p.seq_len, K = p.topk, C = p.clusters;
  const int64_t r = blockIdx.x;
  const int64_t valid = valid_length(p.key_lengths, r / (p.heads * C), L);
  float* s = p.scores + r * L;
  float* rest = p.probs_rest + r * L;
  const float* g = p.grad_probs + r * L;
  const int32_t* top = p.topk_idx + r * K;
  const int tid = threadIdx.x;
  for (int64_t w = tid; w < (L + 31) / 32; w += blockDim.x) in_top[w] = 0;
  __syncthreads();
  for (int64_t t = tid; t < K; t += blockDim.x) {
    const int32_t j = top[t];
    if (j >= 0) atomicOr(in_top + (j >> 5), 1u << (j & 31));
  }
  __syncthreads();
  const float lse = p.centroid_lse[r], dm = p.grad_mass[r];
  auto member = [&](int64_t j) { return (in_top[j >> 5] >> (j & 31)) & 1u; };
  float delta = 0.f;
  for (int64_t j = tid; j < valid; j += blockDim.x) {
    delta += __expf(s[j] - lse) * (member(j) ? dm : g[j]);
  }
  delta = block_reduce(delta, fscratch, [](float a, float b) { return a + b; });
  for (int64_t j = tid; j < L; j += blockDim.x) {
    if (j < valid) {
      const float prob = __expf(s[j] - lse);
      const bool on_top = member(j);
      s[j] = prob * ((on_top ? dm : g[j]) - delta);
      rest[j] = on_top ? 0.f : prob;
    } else {
      s[j] = 0.f;
      rest[j] = 0.f;
    }
  }
}

// ---- per-query kernels ---------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float dot_row(const float* x, const T* y, int64_t D) {
  float acc = 0.f;
  for (int64_t d = 0; d < D; ++d) acc += x[d] * to_float(y[d]);
  return acc;
}

// Number of real entries of a -1-padded top-k list, by one warp.
__device__ __forceinline__ int64_t top_count(const int32_t* top, int64_t K) {
  const int lane = threadIdx.x % kWarp;
  int64_t n = 0;
  for (int64_t t0 = 0; t0 < K; t0 += kWarp) {
    const bool real = t0 + lane < K && top[t0 + lane] >= 0;
    const int count = __popc(__ballot_sync(0xffffffffu, real));
    n += count;
    if (count < kWarp) break;
  }
  return n;
}

struct Cluster {
  int64_t bh, b, h, c, row, begin, end;
};

__device__ __forceinline__ Cluster cluster_of_block(const ClusteredParams<float>& p) {
  Cluster k;
  k.c = blockIdx.x;
  k.bh = blockIdx.y;
  k.b = k.bh / p.heads;
  k.h = k.bh % p.heads;
  k.row = k.bh * p.clusters + k.c;
  const int32_t* offsets = p.offsets + k.bh * (p.clusters + 2);
  k.begin = offsets[k.c];
  k.end = offsets[k.c + 1];
  return k;
}

template <typename T>
__device__ __forceinline__ void load_scaled(float* dst, const T* src, int64_t D, float f) {
  for (int64_t d = threadIdx.x % kWarp; d < D; d += kWarp) dst[d] = f * to_float(src[d]);
}

constexpr int kForwardWarps = 4;

// Block (cluster c or the padding slot C, head row bh); warps take the members in turn.
template <typename T>
__global__ void __launch_bounds__(kForwardWarps * kWarp) query_forward_kernel(ClusteredParams<float> p) {
  extern __shared__ float q_smem[];  // kForwardWarps x D
  const Cluster k = cluster_of_block(p);
  const int64_t L = p.seq_len, D = p.head_dim, K = p.topk;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  float* qs = q_smem + warp * D;
  const bool padding = k.c == p.clusters;
  const int32_t* top = padding ? nullptr : p.topk_idx + k.row * K;
  const int64_t n_top = padding ? 0 : top_count(top, K);
  const float mass = padding ? 0.f : p.mass[k.row];
  const float* base = padding ? nullptr : p.base + k.row * D;
  for (int64_t m = k.begin + warp; m < k.end; m += kForwardWarps) {
    const int64_t i = p.perm[k.bh * L + m];
    T* out = const_cast<T*>(row_of<T>(p.out, p.out_strides, k.b, k.h, i));
    if (padding) {
      for (int64_t d = lane; d < D; d += kWarp) out[d] = from_float<T>(0.f);
      if (lane == 0) p.lse[k.bh * L + i] = -INFINITY;
      continue;
    }
    load_scaled(qs, row_of<T>(p.q, p.q_strides, k.b, k.h, i), D, p.scale);
    __syncwarp();
    float o[kDPerLane];
#pragma unroll
    for (int u = 0; u < kDPerLane; ++u) o[u] = 0.f;
    float run_max = -INFINITY, denom = 0.f;
    for (int64_t t0 = 0; t0 < n_top; t0 += kWarp) {
      const bool real = t0 + lane < n_top;
      const int32_t j = real ? top[t0 + lane] : 0;
      const float score =
          real ? dot_row(qs, row_of<T>(p.k, p.k_strides, k.b, k.h, j), D) : -INFINITY;
      const float new_max = fmaxf(run_max, warp_max(score));
      const float correction = __expf(run_max - new_max);
      const float prob = real ? __expf(score - new_max) : 0.f;
      denom = denom * correction + warp_sum(prob);
#pragma unroll
      for (int u = 0; u < kDPerLane; ++u) o[u] *= correction;
      const int count = n_top - t0 < kWarp ? static_cast<int>(n_top - t0) : kWarp;
      for (int t = 0; t < count; ++t) {
        const float pt = __shfl_sync(0xffffffffu, prob, t);
        const T* v = row_of<T>(p.v, p.v_strides, k.b, k.h, __shfl_sync(0xffffffffu, j, t));
#pragma unroll
        for (int u = 0; u < kDPerLane; ++u) {
          const int64_t d = lane + u * kWarp;
          if (d < D) o[u] += pt * to_float(v[d]);
        }
      }
      run_max = new_max;
    }
    const float weight = n_top > 0 ? mass / denom : 0.f;
#pragma unroll
    for (int u = 0; u < kDPerLane; ++u) {
      const int64_t d = lane + u * kWarp;
      if (d < D) out[d] = from_float<T>(base[d] + weight * o[u]);
    }
    if (lane == 0) p.lse[k.bh * L + i] = n_top > 0 ? run_max + __logf(denom) : -INFINITY;
    __syncwarp();
  }
}

// One warp per cluster: w_i = grad_out_i . (top-k softmax output of i), and grad_mass_c, the
// sum of its members' w in ascending query order.
template <typename T>
__global__ void __launch_bounds__(kWarp) prepass_kernel(ClusteredParams<float> p) {
  extern __shared__ float pre_smem[];  // 2 x D
  const Cluster k = cluster_of_block(p);
  const int64_t L = p.seq_len, D = p.head_dim, K = p.topk;
  const int lane = threadIdx.x;
  float* qs = pre_smem;
  float* dos = pre_smem + D;
  const int32_t* top = p.topk_idx + k.row * K;
  const int64_t n_top = top_count(top, K);
  float total = 0.f;
  for (int64_t m = k.begin; m < k.end && n_top > 0; ++m) {
    const int64_t i = p.perm[k.bh * L + m], r = k.bh * L + i;
    load_scaled(qs, row_of<T>(p.q, p.q_strides, k.b, k.h, i), D, p.scale);
    load_scaled(dos, row_of<T>(p.grad_out, p.grad_out_strides, k.b, k.h, i), D, 1.f);
    __syncwarp();
    const float lse = p.lse[r];
    float acc = 0.f;
    for (int64_t t = lane; t < n_top; t += kWarp) {
      const int32_t j = top[t];
      const float prob = __expf(dot_row(qs, row_of<T>(p.k, p.k_strides, k.b, k.h, j), D) - lse);
      acc += prob * dot_row(dos, row_of<T>(p.v, p.v_strides, k.b, k.h, j), D);
    }
    const float w = warp_sum(acc);
    if (lane == 0) p.w[r] = w;
    total += w;
    __syncwarp();
  }
  if (lane == 0) p.grad_mass[k.row] = total;
}

// One warp per cluster, top-k keys in chunks of 32 (a lane per key). Per chunk, each lane sums
// the key / value gradient of its key over the members in shared memory; one atomic flush
// per chunk. grad_q of a member: the centroid part, plus each chunk's softmax part (carried
// across chunks in dq_scratch when there are several).
template <typename T>
__global__ void __launch_bounds__(kWarp) query_backward_kernel(ClusteredParams<float> p,
                                                               float* dq_scratch) {
  extern __shared__ float bwd_smem[];
  const Cluster k = cluster_of_block(p);
  const int64_t L = p.seq_len, D = p.head_dim, K = p.topk, stride = D + 1;
  const int lane = threadIdx.x;
  float* qs = bwd_smem;
  float* dos = qs + D;
  float* dk_acc = dos + D;             // 32 x (D + 1): padded rows, no bank conflicts
  float* dv_acc = dk_acc + kWarp * stride;
  if (k.c == p.clusters) {
    for (int64_t m = k.begin; m < k.end; ++m) {
      const int64_t i = p.perm[k.bh * L + m];
      T* dq = const_cast<T*>(row_of<T>(p.grad_q, p.grad_q_strides, k.b, k.h, i));
      for (int64_t d = lane; d < D; d += kWarp) dq[d] = from_float<T>(0.f);
    }
    return;
  }
  const int32_t* top = p.topk_idx + k.row * K;
  const int64_t n_top = top_count(top, K);
  const int64_t chunks = n_top > 0 ? (n_top + kWarp - 1) / kWarp : 1;
  const float mass = p.mass[k.row];
  const float factor = p.scale / static_cast<float>(k.end - k.begin > 0 ? k.end - k.begin : 1);
  const float* grad_centroid = p.base + k.row * D;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t t0 = chunk * kWarp;
    const int count = n_top - t0 < kWarp ? static_cast<int>(n_top - t0 > 0 ? n_top - t0 : 0)
                                          : kWarp;
    const bool real = lane < count;
    const int32_t j = real ? top[t0 + lane] : 0;
    const bool last = chunk + 1 == chunks;
    for (int64_t d = 0; d < D && real; ++d) {
      dk_acc[lane * stride + d] = 0.f;
      dv_acc[lane * stride + d] = 0.f;
    }
    for (int64_t m = k.begin; m < k.end; ++m) {
      const int64_t i = p.perm[k.bh * L + m], r = k.bh * L + i;
      float dq[kDPerLane];
#pragma unroll
      for (int u = 0; u < kDPerLane; ++u) {
        const int64_t d = lane + u * kWarp;
        dq[u] = d >= D ? 0.f : chunk == 0 ? factor * grad_centroid[d] : dq_scratch[r * D + d];
      }
      if (count > 0) {
        load_scaled(qs, row_of<T>(p.q, p.q_strides, k.b, k.h, i), D, p.scale);
        load_scaled(dos, row_of<T>(p.grad_out, p.grad_out_strides, k.b, k.h, i), D, 1.f);
        __syncwarp();
        float prob = 0.f, ds = 0.f;
        if (real) {
          prob = __expf(dot_row(qs, row_of<T>(p.k, p.k_strides, k.b, k.h, j), D) - p.lse[r]);
          const float dp = dot_row(dos, row_of<T>(p.v, p.v_strides, k.b, k.h, j), D);
          ds = prob * mass * (dp - p.w[r]);
        }
        for (int t = 0; t < count; ++t) {
          const float dst = __shfl_sync(0xffffffffu, ds, t) * p.scale;
          const T* key = row_of<T>(p.k, p.k_strides, k.b, k.h, __shfl_sync(0xffffffffu, j, t));
#pragma unroll
          for (int u = 0; u < kDPerLane; ++u) {
            const int64_t d = lane + u * kWarp;
            if (d < D) dq[u] += dst * to_float(key[d]);
          }
        }
        if (real) {
          const float pv = mass * prob;
          for (int64_t d = 0; d < D; ++d) {
            dk_acc[lane * stride + d] += ds * qs[d];  // qs carries the scale
            dv_acc[lane * stride + d] += pv * dos[d];
          }
        }
      }
      T* grad_q = const_cast<T*>(row_of<T>(p.grad_q, p.grad_q_strides, k.b, k.h, i));
#pragma unroll
      for (int u = 0; u < kDPerLane; ++u) {
        const int64_t d = lane + u * kWarp;
        if (d >= D) continue;
        if (last) {
          grad_q[d] = from_float<T>(dq[u]);
        } else {
          dq_scratch[r * D + d] = dq[u];
        }
      }
      __syncwarp();
    }
    for (int t = 0; t < count; ++t) {
      const int32_t jt = __shfl_sync(0xffffffffu, j, t);
      float* gk = p.grad_k + (k.bh * L + jt) * D;
      float* gv = p.grad_v + (k.bh * L + jt) * D;
      for (int64_t d = lane; d < D; d += kWarp) {
        atomicAdd(gk + d, dk_acc[t * stride + d]);
        atomicAdd(gv + d, dv_acc[t * stride + d]);
      }
    }
    __syncwarp();
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename Kernel>
cudaError_t allow_shared(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

}  // namespace

template <typename T>
cudaError_t cluster(const ClusterParams& p, cudaStream_t stream) {
  const int64_t BH = p.batch * p.heads, L = p.seq_len, C = p.clusters;
  const dim3 hash_grid(static_cast<unsigned>(ceil_div(L, kHashThreads)), static_cast<unsigned>(BH));
  const size_t hash_smem = sizeof(float) * p.bits * (p.head_dim + 1);
  cudaError_t err = allow_shared(hash_kernel<T>, hash_smem);
  if (err != cudaSuccess) return err;
  hash_kernel<T><<<hash_grid, kHashThreads, hash_smem, stream>>>(p);
  const unsigned per_cluster_blocks = static_cast<unsigned>(ceil_div(BH * C, 256));
  init_centroids_kernel<<<per_cluster_blocks, 256, 0, stream>>>(p);
  if ((err = cudaMemsetAsync(p.members, 0, sizeof(int32_t) * BH * C, stream)) != cudaSuccess ||
      (err = cudaMemsetAsync(p.ones, 0, sizeof(int32_t) * BH * C * p.bits, stream)) != cudaSuccess) {
    return err;
  }
  // Bit votes go through shared memory when they fit (C x bits counters of 4 bytes).
  const size_t votes = sizeof(int32_t) * C * (1 + p.bits);
  const bool votes_in_shared = votes <= 160 * 1024;
  const size_t assign_smem = sizeof(uint64_t) * kCentroidTile + (votes_in_shared ? votes : 0);
  if ((err = allow_shared(assign_kernel, assign_smem)) != cudaSuccess) return err;
  const dim3 assign_grid(static_cast<unsigned>(ceil_div(L, kAssignThreads * kAssignPerThread)),
                         static_cast<unsigned>(BH));
  for (int64_t t = 0; t <= p.iterations; ++t) {
    const bool update = t < p.iterations;
    assign_kernel<<<assign_grid, kAssignThreads, assign_smem, stream>>>(p, update,
                                                                         votes_in_shared);
    if (update) update_kernel<<<per_cluster_blocks, 256, 0, stream>>>(p, t + 1);
  }
  counts_kernel<<<per_cluster_blocks, 256, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t aggregate(const ClusteredParams<float>& p, const void* x, const TensorStrides& s,
                      float* dst, float factor, bool mean, cudaStream_t stream) {
  const int64_t D = p.head_dim;
  const int dx = static_cast<int>(D < 256 ? D : 256);
  const int slices = dx >= 256 ? 1 : 256 / (dx > 0 ? dx : 1);
  const dim3 block(dx > 0 ? dx : 1, slices);
  const dim3 grid(static_cast<unsigned>(p.clusters), static_cast<unsigned>(p.batch * p.heads));
  const size_t smem = sizeof(float) * slices * D;
  cudaError_t err = allow_shared(aggregate_kernel<T>, smem);
  if (err != cudaSuccess) return err;
  aggregate_kernel<T><<<grid, block, smem, stream>>>(p, x, s, dst, factor, mean);
  return cudaGetLastError();
}

cudaError_t rows_forward(const ClusteredParams<float>& p, cudaStream_t stream) {
  const unsigned rows = static_cast<unsigned>(p.batch * p.heads * p.clusters);
  rows_forward_kernel<<<rows, kRowThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t rows_backward(const ClusteredParams<float>& p, cudaStream_t stream) {
  const unsigned rows = static_cast<unsigned>(p.batch * p.heads * p.clusters);
  const size_t smem = sizeof(uint32_t) * ceil_div(p.seq_len, 32);
  cudaError_t err = allow_shared(rows_backward_kernel, smem);
  if (err != cudaSuccess) return err;
  rows_backward_kernel<<<rows, kRowThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t query_forward(const ClusteredParams<float>& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.clusters + 1), static_cast<unsigned>(p.batch * p.heads));
  const size_t smem = sizeof(float) * kForwardWarps * p.head_dim;
  query_forward_kernel<T><<<grid, kForwardWarps * kWarp, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t prepass(const ClusteredParams<float>& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.clusters), static_cast<unsigned>(p.batch * p.heads));
  prepass_kernel<T><<<grid, kWarp, sizeof(float) * 2 * p.head_dim, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t query_backward(const ClusteredParams<float>& p, float* dq_scratch,
                           cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.clusters + 1), static_cast<unsigned>(p.batch * p.heads));
  const size_t smem = sizeof(float) * (2 * p.head_dim + 2 * kWarp * (p.head_dim + 1));
  cudaError_t err = allow_shared(query_backward_kernel<T>, smem);
  if (err != cudaSuccess) return err;
  query_backward_kernel<T><<<grid, kWarp, smem, stream>>>(p, dq_scratch);
  return cudaGetLastError();
}

#define FASTATTN_INSTANTIATE(T)                                                                \
  template cudaError_t cluster<T>(const ClusterParams&, cudaStream_t);                         \
  template cudaError_t aggregate<T>(const ClusteredParams<float>&, const void*,                \
                                    const TensorStrides&, float*, float, bool, cudaStream_t);  \
  template cudaError_t query_forward<T>(const ClusteredParams<float>&, cudaStream_t);          \
  template cudaError_t prepass<T>(const ClusteredParams<float>&, cudaStream_t);                \
  template cudaError_t query_backward<T>(const ClusteredParams<float>&, float*, cudaStream_t);

FASTATTN_INSTANTIATE(float)
FASTATTN_INSTANTIATE(__half)
FASTATTN_INSTANTIATE(__nv_bfloat16)

}  // namespace fastattn::cuda::clustered
