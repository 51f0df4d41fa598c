// CATS kernels (contextual activation sparsity): parameter structs and launchers. No torch
// headers; the binding layer (cats_ops.cpp) checks inputs, allocates outputs and fills these.
//
//   cats:      y = silu(x) where |silu(x)| > threshold, else 0 (elementwise, any shape)
//   cats_backward:  dx = dy * silu'(x) where kept, else 0
//   cats_mlp:  y[m] = W_down (cats(W_gate x[m]) * (W_up x[m])) for M <= kMaxTokens decode tokens,
//              reading the W_up row and the W_down column (a row of w_down_t) of a neuron only
//              when some token keeps it (the union of the tokens' masks).
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/common.h"
#include "core/vec.h"

struct CUstream_st;

namespace slab::cats {

// Largest number of tokens cats_mlp takes: the CUDA kernels keep one accumulator per token in
// registers; beyond a few tokens a decode step is no longer memory bound and the dense GEMM wins.
constexpr int64_t kMaxTokens = 16;

struct CatsParams {
  DType dtype;
  int64_t n;  // elements of x (contiguous)
  const void* x;
  void* y;
  double threshold;
};

struct CatsBwdParams {
  DType dtype;
  int64_t n;
  const void* dy;
  const void* x;
  void* dx;
  double threshold;
};

// All matrices contiguous, row-major, one dtype. act/keep are scratch the caller allocates:
// act [features, tokens] in the accumulation type (cats(gate) * up of kept neurons; the CPU writes
// 0 for dropped ones, CUDA leaves them unwritten), keep [features] bytes (1 = some token keeps the
// neuron); CUDA also needs partial (mlp_workspace_elems(...) accumulation-type values) and kept.
struct MlpParams {
  DType dtype;
  int64_t tokens, dim, features;  // M, D, F
  const void* x;                  // [M, D]
  const void* w_gate;             // [F, D]
  const void* w_up;               // [F, D]
  const void* w_down_t;           // [F, D]: W_down transposed
  void* y;                        // [M, D]
  void* act;                      // [F, M]
  uint8_t* keep;                  // [F]
  void* partial;                  // CUDA only: split-F partial sums of the down projection
  int32_t* kept;                  // CUDA only: [features + 1]: the kept neurons ascending, then their count
  double threshold;
};

// Token sparsity (LeMo). Per sequence b, keep the `keep` highest-scoring of `tokens` tokens in
// their original order: token i is kept when score > kth[b], or score == kth[b] and fewer than
// keep - n_greater[b] earlier tokens tied (kth = the keep-th largest score, n_greater = number of
// scores above it; both computed by the binding). Writes index [batch, keep], ascending.
struct TokenIndexParams {
  DType dtype;  // of scores
  int64_t batch, tokens, keep;
  const void* scores;        // [batch, tokens], NaN already mapped to -inf
  const void* kth;           // [batch], accumulation type
  const int64_t* n_greater;  // [batch]
  int64_t* index;            // [batch, keep]
};

// Row moves between a full (batch, tokens, channels) tensor and its kept rows (batch, keep,
// channels): gather dst[b, j] = src[b, index[b, j]]; scatter dst[b, index[b, j]] = src[b, j].
// Rows are moved as raw bytes; an index outside [0, tokens) moves nothing.
// Rows of row_bytes bytes moved between the full (batch, tokens) layout and the kept (batch, keep)
// layout: gather copies full row index[i] to kept row i, scatter the other way. Copied in words of
// word_bytes (core/common.h copy_word_bytes of the row size and both base pointers).
struct TokenRowsParams {
  int64_t batch, tokens, keep, row_bytes;
  int word_bytes;
  const int64_t* index;
  const void* src;
  void* dst;
  bool gather;
};

// ---- the CUDA decode schedule of mlp (host-callable: tests/host/cats_mlp_schedule.cpp runs it) ----
//
// Kernels are compiled per token bucket MB (1, 2, 4, 8, 16; the token count pads up to its bucket)
// and per width W: kPackWidth<T> (16-byte loads) when mlp_vectorized(), else 1. A row of `dim`
// elements is dim / W items (packs) of W elements.
//   gate/up: kGateWarps warps per block; warp w of block b owns the gate_rows_per_warp(MB)
//     consecutive neurons from gate_first_row(b, w, MB); lane l reads items l, l + 32, ... of each,
//     kGateUnroll items of every row per step. The up rows are read only for neurons some token keeps.
//   compaction: block c of kCompactRows neurons counts the kept neurons before its first one and
//     scans its own flags: kept[before + rank] = f, so kept[] is ascending; kept[features] = count.
//   down: blocks (tile, split). Tile t: columns down_column(t, lane, W) (one item per lane); split
//     s: positions down_range(count, splits, s) of kept[], staged kDownChunk at a time; warp w takes
//     the chunk's positions w, w + kDownWarps, ... (down_unroll(MB) rows per step). The warps' sums
//     are added in warp order, the splits' in split order: the result does not depend on timing.
constexpr int kGateWarps = 8;
constexpr int kGateUnroll = 2;
constexpr int kCompactRows = 256;
constexpr int kDownWarps = 8;
constexpr int kDownChunk = 128;
constexpr int64_t kDownTargetBlocks = 1024;  // enough blocks to fill any current GPU, no more
constexpr int64_t kDownMinRows = 64;         // fewest neurons (of features) per split
// Splits are capped so that the partial sums (written and read once: 2 * splits * tokens * dim
// accumulation-type values) move at most 1/8 of the bytes of a dense w_down_t pass.
constexpr int64_t kPartialShare = 16;

SLAB_HD constexpr int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
SLAB_HD constexpr int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

SLAB_HD constexpr int token_bucket(int64_t tokens) {
  return tokens <= 1 ? 1 : tokens <= 2 ? 2 : tokens <= 4 ? 4 : tokens <= 8 ? 8 : 16;
}
// More rows per warp share each x load between more weight loads in flight; 16 tokens keep 2
// rows from 8 tokens on, so that rows * tokens accumulators stay in registers at 2 blocks per SM.
SLAB_HD constexpr int gate_rows_per_warp(int mb) { return mb <= 4 ? 4 : 2; }
SLAB_HD constexpr int64_t gate_rows_per_block(int mb) { return int64_t{kGateWarps} * gate_rows_per_warp(mb); }
SLAB_HD constexpr int64_t gate_blocks(int64_t features, int mb) { return ceil_div(features, gate_rows_per_block(mb)); }
SLAB_HD constexpr int64_t gate_first_row(int64_t block, int warp, int mb) {
  return (block * kGateWarps + warp) * gate_rows_per_warp(mb);
}
// Rows of w_down_t in flight per warp: tokens * W accumulators per lane leave room for 2 at 16 tokens.
SLAB_HD constexpr int down_unroll(int mb) { return mb >= 16 ? 2 : 4; }

SLAB_HD constexpr int64_t compact_blocks(int64_t features) { return ceil_div(features, kCompactRows); }

SLAB_HD constexpr int64_t down_tiles(int64_t dim, int width) { return ceil_div(dim, int64_t{32} * width); }
SLAB_HD constexpr int64_t down_column(int64_t tile, int lane, int width) { return (tile * 32 + lane) * width; }

// Splits of the down projection (the same for both widths, so the workspace size needs no pointers).
SLAB_HD constexpr int down_splits(int64_t tokens, int64_t dim, int64_t features, int elem_bytes) {
  const int64_t acc_bytes = elem_bytes == 8 ? 8 : 4;
  const int64_t by_blocks = ceil_div(kDownTargetBlocks, down_tiles(dim, kVecBytes / elem_bytes));
  const int64_t by_rows = ceil_div(features, kDownMinRows);
  const int64_t by_traffic = features * elem_bytes / (kPartialShare * tokens * acc_bytes);
  return static_cast<int>(max64(1, min64(by_blocks, min64(by_rows, by_traffic))));
}
// Accumulation-type elements of MlpParams::partial.
SLAB_HD constexpr int64_t mlp_workspace_elems(int64_t tokens, int64_t dim, int64_t features, int elem_bytes) {
  return down_splits(tokens, dim, features, elem_bytes) * tokens * dim;
}

// Positions [begin, end) of kept[] that split s of `splits` sums (even shares of `count`).
struct Range {
  int64_t begin, end;
};
SLAB_HD constexpr Range down_range(int64_t count, int splits, int split) {
  const int64_t per = ceil_div(count, splits), begin = min64(count, split * per);
  return Range{begin, min64(count, begin + per)};
}

// The 16-byte path: every row starts aligned (dim * elem_bytes a multiple of 16, so rows are whole
// packs) and so do all four bases; a misaligned view or an odd dim takes W = 1.
SLAB_HD bool mlp_vectorized(const MlpParams& p, int elem_bytes) {
  return rows_vec_aligned(p.dim, elem_bytes) && all_vec_aligned(p.x, p.w_gate, p.w_up, p.w_down_t);
}

void cats_cpu(const CatsParams& p);
void cats_backward_cpu(const CatsBwdParams& p);
void mlp_cpu(const MlpParams& p);
void token_index_cpu(const TokenIndexParams& p);
void token_rows_cpu(const TokenRowsParams& p);

void cats_cuda(const CatsParams& p, CUstream_st* stream);
void cats_backward_cuda(const CatsBwdParams& p, CUstream_st* stream);
void mlp_cuda(const MlpParams& p, CUstream_st* stream);
void token_index_cuda(const TokenIndexParams& p, CUstream_st* stream);
void token_rows_cuda(const TokenRowsParams& p, CUstream_st* stream);

}  // namespace slab::cats
