// Decode: a few new queries against a long KV cache (issue 14; Lq != Lk, queries bottom-right
// aligned as in every kernel: query i at key position i + offset, local_attention_params.h).
//
// The general forward (local_fwd.cuh, kSeq) gives each (batch, query head) a 64-row query tile
// and walks its band in series: at Lq = 1 one row of 64 is real, the band of a kv head is read
// once per query head of its group, and a (batch, head) is one block however long the band.
// Decode is bound by reading K and V once, so this kernel
//   - packs the rows of a kv head's whole group into one 16-row tile (GQA packing: row
//     r = i * group + j is query i of query head kvh * group + j), so K and V are read once for
//     the group and the tensor cores see 16 rows, not 1;
//   - splits the band over `splits` blocks per (batch, kv head, row tile) (split-KV), so that
//     a batch of a few sequences still fills the GPU; each block leaves its normalised partial
//     output and lse in a float32 scratch, and local_decode_combine_kernel merges the splits
//     (with one split the block writes out and lse itself);
//   - within a block, the 4 warps take 16 keys each of a 64-key tile (K and V double-buffered
//     through cp.async), each keeping its own online softmax of the 16 rows, merged at the end.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/local_fwd.cuh"  // rescale_rows
#include "cuda/tile_common.cuh"

namespace fastattn::cuda {

template <typename T, int D>
struct DecodeConfig {
  static constexpr int kWarps = 4, kThreads = 32 * kWarps;
  static constexpr int kRows = 16;            // packed rows of a block
  static constexpr int kBc = 16 * kWarps;     // keys of a tile, 16 a warp
  static constexpr int kLd = D + 8;
  static constexpr size_t kTiles = sizeof(T) * kLd * (kRows + 4 * kBc);  // Q, 2 stages of K, V
  static constexpr size_t kMerge = sizeof(float) * kWarps * kRows * (D + 2);  // o, max, sum
  static constexpr size_t kSmem = kTiles > kMerge ? kTiles : kMerge;
};

// Packed rows a call has per (batch, kv head): Lq queries times the group's query heads.
inline int64_t decode_rows(const LocalAttentionParams& p) {
  return p.seq_len * (p.heads / p.kv_heads);
}

// What a decode block works on: its (batch, kv head), its 16 packed rows and its part of their
// band, in key tiles [tile0, tile1) of kBc keys from `lo`.
struct DecodeBlock {
  int64_t b, kvh, row0, rows, group, offset, keys, lo;
  int64_t tile0, tile1, split;

  __device__ __forceinline__ DecodeBlock(const LocalAttentionParams& p, int64_t work,
                                         int64_t row_tiles, int64_t splits, int bc, int br) {
    split = work % splits;
    const int64_t rest = work / splits, row_tile = rest % row_tiles, bk = rest / row_tiles;
    b = bk / p.kv_heads;
    kvh = bk % p.kv_heads;
    group = p.heads / p.kv_heads;
    const Sequence s = sequence(p, b);
    offset = s.offset;
    keys = s.lk;
    row0 = row_tile * br;
    const int64_t all_rows = s.lq * group;
    rows = all_rows - row0 < br ? all_rows - row0 : br;
    // The union of the band of the tile's queries, first to last.
    const int64_t first = row0 / group + offset - p.window_left;
    const int64_t last = (row0 + rows - 1) / group + offset + p.window_right;
    lo = first > 0 ? first : 0;
    const int64_t hi = last < keys - 1 ? last : keys - 1;
    const int64_t tiles = hi >= lo ? (hi - lo + bc) / bc : 0;
    const int64_t per_split = (tiles + splits - 1) / splits;
    tile0 = split * per_split < tiles ? split * per_split : tiles;
    tile1 = tile0 + per_split < tiles ? tile0 + per_split : tiles;
  }
  // Query and query head of packed row r (r < rows + row0).
  __device__ __forceinline__ int64_t query(int64_t r) const { return r / group; }
  __device__ __forceinline__ int64_t head(int64_t r) const { return kvh * group + r % group; }
};

template <typename T, int D>
__global__ void __launch_bounds__(DecodeConfig<T, D>::kThreads)
    local_decode_kernel(const LocalAttentionParams p, const int64_t row_tiles,
                        const int64_t splits, float* __restrict__ part_out,
                        float* __restrict__ part_lse, const bool rows_aligned) {
  using Cfg = DecodeConfig<T, D>;
  using Ops = HalfOps<T>;
  static_assert(sizeof(T) == 2, "16-bit types: float32 takes the general forward");
  constexpr int kRows = Cfg::kRows, kBc = Cfg::kBc, kLd = Cfg::kLd, kThreads = Cfg::kThreads;
  constexpr int kWarps = Cfg::kWarps;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + kRows * kLd;      // 2 stages
  T* sV = sK + 2 * kBc * kLd;    // 2 stages

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const DecodeBlock blk(p, blockIdx.x, row_tiles, splits, kBc, kRows);
  const T* kg = head_ptr<T>(p.k, p.k_strides, blk.b, blk.kvh);
  const T* vg = head_ptr<T>(p.v, p.v_strides, blk.b, blk.kvh);

  // Q: packed row r of the tile from its own query head and query; rows past the tile's zero.
  constexpr int kPer = 16 / sizeof(T), kChunks = D / kPer;
  for (int c = tid; c < kRows * kChunks; c += kThreads) {
    const int r = c / kChunks, chunk = c % kChunks;
    const bool valid = r < blk.rows;
    const int64_t row = blk.row0 + r;
    const T* src = valid ? head_ptr<T>(p.q, p.q_strides, blk.b, blk.head(row)) +
                               blk.query(row) * p.q_strides.seq + chunk * kPer
                         : nullptr;
    T* dst = sQ + r * kLd + chunk * kPer;
    if (rows_aligned) {
      cp_async16(dst, valid ? src : p.q, valid);
    } else {
      for (int e = 0; e < kPer; ++e) dst[e] = valid ? src[e] : zero_of<T>();
    }
  }
  auto load_kv = [&](int64_t tile) {
    const int64_t k0 = blk.lo + tile * kBc;
    const int st = static_cast<int>(tile & 1);
    load_rows<T, D, kBc, kThreads>(sK + st * kBc * kLd, kLd, kg, p.k_strides.seq, k0, blk.keys,
                                   rows_aligned, tid);
    load_rows<T, D, kBc, kThreads>(sV + st * kBc * kLd, kLd, vg, p.v_strides.seq, k0, blk.keys,
                                   rows_aligned, tid);
  };
  cp_async_commit();
  if (blk.tile0 < blk.tile1) load_kv(blk.tile0);
  cp_async_commit();

  // The lane's two packed rows (g, g + 8 of the tile): their key positions, or none.
  int64_t position[2];
  bool real[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    real[r] = g + 8 * r < blk.rows;
    position[r] = blk.query(blk.row0 + g + 8 * r) + blk.offset;
  }
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
  const bool capped = p.softcap > 0;
  const float cap_unit = static_cast<float>(p.scale / p.softcap);
  const float cap_log2 = static_cast<float>(p.softcap) * kLog2e;

  float o[D / 8][4];
  zero(o);
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  typename Ops::A qf[D / 16];
  for (int64_t tile = blk.tile0; tile < blk.tile1; ++tile) {
    if (tile + 1 < blk.tile1) {
      load_kv(tile + 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (tile == blk.tile0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) Ops::load_a(qf[kk], sQ, kLd, 0, kk * 16, lane);
    }
    const int st = static_cast<int>(tile & 1);
    const T* cK = sK + (st * kBc + warp * 16) * kLd;  // this warp's 16 keys
    const T* cV = sV + (st * kBc + warp * 16) * kLd;
    const int64_t k0 = blk.lo + tile * kBc + warp * 16;

    float s[2][4];
    zero(s);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) mma_a_bt<Ops, 16>(s, qf[kk], cK, kLd, kk * 16, lane);
    // Element (row g + 8 (e >> 1), key k0 + 8 i + 2 t + (e & 1)), in base-2 units, masked.
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const int64_t key = k0 + 8 * i + 2 * t + (e & 1);
        const float x = capped ? cap_log2 * accurate_tanh(s[i][e] * cap_unit) : s[i][e] * scale_log2;
        s[i][e] = real[r] && visible(position[r], key, p.window_left, p.window_right, blk.keys)
                      ? x
                      : -INFINITY;
        tile_max[r] = fmaxf(tile_max[r], s[i][e]);
      }
    float correction[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float new_max = fmaxf(row_max[r], quad_max(tile_max[r]));
      // A row that has seen only masked keys keeps max -inf; subtract 0 so exp2 gives 0.
      const float base = new_max == -INFINITY ? 0.f : new_max;
      correction[r] = exp2f(row_max[r] - base);
      row_max[r] = new_max;
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        s[i][2 * r] = exp2f(s[i][2 * r] - base);
        s[i][2 * r + 1] = exp2f(s[i][2 * r + 1] - base);
        sum += s[i][2 * r] + s[i][2 * r + 1];
      }
      row_sum[r] = row_sum[r] * correction[r] + sum;
    }
    rescale_rows<D>(o, correction);
    mma_c_b<Ops, D, 16>(o, s, cV, kLd, 0, lane);
    __syncthreads();  // the next iteration's prefetch overwrites this stage
  }
  cp_async_wait<0>();
  __syncthreads();

  // Merge the warps' softmax states of each row through shared memory (the tiles are done).
  float* m_w = reinterpret_cast<float*>(smem);  // [warp][row]
  float* l_w = m_w + kWarps * kRows;            // [warp][row]
  float* o_w = l_w + kWarps * kRows;            // [warp][row][D]
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float sum = quad_sum(row_sum[r]);
    const int row = g + 8 * r;
    if (t == 0) {
      m_w[warp * kRows + row] = row_max[r];
      l_w[warp * kRows + row] = sum;
    }
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      o_w[(warp * kRows + row) * D + i * 8 + 2 * t] = o[i][2 * r];
      o_w[(warp * kRows + row) * D + i * 8 + 2 * t + 1] = o[i][2 * r + 1];
    }
  }
  __syncthreads();
  for (int c = tid; c < kRows * D; c += kThreads) {
    const int row = c / D, col = c % D;
    if (row >= blk.rows) continue;
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, m_w[w * kRows + row]);
    const float base = m == -INFINITY ? 0.f : m;
    float l = 0.f, acc = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float f = exp2f(m_w[w * kRows + row] - base);
      l += l_w[w * kRows + row] * f;
      acc += o_w[(w * kRows + row) * D + col] * f;
    }
    const int64_t packed = blk.row0 + row, i = blk.query(packed), h = blk.head(packed);
    const int64_t lse_index = (blk.b * p.heads + h) * p.seq_len + i;
    const float value = l > 0.f ? acc / l : 0.f;
    const float lse = l > 0.f ? (m + __log2f(l)) * kLn2 : -INFINITY;
    if (splits == 1) {
      T* out = static_cast<T*>(p.out) + blk.b * p.out_strides.batch + h * p.out_strides.head +
               i * p.out_strides.seq;
      out[col] = static_cast<T>(value);
      if (col == 0) p.lse[lse_index] = lse;
    } else {
      const int64_t slot = blk.split * p.batch * p.heads * p.seq_len + lse_index;
      part_out[slot * D + col] = value;
      if (col == 0) part_lse[slot] = lse;
    }
  }
}

// out and lse from the splits' partial results: lse = log sum_s exp(lse_s), out =
// sum_s exp(lse_s - lse) out_s. A row no split saw a key for gets 0 and -inf.
template <typename T>
__global__ void local_decode_combine_kernel(const LocalAttentionParams p, const int64_t splits,
                                            const float* __restrict__ part_out,
                                            const float* __restrict__ part_lse) {
  const int64_t rows = p.batch * p.heads * p.seq_len, D = p.head_dim;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < rows * D;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = c / D, col = c % D;
    float m = -INFINITY;
    for (int64_t s = 0; s < splits; ++s) m = fmaxf(m, part_lse[s * rows + row]);
    const float base = m == -INFINITY ? 0.f : m;
    float l = 0.f, acc = 0.f;
    for (int64_t s = 0; s < splits; ++s) {
      const float f = __expf(part_lse[s * rows + row] - base);
      l += f;
      acc += f * part_out[(s * rows + row) * D + col];
    }
    const int64_t i = row % p.seq_len, bh = row / p.seq_len;
    const int64_t b = bh / p.heads, h = bh % p.heads;
    T* out = static_cast<T*>(p.out) + b * p.out_strides.batch + h * p.out_strides.head +
             i * p.out_strides.seq;
    out[col] = static_cast<T>(l > 0.f ? acc / l : 0.f);
    if (col == 0) p.lse[row] = l > 0.f ? base + __logf(l) : -INFINITY;
  }
}

}  // namespace fastattn::cuda
