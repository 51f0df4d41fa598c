// CPU side of the multi-tensor engine: the chunks of all tensors of a list are one flat task
// list for parallel_for (torch's thread pool); each chunk runs a rule (optim_math.h) on at::vec
// vectors of its elements and, for reductions, writes one partial sum per term, added per tensor
// in chunk order (thread-count independent results).

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

template <typename T>
const T* in(const TensorList& l, int64_t t) {
  return static_cast<const T*>(l.data[t]);
}
template <typename T>
T* out(const TensorList& l, int64_t t) {
  return static_cast<T*>(l.data[t]);
}

// What the rules need that differs between at::vec vectors and scalars.
template <typename T>
struct VecOps {
  using V = AccVec<T>;
  static V sqrt(const V& v) { return v.sqrt(); }
  static V sign(const V& c) { return V::blendv(V(0), V(1), c > V(0)) - V::blendv(V(0), V(1), c < V(0)); }
  static V stored(const V& v) {  // rounded to T and back, as a store and reload would give
    if constexpr (std::is_same_v<T, acc_t<T>>) {
      return v;
    } else {
      T buf[kVecWidth<T>];
      store_vec(buf, v);
      return load_vec(buf);
    }
  }
};

// One vector step of a rule at element i of a chunk ending at `end` (a shorter, zero-padded
// piece at the tail): load every list, apply, store the written lists, add the squares of the sum
// terms (padded lanes masked out unless kFull: a whole vector, no masking) into acc.
// Always inlined: the accumulators must stay in registers across the steps of a chunk.
template <typename T, typename Rule, bool kFull, typename K>
[[gnu::always_inline]] inline void rule_step(const K& k, void* const (&ptr)[kMaxLists], int64_t i, int64_t end,
                                             AccVec<T> (&acc)[kMaxSums]) {
  using V = AccVec<T>;
  V r[kMaxLists], s[kMaxSums];
  static_for<Rule::kLists>([&](auto l) {
    using E = ListElem<T, Rule, decltype(l)::value>;
    r[l] = ptr[l] ? load_at(static_cast<const E*>(ptr[l]), i, end) : V(0);
  });
  Rule::template apply<VecOps<T>>(k, r, s);
  static_for<Rule::kLists>([&](auto l) {
    using E = ListElem<T, Rule, decltype(l)::value>;
    if constexpr (((Rule::kWritten >> decltype(l)::value) & 1) != 0) store_at(static_cast<E*>(ptr[l]), i, end, r[l]);
  });
  static_for<Rule::kSums>([&](auto j) {
    const V t = kFull ? s[j] : keep_first_n(s[j], end - i);
    acc[j] = at::vec::fmadd(t, t, acc[j]);
  });
}

// The rule over one chunk; out[j] = its j-th sum. Sums use Rule::kCpuAccs independent
// accumulators (the add latency, not memory, would bound one chain), added pairwise at the end.
template <typename T, typename Rule>
void rule_chunk(const Rule& rule, const TensorList (&lists)[Rule::kLists], const Chunk& c, acc_t<T>* out) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  constexpr int64_t w = kVecWidth<T>;
  constexpr int kU = Rule::kSums > 0 ? Rule::kCpuAccs : 1;
  void* ptr[kMaxLists] = {};
  for (int l = 0; l < Rule::kLists; ++l) ptr[l] = lists[l].count ? lists[l].data[c.tensor] : nullptr;
  const auto k = rule.template consts<V>(c.tensor);
  V acc[kU][kMaxSums];
  for (auto& a : acc)
    for (auto& v : a) v = V(0);
  int64_t i = c.begin;
  for (; i + kU * w <= c.end; i += kU * w)
    for (int u = 0; u < kU; ++u) rule_step<T, Rule, true>(k, ptr, i + u * w, c.end, acc[u]);
  for (; i < c.end; i += w) rule_step<T, Rule, false>(k, ptr, i, c.end, acc[0]);
  for (int h = 1; h < kU; h *= 2)
    for (int u = 0; u + h < kU; u += 2 * h)
      for (int j = 0; j < Rule::kSums; ++j) acc[u][j] = acc[u][j] + acc[u + h][j];
  for (int j = 0; j < Rule::kSums; ++j) out[j] = at::vec::vec_reduce_all<A>(std::plus<V>(), acc[0][j]);
}

// Runs `rule` over every element of `lists` (all chunks in parallel). Returns its sums per
// tensor, term j of tensor t at [j * count + t]; empty when the step is skipped (*found_inf != 0).
template <typename T, typename Rule>
std::vector<acc_t<T>> for_each_chunk(const Rule& rule, const TensorList (&lists)[Rule::kLists]) {
  using A = acc_t<T>;
  constexpr int kS = Rule::kSums;
  if (skip_step(rule.found_inf)) return {};
  const std::vector<Chunk> cs = chunks(lists[0]);
  std::vector<A> partial(kS * cs.size(), A(0));
  parallel_for(0, static_cast<int64_t>(cs.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) rule_chunk<T>(rule, lists, cs[i], partial.data() + kS * i);
  });
  const int64_t n = lists[0].count;
  std::vector<A> sums(std::max<int64_t>(kS * n, 1), A(0));
  for (size_t i = 0; i < cs.size(); ++i)
    for (int j = 0; j < kS; ++j) sums[j * n + cs[i].tensor] += partial[kS * i + j];
  return sums;
}

// ---- the optimizers: a rule and its lists each ------------------------------------------------

template <typename T>
void sq_norm(const SqNormParams& p) {
  using A = acc_t<T>;
  const SqNormRule<A> rule{nullptr, p.grad_scale, static_cast<A>(p.weight_decay)};
  const auto sums = for_each_chunk<T>(rule, {p.a, p.b});
  std::copy(sums.begin(), sums.begin() + p.a.count, static_cast<A*>(p.out));
}

template <typename T>
void dog_update(const DogUpdateParams& p) {
  using A = acc_t<T>;
  const DogRule<A> rule{p.found_inf, p.grad_scale, p.maximize, static_cast<A>(p.weight_decay),
                        static_cast<const A*>(p.eta)};
  const auto sums = for_each_chunk<T>(rule, {p.x, p.g, p.x0});
  if (sums.empty()) return;  // skipped: dist2 keeps its value
  for (int64_t t = 0; t < p.x.count; ++t) *static_cast<A*>(p.dist2[t]) = sums[t];
}

template <typename T>
void lion(const LionParams& p) {
  using A = acc_t<T>;
  const LionRule<A> rule{p.found_inf,
                         p.grad_scale,
                         p.maximize,
                         static_cast<A>(1.0 - p.beta1),
                         static_cast<A>(1.0 - p.beta2),
                         static_cast<A>(p.weight_decay),
                         static_cast<const A*>(p.lr)};
  for_each_chunk<T>(rule, {p.x, p.g, p.m});
}

template <typename A>
AdamConsts<A> lamb_consts(const LambParams& p) {
  return {p.found_inf,
          p.grad_scale,
          p.maximize,
          static_cast<A>(1.0 - p.beta1),
          static_cast<A>(1.0 - p.beta2),
          static_cast<A>(p.eps),
          static_cast<const A*>(p.bias_corr)};
}

template <typename T>
void lamb_stage1(const LambParams& p) {
  using A = acc_t<T>;
  const LambStage1Rule<A> rule{lamb_consts<A>(p), static_cast<A>(p.weight_decay)};
  const auto sums = for_each_chunk<T>(rule, {p.x, p.g, p.m, p.v});
  auto* norms = static_cast<A*>(p.norms);  // [t, 0] = ||x||^2, [t, 1] = ||u||^2; 0 when skipped
  for (int64_t t = 0; t < p.x.count; ++t) {
    norms[2 * t] = sums.empty() ? A(0) : sums[t];
    norms[2 * t + 1] = sums.empty() ? A(0) : sums[p.x.count + t];
  }
}

template <typename T>
void lamb_stage2(const LambParams& p) {
  using A = acc_t<T>;
  const LambStage2Rule<A> rule{lamb_consts<A>(p), static_cast<A>(p.weight_decay), static_cast<const A*>(p.lr)};
  for_each_chunk<T>(rule, {p.x, p.m, p.v});
}

template <typename T>
void momentum(const MomentumParams& p) {
  using A = acc_t<T>;
  const MomentumRule<A> rule{p.found_inf,
                             p.grad_scale,
                             p.maximize,
                             static_cast<A>(p.momentum),
                             static_cast<A>(p.weight_decay),
                             static_cast<const A*>(p.scale),
                             static_cast<const A*>(p.lr)};
  for_each_chunk<T>(rule, {p.x, p.g, p.buf});
}

template <typename T>
void lerp(const LerpParams& p) {
  using A = acc_t<T>;
  for_each_chunk<T>(LerpRule<A>{nullptr, static_cast<A>(p.weight)}, {p.avg, p.x});
}

// The bias corrections (1 / bc1, 1 / sqrt(bc2)) of tensor `t`, as vectors: each tensor counts its
// own steps.
template <typename V, typename A>
struct BiasCorr {
  V inv_bc1, rsqrt_bc2;
  BiasCorr(const void* bias_corr, int64_t t)
      : inv_bc1(static_cast<const A*>(bias_corr)[2 * t]), rsqrt_bc2(static_cast<const A*>(bias_corr)[2 * t + 1]) {}
};

// ---- AdamP (row-wise: one task = whole rows of one tensor) ----------------------------------------
// Not a rule of the engine: its sums are per row (size(0) of each tensor, thousands per list)
// and stage 2 needs each element's row coefficient, so its unit of work is a run of whole rows,
// not a fixed-size chunk. The per-element arithmetic is optim_math.h's, as for the rules.

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
      : scale(static_cast<A>(grad_factor(p.grad_scale, p.maximize))),
        b1(static_cast<A>(1.0 - p.beta1)),
        b2(static_cast<A>(1.0 - p.beta2)),
        eps(static_cast<A>(p.eps)) {}
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

}  // namespace

void sq_norm_cpu(const SqNormParams& p) {
  SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { sq_norm<T>(p); });
}
void dog_update_cpu(const DogUpdateParams& p) {
  SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { dog_update<T>(p); });
}
void lion_cpu(const LionParams& p) {
  SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { lion<T>(p); });
}
void lamb_stage1_cpu(const LambParams& p) {
  SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { lamb_stage1<T>(p); });
}
void lamb_stage2_cpu(const LambParams& p) {
  SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { lamb_stage2<T>(p); });
}
void momentum_cpu(const MomentumParams& p) {
  SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { momentum<T>(p); });
}
void adamp_stage1_cpu(const AdamPParams& p) {
  SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { adamp_stage1<T>(p); });
}
void adamp_stage2_cpu(const AdamPParams& p) {
  SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { adamp_stage2<T>(p); });
}
void lerp_cpu(const LerpParams& p) {
  SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { lerp<T>(p); });
}

}  // namespace slab::optim
