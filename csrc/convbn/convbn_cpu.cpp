// Conv-BN fold CPU kernels: the forward scales the flattened weight in parallel over element
// ranges (a range may span several channels); the backward runs in parallel over channels, each
// channel's row summed by one thread in a fixed order (lane-wise over at::vec vectors, then the
// lanes), so the result does not depend on the thread count.
#include <algorithm>

#include "convbn/convbn.h"
#include "convbn/convbn_math.h"
#include "core/cpu_types.h"

namespace slab::convbn {
namespace {

constexpr int64_t kElemGrain = 32768;  // elements per task (at::internal::GRAIN_SIZE: below it a
                                       // thread-pool hand-off costs more than the pass)

template <typename A>
const A* vec(const void* p) {
  return static_cast<const A*>(p);
}

template <typename T>
void fold_forward(const FoldParams& p) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  const auto* w = static_cast<const T*>(p.weight);
  auto* out = static_cast<T*>(p.out_weight);
  const A eps = static_cast<A>(p.eps);
  const auto ch = [&](int64_t o) {
    return channel(vec<A>(p.bias), vec<A>(p.bn_weight), vec<A>(p.running_mean), vec<A>(p.running_var), eps, o);
  };
  parallel_for(0, p.channels * p.k, kElemGrain, [&](int64_t begin, int64_t end) {
    // the range in pieces of one channel each
    for (int64_t piece = begin; piece < end;) {
      const int64_t o = piece / p.k, piece_end = std::min(end, (o + 1) * p.k);
      const V g(ch(o).g);
      for (int64_t i = piece; i < piece_end; i += kVecWidth<T>)
        store_at(out, i, piece_end, scale_elem(load_at(w, i, piece_end), g));
      piece = piece_end;
    }
  });
  auto* b = static_cast<T*>(p.out_bias);
  const A* beta = vec<A>(p.bn_bias);
  for (int64_t o = 0; o < p.channels; ++o) {
    const Channel<A> c = ch(o);
    b[o] = static_cast<T>(fold_bias(beta ? beta[o] : A(0), c.centered, c.g));
  }
}

// One channel's row: dw = dw' * g (when wanted) and, when wanted, sum_k dw'[k] * w[k].
template <typename T, bool kDw, bool kDot>
acc_t<T> bwd_row(const T* gw, const T* w, T* dw, int64_t k, acc_t<T> g) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  const V gv(g);
  V dot(0);
  for (int64_t i = 0; i < k; i += kVecWidth<T>) {
    const V d = load_at(gw, i, k);  // the tail pads with zeros, adding nothing to the sum
    if constexpr (kDw) store_at(dw, i, k, scale_elem(d, gv));
    if constexpr (kDot) dot = at::vec::fmadd(d, load_at(w, i, k), dot);
  }
  if constexpr (kDot) return at::vec::vec_reduce_all<A>(std::plus<V>(), dot);
  return A(0);
}

template <typename T>
void fold_backward(const FoldBwdParams& p) {
  using A = acc_t<T>;
  const auto* gw = static_cast<const T*>(p.grad_weight);
  const auto* w = static_cast<const T*>(p.weight);
  auto* dw = static_cast<T*>(p.grad_weight_out);
  const A* gb = vec<A>(p.grad_bias);
  const A eps = static_cast<A>(p.eps);
  auto* d_bias = static_cast<A*>(p.d_bias);
  auto* d_gamma = static_cast<A*>(p.d_bn_weight);
  auto* d_beta = static_cast<A*>(p.d_bn_bias);
  const int64_t grain = std::max<int64_t>(1, kElemGrain / std::max<int64_t>(p.k, 1));
  SLAB_BOOL_SWITCH(dw != nullptr, kDw, [&] {
    SLAB_BOOL_SWITCH(d_gamma != nullptr, kDot, [&] {
      parallel_for(0, p.channels, grain, [&](int64_t begin, int64_t end) {
        for (int64_t o = begin; o < end; ++o) {
          const Channel<A> c =
              channel(vec<A>(p.bias), vec<A>(p.bn_weight), vec<A>(p.running_mean), vec<A>(p.running_var), eps, o);
          const A dot =
              bwd_row<T, kDw, kDot>(gw + o * p.k, kDot ? w + o * p.k : nullptr, kDw ? dw + o * p.k : nullptr, p.k, c.g);
          const ChannelGrads<A> g = channel_grads(c, gb ? gb[o] : A(0), dot);
          d_bias[o] = g.bias;
          d_beta[o] = g.beta;
          if constexpr (kDot) d_gamma[o] = g.gamma;
        }
      });
    });
  });
}

}  // namespace

void fold_cpu(const FoldParams& p) {
  SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { fold_forward<T>(p); });
}

void fold_backward_cpu(const FoldBwdParams& p) {
  SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { fold_backward<T>(p); });
}

}  // namespace slab::convbn
