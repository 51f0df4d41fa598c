// CATS kernels (contextual activation sparsity): parameter structs and launchers. No torch
// headers; the binding layer (cats_ops.cpp) checks inputs, allocates outputs and fills these.
//
//   cats:      y = silu(x) where |silu(x)| > threshold, else 0 (elementwise, any shape)
//   cats_bwd:  dx = dy * silu'(x) where kept, else 0
//   cats_mlp:  y[m] = W_down (cats(W_gate x[m]) * (W_up x[m])) for M <= kMaxTokens decode tokens,
//              reading the W_up row and the W_down column (a row of w_down_t) of a neuron only
//              when some token keeps it (the union of the tokens' masks).
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/common.h"

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
// act [features, tokens] in the accumulation type (cats(gate) * up of kept neurons, 0 elsewhere),
// keep [features] bytes (1 = some token keeps the neuron); CUDA also needs partial
// (workspace_floats_cuda(...) accumulation-type values).
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
  double threshold;
};

// Token sparsity (LeMo). Per sequence b, keep the `keep` highest-scoring of `tokens` tokens in
// their original order: token i is kept when score > kth[b], or score == kth[b] and fewer than
// keep - n_greater[b] earlier tokens tied (kth = the keep-th largest score, n_greater = number of
// scores above it; both computed by the binding). Writes index [batch, keep], ascending.
struct TokenIndexParams {
  DType dtype;  // of scores
  int64_t batch, tokens, keep;
  const void* scores;          // [batch, tokens], NaN already mapped to -inf
  const void* kth;             // [batch], accumulation type
  const int64_t* n_greater;    // [batch]
  int64_t* index;              // [batch, keep]
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

void cats_cpu(const CatsParams& p);
void cats_bwd_cpu(const CatsBwdParams& p);
void mlp_cpu(const MlpParams& p);
void token_index_cpu(const TokenIndexParams& p);
void token_rows_cpu(const TokenRowsParams& p);

// Accumulation-type elements of MlpParams::partial the CUDA down projection needs.
int64_t workspace_elems_cuda(int64_t tokens, int64_t dim, int64_t features);
void cats_cuda(const CatsParams& p, CUstream_st* stream);
void cats_bwd_cuda(const CatsBwdParams& p, CUstream_st* stream);
void mlp_cuda(const MlpParams& p, CUstream_st* stream);
void token_index_cuda(const TokenIndexParams& p, CUstream_st* stream);
void token_rows_cuda(const TokenRowsParams& p, CUstream_st* stream);

}  // namespace slab::cats
