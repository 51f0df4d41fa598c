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
