// SLA CUDA kernels: a first, simple and exact version (fp32 accumulation, no tensor cores).
//
// Every pass is one "recurrence" over the tokens of a (batch, head) slice. A block owns 32
// columns of a state matrix X (threadIdx.x) and splits the other, "held" dimension (<= 256)
// over 8 thread rows, so each thread keeps up to 32 state values in registers. Tokens are staged in
// shared memory a group at a time; per token the block adds the token's outer product to X
// (X[t][h] += a[t] b[h]) and reads out out[t] = sum_h X[t][h] e[h] (+ a scalar column), the sum
// over h finished through shared memory. Non-causal passes accumulate every token first and read
// out afterwards. The four passes (which operands play a, b, e):
//   forward  X = S^T (t over Dv, h over D):   a = v,           b = phi(k), e = phi(q); den from z
//   dq       X = S   (t over D,  h over Dv):  a = phi(k),      b = v,      e = g,      + z gden
//   dk       X = dS  (reverse; t over D):     a = phi(q),      b = g,      e = v,      + dz
//   dv       X = dS^T (reverse; t over Dv):   a = g,           b = phi(q), e = phi(k)
// with g = grad_o / den and gden = -(grad_o . o) / den (a small kernel before the passes).
// The decode step streams the state once per token, in 16-byte packs where it is aligned.
#include <algorithm>
#include <cstdint>

#include "core/cuda_types.cuh"
#include "core/vec_cuda.cuh"
#include "sla/sla.h"
#include "sla/sla_math.h"

namespace slab::sla {
namespace {

constexpr int kTile = kCudaColumnTile;  // state columns per block (threadIdx.x)
constexpr int kGroups = 8;              // threadIdx.y: the held dimension is split over them
constexpr int kThreads = kTile * kGroups;

template <typename A>
struct TokensPerStage {
  static constexpr int value = 8;
};
template <>
struct TokensPerStage<double> {
  static constexpr int value = 4;
};  // same shared bytes

// Held values per thread: up to 256 held dims in fp32, 128 in fp64 (255 registers hold 32 floats
// of state but not 32 doubles without spilling).
template <typename A>
constexpr int kPerOf = kMaxHeadDimCuda / kGroups;
template <>
constexpr int kPerOf<double> = kMaxHeadDimCudaFp64 / kGroups;

enum class Mode { kFwd, kDq, kDk, kDv };

struct Operand {
  const void* ptr;
  RowStrides s;
};

struct RecArgs {
  SlaShape s;
  double eps;
  Operand q, k, v, o, go;
  const void* den;     // [B, H, N] accumulation type (backward input)
  void* gden;          // [B, H, N] accumulation type (backward workspace)
  const bool* mask;    // [B, N] or null
  void* out;           // [B, H, N, cols] contiguous
  int64_t cols, held;  // the tiled and the held dimension
  void* den_out;       // forward only
  void* state;
  void* z;
};

template <typename T>
__device__ __forceinline__ acc_t<T> load(const Operand& x, int64_t b, int64_t h, int64_t n, int64_t c) {
  return to_acc(static_cast<const T*>(x.ptr)[b * x.s.b + h * x.s.h + n * x.s.n + c]);
}

// Stages `count` tokens starting at step g0 (token n = g0 + i, or N - 1 - (g0 + i) in reverse).
template <typename T, Mode M>
struct Stage {
  using A = acc_t<T>;
  static constexpr int TG = TokensPerStage<A>::value;
  A a[TG][kTile], gate[TG][kTile], b[TG][kMaxHeadDimCuda], e[TG][kMaxHeadDimCuda], beta[TG], gamma[TG];

  __device__ void load_tokens(const RecArgs& p, int64_t bb, int64_t hh, int64_t t0, int64_t g0, int count) {
    constexpr bool kReverse = M == Mode::kDk || M == Mode::kDv;
    const int tid = threadIdx.y * kTile + threadIdx.x;
    const int64_t N = p.s.len, bh = bb * p.s.heads + hh;
    const A* den = static_cast<const A*>(p.den);
    const A* gden = static_cast<const A*>(p.gden);
    auto token = [&](int i) { return kReverse ? N - 1 - (g0 + i) : g0 + i; };
    auto kept = [&](int64_t n) { return p.mask == nullptr || p.mask[bb * N + n]; };
    for (int idx = tid; idx < TG * kTile; idx += kThreads) {
      const int i = idx / kTile, t = idx % kTile;
      const int64_t c = t0 + t;
      A av = 0, gv = 1;
      if (i < count && c < p.cols) {
        const int64_t n = token(i);
        if constexpr (M == Mode::kFwd) {
          av = kept(n) ? load<T>(p.v, bb, hh, n, c) : A(0);  // padding never read
        } else if constexpr (M == Mode::kDq) {
          av = key_feature(load<T>(p.k, bb, hh, n, c), kept(n));
          gv = phi_grad_from_phi(phi(load<T>(p.q, bb, hh, n, c)));
        } else if constexpr (M == Mode::kDk) {
          av = phi(load<T>(p.q, bb, hh, n, c));
          gv = phi_grad_from_phi(key_feature(load<T>(p.k, bb, hh, n, c), kept(n)));
        } else {
          av = load<T>(p.go, bb, hh, n, c) / den[bh * N + n];
        }
      }
      a[i][t] = av;
      gate[i][t] = gv;
    }
    for (int idx = tid; idx < TG * kMaxHeadDimCuda; idx += kThreads) {
      const int i = idx / kMaxHeadDimCuda, c = idx % kMaxHeadDimCuda;
      A bv = 0, ev = 0;
      if (i < count && c < p.held) {
        const int64_t n = token(i);
        if constexpr (M == Mode::kFwd) {
          bv = key_feature(load<T>(p.k, bb, hh, n, c), kept(n));
          ev = phi(load<T>(p.q, bb, hh, n, c));
        } else if constexpr (M == Mode::kDq) {
          bv = kept(n) ? load<T>(p.v, bb, hh, n, c) : A(0);
          ev = load<T>(p.go, bb, hh, n, c) / den[bh * N + n];
        } else if constexpr (M == Mode::kDk) {
          bv = load<T>(p.go, bb, hh, n, c) / den[bh * N + n];
          ev = kept(n) ? load<T>(p.v, bb, hh, n, c) : A(0);
        } else {
          bv = phi(load<T>(p.q, bb, hh, n, c));
          ev = key_feature(load<T>(p.k, bb, hh, n, c), kept(n));
        }
      }
      b[i][c] = bv;
      e[i][c] = ev;
    }
    if (tid < TG) {
      A be = 0, ga = 0;
      if (tid < count) {
        const int64_t n = token(tid);
        if constexpr (M == Mode::kDq) be = A(1), ga = gden[bh * N + n];
        if constexpr (M == Mode::kDk) be = gden[bh * N + n], ga = A(1);
      }
      beta[tid] = be;
      gamma[tid] = ga;
    }
  }
};

template <typename T, Mode M, bool kCausal>
__global__ void __launch_bounds__(kThreads, 1) recurrence_kernel(RecArgs p) {
  using A = acc_t<T>;
  using S = Stage<T, M>;
  constexpr int TG = S::TG, kPer = kPerOf<A>;
  static_assert(TG <= kGroups, "one thread row finishes each staged token");
  constexpr bool kReverse = M == Mode::kDk || M == Mode::kDv;
  constexpr bool kY = M == Mode::kDq || M == Mode::kDk;  // the scalar column (z or dz) times gamma
  constexpr bool kZ = M == Mode::kFwd;                   // z over the held dimension (the denominator)
  __shared__ S st;
  __shared__ A part[TG][kGroups][kTile];
  __shared__ A y_at[TG][kTile];
  __shared__ A zs[kZ ? kMaxHeadDimCuda : 1];
  __shared__ A den_at[TG];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kTile + tx;
  const SlaBlock blk = sla_block(blockIdx.x, p.s.heads, ceil_div(p.cols, kTile));
  const int64_t bb = blk.b, hh = blk.h, t0 = blk.tile * kTile;
  const int64_t N = p.s.len, bh = bb * p.s.heads + hh;
  A X[kPer], y = 0;
#pragma unroll
  for (int i = 0; i < kPer; ++i) X[i] = 0;
  if constexpr (kZ) {
    for (int c = tid; c < kMaxHeadDimCuda; c += kThreads) zs[c] = 0;
  }

  auto accumulate = [&](int i) {
    const A at = st.a[i][tx];
#pragma unroll
    for (int j = 0; j < kPer; ++j) X[j] += at * st.b[i][ty + kGroups * j];  // b is zero past the held dim
    if constexpr (kY) y += at * st.beta[i];
  };
  auto read_out = [&](int i) {
    A s = 0;
#pragma unroll
    for (int j = 0; j < kPer; ++j) s += X[j] * st.e[i][ty + kGroups * j];
    part[i][ty][tx] = s;
    if (kY && ty == 0) y_at[i][tx] = y;
  };
  // Forward: warp i computes den of staged token i from z before the stage plus the stage's keys
  // up to i (all of them, non-causal: z is then complete).
  auto stage_den = [&](int count) {
    if constexpr (kZ) {
      const int i = ty;
      if (i >= count) return;
      A s = 0;
      for (int c = tx; c < p.held; c += kTile) {
        A zc = zs[c];
        if constexpr (kCausal) {
          for (int j = 0; j <= i; ++j) zc += st.b[j][c];
        }
        s += st.e[i][c] * zc;
      }
      s = warp_sum(s);
      if (tx == 0) den_at[i] = denominator(s, static_cast<A>(p.eps));
    }
  };
  auto add_stage_to_z = [&](int count) {
    if constexpr (kZ) {
      for (int c = tid; c < p.held; c += kThreads) {
        A zc = zs[c];
        for (int j = 0; j < count; ++j) zc += st.b[j][c];
        zs[c] = zc;
      }
    }
  };
  // Thread row i < count finishes token i of the stage: the sum over thread rows, then the write.
  auto finish = [&](int64_t g0, int count) {
    const int i = ty;
    if (i >= count) return;
    const int64_t n = kReverse ? N - 1 - (g0 + i) : g0 + i, c = t0 + tx;
    A s = 0;
    for (int g = 0; g < kGroups; ++g) s += part[i][g][tx];
    if constexpr (kZ) {
      s /= den_at[i];
      if (t0 == 0 && tx == 0) static_cast<A*>(p.den_out)[bh * N + n] = den_at[i];
    }
    if constexpr (kY) s = (s + y_at[i][tx] * st.gamma[i]) * st.gate[i][tx];
    if (c < p.cols) static_cast<T*>(p.out)[(bh * N + n) * p.cols + c] = from_acc<T>(s);
  };

  if constexpr (!kCausal) {  // every token enters the state before any output
    for (int64_t g0 = 0; g0 < N; g0 += TG) {
      const int count = N - g0 < TG ? static_cast<int>(N - g0) : TG;
      st.load_tokens(p, bb, hh, t0, g0, count);
      __syncthreads();
#pragma unroll 1
      for (int i = 0; i < count; ++i) accumulate(i);
      add_stage_to_z(count);
      __syncthreads();
    }
  }
  for (int64_t g0 = 0; g0 < N; g0 += TG) {
    const int count = N - g0 < TG ? static_cast<int>(N - g0) : TG;
    st.load_tokens(p, bb, hh, t0, g0, count);
    __syncthreads();
    stage_den(count);
#pragma unroll 1
    for (int i = 0; i < count; ++i) {
      if constexpr (kCausal) accumulate(i);
      read_out(i);
    }
    __syncthreads();
    finish(g0, count);
    if constexpr (kCausal) add_stage_to_z(count);
    __syncthreads();
  }

  if constexpr (M == Mode::kFwd) {  // the final state: S[h][t] = X[t][h], z[h]
    const int64_t c = t0 + tx, D = p.s.dim, Dv = p.s.vdim;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int64_t d = ty + kGroups * j;
      if (d < D && c < Dv) static_cast<A*>(p.state)[(bh * D + d) * Dv + c] = X[j];
    }
    if (t0 == 0) {  // the first column tile
      for (int d = tid; d < D; d += kThreads) static_cast<A*>(p.z)[bh * D + d] = zs[d];
    }
  }
}

// gden[row] = -(grad_o . o) / den: one warp per (b, h, n) row, W-element packs per lane (16 bytes
// when both operands' rows are aligned, see rows_aligned below).
template <typename T, int W>
__global__ void __launch_bounds__(256) gden_kernel(RecArgs p) {
  using A = acc_t<T>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / 32;
  const int64_t rows = p.s.batch * p.s.heads * p.s.len;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t n = row % p.s.len, bh = row / p.s.len, h = bh % p.s.heads, b = bh / p.s.heads;
  const T* go = static_cast<const T*>(p.go.ptr) + b * p.go.s.b + h * p.go.s.h + n * p.go.s.n;
  const T* o = static_cast<const T*>(p.o.ptr) + b * p.o.s.b + h * p.o.s.h + n * p.o.s.n;
  A s = 0;
  for (int64_t c = lane * W; c < p.s.vdim; c += 32 * W) {
    A g[W], x[W];
    load_acc<W, Cache::kStream>(go + c, g);
    load_acc<W, Cache::kStream>(o + c, x);
#pragma unroll
    for (int i = 0; i < W; ++i) s += g[i] * x[i];
  }
  s = warp_sum(s);
  if (lane == 0) static_cast<A*>(p.gden)[row] = grad_den(s, A(1) / static_cast<const A*>(p.den)[row]);
}

// Every row of the operand starts 16-byte aligned: aligned base, and row strides and the row length
// whole packs.
template <typename T>
bool rows_aligned(const Operand& x, int64_t row_len) {
  const int bytes = static_cast<int>(sizeof(T));
  return all_vec_aligned(x.ptr) && rows_vec_aligned(x.s.b, bytes) && rows_vec_aligned(x.s.h, bytes) &&
         rows_vec_aligned(x.s.n, bytes) && row_len % kPackWidth<T> == 0;
}

// One decode token per (b, h) block (layout: step_layout in sla.h): phi(q), phi(k) and the
// denominator first (z + phi(k) read before z is written), then one pass over the state in W-column
// packs, S[d] += phi(k_d) v and the output column sums of the updated rows; z is updated last.
template <typename T, int W>
__global__ void __launch_bounds__(kStepThreads) step_kernel(SlaStepParams p, StepLayout lay) {
  using A = acc_t<T>;
  __shared__ A fq[kMaxHeadDimCuda], fk[kMaxHeadDimCuda], scratch[kStepThreads / 32];
  __shared__ A part[kStepThreads * W];
  const int tid = threadIdx.x, j = tid % lay.tile, group = tid / lay.tile;
  const SlaBlock blk = sla_block(blockIdx.x, p.heads, 1);
  const int64_t bh = blk.b * p.heads + blk.h, D = p.dim, Dv = p.vdim;
  const T* q = static_cast<const T*>(p.q) + blk.b * p.q_stride.b + blk.h * p.q_stride.h;
  const T* k = static_cast<const T*>(p.k) + blk.b * p.k_stride.b + blk.h * p.k_stride.h;
  const T* v = static_cast<const T*>(p.v) + blk.b * p.v_stride.b + blk.h * p.v_stride.h;
  A* state = static_cast<A*>(p.state) + bh * D * Dv;
  A* z = static_cast<A*>(p.z) + bh * D;
  A qz = 0;
  for (int64_t d = tid; d < D; d += kStepThreads) {
    const A fqd = phi(to_acc(q[d])), fkd = phi(to_acc(k[d]));
    fq[d] = fqd, fk[d] = fkd;
    qz += fqd * (z[d] + fkd);
  }
  const A inv_den = A(1) / denominator(block_sum(qz, scratch), static_cast<A>(p.eps));  // syncs: fq, fk ready
  for (int64_t tile0 = 0; tile0 < lay.packs; tile0 += lay.tile) {
    const int64_t c = (tile0 + j) * W;
    A s[W] = {};
    if (c < Dv) {
      A vc[W];
#pragma unroll
      for (int i = 0; i < W; ++i) vc[i] = to_acc(v[c + i]);
      step_rows<W>(state + c, Dv, static_cast<int>(D), group, lay.groups, fk, fq, vc, s);
    }
#pragma unroll
    for (int i = 0; i < W; ++i) part[tid * W + i] = s[i];
    __syncthreads();
    if (group == 0 && c < Dv) {
#pragma unroll
      for (int i = 0; i < W; ++i)
        static_cast<T*>(p.o)[bh * Dv + c + i] =
            from_acc<T>(step_column_sum<W>(part, lay.tile, lay.groups, j, i) * inv_den);
    }
    __syncthreads();
  }
  for (int64_t d = tid; d < D; d += kStepThreads) z[d] += fk[d];
}

Operand operand(const void* ptr, const RowStrides& s) { return {ptr, s}; }

template <typename T, Mode M>
void run(const RecArgs& a, bool causal, CUstream_st* stream) {
  const auto grid = static_cast<unsigned>(a.s.batch * a.s.heads * ceil_div(a.cols, kTile));  // sla_block
  const dim3 block(kTile, kGroups);
  SLAB_BOOL_SWITCH(causal, kCausal, [&] { recurrence_kernel<T, M, kCausal><<<grid, block, 0, stream>>>(a); });
}

}  // namespace

void sla_forward_cuda(const SlaFwdParams& p, CUstream_st* stream) {
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] {
    RecArgs a{p.s,
              p.eps,
              operand(p.q, p.q_stride),
              operand(p.k, p.k_stride),
              operand(p.v, p.v_stride),
              {},
              {},
              nullptr,
              nullptr,
              p.mask,
              p.o,
              p.s.vdim,
              p.s.dim,
              p.den,
              p.state,
              p.z};
    run<T, Mode::kFwd>(a, p.causal, stream);
  });
}

void sla_backward_cuda(const SlaBwdParams& p, CUstream_st* stream) {
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] {
    RecArgs a{p.s,
              0.0,
              operand(p.q, p.q_stride),
              operand(p.k, p.k_stride),
              operand(p.v, p.v_stride),
              operand(p.o, p.o_stride),
              operand(p.grad_o, p.grad_o_stride),
              p.den,
              p.workspace,
              p.mask,
              nullptr,
              0,
              0,
              nullptr,
              nullptr,
              nullptr};
    const int64_t rows = p.s.batch * p.s.heads * p.s.len;
    const auto gden_blocks = static_cast<unsigned>(ceil_div(rows, 8));
    SLAB_BOOL_SWITCH(rows_aligned<T>(a.go, p.s.vdim) && rows_aligned<T>(a.o, p.s.vdim), kPacked,
                     [&] { gden_kernel<T, kPacked ? kPackWidth<T> : 1><<<gden_blocks, 256, 0, stream>>>(a); });
    a.out = p.dq, a.cols = p.s.dim, a.held = p.s.vdim;
    run<T, Mode::kDq>(a, p.causal, stream);
    a.out = p.dk;
    run<T, Mode::kDk>(a, p.causal, stream);
    a.out = p.dv, a.cols = p.s.vdim, a.held = p.s.dim;
    run<T, Mode::kDv>(a, p.causal, stream);
  });
}

void sla_step_cuda(const SlaStepParams& p, CUstream_st* stream) {
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] {
    using A = acc_t<T>;
    const auto blocks = static_cast<unsigned>(p.batch * p.heads);
    const StepLayout lay = step_layout(p.vdim, kPackWidth<A>, all_vec_aligned(static_cast<const A*>(p.state)));
    SLAB_BOOL_SWITCH(lay.width == kPackWidth<A>, kPacked,
                     [&] { step_kernel<T, kPacked ? kPackWidth<A> : 1><<<blocks, kStepThreads, 0, stream>>>(p, lay); });
  });
}

}  // namespace slab::sla
