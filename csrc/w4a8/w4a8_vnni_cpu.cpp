// W4A8 CPU GEMM on AVX-512 VNNI integer dot products (row-major weights), for CPUs that have them
// (AVX-512 VNNI and VBMI: Zen 4 and later, Intel from Ice Lake on); w4a8_cpu.cpp's gemm_cpu calls gemm_vnni first and
// keeps its AVX2 float kernels for the rest. Only the functions marked SLAB_VNNI are compiled for
// AVX-512 (a target attribute, not a flag for the whole file), so nothing reachable on an AVX2-only
// CPU, inline library code included, holds an AVX-512 instruction.
//
// Arithmetic: exact integer dot products per segment (at most 512 columns of one group, which stay
// below 2^31 in int32), then one conversion to float and one FMA with the group scale; the result
// is the SPEC's formula with one rounding per segment. An e4m3 value times 512 is an integer (its
// "units", e4m3_magnitude_units) below 2^18, whose four significant bits sit at bits s .. s + 3.
//
//   gemv (one row of x): lanes are columns. The weights are the signed operand, x's magnitudes the
//     unsigned one, in two 8-bit planes over a 16-bit window of the units per 128-column block (see
//     "gemv" below); four weight rows share each block's plane vectors; per row and block one
//     64-byte load, two vpermb, two masked negations (x's signs), four vpdpbusd. The lines two row
//     groups ahead are prefetched.
//   blocked (more rows): lanes are weight rows. x's units in three signed 6-bit planes (hi * 4096 +
//     mid * 64 + lo), the weights as unsigned nibbles u = int4 + 8 (bits xor 8), so that sum u x =
//     sum int4 x + 8 sum x and the second term, independent of the weights, starts each segment's
//     accumulator negated (`offset`). Per block of 16 weight rows the packed bytes are transposed
//     once into a panel of [8-column group][16 rows] dwords; per token, plane and nibble half, each
//     8-column group is one vpdpbusd of a panel vector with a broadcast dword of the token's planes,
//     8 tokens at a time (24 accumulators); tokens in tiles of 64, whose planes stay in L2 while the
//     panels of every row block meet them.
//
// Planes per row of x, both paths: per 128-column block (one 64-byte vector of packed weights), per
// plane, the block's 64 even columns (the low nibbles) and then its 64 odd ones (high nibbles).

// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own _mm512_undefined_* idiom once
// inlined (GCC bug 105593); set before any include so that it covers those header lines too.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <vector>

#include "core/cpu_types.h"
#include "w4a8/w4a8_cpu_internal.h"
#include "w4a8/w4a8_math.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SLAB_VNNI_BUILD 1
#define SLAB_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi")))
#endif

namespace slab::w4a8::cpu {

#ifdef SLAB_VNNI_BUILD
namespace {

constexpr int64_t kBlockCols = 128;                    // columns per plane block: one 64-byte vector of packed weights
constexpr int64_t kBlockBytes = kPlanes * kBlockCols;  // plane bytes of one block
constexpr int64_t kSegMax = 512;                       // columns per int32 segment (see the top)
constexpr int kGemvRows = 4;                           // weight rows sharing the plane loads (gemv)
constexpr int64_t kGemvAhead = 2;                      // row groups the prefetches run ahead (gemv)
constexpr int64_t kGemvChunk = 32;                     // weight rows per parallel task (gemv)
constexpr int64_t kPanelRows = 16;                     // weight rows per panel (blocked): the lanes
constexpr int kTokens = 8;                             // tokens per panel pass (blocked)
constexpr int64_t kTokenTile = 64;                     // tokens whose planes stay in L2 (blocked)

// Columns per segment: whole groups of at most kSegMax columns, or for larger groups the largest
// divisor of the group that is a multiple of `unit` and at most kSegMax (one group per row: any).
int64_t segment_columns(int64_t k, int64_t group, int64_t unit) {
  if (group == k && k > kSegMax) return kSegMax;
  if (group <= kSegMax) return group;
  for (int64_t s = kSegMax / unit * unit; s > unit; s -= unit)
    if (group % s == 0) return s;
  return unit;
}

struct Planes {
  int64_t blocks, seg, segs;
  std::vector<int8_t> bytes;    // (m, blocks, kPlanes, 128): per plane the even columns, then the odd
  std::vector<int32_t> offset;  // (m, segs): -8 * the sum of x in units over the segment
  const int8_t* row(int64_t t) const { return bytes.data() + t * blocks * kBlockBytes; }
};

// The unsigned nibbles (int4 + 8) of 64 packed bytes: low nibbles, then high ones; vpternlogd
// 0x6A computes (a & b) ^ c.
SLAB_VNNI inline __m512i low_nibbles(__m512i w) {
  return _mm512_ternarylogic_epi32(w, _mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x08), 0x6A);
}
SLAB_VNNI inline __m512i high_nibbles(__m512i w) {
  return _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 4), _mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x08), 0x6A);
}

// The exact integer of a segment: hi * 4096 + mid * 64 + lo.
SLAB_VNNI inline __m512i combine_planes(const __m512i* acc) {
  return _mm512_add_epi32(_mm512_add_epi32(_mm512_slli_epi32(acc[2], 12), _mm512_slli_epi32(acc[1], 6)), acc[0]);
}

SLAB_VNNI inline __mmask64 byte_mask(int64_t bytes) {
  return bytes >= 64 ? ~__mmask64(0) : (__mmask64(1) << bytes) - 1;
}

// ---- gemv: one row of x, lanes are columns ------------------------------------------------------
// Here the weights are the signed operand and x's magnitudes the unsigned one, in two 8-bit planes
// over a 16-bit window of x's units per 128-column block: e4m3's four significant bits sit at bits
// s .. s + 3 of the units (s = 0 .. 14), so when every nonzero s in the block lies in [e, e + 12]
// (e = 0 .. 2, from the block's largest s) the units are exactly 2^e (lo + 256 hi) with lo, hi
// unsigned bytes, and the weights enter as int4 * 2^e (one vpermb through a 64-entry table per
// nibble half; at most -8 * 4 = -32, a signed byte). x's signs negate the weights' bytes under
// a mask. Four vpdpbusd per 128 weights, no offset; a block whose values span more (a value of at
// least 128 next to one below 1/16: rare) takes a third plane, bits 16 .. 17, with e = 0.

struct GemvBlock {
  uint64_t negative[2];  // columns with a negative x: even (low nibbles), odd (high nibbles)
  int32_t shift;         // e
  int32_t top;           // 1: the third plane is in use
};

struct GemvPlanes {
  int64_t blocks, seg, segs;
  std::vector<uint8_t> bytes;  // (blocks, kPlanes, 128): per plane the even columns, then the odd
  std::vector<GemvBlock> block;
};

// Per shift e and plane i, byte i of (the units of magnitude code c) >> e, for the 128 magnitude
// codes c that vpermi2b looks up.
using GemvPlaneTables = std::array<std::array<std::array<uint8_t, 128>, kPlanes>, 3>;
const GemvPlaneTables& gemv_plane_tables() {
  static const GemvPlaneTables tables = [] {
    GemvPlaneTables t{};
    for (int e = 0; e < 3; ++e)
      for (int i = 0; i < kPlanes; ++i)
        for (int c = 0; c < 128; ++c)
          t[e][i][c] = static_cast<uint8_t>((e4m3_magnitude_units(static_cast<uint8_t>(c)) >> e) >> (8 * i));
    return t;
  }();
  return tables;
}

// The <= 128 codes of one block (zeros past `cols`) as its even columns and its odd ones.
SLAB_VNNI inline void split_block(const uint8_t* codes, int64_t cols, __m512i* half) {
  static constexpr auto kOrder = [] {
    std::array<std::array<uint8_t, 64>, 2> order{};
    for (int j = 0; j < 64; ++j)
      order[0][j] = static_cast<uint8_t>(2 * j), order[1][j] = static_cast<uint8_t>(2 * j + 1);
    return order;
  }();
  const __mmask64 first = byte_mask(cols), second = cols > 64 ? byte_mask(cols - 64) : 0;
  const __m512i a = _mm512_maskz_loadu_epi8(first, codes), b = _mm512_maskz_loadu_epi8(second, codes + 64);
  for (int h = 0; h < 2; ++h) half[h] = _mm512_permutex2var_epi8(a, _mm512_loadu_si512(kOrder[h].data()), b);
}

// The smallest byte of v (the largest: 255 - min_byte(255 - v)).
SLAB_VNNI inline int min_byte(__m512i v) {
  v = _mm512_min_epu8(v, _mm512_shuffle_i64x2(v, v, 0x4E));
  v = _mm512_min_epu8(v, _mm512_shuffle_i64x2(v, v, 0xB1));
  alignas(16) uint8_t b[16];  // the 16 bytes of lane 0 now hold the minima over the four lanes
  _mm_store_si128(reinterpret_cast<__m128i*>(b), _mm512_castsi512_si128(v));
  return *std::min_element(b, b + 16);
}

// One block of the planes (see GemvPlanes) from its <= 128 codes: the even and the odd columns
// split by byte permutes, the units' bytes looked up per plane, signs and NaNs as byte masks.
// false when some code is a NaN.
SLAB_VNNI bool gemv_block(const uint8_t* codes, int64_t cols, GemvBlock& blk, uint8_t* out) {
  const __m512i low7 = _mm512_set1_epi8(0x7F);
  __m512i half[2], mag[2];
  __mmask64 nonzero[2];
  split_block(codes, cols, half);
  for (int h = 0; h < 2; ++h) {
    mag[h] = _mm512_and_si512(half[h], low7);
    nonzero[h] = _mm512_test_epi8_mask(half[h], low7);
    blk.negative[h] = _mm512_movepi8_mask(half[h]) & nonzero[h];
    if (_mm512_cmpeq_epi8_mask(mag[h], low7) != 0) return false;
  }
  // e4m3_units_shift grows with the magnitude code: the extremes come from the extreme codes.
  const __m512i largest = _mm512_max_epu8(mag[0], mag[1]);
  const __m512i none = _mm512_set1_epi8(static_cast<char>(0xFF));
  const __m512i smallest =
      _mm512_min_epu8(_mm512_mask_mov_epi8(none, nonzero[0], mag[0]), _mm512_mask_mov_epi8(none, nonzero[1], mag[1]));
  const int highest = e4m3_units_shift(static_cast<uint8_t>(255 - min_byte(_mm512_sub_epi8(none, largest))));
  const int low_code = min_byte(smallest);
  const int lowest = low_code == 0xFF ? 14 : e4m3_units_shift(static_cast<uint8_t>(low_code));
  const int e = std::clamp(highest - 12, 0, 2);
  blk.top = lowest < e ? 1 : 0;
  blk.shift = blk.top ? 0 : e;
  const auto& tables = gemv_plane_tables()[blk.shift];
  for (int i = 0; i < kPlanes; ++i) {
    const __m512i lo = _mm512_loadu_si512(tables[i].data()), hi = _mm512_loadu_si512(tables[i].data() + 64);
    for (int h = 0; h < 2; ++h)
      _mm512_storeu_si512(out + i * kBlockCols + h * 64, _mm512_permutex2var_epi8(lo, mag[h], hi));
  }
  return true;
}

// The planes of x's one row, blocks in parallel; false when some code is a NaN.
bool build_gemv_planes(const GemmParams& p, const Fp8Rows& x, int64_t seg, GemvPlanes& a) {
  a.blocks = ceil_div(p.k, kBlockCols);
  a.seg = seg;
  a.segs = ceil_div(p.k, seg);
  a.bytes.resize(static_cast<size_t>(a.blocks * kBlockBytes));
  a.block.assign(static_cast<size_t>(a.blocks), GemvBlock{});
  std::atomic<bool> nan{false};
  parallel_for(0, a.blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t k0 = b * kBlockCols;
      if (!gemv_block(x.codes + k0, std::min(kBlockCols, p.k - k0), a.block[b], a.bytes.data() + b * kBlockBytes))
        nan.store(true, std::memory_order_relaxed);
    }
  });
  return !nan.load();
}

// Per plane i, byte i of the three 6-bit planes of magnitude code c (plane_table's positive codes).
using PanelPlaneTables = std::array<std::array<uint8_t, 128>, kPlanes>;
const PanelPlaneTables& panel_plane_tables() {
  static const PanelPlaneTables tables = [] {
    PanelPlaneTables t{};
    for (int i = 0; i < kPlanes; ++i)
      for (int c = 0; c < 128; ++c) t[i][c] = static_cast<uint8_t>(plane_table()[c].planes >> (8 * i));
    return t;
  }();
  return tables;
}

// Row t of x's planes, per block as in the gemv, the magnitudes' planes looked up and negated
// where x is negative.
SLAB_VNNI void row_planes(const uint8_t* codes, int64_t k, int8_t* out) {
  const auto& planes = panel_plane_tables();
  for (int64_t b = 0; b < ceil_div(k, kBlockCols); ++b) {
    __m512i half[2];
    split_block(codes + b * kBlockCols, std::min(kBlockCols, k - b * kBlockCols), half);
    for (int i = 0; i < kPlanes; ++i) {
      const __m512i lo = _mm512_loadu_si512(planes[i].data()), hi = _mm512_loadu_si512(planes[i].data() + 64);
      for (int h = 0; h < 2; ++h) {
        const __m512i mag = _mm512_permutex2var_epi8(lo, half[h], hi);  // index bit 7 (the sign) unused
        const __m512i plane = _mm512_mask_sub_epi8(mag, _mm512_movepi8_mask(half[h]), _mm512_setzero_si512(), mag);
        _mm512_storeu_si512(out + b * kBlockBytes + i * kBlockCols + h * 64, plane);
      }
    }
  }
}

// x's planes and negated offsets, a row of x per task; false when some code is a NaN.
bool build_planes(const GemmParams& p, const Fp8Rows& x, int64_t seg, Planes& a) {
  a.blocks = ceil_div(p.k, kBlockCols);
  a.seg = seg;
  a.segs = ceil_div(p.k, seg);
  a.bytes.resize(static_cast<size_t>(p.m * a.blocks * kBlockBytes));
  a.offset.resize(static_cast<size_t>(p.m * a.segs));
  const auto& table = plane_table();
  std::atomic<bool> nan{false};
  parallel_for(0, p.m, 1, [&](int64_t begin, int64_t end) {
    bool seen_nan = false;
    for (int64_t t = begin; t < end; ++t) {
      const uint8_t* codes = x.codes + t * x.stride;
      row_planes(codes, p.k, a.bytes.data() + t * a.blocks * kBlockBytes);
      for (int64_t s = 0; s < a.segs; ++s) {
        int32_t sum = 0;
        for (int64_t k = s * seg; k < std::min((s + 1) * seg, p.k); ++k) {
          const CodePlanes& c = table[codes[k]];
          seen_nan |= c.nan;
          sum += c.offset;
        }
        a.offset[t * a.segs + s] = -sum;
      }
    }
    if (seen_nan) nan.store(true, std::memory_order_relaxed);
  });
  return !nan.load();
}

// Per e: int4 value * 2^e of index & 15, for all 64 indices vpermb reads.
const std::array<std::array<int8_t, 64>, 3>& weight_tables() {
  static const std::array<std::array<int8_t, 64>, 3> tables = [] {
    std::array<std::array<int8_t, 64>, 3> t{};
    for (int e = 0; e < 3; ++e)
      for (int i = 0; i < 64; ++i)
        t[e][i] = static_cast<int8_t>(int4_value(static_cast<uint8_t>(i & 15), false) * (1 << e));
    return t;
  }();
  return tables;
}

// tot[r][0] + tot[r][1] (lanes) = sum over segments of scale * segment integer, for R weight rows
// from `row`; segments alternate between two totals (independent FMA chains).
template <int R>
SLAB_VNNI void gemv_rows(const GemmParams& p, const GemvPlanes& a, int64_t row, __m512 (*tot)[2]) {
  const int64_t row_bytes = p.k / 2, groups = p.k / p.group;
  const auto& tables = weight_tables();
  const __m512i zero = _mm512_setzero_si512();
  const int64_t ahead = kGemvAhead * kGemvRows * row_bytes;
  for (int r = 0; r < R; ++r) tot[r][0] = tot[r][1] = _mm512_setzero_ps();
  for (int64_t s = 0; s < a.segs; ++s) {
    const int64_t c0 = s * a.seg, c1 = std::min(c0 + a.seg, p.k);
    __m512i lo_acc[R], hi_acc[R];
    for (int r = 0; r < R; ++r) lo_acc[r] = hi_acc[r] = zero;
    for (int64_t b = c0 / kBlockCols; b < ceil_div(c1, kBlockCols); ++b) {
      const GemvBlock& blk = a.block[b];
      const uint8_t* pb = a.bytes.data() + b * kBlockBytes;
      const __m512i table = _mm512_loadu_si512(tables[blk.shift].data());
      const __m512i lo_even = _mm512_loadu_si512(pb), lo_odd = _mm512_loadu_si512(pb + 64);
      const __m512i hi_even = _mm512_loadu_si512(pb + kBlockCols), hi_odd = _mm512_loadu_si512(pb + kBlockCols + 64);
      const __mmask64 neg_even = blk.negative[0], neg_odd = blk.negative[1];
      const bool top = blk.top;
      // A masked load only in a row's last, short block (masked loads cost more).
      const bool whole = row_bytes - b * 64 >= 64;
      const __mmask64 mask = byte_mask(row_bytes - b * 64);
      for (int r = 0; r < R; ++r) {
        const uint8_t* w = p.w + (row + r) * row_bytes + b * 64;
        // The same line kGemvAhead row groups on: each row's stream is short (a few KB), and
        // the weights arrive late without it (measured: 1.5-2x slower from DRAM).
        _mm_prefetch(reinterpret_cast<const char*>(w + ahead), _MM_HINT_T0);
        const __m512i bytes = whole ? _mm512_loadu_si512(w) : _mm512_maskz_loadu_epi8(mask, w);
        __m512i even = _mm512_permutexvar_epi8(bytes, table);
        __m512i odd = _mm512_permutexvar_epi8(_mm512_srli_epi16(bytes, 4), table);
        even = _mm512_mask_sub_epi8(even, neg_even, zero, even);
        odd = _mm512_mask_sub_epi8(odd, neg_odd, zero, odd);
        lo_acc[r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(lo_acc[r], lo_even, even), lo_odd, odd);
        hi_acc[r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(hi_acc[r], hi_even, even), hi_odd, odd);
        if (top) {
          const __m512i t =
              _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, _mm512_loadu_si512(pb + 2 * kBlockCols), even),
                                  _mm512_loadu_si512(pb + 2 * kBlockCols + 64), odd);
          hi_acc[r] = _mm512_add_epi32(hi_acc[r], _mm512_slli_epi32(t, 8));
        }
      }
    }
    const int64_t g = c0 / p.group;
    for (int r = 0; r < R; ++r) {
      const __m512i units = _mm512_add_epi32(lo_acc[r], _mm512_slli_epi32(hi_acc[r], 8));
      __m512& t = tot[r][s & 1];
      t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(units), _mm512_set1_ps(p.w_scales[(row + r) * groups + g]), t);
    }
  }
}

SLAB_VNNI void gemv_chunk(const GemmParams& p, const GemvPlanes& a, const std::vector<float>& x_scale, int64_t begin,
                          int64_t end) {
  for (int64_t r0 = begin; r0 < end;) {
    __m512 tot[kGemvRows][2];
    const int rows = end - r0 >= kGemvRows ? kGemvRows : 1;
    if (rows == kGemvRows)
      gemv_rows<kGemvRows>(p, a, r0, tot);
    else
      gemv_rows<1>(p, a, r0, tot);
    for (int r = 0; r < rows; ++r)
      store(p, 0, r0 + r, _mm512_reduce_add_ps(_mm512_add_ps(tot[r][0], tot[r][1])) * (1.0f / 512.0f), x_scale);
    r0 += rows;
  }
}

void gemv(const GemmParams& p, const GemvPlanes& a, const std::vector<float>& x_scale) {
  parallel_for(0, p.n, kGemvChunk, [&](int64_t begin, int64_t end) { gemv_chunk(p, a, x_scale, begin, end); });
}

// ---- blocked: lanes are weight rows ------------------------------------------------------------

// out[c] = column c of the 16 x 16 dword matrix whose rows are r[0..15].
SLAB_VNNI void transpose16(const __m512i* r, __m512i* out) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + q], lane L: column 4L + q of rows 4i .. 4i + 3
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int q = 0; q < 4; ++q) {
    const __m512i a_lo = _mm512_shuffle_i32x4(u[q], u[4 + q], 0x44), a_hi = _mm512_shuffle_i32x4(u[q], u[4 + q], 0xEE);
    const __m512i b_lo = _mm512_shuffle_i32x4(u[8 + q], u[12 + q], 0x44);
    const __m512i b_hi = _mm512_shuffle_i32x4(u[8 + q], u[12 + q], 0xEE);
    out[q] = _mm512_shuffle_i32x4(a_lo, b_lo, 0x88);
    out[4 + q] = _mm512_shuffle_i32x4(a_lo, b_lo, 0xDD);
    out[8 + q] = _mm512_shuffle_i32x4(a_hi, b_hi, 0x88);
    out[12 + q] = _mm512_shuffle_i32x4(a_hi, b_hi, 0xDD);
  }
}

// Weight rows [n0, n0 + 16) as panel[j][16] (dword j of each row: columns 8j .. 8j + 7; rows past
// n are zero) and their scales / 512 as scales[g][16]. The next 16 rows are prefetched meanwhile.
SLAB_VNNI void build_panel(const GemmParams& p, int64_t n0, uint32_t* panel, float* scales) {
  const int64_t row_bytes = p.k / 2, groups = p.k / p.group, rows = std::min(kPanelRows, p.n - n0);
  const int64_t blocks = ceil_div(p.k, kBlockCols);
  const uint8_t* next = p.w + (n0 + rows) * row_bytes;
  const int64_t next_bytes = std::min(kPanelRows, p.n - n0 - rows) * row_bytes;
  for (int64_t b = 0; b < blocks; ++b) {
    const __mmask64 mask = byte_mask(row_bytes - b * 64);
    __m512i r[16], c[16];
    for (int64_t i = 0; i < kPanelRows; ++i)
      r[i] = i < rows ? _mm512_maskz_loadu_epi8(mask, p.w + (n0 + i) * row_bytes + b * 64) : _mm512_setzero_si512();
    for (int64_t l = b * 16 * 64; l < std::min((b + 1) * 16 * 64, next_bytes); l += 64)
      _mm_prefetch(reinterpret_cast<const char*>(next + l), _MM_HINT_T0);
    transpose16(r, c);
    for (int j = 0; j < 16; ++j) _mm512_storeu_si512(panel + (b * 16 + j) * kPanelRows, c[j]);
  }
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t i = 0; i < kPanelRows; ++i)
      scales[g * kPanelRows + i] = i < rows ? p.w_scales[(n0 + i) * groups + g] * (1.0f / 512.0f) : 0.0f;
}

SLAB_VNNI inline __m512i broadcast_dword(const int8_t* at) {
  int32_t v;
  std::memcpy(&v, at, sizeof v);
  return _mm512_set1_epi32(v);
}

// tot[t][16] = sum over segments of scales * segment integer, for T tokens from t0 (planes rows).
// With few tokens the low and high nibbles accumulate apart (S = 2), for more independent chains.
template <int T>
SLAB_VNNI void panel_tokens(const GemmParams& p, const Planes& a, const uint32_t* panel, const float* scales,
                            int64_t t0, float* tot) {
  constexpr int S = T <= 4 ? 2 : 1;
  for (int t = 0; t < T; ++t) _mm512_storeu_ps(tot + t * kPanelRows, _mm512_setzero_ps());
  for (int64_t s = 0; s < a.segs; ++s) {
    const int64_t c0 = s * a.seg, c1 = std::min(c0 + a.seg, p.k);
    __m512i acc[T][kPlanes][S];
    for (int t = 0; t < T; ++t)
      for (int i = 0; i < kPlanes; ++i)
        for (int h = 0; h < S; ++h)
          acc[t][i][h] = i == 0 && h == 0 ? _mm512_set1_epi32(a.offset[(t0 + t) * a.segs + s]) : _mm512_setzero_si512();
    for (int64_t j = c0 / 8; j < c1 / 8; ++j) {
      const __m512i w = _mm512_loadu_si512(panel + j * kPanelRows);
      const __m512i lo = low_nibbles(w), hi = high_nibbles(w);
      const int64_t at = j / 16 * kBlockBytes + (j % 16) * 4;  // the 4 even columns of group j
      for (int t = 0; t < T; ++t) {
        const int8_t* pt = a.row(t0 + t) + at;
        for (int i = 0; i < kPlanes; ++i) {
          acc[t][i][0] = _mm512_dpbusd_epi32(acc[t][i][0], lo, broadcast_dword(pt + i * kBlockCols));
          acc[t][i][S - 1] = _mm512_dpbusd_epi32(acc[t][i][S - 1], hi, broadcast_dword(pt + i * kBlockCols + 64));
        }
      }
    }
    const __m512 scale = _mm512_loadu_ps(scales + c0 / p.group * kPanelRows);
    for (int t = 0; t < T; ++t) {
      __m512i sum[kPlanes];
      for (int i = 0; i < kPlanes; ++i)
        sum[i] = S == 2 ? _mm512_add_epi32(acc[t][i][0], acc[t][i][S - 1]) : acc[t][i][0];
      float* out = tot + t * kPanelRows;
      _mm512_storeu_ps(out, _mm512_fmadd_ps(_mm512_cvtepi32_ps(combine_planes(sum)), scale, _mm512_loadu_ps(out)));
    }
  }
}

SLAB_VNNI void panel_block(const GemmParams& p, const Planes& a, const std::vector<float>& x_scale, int64_t n0,
                           int64_t t_begin, int64_t t_end, uint32_t* panel, float* scales) {
  build_panel(p, n0, panel, scales);
  const int64_t rows = std::min(kPanelRows, p.n - n0);
  float tot[kTokens * kPanelRows];
  for (int64_t t0 = t_begin; t0 < t_end; t0 += kTokens) {
    const int64_t tokens = std::min<int64_t>(kTokens, t_end - t0);
    switch (tokens) {
#define SLAB_VNNI_TOKENS(T)                        \
  case T:                                          \
    panel_tokens<T>(p, a, panel, scales, t0, tot); \
    break;
      SLAB_VNNI_TOKENS(8)
      SLAB_VNNI_TOKENS(7)
      SLAB_VNNI_TOKENS(6)
      SLAB_VNNI_TOKENS(5)
      SLAB_VNNI_TOKENS(4)
      SLAB_VNNI_TOKENS(3)
      SLAB_VNNI_TOKENS(2)
      SLAB_VNNI_TOKENS(1)
#undef SLAB_VNNI_TOKENS
    }
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t r = 0; r < rows; ++r) store(p, t0 + t, n0 + r, tot[t * kPanelRows + r], x_scale);
  }
}

void blocked(const GemmParams& p, const Planes& a, const std::vector<float>& x_scale) {
  const int64_t row_blocks = ceil_div(p.n, kPanelRows), groups = p.k / p.group;
  for (int64_t t0 = 0; t0 < p.m; t0 += kTokenTile) {
    const int64_t t1 = std::min(p.m, t0 + kTokenTile);
    parallel_for(0, row_blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<uint32_t> panel(static_cast<size_t>(a.blocks * 16 * kPanelRows));
      std::vector<float> scales(static_cast<size_t>(groups * kPanelRows));
      for (int64_t blk = begin; blk < end; ++blk)
        panel_block(p, a, x_scale, blk * kPanelRows, t0, t1, panel.data(), scales.data());
    });
  }
}

}  // namespace

bool vnni_usable() {
  static const bool usable = [] {
    const char* isa = std::getenv("SLAB_CPU_ISA");
    if (isa != nullptr && std::string_view(isa) == "avx2") return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi");
  }();
  return usable;
}

bool gemm_vnni(const GemmParams& p, const Fp8Rows& x) {
  if (p.layout != kRowMajor || p.m == 0 || p.n == 0 || p.k == 0) return false;
  const bool one_row = p.m == 1 && (p.group % kBlockCols == 0 || p.group == p.k);
  if (!one_row && (p.k % 8 != 0 || p.group % 8 != 0)) return false;
  if (one_row) {
    GemvPlanes a;
    if (!build_gemv_planes(p, x, segment_columns(p.k, p.group, kBlockCols), a)) return false;
    gemv(p, a, x.scale);
  } else {
    Planes a;
    if (!build_planes(p, x, segment_columns(p.k, p.group, 8), a)) return false;
    blocked(p, a, x.scale);
  }
  return true;
}

#else
bool vnni_usable() { return false; }
bool gemm_vnni(const GemmParams&, const Fp8Rows&) { return false; }
#endif

}  // namespace slab::w4a8::cpu
