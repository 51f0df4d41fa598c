// CATS CUDA kernels. Elementwise cats / backward: grid-stride loops. Sparse gated MLP (decode):
//   1. gate_up_kernel: one warp per neuron row: gate dot products for every token, silu +
//      threshold (cats_math.h), and the up dot products only when some token keeps the neuron;
//      writes act[f, m] and keep[f].
//   2. down_partial_kernel: blocks over (column tile, neuron split); each thread owns one column
//      and loops over the kept neurons of its split, so a dropped neuron's w_down_t row is skipped
//      by the whole block; partial sums go to a workspace (no atomics).
//   3. down_reduce_kernel: sums the splits in order (deterministic) and writes y.
#include <algorithm>
#include <cstdint>

#include "cats/cats.h"
#include "cats/cats_math.h"
#include "core/cuda_types.cuh"

namespace slab::cats {
namespace {

constexpr int kElemThreads = 256;
constexpr int kWarpsPerBlock = 8;     // gate_up: neuron rows per block
constexpr int kDownThreads = 128;     // down: columns per block
constexpr int kRowsPerSplit = 64;     // down: fewest neurons per split
constexpr int kTargetBlocks = 1024;   // down: enough blocks to fill any current GPU, no more (each
                                      // split adds tokens * dim partial sums to write and reduce)

__device__ __forceinline__ float exp_acc(float v) { return __expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }

int elem_blocks(int64_t n) { return grid_stride_blocks(n, kElemThreads); }

// ---- elementwise ---------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kElemThreads) cats_kernel(CatsParams p) {
  using A = acc_t<T>;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const A t = static_cast<A>(p.threshold);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < p.n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const A v = to_acc(x[i]);
    const A s = silu_from_sigmoid(v, sigmoid_from_exp(exp_acc(-v)));
    y[i] = from_acc<T>(keep(s, t) ? s : A(0));
  }
}

template <typename T>
__global__ void __launch_bounds__(kElemThreads) cats_bwd_kernel(CatsBwdParams p) {
  using A = acc_t<T>;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.dx);
  const A t = static_cast<A>(p.threshold);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < p.n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const A v = to_acc(x[i]);
    const A sig = sigmoid_from_exp(exp_acc(-v));
    const A d = to_acc(dy[i]) * silu_grad_from_sigmoid(v, sig);
    dx[i] = from_acc<T>(keep(silu_from_sigmoid(v, sig), t) ? d : A(0));
  }
}

// ---- sparse gated MLP ------------------------------------------------------------------------------

// acc[m] = w . x[m] over this lane's columns, then summed over the warp (every lane gets it).
template <typename T, typename A>
__device__ __forceinline__ void warp_dots(const T* __restrict__ w, const T* __restrict__ x, int64_t dim,
                                          int tokens, A (&acc)[kMaxTokens]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int m = 0; m < kMaxTokens; ++m) acc[m] = A(0);
  for (int64_t d = lane; d < dim; d += 32) {
    const A wv = to_acc(w[d]);
#pragma unroll
    for (int m = 0; m < kMaxTokens; ++m) {
      if (m < tokens) acc[m] += wv * to_acc(__ldg(&x[m * dim + d]));
    }
  }
#pragma unroll
  for (int m = 0; m < kMaxTokens; ++m) acc[m] = warp_sum(acc[m]);
}

template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) gate_up_kernel(MlpParams p) {
  using A = acc_t<T>;
  const int64_t f = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (f >= p.features) return;  // whole warps leave together
  const int M = static_cast<int>(p.tokens), lane = threadIdx.x % 32;
  const T* x = static_cast<const T*>(p.x);
  const A t = static_cast<A>(p.threshold);
  A acc[kMaxTokens];
  warp_dots(static_cast<const T*>(p.w_gate) + f * p.dim, x, p.dim, M, acc);
  bool any = false;
#pragma unroll
  for (int m = 0; m < kMaxTokens; ++m) {
    if (m < M) {
      const A s = silu_from_sigmoid(acc[m], sigmoid_from_exp(exp_acc(-acc[m])));
      const bool k = keep(s, t);
      acc[m] = k ? s : A(0);
      any = any || k;
    }
  }
  if (lane == 0) p.keep[f] = any;
  if (!any) return;  // warp-uniform: the W_up row is never read
  A up[kMaxTokens];
  warp_dots(static_cast<const T*>(p.w_up) + f * p.dim, x, p.dim, M, up);
  A* act = static_cast<A*>(p.act) + f * M;
#pragma unroll
  for (int m = 0; m < kMaxTokens; ++m) {
    if (m < M && lane == m) act[m] = acc[m] * up[m];
  }
}

int down_splits(int64_t features, int64_t dim) {
  const int64_t by_blocks = std::max<int64_t>(1, ceil_div(kTargetBlocks, ceil_div(dim, kDownThreads)));
  return static_cast<int>(std::max<int64_t>(1, std::min(ceil_div(features, kRowsPerSplit), by_blocks)));
}

template <typename T>
__global__ void __launch_bounds__(kDownThreads) down_partial_kernel(MlpParams p, int splits) {
  using A = acc_t<T>;
  const int64_t d = static_cast<int64_t>(blockIdx.x) * kDownThreads + threadIdx.x;
  const int M = static_cast<int>(p.tokens);
  const int64_t per = ceil_div(p.features, splits);
  const int64_t f0 = blockIdx.y * per, f1 = min(p.features, f0 + per);
  const T* wd = static_cast<const T*>(p.w_down_t);
  const A* act = static_cast<const A*>(p.act);
  A acc[kMaxTokens];
#pragma unroll
  for (int m = 0; m < kMaxTokens; ++m) acc[m] = A(0);
  if (d < p.dim) {
    for (int64_t f = f0; f < f1; ++f) {
      if (!p.keep[f]) continue;  // block-uniform: the row is skipped by every thread
      const A w = to_acc(wd[f * p.dim + d]);
#pragma unroll
      for (int m = 0; m < kMaxTokens; ++m) {
        if (m < M) acc[m] += act[f * M + m] * w;
      }
    }
    A* part = static_cast<A*>(p.partial) + static_cast<int64_t>(blockIdx.y) * M * p.dim;
#pragma unroll
    for (int m = 0; m < kMaxTokens; ++m) {
      if (m < M) part[m * p.dim + d] = acc[m];
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
  for (int s = 0; s < splits; ++s) total += part[s * n + i];
  static_cast<T*>(p.y)[i] = from_acc<T>(total);
}

// ---- token sparsity -----------------------------------------------------------------------------

constexpr int kScanThreads = 256;

// Exclusive prefix sum of `v` over the block; `total` gets the block's sum. `scratch` holds one
// value per warp.
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

// One thread per 32-bit word (rows are a whole number of words when row_bytes % 4 == 0; else
// 16-bit halves).
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

int64_t workspace_elems_cuda(int64_t tokens, int64_t dim, int64_t features) {
  return static_cast<int64_t>(down_splits(features, dim)) * tokens * dim;
}

void cats_cuda(const CatsParams& p, CUstream_st* stream) {
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] { cats_kernel<T><<<elem_blocks(p.n), kElemThreads, 0, stream>>>(p); });
}

void cats_bwd_cuda(const CatsBwdParams& p, CUstream_st* stream) {
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T,
                    [&] { cats_bwd_kernel<T><<<elem_blocks(p.n), kElemThreads, 0, stream>>>(p); });
}

void mlp_cuda(const MlpParams& p, CUstream_st* stream) {
  const int splits = down_splits(p.features, p.dim);
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] {
    gate_up_kernel<T><<<ceil_div(p.features, kWarpsPerBlock), kWarpsPerBlock * 32, 0, stream>>>(p);
    down_partial_kernel<T><<<dim3(ceil_div(p.dim, kDownThreads), splits), kDownThreads, 0, stream>>>(p, splits);
    down_reduce_kernel<T><<<ceil_div(p.tokens * p.dim, kElemThreads), kElemThreads, 0, stream>>>(p, splits);
  });
}

}  // namespace slab::cats
