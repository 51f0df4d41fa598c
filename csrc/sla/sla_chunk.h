// The index maps of the SLA tensor-core kernels (sla_cuda.cu), host-callable so that
// tests/host/sla_chunk_schedule.cpp checks them against the PTX ISA tables and runs the whole
// chunk decomposition serially. No CUDA-only includes.
//
// Chunked algorithm (bf16/fp16 inputs), per (b, h) slice cut into chunks of kChunk tokens:
//   state pass  one block per (b, h, chunk c): KV_c = phi(K_c)^T V_c (D x Dv) and kz_c = sum phi(K_c)
//               (fp32), written to the workspace slot of chunk c;
//   scan        one thread per (b, h, state element): over the chunks in order, slot c becomes the
//               exclusive prefix S_prev (z_prev) and the total goes to the final state (S, z) --
//               a fixed order, so the result is deterministic;
//   output pass one block per (b, h, chunk), warp w owning query rows 16 w .. 16 w + 15:
//               o = (phi(Q) S_prev + tril(phi(Q) phi(K)^T) V) / (phi(Q) . z_prev + rowsum(tril(..)) + eps).
//   Non-causal runs the state pass, the scan as a plain reduction (no prefixes), and the output pass
//   without the intra-chunk term, S being the final state.
//
// Tensor-core operands are mma.sync.m16n8k16 (row.col, f32 accumulators) fragments loaded from
// shared memory with ldmatrix.x4: each lane names the start of one 8-element row of one of four
// 8 x 8 matrices. Shared tiles are row-major with kSmemPad extra elements per row (16 bytes): rows
// then start 4 banks apart modulo 32, so the 8 rows of an ldmatrix matrix hit distinct banks
// without a swizzle, for every head dimension that is a multiple of 16.
#pragma once
#include <cstdint>

#include "core/common.h"

namespace slab::sla::chunk {

constexpr int kChunk = 64;             // tokens per chunk (4 warps x 16 query rows)
constexpr int kWarps = kChunk / 16;    // warps per block
constexpr int kThreads = kWarps * 32;  // threads per block
constexpr int kSmemPad = 8;            // elements (16 bytes) of padding per shared row
constexpr int kMaxDim = 128;           // largest D, Dv on the tensor-core path
constexpr int kStateCols = 64;         // state-pass columns per warp work unit (8 n-tiles)

// The tensor-core path's shape rule: D and Dv multiples of 16 up to kMaxDim (others run the exact
// per-token kernel).
SLAB_HD bool chunk_dims_ok(int64_t dim, int64_t vdim) {
  return dim > 0 && vdim > 0 && dim % 16 == 0 && vdim % 16 == 0 && dim <= kMaxDim && vdim <= kMaxDim;
}

SLAB_HD int64_t num_chunks(int64_t len) { return ceil_div(len, kChunk); }
SLAB_HD int smem_ld(int cols) { return cols + kSmemPad; }  // row stride of a shared tile, elements

// Workspace: per (b, h, chunk) one slot of D * Dv state values then D normaliser values (fp32).
SLAB_HD int64_t slot_elems(int64_t dim, int64_t vdim) { return dim * vdim + dim; }

struct Pos {
  int row, col;
};

// ---- mma.m16n8k16 fragments (lane = 4 g + t) -------------------------------------------------
// A 16 x 16: element e (0..7) of a lane, registers a0..a3 holding e = 2r, 2r + 1: rows g (+8 for
// a1, a3), columns 2t + (e & 1) (+8 for a2, a3).
SLAB_HD Pos mma_a_pos(int lane, int e) {
  const int r = e >> 1;
  return {(lane >> 2) + 8 * (r & 1), 2 * (lane & 3) + (e & 1) + 8 * (r >> 1)};
}
// B 16 x 8 (k x n): element e (0..3), b0 = e 0, 1, b1 = e 2, 3: k = 2t + (e & 1) (+8 for b1), n = g.
SLAB_HD Pos mma_b_pos(int lane, int e) { return {2 * (lane & 3) + (e & 1) + 8 * (e >> 1), lane >> 2}; }
// C/D 16 x 8: element e (0..3): row g (+8 for e 2, 3), column 2t + (e & 1).
SLAB_HD Pos mma_c_pos(int lane, int e) { return {(lane >> 2) + 8 * (e >> 1), 2 * (lane & 3) + (e & 1)}; }

// The accumulators of the n-tiles 2 kk and 2 kk + 1 of a 16 x 64 product are, element for element,
// the A fragment of its k-tile kk (the P -> A reuse of the intra-chunk term): A element e of the
// lane is C element cfrag_of_a(e).e of n-tile 2 kk + cfrag_of_a(e).tile.
struct CFrag {
  int tile, e;
};
SLAB_HD CFrag cfrag_of_a(int e) { return {e >> 2, e & 3}; }

// ---- ldmatrix.x4 addressing ------------------------------------------------------------------
// Lane l addresses row l % 8 of matrix l / 8; matrix j lands in the lane's register j. The four
// operand shapes the kernels load, as (row, col) of the shared tile where the lane's row starts,
// given the fragment origin (r0, c0) in the tile's own coordinates:
//   kA:  A (16 x 16) from a row-major [m][k] tile (phi(Q) rows): matrices (m0-7,k0-7), (m8-15,k0-7),
//        (m0-7,k8-15), (m8-15,k8-15) -> a0..a3; plain ldmatrix.
//   kAT: A from a [k][m] tile (phi(K)^T from K rows): the same four, read transposed (.trans).
//   kB:  two B n-tiles (k 16 x n 16) from an [n][k] tile (phi(K)^T as the B of phi(Q) phi(K)^T):
//        matrices (n0-7,k0-7), (n0-7,k8-15), (n8-15,k0-7), (n8-15,k8-15) -> b0, b1 of n-tile 0, then
//        of n-tile 1; plain.
//   kBT: the same two n-tiles from a [k][n] tile (V, S_prev); .trans.
enum class Ldsm { kA, kAT, kB, kBT };
SLAB_HD constexpr bool ldsm_trans(Ldsm kind) { return kind == Ldsm::kAT || kind == Ldsm::kBT; }
SLAB_HD Pos ldsm_row(Ldsm kind, int lane, int r0, int c0) {
  const int j = lane >> 3, r = lane & 7, lo = j & 1, hi = j >> 1;
  switch (kind) {
    case Ldsm::kA:
      return {r0 + r + 8 * lo, c0 + 8 * hi};  // tile rows m, cols k
    case Ldsm::kAT:
      return {r0 + r + 8 * hi, c0 + 8 * lo};  // tile rows k, cols m
    case Ldsm::kB:
      return {r0 + r + 8 * hi, c0 + 8 * lo};  // tile rows n, cols k
    default:
      return {r0 + r + 8 * lo, c0 + 8 * hi};  // kBT: tile rows k, cols n
  }
}

// ---- feature map on packed 16-bit pairs ------------------------------------------------------
// phi = ReLU on two bf16 / fp16 values in one register (as ldmatrix delivers them): a value with
// its sign bit set becomes +0 unless it is a NaN (magnitude bits above `inf_bits`, the infinity's:
// 0x7f80 bf16, 0x7c00 fp16), which passes unchanged, as phi(x) = x < 0 ? 0 : x does.
SLAB_HD uint32_t phi_pair(uint32_t w, uint32_t inf_bits) {
  uint32_t out = w;
  for (int s = 0; s < 32; s += 16) {
    const uint32_t h = (w >> s) & 0xffffu;
    if ((h & 0x8000u) != 0 && (h & 0x7fffu) <= inf_bits) out &= ~(0xffffu << s);
  }
  return out;
}

// ---- the output pass's schedule --------------------------------------------------------------
// Warp w's query rows are 16 w .. 16 w + 15 of the chunk. Causally it needs key tiles of 16 tokens
// kt <= w only (the diagonal tile kt == w masked by keep_causal), never the ones after.
SLAB_HD bool key_tile_needed(bool causal, int warp, int kt) { return !causal || kt <= warp; }
SLAB_HD bool keep_causal(int row, int key) { return key <= row; }  // chunk-local indices
// The backward's dk / dv: warp w's key rows 16 w .. meet query tiles qt >= w only.
SLAB_HD bool query_tile_needed(bool causal, int warp, int qt) { return !causal || qt >= warp; }

// fp16 S_prev enters the tensor cores as S_prev / scale: scale is the power of two (>= 1) that
// brings max |S_prev| below 2^14 (fp16's largest finite value is 65504); 1 for non-finite input,
// so NaN and infinity pass through.
SLAB_HD float state_scale(float max_abs) {
  float scale = 1.0f;
  while (max_abs / scale >= 16384.0f && scale < 0x1p120f) scale *= 2.0f;
  return max_abs == max_abs && max_abs <= 3.4e38f ? scale : 1.0f;
}

// ---- the state pass's schedule ---------------------------------------------------------------
// Work units (m-tile of 16 state rows, block of kStateCols state columns), dealt to the warps
// round-robin: unit u of units_of(D, Dv), warp u % kWarps.
struct StateUnit {
  int row0, col0;
};
SLAB_HD int state_col_blocks(int vdim) { return static_cast<int>(ceil_div(vdim, kStateCols)); }
SLAB_HD int state_units(int dim, int vdim) { return (dim / 16) * state_col_blocks(vdim); }
SLAB_HD StateUnit state_unit(int u, int vdim) {
  const int nb = state_col_blocks(vdim);
  return {16 * (u / nb), kStateCols * (u % nb)};
}

// ---- the scan over chunks --------------------------------------------------------------------
// One state element over the chunk slots (stride apart): with `prefix`, slot c becomes the sum of
// the slots before it (S_prev of chunk c); returns the sum of all slots. Fixed order: deterministic.
template <typename A>
SLAB_HD A scan_slots(A* slot, int64_t chunks, int64_t stride, bool prefix) {
  A run = 0;
  for (int64_t c = 0; c < chunks; ++c, slot += stride) {
    const A x = *slot;
    if (prefix) *slot = run;
    run += x;
  }
  return run;
}

}  // namespace slab::sla::chunk
