// SLA depthwise-convolution branch, CPU kernels: one task per (b, h, grid row); every output
// token accumulates its in-grid taps over the channels with at::vec (channels are contiguous,
// weights stored tap-major so a tap's weights are one vector load). The weight gradient sums per
// (b, h) slice into its own row of partial sums, then adds the rows in slice order.

#include <algorithm>
#include <vector>

#include "core/cpu_types.h"
#include "sla/dwc.h"
#include "sla/dwc_math.h"

namespace slab::sla {
namespace {

constexpr int64_t kTaskElems = 4096;  // output elements per parallel task (at least one row)

template <typename T>
const T* token_ptr(const void* base, const RowStrides& s, int64_t b, int64_t h, int64_t n) {
  return static_cast<const T*>(base) + b * s.b + h * s.h + n * s.n;
}

template <typename T>
void dwc_forward(const DwcParams& p) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  const DwcGeometry& g = p.g;
  const int64_t C = g.channels, W = g.grid_w;
  const auto* weight = static_cast<const A*>(p.weight);
  const auto* bias = static_cast<const A*>(p.bias);
  const int64_t rows = g.batch * g.heads * g.grid_h;
  const int64_t grain = std::max<int64_t>(1, kTaskElems / std::max<int64_t>(1, W * C));
  parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t y = row % g.grid_h, bh = row / g.grid_h, b = bh / g.heads, h = bh % g.heads;
      int64_t ilo, ihi;
      tap_range(y, g.pad_top, g.grid_h, g.kernel_h, ilo, ihi);
      for (int64_t x = 0; x < W; ++x) {
        int64_t jlo, jhi;
        tap_range(x, g.pad_left, W, g.kernel_w, jlo, jhi);
        const int64_t n = y * W + x;
        T* out = static_cast<T*>(p.out) + b * p.out_stride.b + h * p.out_stride.h + n * p.out_stride.n;
        for (int64_t c = 0; c < C; c += kVecWidth<T>) {
          V acc = bias ? load_at(bias, c, C) : V(0);
          if (p.residual) acc = acc + load_at(token_ptr<T>(p.residual, p.residual_stride, b, h, n), c, C);
          for (int64_t i = ilo; i < ihi; ++i) {
            for (int64_t j = jlo; j < jhi; ++j) {
              const T* src = token_ptr<T>(p.v, p.v_stride, b, h, tap_source(g, y, x, i, j));
              acc = tap_fma(acc, load_at(weight + (i * g.kernel_w + j) * C, c, C), load_at(src, c, C));
            }
          }
          store_at(out, c, C, acc);
        }
      }
    }
  });
}

// Sums of one (b, h) slice: row tap of `sums` gets grad . v through that tap, row `taps` gets
// the sum of grad (the bias gradient).
template <typename T>
void weight_grad_slice(const DwcWeightGradParams& p, int64_t b, int64_t h, acc_t<T>* sums) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  const DwcGeometry& g = p.g;
  const int64_t C = g.channels, taps = g.kernel_h * g.kernel_w;
  std::fill(sums, sums + (taps + 1) * C, A(0));
  for (int64_t y = 0; y < g.grid_h; ++y) {
    int64_t ilo, ihi;
    tap_range(y, g.pad_top, g.grid_h, g.kernel_h, ilo, ihi);
    for (int64_t x = 0; x < g.grid_w; ++x) {
      int64_t jlo, jhi;
      tap_range(x, g.pad_left, g.grid_w, g.kernel_w, jlo, jhi);
      const T* grad = token_ptr<T>(p.grad, p.grad_stride, b, h, y * g.grid_w + x);
      for (int64_t c = 0; c < C; c += kVecWidth<T>) {
        const V gv = load_at(grad, c, C);
        A* bias_row = sums + taps * C;
        store_at(bias_row, c, C, load_at(bias_row, c, C) + gv);
        for (int64_t i = ilo; i < ihi; ++i) {
          for (int64_t j = jlo; j < jhi; ++j) {
            const T* src = token_ptr<T>(p.v, p.v_stride, b, h, tap_source(g, y, x, i, j));
            A* row = sums + (i * g.kernel_w + j) * C;
            store_at(row, c, C, tap_fma(load_at(row, c, C), gv, load_at(src, c, C)));
          }
        }
      }
    }
  }
}

template <typename T>
void dwc_weight_grad(const DwcWeightGradParams& p) {
  using A = acc_t<T>;
  const DwcGeometry& g = p.g;
  const int64_t C = g.channels, taps = g.kernel_h * g.kernel_w, slices = g.batch * g.heads;
  const int64_t row_len = (taps + 1) * C;
  auto* partial = static_cast<A*>(p.partial);
  parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) weight_grad_slice<T>(p, s / g.heads, s % g.heads, partial + s * row_len);
  });
  auto* grad_weight = static_cast<A*>(p.grad_weight);
  auto* grad_bias = static_cast<A*>(p.grad_bias);
  parallel_for(0, row_len, 256, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      A total = 0;
      for (int64_t s = 0; s < slices; ++s) total += partial[s * row_len + e];
      if (e < taps * C)
        grad_weight[e] = total;
      else
        grad_bias[e - taps * C] = total;
    }
  });
}

template <typename T>
void dwc_step(const DwcStepParams& p) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  const int64_t C = p.channels, K = p.kernel;
  const auto* weight = static_cast<const A*>(p.weight);
  const auto* bias = static_cast<const A*>(p.bias);
  parallel_for(0, p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const T* v = static_cast<const T*>(p.v) + bh * C;
      T* cache = static_cast<T*>(p.cache) + bh * (K - 1) * C;
      T* out = static_cast<T*>(p.out) + bh * C;
      for (int64_t c = 0; c < C; c += kVecWidth<T>) {
        V acc = bias ? load_at(bias, c, C) : V(0);
        if (p.residual) acc = acc + load_at(static_cast<const T*>(p.residual) + bh * C, c, C);
        for (int64_t t = 0; t < K; ++t) {
          const T* src = history_from_cache(t, K) ? cache + t * C : v;
          acc = tap_fma(acc, load_at(weight + t * C, c, C), load_at(src, c, C));
        }
        store_at(out, c, C, acc);
      }
      // Shift after every channel has read the old history.
      for (int64_t t = 0; t + 1 < K; ++t) {
        const T* src = history_from_cache(t + 1, K) ? cache + (t + 1) * C : v;
        std::copy(src, src + C, cache + t * C);
      }
    }
  });
}

}  // namespace

void dwc_cpu(const DwcParams& p) {
  SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { dwc_forward<T>(p); });
}
void dwc_weight_grad_cpu(const DwcWeightGradParams& p) {
  SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { dwc_weight_grad<T>(p); });
}
void dwc_step_cpu(const DwcStepParams& p) {
  SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { dwc_step<T>(p); });
}

}  // namespace slab::sla
