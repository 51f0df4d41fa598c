// Per-element arithmetic of the optimizer update rules, shared by the CPU kernels (called on
// at::vec vectors and on scalars) and the CUDA kernels (scalars). `V` is a vector or scalar of
// the accumulation type; broadcasting constructors V(a) build the constants.
#pragma once
#include <cmath>
#include <type_traits>

#include "core/common.h"
#include "core/vec.h"
#include "optim/optim.h"

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

// ---- the rules of the multi-tensor engine -------------------------------------------------------
//
// A rule is what one optimizer does to the elements of its lists; the engine (optim.h) loads the
// element of every list into registers, calls apply, stores the lists the rule writes and adds
// its sum terms into per-chunk partials. Members:
//   kLists        lists read, in the order the op passes its TensorLists (<= kMaxLists)
//   kState        bit l set: list l holds the accumulation type (moments, x0), else the param dtype
//   kWritten      bit l set: list l is stored back
//   kSums         sums of squares reduced per tensor (<= kMaxSums); kCpuAccs: independent CPU
//                 accumulators
//   found_inf     nonzero *found_inf: the step is skipped (null: never)
//   consts<V>(t)  the constants of tensor t (its position in the whole list) as V, once per chunk
//   apply<Ops>(k, r, s)  r[l]: element of list l, updated in place; s[j]: the value whose square
//                 sum j adds (every reduction here is a squared norm; the engine adds s * s with
//                 one fused multiply-add, as the per-optimizer loops before it compiled to)
// V is an at::vec vector on the CPU and the accumulation type on CUDA; Ops supplies what differs
// between them: sqrt, sign and stored (the value after a round trip through the param dtype). A
// list that is absent (null data, e.g. sq_norm's `others`) reads as 0. A new optimizer is one rule
// here plus one binding.

// The element type of list L of a rule: the accumulation type for state lists, else T.
template <typename T, typename Rule, int L>
using ListElem = std::conditional_t<((Rule::kState >> L) & 1) != 0, acc_t<T>, T>;

// The first element of chunk c in every list of a rule (null for an absent optional list), and
// whether all of them allow 16-byte packs. Shared by the CUDA rule kernel and its host emulation
// (tests/host/optim_engine.cpp).
template <typename T, typename Rule>
SLAB_HD bool chunk_pointers(const ChunkTable& t, const ChunkSpan& c, void* (&ptr)[kMaxLists]) {
  bool aligned = true;
  static_for<Rule::kLists>([&](auto l) {
    using E = ListElem<T, Rule, decltype(l)::value>;
    E* base = static_cast<E*>(t.data[l][c.slot]);
    ptr[l] = base ? base + c.begin : nullptr;
    aligned = aligned && all_vec_aligned(static_cast<const E*>(ptr[l]));
  });
  return aligned;
}

// Reciprocal gradient scale (GradScaler's scale), negated for maximize.
SLAB_HD float grad_factor(const float* grad_scale, bool maximize) {
  const float s = grad_scale ? 1.0f / *grad_scale : 1.0f;
  return maximize ? -s : s;
}

SLAB_HD bool skip_step(const float* found_inf) { return found_inf != nullptr && *found_inf != 0.0f; }

// out[t] = ||a_t * scale + weight_decay * b_t||^2 (b optional).
template <typename A>
struct SqNormRule {
  static constexpr int kLists = 2, kSums = 1, kCpuAccs = 4;
  static constexpr unsigned kState = 0, kWritten = 0;
  const float* found_inf;
  const float* grad_scale;
  A weight_decay;
  template <typename V>
  struct Consts {
    V scale, wd;
  };
  template <typename V>
  SLAB_HD Consts<V> consts(int64_t) const {
    return {V(static_cast<A>(grad_factor(grad_scale, false))), V(weight_decay)};
  }
  template <typename Ops, typename V, int L, int S>
  SLAB_HD static void apply(const Consts<V>& k, V (&r)[L], V (&s)[S]) {
    s[0] = effective_grad<V>(r[0], r[1], k.scale, k.wd);
  }
};

// DoG/SGD: lists x, g, x0; x <- x - eta[t] * d; sum ||x_new - x0||^2 of the stored iterate.
template <typename A>
struct DogRule {
  static constexpr int kLists = 3, kSums = 1, kCpuAccs = 1;
  static constexpr unsigned kState = 0b100, kWritten = 0b001;
  const float* found_inf;
  const float* grad_scale;
  bool maximize;
  A weight_decay;
  const A* eta;  // [count]
  template <typename V>
  struct Consts {
    V scale, wd, eta;
  };
  template <typename V>
  SLAB_HD Consts<V> consts(int64_t t) const {
    return {V(static_cast<A>(grad_factor(grad_scale, maximize))), V(weight_decay), V(eta[t])};
  }
  template <typename Ops, typename V, int L, int S>
  SLAB_HD static void apply(const Consts<V>& k, V (&r)[L], V (&s)[S]) {
    const V d = effective_grad<V>(r[1], r[0], k.scale, k.wd);
    r[0] = Ops::stored(sgd_step<V>(r[0], d, k.eta));  // the distance is of the rounded iterate
    s[0] = r[0] - r[2];
  }
};

// Lion: lists x, g, m.
template <typename A>
struct LionRule {
  static constexpr int kLists = 3, kSums = 0, kCpuAccs = 1;
  static constexpr unsigned kState = 0b100, kWritten = 0b101;
  const float* found_inf;
  const float* grad_scale;
  bool maximize;
  A one_minus_beta1, one_minus_beta2, weight_decay;
  const A* lr;  // [1]
  template <typename V>
  struct Consts {
    V scale, b1, b2, wd, lr;
  };
  template <typename V>
  SLAB_HD Consts<V> consts(int64_t) const {
    return {V(static_cast<A>(grad_factor(grad_scale, maximize))), V(one_minus_beta1), V(one_minus_beta2),
            V(weight_decay), V(*lr)};
  }
  template <typename Ops, typename V, int L, int S>
  SLAB_HD static void apply(const Consts<V>& k, V (&r)[L], V (&)[S]) {
    const V g = r[1] * k.scale, m = r[2];
    r[0] = lion_step<V>(r[0], Ops::sign(lion_direction<V>(m, g, k.b1)), k.lr, k.wd);
    r[2] = lion_momentum<V>(m, g, k.b2);
  }
};

// Ops::sqrt as the function object lamb_direction / adamp_direction take.
template <typename Ops>
struct SqrtOf {
  template <typename V>
  SLAB_HD V operator()(const V& v) const {
    return Ops::sqrt(v);
  }
};

// LAMB's and AdamP's constants shared by both stages; bias_corr: [count, 2] = 1 / bc1, 1 / sqrt(bc2).
template <typename A>
struct AdamConsts {
  const float* found_inf;
  const float* grad_scale;
  bool maximize;
  A one_minus_beta1, one_minus_beta2, eps;
  const A* bias_corr;
};

// LAMB stage 1: lists x, g, m, v; writes m, v; sums ||x||^2 and ||u||^2.
template <typename A>
struct LambStage1Rule : AdamConsts<A> {
  static constexpr int kLists = 4, kSums = 2, kCpuAccs = 1;
  static constexpr unsigned kState = 0b1100, kWritten = 0b1100;
  A weight_decay;
  template <typename V>
  struct Consts {
    V scale, b1, b2, eps, wd, inv_bc1, rsqrt_bc2;
  };
  template <typename V>
  SLAB_HD Consts<V> consts(int64_t t) const {
    return {V(static_cast<A>(grad_factor(this->grad_scale, this->maximize))),
            V(this->one_minus_beta1),
            V(this->one_minus_beta2),
            V(this->eps),
            V(weight_decay),
            V(this->bias_corr[2 * t]),
            V(this->bias_corr[2 * t + 1])};
  }
  template <typename Ops, typename V, int L, int S>
  SLAB_HD static void apply(const Consts<V>& k, V (&r)[L], V (&s)[S]) {
    const V g = r[1] * k.scale;
    r[2] = first_moment<V>(r[2], g, k.b1);
    r[3] = second_moment<V>(r[3], g, k.b2);
    const V u = lamb_direction<V>(r[2], r[3], r[0], k.inv_bc1, k.rsqrt_bc2, k.eps, k.wd, SqrtOf<Ops>{});
    s[0] = r[0];
    s[1] = u;
  }
};

// LAMB stage 2: lists x, m, v; x <- x - lr[t] * u (u recomputed from the stored moments).
template <typename A>
struct LambStage2Rule : AdamConsts<A> {
  static constexpr int kLists = 3, kSums = 0, kCpuAccs = 1;
  static constexpr unsigned kState = 0b110, kWritten = 0b001;
  A weight_decay;
  const A* lr;  // [count]: lr * trust ratio
  template <typename V>
  struct Consts {
    V eps, wd, inv_bc1, rsqrt_bc2, lr;
  };
  template <typename V>
  SLAB_HD Consts<V> consts(int64_t t) const {
    return {V(this->eps), V(weight_decay), V(this->bias_corr[2 * t]), V(this->bias_corr[2 * t + 1]), V(lr[t])};
  }
  template <typename Ops, typename V, int L, int S>
  SLAB_HD static void apply(const Consts<V>& k, V (&r)[L], V (&)[S]) {
    const V u = lamb_direction<V>(r[1], r[2], r[0], k.inv_bc1, k.rsqrt_bc2, k.eps, k.wd, SqrtOf<Ops>{});
    r[0] = sgd_step<V>(r[0], u, k.lr);
  }
};

// Momentum SGD with a per-tensor scale (LARS): lists x, g, buf.
template <typename A>
struct MomentumRule {
  static constexpr int kLists = 3, kSums = 0, kCpuAccs = 1;
  static constexpr unsigned kState = 0b100, kWritten = 0b101;
  const float* found_inf;
  const float* grad_scale;
  bool maximize;
  A momentum, weight_decay;
  const A* scale;  // [count]
  const A* lr;     // [1]
  template <typename V>
  struct Consts {
    V gscale, mu, wd, lr, ts;
  };
  template <typename V>
  SLAB_HD Consts<V> consts(int64_t t) const {
    return {V(static_cast<A>(grad_factor(grad_scale, maximize))), V(momentum), V(weight_decay), V(*lr), V(scale[t])};
  }
  template <typename Ops, typename V, int L, int S>
  SLAB_HD static void apply(const Consts<V>& k, V (&r)[L], V (&)[S]) {
    const V d = effective_grad<V>(r[1], r[0], k.gscale, k.wd);
    r[2] = momentum_buffer<V>(r[2], d, k.mu, k.ts);
    r[0] = sgd_step<V>(r[0], r[2], k.lr);
  }
};

// Averaging lerp: lists avg, x.
template <typename A>
struct LerpRule {
  static constexpr int kLists = 2, kSums = 0, kCpuAccs = 1;
  static constexpr unsigned kState = 0, kWritten = 0b01;
  const float* found_inf;  // always null
  A weight;
  template <typename V>
  struct Consts {
    V w;
  };
  template <typename V>
  SLAB_HD Consts<V> consts(int64_t) const {
    return {V(weight)};
  }
  template <typename Ops, typename V, int L, int S>
  SLAB_HD static void apply(const Consts<V>& k, V (&r)[L], V (&)[S]) {
    r[0] = lerp_to<V>(r[0], r[1], k.w);
  }
};

}  // namespace slab::optim
