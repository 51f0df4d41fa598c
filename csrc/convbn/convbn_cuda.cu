// Conv-BN fold CUDA kernels. Forward: one grid-stride pass over the flattened weight in 16-byte
// packs (core/vec_cuda.cuh), the pack's channel from its offset. Backward: the row pass
// (dw = dw' * g and each block's share of sum dw' * w, see convbn.h for the split of rows), then a
// per-channel pass that adds the shares in order and writes db, dgamma, dbeta.
#include <algorithm>

#include "convbn/convbn.h"
#include "convbn/convbn_math.h"
#include "core/vec_cuda.cuh"

namespace slab::convbn {
namespace {

template <typename A>
__device__ __forceinline__ const A* vec(const void* p) {
  return static_cast<const A*>(p);
}

template <typename A, typename P>
__device__ __forceinline__ Channel<A> channel_of(const P& p, int64_t o) {
  return channel(vec<A>(p.bias), vec<A>(p.bn_weight), vec<A>(p.running_mean), vec<A>(p.running_var),
                 static_cast<A>(p.eps), o);
}

template <typename T>
__global__ void __launch_bounds__(kFoldThreads) fold_kernel(const FoldParams p, bool vectorized) {
  using A = acc_t<T>;
  const auto* w = static_cast<const T*>(p.weight);
  auto* out = static_cast<T*>(p.out_weight);
  for_each_pack<T>(p.channels * p.k, vectorized, [&](int64_t e, auto width) {
    constexpr int W = decltype(width)::value;
    const A g = channel_of<A>(p, row_of(e, p.k)).g;  // a pack never straddles two rows (fold_width)
    A v[W];
    load_acc<W, Cache::kStream>(w + e, v);
#pragma unroll
    for (int i = 0; i < W; ++i) v[i] = scale_elem(v[i], g);
    store_acc<W>(out + e, v);
  });
  auto* b = static_cast<T*>(p.out_bias);
  const A* beta = vec<A>(p.bn_bias);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; o < p.channels; o += stride) {
    const Channel<A> c = channel_of<A>(p, o);
    b[o] = from_acc<T>(fold_bias(beta ? beta[o] : A(0), c.centered, c.g));
  }
}

// Blocks (channel, split): split blockIdx.y; channels grid-strided over blockIdx.x (more than
// 65535 channels loop), so no block needs a 64-bit division (a subroutine call on the GPU).
template <typename T, int W, bool kDw, bool kDot>
__global__ void __launch_bounds__(kBwdThreads) bwd_rows_kernel(const FoldBwdParams p, int64_t per_split) {
  using A = acc_t<T>;
  __shared__ A scratch[kBwdThreads / 32];
  const auto* gw = static_cast<const T*>(p.grad_weight);
  const int splits = static_cast<int>(gridDim.y), s = static_cast<int>(blockIdx.y);
  const Range r = bwd_range(bwd_items(p.k, W), per_split, s);
  for (int64_t o = blockIdx.x; o < p.channels; o += gridDim.x) {
    const int64_t row = o * p.k;
    A g = A(0);
    if constexpr (kDw) g = channel_of<A>(p, o).g;
    A dot = A(0);
    // One 16-byte pack of each stream per thread and step: the many resident blocks (<= 40
    // registers) keep enough bytes in flight, and ptxas, left to unroll, spills around the
    // slow-path calls of the float64 division and square root.
#pragma unroll 1
    for (int64_t q = r.begin + threadIdx.x; q < r.end; q += kBwdThreads) {
      const int64_t e = row + q * W;
      A d[W];
      load_acc<W, Cache::kStream>(gw + e, d);
      if constexpr (kDot) {
        A x[W];
        load_acc<W, Cache::kStream>(static_cast<const T*>(p.weight) + e, x);
#pragma unroll
        for (int i = 0; i < W; ++i) dot = dot_step(dot, d[i], x[i]);
      }
      if constexpr (kDw) {
#pragma unroll
        for (int i = 0; i < W; ++i) d[i] = scale_elem(d[i], g);
        store_acc<W>(static_cast<T*>(p.grad_weight_out) + e, d);
      }
    }
    if constexpr (kDot) {
      dot = block_sum(dot, scratch);
      if (threadIdx.x == 0) static_cast<A*>(p.workspace)[o * splits + s] = dot;
    }
  }
}

template <typename A, bool kDot>
__global__ void __launch_bounds__(kFoldThreads) bwd_channels_kernel(const FoldBwdParams p, int splits) {
  const A* gb = vec<A>(p.grad_bias);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; o < p.channels; o += stride) {
    A dot = A(0);
    if constexpr (kDot) {
      const A* partial = static_cast<const A*>(p.workspace) + o * splits;
      for (int s = 0; s < splits; ++s) dot += partial[s];  // in split order: deterministic
    }
    const ChannelGrads<A> g = channel_grads(channel_of<A>(p, o), gb ? gb[o] : A(0), dot);
    static_cast<A*>(p.d_bias)[o] = g.bias;
    static_cast<A*>(p.d_bn_bias)[o] = g.beta;
    if constexpr (kDot) static_cast<A*>(p.d_bn_weight)[o] = g.gamma;
  }
}

template <typename T>
void fold_launch(const FoldParams& p, CUstream_st* stream) {
  const bool vectorized = fold_width(kPackWidth<T>, p.k, sizeof(T), p.weight, p.out_weight) > 1;
  const int blocks = std::max(pack_blocks<T>(p.channels * p.k, kFoldThreads, vectorized),
                              grid_stride_blocks(p.channels, kFoldThreads));
  fold_kernel<T><<<blocks, kFoldThreads, 0, stream>>>(p, vectorized);
}

template <typename T>
void fold_backward_launch(const FoldBwdParams& p, CUstream_st* stream) {
  using A = acc_t<T>;
  const int width = fold_width(kPackWidth<T>, p.k, sizeof(T), p.grad_weight, p.weight, p.grad_weight_out);
  const int64_t items = bwd_items(p.k, width);
  const int splits = bwd_splits(p.channels, items);
  const bool dw = p.grad_weight_out != nullptr, dot = p.d_bn_weight != nullptr;
  SLAB_BOOL_SWITCH(dot, kDot, [&] {
    SLAB_BOOL_SWITCH(dw, kDw, [&] {
      if constexpr (kDw || kDot) {  // else db and dbeta alone: the per-channel pass
        const dim3 grid(grid_stride_blocks(p.channels, 1), splits);
        SLAB_BOOL_SWITCH(width > 1, kVec, [&] {
          constexpr int W = kVec ? kPackWidth<T> : 1;
          bwd_rows_kernel<T, W, kDw, kDot><<<grid, kBwdThreads, 0, stream>>>(p, bwd_per_split(items, splits));
        });
      }
    });
    bwd_channels_kernel<A, kDot><<<grid_stride_blocks(p.channels, kFoldThreads), kFoldThreads, 0, stream>>>(p, splits);
  });
}

}  // namespace

void fold_cuda(const FoldParams& p, CUstream_st* stream) {
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] { fold_launch<T>(p, stream); });
}

void fold_backward_cuda(const FoldBwdParams& p, CUstream_st* stream) {
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] { fold_backward_launch<T>(p, stream); });
}

}  // namespace slab::convbn
