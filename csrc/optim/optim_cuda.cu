// CUDA side of the multi-tensor engine: ONE kernel template over (chunk table, rule). Up to
// kMaxTensors tensors go into one launch: a ChunkTable (optim.h) passed as a __grid_constant__
// kernel argument, one block per kCudaChunk elements, its threads over 16-byte packs of the chunk
// (vectorized when every list's pointer is aligned, scalar otherwise; optim.h's for_each_item).
// Reductions write one partial per chunk and sum term into a workspace; a second small kernel adds
// each tensor's partials in chunk order (deterministic, no atomics) and stores the result.
// Per-element arithmetic: the rules of optim_math.h. AdamP keeps row-wise kernels (see there),
// with 16-byte packs of the state type where the rows are aligned.
#include <algorithm>

#include "core/cuda_types.cuh"
#include "core/vec_cuda.cuh"
#include "optim/optim.h"
#include "optim/optim_math.h"

namespace slab::optim {
namespace {

constexpr int kThreads = 256;  // 255 registers a thread: double division and sqrt of two elements a pack
constexpr int kFinalizeThreads = 256;
constexpr int kRowThreads = 256;  // AdamP's row kernels: four block sums per row need the registers

static_assert(sizeof(ChunkTable) + 128 <= 4000, "kernel arguments over the 4 KiB limit");

// What the rules need on the device: scalars of the accumulation type.
template <typename T>
struct CudaOps {
  using A = acc_t<T>;
  static __device__ __forceinline__ A sqrt(A v) { return ::sqrt(v); }
  static __device__ __forceinline__ A sign(A c) { return sign_of<A>(c); }
  static __device__ __forceinline__ A stored(A v) { return to_acc(from_acc<T>(v)); }
};

// W elements of E at p widened to the accumulation type: W / kPackWidth<E> 16-byte loads (a pack
// of 8 bf16 parameters meets 8 fp32 moments: two loads), or one scalar load (W == 1). Data read
// once: evict-first.
template <int W, typename E>
__device__ __forceinline__ void load_elems(const E* __restrict__ p, acc_t<E> (&out)[W]) {
  constexpr int kP = W == 1 ? 1 : kPackWidth<E>;
  static_assert(W % kP == 0, "a pack of the parameter dtype covers whole packs of every list");
#pragma unroll
  for (int q = 0; q < W / kP; ++q) {
    acc_t<E> part[kP];
    load_acc<kP, Cache::kStream>(p + q * kP, part);
#pragma unroll
    for (int e = 0; e < kP; ++e) out[q * kP + e] = part[e];
  }
}

template <int W, typename E>
__device__ __forceinline__ void store_elems(E* __restrict__ p, const acc_t<E> (&in)[W]) {
  constexpr int kP = W == 1 ? 1 : kPackWidth<E>;
#pragma unroll
  for (int q = 0; q < W / kP; ++q) {
    acc_t<E> part[kP];
#pragma unroll
    for (int e = 0; e < kP; ++e) part[e] = in[q * kP + e];
    store_acc<kP>(p + q * kP, part);
  }
}

template <typename A>
__device__ __forceinline__ void write_partial(A acc, A* partial) {
  __shared__ A scratch[32];
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// One block = one chunk: every list's element (pack) into registers, Rule::apply per element,
// the written lists stored back, the squares of the sum terms accumulated per thread and
// written as one partial per chunk and term (partial[j * stride + chunk]).
template <typename T, typename Rule>
__global__ void __launch_bounds__(kThreads)
    rule_kernel(const __grid_constant__ ChunkTable t, const Rule rule, acc_t<T>* partial, int64_t stride) {
  using A = acc_t<T>;
  if (skip_step(rule.found_inf)) return;
  const ChunkSpan c = chunk_span(t, blockIdx.x);
  void* ptr[kMaxLists] = {};
  const bool aligned = chunk_pointers<T, Rule>(t, c, ptr);
  const auto k = rule.template consts<A>(t.index[c.slot]);
  A acc[kMaxSums] = {};
  for_each_item<kPackWidth<T>>(c.n, aligned, threadIdx.x, blockDim.x, [&](int64_t i, auto w) {
    constexpr int W = decltype(w)::value;
    A r[kMaxLists][W];
    static_for<Rule::kLists>([&](auto l) {
      using E = ListElem<T, Rule, decltype(l)::value>;
      if (ptr[l]) {
        load_elems<W>(static_cast<const E*>(ptr[l]) + i, r[l]);
      } else {
#pragma unroll
        for (int e = 0; e < W; ++e) r[l][e] = A(0);  // an absent optional list
      }
    });
#pragma unroll
    for (int e = 0; e < W; ++e) {
      A v[kMaxLists], s[kMaxSums];
#pragma unroll
      for (int l = 0; l < kMaxLists; ++l) v[l] = l < Rule::kLists ? r[l][e] : A(0);
      Rule::template apply<CudaOps<T>>(k, v, s);
#pragma unroll
      for (int l = 0; l < Rule::kLists; ++l) r[l][e] = v[l];
#pragma unroll
      for (int j = 0; j < Rule::kSums; ++j) acc[j] = fma(s[j], s[j], acc[j]);
    }
    static_for<Rule::kLists>([&](auto l) {
      using E = ListElem<T, Rule, decltype(l)::value>;
      if constexpr (((Rule::kWritten >> decltype(l)::value) & 1) != 0)
        store_elems<W>(static_cast<E*>(ptr[l]) + i, r[l]);
    });
  });
  static_for<Rule::kSums>([&](auto j) { write_partial(acc[j], partial + j * stride); });
}

// Where the sums of one launch go: the launch's chunk prefix sums and, per term and tensor, the
// destination of the sum (one accumulation-type value).
struct SumTargets {
  int count;
  int first_chunk[kMaxTensors + 1];
  void* out[kMaxSums][kMaxTensors];
};

// Sums the partials of each tensor (blockIdx.x) and term (blockIdx.y) in a fixed order; nothing
// is written when the step was skipped.
template <typename A>
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_kernel(const __grid_constant__ SumTargets t, const A* __restrict__ partial, int64_t stride,
                    const float* found_inf) {
  __shared__ A scratch[32];
  if (skip_step(found_inf)) return;
  const A* p = partial + blockIdx.y * stride;
  A acc = 0;
  for (int c = t.first_chunk[blockIdx.x] + threadIdx.x; c < t.first_chunk[blockIdx.x + 1]; c += blockDim.x) acc += p[c];
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) *static_cast<A*>(t.out[blockIdx.y][blockIdx.x]) = acc;
}

// Runs `rule` over `lists` in launches of at most kMaxTensors tensors. With sums, `workspace`
// holds kSums * workspace_elems(lists[0]) partials and target(j, i) is where sum j of tensor i
// (its position in the whole list) goes.
template <typename T, typename Rule, typename Target>
void run_rule(const Rule& rule, const TensorList (&lists)[Rule::kLists], void* workspace, const Target& target,
              cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t stride = Rule::kSums > 0 ? workspace_elems(lists[0]) : 0;
  auto* partial = static_cast<A*>(workspace);
  for_each_launch(lists, Rule::kLists, [&](const ChunkTable& t, int64_t offset) {
    const int blocks = t.first_chunk[t.count];
    A* part = partial ? partial + offset : nullptr;
    if (blocks > 0) rule_kernel<T, Rule><<<blocks, kThreads, 0, stream>>>(t, rule, part, stride);
    if constexpr (Rule::kSums > 0) {
      SumTargets st{};
      st.count = t.count;
      for (int k = 0; k <= t.count; ++k) st.first_chunk[k] = t.first_chunk[k];
      for (int j = 0; j < Rule::kSums; ++j)
        for (int k = 0; k < t.count; ++k) st.out[j][k] = target(j, t.index[k]);
      finalize_kernel<A><<<dim3(t.count, Rule::kSums), kFinalizeThreads, 0, stream>>>(st, part, stride, rule.found_inf);
    }
  });
}

// ---- the optimizers: a rule and its lists each ------------------------------------------------

template <typename T>
void sq_norm(const SqNormParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  auto* out = static_cast<A*>(p.out);
  const SqNormRule<A> rule{nullptr, p.grad_scale, static_cast<A>(p.weight_decay)};
  run_rule<T>(rule, {p.a, p.b}, p.workspace, [&](int, int64_t i) -> void* { return out + i; }, stream);
}

template <typename T>
void dog_update(const DogUpdateParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  const DogRule<A> rule{p.found_inf, p.grad_scale, p.maximize, static_cast<A>(p.weight_decay),
                        static_cast<const A*>(p.eta)};
  run_rule<T>(rule, {p.x, p.g, p.x0}, p.workspace, [&](int, int64_t i) { return p.dist2[i]; }, stream);
}

template <typename T>
void lion(const LionParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  const LionRule<A> rule{p.found_inf,
                         p.grad_scale,
                         p.maximize,
                         static_cast<A>(1.0 - p.beta1),
                         static_cast<A>(1.0 - p.beta2),
                         static_cast<A>(p.weight_decay),
                         static_cast<const A*>(p.lr)};
  run_rule<T>(rule, {p.x, p.g, p.m}, nullptr, nullptr, stream);
}

template <typename A>
AdamConsts<A> lamb_consts(const LambParams& p) {
  return {p.found_inf,
          p.grad_scale,
          p.maximize,
          static_cast<A>(1.0 - p.beta1),
          static_cast<A>(1.0 - p.beta2),
          static_cast<A>(p.eps),
          static_cast<const A*>(p.bias_corr)};
}

template <typename T>
void lamb_stage1(const LambParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  auto* norms = static_cast<A*>(p.norms);
  cudaMemsetAsync(norms, 0, sizeof(A) * 2 * p.x.count, stream);  // what a skipped step reports
  const LambStage1Rule<A> rule{lamb_consts<A>(p), static_cast<A>(p.weight_decay)};
  run_rule<T>(
      rule, {p.x, p.g, p.m, p.v}, p.workspace, [&](int j, int64_t i) -> void* { return norms + 2 * i + j; }, stream);
}

template <typename T>
void lamb_stage2(const LambParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  const LambStage2Rule<A> rule{lamb_consts<A>(p), static_cast<A>(p.weight_decay), static_cast<const A*>(p.lr)};
  run_rule<T>(rule, {p.x, p.m, p.v}, nullptr, nullptr, stream);
}

template <typename T>
void momentum(const MomentumParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  const MomentumRule<A> rule{p.found_inf,
                             p.grad_scale,
                             p.maximize,
                             static_cast<A>(p.momentum),
                             static_cast<A>(p.weight_decay),
                             static_cast<const A*>(p.scale),
                             static_cast<const A*>(p.lr)};
  run_rule<T>(rule, {p.x, p.g, p.buf}, nullptr, nullptr, stream);
}

template <typename T>
void lerp(const LerpParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  run_rule<T>(LerpRule<A>{nullptr, static_cast<A>(p.weight)}, {p.avg, p.x}, nullptr, nullptr, stream);
}

// ---- AdamP: row-wise kernels ----------------------------------------------------------------------
// Not a rule of the engine: its sums are per row (size(0) of each tensor) and stage 2 needs each
// element's row coefficient, so a block takes whole rows of one tensor, not a fixed-size chunk.

// A launch's tensors for the row kernels.
struct RowTable {
  int count;
  int first_chunk[kMaxTensors + 1];  // prefix sums of the row-task counts
  int index[kMaxTensors];            // position of the tensor in the op's whole list
  int64_t cols[kMaxTensors];
  int64_t rows[kMaxTensors];
  int64_t row_base[kMaxTensors];  // first row of the tensor in the row sums
  void* data[kMaxLists][kMaxTensors];
};

static_assert(sizeof(RowTable) + sizeof(AdamPParams) <= 4000, "kernel arguments over the 4 KiB limit");

struct SqrtFn {
  template <typename A>
  __device__ __forceinline__ A operator()(A v) const {
    return sqrt(v);
  }
};

// Rows per block: 32-bit division (a 64-bit one is a called routine that made ptxas spill).
__device__ __forceinline__ int64_t rows_per_task(int64_t cols) {
  return cols >= kCudaChunk ? 1 : static_cast<int>(kCudaChunk) / max(static_cast<int>(cols), 1);
}

struct RowSpan {
  int tensor;
  int64_t row_begin, row_end, cols;
};

__device__ __forceinline__ RowSpan block_rows(const RowTable& t) {
  const int i = slot_of_chunk(t.first_chunk, t.count, blockIdx.x);
  const int64_t cols = t.cols[i], per = rows_per_task(cols);
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

// Elements c of a row as packs of W (W = kPackWidth of the state type when the whole launch is
// aligned row by row, see row_packs; else 1): thread t takes columns t * W, (t + blockDim) * W, ...
template <int W, typename T>
__device__ __forceinline__ void load_row_pack(const T* p, acc_t<T> (&out)[W]) {
  const Pack<T, W> pk = read_pack<W>(p);
#pragma unroll
  for (int j = 0; j < W; ++j) out[j] = to_acc(pk.v[j]);
}

template <int W, typename T>
__device__ __forceinline__ void store_row_pack(T* p, const acc_t<T> (&in)[W]) {
  Pack<T, W> pk;
#pragma unroll
  for (int j = 0; j < W; ++j) pk.v[j] = from_acc<T>(in[j]);
  write_pack<W>(p, pk);
}

template <typename T, int W>
__global__ void __launch_bounds__(kRowThreads, 1)
    adamp_stage1_kernel(const __grid_constant__ RowTable t, const __grid_constant__ AdamPParams p) {
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
    for (int64_t i = r * s.cols + threadIdx.x * W; i < (r + 1) * s.cols; i += blockDim.x * W) {
      A xv[W], gv[W], mv[W], vv[W];
      load_row_pack<W>(x + i, xv);
      load_row_pack<W>(g + i, gv);
      load_row_pack<W>(m + i, mv);
      load_row_pack<W>(v + i, vv);
#pragma unroll
      for (int j = 0; j < W; ++j) {
        gv[j] *= k.scale;
        mv[j] = first_moment<A>(mv[j], gv[j], k.b1);
        vv[j] = second_moment<A>(vv[j], gv[j], k.b2);
        const A n = p.nesterov ? first_moment<A>(mv[j], gv[j], k.b1) : mv[j];
        const A pv = adamp_direction<A>(n, vv[j], k.rsqrt_bc2, k.eps, SqrtFn{});
        gx += gv[j] * xv[j];
        gg += gv[j] * gv[j];
        xx += xv[j] * xv[j];
        xp += xv[j] * pv;
      }
      store_row_pack<W>(m + i, mv);
      store_row_pack<W>(v + i, vv);
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

template <typename T, int W>
__global__ void __launch_bounds__(kRowThreads, 1)
    adamp_stage2_kernel(const __grid_constant__ RowTable t, const __grid_constant__ AdamPParams p) {
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
    for (int64_t i = r * s.cols + threadIdx.x * W; i < (r + 1) * s.cols; i += blockDim.x * W) {
      A xv[W], gv[W] = {}, mv[W], vv[W];
      load_row_pack<W>(x + i, xv);
      load_row_pack<W>(m + i, mv);
      load_row_pack<W>(v + i, vv);
      if (p.nesterov) load_row_pack<W>(g + i, gv);
#pragma unroll
      for (int j = 0; j < W; ++j) {
        const A n = p.nesterov ? first_moment<A>(mv[j], gv[j] * k.scale, k.b1) : mv[j];
        const A pv = adamp_direction<A>(n, vv[j], k.rsqrt_bc2, k.eps, SqrtFn{});
        xv[j] = adamp_step<A>(xv[j], pv, kr, decay, step_size);
      }
      store_row_pack<W>(x + i, xv);
    }
  }
}

// Packs of the state type's 16-byte width when every row of every tensor of the launch starts
// aligned in all four lists (aligned bases, whole packs per row), else single elements.
template <typename T>
bool row_packs(const RowTable& t) {
  constexpr int kW = kPackWidth<acc_t<T>>;
  for (int k = 0; k < t.count; ++k) {
    if (t.cols[k] % kW != 0) return false;
    for (int l = 0; l < 4; ++l)
      if (!all_vec_aligned(t.data[l][k])) return false;
  }
  return true;
}

// Launches of at most kMaxTensors tensors whose blocks are row tasks (AdamP).
template <typename Launch>
void for_each_row_launch(const AdamPParams& p, const Launch& launch) {
  const TensorList lists[4] = {p.x, p.g, p.m, p.v};
  int64_t row_base = 0;
  for (int64_t begin = 0; begin < p.x.count; begin += kMaxTensors) {
    RowTable t{};
    int blocks = 0;
    for (int64_t i = begin; i < p.x.count && t.count < kMaxTensors; ++i) {
      const int k = t.count++;
      const int64_t rows = p.rows[i], cols = rows > 0 ? p.x.numel[i] / rows : 0;
      const int64_t per = std::max<int64_t>(1, kCudaChunk / std::max<int64_t>(cols, 1));
      t.cols[k] = cols;
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
  for_each_row_launch(p, [&](const RowTable& t, int blocks) {
    SLAB_BOOL_SWITCH(row_packs<T>(t), kPacked, [&] {
      adamp_stage1_kernel<T, kPacked ? kPackWidth<acc_t<T>> : 1><<<blocks, kRowThreads, 0, stream>>>(t, p);
    });
  });
}

template <typename T>
void adamp_stage2(const AdamPParams& p, cudaStream_t stream) {
  for_each_row_launch(p, [&](const RowTable& t, int blocks) {
    SLAB_BOOL_SWITCH(row_packs<T>(t), kPacked, [&] {
      adamp_stage2_kernel<T, kPacked ? kPackWidth<acc_t<T>> : 1><<<blocks, kRowThreads, 0, stream>>>(t, p);
    });
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
