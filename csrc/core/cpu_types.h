// CPU side of the element-type map and vector load/store helpers over at::vec.
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "core/common.h"

namespace slab {

template <DType D> struct CpuScalarOf;
template <> struct CpuScalarOf<DType::kFloat32> { using type = float; };
template <> struct CpuScalarOf<DType::kFloat16> { using type = c10::Half; };
template <> struct CpuScalarOf<DType::kBFloat16> { using type = c10::BFloat16; };
template <> struct CpuScalarOf<DType::kFloat64> { using type = double; };
template <DType D> using CpuScalar = typename CpuScalarOf<D>::type;

template <> struct AccOf<c10::Half> { using type = float; };
template <> struct AccOf<c10::BFloat16> { using type = float; };

// One vector of the accumulation type (8 floats or 4 doubles) per step; 16-bit inputs are
// widened on load and narrowed on store.
template <typename T> using AccVec = at::vec::Vectorized<acc_t<T>>;
template <typename T> constexpr int64_t kVecWidth = AccVec<T>::size();

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
  if (end - i >= kVecWidth<T>) store_vec(p + i, v);
  else store_vec_n(p + i, end - i, v);
}

// Zeroes the lanes at and past n, so padded lanes add nothing to a reduction.
template <typename V>
inline V keep_first_n(const V& v, int64_t n) {
  return n >= V::size() ? v : V::set(V(0), v, n);
}

}  // namespace slab
