// CPU side of the element-type map and vector load/store helpers over at::vec.
#pragma once
// Header-only parts of torch (at::vec, c10's 16-bit floats, all inline) plus the stable ABI's
// parallel_for: the CPU kernels leave no unstable libtorch symbol behind (at::parallel_for and
// at::vec's Sleef-backed exp() would; see parallel_for and exp_vec below).
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include "core/common.h"

namespace slab {

template <DType D>
struct CpuScalarOf;
template <>
struct CpuScalarOf<DType::kFloat32> {
  using type = float;
};
template <>
struct CpuScalarOf<DType::kFloat16> {
  using type = c10::Half;
};
template <>
struct CpuScalarOf<DType::kBFloat16> {
  using type = c10::BFloat16;
};
template <>
struct CpuScalarOf<DType::kFloat64> {
  using type = double;
};
template <DType D>
using CpuScalar = typename CpuScalarOf<D>::type;

template <>
struct AccOf<c10::Half> {
  using type = float;
};
template <>
struct AccOf<c10::BFloat16> {
  using type = float;
};

// One vector of the accumulation type (8 floats or 4 doubles) per step; 16-bit inputs are
// widened on load and narrowed on store.
template <typename T>
using AccVec = at::vec::Vectorized<acc_t<T>>;
template <typename T>
constexpr int64_t kVecWidth = AccVec<T>::size();

template <typename T>
inline AccVec<T> load_vec(const T* p) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return AccVec<T>::loadu(p);
  } else {
    AccVec<T> v;
    at::vec::load_to_float<T>(p, v);
    return v;
  }
}

template <typename T>
inline void store_vec(T* p, const AccVec<T>& v) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    v.store(p);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, kVecWidth<T>);
  }
}

// Tail versions for the last, shorter piece of a row: loads pad with zeros, stores write n.
template <typename T>
inline AccVec<T> load_vec_n(const T* p, int64_t n) {
  T buf[kVecWidth<T>] = {};
  for (int64_t i = 0; i < n; ++i) buf[i] = p[i];
  return load_vec(buf);
}

template <typename T>
inline void store_vec_n(T* p, int64_t n, const AccVec<T>& v) {
  T buf[kVecWidth<T>];
  store_vec(buf, v);
  for (int64_t i = 0; i < n; ++i) p[i] = buf[i];
}

// The vector at p[i] of a row that ends at `end`: a full load/store, or the shorter tail piece.
template <typename T>
inline AccVec<T> load_at(const T* p, int64_t i, int64_t end) {
  return end - i >= kVecWidth<T> ? load_vec(p + i) : load_vec_n(p + i, end - i);
}

template <typename T>
inline void store_at(T* p, int64_t i, int64_t end, const AccVec<T>& v) {
  if (end - i >= kVecWidth<T>)
    store_vec(p + i, v);
  else
    store_vec_n(p + i, end - i, v);
}

// Zeroes the lanes at and past n, so padded lanes add nothing to a reduction.
template <typename V>
inline V keep_first_n(const V& v, int64_t n) {
  return n >= V::size() ? v : V::set(V(0), v, n);
}

// Loops over the vectors of a row of n elements: body(c, full) for c = 0, w, 2w, ..., with `full` a
// std::true_type for whole vectors and a std::false_type for the shorter last piece, so the body's
// loads and stores (load_piece / store_piece) have no tail test in the hot loop; with a test
// there, GCC keeps the loop's vectors on the stack.
template <int64_t W, typename Body>
inline void for_each_vec(int64_t n, const Body& body) {
  int64_t c = 0;
  for (; c + W <= n; c += W) body(c, std::true_type{});
  if (c < n) body(c, std::false_type{});
}

template <typename T, typename Full>
inline AccVec<T> load_piece(const T* p, int64_t i, int64_t end, Full) {
  if constexpr (Full::value)
    return load_vec(p + i);
  else
    return load_vec_n(p + i, end - i);
}

template <typename T, typename Full>
inline void store_piece(T* p, int64_t i, int64_t end, const AccVec<T>& v, Full) {
  if constexpr (Full::value)
    store_vec(p + i, v);
  else
    store_vec_n(p + i, end - i, v);
}

// Sum over the vectors of a row of n elements of term(c, full) (as for_each_vec; a V each), the
// lanes at and past n of the last piece zeroed. Four independent accumulators: one chain of
// dependent adds costs the add's latency (about 4 cycles) per vector, four let the adds overlap.
// sum_vec_pairs does the same for a term that yields two vectors (a VecPair {V a, b}).
template <typename V, typename Term>
inline V sum_vecs(int64_t n, const Term& term) {
  constexpr int64_t w = V::size();
  constexpr std::true_type full;
  V a0(0), a1(0), a2(0), a3(0);
  int64_t c = 0;
  for (; c + 4 * w <= n; c += 4 * w) {
    a0 = a0 + term(c, full), a1 = a1 + term(c + w, full), a2 = a2 + term(c + 2 * w, full),
    a3 = a3 + term(c + 3 * w, full);
  }
  for (; c + w <= n; c += w) a0 = a0 + term(c, full);
  if (c < n) a1 = a1 + keep_first_n(term(c, std::false_type{}), n - c);
  return (a0 + a1) + (a2 + a3);
}

template <typename V>
struct VecPair {
  V a, b;
};

template <typename V, typename Term>
inline VecPair<V> sum_vec_pairs(int64_t n, const Term& term) {
  constexpr int64_t w = V::size();
  constexpr std::true_type full;
  VecPair<V> s0{V(0), V(0)}, s1{V(0), V(0)};
  int64_t c = 0;
  for (; c + 2 * w <= n; c += 2 * w) {
    const VecPair<V> t0 = term(c, full), t1 = term(c + w, full);
    s0 = {s0.a + t0.a, s0.b + t0.b}, s1 = {s1.a + t1.a, s1.b + t1.b};
  }
  for (; c + w <= n; c += w) {
    const VecPair<V> t = term(c, full);
    s0 = {s0.a + t.a, s0.b + t.b};
  }
  if (c < n) {
    const VecPair<V> t = term(c, std::false_type{});
    s1 = {s1.a + keep_first_n(t.a, n - c), s1.b + keep_first_n(t.b, n - c)};
  }
  return {s0.a + s1.a, s0.b + s1.b};
}

// at::parallel_for's contract (chunks of at least `grain` iterations on torch's intra-op thread
// pool) through the stable C shim's torch_parallel_for (torch >= 2.10). Declared here rather than
// through torch/csrc/stable/ops.h: at::vec's headers forbid TORCH_TARGET_VERSION, and without it
// the stable headers would also reach shim functions newer than torch 2.11 (its error getters).
extern "C" int32_t torch_parallel_for(int64_t begin, int64_t end, int64_t grain_size,
                                      void (*func)(int64_t begin, int64_t end, void* ctx), void* ctx);

template <typename F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const auto chunk = [](int64_t b, int64_t e, void* ctx) { (*static_cast<const F*>(ctx))(b, e); };
  if (torch_parallel_for(begin, end, grain, chunk, const_cast<void*>(static_cast<const void*>(&f))) != 0)
    throw std::runtime_error("slab: torch_parallel_for failed");
}

// exp of every lane. float on AVX2: Cody-Waite range reduction x = n ln2 + r, |r| <= ln2 / 2, a
// degree-6 polynomial for e^r (Cephes' expf coefficients, ~1 ulp) and 2^n applied as two
// power-of-two factors, so that subnormal results and overflow to inf come out right; NaN
// propagates. Other types and ISAs: the C library's exp per lane.
template <typename V>
inline V exp_vec(const V& x) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<V, at::vec::Vectorized<float>>) {
    const __m256 v = _mm256_min_ps(_mm256_set1_ps(89.0f), _mm256_max_ps(_mm256_set1_ps(-104.0f), __m256(x)));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), v);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
      p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i ni = _mm256_cvtps_epi32(n);  // in [-150, 129]: two factors 2^(n/2) keep it normal
    const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
    const auto pow2 = [](__m256i e) {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
    };
    return _mm256_mul_ps(_mm256_mul_ps(p, pow2(n1)), pow2(n2));
  }
#endif
  return x.map([](typename V::value_type a) { return std::exp(a); });
}

}  // namespace slab
