// 16-byte vector access for streaming kernels: the host-callable half (no CUDA, no torch), so the
// CPU tests check the same split of a range into vector packs and a scalar tail that the CUDA
// kernels run. The device loads and stores are in core/vec_cuda.cuh.
//
// A streaming kernel over n elements handles them as `packs` full packs of `width` elements (one
// 16-byte load or store each) followed by `tail` single elements. The vector part is used only when
// every pointer the kernel touches is 16-byte aligned (a misaligned view, e.g. x[1:], takes the
// scalar path: width 1); rows of `row_elems` elements (row-wise kernels) additionally need a row
// size in bytes that is a multiple of 16, so that every row starts aligned.
#pragma once
#include <cstdint>
#include <cstring>

#include "core/common.h"

namespace slab {

constexpr int kVecBytes = 16;

// Elements of T in one 16-byte pack (4 floats, 8 halves, 2 doubles, 16 bytes); a variable, so device code may use it
// without --expt-relaxed-constexpr.
template <typename T>
constexpr int kPackWidth = kVecBytes / static_cast<int>(sizeof(T));

SLAB_HD bool vec_aligned(const void* p) { return reinterpret_cast<uint64_t>(p) % kVecBytes == 0; }

// True when every pointer given is 16-byte aligned (null pointers, i.e. absent optional tensors,
// count as aligned).
SLAB_HD bool all_vec_aligned() { return true; }
template <typename P, typename... Rest>
SLAB_HD bool all_vec_aligned(const P* p, const Rest*... rest) {
  return (p == nullptr || vec_aligned(p)) && all_vec_aligned(rest...);
}

// Rows of row_elems elements of elem_bytes each all start aligned when the base is aligned.
SLAB_HD bool rows_vec_aligned(int64_t row_elems, int elem_bytes) { return (row_elems * elem_bytes) % kVecBytes == 0; }

// W elements of T as one aligned unit: a copy of it is one 16-byte load or store on the GPU when
// W * sizeof(T) == 16 (the pointer must then be 16-byte aligned).
template <typename T, int W>
struct alignas(sizeof(T) * W) Pack {
  T v[W];
};

// Plain (host and device) pack access, for kernel bodies that the CPU tests also run; on the host
// a memcpy, so the emulation does not depend on type punning.
template <int W, typename T>
SLAB_HD Pack<T, W> read_pack(const T* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const Pack<T, W>*>(p);
#else
  Pack<T, W> out;
  std::memcpy(&out, p, sizeof(out));
  return out;
#endif
}
template <int W, typename T>
SLAB_HD void write_pack(T* p, const Pack<T, W>& v) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<Pack<T, W>*>(p) = v;
#else
  std::memcpy(p, &v, sizeof(v));
#endif
}

// The split of n elements into 16-byte packs and a scalar tail.
struct PackSplit {
  int64_t packs;  // full packs, elements [0, packs * width)
  int64_t tail;   // single elements after them
  int width;      // elements per pack (1 on the scalar path)
  SLAB_HD int64_t items() const { return packs + tail; }
  // Work item k of [0, items()): its first element and its element count (width or 1).
  SLAB_HD int64_t offset(int64_t k) const { return k < packs ? k * width : packs * width + (k - packs); }
  SLAB_HD int count(int64_t k) const { return k < packs ? width : 1; }
};

SLAB_HD PackSplit pack_split(int64_t n, int width, bool vectorized) {
  if (!vectorized || width <= 1) return PackSplit{0, n, 1};
  return PackSplit{n / width, n % width, width};
}

}  // namespace slab
