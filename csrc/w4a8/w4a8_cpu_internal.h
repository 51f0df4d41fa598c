#pragma once
// What the CPU GEMM kernels share between their translation units: the activation prologue, the
// output epilogue, and the AVX-512 VNNI integer kernels (w4a8_vnni_cpu.cpp), which w4a8_cpu.cpp's
// gemm_cpu calls when this CPU has them.
#include <array>
#include <cstdint>
#include <vector>

#include "w4a8/w4a8.h"

namespace slab::w4a8::cpu {

// The e4m3 codes of x and their per-row scales: w4a8_gemm's inputs as given, or for w4a8_linear
// the rows quantized here with the same functions as quantize_fp8 (so linear == quantize_fp8 +
// gemm bit for bit).
struct Fp8Rows {
  std::vector<uint8_t> own;  // (m, k) when quantized here
  const uint8_t* codes;      // row r at codes + r * stride
  int64_t stride;
  std::vector<float> scale;  // (m)
};

Fp8Rows fp8_rows(const GemmParams& p);

// The integer kernels' split of an e4m3 value times 512 (an integer below 2^18,
// e4m3_magnitude_units) into three signed 6-bit planes: hi * 4096 + mid * 64 + lo, each carrying
// the value's sign.
constexpr int kPlanes = 3, kPlaneBits = 6;

// Per e4m3 code: its planes (byte i: plane i), 8 * its signed units (its share of the `8 * sum x`
// offset that unsigned weight nibbles int4 + 8 bring in) and whether it is a NaN.
struct CodePlanes {
  uint32_t planes;
  int32_t offset;
  bool nan;
};

const std::array<CodePlanes, 256>& plane_table();

// y[row, col] = x_scale[row] * acc (+ bias[col]) in the output dtype.
void store(const GemmParams& p, int64_t row, int64_t col, float acc, const std::vector<float>& x_scale);
// The same for `count` outputs y[row, col .. col + count) from acc[0 .. count) (one dispatch).
void store_row(const GemmParams& p, int64_t row, int64_t col, int64_t count, const float* acc,
               const std::vector<float>& x_scale);

// True when the AVX-512 VNNI kernels may run: the CPU and the OS support AVX-512 F/BW/VNNI and
// SLAB_CPU_ISA (read once) is not "avx2", which keeps every CPU kernel on AVX2 + FMA.
bool vnni_usable();

// y = the SPEC's w4a8_gemm for kRowMajor or kPanel weights on integer dot products (vpdpbusd; for
// more than one row of x AMX-INT8 tiles where the CPU has them and SLAB_CPU_ISA is not "avx512",
// with the same integers), exact per segment: false, with nothing written, where they do not apply
// (a NaN among x's codes, or a shape they do not take); the caller then runs the float kernels.
bool gemm_vnni(const GemmParams& p, const Fp8Rows& x);

}  // namespace slab::w4a8::cpu
