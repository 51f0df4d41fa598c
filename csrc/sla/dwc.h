// SLA depthwise-convolution branch: parameter structs and launchers. No torch headers; the
// binding layer (dwc_ops.cpp) checks inputs, allocates outputs and fills these.
//
// SLAB adds a depthwise convolution of V, with weights shared across heads, to the attention
// output. Tokens are laid out on a grid: token n sits at row n / grid_w, column n % grid_w.
//   vision:  grid (h, w), a k x k kernel, zero padding k / 2 on every side;
//   language: grid (N, 1), a k x 1 kernel, padding k - 1 on top only (causal: token n reads
//             tokens n - k + 1 .. n).
// One kernel serves both, and also the input gradient (the same convolution with the taps
// flipped and the padding mirrored).
//
//   out[b, h, n, c] = residual[b, h, n, c] + bias[c] + sum_taps weight[tap, c] * v[b, h, src(n, tap), c]
#pragma once
#include <cstdint>

#include "core/common.h"
#include "sla/sla.h"  // RowStrides: channels contiguous, b/h/n strides arbitrary

struct CUstream_st;

namespace slab::sla {

struct DwcGeometry {
  int64_t batch, heads, channels;  // B, H, C
  int64_t grid_h, grid_w;          // tokens N = grid_h * grid_w
  int64_t kernel_h, kernel_w;      // taps = kernel_h * kernel_w
  int64_t pad_top, pad_left;       // tap (i, j) of output (y, x) reads (y + i - pad_top, x + j - pad_left)
};

struct DwcParams {
  DType dtype;  // of v, residual and out
  DwcGeometry g;
  const void* v;
  RowStrides v_stride;
  const void* residual;  // nullptr: none
  RowStrides residual_stride;
  void* out;
  RowStrides out_stride;
  const void* weight;  // [taps, C] in the accumulation type, tap = i * kernel_w + j
  const void* bias;    // [C] in the accumulation type, or nullptr
};

// grad_weight[tap, c] = sum_{b, h, n} grad[b, h, n, c] * v[b, h, src(n, tap), c] and
// grad_bias[c] = sum grad[b, h, n, c], both in the accumulation type. partial is scratch of
// batch * heads * token_splits * (taps + 1) * C accumulation-type values: one row of sums per
// (b, h) slice and range of its tokens (grad_token_range), added in that order afterwards so the
// result does not depend on the thread count. The CPU kernel takes one range per slice.
struct DwcWeightGradParams {
  DType dtype;
  DwcGeometry g;
  int64_t token_splits;  // token ranges per slice (grad_token_splits on CUDA, 1 on CPU)
  const void* grad;
  RowStrides grad_stride;
  const void* v;
  RowStrides v_stride;
  void* partial;
  void* grad_weight;  // [taps, C]
  void* grad_bias;    // [C]
};

// One decode token of the causal 1-D branch (kernel k): history = cache (the k - 1 previous
// tokens, oldest first) followed by v; out = residual + bias + sum_t weight[t] * history[t], then
// the cache shifts by one token and keeps v. All tensors (B, H, ., C) contiguous.
struct DwcStepParams {
  DType dtype;
  int64_t batch, heads, channels, kernel;
  const void* v;         // [B, H, C]
  const void* residual;  // [B, H, C] or nullptr
  void* cache;           // [B, H, kernel - 1, C], updated in place
  void* out;             // [B, H, C]
  const void* weight;    // [kernel, C], accumulation type
  const void* bias;      // [C] or nullptr
};

// CUDA item e of the (row, channel pack) pairs of rows of `channels` channels, `width` channels per
// pack (width divides channels): rows are tokens (dwc_kernel) or (b, h) slices (step_kernel).
struct RowPack {
  int64_t row, channel;
};
SLAB_HD RowPack row_pack(int64_t e, int64_t channels, int width) {
  const int64_t packs = channels / width;
  return {e / packs, (e % packs) * width};
}

// CUDA weight gradient: one block per (slice, token range). A slice's tokens are split until the
// grid holds about kGradTargetBlocks blocks, no range shorter than kGradMinTokens tokens (each
// range adds a partial row to write and to reduce).
constexpr int64_t kGradTargetBlocks = 2048;
constexpr int64_t kGradMinTokens = 64;
SLAB_HD int64_t grad_token_splits(int64_t tokens, int64_t slices) {
  const int64_t want = ceil_div(kGradTargetBlocks, slices > 0 ? slices : 1);
  const int64_t most = tokens / kGradMinTokens > 1 ? tokens / kGradMinTokens : 1;
  return want < most ? want : most;
}
// Tokens [begin, end) of range `split` of `splits` (balanced; together they cover [0, tokens)).
SLAB_HD void grad_token_range(int64_t tokens, int64_t splits, int64_t split, int64_t& begin, int64_t& end) {
  begin = tokens * split / splits;
  end = tokens * (split + 1) / splits;
}

void dwc_cpu(const DwcParams& p);
void dwc_weight_grad_cpu(const DwcWeightGradParams& p);
void dwc_step_cpu(const DwcStepParams& p);

void dwc_cuda(const DwcParams& p, CUstream_st* stream);
void dwc_weight_grad_cuda(const DwcWeightGradParams& p, CUstream_st* stream);
void dwc_step_cuda(const DwcStepParams& p, CUstream_st* stream);

}  // namespace slab::sla
