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
//   kSm90      the Hopper (sm_90a wgmma) layout: the same 512-byte 16 x 64 tiles as kTiled (a warp's
//              tile is also its slice of the wgmma m64nNk32 register A fragment: for 8-bit types
//              warp w of a warpgroup holds rows 16 w .. 16 w + 15 with the per-lane layout of
//              mma.m16n8k32's A), rows padded to a multiple of 128 and columns to a multiple of
//              128, the tiles ordered so that one 128-row x 128-column block (one CTA's k stage:
//              8 row tiles x 2 column tiles, 8 KB) is contiguous: block (rb, kb) row-major over
//              (n_pad / 128, k_pad / 128), inside it tile (row tile w, column tile h) at 2 w + h
//              (sm90_tile_offset() / sm90_byte() in w4a8_math.h). The stage is then one linear
//              8 KB copy (two 16-byte cp.async per thread of 256, each landing on the bytes that
//              thread's own fragments need), and the padding lets the kernel skip bounds checks.
//   kPanel     the CPU layout of the AVX-512 VNNI kernels: rows padded to a multiple of 16 and columns
//              to a multiple of 8 (zero codes), (n_pad, k_pad / 2) bytes; per panel of 16 rows, per
//              8 columns j, 64 contiguous bytes: the 4 kRowMajor bytes of columns 8 j .. 8 j + 7 of
//              each of the 16 rows in turn (byte [r, c] of kRowMajor at ((r / 16) * k_pad / 8 +
//              c / 4) * 64 + (r % 16) * 4 + c % 4). One 64-byte vector then holds 8 columns of 16
//              rows, a dword per row, so that vpdpbusd lanes are rows, and the weights stream in one
//              sequential pass.
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/common.h"

struct CUstream_st;

namespace slab::w4a8 {

enum Layout : int { kRowMajor = 0, kTiled = 1, kSm90 = 2, kPanel = 3 };

constexpr int64_t kTileRows = 16;  // kTiled: rows of one tile (mma M of the weight operand)
constexpr int64_t kTileCols = 64;  // kTiled: columns of one tile (two mma k32 steps)
constexpr int64_t kTileBytes = kTileRows * kTileCols / 2;
constexpr int64_t kSm90BlockRows = 128;  // kSm90: rows of one block (2 warpgroups x wgmma m64)
constexpr int64_t kSm90BlockCols = 128;  // kSm90: columns of one block (one stage: 4 wgmma k32 steps)
constexpr int64_t kSm90BlockBytes = kSm90BlockRows * kSm90BlockCols / 2;
constexpr int64_t kPanelRows = 16;  // kPanel: rows of one panel (the 16 dword lanes of a vector)
constexpr int64_t kPanelCols = 8;   // kPanel: columns of one dword per row

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
  // CUDA: take the first-draft mma.sync kernel for every M (kTiled weights only): the on-device
  // oracle the decode and sm90 kernels are compared with (the binding sets it for SLAB_W4A8_ORACLE=1).
  bool oracle;
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
// The plan of gemm_cuda for weights in `layout` (kTiled or kSm90): M <= kDecodeMaxRows takes the
// decode kernel for both layouts; larger M the tiled mma.sync kernel or the sm_90a wgmma kernel,
// whose split is counted in 64-column tiles too but always covers whole 128-column blocks.
// plan_gemm_cuda(m, n, k) is the kTiled plan.
GemmPlan plan_gemm_cuda(int64_t m, int64_t n, int64_t k, int layout, bool oracle = false);
// The sm_90a wgmma GEMM (w4a8_sm90_cuda.cu) for p.layout == kSm90 and M > kDecodeMaxRows; gemm_cuda
// calls it. Only on a compute capability 9.0 device with the sm_90a code compiled in.
void gemm_sm90_cuda(const GemmParams& p, CUstream_st* stream);
GemmPlan plan_sm90_cuda(int64_t m, int64_t n, int64_t k);  // its split (plan_gemm_cuda's kSm90 case)
// Whether gemm_cuda can read weights in `layout` on the current device: kTiled everywhere, kSm90
// only on compute capability 9.0 with the sm_90a kernel compiled in (probed once per device).
bool layout_supported_cuda(int layout);
// Reorders row-major packed weights (n, k/2) into the kSm90 layout (sm90_packed_rows(n),
// sm90_packed_row_bytes(k)), zero padded.
void tile_weights_sm90_cpu(const uint8_t* src, int64_t n, int64_t k, uint8_t* dst);
void tile_weights_sm90_cuda(const uint8_t* src, int64_t n, int64_t k, uint8_t* dst, CUstream_st* stream);
// Rows of x up to which gemm_cuda takes the decode (memory-bound GEMV) kernel.
constexpr int64_t kDecodeMaxRows = 16;
// Rows of x one CUDA GEMM launch takes: tiles of up to 64 tokens over gridDim.y (at most 65535).
constexpr int64_t kMaxCudaRows = 65535 * 64;

}  // namespace slab::w4a8
