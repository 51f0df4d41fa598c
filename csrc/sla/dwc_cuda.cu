// SLA depthwise-convolution branch, CUDA kernels. Channels are contiguous, so consecutive
// threads take consecutive channels of a token (coalesced); the k x k neighbourhood of a token
// is re-read from L1/L2 by its neighbours. Weight gradient: one block per (b, h) slice writes a
// row of partial sums, a second kernel adds the rows in slice order (deterministic, no atomics).
#include <algorithm>
#include <cstdint>

#include "core/cuda_types.cuh"
#include "sla/dwc.h"
#include "sla/dwc_math.h"

namespace slab::sla {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxGridY = 65535;

template <typename T>
__device__ __forceinline__ const T* token_ptr(const void* base, const RowStrides& s, int64_t b, int64_t h,
                                              int64_t n) {
  return static_cast<const T*>(base) + b * s.b + h * s.h + n * s.n;
}

// grid.x: (token, channel) pairs of one slice; grid.y (strided): (b, h) slices.
template <typename T>
__global__ void __launch_bounds__(kThreads) dwc_kernel(DwcParams p) {
  using A = acc_t<T>;
  const DwcGeometry& g = p.g;
  const int64_t C = g.channels, N = g.grid_h * g.grid_w;
  const int64_t e = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (e >= N * C) return;
  const int64_t n = e / C, c = e % C, y = n / g.grid_w, x = n % g.grid_w;
  int64_t ilo, ihi, jlo, jhi;
  tap_range(y, g.pad_top, g.grid_h, g.kernel_h, ilo, ihi);
  tap_range(x, g.pad_left, g.grid_w, g.kernel_w, jlo, jhi);
  const A* weight = static_cast<const A*>(p.weight);
  const A* bias = static_cast<const A*>(p.bias);
  for (int64_t bh = blockIdx.y; bh < g.batch * g.heads; bh += gridDim.y) {
    const int64_t b = bh / g.heads, h = bh % g.heads;
    A acc = bias ? bias[c] : A(0);
    if (p.residual) acc += to_acc(token_ptr<T>(p.residual, p.residual_stride, b, h, n)[c]);
    for (int64_t i = ilo; i < ihi; ++i) {
      for (int64_t j = jlo; j < jhi; ++j) {
        const T* src = token_ptr<T>(p.v, p.v_stride, b, h, tap_source(g, y, x, i, j));
        acc = tap_fma(acc, weight[(i * g.kernel_w + j) * C + c], to_acc(src[c]));
      }
    }
    static_cast<T*>(p.out)[b * p.out_stride.b + h * p.out_stride.h + n * p.out_stride.n + c] = from_acc<T>(acc);
  }
}

// Block = one (b, h) slice; each thread owns (tap, channel) entries of the slice's partial row
// (the last tap row is the bias gradient) and sums over the slice's tokens.
template <typename T>
__global__ void __launch_bounds__(kThreads) weight_grad_partial_kernel(DwcWeightGradParams p) {
  using A = acc_t<T>;
  const DwcGeometry& g = p.g;
  const int64_t C = g.channels, taps = g.kernel_h * g.kernel_w, row_len = (taps + 1) * C;
  const int64_t b = blockIdx.x / g.heads, h = blockIdx.x % g.heads;
  A* partial = static_cast<A*>(p.partial) + blockIdx.x * row_len;
  for (int64_t e = threadIdx.x; e < row_len; e += kThreads) {
    const int64_t tap = e / C, c = e % C, i = tap / g.kernel_w, j = tap % g.kernel_w;
    const bool is_bias = tap == taps;
    A total = 0;
    for (int64_t y = 0; y < g.grid_h; ++y) {
      int64_t ilo, ihi;
      tap_range(y, g.pad_top, g.grid_h, g.kernel_h, ilo, ihi);
      if (!is_bias && (i < ilo || i >= ihi)) continue;
      for (int64_t x = 0; x < g.grid_w; ++x) {
        int64_t jlo, jhi;
        tap_range(x, g.pad_left, g.grid_w, g.kernel_w, jlo, jhi);
        if (!is_bias && (j < jlo || j >= jhi)) continue;
        const A grad = to_acc(token_ptr<T>(p.grad, p.grad_stride, b, h, y * g.grid_w + x)[c]);
        total = is_bias ? total + grad
                        : tap_fma(total, grad, to_acc(token_ptr<T>(p.v, p.v_stride, b, h, tap_source(g, y, x, i, j))[c]));
      }
    }
    partial[e] = total;
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads) weight_grad_reduce_kernel(DwcWeightGradParams p, int64_t slices) {
  const int64_t C = p.g.channels, taps = p.g.kernel_h * p.g.kernel_w, row_len = (taps + 1) * C;
  const int64_t e = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (e >= row_len) return;
  const A* partial = static_cast<const A*>(p.partial);
  A total = 0;
  for (int64_t s = 0; s < slices; ++s) total += partial[s * row_len + e];
  if (e < taps * C) static_cast<A*>(p.grad_weight)[e] = total;
  else static_cast<A*>(p.grad_bias)[e - taps * C] = total;
}

// One thread per (b, h, channel): reads the whole history, then shifts it (each thread touches
// only its own channel, so no synchronisation is needed).
template <typename T>
__global__ void __launch_bounds__(kThreads) step_kernel(DwcStepParams p) {
  using A = acc_t<T>;
  const int64_t C = p.channels, K = p.kernel;
  const int64_t e = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (e >= p.batch * p.heads * C) return;
  const int64_t bh = e / C, c = e % C;
  const T* v = static_cast<const T*>(p.v) + bh * C;
  T* cache = static_cast<T*>(p.cache) + bh * (K - 1) * C;
  const A* weight = static_cast<const A*>(p.weight);
  A acc = p.bias ? static_cast<const A*>(p.bias)[c] : A(0);
  if (p.residual) acc += to_acc(static_cast<const T*>(p.residual)[bh * C + c]);
  for (int64_t t = 0; t < K; ++t) {
    const T value = history_from_cache(t, K) ? cache[t * C + c] : v[c];
    acc = tap_fma(acc, weight[t * C + c], to_acc(value));
  }
  static_cast<T*>(p.out)[bh * C + c] = from_acc<T>(acc);
  for (int64_t t = 0; t + 1 < K; ++t) cache[t * C + c] = history_from_cache(t + 1, K) ? cache[(t + 1) * C + c] : v[c];
}

}  // namespace

void dwc_cuda(const DwcParams& p, CUstream_st* stream) {
  const int64_t elems = p.g.grid_h * p.g.grid_w * p.g.channels;
  const dim3 grid(ceil_div(elems, kThreads), static_cast<unsigned>(std::min<int64_t>(p.g.batch * p.g.heads, kMaxGridY)));
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] { dwc_kernel<T><<<grid, kThreads, 0, stream>>>(p); });
}

void dwc_weight_grad_cuda(const DwcWeightGradParams& p, CUstream_st* stream) {
  const int64_t slices = p.g.batch * p.g.heads;
  const int64_t row_len = (p.g.kernel_h * p.g.kernel_w + 1) * p.g.channels;
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] {
    weight_grad_partial_kernel<T><<<static_cast<unsigned>(slices), kThreads, 0, stream>>>(p);
    weight_grad_reduce_kernel<acc_t<T>><<<ceil_div(row_len, kThreads), kThreads, 0, stream>>>(p, slices);
  });
}

void dwc_step_cuda(const DwcStepParams& p, CUstream_st* stream) {
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] {
    step_kernel<T><<<ceil_div(p.batch * p.heads * p.channels, kThreads), kThreads, 0, stream>>>(p);
  });
}

}  // namespace slab::sla
