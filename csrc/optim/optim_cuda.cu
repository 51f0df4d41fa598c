// CUDA side of the multi-tensor engine. Up to kMaxTensors tensors go into one launch: a chunk
// table (pointers, sizes, first chunk of every tensor) passed as a __grid_constant__ kernel
// argument, one block per kCudaChunk elements. Reductions write one partial per chunk into a
// workspace; a second small kernel adds each tensor's partials in chunk order (deterministic)
// and stores the result through the table. Per-element arithmetic comes from optim_math.h.
#include <algorithm>

#include "core/cuda_types.cuh"
#include "optim/optim.h"
#include "optim/optim_math.h"

namespace slab::optim {
namespace {

constexpr int kMaxTensors = 48;  // per launch; keeps the table under the 4 KiB argument limit
constexpr int kMaxLists = 4;
constexpr int kThreads = 512;
constexpr int kRowThreads = 256;  // AdamP's row kernels: four block sums per row need the registers

// A launch's tensors; passed by value as a kernel argument (with the op's params struct it must
// stay under the 4 KiB kernel-parameter limit; see the static_assert below).
struct Table {
  int count;                            // tensors in this launch
  int64_t numel[kMaxTensors];
  int first_chunk[kMaxTensors + 1];     // prefix sums of chunk counts
  void* data[kMaxLists][kMaxTensors];
  void* result[kMaxTensors];            // per-tensor reduction target (or null)
  int index[kMaxTensors];               // position of the tensor in the op's whole list
  int64_t rows[kMaxTensors];            // row-wise ops (AdamP): rows of the tensor
  int64_t row_base[kMaxTensors];        // row-wise ops: first row of the tensor in the row sums
};

static_assert(sizeof(Table) + sizeof(AdamPParams) <= 4000, "kernel arguments over the 4 KiB limit");
static_assert(sizeof(Table) + sizeof(LambParams) <= 4000, "kernel arguments over the 4 KiB limit");

// Which tensor the block's chunk belongs to: the table is short, a linear scan is cheapest.
__device__ __forceinline__ int tensor_of(const Table& t, int chunk) {
  int i = 0;
  while (i + 1 < t.count && t.first_chunk[i + 1] <= chunk) ++i;
  return i;
}

__device__ __forceinline__ float grad_factor(const float* grad_scale, bool maximize) {
  const float s = grad_scale ? 1.0f / *grad_scale : 1.0f;
  return maximize ? -s : s;
}

__device__ __forceinline__ bool skip_step(const float* found_inf) { return found_inf != nullptr && *found_inf != 0.0f; }

// Sums the partials of each tensor in chunk order; one block per tensor.
template <typename A>
__global__ void __launch_bounds__(256) finalize_kernel(const __grid_constant__ Table t, const A* partial,
                                                      const float* found_inf) {
  __shared__ A scratch[32];
  if (skip_step(found_inf) || t.result[blockIdx.x] == nullptr) return;
  A acc = 0;
  for (int c = t.first_chunk[blockIdx.x] + threadIdx.x; c < t.first_chunk[blockIdx.x + 1]; c += blockDim.x)
    acc += partial[c];
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) *static_cast<A*>(t.result[blockIdx.x]) = acc;
}

// Chunk bounds of this block inside its tensor.
struct Span {
  int tensor;
  int64_t begin, end;
};

__device__ __forceinline__ Span block_span(const Table& t) {
  const int i = tensor_of(t, blockIdx.x);
  const int64_t begin = static_cast<int64_t>(blockIdx.x - t.first_chunk[i]) * kCudaChunk;
  return {i, begin, min(t.numel[i], begin + kCudaChunk)};
}

template <typename A>
__device__ __forceinline__ void write_partial(A acc, A* partial) {
  __shared__ A scratch[32];
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sq_norm_kernel(const __grid_constant__ Table t, float scale_in,
                                                          const float* grad_scale, float weight_decay,
                                                          acc_t<T>* partial) {
  using A = acc_t<T>;
  const Span s = block_span(t);
  const T* a = static_cast<const T*>(t.data[0][s.tensor]);
  const T* b = static_cast<const T*>(t.data[1][s.tensor]);
  const A scale = grad_scale ? A(1) / A(*grad_scale) : A(scale_in), wd = weight_decay;
  A acc = 0;
  for (int64_t i = s.begin + threadIdx.x; i < s.end; i += blockDim.x) {
    const A d = effective_grad<A>(to_acc(a[i]), b ? to_acc(b[i]) : A(0), scale, wd);
    acc += d * d;
  }
  write_partial(acc, partial);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) dog_update_kernel(const __grid_constant__ Table t, const acc_t<T>* eta_ptr,
                                                             bool maximize, const float* grad_scale,
                                                             const float* found_inf, float weight_decay,
                                                             acc_t<T>* partial) {
  using A = acc_t<T>;
  if (skip_step(found_inf)) return;
  const Span s = block_span(t);
  T* x = static_cast<T*>(t.data[0][s.tensor]);
  const T* g = static_cast<const T*>(t.data[1][s.tensor]);
  const A* x0 = static_cast<const A*>(t.data[2][s.tensor]);
  const A scale = grad_factor(grad_scale, maximize), wd = weight_decay, eta = eta_ptr[t.index[s.tensor]];
  A acc = 0;
  for (int64_t i = s.begin + threadIdx.x; i < s.end; i += blockDim.x) {
    const A xv = to_acc(x[i]);
    const T xn = from_acc<T>(sgd_step<A>(xv, effective_grad<A>(to_acc(g[i]), xv, scale, wd), eta));
    x[i] = xn;
    acc += sq_diff<A>(to_acc(xn), x0[i]);  // distance of the stored (rounded) iterate
  }
  write_partial(acc, partial);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) lion_kernel(const __grid_constant__ Table t, const acc_t<T>* lr_ptr,
                                                       float one_minus_beta1, float one_minus_beta2,
                                                       float weight_decay, bool maximize,
                                                       const float* grad_scale, const float* found_inf) {
  using A = acc_t<T>;
  if (skip_step(found_inf)) return;
  const Span s = block_span(t);
  T* x = static_cast<T*>(t.data[0][s.tensor]);
  const T* g = static_cast<const T*>(t.data[1][s.tensor]);
  A* m = static_cast<A*>(t.data[2][s.tensor]);
  const A scale = grad_factor(grad_scale, maximize), lr = *lr_ptr, b1 = one_minus_beta1, b2 = one_minus_beta2,
          wd = weight_decay;
  for (int64_t i = s.begin + threadIdx.x; i < s.end; i += blockDim.x) {
    const A gv = to_acc(g[i]) * scale, mv = m[i];
    x[i] = from_acc<T>(lion_step<A>(to_acc(x[i]), sign_of<A>(lion_direction<A>(mv, gv, b1)), lr, wd));
    m[i] = lion_momentum<A>(mv, gv, b2);
  }
}

template <typename A>
struct LambConsts {
  A b1, b2, eps, wd, inv_bc1, rsqrt_bc2;
};

// `index`: the tensor's position in the op's list (its row of the per-tensor bias corrections).
template <typename A>
__device__ __forceinline__ LambConsts<A> lamb_consts(const LambParams& p, int index) {
  const A* bc = static_cast<const A*>(p.bias_corr) + 2 * index;
  return {A(1.0 - p.beta1), A(1.0 - p.beta2), A(p.eps), A(p.weight_decay), bc[0], bc[1]};
}

struct SqrtFn {
  template <typename A>
  __device__ __forceinline__ A operator()(A v) const { return sqrt(v); }
};

template <typename T>
__global__ void __launch_bounds__(kThreads) lamb_stage1_kernel(const __grid_constant__ Table t, const LambParams p,
                                                              acc_t<T>* partial_x, acc_t<T>* partial_u) {
  using A = acc_t<T>;
  if (skip_step(p.found_inf)) return;
  const Span s = block_span(t);
  const T* x = static_cast<const T*>(t.data[0][s.tensor]);
  const T* g = static_cast<const T*>(t.data[1][s.tensor]);
  A* m = static_cast<A*>(t.data[2][s.tensor]);
  A* v = static_cast<A*>(t.data[3][s.tensor]);
  const LambConsts<A> k = lamb_consts<A>(p, t.index[s.tensor]);
  const A scale = grad_factor(p.grad_scale, p.maximize);
  A xs = 0, us = 0;
  for (int64_t i = s.begin + threadIdx.x; i < s.end; i += blockDim.x) {
    const A xv = to_acc(x[i]), gv = to_acc(g[i]) * scale;
    const A mv = first_moment<A>(m[i], gv, k.b1), vv = second_moment<A>(v[i], gv, k.b2);
    m[i] = mv;
    v[i] = vv;
    const A u = lamb_direction<A>(mv, vv, xv, k.inv_bc1, k.rsqrt_bc2, k.eps, k.wd, SqrtFn{});
    xs += xv * xv;
    us += u * u;
  }
  write_partial(xs, partial_x);
  write_partial(us, partial_u);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) lamb_stage2_kernel(const __grid_constant__ Table t, const LambParams p) {
  using A = acc_t<T>;
  if (skip_step(p.found_inf)) return;
  const Span s = block_span(t);
  T* x = static_cast<T*>(t.data[0][s.tensor]);
  const A* m = static_cast<const A*>(t.data[2][s.tensor]);
  const A* v = static_cast<const A*>(t.data[3][s.tensor]);
  const LambConsts<A> k = lamb_consts<A>(p, t.index[s.tensor]);
  const A lr = static_cast<const A*>(p.lr)[t.index[s.tensor]];
  for (int64_t i = s.begin + threadIdx.x; i < s.end; i += blockDim.x) {
    const A xv = to_acc(x[i]);
    const A u = lamb_direction<A>(m[i], v[i], xv, k.inv_bc1, k.rsqrt_bc2, k.eps, k.wd, SqrtFn{});
    x[i] = from_acc<T>(sgd_step<A>(xv, u, lr));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) momentum_kernel(const __grid_constant__ Table t, const MomentumParams p) {
  using A = acc_t<T>;
  if (skip_step(p.found_inf)) return;
  const Span s = block_span(t);
  T* x = static_cast<T*>(t.data[0][s.tensor]);
  const T* g = static_cast<const T*>(t.data[1][s.tensor]);
  A* buf = static_cast<A*>(t.data[2][s.tensor]);
  const A scale = grad_factor(p.grad_scale, p.maximize), mu = p.momentum, wd = p.weight_decay;
  const A lr = *static_cast<const A*>(p.lr), ts = static_cast<const A*>(p.scale)[t.index[s.tensor]];
  for (int64_t i = s.begin + threadIdx.x; i < s.end; i += blockDim.x) {
    const A xv = to_acc(x[i]);
    const A b = momentum_buffer<A>(buf[i], effective_grad<A>(to_acc(g[i]), xv, scale, wd), mu, ts);
    buf[i] = b;
    x[i] = from_acc<T>(sgd_step<A>(xv, b, lr));
  }
}

// ---- AdamP: row-wise tasks (one block = whole rows of one tensor) ----------------------------------

// Rows per block: 32-bit division (a 64-bit one is a called routine that made ptxas spill).
__device__ __forceinline__ int64_t rows_per_task(int64_t cols) {
  return cols >= kCudaChunk ? 1 : static_cast<int>(kCudaChunk) / max(static_cast<int>(cols), 1);
}

struct RowSpan {
  int tensor;
  int64_t row_begin, row_end, cols;
};

__device__ __forceinline__ RowSpan block_rows(const Table& t) {
  const int i = tensor_of(t, blockIdx.x);
  const int64_t cols = t.numel[i], per = rows_per_task(cols);  // row launches store cols in numel
  const int64_t begin = static_cast<int64_t>(blockIdx.x - t.first_chunk[i]) * per;
  return {i, begin, min(t.rows[i], begin + per), cols};
}

template <typename A>
struct AdamPConsts {
  A scale, b1, b2, eps, rsqrt_bc2, inv_bc1;
};

template <typename A>
__device__ __forceinline__ AdamPConsts<A> adamp_consts(const AdamPParams& p, int index) {
  const A* bc = static_cast<const A*>(p.bias_corr) + 2 * index;
  return {grad_factor(p.grad_scale, p.maximize), A(1.0 - p.beta1), A(1.0 - p.beta2), A(p.eps), bc[1], bc[0]};
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads, 1) adamp_stage1_kernel(const __grid_constant__ Table t,
                                                                    const __grid_constant__ AdamPParams p) {
  using A = acc_t<T>;
  __shared__ A scratch[32];
  if (skip_step(p.found_inf)) return;
  const RowSpan s = block_rows(t);
  const T* x = static_cast<const T*>(t.data[0][s.tensor]);
  const T* g = static_cast<const T*>(t.data[1][s.tensor]);
  A* m = static_cast<A*>(t.data[2][s.tensor]);
  A* v = static_cast<A*>(t.data[3][s.tensor]);
  const AdamPConsts<A> k = adamp_consts<A>(p, t.index[s.tensor]);
  A* sums = static_cast<A*>(p.row_sums);
  for (int64_t r = s.row_begin; r < s.row_end; ++r) {
    A gx = 0, gg = 0, xx = 0, xp = 0;
    for (int64_t i = r * s.cols + threadIdx.x; i < (r + 1) * s.cols; i += blockDim.x) {
      const A xv = to_acc(x[i]), gv = to_acc(g[i]) * k.scale;
      const A mv = first_moment<A>(m[i], gv, k.b1), vv = second_moment<A>(v[i], gv, k.b2);
      m[i] = mv;
      v[i] = vv;
      const A n = p.nesterov ? first_moment<A>(mv, gv, k.b1) : mv;
      const A pv = adamp_direction<A>(n, vv, k.rsqrt_bc2, k.eps, SqrtFn{});
      gx += gv * xv;
      gg += gv * gv;
      xx += xv * xv;
      xp += xv * pv;
    }
    gx = block_sum(gx, scratch);
    gg = block_sum(gg, scratch);
    xx = block_sum(xx, scratch);
    xp = block_sum(xp, scratch);
    if (threadIdx.x == 0) {
      A* o = sums + 4 * (t.row_base[s.tensor] + r);
      o[0] = gx, o[1] = gg, o[2] = xx, o[3] = xp;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads, 1) adamp_stage2_kernel(const __grid_constant__ Table t,
                                                                    const __grid_constant__ AdamPParams p) {
  using A = acc_t<T>;
  if (skip_step(p.found_inf)) return;
  const RowSpan s = block_rows(t);
  T* x = static_cast<T*>(t.data[0][s.tensor]);
  const T* g = static_cast<const T*>(t.data[1][s.tensor]);
  const A* m = static_cast<const A*>(t.data[2][s.tensor]);
  const A* v = static_cast<const A*>(t.data[3][s.tensor]);
  const AdamPConsts<A> k = adamp_consts<A>(p, t.index[s.tensor]);
  const A step_size = *static_cast<const A*>(p.lr) * k.inv_bc1;
  const A decay = static_cast<const A*>(p.decay)[t.index[s.tensor]];
  const A* coef = static_cast<const A*>(p.coef);
  for (int64_t r = s.row_begin; r < s.row_end; ++r) {
    const A kr = coef[t.row_base[s.tensor] + r];
    for (int64_t i = r * s.cols + threadIdx.x; i < (r + 1) * s.cols; i += blockDim.x) {
      const A n = p.nesterov ? first_moment<A>(m[i], to_acc(g[i]) * k.scale, k.b1) : m[i];
      const A pv = adamp_direction<A>(n, v[i], k.rsqrt_bc2, k.eps, SqrtFn{});
      x[i] = from_acc<T>(adamp_step<A>(to_acc(x[i]), pv, kr, decay, step_size));
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) lerp_kernel(const __grid_constant__ Table t, float weight) {
  using A = acc_t<T>;
  const Span s = block_span(t);
  T* avg = static_cast<T*>(t.data[0][s.tensor]);
  const T* x = static_cast<const T*>(t.data[1][s.tensor]);
  const A w = weight;
  for (int64_t i = s.begin + threadIdx.x; i < s.end; i += blockDim.x)
    avg[i] = from_acc<T>(lerp_to<A>(to_acc(avg[i]), to_acc(x[i]), w));
}

// Splits the lists into launches of at most kMaxTensors tensors and calls
// launch(table, chunk_offset, blocks) for each; chunk_offset indexes the global partials.
// Empty tensors stay in the table with no chunk, so their reductions come out as 0.
template <typename Fill, typename Launch>
void for_each_launch(const TensorList* lists, int nlists, const Fill& fill, const Launch& launch) {
  const TensorList& first = lists[0];
  int64_t chunk_offset = 0;
  for (int64_t begin = 0; begin < first.count; begin += kMaxTensors) {
    Table t{};
    int blocks = 0;
    for (int64_t i = begin; i < first.count && t.count < kMaxTensors; ++i) {
      const int k = t.count++;
      t.numel[k] = first.numel[i];
      t.first_chunk[k] = blocks;
      t.index[k] = static_cast<int>(i);
      blocks += static_cast<int>(ceil_div(first.numel[i], kCudaChunk));
      for (int l = 0; l < nlists; ++l) t.data[l][k] = lists[l].count ? lists[l].data[i] : nullptr;
      fill(t, k, i);
    }
    t.first_chunk[t.count] = blocks;
    launch(t, chunk_offset, blocks);
    chunk_offset += blocks;
  }
}

template <typename T>
void sq_norm(const SqNormParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  auto* out = static_cast<A*>(p.out);
  auto* partial = static_cast<A*>(p.workspace);
  const TensorList lists[2] = {p.a, p.b};
  for_each_launch(
      lists, 2, [&](Table& t, int k, int64_t i) { t.result[k] = out + i; },
      [&](const Table& t, int64_t offset, int blocks) {
        if (blocks > 0)
          sq_norm_kernel<T><<<blocks, kThreads, 0, stream>>>(t, 1.0f, p.grad_scale,
                                                             static_cast<float>(p.weight_decay), partial + offset);
        finalize_kernel<A><<<t.count, 256, 0, stream>>>(t, partial + offset, nullptr);
      });
}

template <typename T>
void dog_update(const DogUpdateParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  auto* partial = static_cast<A*>(p.workspace);
  const TensorList lists[3] = {p.x, p.g, p.x0};
  for_each_launch(
      lists, 3, [&](Table& t, int k, int64_t i) { t.result[k] = p.dist2[i]; },
      [&](const Table& t, int64_t offset, int blocks) {
        if (blocks > 0)
          dog_update_kernel<T><<<blocks, kThreads, 0, stream>>>(
              t, static_cast<const A*>(p.eta), p.maximize, p.grad_scale, p.found_inf,
              static_cast<float>(p.weight_decay), partial + offset);
        finalize_kernel<A><<<t.count, 256, 0, stream>>>(t, partial + offset, p.found_inf);
      });
}

template <typename T>
void lion(const LionParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  const TensorList lists[3] = {p.x, p.g, p.m};
  for_each_launch(
      lists, 3, [](Table&, int, int64_t) {},
      [&](const Table& t, int64_t, int blocks) {
        if (blocks > 0)
          lion_kernel<T><<<blocks, kThreads, 0, stream>>>(
              t, static_cast<const A*>(p.lr), static_cast<float>(1.0 - p.beta1), static_cast<float>(1.0 - p.beta2),
              static_cast<float>(p.weight_decay), p.maximize, p.grad_scale, p.found_inf);
      });
}

template <typename T>
void lamb_stage1(const LambParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  auto* norms = static_cast<A*>(p.norms);
  auto* partial_x = static_cast<A*>(p.workspace);
  A* partial_u = partial_x + workspace_floats(p.x);
  cudaMemsetAsync(norms, 0, sizeof(A) * 2 * p.x.count, stream);  // what a skipped step reports
  const TensorList lists[4] = {p.x, p.g, p.m, p.v};
  for_each_launch(
      lists, 4, [&](Table& t, int k, int64_t i) { t.result[k] = norms + 2 * i; },
      [&](const Table& t, int64_t offset, int blocks) {
        if (blocks > 0)
          lamb_stage1_kernel<T><<<blocks, kThreads, 0, stream>>>(t, p, partial_x + offset, partial_u + offset);
        finalize_kernel<A><<<t.count, 256, 0, stream>>>(t, partial_x + offset, p.found_inf);
        Table tu = t;
        for (int k = 0; k < t.count; ++k) tu.result[k] = norms + 2 * t.index[k] + 1;
        finalize_kernel<A><<<t.count, 256, 0, stream>>>(tu, partial_u + offset, p.found_inf);
      });
}

template <typename T>
void lamb_stage2(const LambParams& p, cudaStream_t stream) {
  const TensorList lists[4] = {p.x, p.g, p.m, p.v};
  for_each_launch(
      lists, 4, [](Table&, int, int64_t) {},
      [&](const Table& t, int64_t, int blocks) {
        if (blocks > 0) lamb_stage2_kernel<T><<<blocks, kThreads, 0, stream>>>(t, p);
      });
}

template <typename T>
void momentum(const MomentumParams& p, cudaStream_t stream) {
  const TensorList lists[3] = {p.x, p.g, p.buf};
  for_each_launch(
      lists, 3, [](Table&, int, int64_t) {},
      [&](const Table& t, int64_t, int blocks) {
        if (blocks > 0) momentum_kernel<T><<<blocks, kThreads, 0, stream>>>(t, p);
      });
}

// Launches of at most kMaxTensors tensors whose blocks are row tasks (AdamP).
template <typename Launch>
void for_each_row_launch(const AdamPParams& p, const Launch& launch) {
  const TensorList lists[4] = {p.x, p.g, p.m, p.v};
  int64_t row_base = 0;
  for (int64_t begin = 0; begin < p.x.count; begin += kMaxTensors) {
    Table t{};
    int blocks = 0;
    for (int64_t i = begin; i < p.x.count && t.count < kMaxTensors; ++i) {
      const int k = t.count++;
      const int64_t rows = p.rows[i], cols = rows > 0 ? p.x.numel[i] / rows : 0;
      const int64_t per = std::max<int64_t>(1, kCudaChunk / std::max<int64_t>(cols, 1));
      t.numel[k] = cols;  // row kernels need the row length, not the size
      t.rows[k] = rows;
      t.row_base[k] = row_base;
      t.first_chunk[k] = blocks;
      t.index[k] = static_cast<int>(i);
      blocks += static_cast<int>(ceil_div(rows, per));
      for (int l = 0; l < 4; ++l) t.data[l][k] = lists[l].data[i];
      row_base += rows;
    }
    t.first_chunk[t.count] = blocks;
    if (blocks > 0) launch(t, blocks);
  }
}

template <typename T>
void adamp_stage1(const AdamPParams& p, cudaStream_t stream) {
  int64_t total = 0;
  for (int64_t i = 0; i < p.x.count; ++i) total += p.rows[i];
  cudaMemsetAsync(p.row_sums, 0, sizeof(acc_t<T>) * 4 * total, stream);  // skipped steps and empty rows
  for_each_row_launch(p, [&](const Table& t, int blocks) {
    adamp_stage1_kernel<T><<<blocks, kRowThreads, 0, stream>>>(t, p);
  });
}

template <typename T>
void adamp_stage2(const AdamPParams& p, cudaStream_t stream) {
  for_each_row_launch(p, [&](const Table& t, int blocks) {
    adamp_stage2_kernel<T><<<blocks, kRowThreads, 0, stream>>>(t, p);
  });
}

template <typename T>
void lerp(const LerpParams& p, cudaStream_t stream) {
  const TensorList lists[2] = {p.avg, p.x};
  for_each_launch(
      lists, 2, [](Table&, int, int64_t) {},
      [&](const Table& t, int64_t, int blocks) {
        if (blocks > 0) lerp_kernel<T><<<blocks, kThreads, 0, stream>>>(t, static_cast<float>(p.weight));
      });
}

}  // namespace

void sq_norm_cuda(const SqNormParams& p, CUstream_st* stream) {
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] { sq_norm<T>(p, stream); });
}
void dog_update_cuda(const DogUpdateParams& p, CUstream_st* stream) {
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] { dog_update<T>(p, stream); });
}
void lion_cuda(const LionParams& p, CUstream_st* stream) {
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] { lion<T>(p, stream); });
}
void lamb_stage1_cuda(const LambParams& p, CUstream_st* stream) {
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] { lamb_stage1<T>(p, stream); });
}
void lamb_stage2_cuda(const LambParams& p, CUstream_st* stream) {
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] { lamb_stage2<T>(p, stream); });
}
void momentum_cuda(const MomentumParams& p, CUstream_st* stream) {
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] { momentum<T>(p, stream); });
}
void adamp_stage1_cuda(const AdamPParams& p, CUstream_st* stream) {
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] { adamp_stage1<T>(p, stream); });
}
void adamp_stage2_cuda(const AdamPParams& p, CUstream_st* stream) {
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] { adamp_stage2<T>(p, stream); });
}
void lerp_cuda(const LerpParams& p, CUstream_st* stream) {
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] { lerp<T>(p, stream); });
}

}  // namespace slab::optim
