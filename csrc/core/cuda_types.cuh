// CUDA side of the element-type map, conversions and block reductions. No torch headers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#include "core/common.h"

namespace slab {

template <DType D>
struct CudaScalarOf;
template <>
struct CudaScalarOf<DType::kFloat32> {
  using type = float;
};
template <>
struct CudaScalarOf<DType::kFloat16> {
  using type = __half;
};
template <>
struct CudaScalarOf<DType::kBFloat16> {
  using type = __nv_bfloat16;
};
template <>
struct CudaScalarOf<DType::kFloat64> {
  using type = double;
};
template <DType D>
using CudaScalar = typename CudaScalarOf<D>::type;

template <>
struct AccOf<__half> {
  using type = float;
};
template <>
struct AccOf<__nv_bfloat16> {
  using type = float;
};

template <typename T>
__device__ __forceinline__ acc_t<T> to_acc(T v) {
  return static_cast<acc_t<T>>(v);
}
template <>
__device__ __forceinline__ float to_acc<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over a 1-D block (blockDim.y == blockDim.z == 1: warps are numbered by threadIdx.x); every
// thread gets the result. `scratch` holds one value per warp.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  A total = 0;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  return total;
}

// Blocks of a grid-stride loop over n items, `threads` per block: one item per thread up to the
// 65535 blocks every grid dimension allows, the loop covering the rest.
inline int grid_stride_blocks(int64_t n, int threads) {
  const int64_t blocks = ceil_div(n, threads);
  return static_cast<int>(blocks < 1 ? 1 : (blocks > 65535 ? 65535 : blocks));
}

}  // namespace slab

// Launch errors are reported by the binding layer through cudaGetLastError (C10_CUDA_KERNEL_LAUNCH_CHECK).
