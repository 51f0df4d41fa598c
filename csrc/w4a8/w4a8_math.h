// W4A8 arithmetic shared by the CPU and CUDA kernels: the int4 and float8_e4m3fn codecs and the
// CUDA weight-tile layout. Everything here is exact bit manipulation (no rounding except the one
// documented RNE step of the e4m3 encoder), so CPU tests check the same codecs the GPU runs.
#pragma once
#include <cstdint>
#include <cstring>

#include "core/common.h"
#include "w4a8/w4a8.h"  // the tile constants

namespace slab::w4a8 {

// ---- bit casts ----------------------------------------------------------------------------------

SLAB_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

SLAB_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// ---- int4 ---------------------------------------------------------------------------------------

// The signed value of the two's-complement nibble `hi ? byte >> 4 : byte & 15`, in [-8, 7].
SLAB_HD int int4_value(uint8_t byte, bool hi) {
  const int u = hi ? (byte >> 4) : (byte & 15);
  return u - ((u & 8) << 1);
}

// int4 -> e4m3 bit tables, one byte per value, packed for byte_perm: kPos* hold e4m3(0..7),
// kNeg* hold e4m3(-8..-1) (indexed by the nibble's low three bits). Every int4 value is exactly
// representable in e4m3 (|v| <= 8 needs at most 3 mantissa bits), so the conversion never rounds.
constexpr uint32_t kE4m3Pos0 = 0x44403800u;  // 3, 2, 1, 0   (bytes high to low)
constexpr uint32_t kE4m3Pos1 = 0x4E4C4A48u;  // 7, 6, 5, 4
constexpr uint32_t kE4m3Neg0 = 0xCACCCED0u;  // -5, -6, -7, -8
constexpr uint32_t kE4m3Neg1 = 0xB8C0C4C8u;  // -1, -2, -3, -4

// CUDA __byte_perm(x, y, s) in its default mode: byte i of the result is byte (s >> 4i) & 7 of
// the 8-byte value y:x. Selector nibbles here never have bit 3 set (no sign-replication mode).
SLAB_HD uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t s) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(x, y, s);
#else
  const uint64_t v = (static_cast<uint64_t>(y) << 32) | x;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<uint32_t>((v >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return r;
#endif
}

// Four int4 nibbles (bits 0-15 of `nib`, nibble i = element i) -> four e4m3 bytes (byte i =
// element i): two table lookups (non-negative / negative half of the range, by the low three
// bits) and one byte select on each nibble's sign bit. Three byte permutes, no branches.
SLAB_HD uint32_t int4x4_to_e4m3x4(uint32_t nib) {
  const uint32_t idx = nib & 0x7777u;
  const uint32_t pos = byte_perm(kE4m3Pos0, kE4m3Pos1, idx);
  const uint32_t neg = byte_perm(kE4m3Neg0, kE4m3Neg1, idx);
  // nibble i of the selector: i (from pos) or i + 4 (from neg) when nibble i is negative.
  return byte_perm(pos, neg, 0x3210u | ((nib & 0x8888u) >> 1));
}

// ---- float8_e4m3fn ------------------------------------------------------------------------------
// 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities; S.1111.111 is NaN; largest finite
// 448 (0x7E); subnormals m * 2^-9.

constexpr float kE4m3Max = 448.0f;

SLAB_HD float e4m3_to_float(uint8_t b) {
  const uint32_t sign = static_cast<uint32_t>(b & 0x80) << 24;
  const uint32_t mag = b & 0x7F;
  if (mag == 0x7F) return bits_float(sign | 0x7FC00000u);  // NaN
  if (mag < 8) {                                           // subnormal (or zero): m * 2^-9, exact in float
    return bits_float(sign | float_bits(static_cast<float>(mag) * 0.001953125f));
  }
  // normal: exponent e4 - 7 + 127 = e4 + 120, mantissa bits shifted to the top of the fp32 field
  return bits_float(sign | ((mag + (120u << 3)) << 20));
}

// |e4m3 value| * 512 (a multiple of 2^-9, the smallest subnormal) as an exact integer below 2^18;
// the code must not be NaN. Subnormals m * 2^-9 -> m; normals (8 + m) * 2^(e - 7 - 3) -> (8 + m) << (e - 1).
SLAB_HD uint32_t e4m3_magnitude_units(uint8_t b) {
  const uint32_t mag = b & 0x7F;
  return mag < 8 ? mag : (8u + (mag & 7u)) << ((mag >> 3) - 1u);
}

// The shift of e4m3_magnitude_units(b): its significant bits sit at bits shift .. shift + 3
// (0 for subnormals and the first binade, up to 14).
SLAB_HD int e4m3_units_shift(uint8_t b) {
  const int mag = b & 0x7F;
  return mag < 8 ? 0 : (mag >> 3) - 1;
}

// fp32 -> e4m3 with round-to-nearest-even, the way torch's `.to(torch.float8_e4m3fn)` does it:
// NaN -> NaN (0x7F with the sign), |f| at or beyond the rounding boundary of 448 (and +-inf)
// saturate to +-448, values below the normal range round to the nearest subnormal.
SLAB_HD uint8_t float_to_e4m3(float f) {
  const uint32_t u = float_bits(f);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return sign | 0x7F;
  if (a >= 0x43E80000u) return sign | 0x7E;  // >= 464 rounds to 448 (ties to even) or above: saturate
  if (a < 0x3C800000u) {                     // below 2^-6: subnormal grid of 2^-9
    // |f| * 2^9 is exact; adding then subtracting 2^23 rounds it to an integer, ties to even, in
    // fp32 arithmetic (default rounding mode) on both host and device.
    const float scaled = bits_float(a) * 512.0f;
    const float rounded = (scaled + 8388608.0f) - 8388608.0f;
    return sign | static_cast<uint8_t>(rounded);
  }
  // normal: keep 3 mantissa bits, ties to even (a carry may move into the exponent, which is the
  // correctly rounded result); then rebias the exponent from 127 to 7.
  const uint32_t r = a + 0x7FFFFu + ((a >> 20) & 1u);
  return sign | static_cast<uint8_t>((r >> 20) - (120u << 3));
}

// Per-row activation scale: absmax / 448, or 1 for an all-zero row (so q = 0 and dequantizing
// gives back the zeros). A row so small that absmax / 448 is below the smallest normal float
// (absmax < ~5.3e-36) gets that smallest normal instead: absmax / 448 would lose its precision
// as a subnormal and, below ~6e-43, underflow to 0 (x / 0: a NaN row); with the clamp every code
// stays within +-448. NaN absmax stays NaN (the whole row becomes NaN).
constexpr float kMinFp8Scale = 1.17549435e-38f;  // FLT_MIN
SLAB_HD float fp8_row_scale(float absmax) {
  if (absmax == 0.0f) return 1.0f;
  const float s = absmax / kE4m3Max;
  return s < kMinFp8Scale ? kMinFp8Scale : s;
}

// Running absmax that keeps a NaN once seen.
SLAB_HD float absmax_update(float m, float v) {
  const float a = v < 0 ? -v : v;
  return (a > m || a != a) ? a : m;
}

// ---- the CUDA weight tile (Layout::kTiled) ------------------------------------------------------
// Tile = 16 rows x 64 columns, 512 bytes; lane l of a warp owns bytes [16 l, 16 l + 16). With
// g = l / 4, t = l % 4, nibble q (0..31) of the lane's 16 bytes (byte q / 2, low nibble first)
// is element (row, col) of the tile with
//   word w = q / 8, half h = (q / 4) % 2, j = q % 4, step s = w / 2, part p = w % 2
//   row = g + 8 h,  col = 32 s + 16 p + 4 t + j
// i.e. 16-bit half h of word (s, p) is the m16n8k32 A-fragment register a(2p + h) of k32-step s:
// four consecutive columns of one row, the order the mma wants them (a0: row g, cols 4t..4t+3;
// a1: row g + 8; a2/a3: cols + 16). For sm_80's f16 m16n8k16 the same word feeds two mmas
// (columns 4t, 4t+1 and 4t+2, 4t+3 as the lane's k pairs), with x loaded at the same columns.
struct TilePos {
  int row, col;
};

SLAB_HD TilePos tile_position(int lane, int q) {
  const int g = lane >> 2, t = lane & 3;
  const int w = q >> 3, h = (q >> 2) & 1, j = q & 3;
  return {g + 8 * h, 32 * (w >> 1) + 16 * (w & 1) + 4 * t + j};
}

// Byte i of the tiled layout of row-major packed weights src (n, k / 2): tile i / kTileBytes
// (row-major over (ceil(n / 16), ceil(k / 64)) tiles), lane (i % kTileBytes) / 16, byte i % 16;
// its two nibbles come from the (row, col) tile_position gives, zero outside the matrix.
SLAB_HD uint8_t tiled_byte(const uint8_t* src, int64_t n, int64_t k, int64_t i) {
  const int64_t tile = i / kTileBytes, kt_count = ceil_div(k, kTileCols);
  const int64_t row0 = tile / kt_count * kTileRows, col0 = tile % kt_count * kTileCols;
  const int lane = static_cast<int>(i % kTileBytes) / 16, byte = static_cast<int>(i % 16);
  uint8_t v = 0;
  for (int half = 0; half < 2; ++half) {
    const TilePos pos = tile_position(lane, 2 * byte + half);
    const int64_t r = row0 + pos.row, c = col0 + pos.col;
    const int nib = (r < n && c < k) ? (src[r * (k / 2) + c / 2] >> (4 * (c & 1))) & 15 : 0;
    v |= static_cast<uint8_t>(nib << (4 * half));
  }
  return v;
}

// ---- the Hopper layout (Layout::kSm90) ----------------------------------------------------------
// The kTiled tiles, reordered into 128 x 128 blocks (w4a8.h): block (rb, kb) row-major over
// (rows / 128, k_pad / 128), tile (row tile w in 0..7, column tile h in 0..1) of the block at 2 w + h.

// Byte offset in the kPanel layout (w4a8.h) of byte `byte` of row `row` of row-major packed
// weights with k columns: the panel-major order the CPU kernels read and unpanel() undoes.
SLAB_HD int64_t panel_offset(int64_t row, int64_t byte, int64_t k) {
  return ((row / kPanelRows) * ceil_div(k, kPanelCols) + byte / 4) * 64 + (row % kPanelRows) * 4 + byte % 4;
}

SLAB_HD int64_t sm90_packed_rows(int64_t n) { return round_up(n, kSm90BlockRows); }
SLAB_HD int64_t sm90_packed_row_bytes(int64_t k) { return round_up(k, kSm90BlockCols) / 2; }

// Byte offset of the 16 x 64 tile (row tile nt, column tile kt) in either tile layout; the decode
// kernel reads both through it.
SLAB_HD int64_t tiled_tile_offset(int64_t nt, int64_t kt, int64_t k) {
  return (nt * ceil_div(k, kTileCols) + kt) * kTileBytes;
}
SLAB_HD int64_t sm90_tile_offset(int64_t nt, int64_t kt, int64_t k) {
  const int64_t rows_per_block = kSm90BlockRows / kTileRows, cols_per_block = kSm90BlockCols / kTileCols;
  const int64_t block = (nt / rows_per_block) * ceil_div(k, kSm90BlockCols) + kt / cols_per_block;
  return block * kSm90BlockBytes + ((nt % rows_per_block) * cols_per_block + kt % cols_per_block) * kTileBytes;
}
SLAB_HD int64_t layout_tile_offset(int layout, int64_t nt, int64_t kt, int64_t k) {
  return layout == kSm90 ? sm90_tile_offset(nt, kt, k) : tiled_tile_offset(nt, kt, k);
}

// Byte `byte` (0..15) of lane `lane`'s chunk of the tile whose element (0, 0) is (row0, col0) of
// row-major packed weights src (n, k / 2): the nibbles tile_position names, zero outside the matrix.
SLAB_HD uint8_t tile_chunk_byte(const uint8_t* src, int64_t n, int64_t k, int64_t row0, int64_t col0, int lane,
                                int byte) {
  uint8_t v = 0;
  for (int half = 0; half < 2; ++half) {
    const TilePos pos = tile_position(lane, 2 * byte + half);
    const int64_t r = row0 + pos.row, c = col0 + pos.col;
    const int nib = (r < n && c < k) ? (src[r * (k / 2) + c / 2] >> (4 * (c & 1))) & 15 : 0;
    v |= static_cast<uint8_t>(nib << (4 * half));
  }
  return v;
}

// Byte i of the kSm90 layout of row-major packed weights src (n, k / 2).
SLAB_HD uint8_t sm90_byte(const uint8_t* src, int64_t n, int64_t k, int64_t i) {
  const int64_t block = i / kSm90BlockBytes, kb_count = ceil_div(k, kSm90BlockCols);
  const int tile = static_cast<int>(i % kSm90BlockBytes / kTileBytes);
  const int64_t row0 = block / kb_count * kSm90BlockRows + (tile / 2) * kTileRows;
  const int64_t col0 = block % kb_count * kSm90BlockCols + (tile % 2) * kTileCols;
  return tile_chunk_byte(src, n, k, row0, col0, static_cast<int>(i % kTileBytes) / 16, static_cast<int>(i % 16));
}

// ---- wgmma m64nNk32 (e4m3 x e4m3 -> f32) fragments ------------------------------------------------
// Register A (8-bit types, PTX ISA "wgmma .m64nNk32 register fragments"): thread `tid` (0..127) of
// the warpgroup, register r (0..3), byte j (0..3) holds A[row][col] of the 64 x 32 A tile. This is
// mma.m16n8k32's A fragment, shifted by 16 rows per warp: so register r of k32 step s of a warp's
// kTiled tile is int4x4_to_e4m3x4 of 16-bit half (r & 1) of chunk word 2 s + (r >> 1).
SLAB_HD TilePos wgmma_a_position(int tid, int r, int j) {
  const int warp = tid >> 5, lane = tid & 31;
  return {16 * warp + (lane >> 2) + 8 * (r & 1), 16 * (r >> 1) + 4 * (lane & 3) + j};
}
// Accumulator D (f32): thread tid, register i (0..N/2-1) holds D[row][col] of the 64 x N tile.
SLAB_HD TilePos wgmma_d_position(int tid, int i) {
  const int warp = tid >> 5, lane = tid & 31;
  return {16 * warp + (lane >> 2) + 8 * ((i >> 1) & 1), 8 * (i >> 2) + 2 * (lane & 3) + (i & 1)};
}
// The e4m3 A register r of k32 step s (0..1) from the lane's 16-byte tile chunk (four words): the
// same for wgmma (per warp) and mma.m16n8k32.
SLAB_HD uint32_t a_fragment_register(const uint32_t (&chunk)[4], int s, int r) {
  return int4x4_to_e4m3x4((chunk[2 * s + (r >> 1)] >> (16 * (r & 1))) & 0xFFFFu);
}

// Operand B (the activations, tokens x k, K-major) in shared memory, 128-byte swizzle: one stage
// holds `tokens` rows of 128 bytes (the stage's 128 columns); 16-byte chunk c of row r lies at
// r * 128 + 16 (c ^ (r % 8)) from the stage base (1024-byte aligned), i.e. 8-row x 128-byte swizzle
// atoms of 1024 bytes, the XOR the hardware applies to address bits [4, 7) with bits [7, 10).
constexpr int kSm90SwizzleRow = 128;
constexpr int kSm90SwizzleAtom = 1024;
SLAB_HD int sm90_x_smem_offset(int row, int chunk) { return row * kSm90SwizzleRow + 16 * (chunk ^ (row & 7)); }
// The wgmma matrix descriptor of k32 step s (0..3) of a stage at shared address `stage_addr`
// (1024-aligned): start address (bits 0-13, in 16-byte units) advanced by the step's 32 bytes
// inside the swizzle row, leading byte offset (bits 16-29) unused for a swizzled K-major operand
// (set to 1), stride byte offset (bits 32-45) = one 8-row atom, base offset (bits 49-51) 0, layout
// type (bits 62-63) 1 = 128-byte swizzle.
SLAB_HD uint64_t sm90_b_descriptor(uint32_t stage_addr, int s) {
  const uint64_t start = ((stage_addr + 32u * static_cast<uint32_t>(s)) & 0x3FFFFu) >> 4;
  return start | (uint64_t{1} << 16) | (static_cast<uint64_t>(kSm90SwizzleAtom >> 4) << 32) | (uint64_t{1} << 62);
}

// The 128-column blocks [begin, end) of k split z of the sm_90a GEMM when splits hold
// `tiles_per_split` 64-column tiles: each block goes to the split holding its first tile, so any
// split plan (an odd one too, e.g. the kTiled kernel's) covers every block exactly once; a split
// may then be empty (it writes zero partial sums).
struct BlockRange {
  int64_t begin, end;
};
SLAB_HD BlockRange sm90_split_blocks(int64_t z, int64_t tiles_per_split, int64_t k) {
  const int64_t k_tiles = ceil_div(k, kTileCols);
  const int64_t t0 = z * tiles_per_split, t1 = t0 + tiles_per_split < k_tiles ? t0 + tiles_per_split : k_tiles;
  const int64_t begin = ceil_div(t0, 2), end = ceil_div(t1, 2);
  return {begin, end > begin ? end : begin};
}

// The epilogue's output tile (NT tokens x 128 weight rows, fp32) in shared memory, staged so that
// a warp then stores 32 consecutive outputs of one token row: row m at m * kSm90OutRow floats (4 of
// padding: the D fragment writes of a warp, 8 rows x 4 token pairs, hit 32 distinct banks).
constexpr int kSm90OutRow = 128 + 4;
SLAB_HD int sm90_out_smem_offset(int m, int n) { return m * kSm90OutRow + n; }

// ---- schedules shared by the CUDA GEMMs --------------------------------------------------------
// k32 steps (32 columns) are the unit of a group: group sizes are multiples of 32 or the whole row.
// After step `st` (columns [32 st, 32 st + 32)) of a split ending at step `st_end` (exclusive), the
// group sums are scaled into the fp32 total if a group ends there, the split does, or kFoldSteps
// steps (128 columns) have gone by: the tensor cores' own FP8 accumulation keeps fewer bits than
// fp32, so no sum runs longer than 128 columns inside them (whole-row groups included), as the
// FP8 GEMMs of DeepSeek-V3 do. `group_index` is the scale's group (the last real column's), or -1
// when the step lies wholly past k (nothing to add).
constexpr int64_t kFoldSteps = 4;
struct Fold {
  bool fold;
  int64_t group_index;
};
SLAB_HD Fold fold_after_step(int64_t st, int64_t st_end, int64_t group, int64_t k) {
  const int64_t k_end = 32 * (st + 1);
  const bool fold = k_end % group == 0 || st + 1 == st_end || (st + 1) % kFoldSteps == 0;
  return {fold, fold && k_end - 32 < k ? ((k_end < k ? k_end : k) - 1) / group : -1};
}

// The decode kernel (M <= kDecodeMaxRows): CTAs of kDecodeWarps warps, one 16-row weight tile
// each; a kDecodeStages-deep cp.async ring of kDecodeTiles 64-column tiles per warp and stage
// (1 KB of weights); the stage's activation columns for up to 16 tokens staged once per CTA in
// rows of kDecodeXRow bytes (128 + 16: the fragment reads of the 8 row groups hit 32 distinct banks).
constexpr int kDecodeWarps = 4;
constexpr int kDecodeStages = 4;
constexpr int kDecodeTiles = 2;
constexpr int kDecodeXRow = kDecodeTiles * 64 + 16;
// Shared-memory offset of chunk byte `byte` of weight tile h of warp `warp`'s stage (what lane
// `lane` copies and later reads: its own 16 bytes), and of activation byte col (0..127) of token row.
SLAB_HD int decode_w_smem_offset(int warp, int h, int lane) { return (kDecodeTiles * warp + h) * 512 + 16 * lane; }
SLAB_HD int decode_x_smem_offset(int row, int col) { return row * kDecodeXRow + col; }

// Split of `units` k units (64-column tiles, or 128-column blocks) over `ctas` CTAs of a grid
// that fits `wave` CTAs at once: as many splits as fit in one wave next to the others (at least
// one, at most one unit each), then rebalanced so that none is empty.
struct SplitPlan {
  int64_t splits, per;
};
SLAB_HD SplitPlan split_to_fill(int64_t ctas, int64_t units, int64_t wave) {
  if (units < 1 || ctas < 1) return {1, units > 1 ? units : 1};
  int64_t splits = ctas >= wave ? 1 : wave / ctas;
  splits = splits < units ? splits : units;
  if (splits < 1) splits = 1;
  const int64_t per = ceil_div(units, splits);
  return {ceil_div(units, per), per};
}

}  // namespace slab::w4a8
