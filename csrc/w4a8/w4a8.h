// W4A8 kernels (docs/w4a8.md): int4 weights x float8_e4m3fn activations. Parameter structs and
// launchers; no torch headers. The binding layer (w4a8_ops.cpp) checks inputs, allocates outputs
// and workspaces and fills these.
//
//   quantize_fp8:  q[r, :] = e4m3(x[r, :] / s[r]),  s[r] = absmax(x[r, :]) / 448 (1 for a zero row)
//   gemm:          y[m, n] = x_scale[m] * sum_g w_scale[n, g] * sum_{k in g} fp8(x)[m, k] * int4(w)[n, k]
//                  (+ bias[n]), fp32 accumulation; with `x` set instead of `x_fp8` the activations
//                  are quantized per row in the prologue first (w4a8_linear).
//
// Weight layouts (`layout`):
//   kRowMajor  packed (N, K/2) uint8, byte [n, k/2] = int4(w[n, k]) | int4(w[n, k+1]) << 4 for even
//              k (two's-complement nibbles, low nibble = even column). The CPU kernels read this
//              layout as it is (rows are streamed in order); it is also the quantize_w4 output.
//   kTiled     the CUDA layout: rows padded to a multiple of 16 and columns to a multiple of 64;
//              tile (nt, kt) of 16 rows x 64 columns is 512 contiguous bytes, 16 per lane of a
//              warp, holding exactly the nibbles of that lane's mma A fragments for two k32 steps
//              (see tile_position() and tiled_byte() in w4a8_math.h), so every lane issues one 16-byte load per tile
//              and converts its nibbles to e4m3 in registers without shuffles.
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/common.h"

struct CUstream_st;

namespace slab::w4a8 {

enum Layout : int { kRowMajor = 0, kTiled = 1 };

constexpr int64_t kTileRows = 16;  // kTiled: rows of one tile (mma M of the weight operand)
constexpr int64_t kTileCols = 64;  // kTiled: columns of one tile (two mma k32 steps)
constexpr int64_t kTileBytes = kTileRows * kTileCols / 2;

struct QuantFp8Params {
  DType dtype;
  int64_t rows, cols;  // x contiguous (rows, cols)
  const void* x;
  uint8_t* q;  // (rows, q_stride) float8_e4m3fn bits; columns past cols are not written
  int64_t q_stride;
  float* scale;  // (rows)
};

struct GemmParams {
  int64_t m, n, k;  // x (m, k), w (n, k), y (m, n)
  int64_t group;    // columns per weight scale (k for one scale per row)
  int layout;       // Layout
  // Activations: either x_fp8 + x_scale (w4a8_gemm) or x (w4a8_linear, quantized in the prologue).
  const uint8_t* x_fp8;  // (m, x_stride) e4m3 bits
  int64_t x_stride;      // bytes between rows of x_fp8
  const float* x_scale;  // (m)
  const void* x;         // (m, k) contiguous, x_dtype; nullptr for w4a8_gemm
  DType x_dtype;
  const uint8_t* w;       // packed weights in `layout`
  const float* w_scales;  // (n, k / group)
  const float* bias;      // (n) or nullptr
  void* y;                // (m, n) contiguous, out_dtype
  DType out_dtype;
  // CUDA: the split-K plan (plan_gemm_cuda), made once by the binding for both the workspace size and
  // the launch, and the partial sums of splits > 1 (splits * m * n floats).
  int splits, tiles_per_split;
  float* workspace;
};

// How gemm_cuda splits the k range (on the current device), or the CUDA error of the occupancy query.
struct GemmPlan {
  int splits, tiles_per_split;
  int cuda_error;  // cudaError_t; 0 = success
};

// The in-register int4 -> e4m3 conversion of the CUDA GEMM (int4x4_to_e4m3x4), exposed for tests:
// `words` 16-bit groups of four nibbles -> four e4m3 bytes each.
void int4_to_e4m3_cpu(const uint16_t* in, int64_t words, uint32_t* out);
void int4_to_e4m3_cuda(const uint16_t* in, int64_t words, uint32_t* out, CUstream_st* stream);

void quantize_fp8_cpu(const QuantFp8Params& p);
void gemm_cpu(const GemmParams& p);
// Reorders row-major packed weights (n, k/2) into the kTiled layout (n_pad, k_pad/2), zero padded.
void tile_weights_cpu(const uint8_t* src, int64_t n, int64_t k, uint8_t* dst);

void quantize_fp8_cuda(const QuantFp8Params& p, CUstream_st* stream);
void gemm_cuda(const GemmParams& p, CUstream_st* stream);
void tile_weights_cuda(const uint8_t* src, int64_t n, int64_t k, uint8_t* dst, CUstream_st* stream);
GemmPlan plan_gemm_cuda(int64_t m, int64_t n, int64_t k);
// Rows of x one CUDA GEMM launch takes: tiles of up to 64 tokens over gridDim.y (at most 65535).
constexpr int64_t kMaxCudaRows = 65535 * 64;

}  // namespace slab::w4a8
