// Fused optimizer steps: parameter structs and launchers of the multi-tensor engine. No torch
// headers; the binding layer (optim_ops.cpp) checks the tensor lists and fills these structs.
//
// The engine walks lists of contiguous tensors of one (device, dtype) in chunks and applies a
// rule (optim_math.h) to the elements: on the CPU parallel_for over the chunks of all tensors
// (for_each_chunk in optim_cpu.cpp), on CUDA one kernel template over (chunk table, rule), one
// block per chunk (optim_cuda.cu). Reductions are per tensor: every chunk writes one partial sum
// per term and the partials of a tensor are added in chunk order, so results do not depend on
// thread counts or block scheduling. The CUDA work split (launch tables, chunk -> tensor map,
// thread -> pack map) is below, host-callable, so tests/host/optim_engine.cpp runs it on the CPU.
#pragma once
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "core/common.h"
#include "core/vec.h"

struct CUstream_st;

namespace slab::optim {

// Elements per chunk (one CPU task / one CUDA block).
constexpr int64_t kCpuChunk = 16384;
constexpr int64_t kCudaChunk = 32768;

// A list of `count` contiguous tensors: data[i] holds numel[i] elements. Host arrays.
struct TensorList {
  int64_t count = 0;
  const int64_t* numel = nullptr;
  void* const* data = nullptr;
};

// out[i] = sum_j (a_i[j] * a_scale + weight_decay * b_i[j])^2 for every tensor i of `a`.
// `b` is empty (count 0) or has the shapes and dtype of `a`; a_scale = 1 / *grad_scale (1 when
// grad_scale is null). out: `a.count` values of the accumulation type.
struct SqNormParams {
  DType dtype;
  TensorList a, b;
  double weight_decay;
  const float* grad_scale;  // [1] or null
  void* out;
  void* workspace;  // CUDA: workspace_elems(a) values of the accumulation type; unused on CPU
};

// DoG/LDoG/SGD update, one pass: with d = g * s + weight_decay * x (s = -1/grad_scale when
// maximize else 1/grad_scale),   x <- x - eta[i] * d,   dist2[i] <- ||x_new - x0||^2
// (of the stored, rounded x_new). Nothing is written when *found_inf != 0.
// x, g: dtype; x0, eta, dist2: accumulation type.
struct DogUpdateParams {
  DType dtype;
  TensorList x, g, x0;
  void* const* dist2;  // count pointers to one accumulation-type value each
  const void* eta;     // [count] accumulation type
  double weight_decay;
  bool maximize;
  const float* grad_scale;  // [1] or null
  const float* found_inf;   // [1] or null
  void* workspace;          // CUDA: workspace_elems(x) values; unused on CPU
};

// Lion (Chen et al. 2023): c = beta1*m + (1-beta1)*g;  x <- x*(1 - lr*wd) - lr*sign(c);
// m <- beta2*m + (1-beta2)*g. g is the (unscaled, sign-adjusted) gradient; m accumulation type.
struct LionParams {
  DType dtype;
  TensorList x, g, m;
  const void* lr;  // [1] accumulation type
  double beta1, beta2, weight_decay;
  bool maximize;
  const float* grad_scale;
  const float* found_inf;
};

// LAMB stage 1 (You et al. 2020): with g the unscaled (sign-adjusted) gradient,
//   m <- beta1*m + (1-beta1)*g,  v <- beta2*v + (1-beta2)*g^2,
//   u  = (m / bc1) / (sqrt(v / bc2) + eps) + weight_decay * x   (bc_i = 1 - beta_i^t, or 1;
//   t is the tensor's own step count)
// and per tensor norms[2i] = ||x||^2, norms[2i+1] = ||u||^2. u is not stored: stage 2 recomputes
// it from m and v. Nothing is written (norms become 0) when *found_inf != 0.
struct LambParams {
  DType dtype;
  TensorList x, g, m, v;  // x, g: dtype; m, v: accumulation type
  const void* bias_corr;  // [count, 2] accumulation type: 1 / bc1, 1 / sqrt(bc2) per tensor (computed in double)
  double beta1, beta2, eps, weight_decay;
  bool maximize;
  const float* grad_scale;
  const float* found_inf;
  void* norms;      // stage 1: [2 * count] accumulation type
  const void* lr;   // stage 2: [count] per-tensor step size lr * trust ratio
  void* workspace;  // CUDA stage 1: 2 * workspace_elems(x) values
};

// SGD with momentum and a per-tensor scale (LARS / LARC): d = g + weight_decay * x,
//   buf <- momentum * buf + scale[i] * d,   x <- x - lr * buf.
struct MomentumParams {
  DType dtype;
  TensorList x, g, buf;  // buf: accumulation type
  const void* scale;     // [count] accumulation type
  const void* lr;        // [1] accumulation type
  double momentum, weight_decay;
  bool maximize;
  const float* grad_scale;
  const float* found_inf;
};

// AdamP (Heo et al. 2021). Each tensor is viewed as rows x cols (rows = size(0) for 2+-D tensors,
// one row for 0/1-D ones; rows[i] gives the count, row sums are laid out tensor after tensor).
// Stage 1, with g the unscaled (sign-adjusted) gradient:
//   m <- beta1*m + (1-beta1)*g,  v <- beta2*v + (1-beta2)*g^2,
//   p  = n / (sqrt(v) / sqrt(bc2) + eps),  n = m (or beta1*m + (1-beta1)*g with nesterov)
// and per row: row_sums[r] = (<g,x>, <g,g>, <x,x>, <x,p>). Stage 2, with k[r] the projection
// coefficient of the row (0: no projection) and decay[i] = lr * weight_decay * wd_ratio[i]:
//   x <- x * (1 - decay[i]) - (lr / bc1) * (p - k[r] * x),
// bc_i = 1 - beta_i^t with t the tensor's own step count.
struct AdamPParams {
  DType dtype;
  TensorList x, g, m, v;
  const int64_t* rows;    // [count]: rows of each tensor (cols = numel / rows)
  const void* bias_corr;  // [count, 2] accumulation type: 1 / bc1, 1 / sqrt(bc2) per tensor
  double beta1, beta2, eps;
  bool nesterov, maximize;
  const float* grad_scale;
  const float* found_inf;
  void* row_sums;     // stage 1: [total_rows, 4] accumulation type
  const void* coef;   // stage 2: [total_rows]
  const void* decay;  // stage 2: [count]
  const void* lr;     // stage 2: [1]
};

// avg <- avg + w * (x - avg) (a lerp), avg and x of one dtype.
struct LerpParams {
  DType dtype;
  TensorList avg, x;
  double weight;
};

void sq_norm_cpu(const SqNormParams& p);
void dog_update_cpu(const DogUpdateParams& p);
void lion_cpu(const LionParams& p);
void lerp_cpu(const LerpParams& p);
void lamb_stage1_cpu(const LambParams& p);
void lamb_stage2_cpu(const LambParams& p);
void momentum_cpu(const MomentumParams& p);
void adamp_stage1_cpu(const AdamPParams& p);
void adamp_stage2_cpu(const AdamPParams& p);

void sq_norm_cuda(const SqNormParams& p, CUstream_st* stream);
void dog_update_cuda(const DogUpdateParams& p, CUstream_st* stream);
void lion_cuda(const LionParams& p, CUstream_st* stream);
void lerp_cuda(const LerpParams& p, CUstream_st* stream);
void lamb_stage1_cuda(const LambParams& p, CUstream_st* stream);
void lamb_stage2_cuda(const LambParams& p, CUstream_st* stream);
void momentum_cuda(const MomentumParams& p, CUstream_st* stream);
void adamp_stage1_cuda(const AdamPParams& p, CUstream_st* stream);
void adamp_stage2_cuda(const AdamPParams& p, CUstream_st* stream);

// Number of partial sums (one per CUDA chunk) the CUDA reductions over `list` need.
inline int64_t workspace_elems(const TensorList& list) {
  int64_t n = 0;
  for (int64_t i = 0; i < list.count; ++i) n += ceil_div(list.numel[i], kCudaChunk);
  return n;
}

// f(std::integral_constant<int, I>{}) for I = 0 .. N-1: a loop over the lists of a rule whose
// index is a compile-time constant (each list has its own element type).
template <int N, typename F, int... I>
SLAB_HD void static_for_impl(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, typename F>
SLAB_HD void static_for(F&& f) {
  static_for_impl<N>(f, std::make_integer_sequence<int, N>{});
}

// ---- the CUDA work split (host-callable) ---------------------------------------------------------

constexpr int kMaxTensors = 48;  // per launch; keeps the table under the 4 KiB argument limit
constexpr int kMaxLists = 4;
constexpr int kMaxSums = 2;  // partial-sum terms per rule (LAMB stage 1: ||x||^2, ||u||^2)

// One launch's tensors, a __grid_constant__ kernel argument: the `count` tensors' sizes, the
// first chunk of every tensor (prefix sums of their chunk counts; first_chunk[count] = blocks),
// their data in every list (null: an absent optional list) and their position in the whole list.
struct ChunkTable {
  int count;
  int first_chunk[kMaxTensors + 1];
  int index[kMaxTensors];
  int64_t numel[kMaxTensors];
  void* data[kMaxLists][kMaxTensors];
};

// The slot of the table chunk `c` (< first_chunk[count]) belongs to: the last slot whose first
// chunk is <= c. An empty tensor owns no chunk: its first chunk equals the next slot's, which is
// the one found. Binary search over the prefix sums.
SLAB_HD int slot_of_chunk(const int* first_chunk, int count, int c) {
  int lo = 0, hi = count - 1;  // invariant: first_chunk[lo] <= c; answer in [lo, hi]
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (first_chunk[mid] <= c)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// Chunk `c` of a launch: its slot and its elements [begin, begin + n) inside that tensor.
struct ChunkSpan {
  int slot;
  int64_t begin, n;
};

SLAB_HD ChunkSpan chunk_span(const ChunkTable& t, int c) {
  const int slot = slot_of_chunk(t.first_chunk, t.count, c);
  const int64_t begin = static_cast<int64_t>(c - t.first_chunk[slot]) * kCudaChunk;
  const int64_t left = t.numel[slot] - begin;
  return {slot, begin, left < kCudaChunk ? left : kCudaChunk};
}

// The thread -> element map inside a chunk of n elements: thread `tid` of `threads` takes packs
// tid, tid + threads, ... of kW elements (when `vectorized`), then the scalar tail the same way;
// body(offset, std::integral_constant<int, W>{}) with W = kW or 1. A chunk starts at a multiple of
// kCudaChunk, so it is aligned exactly when its tensors' bases are.
template <int kW, typename Body>
SLAB_HD void for_each_item(int64_t n, bool vectorized, int tid, int threads, Body&& body) {
  const PackSplit split = pack_split(n, kW, vectorized);
  for (int64_t k = tid; k < split.packs; k += threads) body(k * kW, std::integral_constant<int, kW>{});
  for (int64_t k = tid; k < split.tail; k += threads) body(split.packs * kW + k, std::integral_constant<int, 1>{});
}

// Splits `nlists` lists of one length into launches of at most kMaxTensors tensors and calls
// launch(table, chunk_offset) for each; chunk_offset (the chunks of the launches before) indexes
// the partial sums. Empty tensors stay in the table with no chunk, so their sums come out as 0;
// a launch may have no chunk at all (its sums still need writing). Host only.
template <typename Launch>
void for_each_launch(const TensorList* lists, int nlists, const Launch& launch) {
  const TensorList& lead = lists[0];
  int64_t chunk_offset = 0;
  for (int64_t begin = 0; begin < lead.count; begin += kMaxTensors) {
    ChunkTable t{};
    int blocks = 0;
    for (int64_t i = begin; i < lead.count && t.count < kMaxTensors; ++i) {
      const int k = t.count++;
      t.numel[k] = lead.numel[i];
      t.first_chunk[k] = blocks;
      t.index[k] = static_cast<int>(i);
      blocks += static_cast<int>(ceil_div(lead.numel[i], kCudaChunk));
      for (int l = 0; l < nlists; ++l) t.data[l][k] = lists[l].count ? lists[l].data[i] : nullptr;
    }
    t.first_chunk[t.count] = blocks;
    launch(static_cast<const ChunkTable&>(t), chunk_offset);
    chunk_offset += blocks;
  }
}

}  // namespace slab::optim
