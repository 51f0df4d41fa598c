// Shared by CPU and CUDA kernels. Includes no torch header: kernels see only plain types.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define SLAB_HD __host__ __device__ __forceinline__
#else
#define SLAB_HD inline
#endif

namespace slab {

// a / b rounded up, and a rounded up to a multiple of b (a >= 0, b > 0): tile, chunk and block counts.
SLAB_HD constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
SLAB_HD constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Element types a kernel may be asked for; the binding layer maps torch dtypes onto these.
enum class DType : int8_t { kFloat32, kFloat16, kBFloat16, kFloat64 };

// Accumulation type: fp32 for every 16/32-bit input, fp64 only when the input is fp64
// (so float64 gradcheck sees float64 arithmetic).
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

}  // namespace slab

// Runs the trailing lambda body with `T` bound to the element type of `dtype`, taken from the
// side's type map (cpu_types.h or cuda_types.cuh), e.g.
//   SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { run<T>(p); });
#define SLAB_DTYPE_SWITCH(DTYPE, MAP, T, ...)                                             \
  [&] {                                                                                   \
    switch (DTYPE) {                                                                      \
      case ::slab::DType::kFloat32: { using T = MAP<::slab::DType::kFloat32>; return __VA_ARGS__(); } \
      case ::slab::DType::kFloat16: { using T = MAP<::slab::DType::kFloat16>; return __VA_ARGS__(); } \
      case ::slab::DType::kBFloat16: { using T = MAP<::slab::DType::kBFloat16>; return __VA_ARGS__(); } \
      case ::slab::DType::kFloat64: { using T = MAP<::slab::DType::kFloat64>; return __VA_ARGS__(); } \
    }                                                                                     \
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
