// PRepBN CUDA kernels. Column reductions (batch statistics, backward sums) run as a partial
// kernel over (channel tile, row split) blocks plus an in-order merge, so results are
// deterministic; row passes (output, dx) run one block per row, the row statistics of the norm
// computed in the same block. Per-element arithmetic comes from prepbn_math.h.
#include <algorithm>

#include "core/cuda_types.cuh"
#include "prepbn/prepbn.h"
#include "prepbn/prepbn_math.h"

namespace slab::prepbn {
namespace {

constexpr int kTileC = 32;        // channels per column-reduction block (one per lane)
constexpr int kTileRows = 8;      // row lanes per column-reduction block
constexpr int kRowThreads = 256;  // threads per row-pass block
constexpr int kMinRowsPerSplit = 64;
constexpr int kTargetBlocks = 1024;  // enough column-reduction blocks to fill any current GPU

// Row splits of a column reduction: enough blocks to fill the GPU, at least 64 rows each.
int row_splits(int64_t rows, int64_t channels) {
  const int64_t tiles = ceil_div(channels, kTileC);
  const int64_t by_rows = std::max<int64_t>(1, ceil_div(rows, kMinRowsPerSplit));
  return static_cast<int>(std::max<int64_t>(1, std::min(by_rows, ceil_div(kTargetBlocks, tiles))));
}

// Workspace of a column reduction: [splits][3][channels] partial values, then [splits] counts.
template <typename A>
struct Partials {
  A* values;
  A* counts;
  __host__ __device__ Partials(void* ws, int splits, int64_t channels)
      : values(static_cast<A*>(ws)), counts(static_cast<A*>(ws) + static_cast<int64_t>(splits) * 3 * channels) {}
};

__device__ __forceinline__ bool is_kept(const bool* mask, int64_t row) { return mask == nullptr || mask[row]; }

// Rows [begin, end) of split `s`.
__device__ __forceinline__ void split_rows(int64_t rows, int splits, int s, int64_t& begin, int64_t& end) {
  const int64_t per = ceil_div(rows, splits);
  begin = min(rows, s * per);
  end = min(rows, begin + per);
}

// ---- batch statistics ------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kTileC* kTileRows) stats_partial_kernel(StatsParams p, int splits) {
  using A = acc_t<T>;
  __shared__ A sh_mean[kTileRows][kTileC], sh_m2[kTileRows][kTileC], sh_n[kTileRows];
  const int lane = threadIdx.x, ry = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kTileC + lane;
  int64_t r0, r1;
  split_rows(p.rows, splits, blockIdx.y, r0, r1);
  const T* x = static_cast<const T*>(p.x);

  A mean = 0, m2 = 0, n = 0;
  for (int64_t r = r0 + ry; r < r1; r += kTileRows) {
    if (!is_kept(p.mask, r)) continue;
    n += 1;
    if (c < p.channels) {
      const A v = to_acc(x[r * p.channels + c]);
      const A delta = v - mean;
      mean += delta / n;
      m2 += delta * (v - mean);
    }
  }
  sh_mean[ry][lane] = mean;
  sh_m2[ry][lane] = m2;
  if (lane == 0) sh_n[ry] = n;
  __syncthreads();
  if (ry != 0) return;
  A total = sh_n[0];
  for (int j = 1; j < kTileRows; ++j) {
    merge_moments(mean, m2, total, sh_mean[j][lane], sh_m2[j][lane], sh_n[j]);
    total += sh_n[j];
  }
  Partials<A> part(p.workspace, splits, p.channels);
  if (c < p.channels) {
    part.values[(static_cast<int64_t>(blockIdx.y) * 3 + 0) * p.channels + c] = mean;
    part.values[(static_cast<int64_t>(blockIdx.y) * 3 + 1) * p.channels + c] = m2;
  }
  if (blockIdx.x == 0 && lane == 0) part.counts[blockIdx.y] = total;
}

template <typename T>
__global__ void stats_merge_kernel(StatsParams p, int splits) {
  using A = acc_t<T>;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= p.channels) return;
  Partials<A> part(p.workspace, splits, p.channels);
  A mean = 0, m2 = 0, n = 0;
  for (int s = 0; s < splits; ++s) {
    merge_moments(mean, m2, n, part.values[(s * 3 + 0) * p.channels + c],
                  part.values[(s * 3 + 1) * p.channels + c], part.counts[s]);
    n += part.counts[s];
  }
  static_cast<A*>(p.mean)[c] = mean;
  static_cast<A*>(p.m2)[c] = m2;
  if (c == 0) *static_cast<A*>(p.count) = n;
}

// ---- forward output pass ---------------------------------------------------------------------

// Mean and 1/sqrt(var + eps) of one row (LayerNorm), or 0 and 1/sqrt(mean square + eps) (RMSNorm).
template <typename T, typename A>
__device__ void row_stats(const T* row, int64_t channels, Norm norm, A eps, A* scratch, A& mean, A& rstd) {
  A acc = 0;
  mean = 0;
  if (norm == Norm::kLayer) {
    for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) acc += to_acc(row[c]);
    mean = block_sum(acc, scratch) / A(channels);
    acc = 0;
  }
  for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) {
    const A d = to_acc(row[c]) - mean;
    acc += d * d;
  }
  const A var = block_sum(acc, scratch) / A(channels);
  rstd = A(1) / sqrt(var + eps);
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads) apply_kernel(ApplyParams p) {
  using A = acc_t<T>;
  __shared__ A scratch[kRowThreads / 32];
  const int64_t r = blockIdx.x;
  const T* xr = static_cast<const T*>(p.x) + r * p.channels;
  T* yr = static_cast<T*>(p.y) + r * p.channels;
  const A* nw = static_cast<const A*>(p.norm_weight);
  const A* nb = static_cast<const A*>(p.norm_bias);
  const A* bw = static_cast<const A*>(p.bn_weight);
  const A* bb = static_cast<const A*>(p.bn_bias);
  const A* bm = static_cast<const A*>(p.bn_mean);
  const A* br = static_cast<const A*>(p.bn_rstd);
  const A alpha = *static_cast<const A*>(p.alpha), lam = static_cast<A>(p.lam);

  A rm = 0, rr = 0;
  if (p.norm != Norm::kNone) {
    row_stats(xr, p.channels, p.norm, static_cast<A>(p.norm_eps), scratch, rm, rr);
    if (threadIdx.x == 0) {
      static_cast<A*>(p.row_mean)[r] = rm;
      static_cast<A*>(p.row_rstd)[r] = rr;
    }
  }
  for (int64_t c = threadIdx.x; c < p.channels; c += blockDim.x) {
    const auto f = fwd_coeffs<A>(nw ? nw[c] : A(0), nb ? nb[c] : A(0), bw[c], bb[c], alpha, bm[c], br[c], lam);
    const A v = to_acc(xr[c]);
    yr[c] = from_acc<T>(fwd_elem<A>(v, f.mu, f.s, f.al, f.t, f.k, row_xhat<A>(v, rm, rr)));
  }
}

// ---- backward sums ---------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kTileC* kTileRows) bwd_partial_kernel(BwdReduceParams p, int splits) {
  using A = acc_t<T>;
  __shared__ A sh[3][kTileRows][kTileC];
  __shared__ A sh_n[kTileRows];
  const int lane = threadIdx.x, ry = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kTileC + lane;
  int64_t r0, r1;
  split_rows(p.rows, splits, blockIdx.y, r0, r1);
  const T* dy = static_cast<const T*>(p.dy);
  const T* x = static_cast<const T*>(p.x);
  const A* row_mean = static_cast<const A*>(p.row_mean);
  const A* row_rstd = static_cast<const A*>(p.row_rstd);
  const bool has_norm = p.norm != Norm::kNone;
  const bool active = c < p.channels;
  const A mu = active ? static_cast<const A*>(p.bn_mean)[c] : A(0);
  const A rs = active ? static_cast<const A*>(p.bn_rstd)[c] : A(0);

  A s_dy = 0, s_bn = 0, s_norm = 0, n = 0;
  for (int64_t r = r0 + ry; r < r1; r += kTileRows) {
    n += is_kept(p.mask, r) ? A(1) : A(0);
    if (!active) continue;
    const A g = to_acc(dy[r * p.channels + c]), v = to_acc(x[r * p.channels + c]);
    s_dy += g;
    s_bn += g * (v - mu) * rs;
    if (has_norm) s_norm += g * row_xhat<A>(v, row_mean[r], row_rstd[r]);
  }
  sh[0][ry][lane] = s_dy;
  sh[1][ry][lane] = s_bn;
  sh[2][ry][lane] = s_norm;
  if (lane == 0) sh_n[ry] = n;
  __syncthreads();
  if (ry != 0) return;
  Partials<A> part(p.workspace, splits, p.channels);
  for (int k = 0; k < 3; ++k) {
    A total = 0;
    for (int j = 0; j < kTileRows; ++j) total += sh[k][j][lane];
    if (active) part.values[(static_cast<int64_t>(blockIdx.y) * 3 + k) * p.channels + c] = total;
  }
  if (blockIdx.x == 0 && lane == 0) {
    A total = 0;
    for (int j = 0; j < kTileRows; ++j) total += sh_n[j];
    part.counts[blockIdx.y] = total;
  }
}

template <typename T>
__global__ void bwd_merge_kernel(BwdReduceParams p, int splits) {
  using A = acc_t<T>;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= p.channels) return;
  Partials<A> part(p.workspace, splits, p.channels);
  A* sums = static_cast<A*>(p.sums);
  for (int k = 0; k < 3; ++k) {
    A total = 0;
    for (int s = 0; s < splits; ++s) total += part.values[(s * 3 + k) * p.channels + c];
    sums[k * p.channels + c] = total;
  }
  if (c == 0) {
    A total = 0;
    for (int s = 0; s < splits; ++s) total += part.counts[s];
    *static_cast<A*>(p.count) = total;
  }
}

// ---- backward dx -----------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kRowThreads) bwd_apply_kernel(BwdApplyParams p) {
  using A = acc_t<T>;
  __shared__ A scratch[kRowThreads / 32];
  const int64_t r = blockIdx.x;
  const T* dyr = static_cast<const T*>(p.dy) + r * p.channels;
  const T* xr = static_cast<const T*>(p.x) + r * p.channels;
  T* dxr = static_cast<T*>(p.dx) + r * p.channels;
  const A* nw = static_cast<const A*>(p.norm_weight);
  const A* bw = static_cast<const A*>(p.bn_weight);
  const A* bm = static_cast<const A*>(p.bn_mean);
  const A* br = static_cast<const A*>(p.bn_rstd);
  const A* sums = static_cast<const A*>(p.sums);
  const A alpha = *static_cast<const A*>(p.alpha), lam = static_cast<A>(p.lam);
  const A count = *static_cast<const A*>(p.count);
  const bool has_norm = p.norm != Norm::kNone;
  const A rm = has_norm ? static_cast<const A*>(p.row_mean)[r] : A(0);
  const A rr = has_norm ? static_cast<const A*>(p.row_rstd)[r] : A(0);

  A h_mean = 0, hx_mean = 0;
  if (has_norm) {
    A h_acc = 0, hx_acc = 0;
    for (int64_t c = threadIdx.x; c < p.channels; c += blockDim.x) {
      const A h = lam * nw[c] * to_acc(dyr[c]);
      h_acc += h;
      hx_acc += h * row_xhat<A>(to_acc(xr[c]), rm, rr);
    }
    if (p.norm == Norm::kLayer) h_mean = block_sum(h_acc, scratch) / A(p.channels);
    hx_mean = block_sum(hx_acc, scratch) / A(p.channels);
  }
  const A kept = p.training && is_kept(p.mask, r) ? A(1) : A(0);
  for (int64_t c = threadIdx.x; c < p.channels; c += blockDim.x) {
    const auto f = bwd_coeffs<A>(nw ? nw[c] : A(0), bw[c], alpha, bm[c], br[c], sums[c], sums[p.channels + c],
                                 count, lam, p.training);
    const A g = to_acc(dyr[c]), v = to_acc(xr[c]);
    dxr[c] = from_acc<T>(bwd_elem<A>(g, v, f.mu, f.rstd, f.p, f.c0, f.c1, kept, f.k * g, rr,
                                     row_xhat<A>(v, rm, rr), h_mean, hx_mean));
  }
}

dim3 column_grid(int64_t channels, int splits) { return dim3(ceil_div(channels, kTileC), splits); }
const dim3 kColumnBlock(kTileC, kTileRows);
constexpr int kMergeThreads = 256;

}  // namespace

size_t workspace_bytes_cuda(int64_t rows, int64_t channels, DType dtype) {
  const size_t acc_bytes = dtype == DType::kFloat64 ? sizeof(double) : sizeof(float);
  const int splits = row_splits(rows, channels);
  return acc_bytes * static_cast<size_t>(splits) * (3 * static_cast<size_t>(channels) + 1);
}

void stats_cuda(const StatsParams& p, CUstream_st* stream) {
  const int splits = row_splits(p.rows, p.channels);
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] {
    stats_partial_kernel<T><<<column_grid(p.channels, splits), kColumnBlock, 0, stream>>>(p, splits);
    stats_merge_kernel<T><<<ceil_div(p.channels, kMergeThreads), kMergeThreads, 0, stream>>>(p, splits);
  });
}

void apply_cuda(const ApplyParams& p, CUstream_st* stream) {
  if (p.rows == 0) return;
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] {
    apply_kernel<T><<<static_cast<unsigned>(p.rows), kRowThreads, 0, stream>>>(p);
  });
}

void bwd_reduce_cuda(const BwdReduceParams& p, CUstream_st* stream) {
  const int splits = row_splits(p.rows, p.channels);
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] {
    bwd_partial_kernel<T><<<column_grid(p.channels, splits), kColumnBlock, 0, stream>>>(p, splits);
    bwd_merge_kernel<T><<<ceil_div(p.channels, kMergeThreads), kMergeThreads, 0, stream>>>(p, splits);
  });
}

void bwd_apply_cuda(const BwdApplyParams& p, CUstream_st* stream) {
  if (p.rows == 0) return;
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] {
    bwd_apply_kernel<T><<<static_cast<unsigned>(p.rows), kRowThreads, 0, stream>>>(p);
  });
}

}  // namespace slab::prepbn
