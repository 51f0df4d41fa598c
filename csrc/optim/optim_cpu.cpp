// CPU side of the multi-tensor engine: the chunks of all tensors of a list are one flat task
// list for parallel_for (torch's thread pool); each chunk runs at::vec over its elements and, for reductions,
// writes one partial sum, added per tensor in chunk order (thread-count independent results).

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/cpu_types.h"
#include "optim/optim.h"
#include "optim/optim_math.h"

namespace slab::optim {
namespace {

struct Chunk {
  int64_t tensor, begin, end;
};

std::vector<Chunk> chunks(const TensorList& list) {
  std::vector<Chunk> out;
  for (int64_t t = 0; t < list.count; ++t)
    for (int64_t b = 0; b < list.numel[t]; b += kCpuChunk)
      out.push_back({t, b, std::min(list.numel[t], b + kCpuChunk)});
  return out;
}

// Runs fn(chunk) -> partial over every chunk in parallel; returns the per-tensor sums.
template <typename A, typename Fn>
std::vector<A> for_each_chunk(const TensorList& list, const Fn& fn) {
  const std::vector<Chunk> cs = chunks(list);
  std::vector<A> partial(cs.size(), A(0));
  parallel_for(0, static_cast<int64_t>(cs.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) partial[i] = fn(cs[i]);
  });
  std::vector<A> sums(list.count, A(0));
  for (size_t i = 0; i < cs.size(); ++i) sums[cs[i].tensor] += partial[i];
  return sums;
}

template <typename T>
const T* in(const TensorList& l, int64_t t) { return static_cast<const T*>(l.data[t]); }
template <typename T>
T* out(const TensorList& l, int64_t t) { return static_cast<T*>(l.data[t]); }

// Reciprocal gradient scale (GradScaler's scale), negated for maximize.
float grad_factor(const float* grad_scale, bool maximize) {
  const float s = grad_scale ? 1.0f / *grad_scale : 1.0f;
  return maximize ? -s : s;
}

bool skip_step(const float* found_inf) { return found_inf != nullptr && *found_inf != 0.0f; }

// ---- squared norms ---------------------------------------------------------------------------

template <typename T>
void sq_norm(const SqNormParams& p) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  constexpr int64_t w = kVecWidth<T>;
  const V scale(static_cast<A>(grad_factor(p.grad_scale, false))), wd(static_cast<A>(p.weight_decay));
  const bool has_b = p.b.count > 0;
  const auto sums = for_each_chunk<A>(p.a, [&](const Chunk& c) {
    const T* a = in<T>(p.a, c.tensor);
    const T* b = has_b ? in<T>(p.b, c.tensor) : nullptr;
    auto term = [&](int64_t i) {
      const V bv = has_b ? load_at(b, i, c.end) : V(0);
      const V d = effective_grad<V>(load_at(a, i, c.end), bv, scale, wd);  // tail lanes load as 0
      return d * d;
    };
    // Four independent accumulators: the add latency, not memory, would bound one chain.
    V acc0(0), acc1(0), acc2(0), acc3(0);
    int64_t i = c.begin;
    for (; i + 4 * w <= c.end; i += 4 * w) {
      acc0 = acc0 + term(i);
      acc1 = acc1 + term(i + w);
      acc2 = acc2 + term(i + 2 * w);
      acc3 = acc3 + term(i + 3 * w);
    }
    for (; i < c.end; i += w) acc0 = acc0 + term(i);
    return at::vec::vec_reduce_all<A>(std::plus<V>(), (acc0 + acc1) + (acc2 + acc3));
  });
  std::copy(sums.begin(), sums.end(), static_cast<A*>(p.out));
}

// ---- DoG update + distance of the new iterate --------------------------------------------------

template <typename T>
void dog_update(const DogUpdateParams& p) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  constexpr int64_t w = kVecWidth<T>;
  if (skip_step(p.found_inf)) return;
  const V scale(static_cast<A>(grad_factor(p.grad_scale, p.maximize))), wd(static_cast<A>(p.weight_decay));
  const auto* eta = static_cast<const A*>(p.eta);
  const auto sums = for_each_chunk<A>(p.x, [&](const Chunk& c) {
    T* x = out<T>(p.x, c.tensor);
    const T* g = in<T>(p.g, c.tensor);
    const A* x0 = in<A>(p.x0, c.tensor);
    const V eta_v(eta[c.tensor]);
    V acc(0);
    for (int64_t i = c.begin; i < c.end; i += w) {
      const V xv = load_at(x, i, c.end);
      const V d = effective_grad<V>(load_at(g, i, c.end), xv, scale, wd);
      store_at(x, i, c.end, sgd_step<V>(xv, d, eta_v));
      // The distance is of the stored (for bf16: rounded) iterate, as the reference measures it.
      acc = acc + sq_diff<V>(load_at(x, i, c.end), load_at(x0, i, c.end));
    }
    return at::vec::vec_reduce_all<A>(std::plus<V>(), acc);
  });
  for (int64_t t = 0; t < p.x.count; ++t) *static_cast<A*>(p.dist2[t]) = sums[t];
}

// ---- Lion --------------------------------------------------------------------------------------

template <typename V>
V sign_vec(const V& c) {
  return V::blendv(V(0), V(1), c > V(0)) - V::blendv(V(0), V(1), c < V(0));
}

template <typename T>
void lion(const LionParams& p) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  constexpr int64_t w = kVecWidth<T>;
  if (skip_step(p.found_inf)) return;
  const V scale(static_cast<A>(grad_factor(p.grad_scale, p.maximize)));
  const V b1(static_cast<A>(1.0 - p.beta1)), b2(static_cast<A>(1.0 - p.beta2)), wd(static_cast<A>(p.weight_decay));
  const V lr(*static_cast<const A*>(p.lr));
  for_each_chunk<A>(p.x, [&](const Chunk& c) {
    T* x = out<T>(p.x, c.tensor);
    const T* g = in<T>(p.g, c.tensor);
    A* m = out<A>(p.m, c.tensor);
    for (int64_t i = c.begin; i < c.end; i += w) {
      const V gv = load_at(g, i, c.end) * scale, mv = load_at(m, i, c.end);
      const V sgn = sign_vec(lion_direction<V>(mv, gv, b1));
      store_at(x, i, c.end, lion_step<V>(load_at(x, i, c.end), sgn, lr, wd));
      store_at(m, i, c.end, lion_momentum<V>(mv, gv, b2));
    }
    return A(0);
  });
}

// ---- LAMB ------------------------------------------------------------------------------------------

// The bias corrections (1 / bc1, 1 / sqrt(bc2)) of tensor `t`, as vectors: each tensor counts its
// own steps (LAMB and AdamP).
template <typename V, typename A>
struct BiasCorr {
  V inv_bc1, rsqrt_bc2;
  BiasCorr(const void* bias_corr, int64_t t)
      : inv_bc1(static_cast<const A*>(bias_corr)[2 * t]), rsqrt_bc2(static_cast<const A*>(bias_corr)[2 * t + 1]) {}
};

template <typename T>
void lamb_stage1(const LambParams& p) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  constexpr int64_t w = kVecWidth<T>;
  auto* norms = static_cast<A*>(p.norms);
  if (skip_step(p.found_inf)) {
    std::fill(norms, norms + 2 * p.x.count, A(0));
    return;
  }
  const V scale(static_cast<A>(grad_factor(p.grad_scale, p.maximize))), b1(static_cast<A>(1.0 - p.beta1)),
      b2(static_cast<A>(1.0 - p.beta2)), eps(static_cast<A>(p.eps)), wd(static_cast<A>(p.weight_decay));
  const auto sqrt_v = [](const V& v) { return v.sqrt(); };
  // Two sums per chunk: ||x||^2 and ||u||^2, added per tensor in chunk order.
  const std::vector<Chunk> cs = chunks(p.x);
  std::vector<A> part(2 * cs.size(), A(0));
  parallel_for(0, static_cast<int64_t>(cs.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t ci = begin; ci < end; ++ci) {
      const Chunk& c = cs[ci];
      const T* x = in<T>(p.x, c.tensor);
      const T* g = in<T>(p.g, c.tensor);
      A* m = out<A>(p.m, c.tensor);
      A* v = out<A>(p.v, c.tensor);
      const BiasCorr<V, A> bc(p.bias_corr, c.tensor);
      V xs(0), us(0);
      for (int64_t i = c.begin; i < c.end; i += w) {
        const V xv = load_at(x, i, c.end), gv = load_at(g, i, c.end) * scale;
        const V mv = first_moment<V>(load_at(m, i, c.end), gv, b1);
        const V vv = second_moment<V>(load_at(v, i, c.end), gv, b2);
        store_at(m, i, c.end, mv);
        store_at(v, i, c.end, vv);
        const V u = lamb_direction<V>(mv, vv, xv, bc.inv_bc1, bc.rsqrt_bc2, eps, wd, sqrt_v);
        const V u_kept = keep_first_n(u, c.end - i);  // padded lanes are 0/eps (NaN when eps = 0)
        xs = xs + xv * xv;
        us = us + u_kept * u_kept;
      }
      part[2 * ci] = at::vec::vec_reduce_all<A>(std::plus<V>(), xs);
      part[2 * ci + 1] = at::vec::vec_reduce_all<A>(std::plus<V>(), us);
    }
  });
  std::fill(norms, norms + 2 * p.x.count, A(0));
  for (size_t ci = 0; ci < cs.size(); ++ci) {
    norms[2 * cs[ci].tensor] += part[2 * ci];
    norms[2 * cs[ci].tensor + 1] += part[2 * ci + 1];
  }
}

template <typename T>
void lamb_stage2(const LambParams& p) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  constexpr int64_t w = kVecWidth<T>;
  if (skip_step(p.found_inf)) return;
  const V eps(static_cast<A>(p.eps)), wd(static_cast<A>(p.weight_decay));
  const auto sqrt_v = [](const V& v) { return v.sqrt(); };
  const auto* lr = static_cast<const A*>(p.lr);
  for_each_chunk<A>(p.x, [&](const Chunk& c) {
    T* x = out<T>(p.x, c.tensor);
    const A* m = in<A>(p.m, c.tensor);
    const A* v = in<A>(p.v, c.tensor);
    const V step(lr[c.tensor]);
    const BiasCorr<V, A> bc(p.bias_corr, c.tensor);
    for (int64_t i = c.begin; i < c.end; i += w) {
      const V xv = load_at(x, i, c.end);
      const V u = lamb_direction<V>(load_at(m, i, c.end), load_at(v, i, c.end), xv, bc.inv_bc1, bc.rsqrt_bc2, eps,
                                    wd, sqrt_v);
      store_at(x, i, c.end, sgd_step<V>(xv, u, step));
    }
    return A(0);
  });
}

// ---- momentum SGD with per-tensor scale (LARS) ----------------------------------------------------

template <typename T>
void momentum(const MomentumParams& p) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  constexpr int64_t w = kVecWidth<T>;
  if (skip_step(p.found_inf)) return;
  const V scale(static_cast<A>(grad_factor(p.grad_scale, p.maximize))), mu(static_cast<A>(p.momentum)),
      wd(static_cast<A>(p.weight_decay)), lr(*static_cast<const A*>(p.lr));
  const auto* tensor_scale = static_cast<const A*>(p.scale);
  for_each_chunk<A>(p.x, [&](const Chunk& c) {
    T* x = out<T>(p.x, c.tensor);
    const T* g = in<T>(p.g, c.tensor);
    A* buf = out<A>(p.buf, c.tensor);
    const V ts(tensor_scale[c.tensor]);
    for (int64_t i = c.begin; i < c.end; i += w) {
      const V xv = load_at(x, i, c.end);
      const V d = effective_grad<V>(load_at(g, i, c.end), xv, scale, wd);
      const V b = momentum_buffer<V>(load_at(buf, i, c.end), d, mu, ts);
      store_at(buf, i, c.end, b);
      store_at(x, i, c.end, sgd_step<V>(xv, b, lr));
    }
    return A(0);
  });
}

// ---- AdamP (row-wise: one task = whole rows of one tensor) ----------------------------------------

struct RowTask {
  int64_t tensor, row_begin, row_end, row_base;  // row_base: first row of the tensor in row_sums
};

std::vector<RowTask> row_tasks(const AdamPParams& p) {
  std::vector<RowTask> out;
  int64_t base = 0;
  for (int64_t t = 0; t < p.x.count; ++t) {
    const int64_t rows = p.rows[t], cols = rows > 0 ? p.x.numel[t] / rows : 0;
    const int64_t per = std::max<int64_t>(1, kCpuChunk / std::max<int64_t>(cols, 1));
    for (int64_t r = 0; r < rows; r += per) out.push_back({t, r, std::min(rows, r + per), base});
    base += rows;
  }
  return out;
}

template <typename T>
struct AdamPConsts {
  using A = acc_t<T>;
  using V = AccVec<T>;
  V scale, b1, b2, eps;
  explicit AdamPConsts(const AdamPParams& p)
      : scale(static_cast<A>(grad_factor(p.grad_scale, p.maximize))), b1(static_cast<A>(1.0 - p.beta1)),
        b2(static_cast<A>(1.0 - p.beta2)), eps(static_cast<A>(p.eps)) {}
};

template <typename T>
void adamp_stage1(const AdamPParams& p) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  constexpr int64_t w = kVecWidth<T>;
  auto* sums = static_cast<A*>(p.row_sums);
  const auto tasks = row_tasks(p);
  if (skip_step(p.found_inf)) {
    int64_t total = 0;
    for (int64_t t = 0; t < p.x.count; ++t) total += p.rows[t];
    std::fill(sums, sums + 4 * total, A(0));
    return;
  }
  const AdamPConsts<T> k(p);
  const auto sqrt_v = [](const V& v) { return v.sqrt(); };
  parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t ti = begin; ti < end; ++ti) {
      const RowTask& task = tasks[ti];
      const int64_t cols = p.x.numel[task.tensor] / p.rows[task.tensor];
      const T* x = in<T>(p.x, task.tensor);
      const T* g = in<T>(p.g, task.tensor);
      A* m = out<A>(p.m, task.tensor);
      A* v = out<A>(p.v, task.tensor);
      const BiasCorr<V, A> bc(p.bias_corr, task.tensor);
      for (int64_t r = task.row_begin; r < task.row_end; ++r) {
        V gx(0), gg(0), xx(0), xp(0);
        const int64_t e = (r + 1) * cols;
        for (int64_t i = r * cols; i < e; i += w) {
          const V xv = load_at(x, i, e), gv = load_at(g, i, e) * k.scale;
          const V mv = first_moment<V>(load_at(m, i, e), gv, k.b1);
          const V vv = second_moment<V>(load_at(v, i, e), gv, k.b2);
          store_at(m, i, e, mv);
          store_at(v, i, e, vv);
          const V n = p.nesterov ? first_moment<V>(mv, gv, k.b1) : mv;
          const V pv = keep_first_n(adamp_direction<V>(n, vv, bc.rsqrt_bc2, k.eps, sqrt_v), e - i);
          gx = gx + gv * xv;
          gg = gg + gv * gv;
          xx = xx + xv * xv;
          xp = xp + xv * pv;
        }
        A* o = sums + 4 * (task.row_base + r);
        o[0] = at::vec::vec_reduce_all<A>(std::plus<V>(), gx);
        o[1] = at::vec::vec_reduce_all<A>(std::plus<V>(), gg);
        o[2] = at::vec::vec_reduce_all<A>(std::plus<V>(), xx);
        o[3] = at::vec::vec_reduce_all<A>(std::plus<V>(), xp);
      }
    }
  });
}

template <typename T>
void adamp_stage2(const AdamPParams& p) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  constexpr int64_t w = kVecWidth<T>;
  if (skip_step(p.found_inf)) return;
  const auto tasks = row_tasks(p);
  const AdamPConsts<T> k(p);
  const auto sqrt_v = [](const V& v) { return v.sqrt(); };
  const auto* coef = static_cast<const A*>(p.coef);
  const auto* decay = static_cast<const A*>(p.decay);
  const V lr(*static_cast<const A*>(p.lr));
  parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t ti = begin; ti < end; ++ti) {
      const RowTask& task = tasks[ti];
      const int64_t cols = p.x.numel[task.tensor] / p.rows[task.tensor];
      T* x = out<T>(p.x, task.tensor);
      const T* g = in<T>(p.g, task.tensor);
      const A* m = in<A>(p.m, task.tensor);
      const A* v = in<A>(p.v, task.tensor);
      const V dec(decay[task.tensor]);
      const BiasCorr<V, A> bc(p.bias_corr, task.tensor);
      const V step_size = lr * bc.inv_bc1;
      for (int64_t r = task.row_begin; r < task.row_end; ++r) {
        const V kr(coef[task.row_base + r]);
        const int64_t e = (r + 1) * cols;
        for (int64_t i = r * cols; i < e; i += w) {
          const V mv = load_at(m, i, e), xv = load_at(x, i, e);
          const V n = p.nesterov ? first_moment<V>(mv, load_at(g, i, e) * k.scale, k.b1) : mv;
          const V pv = adamp_direction<V>(n, load_at(v, i, e), bc.rsqrt_bc2, k.eps, sqrt_v);
          store_at(x, i, e, adamp_step<V>(xv, pv, kr, dec, step_size));
        }
      }
    }
  });
}

// ---- averaging lerp ------------------------------------------------------------------------------

template <typename T>
void lerp(const LerpParams& p) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  constexpr int64_t w = kVecWidth<T>;
  const V wv(static_cast<A>(p.weight));
  for_each_chunk<A>(p.avg, [&](const Chunk& c) {
    T* avg = out<T>(p.avg, c.tensor);
    const T* x = in<T>(p.x, c.tensor);
    for (int64_t i = c.begin; i < c.end; i += w)
      store_at(avg, i, c.end, lerp_to<V>(load_at(avg, i, c.end), load_at(x, i, c.end), wv));
    return A(0);
  });
}

}  // namespace

void sq_norm_cpu(const SqNormParams& p) { SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { sq_norm<T>(p); }); }
void dog_update_cpu(const DogUpdateParams& p) {
  SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { dog_update<T>(p); });
}
void lion_cpu(const LionParams& p) { SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { lion<T>(p); }); }
void lamb_stage1_cpu(const LambParams& p) {
  SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { lamb_stage1<T>(p); });
}
void lamb_stage2_cpu(const LambParams& p) {
  SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { lamb_stage2<T>(p); });
}
void momentum_cpu(const MomentumParams& p) { SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { momentum<T>(p); }); }
void adamp_stage1_cpu(const AdamPParams& p) {
  SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { adamp_stage1<T>(p); });
}
void adamp_stage2_cpu(const AdamPParams& p) {
  SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { adamp_stage2<T>(p); });
}
void lerp_cpu(const LerpParams& p) { SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { lerp<T>(p); }); }

}  // namespace slab::optim
