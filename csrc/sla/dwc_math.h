// Arithmetic of the SLA depthwise-convolution branch shared by the CPU and CUDA kernels: which
// token a tap reads, the range of taps that stay inside the grid, and the decode-cache step.
#pragma once
#include <cstdint>

#include "core/common.h"
#include "sla/dwc.h"

namespace slab::sla {

// Taps [lo, hi) of one kernel axis that land inside the grid for output coordinate `pos`:
// tap t reads pos + t - pad, which must lie in [0, extent).
SLAB_HD void tap_range(int64_t pos, int64_t pad, int64_t extent, int64_t kernel, int64_t& lo, int64_t& hi) {
  lo = pad - pos > 0 ? pad - pos : 0;
  hi = extent + pad - pos < kernel ? extent + pad - pos : kernel;
}

// Token read by tap (i, j) of output token (y, x); the tap must be inside tap_range.
SLAB_HD int64_t tap_source(const DwcGeometry& g, int64_t y, int64_t x, int64_t i, int64_t j) {
  return (y + i - g.pad_top) * g.grid_w + (x + j - g.pad_left);
}

// One multiply-add of a tap; A is a scalar or an at::vec vector of the accumulation type.
template <typename A>
SLAB_HD A tap_fma(A acc, A weight, A value) {
  return acc + weight * value;
}

// History slot t of a decode step (0 = oldest): the cache holds kernel - 1 tokens, v is the last.
SLAB_HD bool history_from_cache(int64_t t, int64_t kernel) { return t < kernel - 1; }

}  // namespace slab::sla
