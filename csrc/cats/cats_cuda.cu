// CATS CUDA kernels. Elementwise cats / backward: for_each_pack (16-byte loads and stores, scalar
// path for misaligned views). Sparse gated MLP (decode, 1..16 tokens), on the schedule described
// in cats.h (compiled per token bucket MB and width W):
//   1. gate_up_kernel: a GEMV over neuron rows, several rows per warp and several 16-byte loads of
//      every row in flight per lane; silu + threshold (cats_math.h), then the up rows of the kept
//      neurons (the others' loads are predicated off). Writes keep[f] and act[f, m].
//   2. compact_kernel: kept[] = the kept neurons in ascending order, and their count.
//   3. down_partial_kernel: blocks over (column tile, split of kept[]); each lane owns one pack of
//      columns and streams the kept rows of w_down_t, their indices and activations staged in shared
//      memory, so no weight load waits on a branch; the warps' sums are added in warp order.
//   4. down_reduce_kernel: sums the splits in order (deterministic) and writes y.
#include <cstdint>
#include <type_traits>

#include "cats/cats.h"
#include "cats/cats_math.h"
#include "core/cuda_types.cuh"
#include "core/vec_cuda.cuh"

namespace slab::cats {
namespace {

constexpr int kElemThreads = 256;
constexpr int kScanThreads = 256;
static_assert(kCompactRows == kScanThreads, "the compaction scans one neuron per thread");

// Blocks per SM the MLP kernels are built for: 2 (at most 128 registers) up to 8 tokens; 16 tokens
// (and fp64 from 4 tokens) need more accumulators than that. (Without the bound ptxas picks fewer
// registers for some small instantiations and spills.)
template <typename T, int MB>
constexpr int kMinBlocks = MB >= 16 || (sizeof(T) == 8 && MB >= 4) ? 1 : 2;

int elem_blocks(int64_t n) { return grid_stride_blocks(n, kElemThreads); }

__device__ __forceinline__ float exp_acc(float v) { return __expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }

template <typename A>
__device__ __forceinline__ A silu_acc(A v) {
  return silu_from_sigmoid(v, sigmoid_from_exp(exp_acc(-v)));
}

template <typename A, int W>
__device__ __forceinline__ void set_zero(A (&v)[W]) {
#pragma unroll
  for (int i = 0; i < W; ++i) v[i] = A(0);
}

// Exclusive prefix sum of `v` over the block (kScanThreads threads); `total` gets the block's sum.
// `scratch` holds one value per warp.
__device__ __forceinline__ int64_t block_exclusive_scan(int64_t v, int64_t* scratch, int64_t& total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int64_t inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t n = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += n;
  }
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 31) scratch[warp] = inc;
  __syncthreads();
  int64_t before = 0;
  total = 0;
  for (int w = 0; w < kScanThreads / 32; ++w) {
    if (w < warp) before += scratch[w];
    total += scratch[w];
  }
  return before + inc - v;
}

// ---- elementwise ---------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kElemThreads) cats_kernel(CatsParams p, bool vectorized) {
  using A = acc_t<T>;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const A t = static_cast<A>(p.threshold);
  for_each_pack<T>(p.n, vectorized, [&](int64_t i, auto width) {
    constexpr int W = decltype(width)::value;
    A v[W];
    load_acc<W, Cache::kStream>(x + i, v);
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const A s = silu_acc(v[j]);
      v[j] = keep(s, t) ? s : A(0);
    }
    store_acc<W>(y + i, v);
  });
}

template <typename T>
__global__ void __launch_bounds__(kElemThreads) cats_backward_kernel(CatsBwdParams p, bool vectorized) {
  using A = acc_t<T>;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.dx);
  const A t = static_cast<A>(p.threshold);
  for_each_pack<T>(p.n, vectorized, [&](int64_t i, auto width) {
    constexpr int W = decltype(width)::value;
    A v[W], g[W];
    load_acc<W, Cache::kStream>(x + i, v);
    load_acc<W, Cache::kStream>(dy + i, g);
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const A sig = sigmoid_from_exp(exp_acc(-v[j]));
      const A d = g[j] * silu_grad_from_sigmoid(v[j], sig);
      g[j] = keep(silu_from_sigmoid(v[j], sig), t) ? d : A(0);
    }
    store_acc<W>(dx + i, g);
  });
}

// ---- sparse gated MLP: gate / up -----------------------------------------------------------------

// A weight pack, loaded only when `pred` (zeros otherwise), left raw: the callers widen it after
// every load of a step has been issued, so that the loads are in flight together (a conversion
// next to the load would sit inside the predicated region and wait for it).
template <int W, typename T>
__device__ __forceinline__ Pack<T, W> load_pack_if(bool pred, const T* p) {
  Pack<T, W> out;
#pragma unroll
  for (int i = 0; i < W; ++i) out.v[i] = T(0);
  if (pred) out = load_pack<W, Cache::kStream>(p);
  return out;
}

// acc[r][m] = (this lane's items of row r) . x[m], for the rows with use[r] (the loads of the
// others are predicated off: no memory traffic) and the tokens m < tokens. Each step first issues
// kGateUnroll * R independent 16-byte weight loads, then the FMAs.
template <int MB, int R, int W, typename T, typename A>
__device__ __forceinline__ void lane_dots(const T* const (&rows)[R], const bool (&use)[R], const T* __restrict__ x,
                                          int64_t dim, int tokens, int64_t items, A (&acc)[R][MB]) {
#pragma unroll
  for (int r = 0; r < R; ++r) set_zero(acc[r]);
  for (int64_t k0 = threadIdx.x % 32; k0 < items; k0 += 32 * kGateUnroll) {
    Pack<T, W> w[kGateUnroll][R];
#pragma unroll
    for (int u = 0; u < kGateUnroll; ++u) {
      const int64_t k = k0 + 32 * u;
#pragma unroll
      for (int r = 0; r < R; ++r) w[u][r] = load_pack_if<W>(use[r] && k < items, rows[r] + k * W);
    }
#pragma unroll
    for (int u = 0; u < kGateUnroll; ++u) {
      const int64_t k = k0 + 32 * u;
#pragma unroll
      for (int m = 0; m < MB; ++m) {
        if (m < tokens && k < items) {
          A xv[W];
          load_acc<W, Cache::kReuse>(x + m * dim + k * W, xv);
#pragma unroll
          for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int i = 0; i < W; ++i) acc[r][m] += to_acc(w[u][r].v[i]) * xv[i];
          }
        }
      }
    }
  }
}

template <typename T, int MB, int W>
__global__ void __launch_bounds__(kGateWarps * 32, kMinBlocks<T, MB>) gate_up_kernel(MlpParams p) {
  using A = acc_t<T>;
  constexpr int R = gate_rows_per_warp(MB);
  const int64_t f0 = gate_first_row(blockIdx.x, threadIdx.x / 32, MB);
  if (f0 >= p.features) return;  // whole warps leave together
  const int M = static_cast<int>(p.tokens), lane = threadIdx.x % 32;
  const int64_t items = p.dim / W;  // W > 1 only when rows are whole packs
  const T* x = static_cast<const T*>(p.x);
  const A t = static_cast<A>(p.threshold);
  const T* gate_rows[R];
  const T* up_rows[R];
  bool valid[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    valid[r] = f0 + r < p.features;
    const int64_t f = valid[r] ? f0 + r : f0;  // rows past the end read nothing (use = false)
    gate_rows[r] = static_cast<const T*>(p.w_gate) + f * p.dim;
    up_rows[r] = static_cast<const T*>(p.w_up) + f * p.dim;
  }
  A gate[R][MB];
  lane_dots<MB, R, W>(gate_rows, valid, x, p.dim, M, items, gate);
  bool kept[R], any = false;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    kept[r] = false;
#pragma unroll
    for (int m = 0; m < MB; ++m) {
      if (valid[r] && m < M) {  // warp-uniform
        const A s = silu_acc(warp_sum(gate[r][m]));
        const bool k = keep(s, t);
        gate[r][m] = k ? s : A(0);
        kept[r] = kept[r] || k;
      }
    }
    any = any || kept[r];
    if (lane == 0 && valid[r]) p.keep[f0 + r] = kept[r];
  }
  if (!any) return;  // warp-uniform: none of the up rows is read
  A up[R][MB];
  lane_dots<MB, R, W>(up_rows, kept, x, p.dim, M, items, up);
  A* act = static_cast<A*>(p.act) + f0 * M;
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int m = 0; m < MB; ++m) {
      if (kept[r] && m < M) {
        const A u = warp_sum(up[r][m]);
        if (lane == 0) act[r * M + m] = gate[r][m] * u;
      }
    }
  }
}

// ---- sparse gated MLP: compaction ----------------------------------------------------------------

// Block c: the kept neurons among [0, c * kCompactRows) give its offset (integer sums: exact in any
// order), a scan of its own flags the rank of each kept neuron. The last block writes the count.
__global__ void __launch_bounds__(kCompactRows) compact_kernel(MlpParams p) {
  __shared__ int64_t scratch[kScanThreads / 32];
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kCompactRows, f = first + threadIdx.x;
  int64_t before = 0;
  for (int64_t i = threadIdx.x; i < first; i += kCompactRows) before += p.keep[i];
  int64_t offset, count;
  block_exclusive_scan(before, scratch, offset);
  const bool k = f < p.features && p.keep[f];
  const int64_t rank = block_exclusive_scan(k, scratch, count);
  if (k) p.kept[offset + rank] = static_cast<int32_t>(f);
  if (blockIdx.x == gridDim.x - 1 && threadIdx.x == 0) p.kept[p.features] = static_cast<int32_t>(offset + count);
}

// ---- sparse gated MLP: down projection -----------------------------------------------------------

// Loads kept rows [c0, c0 + n) of this split into shared memory: their neuron index and their
// activations, zero for the padding tokens (so the FMA loop needs no token test).
template <int MB, typename A>
__device__ __forceinline__ void stage_chunk(const MlpParams& p, int64_t c0, int n, int32_t* rows, A (*act)[MB]) {
  const A* a = static_cast<const A*>(p.act);
  const int M = static_cast<int>(p.tokens);
  for (int j = threadIdx.x; j < n * MB; j += kDownWarps * 32) {
    const int row = j / MB, m = j % MB;
    const int32_t f = p.kept[c0 + row];
    if (m == 0) rows[row] = f;
    act[row][m] = m < M ? a[static_cast<int64_t>(f) * M + m] : A(0);
  }
}

template <typename T, int MB, int W>
__global__ void __launch_bounds__(kDownWarps * 32, kMinBlocks<T, MB>) down_partial_kernel(MlpParams p, int splits) {
  using A = acc_t<T>;
  constexpr int U = down_unroll(MB);
  __shared__ int32_t s_rows[kDownChunk];
  __shared__ A s_act[kDownChunk][MB];
  __shared__ A s_sum[kDownWarps][32 * W];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, M = static_cast<int>(p.tokens);
  const int64_t d = down_column(blockIdx.x, lane, W);
  const bool in = d < p.dim;  // the whole pack: dim is a multiple of W
  const T* wd = static_cast<const T*>(p.w_down_t) + (in ? d : 0);
  const Range range = down_range(p.kept[p.features], splits, static_cast<int>(blockIdx.y));
  A acc[MB][W];
#pragma unroll
  for (int m = 0; m < MB; ++m) set_zero(acc[m]);
  for (int64_t c0 = range.begin; c0 < range.end; c0 += kDownChunk) {
    const int n = static_cast<int>(min64(kDownChunk, range.end - c0));
    __syncthreads();  // the previous chunk is no longer read
    stage_chunk<MB>(p, c0, n, s_rows, s_act);
    __syncthreads();
    for (int j0 = warp; j0 < n; j0 += kDownWarps * U) {
      Pack<T, W> w[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int j = j0 + kDownWarps * u;
        w[u] = load_pack_if<W>(in && j < n, wd + static_cast<int64_t>(s_rows[j < n ? j : 0]) * p.dim);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int j = j0 + kDownWarps * u;
        if (j < n) {
#pragma unroll
          for (int m = 0; m < MB; ++m) {
            const A a = s_act[j][m];
#pragma unroll
            for (int i = 0; i < W; ++i) acc[m][i] += a * to_acc(w[u].v[i]);
          }
        }
      }
    }
  }
  // One token at a time through shared memory: column c of the tile is the sum over warps 0, 1, ...
  A* part = static_cast<A*>(p.partial) + static_cast<int64_t>(blockIdx.y) * M * p.dim;
  const int64_t tile0 = down_column(blockIdx.x, 0, W);
#pragma unroll
  for (int m = 0; m < MB; ++m) {
    if (m < M) {        // block-uniform
      __syncthreads();  // s_sum is no longer read (or the chunk loop is done)
#pragma unroll
      for (int i = 0; i < W; ++i) s_sum[warp][lane * W + i] = acc[m][i];
      __syncthreads();
      for (int c = threadIdx.x; c < 32 * W; c += kDownWarps * 32) {
        if (tile0 + c < p.dim) {
          A total = 0;
#pragma unroll
          for (int w = 0; w < kDownWarps; ++w) total += s_sum[w][c];
          part[m * p.dim + tile0 + c] = total;
        }
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kElemThreads) down_reduce_kernel(MlpParams p, int splits) {
  using A = acc_t<T>;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kElemThreads + threadIdx.x, n = p.tokens * p.dim;
  if (i >= n) return;
  const A* part = static_cast<const A*>(p.partial);
  A total = 0;
#pragma unroll 4
  for (int s = 0; s < splits; ++s) total += part[s * n + i];
  static_cast<T*>(p.y)[i] = from_acc<T>(total);
}

// Runs body(std::integral_constant<int, MB>{}) with MB = token_bucket(tokens).
template <typename Body>
void token_bucket_switch(int64_t tokens, Body&& body) {
  switch (token_bucket(tokens)) {
    case 1:
      return body(std::integral_constant<int, 1>{});
    case 2:
      return body(std::integral_constant<int, 2>{});
    case 4:
      return body(std::integral_constant<int, 4>{});
    case 8:
      return body(std::integral_constant<int, 8>{});
    default:
      return body(std::integral_constant<int, 16>{});
  }
}

// ---- token sparsity -----------------------------------------------------------------------------

// One block per sequence, chunks of kScanThreads tokens in order: a scan of the ties gives each
// token its ties_before, a scan of the kept flags its output position.
template <typename T>
__global__ void __launch_bounds__(kScanThreads) token_index_kernel(TokenIndexParams p) {
  using A = acc_t<T>;
  __shared__ int64_t scratch[kScanThreads / 32];
  const int64_t b = blockIdx.x;
  const T* s = static_cast<const T*>(p.scores) + b * p.tokens;
  int64_t* out = p.index + b * p.keep;
  const A kth = static_cast<const A*>(p.kth)[b];
  const int64_t ties_allowed = p.keep - p.n_greater[b];
  int64_t ties = 0, kept = 0;
  for (int64_t c = 0; c < p.tokens; c += kScanThreads) {
    const int64_t i = c + threadIdx.x;
    const A v = i < p.tokens ? to_acc(s[i]) : A(0);
    const bool in = i < p.tokens;
    int64_t chunk_ties, chunk_kept;
    const int64_t tie_rank = ties + block_exclusive_scan(in && v == kth, scratch, chunk_ties);
    const bool k = in && token_kept(v, kth, tie_rank, ties_allowed);
    const int64_t pos = kept + block_exclusive_scan(k, scratch, chunk_kept);
    if (k && pos < p.keep) out[pos] = i;
    ties += chunk_ties;
    kept += chunk_kept;
  }
  for (int64_t j = kept + threadIdx.x; j < p.keep; j += kScanThreads) out[j] = -1;
}

// One thread per word W (copy_word_bytes: up to 16 bytes, narrower for odd row sizes or offsets).
template <typename W>
__global__ void __launch_bounds__(kElemThreads) token_rows_kernel(TokenRowsParams p) {
  const int64_t words = p.row_bytes / static_cast<int64_t>(sizeof(W));
  const int64_t n = p.batch * p.keep * words;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / words, w = e % words;
    const int64_t full = full_row(p.index, i, p.keep, p.tokens);
    if (full < 0) continue;
    const int64_t from = (p.gather ? full : i) * words + w, to = (p.gather ? i : full) * words + w;
    static_cast<W*>(p.dst)[to] = static_cast<const W*>(p.src)[from];
  }
}

}  // namespace

void token_index_cuda(const TokenIndexParams& p, CUstream_st* stream) {
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T,
                    [&] { token_index_kernel<T><<<static_cast<unsigned>(p.batch), kScanThreads, 0, stream>>>(p); });
}

void token_rows_cuda(const TokenRowsParams& p, CUstream_st* stream) {
  SLAB_WORD_SWITCH(p.word_bytes, W, [&] {
    const int64_t words = p.batch * p.keep * (p.row_bytes / static_cast<int64_t>(sizeof(W)));
    token_rows_kernel<W><<<elem_blocks(words), kElemThreads, 0, stream>>>(p);
  });
}

void cats_cuda(const CatsParams& p, CUstream_st* stream) {
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] {
    const bool vec = all_vec_aligned(p.x, p.y);
    cats_kernel<T><<<pack_blocks<T>(p.n, kElemThreads, vec), kElemThreads, 0, stream>>>(p, vec);
  });
}

void cats_backward_cuda(const CatsBwdParams& p, CUstream_st* stream) {
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] {
    const bool vec = all_vec_aligned(p.dy, p.x, p.dx);
    cats_backward_kernel<T><<<pack_blocks<T>(p.n, kElemThreads, vec), kElemThreads, 0, stream>>>(p, vec);
  });
}

void mlp_cuda(const MlpParams& p, CUstream_st* stream) {
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] {
    constexpr int kBytes = static_cast<int>(sizeof(T));
    const int splits = down_splits(p.tokens, p.dim, p.features, kBytes);
    SLAB_BOOL_SWITCH(mlp_vectorized(p, kBytes), kVec, [&] {
      constexpr int W = kVec ? kPackWidth<T> : 1;
      token_bucket_switch(p.tokens, [&](auto bucket) {
        constexpr int MB = decltype(bucket)::value;
        gate_up_kernel<T, MB, W><<<static_cast<unsigned>(gate_blocks(p.features, MB)), kGateWarps * 32, 0, stream>>>(p);
        compact_kernel<<<static_cast<unsigned>(compact_blocks(p.features)), kCompactRows, 0, stream>>>(p);
        const dim3 grid(static_cast<unsigned>(down_tiles(p.dim, W)), static_cast<unsigned>(splits));
        down_partial_kernel<T, MB, W><<<grid, kDownWarps * 32, 0, stream>>>(p, splits);
      });
    });
    down_reduce_kernel<T><<<ceil_div(p.tokens * p.dim, kElemThreads), kElemThreads, 0, stream>>>(p, splits);
  });
}

}  // namespace slab::cats
