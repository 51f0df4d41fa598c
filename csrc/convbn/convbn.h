// Conv-BN fold (Efficient ConvBN "Tune mode"): parameter structs, launchers and the CUDA work
// decomposition. No torch headers; the binding layer (convbn_ops.cpp) checks inputs, allocates
// outputs and fills these structs.
//
// The weight is viewed as a contiguous (channels, k) matrix: channels = output channels O (dim 0
// of a conv / linear weight), k = the product of the other dimensions. Per-channel vectors (bias,
// BN affine and running statistics) are contiguous in the accumulation type; a null optional
// vector stands for its neutral value (bias 0, bn_weight 1, bn_bias 0).
//   forward:  w'[o, :] = w[o, :] * g[o],  b'[o] = bn_bias[o] + (bias[o] - mean[o]) * g[o],
//             g = bn_weight * r, r = 1 / sqrt(var + eps)
//   backward: dw = dw' * g, db = db' * g, dbn_bias = db',
//             dbn_weight[o] = r[o] * (sum_k dw'[o, k] w[o, k] + db'[o] (bias[o] - mean[o]))
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/common.h"
#include "core/vec.h"

struct CUstream_st;

namespace slab::convbn {

struct FoldParams {
  DType dtype;  // of weight and both outputs
  int64_t channels, k;
  const void* weight;        // [channels, k]
  const void* bias;          // [channels] or null
  const void* bn_weight;     // [channels] or null
  const void* bn_bias;       // [channels] or null
  const void* running_mean;  // [channels]
  const void* running_var;   // [channels]
  double eps;
  void* out_weight;  // [channels, k], dtype
  void* out_bias;    // [channels], dtype
};

// Every per-channel vector (inputs and outputs) is in the accumulation type; grad_bias null counts
// as zeros (b' unused). grad_weight_out null: dw is not computed (weight needs no grad);
// d_bn_weight null: the row sums of dw' * w are skipped and w is not read.
struct FoldBwdParams {
  DType dtype;  // of grad_weight, weight and grad_weight_out
  int64_t channels, k;
  const void* grad_weight;   // [channels, k]
  const void* grad_bias;     // [channels] or null
  const void* weight;        // [channels, k]
  const void* bias;          // [channels] or null
  const void* bn_weight;     // [channels] or null
  const void* running_mean;  // [channels]
  const void* running_var;   // [channels]
  double eps;
  void* grad_weight_out;  // [channels, k], dtype, or null
  void* d_bias;           // [channels]
  void* d_bn_weight;      // [channels] or null
  void* d_bn_bias;        // [channels]
  void* workspace;        // CUDA: fold_backward_workspace_elems(channels, k) accumulation-type values; unused on CPU
};

// ---- CUDA work decomposition (host-callable: tests/host/convbn_schedule.cpp runs it on the CPU) ----

// 16-byte packs when every row of k elements starts aligned (k * elem_bytes a multiple of 16) and
// every base pointer is aligned, so that a pack never straddles two channels; else 1 (scalar).
template <typename... P>
SLAB_HD int fold_width(int pack_width, int64_t k, int elem_bytes, const P*... ptrs) {
  return all_vec_aligned(ptrs...) && rows_vec_aligned(k, elem_bytes) ? pack_width : 1;
}

// Forward: one grid-stride loop over the channels * k / width packs of the flattened weight; the
// pack at element e belongs to channel e / k. The first `channels` threads of the grid also write
// b'. kFoldThreads threads per block.
constexpr int kFoldThreads = 256;

// The channel of element e: e / k, in 32 bits when both fit (a 64-bit division is a subroutine
// call on the GPU).
SLAB_HD int64_t row_of(int64_t e, int64_t k) {
  if (((e | k) >> 32) == 0) return static_cast<uint32_t>(e) / static_cast<uint32_t>(k);
  return e / k;
}

// Backward: grid (channels, splits) of blocks (channel, split). Split s of a channel's row of
// items = k / width packs takes the contiguous packs bwd_range(items, per_split, s); thread t of
// the block takes packs begin + t, begin + t + kBwdThreads, ... and the block's sum of dw' * w is
// reduced with block_sum (each warp by an xor butterfly, then the warps in order) into
// workspace[channel * splits + s]. A second kernel over the channels adds the splits in order and
// writes the per-channel gradients: the result does not depend on timing. Rows are split only
// when there are too few channels to fill the GPU, and never below kBwdMinItems packs per split.
constexpr int kBwdThreads = 256;
constexpr int64_t kBwdTargetBlocks = 1024;  // enough blocks to fill any current GPU
constexpr int64_t kBwdMinItems = 4 * kBwdThreads;
constexpr int kBwdMaxSplits = 64;

SLAB_HD int64_t bwd_items(int64_t k, int width) { return k / width; }  // width divides k (fold_width)

SLAB_HD int bwd_splits(int64_t channels, int64_t items) {
  if (channels <= 0) return 1;
  int64_t s = ceil_div(kBwdTargetBlocks, channels);
  const int64_t by_items = items / kBwdMinItems;
  if (s > by_items) s = by_items;
  if (s > kBwdMaxSplits) s = kBwdMaxSplits;
  return s < 1 ? 1 : static_cast<int>(s);
}

// Packs per split (the last may have fewer), computed once by the launcher: the kernel then
// finds its range without a division.
SLAB_HD int64_t bwd_per_split(int64_t items, int splits) { return ceil_div(items, splits); }

// Packs [begin, end) of a row of `items` that split s takes.
struct Range {
  int64_t begin, end;
};
SLAB_HD Range bwd_range(int64_t items, int64_t per_split, int s) {
  const int64_t begin = per_split * s < items ? per_split * s : items;
  return Range{begin, begin + per_split < items ? begin + per_split : items};
}

// Accumulation-type values of FoldBwdParams::workspace on CUDA: enough for either width (the
// scalar path has the most packs per row, hence the most splits).
SLAB_HD int64_t fold_backward_workspace_elems(int64_t channels, int64_t k) {
  return channels * bwd_splits(channels, k);
}

void fold_cpu(const FoldParams& p);
void fold_backward_cpu(const FoldBwdParams& p);

void fold_cuda(const FoldParams& p, CUstream_st* stream);
void fold_backward_cuda(const FoldBwdParams& p, CUstream_st* stream);

}  // namespace slab::convbn
