// PRepBN per-element arithmetic, shared by the CPU and CUDA kernels. Every function is a
// template over the arithmetic type A, so the CPU kernels also call them on at::vec vectors.
#pragma once
#include "core/common.h"

namespace slab::prepbn {

// Chan et al.'s merge of two partial (count, mean, M2) moments. `n_a` is the count before the
// merge; counts are per row block and the same for every channel, hence passed as scalars.
template <typename A, typename S>
SLAB_HD void merge_moments(A& mean, A& m2, S n_a, const A& mean_b, const A& m2_b, S n_b) {
  const S n = n_a + n_b;
  if (n_b == S(0)) return;
  const A w_b = A(n_b / n);
  const A delta = mean_b - mean;
  mean = mean + delta * w_b;
  m2 = m2 + m2_b + delta * delta * A(n_a) * w_b;
}

// Per-channel coefficients of the forward output, folded once per channel:
//   y = (x - mu) * s + al * x + t + k * xhat_row
template <typename A> struct FwdCoeffs { A mu, s, al, t, k; };

template <typename A>
SLAB_HD FwdCoeffs<A> fwd_coeffs(A norm_w, A norm_b, A bn_w, A bn_b, A alpha, A bn_mean, A bn_rstd,
                                A lam) {
  const A one_m = A(1) - lam;
  return {bn_mean, one_m * bn_w * bn_rstd, one_m * alpha, one_m * bn_b + lam * norm_b,
          lam * norm_w};
}

template <typename A>
SLAB_HD A fwd_elem(A x, A mu, A s, A al, A t, A k, A xhat_row) {
  return (x - mu) * s + al * x + t + k * xhat_row;
}

// Row-normalised value for LayerNorm (row_mean = mean) and RMSNorm (row_mean = 0).
template <typename A>
SLAB_HD A row_xhat(A x, A row_mean, A row_rstd) {
  return (x - row_mean) * row_rstd;
}

// Per-channel coefficients of dx:
//   dx = p * dy - kept * (c0 + xhat_bn * c1) + row_rstd * (h - h_mean - xhat_row * hx_mean),
//   h = k * dy,
// where p = (1 - lam)(bn_w * bn_rstd + alpha), c0/c1 = (1 - lam) bn_w bn_rstd / n * sum dy / sum
// dy*xhat_bn (the gradient through the batch mean and variance), k = lam * norm_w.
template <typename A> struct BwdCoeffs { A mu, rstd, p, c0, c1, k; };

template <typename A>
SLAB_HD BwdCoeffs<A> bwd_coeffs(A norm_w, A bn_w, A alpha, A bn_mean, A bn_rstd, A sum_dy,
                                A sum_dy_xhat, A count, A lam, bool training) {
  const A one_m = A(1) - lam;
  const A q = training ? one_m * bn_w * bn_rstd / count : A(0);
  return {bn_mean, bn_rstd, one_m * (bn_w * bn_rstd + alpha), q * sum_dy, q * sum_dy_xhat,
          lam * norm_w};
}

template <typename A>
SLAB_HD A bwd_elem(A dy, A x, A mu, A rstd, A p, A c0, A c1, A kept, A h, A row_rstd, A xhat_row,
                   A h_mean, A hx_mean) {
  const A xhat_bn = (x - mu) * rstd;
  return p * dy - kept * (c0 + xhat_bn * c1) + row_rstd * (h - h_mean - xhat_row * hx_mean);
}

}  // namespace slab::prepbn
