// SLA (simplified linear attention, SLAB) kernels: parameter structs and launchers. No torch
// headers; the binding layer (sla_ops.cpp) checks inputs, allocates outputs and fills these.
//
// Per (batch, head) slice, with phi = ReLU and masked-out keys (mask false) zeroed:
//   o_i = phi(q_i) S_i / (phi(q_i) . z_i + eps),  S_i = sum_j phi(k_j) v_j^T,  z_i = sum_j phi(k_j)
// where j runs over every token (non-causal) or over j <= i (causal).
//
//   forward:  CPU: causal -> chunks of kChunkCpu tokens (sla_cpu.cpp): masked quadratic inside a
//             chunk, fp32 running state (S, z) between chunks; non-causal -> the quadratic form when
//             use_quadratic(N, D, Dv) (one chunk of N tokens), else two passes (reduce S, z; apply).
//             CUDA (sla_cuda.cu): bf16/fp16 -> chunks of 64 tokens on tensor cores (sla_chunk.h:
//             per-chunk states, a fixed-order scan, then the chunk outputs; non-causal: the states
//             reduced, then applied); float32/float64, other shapes, SLAB_SLA_EXACT=1 -> one exact
//             per-token recurrence over the slice, no chunks.
//             Writes o, den_i (the denominator, for backward) and the final state (S, z over
//             all tokens) -- the state a decode continues from.
//   backward: from grad_o, o and den: g_i = grad_o_i / den_i, gden_i = -(grad_o_i . o_i) / den_i;
//             dphi(q_i) = S_i g_i + z_i gden_i, dphi(k_j) = dS_j v_j + dz_j, dv_j = dS_j^T phi(k_j),
//             with dS_j = sum_{i >= j} phi(q_i) g_i^T, dz_j = sum_{i >= j} phi(q_i) gden_i (all i
//             for non-causal). CPU: causal runs the chunks twice: backwards for dk, dv (reverse
//             running dS, dz), forwards for dq (running S, z recomputed, never stored). CUDA bf16
//             (sla_chunk.h): per-chunk S and dS states, prefix / suffix scans, then dq and dk, dv
//             per chunk from chunk-level products; otherwise the exact per-token recurrence.
//   step:     one decode token: S += phi(k) v^T, z += phi(k) (in place), then o as above.
#pragma once
#include <cstdint>

#include "core/common.h"
#include "core/vec.h"

struct CUstream_st;

namespace slab::sla {

// Element (b, h, n, d) of a (B, H, N, D) tensor sits at b * b + h * h + n * n + d: the last
// dimension is contiguous, the others arbitrary (e.g. the q/k/v views of a fused qkv Linear).
struct RowStrides {
  int64_t b, h, n;
};

struct SlaShape {
  int64_t batch, heads, len, dim, vdim;  // B, H, N, D, Dv
};

struct SlaFwdParams {
  DType dtype;  // of q, k, v, o
  SlaShape s;
  bool causal;
  double eps;
  const void* q;
  RowStrides q_stride;
  const void* k;
  RowStrides k_stride;
  const void* v;
  RowStrides v_stride;
  const bool* mask;  // [B, N] contiguous, true = real token; nullptr: every token
  void* o;           // [B, H, N, Dv] contiguous
  void* den;         // [B, H, N] accumulation type
  void* state;       // [B, H, D, Dv] accumulation type: S over all (kept) tokens
  void* z;           // [B, H, D] accumulation type
  void* workspace;   // CUDA tensor-core path only: forward_workspace_elems_cuda fp32 values; else null
};

struct SlaBwdParams {
  DType dtype;
  SlaShape s;
  bool causal;
  const void* q;
  RowStrides q_stride;
  const void* k;
  RowStrides k_stride;
  const void* v;
  RowStrides v_stride;
  const void* o;  // forward output
  RowStrides o_stride;
  const void* grad_o;
  RowStrides grad_o_stride;
  const void* den;          // [B, H, N] accumulation type, from the forward
  const bool* mask;         // as in SlaFwdParams
  void* dq;                 // [B, H, N, D] contiguous
  void* dk;                 // [B, H, N, D] contiguous
  void* dv;                 // [B, H, N, Dv] contiguous
  void* workspace;          // CUDA only: backward_workspace_elems_cuda accumulation-type values, gden first
  int64_t workspace_elems;  // its size, from backward_workspace_elems_cuda
};

// Decode: q, k (B, H, D), v (B, H, Dv) with strides (b, h) (the n stride unused), state and z
// contiguous accumulation type, o (B, H, Dv) contiguous.
struct SlaStepParams {
  DType dtype;
  int64_t batch, heads, dim, vdim;
  double eps;
  const void* q;
  RowStrides q_stride;
  const void* k;
  RowStrides k_stride;
  const void* v;
  RowStrides v_stride;
  void* state;  // [B, H, D, Dv], updated in place
  void* z;      // [B, H, D], updated in place
  void* o;      // [B, H, Dv]
};

// The CUDA kernels keep one head dimension (D or Dv) in registers and shared memory: both must be
// at most this on CUDA (the binding checks); float64 inputs (gradcheck) at most the second.
constexpr int kMaxHeadDimCuda = 256;
constexpr int kMaxHeadDimCudaFp64 = 128;

// CUDA launch geometry: one block per (b, h, tile of kCudaColumnTile state columns), flattened into
// gridDim.x (up to 2^31 - 1 blocks; gridDim.y and z stop at 65535, below real batch x heads counts).
constexpr int kCudaColumnTile = 32;
constexpr int64_t kMaxCudaBlocks = 2147483647;
struct SlaBlock {
  int64_t b, h, tile;
};
SLAB_HD SlaBlock sla_block(int64_t block, int64_t heads, int64_t tiles) {
  const int64_t bh = block / tiles;
  return {bh / heads, bh % heads, block % tiles};
}

// CUDA decode step: one block of kStepThreads threads per (b, h) streams the (D, Dv) state once,
// in packs of `width` state columns (16 bytes when the state is aligned and Dv a multiple of the
// pack width, else single columns). Thread t owns column pack `tile0 + t % tile` of each column
// tile and the state rows d = t / tile, + groups, ...; the column sums of its rows are finished
// in a fixed order over the groups (step_column_sum), so the output is deterministic.
constexpr int kStepThreads = 256;
struct StepLayout {
  int width;      // state columns per pack
  int64_t packs;  // packs per state row: ceil(Dv / width)
  int tile;       // packs per column tile (a power of two dividing kStepThreads)
  int groups;     // thread rows: kStepThreads / tile
};
SLAB_HD StepLayout step_layout(int64_t vdim, int pack_width, bool vectorized) {
  const int width = vectorized && vdim % pack_width == 0 ? pack_width : 1;
  const int64_t packs = ceil_div(vdim, width);
  int tile = 1;
  while (tile < packs && tile < kStepThreads) tile *= 2;
  return {width, packs, tile, kStepThreads / tile};
}

// One thread's share of a step for one column tile: state rows d = group, group + groups, ... of
// the W columns at `state_cols` (row stride vdim): S[d] += fk[d] v, s += fq[d] S[d] (updated).
template <int W, typename A>
SLAB_HD void step_rows(A* state_cols, int64_t vdim, int dim, int group, int groups, const A* fk, const A* fq,
                       const A (&v)[W], A (&s)[W]) {
  A* row_ptr = state_cols + group * vdim;
  const int64_t row_step = groups * vdim;
  SLAB_UNROLL_BY(4)
  for (int d = group; d < dim; d += groups, row_ptr += row_step) {
    Pack<A, W> row = read_pack<W>(row_ptr);
    SLAB_UNROLL
    for (int i = 0; i < W; ++i) {
      row.v[i] += fk[d] * v[i];
      s[i] += fq[d] * row.v[i];
    }
    write_pack<W>(row_ptr, row);
  }
}

// Column i of pack j's output sum: the groups' partials part[(g * tile + j) * W + i] added in group order.
template <int W, typename A>
SLAB_HD A step_column_sum(const A* part, int tile, int groups, int j, int i) {
  A t = 0;
  SLAB_UNROLL_BY(4)
  for (int g = 0; g < groups; ++g) t += part[(g * tile + j) * W + i];
  return t;
}

void sla_forward_cpu(const SlaFwdParams& p);
void sla_backward_cpu(const SlaBwdParams& p);
void sla_step_cpu(const SlaStepParams& p);

// fp32 workspace elements the CUDA forward needs for p (all fields but workspace filled): nonzero
// exactly when it runs the tensor-core chunked path (sla/sla_chunk.h: bf16 / fp16, D and Dv
// multiples of 16 up to 128, 16-byte aligned rows, SLAB_SLA_EXACT unset); 0 selects the exact kernel.
int64_t forward_workspace_elems_cuda(const SlaFwdParams& p);
void sla_forward_cuda(const SlaFwdParams& p, CUstream_st* stream);
// Accumulation-type workspace elements the CUDA backward needs for p (workspace fields unset): B H N
// (gden) for the exact kernel; more for the tensor-core chunked path (bf16, the forward's shape and
// alignment rules, SLAB_SLA_EXACT unset), which then runs where the device's shared memory allows.
int64_t backward_workspace_elems_cuda(const SlaBwdParams& p);
void sla_backward_cuda(const SlaBwdParams& p, CUstream_st* stream);
void sla_step_cuda(const SlaStepParams& p, CUstream_st* stream);

}  // namespace slab::sla
