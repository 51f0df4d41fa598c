// Conv-BN fold arithmetic, shared by the CPU and CUDA kernels. Templates over the arithmetic type
// A (float or double; the CPU kernels also call the elementwise ones on at::vec vectors).
#pragma once
#include <cmath>

#include "core/common.h"

namespace slab::convbn {

// The per-channel factors of eval-mode BatchNorm, y = (x - mean) * r * gamma + beta: r = 1 /
// sqrt(var + eps) as torch computes it (a variance of -eps gives inf, below that NaN, as there),
// and the weight scale g = gamma * r.
template <typename A>
struct Scale {
  A r, g;
};

template <typename A>
SLAB_HD Scale<A> fold_scale(A gamma, A var, A eps) {
  using std::sqrt;
  const A r = A(1) / sqrt(var + eps);
  return {r, gamma * r};
}

// b' = beta + (b - mean) * g, from centered = b - mean.
template <typename A>
SLAB_HD A fold_bias(A beta, A centered, A g) {
  return beta + centered * g;
}

// w' = w * g forward, dw = dw' * g backward (the same product).
template <typename A>
SLAB_HD A scale_elem(const A& v, const A& g) {
  return v * g;
}

// One more term of a row's sum of dw' * w (kept as a function so the CPU emulation of the CUDA
// reduction adds in the same way).
template <typename A>
SLAB_HD A dot_step(A acc, A grad, A w) {
  return acc + grad * w;
}

// dgamma = r * (sum_k dw'[k] w[k] + db' (b - mean)), from the row's sum of dw' * w.
template <typename A>
SLAB_HD A fold_grad_gamma(A dot, A grad_bias, A centered, A r) {
  return r * (dot + grad_bias * centered);
}

// Everything a kernel needs of channel o: r, g and bias - mean, from the accumulation-type
// vectors (a null optional vector reads as its neutral value: bias 0, gamma 1).
template <typename A>
struct Channel {
  A r, g, centered;
};

template <typename A>
SLAB_HD Channel<A> channel(const A* bias, const A* gamma, const A* mean, const A* var, A eps, int64_t o) {
  const Scale<A> s = fold_scale(gamma ? gamma[o] : A(1), var[o], eps);
  return {s.r, s.g, (bias ? bias[o] : A(0)) - mean[o]};
}

// The per-channel gradients from db' and the row's sum of dw' * w: (db, dgamma, dbeta).
template <typename A>
struct ChannelGrads {
  A bias, gamma, beta;
};

template <typename A>
SLAB_HD ChannelGrads<A> channel_grads(const Channel<A>& c, A grad_bias, A dot) {
  return {scale_elem(grad_bias, c.g), fold_grad_gamma(dot, grad_bias, c.centered, c.r), grad_bias};
}

}  // namespace slab::convbn
