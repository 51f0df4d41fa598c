// PRepBN kernels: parameter structs and launchers. No torch headers; the binding layer
// (prepbn_ops.cpp) checks inputs, allocates outputs and fills these structs.
//
// x is viewed as a contiguous (rows, channels) matrix: rows = tokens, channels = C.
// All per-channel / per-row statistics and weights are in the accumulation type
// (float, or double for double inputs). The pipeline:
//   forward  = stats (training only) -> apply
//   backward = bwd_reduce -> bwd_apply
// The distributed path inserts all-reduces between the two stages of each.
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/common.h"
#include "core/vec.h"

struct CUstream_st;

namespace slab::prepbn {

enum class Norm : int8_t { kNone, kLayer, kRms };

// Per-channel moments over the kept rows (mask true, or every row when mask is null).
struct StatsParams {
  DType dtype;
  int64_t rows, channels;
  const void* x;
  const bool* mask;  // [rows] or null
  void* mean;        // [channels]
  void* m2;          // [channels]: sum of squared deviations from mean
  void* count;       // [1]: number of kept rows
  void* workspace;   // CUDA: workspace_bytes(); unused on CPU
  // CUDA fused forward only (null otherwise; the CPU binding derives them with ATen ops): the
  // merging block also writes bn_rstd = 1/sqrt(m2/count + eps) and bn_var = m2/(count - 1),
  // NaN (and bn_mean NaN) when fewer than 2 rows are kept. m2 may then be null.
  double eps;
  void* bn_rstd;  // [channels]
  void* bn_var;   // [channels]
};

// y = lam * Norm1(x) + (1 - lam) * ((x - bn_mean) * bn_rstd * bn_weight + bn_bias + alpha * x)
struct ApplyParams {
  DType dtype;
  Norm norm;
  int64_t rows, channels;
  const void* x;
  void* y;
  const void* norm_weight;  // [channels]; null when norm == kNone
  const void* norm_bias;    // [channels] or null
  const void* bn_weight;    // [channels]
  const void* bn_bias;      // [channels]
  const void* alpha;        // [1]
  const void* bn_mean;      // [channels]
  const void* bn_rstd;      // [channels]
  double lam, norm_eps;
  void* row_mean;  // [rows]; written when norm != kNone (0 for rms)
  void* row_rstd;  // [rows]; written when norm != kNone
  // CUDA fused eval forward only (null otherwise): bn_rstd is not read but computed per channel
  // as 1/sqrt(bn_var + eps), and the row-0 threads write bn_mean, that bn_rstd and bn_var to the
  // op's outputs, so eval needs no launch besides this kernel.
  const void* bn_var;  // [channels]
  double eps;
  void* out_mean;  // [channels]
  void* out_rstd;  // [channels]
  void* out_var;   // [channels]
};

// Per-channel sums over all rows: sums[0] = sum dy, sums[1] = sum dy * xhat_bn,
// sums[2] = sum dy * xhat_norm (0 when norm == kNone); count = kept rows.
struct BwdReduceParams {
  DType dtype;
  Norm norm;
  int64_t rows, channels;
  const void* dy;
  const void* x;
  const bool* mask;
  const void* row_mean;
  const void* row_rstd;
  const void* bn_mean;
  const void* bn_rstd;
  void* sums;   // [3, channels]
  void* count;  // [1]
  void* workspace;
  // CUDA fused backward only (null otherwise): the merging blocks also write the parameter
  // gradients lam * sums[2], lam * sums[0], (1 - lam) * sums[1], (1 - lam) * sums[0] and
  // d_alpha = (1 - lam) * sum_c (sums[1] / bn_rstd + bn_mean * sums[0]) (channels in order).
  double lam;
  void* d_norm_weight;  // [channels]
  void* d_norm_bias;    // [channels]
  void* d_bn_weight;    // [channels]
  void* d_bn_bias;      // [channels]
  void* d_alpha;        // [1]
};

// dx from the sums (the global ones in the distributed path).
struct BwdApplyParams {
  DType dtype;
  Norm norm;
  bool training;  // adds the batch-statistics terms for kept rows
  int64_t rows, channels;
  const void* dy;
  const void* x;
  const bool* mask;
  const void* norm_weight;
  const void* bn_weight;
  const void* alpha;
  const void* row_mean;
  const void* row_rstd;
  const void* bn_mean;
  const void* bn_rstd;
  const void* sums;   // [3, channels]; rows 0 and 1 used
  const void* count;  // [1]
  double lam;
  void* dx;
};

// ---- CUDA work decomposition (host-callable: tests/host/prepbn_schedule.cpp runs it on the CPU) ----

// Elements of `width` (kPackWidth<T>, one 16-byte access) when x, the output and every other
// row-major tensor are 16-byte aligned and rows are a whole number of packs; else 1 (scalar).
template <typename... P>
SLAB_HD int access_width(int pack_width, int64_t channels, int elem_bytes, const P*... ptrs) {
  return all_vec_aligned(ptrs...) && rows_vec_aligned(channels, elem_bytes) ? pack_width : 1;
}

// Row passes (apply, bwd_apply): a group of `warps` warps per row holds the whole row in
// registers, kRowElems elements per thread (kRowElems / width packs, "slots"), for rows of up to
// kMaxRowWarps * 32 * kRowElems = 4096 elements; longer rows loop over `segments`, re-reading x.
// Pack p = (segment * slots + slot) * threads + t of the row goes to thread t of the group, so a
// warp's slot covers 32 consecutive packs (coalesced). A block holds rows_per_block groups.
constexpr int kRowElems = 16;
constexpr int kMaxRowWarps = 8;
constexpr int kRowBlockThreads = kMaxRowWarps * 32;

struct RowSchedule {
  int64_t channels;
  int width, slots, warps, segments, rows_per_block;
  SLAB_HD int threads() const { return warps * 32; }
  // First element of `slot` of thread t in `segment`, or -1 past the row's end.
  SLAB_HD int64_t element(int segment, int slot, int t) const {
    const int64_t e = ((static_cast<int64_t>(segment) * slots + slot) * threads() + t) * width;
    return e < channels ? e : -1;
  }
};

SLAB_HD RowSchedule row_schedule(int64_t channels, int width) {
  const int slots = kRowElems / width;
  const int64_t packs = channels / width;  // width divides channels (access_width)
  const int64_t need = ceil_div(ceil_div(packs, slots), 32);
  const int warps = static_cast<int>(need < 1 ? 1 : (need > kMaxRowWarps ? kMaxRowWarps : need));
  const int segments = static_cast<int>(ceil_div(packs, static_cast<int64_t>(warps) * 32 * slots));
  return {channels, width, slots, warps, segments < 1 ? 1 : segments, kMaxRowWarps / warps};
}

// Column reductions (stats, bwd_reduce) in ONE launch: block (tile, split) has 32 lanes x
// kColRowLanes row lanes; lane l owns channels [(tile * 32 + l) * width, + width), row lane y the
// rows split_begin + y, + kColRowLanes, ... of its split. Each block merges its row lanes in order
// y = 0..7 and writes its partial to the workspace; the last block of a tile to finish (a ticket
// counter per tile, after __threadfence) merges the tile's partials in the FIXED order: row lane y
// takes splits y, y + 8, ... in increasing order, then the 8 lane results in order y = 0..7. The
// result does not depend on which block finishes last: it is deterministic.
constexpr int kColRowLanes = 8;
constexpr int kColThreads = 32 * kColRowLanes;
constexpr int64_t kColMinRows = 128;       // rows per split at least
constexpr int64_t kColTargetBlocks = 512;  // enough blocks to fill a GPU

// Workspace (acc type A): values [splits][3][channels], counts [tiles][splits], d_alpha partials
// [tiles]; then int32 tickets [tiles + 1] (zeroed before the launch; the last one orders d_alpha).
struct ColSchedule {
  int64_t rows, channels, tiles, rows_per_split;
  int width, splits;
  SLAB_HD int64_t channel(int64_t tile, int lane) const { return (tile * 32 + lane) * width; }
  SLAB_HD int64_t split_begin(int s) const { return min64(rows, s * rows_per_split); }
  SLAB_HD int64_t split_end(int s) const { return min64(rows, split_begin(s) + rows_per_split); }
  SLAB_HD int64_t value(int s, int kind, int64_t c) const {
    return (static_cast<int64_t>(s) * 3 + kind) * channels + c;
  }
  SLAB_HD int64_t count(int64_t tile, int s) const { return splits * 3 * channels + tile * splits + s; }
  SLAB_HD int64_t alpha_part(int64_t tile) const { return splits * (3 * channels + tiles) + tile; }
  SLAB_HD int64_t acc_elems() const { return splits * (3 * channels + tiles) + tiles; }
  SLAB_HD int64_t ticket_offset(int acc_bytes) const { return round_up(acc_elems() * acc_bytes, 16); }
  SLAB_HD int64_t bytes(int acc_bytes) const { return ticket_offset(acc_bytes) + (tiles + 1) * 4; }
  static SLAB_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
};

SLAB_HD ColSchedule col_schedule(int64_t rows, int64_t channels, int width) {
  const int64_t tiles = ceil_div(channels, 32 * static_cast<int64_t>(width));
  int64_t splits = ceil_div(rows, kColMinRows);
  const int64_t fill = ceil_div(kColTargetBlocks, tiles);
  splits = splits < fill ? splits : fill;
  splits = splits < 1 ? 1 : (splits > 65535 ? 65535 : splits);
  const int64_t per = ceil_div(rows, splits);
  return {rows, channels, tiles, per, width, static_cast<int>(per > 0 ? ceil_div(rows, per) : 1)};
}

void stats_cpu(const StatsParams& p);
void apply_cpu(const ApplyParams& p);
void bwd_reduce_cpu(const BwdReduceParams& p);
void bwd_apply_cpu(const BwdApplyParams& p);

// Bytes of scratch the CUDA column reductions (stats, bwd_reduce) need.
size_t workspace_bytes_cuda(int64_t rows, int64_t channels, DType dtype);
void stats_cuda(const StatsParams& p, CUstream_st* stream);
void apply_cuda(const ApplyParams& p, CUstream_st* stream);
void bwd_reduce_cuda(const BwdReduceParams& p, CUstream_st* stream);
void bwd_apply_cuda(const BwdApplyParams& p, CUstream_st* stream);

}  // namespace slab::prepbn
