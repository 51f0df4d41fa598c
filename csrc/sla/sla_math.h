// SLA arithmetic shared by the CPU and CUDA kernels: the feature map, its derivative, the
// normalisation and the backward's per-row factors, and the choice of evaluation order. Templates
// over the arithmetic type A; the CPU kernels also call them on at::vec vectors.
#pragma once
#include <cstdint>

#include "core/common.h"

namespace slab::sla {

// phi = ReLU (SLAB's kernel function). max(x, 0) written as a select so NaN propagates on both
// sides (a NaN input must not be silently zeroed).
template <typename A>
SLAB_HD A phi(A x) {
  return x < A(0) ? A(0) : x;
}

// d phi / dx as a 0/1 factor; phi(x) > 0 exactly where it is 1, so kernels holding phi(x) test that.
template <typename A>
SLAB_HD A phi_grad_from_phi(A phi_x) {
  return phi_x > A(0) ? A(1) : A(0);
}

// The key feature of token j: phi(k_j), or 0 for a masked-out (padding) token.
template <typename A>
SLAB_HD A key_feature(A k, bool kept) {
  return kept ? phi(k) : A(0);
}

// den_i = phi(q_i) . z_i + eps.
template <typename A>
SLAB_HD A denominator(A qz, A eps) {
  return qz + eps;
}

// Backward per-row factors from o_i = num_i / den_i: d/d num_i = grad_o_i / den_i (elementwise,
// the caller multiplies by inv_den) and d/d den_i = -(grad_o_i . o_i) / den_i.
template <typename A>
SLAB_HD A grad_den(A grad_o_dot_o, A inv_den) {
  return -grad_o_dot_o * inv_den;
}

// SLAB's rule for the non-causal order: (phi(Q) phi(K)^T) V costs N^2 (D + Dv) multiply-adds,
// phi(Q) (phi(K)^T V) about 2 N D Dv; the quadratic order is taken when it is not more.
SLAB_HD bool use_quadratic(int64_t len, int64_t dim, int64_t vdim) { return len * (dim + vdim) <= 2 * dim * vdim; }

}  // namespace slab::sla
