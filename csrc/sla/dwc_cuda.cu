// SLA depthwise-convolution branch, CUDA kernels. Channels are contiguous, so consecutive
// threads take consecutive 16-byte channel packs of a token (coalesced; single channels when a
// view is misaligned); the k x k neighbourhood of a token is re-read from L1/L2 by its neighbours.
// Weight gradient: one block per (b, h) slice and token range writes a row of partial sums, a
// second kernel adds the rows in order (deterministic, no atomics).
#include <algorithm>
#include <cstdint>

#include "core/cuda_types.cuh"
#include "core/vec_cuda.cuh"
#include "sla/dwc.h"
#include "sla/dwc_math.h"

namespace slab::sla {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxGridY = 65535;

template <typename T>
__device__ __forceinline__ const T* token_ptr(const void* base, const RowStrides& s, int64_t b, int64_t h, int64_t n) {
  return static_cast<const T*>(base) + b * s.b + h * s.h + n * s.n;
}

// grid.x: (token, channel pack) pairs of one slice, W channels per thread (16-byte packs of v,
// residual and out when all three are aligned row by row, see vectorized()); grid.y (strided):
// (b, h) slices. Weights and bias are small and L1-resident: read per element.
// (At least 2 blocks per SM, so up to 128 registers: the tap loops' address arithmetic needs more
// than the 64 ptxas picks by default for the float64 instantiations, which then spill.)
template <typename T, int W>
__global__ void __launch_bounds__(kThreads, 2) dwc_kernel(DwcParams p) {
  using A = acc_t<T>;
  const DwcGeometry& g = p.g;
  const int64_t C = g.channels, N = g.grid_h * g.grid_w;
  const int64_t e = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (e >= N * (C / W)) return;
  const RowPack item = row_pack(e, C, W);
  const int64_t n = item.row, c = item.channel, y = n / g.grid_w, x = n % g.grid_w;
  int64_t ilo, ihi, jlo, jhi;
  tap_range(y, g.pad_top, g.grid_h, g.kernel_h, ilo, ihi);
  tap_range(x, g.pad_left, g.grid_w, g.kernel_w, jlo, jhi);
  const A* weight = static_cast<const A*>(p.weight) + c;
  const A* bias = static_cast<const A*>(p.bias);
  for (int64_t bh = blockIdx.y; bh < g.batch * g.heads; bh += gridDim.y) {
    const int64_t b = bh / g.heads, h = bh % g.heads;
    A acc[W];
#pragma unroll
    for (int w = 0; w < W; ++w) acc[w] = bias ? bias[c + w] : A(0);
    if (p.residual) {
      A r[W];
      load_acc<W, Cache::kStream>(token_ptr<T>(p.residual, p.residual_stride, b, h, n) + c, r);
#pragma unroll
      for (int w = 0; w < W; ++w) acc[w] += r[w];
    }
    for (int64_t i = ilo; i < ihi; ++i) {
      for (int64_t j = jlo; j < jhi; ++j) {
        A src[W];
        load_acc<W>(token_ptr<T>(p.v, p.v_stride, b, h, tap_source(g, y, x, i, j)) + c, src);
        const A* tap_weight = weight + (i * g.kernel_w + j) * C;
#pragma unroll
        for (int w = 0; w < W; ++w) acc[w] = tap_fma(acc[w], tap_weight[w], src[w]);
      }
    }
    store_acc<W>(static_cast<T*>(p.out) + b * p.out_stride.b + h * p.out_stride.h + n * p.out_stride.n + c, acc);
  }
}

// Block = one (b, h) slice and range of its tokens (grad_token_range); each thread owns (tap,
// channel) entries of the block's partial row (the last tap row is the bias gradient) and sums
// over the range's tokens; consecutive threads take consecutive channels (coalesced).
template <typename T>
__global__ void __launch_bounds__(kThreads) weight_grad_partial_kernel(DwcWeightGradParams p) {
  using A = acc_t<T>;
  const DwcGeometry& g = p.g;
  const int64_t C = g.channels, taps = g.kernel_h * g.kernel_w, row_len = (taps + 1) * C;
  const int64_t slice = blockIdx.x / p.token_splits, b = slice / g.heads, h = slice % g.heads;
  int64_t n0, n1;
  grad_token_range(g.grid_h * g.grid_w, p.token_splits, blockIdx.x % p.token_splits, n0, n1);
  A* partial = static_cast<A*>(p.partial) + blockIdx.x * row_len;
  for (int64_t e = threadIdx.x; e < row_len; e += kThreads) {
    const int64_t tap = e / C, c = e % C, i = tap / g.kernel_w, j = tap % g.kernel_w;
    const bool is_bias = tap == taps;
    A total = 0;
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t y = n / g.grid_w, x = n % g.grid_w;
      const A grad = to_acc(token_ptr<T>(p.grad, p.grad_stride, b, h, n)[c]);
      if (is_bias) {
        total += grad;
        continue;
      }
      int64_t ilo, ihi, jlo, jhi;
      tap_range(y, g.pad_top, g.grid_h, g.kernel_h, ilo, ihi);
      tap_range(x, g.pad_left, g.grid_w, g.kernel_w, jlo, jhi);
      if (i >= ilo && i < ihi && j >= jlo && j < jhi)
        total = tap_fma(total, grad, to_acc(token_ptr<T>(p.v, p.v_stride, b, h, tap_source(g, y, x, i, j))[c]));
    }
    partial[e] = total;
  }
}

// Adds the partial rows in (slice, token range) order: deterministic.
template <typename A>
__global__ void __launch_bounds__(kThreads) weight_grad_reduce_kernel(DwcWeightGradParams p, int64_t rows) {
  const int64_t C = p.g.channels, taps = p.g.kernel_h * p.g.kernel_w, row_len = (taps + 1) * C;
  const int64_t e = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (e >= row_len) return;
  const A* partial = static_cast<const A*>(p.partial);
  A total = 0;
  for (int64_t r = 0; r < rows; ++r) total += partial[r * row_len + e];
  if (e < taps * C)
    static_cast<A*>(p.grad_weight)[e] = total;
  else
    static_cast<A*>(p.grad_bias)[e - taps * C] = total;
}

// One thread per (b, h, channel pack): reads the whole history, then shifts it (each thread
// touches only its own channels, so no synchronisation is needed).
template <typename T, int W>
__global__ void __launch_bounds__(kThreads) step_kernel(DwcStepParams p) {
  using A = acc_t<T>;
  const int64_t C = p.channels, K = p.kernel;
  const int64_t e = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (e >= p.batch * p.heads * (C / W)) return;
  const RowPack item = row_pack(e, C, W);
  const int64_t bh = item.row, c = item.channel;
  const T* v = static_cast<const T*>(p.v) + bh * C + c;
  T* cache = static_cast<T*>(p.cache) + bh * (K - 1) * C + c;
  const A* weight = static_cast<const A*>(p.weight) + c;
  A acc[W];
#pragma unroll
  for (int w = 0; w < W; ++w) acc[w] = p.bias ? static_cast<const A*>(p.bias)[c + w] : A(0);
  if (p.residual) {
    A r[W];
    load_acc<W, Cache::kStream>(static_cast<const T*>(p.residual) + bh * C + c, r);
#pragma unroll
    for (int w = 0; w < W; ++w) acc[w] += r[w];
  }
  // The cache is written by this kernel: plain (coherent) loads, not the read-only path.
  for (int64_t t = 0; t < K; ++t) {
    const Pack<T, W> hist = read_pack<W>(history_from_cache(t, K) ? cache + t * C : v);
#pragma unroll
    for (int w = 0; w < W; ++w) acc[w] = tap_fma(acc[w], weight[t * C + w], to_acc(hist.v[w]));
  }
  store_acc<W>(static_cast<T*>(p.out) + bh * C + c, acc);
  for (int64_t t = 0; t + 1 < K; ++t) {
    const Pack<T, W> next = read_pack<W>(history_from_cache(t + 1, K) ? cache + (t + 1) * C : v);
    write_pack<W>(cache + t * C, next);
  }
}

// 16-byte channel packs need every token row of every operand to start aligned.
template <typename T>
bool token_rows_aligned(const void* ptr, const RowStrides& s) {
  const int bytes = static_cast<int>(sizeof(T));
  return all_vec_aligned(ptr) && rows_vec_aligned(s.b, bytes) && rows_vec_aligned(s.h, bytes) &&
         rows_vec_aligned(s.n, bytes);
}

}  // namespace

void dwc_cuda(const DwcParams& p, CUstream_st* stream) {
  const auto slices = static_cast<unsigned>(std::min<int64_t>(p.g.batch * p.g.heads, kMaxGridY));
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] {
    constexpr int kW = kPackWidth<T>;
    const bool packed = p.g.channels % kW == 0 && token_rows_aligned<T>(p.v, p.v_stride) &&
                        token_rows_aligned<T>(p.out, p.out_stride) &&
                        (p.residual == nullptr || token_rows_aligned<T>(p.residual, p.residual_stride));
    const int64_t items = p.g.grid_h * p.g.grid_w * (packed ? p.g.channels / kW : p.g.channels);
    const dim3 grid(static_cast<unsigned>(ceil_div(items, kThreads)), slices);
    SLAB_BOOL_SWITCH(packed, kPacked, [&] { dwc_kernel<T, kPacked ? kW : 1><<<grid, kThreads, 0, stream>>>(p); });
  });
}

void dwc_weight_grad_cuda(const DwcWeightGradParams& p, CUstream_st* stream) {
  const int64_t rows = p.g.batch * p.g.heads * p.token_splits;  // partial rows, one block each
  const int64_t row_len = (p.g.kernel_h * p.g.kernel_w + 1) * p.g.channels;
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] {
    weight_grad_partial_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(p);
    weight_grad_reduce_kernel<acc_t<T>><<<ceil_div(row_len, kThreads), kThreads, 0, stream>>>(p, rows);
  });
}

void dwc_step_cuda(const DwcStepParams& p, CUstream_st* stream) {
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] {
    constexpr int kW = kPackWidth<T>;
    // All operands are contiguous (B, H, ., C): aligned bases and C in whole packs suffice.
    const bool packed =
        p.channels % kW == 0 && all_vec_aligned(static_cast<const T*>(p.v), static_cast<const T*>(p.cache),
                                                static_cast<const T*>(p.out), static_cast<const T*>(p.residual));
    const int64_t items = p.batch * p.heads * (packed ? p.channels / kW : p.channels);
    const auto blocks = static_cast<unsigned>(ceil_div(items, kThreads));
    SLAB_BOOL_SWITCH(packed, kPacked, [&] { step_kernel<T, kPacked ? kW : 1><<<blocks, kThreads, 0, stream>>>(p); });
  });
}

}  // namespace slab::sla
