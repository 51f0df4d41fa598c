// SLA CUDA kernels: a chunked tensor-core path for bf16/fp16 forwards and bf16 backwards, and the
// first, exact per-token recurrence (fp32 accumulation, no tensor cores) for everything else.
//
// Tensor-core forward (bf16/fp16, D and Dv multiples of 16 up to 128, 16-byte aligned rows; the
// index maps and the schedule in sla/sla_chunk.h, emulated by tests/host/sla_chunk_schedule.cpp):
//   chunk_state_kernel   block per (b, h, 64-token chunk), 4 warps: K, V chunk via cp.async into
//                        padded shared tiles (masked / tail rows zero-filled by the copy itself),
//                        KV_c = phi(K)^T V by mma.sync m16n8k16 (ldmatrix.trans for both operands),
//                        kz_c = sum phi(K) by scalar column sums; fp32 into the chunk's workspace slot.
//   scan_kernel          thread per (b, h, state element): the chunk slots in order, into exclusive
//                        prefixes (causal) and the final state (S, z); deterministic.
//   chunk_output_kernel  block per (b, h, chunk), warp w owns query rows 16 w..16 w + 15: P = phi(Q)
//                        phi(K)^T (tiles after the diagonal skipped, the diagonal masked), its row sums
//                        and, reused as A fragments, P V; plus phi(Q) S_prev (S_prev rounded to the
//                        input type in shared memory) and phi(Q) . z_prev in fp32; o = num / den.
//                        Two cp.async groups (Q, K first, V second) overlap V's load with P.
//                        Non-causal: the output pass without the intra-chunk term, S the final state.
// Tensor-core backward (bf16, same rules; chunked_backward): gden_kernel, the forward's state pass
// and scan again (S_prev), chunk_state_kernel<kGrad> (dS_c = phi(Q)^T G, dz_c = phi(Q)^T gden with
// G = grad_o / den in bf16) and a reverse scan (dS_next), then per chunk chunk_dq_kernel (warp rows
// = queries) and chunk_dkdv_kernel (warp rows = keys), built from intra_product (a masked 16 x 64
// product reused as A fragments), intra_apply and state_apply. It runs where the device's shared
// memory holds the dk / dv kernel's tiles (bwd_smem_fits), else the exact backward.
// mma.sync m16n8k16 on every architecture (sm_80 / sm_89 / sm_90a); no wgmma path. SLAB_SLA_EXACT=1
// in the environment (read per call) selects the exact kernels, as an on-device oracle.
//
// Exact kernel: every pass is one "recurrence" over the tokens of a (batch, head) slice. A block owns 32
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
#include <cstdlib>
#include <type_traits>

#include "core/cuda_types.cuh"
#include "core/vec_cuda.cuh"
#include "sla/sla.h"
#include "sla/sla_chunk.h"
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

// ---- tensor-core chunked forward (bf16 / fp16) ---------------------------------------------------

namespace ck = chunk;

struct ChunkArgs {
  SlaShape s;
  float eps;
  Operand q, k, v;
  const bool* mask;  // [B, N] or null
  void* o;
  float* den;
  float* ws;     // [B, H, chunks] slots of chunk::slot_elems
  float* state;  // [B, H, D, Dv]
  float* z;      // [B, H, D]
  // backward only (den above is then the forward's, read):
  Operand go;         // grad_o
  const float* gden;  // [B, H, N]
};

template <typename T>
struct MmaType;
template <>
struct MmaType<__nv_bfloat16> {
  static constexpr uint32_t kInfBits = 0x7f80u;
};
template <>
struct MmaType<__half> {
  static constexpr uint32_t kInfBits = 0x7c00u;
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; `valid` false fills the 16 bytes with zeros (nothing read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ldmatrix.x4 of operand `kind` (chunk::Ldsm) at fragment origin (r0, c0) of a tile with row stride ld.
template <ck::Ldsm kKind, typename T>
__device__ __forceinline__ void ldsm(uint32_t (&r)[4], const T* tile, int ld, int r0, int c0) {
  const ck::Pos at = ck::ldsm_row(kKind, threadIdx.x % 32, r0, c0);
  const uint32_t addr = smem_addr(tile + at.row * ld + at.col);
  if constexpr (ck::ldsm_trans(kKind)) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  }
}

template <typename T>
__device__ __forceinline__ void phi_regs(uint32_t (&r)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) r[i] = ck::phi_pair(r[i], MmaType<T>::kInfBits);
}

// d += a b, m16n8k16, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two values as one register of T pairs (low half first), and back.
__device__ __forceinline__ uint32_t bits16(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
__device__ __forceinline__ uint32_t bits16(__half x) { return __half_as_ushort(x); }
template <typename T>
__device__ __forceinline__ T from_bits16(uint32_t w) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __ushort_as_bfloat16(static_cast<unsigned short>(w));
  else
    return __ushort_as_half(static_cast<unsigned short>(w));
}
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return bits16(from_acc<T>(lo)) | (bits16(from_acc<T>(hi)) << 16);
}
template <typename T>
__device__ __forceinline__ float unpack(uint32_t w, int half) {
  return to_acc(from_bits16<T>((w >> (16 * half)) & 0xffffu));
}

// Rows n0 .. n0 + 63 of a (b, h) slice, `cols` wide, into a shared tile of row stride ld, 16 bytes
// per copy; rows past N, and with `keys` the rows of masked-out tokens, are zero-filled.
template <typename T>
__device__ __forceinline__ void load_chunk(T* tile, int ld, const Operand& x, const ChunkArgs& p, int64_t b, int64_t h,
                                           int64_t n0, int cols, bool keys) {
  const int packs = cols / 8;
  const T* base = static_cast<const T*>(x.ptr) + b * x.s.b + h * x.s.h;
  for (int i = threadIdx.x; i < ck::kChunk * packs; i += ck::kThreads) {
    const int r = i / packs, c = (i % packs) * 8;
    const int64_t n = n0 + r;
    const bool valid = n < p.s.len && (!keys || p.mask == nullptr || p.mask[b * p.s.len + n]);
    cp_async16(tile + r * ld + c, valid ? base + n * x.s.n + c : base, valid);
  }
}

struct ChunkBlock {
  int64_t b, h, bh, c, n0;
};
__device__ __forceinline__ ChunkBlock chunk_block(const ChunkArgs& p) {
  const int64_t chunks = ck::num_chunks(p.s.len), bh = blockIdx.x / chunks, c = blockIdx.x % chunks;
  return {bh / p.s.heads, bh % p.s.heads, bh, c, c * ck::kChunk};
}

// Rows n0 .. n0 + 63 of grad_o scaled to g = grad_o / den and rounded to T (16-byte loads), rows past N
// zero; with `gd`, also gden of the rows (0 past N).
template <typename T>
__device__ __forceinline__ void load_g_chunk(T* tile, int ld, const ChunkArgs& p, const ChunkBlock& blk, int cols,
                                             float* gd) {
  const int packs = cols / 8;
  const T* base = static_cast<const T*>(p.go.ptr) + blk.b * p.go.s.b + blk.h * p.go.s.h;
  const int64_t row0 = blk.bh * p.s.len + blk.n0;
  for (int i = threadIdx.x; i < ck::kChunk * packs; i += ck::kThreads) {
    const int r = i / packs, c = (i % packs) * 8;
    Pack<T, 8> g;
    if (blk.n0 + r < p.s.len) {
      g = load_pack<8>(base + (blk.n0 + r) * p.go.s.n + c);
      const float inv_den = 1.0f / p.den[row0 + r];
#pragma unroll
      for (int j = 0; j < 8; ++j) g.v[j] = from_acc<T>(to_acc(g.v[j]) * inv_den);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) g.v[j] = from_acc<T>(0.0f);
    }
    write_pack<8>(tile + r * ld + c, g);
  }
  if (gd != nullptr) {
    for (int r = threadIdx.x; r < ck::kChunk; r += ck::kThreads) gd[r] = blk.n0 + r < p.s.len ? p.gden[row0 + r] : 0.0f;
  }
}

// One chunk's state into its workspace slot: forward (kGrad false) KV_c = phi(K_c)^T V_c and
// kz_c = sum phi(K_c); backward (kGrad) dS_c = phi(Q_c)^T G_c and dz_c = phi(Q_c)^T gden_c.
template <typename T, bool kGrad>
__global__ void __launch_bounds__(ck::kThreads) chunk_state_kernel(ChunkArgs p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float gd[kGrad ? ck::kChunk : 1];
  const int D = static_cast<int>(p.s.dim), Dv = static_cast<int>(p.s.vdim);
  const int ldk = ck::smem_ld(D), ldv = ck::smem_ld(Dv);
  T* ks = reinterpret_cast<T*>(smem_raw);  // phi's argument: K (forward) or Q (backward)
  T* vs = ks + ck::kChunk * ldk;           // V or G
  const ChunkBlock blk = chunk_block(p);
  load_chunk(ks, ldk, kGrad ? p.q : p.k, p, blk.b, blk.h, blk.n0, D, !kGrad);
  if constexpr (kGrad)
    load_g_chunk(vs, ldv, p, blk, Dv, gd);
  else
    load_chunk(vs, ldv, p.v, p, blk.b, blk.h, blk.n0, Dv, true);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  float* slot = p.ws + (blk.bh * ck::num_chunks(p.s.len) + blk.c) * ck::slot_elems(D, Dv);
  const int rows = static_cast<int>(std::min<int64_t>(ck::kChunk, p.s.len - blk.n0));
  for (int d = threadIdx.x; d < D; d += ck::kThreads) {
    float s = 0;
    for (int r = 0; r < rows; ++r) s += phi(to_acc(ks[r * ldk + d])) * (kGrad ? gd[r] : 1.0f);
    slot[D * Dv + d] = s;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int u = warp; u < ck::state_units(D, Dv); u += ck::kWarps) {
    const ck::StateUnit unit = ck::state_unit(u, Dv);
    float acc[8][4] = {};
#pragma unroll 1
    for (int kt = 0; kt * 16 < rows; ++kt) {
      uint32_t a[4];
      ldsm<ck::Ldsm::kAT>(a, ks, ldk, 16 * kt, unit.row0);
      phi_regs<T>(a);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        if (unit.col0 + 16 * np >= Dv) break;
        uint32_t bv[4];
        ldsm<ck::Ldsm::kBT>(bv, vs, ldv, 16 * kt, unit.col0 + 16 * np);
        mma<T>(acc[2 * np], a, bv[0], bv[1]);
        mma<T>(acc[2 * np + 1], a, bv[2], bv[3]);
      }
    }
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      const int col0 = unit.col0 + 8 * nt;
      if (col0 >= Dv) break;
#pragma unroll
      for (int e = 0; e < 4; e += 2) {
        const ck::Pos at = ck::mma_c_pos(lane, e);
        *reinterpret_cast<float2*>(slot + (unit.row0 + at.row) * Dv + col0 + at.col) = {acc[nt][e], acc[nt][e + 1]};
      }
    }
  }
}

// Every state element of one (b, h) over the chunk slots (in reverse for the backward's dS): exclusive
// prefixes in place (`prefix`, causal) and the total into p.state / p.z.
__global__ void __launch_bounds__(256) scan_kernel(ChunkArgs p, bool prefix, bool reverse) {
  const int64_t D = p.s.dim, Dv = p.s.vdim, E = ck::slot_elems(D, Dv), chunks = ck::num_chunks(p.s.len);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.s.batch * p.s.heads * E) return;
  const int64_t bh = i / E, e = i % E;
  float* first = p.ws + (bh * chunks + (reverse ? chunks - 1 : 0)) * E + e;
  const float total = ck::scan_slots(first, chunks, reverse ? -E : E, prefix);
  if (e < D * Dv)
    p.state[bh * D * Dv + e] = total;
  else
    p.z[bh * D + e - D * Dv] = total;
}

// Shared bytes of the output pass: Q (and with the intra term K, V) chunk tiles, S_prev in T, z_prev.
inline size_t output_smem_bytes(int D, int Dv, bool intra, int elem_bytes) {
  const int64_t tiles = ck::kChunk * ck::smem_ld(D) * (intra ? 2 : 1) + (intra ? ck::kChunk * ck::smem_ld(Dv) : 0);
  return static_cast<size_t>((tiles + int64_t(D) * ck::smem_ld(Dv)) * elem_bytes + D * 4);
}

// A state (D x Dv, fp32) into a shared tile in T (row stride ldv) and its vector (D) into fp32.
template <typename T>
__device__ __forceinline__ void fill_state(T* ss, int ldv, float* zs, const float* s_src, const float* z_src, int D,
                                           int Dv, float inv_scale) {
  for (int i = threadIdx.x; i < D * Dv / 4; i += ck::kThreads) {
    const float4 x = reinterpret_cast<const float4*>(s_src)[i];
    const int d = 4 * i / Dv, c = 4 * i % Dv;
    *reinterpret_cast<uint2*>(ss + d * ldv + c) = {pack2<T>(x.x * inv_scale, x.y * inv_scale),
                                                   pack2<T>(x.z * inv_scale, x.w * inv_scale)};
  }
  for (int d = threadIdx.x; d < D; d += ck::kThreads) zs[d] = z_src[d];
}

// The fp16 state scale: a block-wide max of |S_prev| (one extra read of the slot, from L2).
template <typename T>
__device__ __forceinline__ float state_scale_of(const float* s_src, int count) {
  if constexpr (!std::is_same_v<T, __half>) {
    return 1.0f;  // bf16 has fp32's range
  } else {
    __shared__ float part[ck::kWarps];
    float m = 0;
    for (int i = threadIdx.x; i < count; i += ck::kThreads) m = fmaxf(m, fabsf(s_src[i]));
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = m;
    __syncthreads();
#pragma unroll
    for (int w = 0; w < ck::kWarps; ++w) m = fmaxf(m, part[w]);
    return ck::state_scale(m);
  }
}

// The sum over the quad of lanes 4 g .. 4 g + 3, which share the rows g and g + 8 of a fragment.
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// o, den of one chunk: warp w's 16 query rows against the chunk's keys (kIntra, causal) and S_prev.
// Order (so no 16-bit operand leaves its range): P = phi(Q) phi(K)^T masked, with phi(Q) . z_prev;
// den; A = P / den in T; acc = A V; acc *= den / scale; acc += phi(Q) (S_prev / scale) in T;
// o = acc * scale / den (scale a power of two, 1 for bf16).
template <typename T, int kDvTile, bool kIntra>
__global__ void __launch_bounds__(ck::kThreads) chunk_output_kernel(ChunkArgs p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int D = static_cast<int>(p.s.dim), Dv = static_cast<int>(p.s.vdim);
  const int ldq = ck::smem_ld(D), ldv = ck::smem_ld(Dv);
  T* qs = reinterpret_cast<T*>(smem_raw);
  T* ks = qs + ck::kChunk * ldq;
  T* vs = ks + (kIntra ? ck::kChunk * ldq : 0);
  T* ss = vs + (kIntra ? ck::kChunk * ldv : 0);
  float* zs = reinterpret_cast<float*>(ss + D * ldv);
  const ChunkBlock blk = chunk_block(p);
  load_chunk(qs, ldq, p.q, p, blk.b, blk.h, blk.n0, D, false);
  if constexpr (kIntra) load_chunk(ks, ldq, p.k, p, blk.b, blk.h, blk.n0, D, true);
  cp_async_commit();
  if constexpr (kIntra) load_chunk(vs, ldv, p.v, p, blk.b, blk.h, blk.n0, Dv, true);
  cp_async_commit();
  // S_prev, z_prev (fp32): the chunk's prefix slot (causal) or the final state (non-causal).
  const float* s_src =
      kIntra ? p.ws + (blk.bh * ck::num_chunks(p.s.len) + blk.c) * ck::slot_elems(D, Dv) : p.state + blk.bh * D * Dv;
  const float* z_src = kIntra ? s_src + D * Dv : p.z + blk.bh * D;
  const float scale = state_scale_of<T>(s_src, D * Dv), inv_scale = 1.0f / scale;
  fill_state(ss, ldv, zs, s_src, z_src, D, Dv, inv_scale);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, m0 = 16 * warp;
  float qz[2] = {0, 0}, den[2];
  auto add_qz = [&](const uint32_t (&a)[4], int kt) {  // phi(q) . z_prev over the lane's columns
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const ck::Pos at = ck::mma_a_pos(lane, e);
      qz[at.row >> 3] += unpack<T>(a[e >> 1], e & 1) * zs[16 * kt + at.col];
    }
  };
  cp_async_wait<1>();
  __syncthreads();
  [[maybe_unused]] uint32_t pa[4][4];
  if constexpr (kIntra) {
    float pc[8][4] = {};
#pragma unroll 1
    for (int kt = 0; kt < D / 16; ++kt) {
      uint32_t a[4];
      ldsm<ck::Ldsm::kA>(a, qs, ldq, m0, 16 * kt);
      phi_regs<T>(a);
      add_qz(a, kt);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        if (!ck::key_tile_needed(true, warp, np)) break;
        uint32_t bk[4];
        ldsm<ck::Ldsm::kB>(bk, ks, ldq, 16 * np, 16 * kt);
        phi_regs<T>(bk);
        mma<T>(pc[2 * np], a, bk[0], bk[1]);
        mma<T>(pc[2 * np + 1], a, bk[2], bk[3]);
      }
    }
    float rs[2] = {0, 0};
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const ck::Pos at = ck::mma_c_pos(lane, e);
        if (!ck::keep_causal(m0 + at.row, 8 * nt + at.col)) pc[nt][e] = 0;
        rs[e >> 1] += pc[nt][e];
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) den[r] = denominator(quad_sum(rs[r] + qz[r]), p.eps);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const ck::CFrag f = ck::cfrag_of_a(2 * r);
        const float inv = 1.0f / den[f.e >> 1];
        pa[kk][r] = pack2<T>(pc[2 * kk + f.tile][f.e] * inv, pc[2 * kk + f.tile][f.e + 1] * inv);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();
  float acc[kDvTile / 8][4] = {};
  if constexpr (kIntra) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      if (!ck::key_tile_needed(true, warp, kk)) break;
#pragma unroll
      for (int np = 0; np < kDvTile / 16; ++np) {
        if (16 * np >= Dv) break;
        uint32_t bv[4];
        ldsm<ck::Ldsm::kBT>(bv, vs, ldv, 16 * kk, 16 * np);
        mma<T>(acc[2 * np], pa[kk], bv[0], bv[1]);
        mma<T>(acc[2 * np + 1], pa[kk], bv[2], bv[3]);
      }
    }
#pragma unroll
    for (int nt = 0; nt < kDvTile / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[nt][e] *= den[e >> 1] * inv_scale;
    }
  }
#pragma unroll 1
  for (int kt = 0; kt < D / 16; ++kt) {
    uint32_t a[4];
    ldsm<ck::Ldsm::kA>(a, qs, ldq, m0, 16 * kt);
    phi_regs<T>(a);
    if constexpr (!kIntra) add_qz(a, kt);
#pragma unroll
    for (int np = 0; np < kDvTile / 16; ++np) {
      if (16 * np >= Dv) break;
      uint32_t bs[4];
      ldsm<ck::Ldsm::kBT>(bs, ss, ldv, 16 * kt, 16 * np);
      mma<T>(acc[2 * np], a, bs[0], bs[1]);
      mma<T>(acc[2 * np + 1], a, bs[2], bs[3]);
    }
  }
  if constexpr (!kIntra) {
#pragma unroll
    for (int r = 0; r < 2; ++r) den[r] = denominator(quad_sum(qz[r]), p.eps);
  }
  const int64_t rows = p.s.len - blk.n0;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const ck::Pos at = ck::mma_c_pos(lane, 2 * r);
    if (m0 + at.row >= rows) continue;
    const int64_t n = blk.bh * p.s.len + blk.n0 + m0 + at.row;
    if (lane % 4 == 0) p.den[n] = den[r];
    const float f = scale / den[r];
    T* orow = static_cast<T*>(p.o) + n * Dv;
#pragma unroll
    for (int nt = 0; nt < kDvTile / 8; ++nt) {
      if (8 * nt >= Dv) break;
      *reinterpret_cast<uint32_t*>(orow + 8 * nt + at.col) = pack2<T>(acc[nt][2 * r] * f, acc[nt][2 * r + 1] * f);
    }
  }
}

template <typename T, int kDvTile, bool kIntra>
void launch_output(const ChunkArgs& a, unsigned blocks, CUstream_st* stream) {
  const size_t bytes = output_smem_bytes(static_cast<int>(a.s.dim), static_cast<int>(a.s.vdim), kIntra, sizeof(T));
  auto kernel = chunk_output_kernel<T, kDvTile, kIntra>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  kernel<<<blocks, ck::kThreads, bytes, stream>>>(a);
}

// Binds kDvTile to the smallest of 32, 64, 128 that holds Dv.
template <typename T, bool kIntra>
void launch_output_dv(const ChunkArgs& a, unsigned blocks, CUstream_st* stream) {
  if (a.s.vdim <= 32)
    launch_output<T, 32, kIntra>(a, blocks, stream);
  else if (a.s.vdim <= 64)
    launch_output<T, 64, kIntra>(a, blocks, stream);
  else
    launch_output<T, 128, kIntra>(a, blocks, stream);
}

template <typename T>
void chunked_forward(const SlaFwdParams& p, CUstream_st* stream) {
  const ChunkArgs a{p.s,
                    static_cast<float>(p.eps),
                    operand(p.q, p.q_stride),
                    operand(p.k, p.k_stride),
                    operand(p.v, p.v_stride),
                    p.mask,
                    p.o,
                    static_cast<float*>(p.den),
                    static_cast<float*>(p.workspace),
                    static_cast<float*>(p.state),
                    static_cast<float*>(p.z),
                    {},
                    nullptr};
  const auto blocks = static_cast<unsigned>(p.s.batch * p.s.heads * ck::num_chunks(p.s.len));
  const size_t state_bytes = size_t(ck::kChunk) * (ck::smem_ld(p.s.dim) + ck::smem_ld(p.s.vdim)) * sizeof(T);
  chunk_state_kernel<T, false><<<blocks, ck::kThreads, state_bytes, stream>>>(a);
  const int64_t elems = p.s.batch * p.s.heads * ck::slot_elems(p.s.dim, p.s.vdim);
  scan_kernel<<<static_cast<unsigned>(ceil_div(elems, 256)), 256, 0, stream>>>(a, p.causal, false);
  SLAB_BOOL_SWITCH(p.causal, kIntra, [&] { launch_output_dv<T, kIntra>(a, blocks, stream); });
}

// ---- tensor-core chunked backward (bf16) -----------------------------------------------------------

struct BwdChunkArgs {
  ChunkArgs c;            // c.ws: S slots (prefixes), c.state / c.z: S, z totals
  const float* ds_slots;  // dS slots (suffixes: the chunks after)
  const float* ds_total;  // [B, H, D, Dv]
  const float* dz_total;  // [B, H, D]
  void* dq;
  void* dk;
  void* dv;
};

// The state a chunk's backward reads: its slot (causal) or the total (non-causal).
struct StateSrc {
  const float *s, *z;
};
__device__ __forceinline__ StateSrc state_src(const float* slots, const float* s_tot, const float* z_tot,
                                              const ChunkArgs& p, const ChunkBlock& blk, bool causal) {
  const int64_t D = p.s.dim, Dv = p.s.vdim;
  if (!causal) return {s_tot + blk.bh * D * Dv, z_tot + blk.bh * D};
  const float* slot = slots + (blk.bh * ck::num_chunks(p.s.len) + blk.c) * ck::slot_elems(D, Dv);
  return {slot, slot + D * Dv};
}

// The 16 x 64 intra-chunk product of warp rows against the chunk's 64 columns as A fragments in T:
// C = A B^T over `kdim` (A rows m0.. of `as`, B rows of `bs`, both [row][k] tiles), masked to
// keep(row, col) (chunk-local), plus row_add[row] or col_add[col] where kept.
template <typename T, bool kPhi, bool kLowerRows>
__device__ __forceinline__ void intra_product(uint32_t (&out)[4][4], const T* as, const T* bs, int ld, int kdim, int m0,
                                              int warp, const float* row_add, const float* col_add) {
  const int lane = threadIdx.x % 32;
  float c[8][4] = {};
#pragma unroll 1
  for (int kt = 0; kt < kdim / 16; ++kt) {
    uint32_t a[4];
    ldsm<ck::Ldsm::kA>(a, as, ld, m0, 16 * kt);
    if constexpr (kPhi) phi_regs<T>(a);
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      if (kLowerRows ? !ck::key_tile_needed(true, warp, np) : !ck::query_tile_needed(true, warp, np)) continue;
      uint32_t b[4];
      ldsm<ck::Ldsm::kB>(b, bs, ld, 16 * np, 16 * kt);
      if constexpr (kPhi) phi_regs<T>(b);
      mma<T>(c[2 * np], a, b[0], b[1]);
      mma<T>(c[2 * np + 1], a, b[2], b[3]);
    }
  }
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const ck::Pos at = ck::mma_c_pos(lane, e);
      const int row = m0 + at.row, col = 8 * nt + at.col;
      const bool keep = kLowerRows ? ck::keep_causal(row, col) : ck::keep_causal(col, row);
      const float add = row_add != nullptr ? row_add[row] : (col_add != nullptr ? col_add[col] : 0.0f);
      c[nt][e] = keep ? c[nt][e] + add : 0.0f;
    }
  }
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const ck::CFrag f = ck::cfrag_of_a(2 * r);
      out[kk][r] = pack2<T>(c[2 * kk + f.tile][f.e], c[2 * kk + f.tile][f.e + 1]);
    }
  }
}

// acc (16 x cols) += A X: A the warp's 16 x 64 intra fragments (key / query tiles skipped as the mask
// allows), X rows of `xs` ([k][n] tile), phi applied to X with kPhi.
template <typename T, int kTile, bool kPhi, bool kLowerRows>
__device__ __forceinline__ void intra_apply(float (&acc)[kTile / 8][4], const uint32_t (&a)[4][4], const T* xs, int ld,
                                            int cols, int warp) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    if (kLowerRows ? !ck::key_tile_needed(true, warp, kk) : !ck::query_tile_needed(true, warp, kk)) continue;
#pragma unroll
    for (int np = 0; np < kTile / 16; ++np) {
      if (16 * np >= cols) break;
      uint32_t b[4];
      ldsm<ck::Ldsm::kBT>(b, xs, ld, 16 * kk, 16 * np);
      if constexpr (kPhi) phi_regs<T>(b);
      mma<T>(acc[2 * np], a[kk], b[0], b[1]);
      mma<T>(acc[2 * np + 1], a[kk], b[2], b[3]);
    }
  }
}

// acc (16 x cols) += A(rows m0.. of `as`, phi with kPhi) X over kdim, X from a state tile: kBT for a
// [k][n] tile, kB for [n][k].
template <typename T, int kTile, bool kPhi, ck::Ldsm kX>
__device__ __forceinline__ void state_apply(float (&acc)[kTile / 8][4], const T* as, int lda, const T* xs, int ldx,
                                            int kdim, int cols, int m0) {
#pragma unroll 1
  for (int kt = 0; kt < kdim / 16; ++kt) {
    uint32_t a[4];
    ldsm<ck::Ldsm::kA>(a, as, lda, m0, 16 * kt);
    if constexpr (kPhi) phi_regs<T>(a);
#pragma unroll
    for (int np = 0; np < kTile / 16; ++np) {
      if (16 * np >= cols) break;
      uint32_t b[4];
      if constexpr (kX == ck::Ldsm::kBT)
        ldsm<ck::Ldsm::kBT>(b, xs, ldx, 16 * kt, 16 * np);
      else
        ldsm<ck::Ldsm::kB>(b, xs, ldx, 16 * np, 16 * kt);
      mma<T>(acc[2 * np], a, b[0], b[1]);
      mma<T>(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// Writes the warp's rows of acc (+ add[col]) times gate(row, col) to out ([B, H, N, cols] contiguous).
template <typename T, int kTile, typename Gate>
__device__ __forceinline__ void store_rows(const float (&acc)[kTile / 8][4], T* out, const ChunkArgs& p,
                                           const ChunkBlock& blk, int m0, int cols, const float* add, Gate&& gate) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const ck::Pos at = ck::mma_c_pos(lane, 2 * r);
    const int row = m0 + at.row;
    if (blk.n0 + row >= p.s.len) continue;
    T* orow = out + (blk.bh * p.s.len + blk.n0 + row) * cols;
#pragma unroll
    for (int nt = 0; nt < kTile / 8; ++nt) {
      if (8 * nt >= cols) break;
      const int col = 8 * nt + at.col;
      const float v0 = (acc[nt][2 * r] + (add != nullptr ? add[col] : 0.0f)) * gate(row, col);
      const float v1 = (acc[nt][2 * r + 1] + (add != nullptr ? add[col + 1] : 0.0f)) * gate(row, col + 1);
      *reinterpret_cast<uint32_t*>(orow + col) = pack2<T>(v0, v1);
    }
  }
}

inline size_t dq_smem_bytes(int D, int Dv, bool intra) {
  const int64_t tiles = ck::kChunk * ((intra ? ck::smem_ld(D) + ck::smem_ld(Dv) : 0) + ck::smem_ld(Dv));
  return static_cast<size_t>((tiles + int64_t(D) * ck::smem_ld(Dv)) * 2 + D * 4);
}
inline size_t dkdv_smem_bytes(int D, int Dv, bool intra) {
  const int64_t tiles = ck::kChunk * (intra ? 2 : 1) * (ck::smem_ld(D) + ck::smem_ld(Dv));
  return static_cast<size_t>((tiles + int64_t(D) * ck::smem_ld(Dv)) * 2 + D * 4);
}

// dq of one chunk, warp w's query rows i: gate(q_i) (G S_prev^T + gden z_prev^T + M phi(K)),
// M = tril(G V^T + gden 1^T) (kIntra).
template <typename T, int kDTile, bool kIntra>
__global__ void __launch_bounds__(ck::kThreads) chunk_dq_kernel(BwdChunkArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float gd[ck::kChunk];
  const ChunkArgs& p = a.c;
  const int D = static_cast<int>(p.s.dim), Dv = static_cast<int>(p.s.vdim);
  const int ldd = ck::smem_ld(D), ldv = ck::smem_ld(Dv);
  T* gs = reinterpret_cast<T*>(smem_raw);
  T* ss = gs + ck::kChunk * ldv;
  T* ks = ss + D * ldv;
  T* vs = ks + (kIntra ? ck::kChunk * ldd : 0);
  float* zs = reinterpret_cast<float*>(vs + (kIntra ? ck::kChunk * ldv : 0));
  const ChunkBlock blk = chunk_block(p);
  if constexpr (kIntra) {
    load_chunk(ks, ldd, p.k, p, blk.b, blk.h, blk.n0, D, true);
    load_chunk(vs, ldv, p.v, p, blk.b, blk.h, blk.n0, Dv, true);
  }
  cp_async_commit();
  load_g_chunk(gs, ldv, p, blk, Dv, gd);
  const StateSrc src = state_src(p.ws, p.state, p.z, p, blk, kIntra);
  fill_state(ss, ldv, zs, src.s, src.z, D, Dv, 1.0f);
  cp_async_wait<0>();
  __syncthreads();
  const int warp = threadIdx.x / 32, m0 = 16 * warp;
  float acc[kDTile / 8][4] = {};
  if constexpr (kIntra) {
    uint32_t m[4][4];
    intra_product<T, false, true>(m, gs, vs, ldv, Dv, m0, warp, gd, nullptr);
    intra_apply<T, kDTile, true, true>(acc, m, ks, ldd, D, warp);
  }
  state_apply<T, kDTile, false, ck::Ldsm::kB>(acc, gs, ldv, ss, ldv, Dv, D, m0);
  // + gden_i z_prev (as add[col] * gden_i: folded into the gate's factor below)
  const T* q = static_cast<const T*>(p.q.ptr) + blk.b * p.q.s.b + blk.h * p.q.s.h + blk.n0 * p.q.s.n;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int nt = 0; nt < kDTile / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const ck::Pos at = ck::mma_c_pos(lane, e);
      if (8 * nt + at.col < D) acc[nt][e] += gd[m0 + at.row] * zs[8 * nt + at.col];
    }
  }
  store_rows<T, kDTile>(acc, static_cast<T*>(a.dq), p, blk, m0, D, nullptr,
                        [&](int row, int col) { return phi_grad_from_phi(phi(to_acc(q[row * p.q.s.n + col]))); });
}

// dk, dv of one chunk, warp w's key rows j: dv = phi(K) dS_next + triu-part P^T G; dk = gate(k_j)
// (V dS_next^T + dz_next + M^T phi(Q)), M^T_ji = g_i . v_j + gden_i for i >= j (kIntra).
template <typename T, int kTile, bool kIntra>
__global__ void __launch_bounds__(ck::kThreads) chunk_dkdv_kernel(BwdChunkArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float gd[ck::kChunk];
  const ChunkArgs& p = a.c;
  const int D = static_cast<int>(p.s.dim), Dv = static_cast<int>(p.s.vdim);
  const int ldd = ck::smem_ld(D), ldv = ck::smem_ld(Dv);
  T* ks = reinterpret_cast<T*>(smem_raw);
  T* vs = ks + ck::kChunk * ldd;
  T* dss = vs + ck::kChunk * ldv;
  T* qs = dss + D * ldv;
  T* gs = qs + (kIntra ? ck::kChunk * ldd : 0);
  float* dzs = reinterpret_cast<float*>(gs + (kIntra ? ck::kChunk * ldv : 0));
  const ChunkBlock blk = chunk_block(p);
  load_chunk(ks, ldd, p.k, p, blk.b, blk.h, blk.n0, D, true);
  load_chunk(vs, ldv, p.v, p, blk.b, blk.h, blk.n0, Dv, true);
  if constexpr (kIntra) load_chunk(qs, ldd, p.q, p, blk.b, blk.h, blk.n0, D, false);
  cp_async_commit();
  if constexpr (kIntra) load_g_chunk(gs, ldv, p, blk, Dv, gd);
  const StateSrc src = state_src(a.ds_slots, a.ds_total, a.dz_total, p, blk, kIntra);
  fill_state(dss, ldv, dzs, src.s, src.z, D, Dv, 1.0f);
  cp_async_wait<0>();
  __syncthreads();
  const int warp = threadIdx.x / 32, m0 = 16 * warp;
  auto one = [](int, int) { return 1.0f; };
  {
    float acc[kTile / 8][4] = {};
    if constexpr (kIntra) {
      uint32_t pt[4][4];  // P^T = phi(K) phi(Q)^T, kept where query >= key
      intra_product<T, true, false>(pt, ks, qs, ldd, D, m0, warp, nullptr, nullptr);
      intra_apply<T, kTile, false, false>(acc, pt, gs, ldv, Dv, warp);
    }
    state_apply<T, kTile, true, ck::Ldsm::kBT>(acc, ks, ldd, dss, ldv, D, Dv, m0);
    store_rows<T, kTile>(acc, static_cast<T*>(a.dv), p, blk, m0, Dv, nullptr, one);
  }
  float acc[kTile / 8][4] = {};
  if constexpr (kIntra) {
    uint32_t mt[4][4];  // M^T = V G^T + 1 gden^T, kept where query >= key
    intra_product<T, false, false>(mt, vs, gs, ldv, Dv, m0, warp, nullptr, gd);
    intra_apply<T, kTile, true, false>(acc, mt, qs, ldd, D, warp);
  }
  state_apply<T, kTile, false, ck::Ldsm::kB>(acc, vs, ldv, dss, ldv, Dv, D, m0);
  store_rows<T, kTile>(acc, static_cast<T*>(a.dk), p, blk, m0, D, dzs,
                       [&](int row, int col) { return phi_grad_from_phi(phi(to_acc(ks[row * ldd + col]))); });
}

// Binds the accumulator width to the smallest of 32, 64, 128 holding `cols`.
template <typename F>
void with_tile(int64_t cols, F&& f) {
  if (cols <= 32)
    f(std::integral_constant<int, 32>{});
  else if (cols <= 64)
    f(std::integral_constant<int, 64>{});
  else
    f(std::integral_constant<int, 128>{});
}

template <typename K>
void launch_big(K kernel, unsigned blocks, size_t bytes, CUstream_st* stream, const BwdChunkArgs& a) {
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  kernel<<<blocks, ck::kThreads, bytes, stream>>>(a);
}

// The workspace of the chunked backward, in floats: gden [R] | S slots | dS slots | S, z totals |
// dS, dz totals (R = B H N rounded up to 4, so that the states, read as float4, stay 16-byte
// aligned; slots B H chunks (D Dv + D), totals B H (D Dv + D)).
struct BwdWorkspace {
  float *gden, *s_slots, *ds_slots, *s_tot, *z_tot, *ds_tot, *dz_tot;
};
int64_t gden_elems(const SlaShape& s) { return round_up(s.batch * s.heads * s.len, 4); }
BwdWorkspace bwd_workspace(float* ws, const SlaShape& s) {
  const int64_t bh = s.batch * s.heads, slots = bh * ck::num_chunks(s.len) * ck::slot_elems(s.dim, s.vdim);
  float* gden = ws;
  float* s_slots = gden + gden_elems(s);
  float* ds_slots = s_slots + slots;
  float* s_tot = ds_slots + slots;
  float* z_tot = s_tot + bh * s.dim * s.vdim;
  float* ds_tot = z_tot + bh * s.dim;
  float* dz_tot = ds_tot + bh * s.dim * s.vdim;
  return {gden, s_slots, ds_slots, s_tot, z_tot, ds_tot, dz_tot};
}
int64_t bwd_workspace_elems(const SlaShape& s) {
  const int64_t bh = s.batch * s.heads, e = ck::slot_elems(s.dim, s.vdim);
  return gden_elems(s) + 2 * bh * ck::num_chunks(s.len) * e + 2 * bh * e;
}

// The chunked backward fits this device's shared memory (the largest kernel, dk/dv).
bool bwd_smem_fits(const SlaShape& s, bool causal) {
  int dev = 0, optin = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  const size_t need = std::max(dkdv_smem_bytes(static_cast<int>(s.dim), static_cast<int>(s.vdim), causal),
                               dq_smem_bytes(static_cast<int>(s.dim), static_cast<int>(s.vdim), causal)) +
                      ck::kChunk * 4;
  return need <= static_cast<size_t>(optin);
}

// After gden: S (forward states, prefixes), dS (reverse prefixes), then dq and dk / dv per chunk.
template <typename T>
void chunked_backward(const SlaBwdParams& p, const BwdWorkspace& w, CUstream_st* stream) {
  const ChunkArgs c{p.s,
                    0.0f,
                    operand(p.q, p.q_stride),
                    operand(p.k, p.k_stride),
                    operand(p.v, p.v_stride),
                    p.mask,
                    nullptr,
                    const_cast<float*>(static_cast<const float*>(p.den)),
                    w.s_slots,
                    w.s_tot,
                    w.z_tot,
                    operand(p.grad_o, p.grad_o_stride),
                    w.gden};
  ChunkArgs cd = c;
  cd.ws = w.ds_slots, cd.state = w.ds_tot, cd.z = w.dz_tot;
  const auto blocks = static_cast<unsigned>(p.s.batch * p.s.heads * ck::num_chunks(p.s.len));
  const size_t state_bytes = size_t(ck::kChunk) * (ck::smem_ld(p.s.dim) + ck::smem_ld(p.s.vdim)) * sizeof(T);
  const auto scan_blocks =
      static_cast<unsigned>(ceil_div(p.s.batch * p.s.heads * ck::slot_elems(p.s.dim, p.s.vdim), 256));
  chunk_state_kernel<T, false><<<blocks, ck::kThreads, state_bytes, stream>>>(c);
  scan_kernel<<<scan_blocks, 256, 0, stream>>>(c, p.causal, false);
  chunk_state_kernel<T, true><<<blocks, ck::kThreads, state_bytes, stream>>>(cd);
  scan_kernel<<<scan_blocks, 256, 0, stream>>>(cd, p.causal, true);
  const BwdChunkArgs a{c, w.ds_slots, w.ds_tot, w.dz_tot, p.dq, p.dk, p.dv};
  const int D = static_cast<int>(p.s.dim), Dv = static_cast<int>(p.s.vdim);
  SLAB_BOOL_SWITCH(p.causal, kIntra, [&] {
    with_tile(D, [&](auto t) {
      launch_big(chunk_dq_kernel<T, decltype(t)::value, kIntra>, blocks, dq_smem_bytes(D, Dv, kIntra), stream, a);
    });
    with_tile(std::max(D, Dv), [&](auto t) {
      launch_big(chunk_dkdv_kernel<T, decltype(t)::value, kIntra>, blocks, dkdv_smem_bytes(D, Dv, kIntra), stream, a);
    });
  });
}

// SLAB_SLA_EXACT=1 (or any value but 0): the exact kernel for every call (the on-device oracle).
bool exact_requested() {
  const char* v = std::getenv("SLAB_SLA_EXACT");
  return v != nullptr && v[0] != '\0' && !(v[0] == '0' && v[1] == '\0');
}

template <typename T, Mode M>
void run(const RecArgs& a, bool causal, CUstream_st* stream) {
  const auto grid = static_cast<unsigned>(a.s.batch * a.s.heads * ceil_div(a.cols, kTile));  // sla_block
  const dim3 block(kTile, kGroups);
  SLAB_BOOL_SWITCH(causal, kCausal, [&] { recurrence_kernel<T, M, kCausal><<<grid, block, 0, stream>>>(a); });
}

}  // namespace

int64_t forward_workspace_elems_cuda(const SlaFwdParams& p) {
  const bool half = p.dtype == DType::kBFloat16 || p.dtype == DType::kFloat16;
  const int64_t blocks = p.s.batch * p.s.heads * chunk::num_chunks(p.s.len);
  if (!half || exact_requested() || !chunk::chunk_dims_ok(p.s.dim, p.s.vdim) || blocks > kMaxCudaBlocks) return 0;
  using T = __half;  // the alignment rule is the same for both 16-bit types
  if (!rows_aligned<T>(operand(p.q, p.q_stride), p.s.dim) || !rows_aligned<T>(operand(p.k, p.k_stride), p.s.dim) ||
      !rows_aligned<T>(operand(p.v, p.v_stride), p.s.vdim))
    return 0;
  return blocks * chunk::slot_elems(p.s.dim, p.s.vdim);
}

int64_t backward_workspace_elems_cuda(const SlaBwdParams& p) {
  const int64_t rows = p.s.batch * p.s.heads * p.s.len, blocks = p.s.batch * p.s.heads * chunk::num_chunks(p.s.len);
  if (p.dtype != DType::kBFloat16 || exact_requested() || !chunk::chunk_dims_ok(p.s.dim, p.s.vdim) ||
      blocks > kMaxCudaBlocks)
    return rows;
  using T = __nv_bfloat16;
  if (!rows_aligned<T>(operand(p.q, p.q_stride), p.s.dim) || !rows_aligned<T>(operand(p.k, p.k_stride), p.s.dim) ||
      !rows_aligned<T>(operand(p.v, p.v_stride), p.s.vdim) ||
      !rows_aligned<T>(operand(p.grad_o, p.grad_o_stride), p.s.vdim))
    return rows;
  return bwd_workspace_elems(p.s);
}

void sla_forward_cuda(const SlaFwdParams& p, CUstream_st* stream) {
  if (p.workspace != nullptr) {  // forward_workspace_elems_cuda chose the tensor-core path
    if (p.dtype == DType::kBFloat16)
      chunked_forward<__nv_bfloat16>(p, stream);
    else
      chunked_forward<__half>(p, stream);
    return;
  }
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
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      if (p.workspace_elems > rows && bwd_smem_fits(p.s, p.causal)) {
        chunked_backward<T>(p, bwd_workspace(static_cast<float*>(p.workspace), p.s), stream);
        return;
      }
    }
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
