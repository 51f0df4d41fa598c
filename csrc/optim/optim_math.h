// Per-element arithmetic of the optimizer update rules, shared by the CPU kernels (called on
// at::vec vectors and on scalars) and the CUDA kernels (scalars). `V` is a vector or scalar of
// the accumulation type; broadcasting constructors V(a) build the constants.
#pragma once
#include <cmath>

#include "core/common.h"

namespace slab::optim {

// The gradient the rule sees: the unscaled (and, for maximize, negated) gradient plus the L2
// penalty's gradient weight_decay * x (DoG and LARS add weight decay to the gradient).
template <typename V>
SLAB_HD V effective_grad(const V& g, const V& x, const V& g_scale, const V& weight_decay) {
  return g * g_scale + weight_decay * x;
}

// One SGD-form step with a per-tensor step size: x - eta * d.
template <typename V>
SLAB_HD V sgd_step(const V& x, const V& d, const V& eta) {
  return x - eta * d;
}

// Squared distance contribution of one element: (x - x0)^2.
template <typename V>
SLAB_HD V sq_diff(const V& x, const V& x0) {
  const V d = x - x0;
  return d * d;
}

// The interpolations below take 1 - beta computed in double by the caller: 1 - float(0.999)
// is off by 1.3e-5 relative.

// Lion's interpolation whose sign is the update: beta1 * m + (1 - beta1) * g.
template <typename V>
SLAB_HD V lion_direction(const V& m, const V& g, const V& one_minus_beta1) {
  return m + (g - m) * one_minus_beta1;
}

// Lion's momentum update: beta2 * m + (1 - beta2) * g.
template <typename V>
SLAB_HD V lion_momentum(const V& m, const V& g, const V& one_minus_beta2) {
  return m + (g - m) * one_minus_beta2;
}

// Decoupled weight decay then the signed step: x * (1 - lr*wd) - lr * sign(c), sign(0) = 0.
template <typename A>
SLAB_HD A sign_of(A c) {
  return c > A(0) ? A(1) : (c < A(0) ? A(-1) : A(0));
}

template <typename V>
SLAB_HD V lion_step(const V& x, const V& sign_c, const V& lr, const V& weight_decay) {
  return x * (V(1) - lr * weight_decay) - lr * sign_c;
}

// Adam's moment updates: m + (1-beta1)(g - m), v + (1-beta2)(g^2 - v).
template <typename V>
SLAB_HD V first_moment(const V& m, const V& g, const V& one_minus_beta1) {
  return m + (g - m) * one_minus_beta1;
}
template <typename V>
SLAB_HD V second_moment(const V& v, const V& g, const V& one_minus_beta2) {
  return v + (g * g - v) * one_minus_beta2;
}

// LAMB's per-element update before the trust ratio: Adam's direction plus decoupled weight decay.
// `rsqrt_bc2` = 1 / sqrt(bc2) and `inv_bc1` = 1 / bc1 are hoisted out of the loop.
template <typename V, typename Sqrt>
SLAB_HD V lamb_direction(const V& m, const V& v, const V& x, const V& inv_bc1, const V& rsqrt_bc2, const V& eps,
                         const V& weight_decay, Sqrt sqrt_fn) {
  return m * inv_bc1 / (sqrt_fn(v) * rsqrt_bc2 + eps) + weight_decay * x;
}

// AdamP's unprojected direction: n / (sqrt(v) * rsqrt_bc2 + eps).
template <typename V, typename Sqrt>
SLAB_HD V adamp_direction(const V& n, const V& v, const V& rsqrt_bc2, const V& eps, Sqrt sqrt_fn) {
  return n / (sqrt_fn(v) * rsqrt_bc2 + eps);
}

// AdamP's step: decoupled (ratio-scaled) weight decay, then the projected direction p - k x.
template <typename V>
SLAB_HD V adamp_step(const V& x, const V& p, const V& k, const V& decay, const V& step_size) {
  return x * (V(1) - decay) - step_size * (p - k * x);
}

// Momentum SGD with a per-tensor scale: the new buffer, then x - lr * buf.
template <typename V>
SLAB_HD V momentum_buffer(const V& buf, const V& d, const V& momentum, const V& scale) {
  return momentum * buf + scale * d;
}

// Polynomial-decay averaging: avg + w * (x - avg).
template <typename V>
SLAB_HD V lerp_to(const V& avg, const V& x, const V& w) {
  return avg + w * (x - avg);
}

}  // namespace slab::optim
