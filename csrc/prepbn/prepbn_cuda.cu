// PRepBN CUDA kernels: one launch per stage, two each way.
//   forward : stats_kernel (per-channel moments of the kept rows; the last block of each channel
//             tile merges the per-split partials in a fixed order and, for the fused op, writes
//             bn_mean / bn_rstd / bn_var) -> apply_kernel (a warp group per row holding the row in
//             registers: the norm's row statistics and the output from one read of x).
//   backward: bwd_reduce_kernel (per-channel sums, merged the same way; for the fused op also the
//             parameter gradients and d_alpha) -> bwd_apply_kernel (x and dy rows in registers).
// The work decomposition (RowSchedule, ColSchedule) is in prepbn.h, tested on the CPU by
// tests/host/prepbn_schedule.cpp; the per-element arithmetic is prepbn_math.h, shared with the CPU.
#include "core/vec_cuda.cuh"
#include "prepbn/prepbn.h"
#include "prepbn/prepbn_math.h"

namespace slab::prepbn {
namespace {

__device__ __forceinline__ bool is_kept(const bool* mask, int64_t row) { return mask == nullptr || mask[row]; }

// Partials written by other blocks of the same launch: read through L2, not the non-coherent L1.
template <typename A>
__device__ __forceinline__ A load_l2(const A* p) {
  return __ldcg(p);
}

// ---- row passes --------------------------------------------------------------------------------

struct RowThread {
  int64_t row;
  int t;           // thread within the row's group
  int first_warp;  // the group's first warp within the block
  bool valid;      // row < rows (the last block may hold fewer rows)
};

__device__ __forceinline__ RowThread row_thread(const RowSchedule& rs, int64_t rows) {
  const int group = threadIdx.x / rs.threads();
  const int64_t row = static_cast<int64_t>(blockIdx.x) * rs.rows_per_block + group;
  return {row, static_cast<int>(threadIdx.x) % rs.threads(), group * rs.warps, row < rows};
}

// Sum over the row's group of warps, received by all of them. rs.warps is the same for every
// group of the block, so the barriers are uniform; groups of invalid rows take part with zeros.
template <typename A>
__device__ __forceinline__ A group_sum(A v, A* scratch, const RowSchedule& rs, const RowThread& th) {
  v = warp_sum(v);
  if (rs.warps == 1) return v;
  __syncthreads();  // scratch may still be read by the previous call
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  A total = 0;
  for (int w = 0; w < rs.warps; ++w) total += scratch[th.first_warp + w];
  return total;
}

// One segment of a row in registers: slot s holds the W elements from e[s] (-1: past the end,
// values 0). With one segment the row is read once; longer rows re-read (from L2) per pass.
template <typename T, int W>
struct RowRegs {
  static constexpr int kSlots = kRowElems / W;
  acc_t<T> v[kSlots][W];
  int64_t e[kSlots];

  __device__ __forceinline__ void load(const T* row, const RowSchedule& rs, int segment, const RowThread& th) {
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      e[s] = th.valid ? rs.element(segment, s, th.t) : -1;
      if (e[s] < 0) {
#pragma unroll
        for (int i = 0; i < W; ++i) v[s][i] = 0;
      } else if (rs.segments == 1) {
        load_acc<W, Cache::kStream>(row + e[s], v[s]);
      } else {
        load_acc<W, Cache::kReuse>(row + e[s], v[s]);
      }
    }
  }
  // Segment g for a pass over the row: a no-op when the whole row is already held.
  __device__ __forceinline__ void pass(const T* row, const RowSchedule& rs, int segment, const RowThread& th) {
    if (rs.segments > 1) load(row, rs, segment, th);
  }
  __device__ __forceinline__ acc_t<T> sum() const {
    acc_t<T> acc = 0;
#pragma unroll
    for (int s = 0; s < kSlots; ++s)
#pragma unroll
      for (int i = 0; i < W; ++i) acc += v[s][i];
    return acc;
  }
};

// Row mean (LayerNorm; 0 for RMSNorm) and 1/sqrt(var or mean square + eps) of the held row.
template <typename T, int W, typename A = acc_t<T>>
__device__ void row_stats(RowRegs<T, W>& x, const T* xr, Norm norm, A eps, A* scratch, const RowSchedule& rs,
                          const RowThread& th, A& mean, A& rstd) {
  const A inv_c = A(1) / A(rs.channels);
  A acc = 0;
  mean = 0;
  if (norm == Norm::kLayer) {
    for (int g = 0; g < rs.segments; ++g) {
      x.pass(xr, rs, g, th);
      acc += x.sum();
    }
    mean = group_sum(acc, scratch, rs, th) * inv_c;
    acc = 0;
  }
  for (int g = 0; g < rs.segments; ++g) {
    x.pass(xr, rs, g, th);
#pragma unroll
    for (int s = 0; s < RowRegs<T, W>::kSlots; ++s)
#pragma unroll
      for (int i = 0; i < W; ++i) {
        const A d = x.e[s] < 0 ? A(0) : x.v[s][i] - mean;
        acc += d * d;
      }
  }
  rstd = A(1) / sqrt(group_sum(acc, scratch, rs, th) * inv_c + eps);
}

template <typename A>
__device__ __forceinline__ A opt(const A* p, int64_t c) {
  return p ? __ldg(p + c) : A(0);
}

template <typename T, int W>
__global__ void __launch_bounds__(kRowBlockThreads) apply_kernel(ApplyParams p, RowSchedule rs) {
  using A = acc_t<T>;
  __shared__ A scratch[kMaxRowWarps];
  const RowThread th = row_thread(rs, p.rows);
  const int64_t base = (th.valid ? th.row : 0) * p.channels;
  const T* xr = static_cast<const T*>(p.x) + base;
  T* yr = static_cast<T*>(p.y) + base;
  const A* nw = static_cast<const A*>(p.norm_weight);
  const A* nb = static_cast<const A*>(p.norm_bias);
  const A* bw = static_cast<const A*>(p.bn_weight);
  const A* bb = static_cast<const A*>(p.bn_bias);
  const A* bm = static_cast<const A*>(p.bn_mean);
  const A* br = static_cast<const A*>(p.bn_rstd);
  const A* bv = static_cast<const A*>(p.bn_var);
  const A alpha = *static_cast<const A*>(p.alpha), lam = static_cast<A>(p.lam), eps = static_cast<A>(p.eps);
  const bool write_stats = p.out_mean != nullptr && th.row == 0;

  RowRegs<T, W> x;
  if (rs.segments == 1) x.load(xr, rs, 0, th);
  A rm = 0, rr = 0;
  if (p.norm != Norm::kNone) {
    row_stats(x, xr, p.norm, static_cast<A>(p.norm_eps), scratch, rs, th, rm, rr);
    if (th.valid && th.t == 0) {
      static_cast<A*>(p.row_mean)[th.row] = rm;
      static_cast<A*>(p.row_rstd)[th.row] = rr;
    }
  }
  for (int g = 0; g < rs.segments; ++g) {
    x.pass(xr, rs, g, th);
#pragma unroll
    for (int s = 0; s < RowRegs<T, W>::kSlots; ++s) {
      if (x.e[s] < 0) continue;
      A out[W];
#pragma unroll
      for (int i = 0; i < W; ++i) {
        const int64_t c = x.e[s] + i;
        const A rstd = bv ? A(1) / sqrt(__ldg(bv + c) + eps) : __ldg(br + c);
        const A mu = __ldg(bm + c);
        const auto f = fwd_coeffs<A>(opt(nw, c), opt(nb, c), __ldg(bw + c), __ldg(bb + c), alpha, mu, rstd, lam);
        out[i] = fwd_elem<A>(x.v[s][i], f.mu, f.s, f.al, f.t, f.k, row_xhat<A>(x.v[s][i], rm, rr));
        if (write_stats) {
          static_cast<A*>(p.out_mean)[c] = mu;
          static_cast<A*>(p.out_rstd)[c] = rstd;
          static_cast<A*>(p.out_var)[c] = __ldg(bv + c);
        }
      }
      store_acc<W>(yr + x.e[s], out);
    }
  }
}

template <typename T, int W>
__global__ void __launch_bounds__(kRowBlockThreads) bwd_apply_kernel(BwdApplyParams p, RowSchedule rs) {
  using A = acc_t<T>;
  constexpr int kSlots = RowRegs<T, W>::kSlots;
  __shared__ A scratch[kMaxRowWarps];
  const RowThread th = row_thread(rs, p.rows);
  const int64_t base = (th.valid ? th.row : 0) * p.channels;
  const T* dyr = static_cast<const T*>(p.dy) + base;
  const T* xr = static_cast<const T*>(p.x) + base;
  T* dxr = static_cast<T*>(p.dx) + base;
  const A* nw = static_cast<const A*>(p.norm_weight);
  const A* bw = static_cast<const A*>(p.bn_weight);
  const A* bm = static_cast<const A*>(p.bn_mean);
  const A* br = static_cast<const A*>(p.bn_rstd);
  const A* sums = static_cast<const A*>(p.sums);
  const A alpha = *static_cast<const A*>(p.alpha), lam = static_cast<A>(p.lam);
  const A count = *static_cast<const A*>(p.count), inv_c = A(1) / A(p.channels);
  const bool has_norm = p.norm != Norm::kNone;
  const A rm = has_norm && th.valid ? static_cast<const A*>(p.row_mean)[th.row] : A(0);
  const A rr = has_norm && th.valid ? static_cast<const A*>(p.row_rstd)[th.row] : A(0);

  RowRegs<T, W> x, g;
  auto load = [&](int seg) {
    x.load(xr, rs, seg, th);
    g.load(dyr, rs, seg, th);
  };
  if (rs.segments == 1) load(0);
  A h_mean = 0, hx_mean = 0;
  if (has_norm) {
    A h_acc = 0, hx_acc = 0;
    for (int seg = 0; seg < rs.segments; ++seg) {
      if (rs.segments > 1) load(seg);
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        if (x.e[s] < 0) continue;
#pragma unroll
        for (int i = 0; i < W; ++i) {
          const A h = lam * __ldg(nw + x.e[s] + i) * g.v[s][i];
          h_acc += h;
          hx_acc += h * row_xhat<A>(x.v[s][i], rm, rr);
        }
      }
    }
    if (p.norm == Norm::kLayer) h_mean = group_sum(h_acc, scratch, rs, th) * inv_c;
    hx_mean = group_sum(hx_acc, scratch, rs, th) * inv_c;
  }
  const A kept = p.training && th.valid && is_kept(p.mask, th.row) ? A(1) : A(0);
  const auto row = bwd_row_terms<A>(rr, h_mean, hx_mean);
  for (int seg = 0; seg < rs.segments; ++seg) {
    if (rs.segments > 1) load(seg);
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      if (x.e[s] < 0) continue;
      A out[W];
#pragma unroll
      for (int i = 0; i < W; ++i) {
        const int64_t c = x.e[s] + i;
        const auto f = bwd_coeffs<A>(opt(nw, c), __ldg(bw + c), alpha, __ldg(bm + c), __ldg(br + c), __ldg(sums + c),
                                     __ldg(sums + p.channels + c), count, lam, p.training);
        const A dy = g.v[s][i], v = x.v[s][i];
        out[i] = bwd_elem<A>(dy, v, f.mu, f.p, f.c0, f.c1r, f.k, kept, rr, rm, row.shift, row.slope);
      }
      store_acc<W>(dxr + x.e[s], out);
    }
  }
}

// ---- column reductions -------------------------------------------------------------------------

struct ColThread {
  int lane, ry, split;
  int64_t tile, c0;  // c0: the lane's first channel
  bool active;       // c0 < channels (the lane's W channels all lie in the row: width divides it)
};

__device__ __forceinline__ ColThread col_thread(const ColSchedule& cs) {
  const int lane = threadIdx.x, ry = threadIdx.y;
  const int64_t tile = blockIdx.x, c0 = cs.channel(tile, lane);
  return {lane, ry, static_cast<int>(blockIdx.y), tile, c0, c0 < cs.channels};
}

template <typename A>
__device__ __forceinline__ A* acc_ws(void* ws) {
  return static_cast<A*>(ws);
}
__device__ __forceinline__ int* tickets(void* ws, const ColSchedule& cs, int acc_bytes) {
  return reinterpret_cast<int*>(static_cast<char*>(ws) + cs.ticket_offset(acc_bytes));
}

// True in every thread of the block that arrives last of `expected` at `ticket`. The fence before
// the ticket publishes this block's partials; the one after orders the reads of the others'.
__device__ __forceinline__ bool arrives_last(int* ticket, int expected, bool& sh_last) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) sh_last = atomicAdd(ticket, 1) == expected - 1;
  __syncthreads();
  __threadfence();
  return sh_last;
}

// Row lane 0 merges the moments of row lanes 1..7 into its own, in that order.
template <typename A, int W>
__device__ __forceinline__ void merge_row_lanes(const ColThread& th, A (&mean)[W], A (&m2)[W], A& n,
                                                A (&sh_mean)[kColRowLanes][32 * W], A (&sh_m2)[kColRowLanes][32 * W],
                                                A (&sh_n)[kColRowLanes]) {
  __syncthreads();  // the shared arrays may still be read by a previous merge
#pragma unroll
  for (int i = 0; i < W; ++i) {
    sh_mean[th.ry][th.lane * W + i] = mean[i];
    sh_m2[th.ry][th.lane * W + i] = m2[i];
  }
  if (th.lane == 0) sh_n[th.ry] = n;
  __syncthreads();
  if (th.ry != 0) return;
#pragma unroll 1  // a loop, not 7 copies of the (double: called) division of merge_moments
  for (int j = 1; j < kColRowLanes; ++j) {
#pragma unroll
    for (int i = 0; i < W; ++i)
      merge_moments(mean[i], m2[i], n, sh_mean[j][th.lane * W + i], sh_m2[j][th.lane * W + i], sh_n[j]);
    n += sh_n[j];
  }
}

template <typename T, int W>
__global__ void __launch_bounds__(kColThreads) stats_kernel(StatsParams p, ColSchedule cs) {
  using A = acc_t<T>;
  __shared__ A sh_mean[kColRowLanes][32 * W], sh_m2[kColRowLanes][32 * W], sh_n[kColRowLanes];
  __shared__ bool sh_last;
  const ColThread th = col_thread(cs);
  const T* x = static_cast<const T*>(p.x);
  A* ws = acc_ws<A>(p.workspace);

  A mean[W] = {}, m2[W] = {}, n = 0;
  for (int64_t r = cs.split_begin(th.split) + th.ry; r < cs.split_end(th.split); r += kColRowLanes) {
    if (!is_kept(p.mask, r)) continue;
    n += 1;
    if (!th.active) continue;
    A v[W];
    load_acc<W, Cache::kStream>(x + r * cs.channels + th.c0, v);
    const A inv_n = A(1) / n;
#pragma unroll
    for (int i = 0; i < W; ++i) welford_push(mean[i], m2[i], inv_n, v[i]);
  }
  merge_row_lanes(th, mean, m2, n, sh_mean, sh_m2, sh_n);
  if (th.ry == 0) {
    if (th.active)
#pragma unroll
      for (int i = 0; i < W; ++i) {
        ws[cs.value(th.split, 0, th.c0 + i)] = mean[i];
        ws[cs.value(th.split, 1, th.c0 + i)] = m2[i];
      }
    if (th.lane == 0) ws[cs.count(th.tile, th.split)] = n;
  }
  if (!arrives_last(tickets(p.workspace, cs, sizeof(A)) + th.tile, cs.splits, sh_last)) return;

  // The tile's last block: splits ry, ry + 8, ... per row lane, then the row lanes in order.
#pragma unroll
  for (int i = 0; i < W; ++i) mean[i] = m2[i] = 0;
  n = 0;
  for (int s = th.ry; s < cs.splits; s += kColRowLanes) {
    const A n_b = load_l2(ws + cs.count(th.tile, s));
    if (th.active)
#pragma unroll
      for (int i = 0; i < W; ++i)
        merge_moments(mean[i], m2[i], n, load_l2(ws + cs.value(s, 0, th.c0 + i)),
                      load_l2(ws + cs.value(s, 1, th.c0 + i)), n_b);
    n += n_b;
  }
  merge_row_lanes(th, mean, m2, n, sh_mean, sh_m2, sh_n);
  if (th.ry != 0) return;
  if (th.tile == 0 && th.lane == 0) *static_cast<A*>(p.count) = n;
  if (!th.active) return;
#pragma unroll
  for (int i = 0; i < W; ++i) {
    const int64_t c = th.c0 + i;
    if (p.m2) static_cast<A*>(p.m2)[c] = m2[i];
    if (p.bn_rstd) {
      const BatchStats<A> bs = batch_stats(mean[i], m2[i], n, static_cast<A>(p.eps));
      static_cast<A*>(p.mean)[c] = bs.mean;
      static_cast<A*>(p.bn_rstd)[c] = bs.rstd;
      static_cast<A*>(p.bn_var)[c] = bs.var;
    } else {
      static_cast<A*>(p.mean)[c] = mean[i];
    }
  }
}

// Row lane 0 adds the sums of row lanes 1..7 to its own, in that order.
template <typename A, int W>
__device__ __forceinline__ void sum_row_lanes(const ColThread& th, A (&acc)[3][W], A& n,
                                              A (&sh)[3][kColRowLanes][32 * W], A (&sh_n)[kColRowLanes]) {
  __syncthreads();
#pragma unroll
  for (int k = 0; k < 3; ++k)
#pragma unroll
    for (int i = 0; i < W; ++i) sh[k][th.ry][th.lane * W + i] = acc[k][i];
  if (th.lane == 0) sh_n[th.ry] = n;
  __syncthreads();
  if (th.ry != 0) return;
  for (int j = 1; j < kColRowLanes; ++j) {
#pragma unroll
    for (int k = 0; k < 3; ++k)
#pragma unroll
      for (int i = 0; i < W; ++i) acc[k][i] += sh[k][j][th.lane * W + i];
    n += sh_n[j];
  }
}

// The fused backward's parameter gradients of one channel, and its d_alpha term.
template <typename A>
__device__ __forceinline__ A write_param_grads(const BwdReduceParams& p, int64_t c, A s_dy, A s_bn, A s_norm, A mu,
                                               A rs) {
  const A lam = static_cast<A>(p.lam), one_m = A(1) - lam;
  if (p.d_norm_weight) static_cast<A*>(p.d_norm_weight)[c] = lam * s_norm;
  if (p.d_norm_bias) static_cast<A*>(p.d_norm_bias)[c] = lam * s_dy;
  static_cast<A*>(p.d_bn_weight)[c] = one_m * s_bn;
  static_cast<A*>(p.d_bn_bias)[c] = one_m * s_dy;
  return alpha_grad_term(s_dy, s_bn, mu, rs, lam);
}

template <typename T, int W>
__global__ void __launch_bounds__(kColThreads) bwd_reduce_kernel(BwdReduceParams p, ColSchedule cs) {
  using A = acc_t<T>;
  __shared__ A sh[3][kColRowLanes][32 * W], sh_n[kColRowLanes];
  __shared__ bool sh_last;
  const ColThread th = col_thread(cs);
  const T* dy = static_cast<const T*>(p.dy);
  const T* x = static_cast<const T*>(p.x);
  const A* row_mean = static_cast<const A*>(p.row_mean);
  const A* row_rstd = static_cast<const A*>(p.row_rstd);
  const bool has_norm = p.norm != Norm::kNone;
  A* ws = acc_ws<A>(p.workspace);
  A mu[W], rs[W];
#pragma unroll
  for (int i = 0; i < W; ++i) {
    mu[i] = th.active ? static_cast<const A*>(p.bn_mean)[th.c0 + i] : A(0);
    rs[i] = th.active ? static_cast<const A*>(p.bn_rstd)[th.c0 + i] : A(0);
  }

  A acc[3][W] = {}, n = 0;
  for (int64_t r = cs.split_begin(th.split) + th.ry; r < cs.split_end(th.split); r += kColRowLanes) {
    n += is_kept(p.mask, r) ? A(1) : A(0);
    if (!th.active) continue;
    A g[W], v[W];
    load_acc<W, Cache::kStream>(dy + r * cs.channels + th.c0, g);
    load_acc<W, Cache::kStream>(x + r * cs.channels + th.c0, v);
    const A rm = has_norm ? row_mean[r] : A(0), rr = has_norm ? row_rstd[r] : A(0);
#pragma unroll
    for (int i = 0; i < W; ++i) {
      acc[0][i] += g[i];
      acc[1][i] += g[i] * (v[i] - mu[i]) * rs[i];
      if (has_norm) acc[2][i] += g[i] * row_xhat<A>(v[i], rm, rr);
    }
  }
  sum_row_lanes(th, acc, n, sh, sh_n);
  if (th.ry == 0) {
    if (th.active)
#pragma unroll
      for (int k = 0; k < 3; ++k)
#pragma unroll
        for (int i = 0; i < W; ++i) ws[cs.value(th.split, k, th.c0 + i)] = acc[k][i];
    if (th.lane == 0) ws[cs.count(th.tile, th.split)] = n;
  }
  int* ticket = tickets(p.workspace, cs, sizeof(A));
  if (!arrives_last(ticket + th.tile, cs.splits, sh_last)) return;

  // The tile's last block: splits in the fixed order (see ColSchedule).
#pragma unroll
  for (int k = 0; k < 3; ++k)
#pragma unroll
    for (int i = 0; i < W; ++i) acc[k][i] = 0;
  n = 0;
  for (int s = th.ry; s < cs.splits; s += kColRowLanes) {
    n += load_l2(ws + cs.count(th.tile, s));
    if (th.active)
#pragma unroll
      for (int k = 0; k < 3; ++k)
#pragma unroll
        for (int i = 0; i < W; ++i) acc[k][i] += load_l2(ws + cs.value(s, k, th.c0 + i));
  }
  sum_row_lanes(th, acc, n, sh, sh_n);
  if (th.ry != 0) return;  // row lane 0 is warp 0: all 32 lanes stay for the warp sum below
  if (th.tile == 0 && th.lane == 0) *static_cast<A*>(p.count) = n;
  A alpha_term = 0;
  if (th.active)
#pragma unroll
    for (int i = 0; i < W; ++i) {
      const int64_t c = th.c0 + i;
      A* sums = static_cast<A*>(p.sums);
      sums[c] = acc[0][i];
      sums[cs.channels + c] = acc[1][i];
      sums[2 * cs.channels + c] = acc[2][i];
      if (p.d_alpha) alpha_term += write_param_grads(p, c, acc[0][i], acc[1][i], acc[2][i], mu[i], rs[i]);
    }
  if (p.d_alpha == nullptr) return;
  // d_alpha: the tile's terms (a fixed butterfly), then the tiles in order by the last tile.
  alpha_term = warp_sum(alpha_term);
  if (th.lane != 0) return;
  ws[cs.alpha_part(th.tile)] = alpha_term;
  __threadfence();
  if (atomicAdd(ticket + cs.tiles, 1) != cs.tiles - 1) return;
  __threadfence();
  A total = 0;
  for (int64_t j = 0; j < cs.tiles; ++j) total += load_l2(ws + cs.alpha_part(j));
  *static_cast<A*>(p.d_alpha) = total;
}

// ---- launchers ---------------------------------------------------------------------------------

template <typename T>
ColSchedule col_launch_schedule(int64_t rows, int64_t channels, int width, void* ws, cudaStream_t stream) {
  const ColSchedule cs = col_schedule(rows, channels, width);
  const int64_t acc_bytes = sizeof(acc_t<T>);
  // The tickets must start at 0: an async memset (no kernel), capturable in a CUDA graph.
  cudaMemsetAsync(static_cast<char*>(ws) + cs.ticket_offset(acc_bytes), 0,
                  cs.bytes(acc_bytes) - cs.ticket_offset(acc_bytes), stream);
  return cs;
}

dim3 col_grid(const ColSchedule& cs) { return dim3(static_cast<unsigned>(cs.tiles), static_cast<unsigned>(cs.splits)); }
const dim3 kColBlock(32, kColRowLanes);

dim3 row_grid(const RowSchedule& rs, int64_t rows) {
  return dim3(static_cast<unsigned>(ceil_div(rows, rs.rows_per_block)));
}
unsigned row_block(const RowSchedule& rs) { return static_cast<unsigned>(rs.rows_per_block * rs.threads()); }

int elem_bytes(DType dtype) { return dtype == DType::kFloat64 ? 8 : (dtype == DType::kFloat32 ? 4 : 2); }

}  // namespace

size_t workspace_bytes_cuda(int64_t rows, int64_t channels, DType dtype) {
  // Enough for either access width (the kernels pick it from the pointers' alignment).
  const int eb = elem_bytes(dtype), acc_bytes = dtype == DType::kFloat64 ? 8 : 4;
  const int64_t scalar = col_schedule(rows, channels, 1).bytes(acc_bytes);
  const int64_t vector = col_schedule(rows, channels, kVecBytes / eb).bytes(acc_bytes);
  return static_cast<size_t>(scalar > vector ? scalar : vector);
}

void stats_cuda(const StatsParams& p, CUstream_st* stream) {
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] {
    const int width = access_width(kPackWidth<T>, p.channels, sizeof(T), p.x);
    const ColSchedule cs = col_launch_schedule<T>(p.rows, p.channels, width, p.workspace, stream);
    SLAB_BOOL_SWITCH(width > 1, kVec,
                     [&] { stats_kernel<T, kVec ? kPackWidth<T> : 1><<<col_grid(cs), kColBlock, 0, stream>>>(p, cs); });
  });
}

void apply_cuda(const ApplyParams& p, CUstream_st* stream) {
  if (p.rows == 0) return;
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] {
    const int width = access_width(kPackWidth<T>, p.channels, sizeof(T), p.x, p.y);
    const RowSchedule rs = row_schedule(p.channels, width);
    SLAB_BOOL_SWITCH(width > 1, kVec, [&] {
      apply_kernel<T, kVec ? kPackWidth<T> : 1><<<row_grid(rs, p.rows), row_block(rs), 0, stream>>>(p, rs);
    });
  });
}

void bwd_reduce_cuda(const BwdReduceParams& p, CUstream_st* stream) {
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] {
    const int width = access_width(kPackWidth<T>, p.channels, sizeof(T), p.x, p.dy);
    const ColSchedule cs = col_launch_schedule<T>(p.rows, p.channels, width, p.workspace, stream);
    SLAB_BOOL_SWITCH(width > 1, kVec, [&] {
      bwd_reduce_kernel<T, kVec ? kPackWidth<T> : 1><<<col_grid(cs), kColBlock, 0, stream>>>(p, cs);
    });
  });
}

void bwd_apply_cuda(const BwdApplyParams& p, CUstream_st* stream) {
  if (p.rows == 0) return;
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] {
    const int width = access_width(kPackWidth<T>, p.channels, sizeof(T), p.x, p.dy, p.dx);
    const RowSchedule rs = row_schedule(p.channels, width);
    SLAB_BOOL_SWITCH(width > 1, kVec, [&] {
      bwd_apply_kernel<T, kVec ? kPackWidth<T> : 1><<<row_grid(rs, p.rows), row_block(rs), 0, stream>>>(p, rs);
    });
  });
}

}  // namespace slab::prepbn
