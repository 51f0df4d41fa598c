// Shared by CPU and CUDA kernels. Includes no torch header: kernels see only plain types.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define SLAB_HD __host__ __device__ __forceinline__
#else
#define SLAB_HD inline
#endif

// `#pragma unroll` in host-and-device code, for the device pass only (host compilers warn on it).
#if defined(__CUDA_ARCH__)
#define SLAB_UNROLL _Pragma("unroll")
#define SLAB_UNROLL_BY(N) _Pragma(SLAB_STR(unroll N))
#define SLAB_STR(x) #x
#else
#define SLAB_UNROLL
#define SLAB_UNROLL_BY(N)
#endif

namespace slab {

// a / b rounded up, and a rounded up to a multiple of b (a >= 0, b > 0): tile, chunk and block counts.
SLAB_HD constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
SLAB_HD constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Raw copies of rows in words as wide as the data allows: the widest of 16, 8, 4, 2 and 1 bytes
// that divides the row size and to which both base addresses are aligned (a view with an odd
// storage offset, or rows of an odd number of bytes, fall back to narrower words, down to bytes).
struct alignas(16) Word16 {
  uint32_t w[4];
};
SLAB_HD constexpr int copy_word_bytes(int64_t row_bytes, uint64_t src_addr, uint64_t dst_addr) {
  int w = 16;
  while (w > 1 && (row_bytes % w != 0 || src_addr % w != 0 || dst_addr % w != 0)) w /= 2;
  return w;
}

// Element types a kernel may be asked for; the binding layer maps torch dtypes onto these.
enum class DType : int8_t { kFloat32, kFloat16, kBFloat16, kFloat64 };

// Accumulation type: fp32 for every 16/32-bit input, fp64 only when the input is fp64
// (so float64 gradcheck sees float64 arithmetic).
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

}  // namespace slab

// Runs the trailing lambda body with `T` bound to the element type of `dtype`, taken from the
// side's type map (cpu_types.h or cuda_types.cuh), e.g.
//   SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { run<T>(p); });
#define SLAB_DTYPE_SWITCH(DTYPE, MAP, T, ...)    \
  [&] {                                          \
    switch (DTYPE) {                             \
      case ::slab::DType::kFloat32: {            \
        using T = MAP<::slab::DType::kFloat32>;  \
        return __VA_ARGS__();                    \
      }                                          \
      case ::slab::DType::kFloat16: {            \
        using T = MAP<::slab::DType::kFloat16>;  \
        return __VA_ARGS__();                    \
      }                                          \
      case ::slab::DType::kBFloat16: {           \
        using T = MAP<::slab::DType::kBFloat16>; \
        return __VA_ARGS__();                    \
      }                                          \
      case ::slab::DType::kFloat64: {            \
        using T = MAP<::slab::DType::kFloat64>;  \
        return __VA_ARGS__();                    \
      }                                          \
    }                                            \
  }()

// Runs the trailing lambda body with `W` bound to the unsigned word type of `BYTES` (1, 2, 4, 8 or
// 16, from copy_word_bytes).
#define SLAB_WORD_SWITCH(BYTES, W, ...) \
  [&] {                                 \
    switch (BYTES) {                    \
      case 16: {                        \
        using W = ::slab::Word16;       \
        return __VA_ARGS__();           \
      }                                 \
      case 8: {                         \
        using W = uint64_t;             \
        return __VA_ARGS__();           \
      }                                 \
      case 4: {                         \
        using W = uint32_t;             \
        return __VA_ARGS__();           \
      }                                 \
      case 2: {                         \
        using W = uint16_t;             \
        return __VA_ARGS__();           \
      }                                 \
      default: {                        \
        using W = uint8_t;              \
        return __VA_ARGS__();           \
      }                                 \
    }                                   \
  }()

// Binds a runtime bool to a compile-time constant.
#define SLAB_BOOL_SWITCH(COND, NAME, ...) \
  [&] {                                   \
    if (COND) {                           \
      constexpr bool NAME = true;         \
      return __VA_ARGS__();               \
    } else {                              \
      constexpr bool NAME = false;        \
      return __VA_ARGS__();               \
    }                                     \
  }()
