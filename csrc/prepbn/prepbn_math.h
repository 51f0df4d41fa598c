// PRepBN per-element arithmetic, shared by the CPU and CUDA kernels. Every function is a
// template over the arithmetic type A, so the CPU kernels also call them on at::vec vectors.
#pragma once
#include <cmath>

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

// One more kept row v in a running (mean, m2) of n rows, inv_n = 1 / n (n counts v already; the
// same for every channel of a row, hence one reciprocal per row): Welford's update, as the CPU
// kernel does it on vectors.
template <typename A>
SLAB_HD void welford_push(A& mean, A& m2, A inv_n, A v) {
  const A delta = v - mean;
  mean += delta * inv_n;
  m2 += delta * (v - mean);
}

// The batch statistics of the forward from the merged moments: mean, 1/sqrt(biased var + eps)
// and the unbiased variance (the running-stat update). With fewer than 2 kept rows all three are
// NaN: the CUDA forward does not read the count to the host (it would sync), so such a batch
// shows as NaN outputs instead of the CPU's error.
template <typename A>
struct BatchStats {
  A mean, rstd, var;
};

template <typename A>
SLAB_HD BatchStats<A> batch_stats(A mean, A m2, A count, A eps) {
  using std::sqrt;
  if (!(count > A(1))) return {A(NAN), A(NAN), A(NAN)};
  return {mean, A(1) / sqrt(m2 / count + eps), m2 / (count - A(1))};
}

// Per-channel coefficients of the forward output, folded once per channel:
//   y = (x - mu) * s + al * x + t + k * xhat_row
template <typename A>
struct FwdCoeffs {
  A mu, s, al, t, k;
};

template <typename A>
SLAB_HD FwdCoeffs<A> fwd_coeffs(A norm_w, A norm_b, A bn_w, A bn_b, A alpha, A bn_mean, A bn_rstd, A lam) {
  const A one_m = A(1) - lam;
  return {bn_mean, one_m * bn_w * bn_rstd, one_m * alpha, one_m * bn_b + lam * norm_b, lam * norm_w};
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

// Per-channel coefficients of dx, and two terms per row:
//   dx = dy * (p + row_rstd * k) - kept * (c0 + c1r * (x - mu)) + shift + slope * (x - row_mean),
// where p = (1 - lam)(bn_w * bn_rstd + alpha); c0 = q * sum dy and c1r = q * bn_rstd * sum dy*xhat_bn
// with q = (1 - lam) bn_w bn_rstd / n (the gradient through the batch mean and variance);
// k = lam * norm_w; and per row, with h = k * dy, shift = -row_rstd * mean_c(h) and
// slope = -row_rstd^2 * mean_c(h * xhat_row) (LayerNorm's backward). Differences from a mean stay
// explicit, so large offsets do not cancel; the rest is folded to keep the per-element work small.
template <typename A>
struct BwdCoeffs {
  A mu, p, c0, c1r, k;
};

template <typename A>
SLAB_HD BwdCoeffs<A> bwd_coeffs(A norm_w, A bn_w, A alpha, A bn_mean, A bn_rstd, A sum_dy, A sum_dy_xhat, A count,
                                A lam, bool training) {
  const A one_m = A(1) - lam;
  const A q = training ? one_m * bn_w * bn_rstd / count : A(0);
  return {bn_mean, one_m * (bn_w * bn_rstd + alpha), q * sum_dy, q * sum_dy_xhat * bn_rstd, lam * norm_w};
}

template <typename A>
struct BwdRowTerms {
  A shift, slope;
};

template <typename A>
SLAB_HD BwdRowTerms<A> bwd_row_terms(A row_rstd, A h_mean, A hx_mean) {
  return {-row_rstd * h_mean, -row_rstd * row_rstd * hx_mean};
}

template <typename A>
SLAB_HD A bwd_elem(A dy, A x, A mu, A p, A c0, A c1r, A k, A kept, A row_rstd, A row_mean, A shift, A slope) {
  return dy * (p + row_rstd * k) - kept * (c0 + c1r * (x - mu)) + (shift + slope * (x - row_mean));
}

// One channel's term of d_alpha = (1 - lam) * sum_c (sum dy*xhat_bn / bn_rstd + bn_mean * sum dy).
template <typename A>
SLAB_HD A alpha_grad_term(A sum_dy, A sum_dy_xhat, A bn_mean, A bn_rstd, A lam) {
  return (A(1) - lam) * (sum_dy_xhat / bn_rstd + bn_mean * sum_dy);
}

}  // namespace slab::prepbn
