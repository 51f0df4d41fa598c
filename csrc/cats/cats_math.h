// CATS per-element arithmetic, shared by the CPU and CUDA kernels. Templates over the arithmetic
// type A: the CPU kernels call them on float/double and on at::vec vectors (whose comparisons
// return all-ones lane masks, so `|` below is a lane-wise or), CUDA on float/double.
#pragma once
#include "core/common.h"

namespace slab::cats {

// sigmoid(x) from e = exp(-x) (the exponential is the only part that differs between the CPU
// vector library and CUDA, so it is computed by the caller).
template <typename A>
SLAB_HD A sigmoid_from_exp(const A& e) {
  return A(1) / (A(1) + e);
}

template <typename A>
SLAB_HD A silu_from_sigmoid(const A& x, const A& sig) {
  return x * sig;
}

// d silu / dx = sig * (1 + x * (1 - sig)).
template <typename A>
SLAB_HD A silu_grad_from_sigmoid(const A& x, const A& sig) {
  return sig * (A(1) + x * (A(1) - sig));
}

// The CATS threshold test on s = silu(x): kept when |s| > t (strictly: a value equal to the
// threshold is dropped, so t = 0 drops exact zeros only). NaN is kept, so a NaN input shows up in
// the output instead of being silently zeroed. For scalars the result converts to bool; for
// at::vec vectors it is a lane mask.
template <typename A>
SLAB_HD auto keep(const A& s, const A& t) {
  return (s > t) | (s < A(0) - t) | (s != s);
}

// Token selection (LeMo): whether a token with score s is kept, given the keep-th largest score
// kth of its sequence, the number of tokens tied with kth before it (ties_before) and how many
// tied tokens fit (ties_allowed = keep - number of scores above kth). Earlier ties win, so the
// kept set is exactly `keep` tokens and does not depend on the kernel's traversal order.
template <typename A>
SLAB_HD bool token_kept(A s, A kth, int64_t ties_before, int64_t ties_allowed) {
  return s > kth || (s == kth && ties_before < ties_allowed);
}

// Token rows (gather / scatter): the row of the full (batch, tokens) layout that kept row i
// (= b * keep + j) maps to, or -1 when its index lies outside [0, tokens) (skipped, never a write
// out of bounds: the CPU binding rejects such indices, a CUDA kernel cannot raise).
SLAB_HD int64_t full_row(const int64_t* index, int64_t i, int64_t keep, int64_t tokens) {
  const int64_t t = index[i];
  return t < 0 || t >= tokens ? -1 : (i / keep) * tokens + t;
}

}  // namespace slab::cats
