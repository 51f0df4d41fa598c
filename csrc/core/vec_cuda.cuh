// Device half of the 16-byte vector access (core/vec.h holds the host-callable split): loads of
// W elements converted to the accumulation type, stores converted back, and the grid-stride loop
// every elementwise kernel is written with. W is kPackWidth<T> on the vector path and 1 on the
// scalar one; both come from the same template, so the two paths cannot disagree in arithmetic.
#pragma once
#include <type_traits>

#include "core/cuda_types.cuh"
#include "core/vec.h"

namespace slab {

// How a load may be cached: kReuse for data read again soon (the read-only path, __ldg), kStream
// for data read exactly once (weights of a GEMV, the inputs of an elementwise pass: __ldcs, evict
// first, so they do not push reused lines out of L2).
enum class Cache { kReuse, kStream };

template <Cache C, typename V>
__device__ __forceinline__ V load_raw(const V* p) {
  if constexpr (C == Cache::kStream)
    return __ldcs(p);
  else
    return __ldg(p);
}

// W raw elements at p (p aligned to W * sizeof(T) when W > 1).
template <int W, Cache C = Cache::kReuse, typename T>
__device__ __forceinline__ Pack<T, W> load_pack(const T* p) {
  static_assert(W == 1 || W == kPackWidth<T>, "a pack is one element or 16 bytes");
  Pack<T, W> out;
  if constexpr (W == 1) {
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>)
      out.v[0] = load_raw<C>(p);
    else
      out.v[0] = *p;  // 16-bit types: a plain load (the cached intrinsics have no 16-bit float overloads)
  } else {
    const uint4 raw = load_raw<C>(reinterpret_cast<const uint4*>(p));
    out = *reinterpret_cast<const Pack<T, W>*>(&raw);
  }
  return out;
}

// W elements at p widened to the accumulation type (then converted to out's type A, normally
// acc_t<T>; fp8 quantization reads float64 inputs into floats).
template <int W, Cache C = Cache::kReuse, typename T, typename A>
__device__ __forceinline__ void load_acc(const T* p, A (&out)[W]) {
  const Pack<T, W> pack = load_pack<W, C>(p);
#pragma unroll
  for (int i = 0; i < W; ++i) out[i] = static_cast<A>(to_acc(pack.v[i]));
}

// W accumulation-type values narrowed to T and stored at p with one 16-byte store (W > 1).
template <int W, typename T>
__device__ __forceinline__ void store_acc(T* p, const acc_t<T> (&in)[W]) {
  static_assert(W == 1 || W == kPackWidth<T>, "a pack is one element or 16 bytes");
  if constexpr (W == 1) {
    *p = from_acc<T>(in[0]);
  } else {
    Pack<T, W> pack;
#pragma unroll
    for (int i = 0; i < W; ++i) pack.v[i] = from_acc<T>(in[i]);
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&pack);
  }
}

// Grid-stride loop over n elements in 16-byte packs of T (when `vectorized`) and a scalar tail:
// body(i, std::integral_constant<int, W>{}) handles elements [i, i + W), W = kPackWidth<T> or 1.
// `vectorized` must be all_vec_aligned(...) of every pointer the body touches at offset i.
template <typename T, typename Body>
__device__ __forceinline__ void for_each_pack(int64_t n, bool vectorized, Body&& body) {
  constexpr int kW = kPackWidth<T>;
  const PackSplit split = pack_split(n, kW, vectorized);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  for (int64_t k = first; k < split.packs; k += stride) body(k * kW, std::integral_constant<int, kW>{});
  for (int64_t k = first; k < split.tail; k += stride) body(split.packs * kW + k, std::integral_constant<int, 1>{});
}

// Blocks for for_each_pack: one pack per thread up to the grid limit.
template <typename T>
inline int pack_blocks(int64_t n, int threads, bool vectorized) {
  const PackSplit split = pack_split(n, kPackWidth<T>, vectorized);
  return grid_stride_blocks(split.packs > split.tail ? split.packs : split.tail, threads);
}

}  // namespace slab
