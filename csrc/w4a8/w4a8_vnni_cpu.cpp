// W4A8 CPU GEMM on AVX-512 VNNI integer dot products (row-major weights), for CPUs that have them
// (AVX-512 VNNI and VBMI: Zen 4 and later, Intel from Ice Lake on); w4a8_cpu.cpp's gemm_cpu calls
// gemm_vnni first and keeps its AVX2 float kernels for the rest. Only the functions marked
// SLAB_VNNI are compiled for AVX-512 (a target attribute, not a flag for the whole file), so
// nothing reachable on an AVX2-only CPU, inline library code included, holds an AVX-512
// instruction.
//
// Arithmetic: exact integer dot products per segment (at most 512 columns of one group, which stay
// below 2^31 in int32), then one conversion to float and one FMA with the group scale; the result
// is the SPEC's formula with one rounding per segment. An e4m3 value times 512 is an integer (its
// "units", e4m3_magnitude_units) below 2^18, whose four significant bits sit at bits s .. s + 3.
//
//   gemv (one row of x): lanes are columns. The weights are the unsigned operand (nibbles int4 + 8
//     from byte permutes), x the signed one, in two byte planes of a 16-bit window of its units
//     (one shift per row) and a remainder plane where the window drops bits (see "gemv" below);
//     four weight rows share each block's plane vectors; per row and block one 64-byte load,
//     three permutes, four vpdpbusd; per row and segment one shuffle, one conversion, one FMA.
//     Each row's line kGemvAhead bytes on is prefetched into L2.
//   blocked (more rows): lanes are weight rows. x's units in three signed 6-bit planes (hi * 4096 +
//     mid * 64 + lo), the weights as unsigned nibbles u = int4 + 8 (bits xor 8), so that sum u x =
//     sum int4 x + 8 sum x and the second term, independent of the weights, starts each segment's
//     accumulator negated (`offset`). Per block of 16 weight rows the packed bytes are transposed
//     once into a panel of [8-column group][16 rows] dwords; per token, plane and nibble half, each
//     8-column group is one vpdpbusd of a panel vector with a broadcast dword of the token's planes,
//     8 tokens at a time (24 accumulators); tokens in tiles of 64, whose planes stay in L2 while the
//     panels of every row block meet them. Where the CPU has AMX-INT8 (and the shape is whole
//     128-column blocks), TDPBSUD tiles compute the same integers, 16 tokens a pass.
//
// Planes per row of x, both paths: per 128-column block (one 64-byte vector of packed weights), per
// plane, the block's 64 even columns (the low nibbles) and then its 64 odd ones (high nibbles).

// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized and -Wuninitialized on their own
// _mm512_undefined_* idiom once inlined (GCC bug 105593; here in _mm512_reduce_add_epi32); set
// before any include so that it covers those header lines too.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
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
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#define SLAB_VNNI_BUILD 1
#define SLAB_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi")))
#define SLAB_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,amx-tile,amx-int8")))
#endif

namespace slab::w4a8::cpu {

#ifdef SLAB_VNNI_BUILD
namespace {

constexpr int64_t kBlockCols = 128;                    // columns per plane block: one 64-byte vector of packed weights
constexpr int64_t kBlockBytes = kPlanes * kBlockCols;  // plane bytes of one block
constexpr int64_t kSegMax = 512;                       // columns per int32 segment (see the top)
constexpr int kGemvRows = 4;                           // weight rows sharing the plane loads (gemv)
constexpr int64_t kGemvAhead = 32 * 1024;              // bytes the prefetches run ahead (gemv)
constexpr int64_t kGemvChunk = 32;                     // weight rows per parallel task (gemv)
constexpr int64_t kPanelAhead = 8192;                  // bytes the prefetches run ahead (panel gemv)
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
  int64_t stride;               // bytes from one row of x to the next: blocks * kBlockBytes (+ 64)
  size_t lead;                  // bytes before the first row, which starts a cache line
  std::vector<int8_t> bytes;    // m rows: (blocks, kPlanes, 128), per plane the even columns, then the odd
  std::vector<int32_t> offset;  // (m, segs): -8 * the sum of x in units over the segment
  int8_t* row(int64_t t) { return bytes.data() + lead + t * stride; }
  const int8_t* row(int64_t t) const { return bytes.data() + lead + t * stride; }
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

// The 4 bytes at `at` in every dword lane.
SLAB_VNNI inline __m512i broadcast_dword(const int8_t* at) {
  int32_t v;
  std::memcpy(&v, at, sizeof v);
  return _mm512_set1_epi32(v);
}

// ---- gemv: one row of x, lanes are columns ------------------------------------------------------
// The weights are the unsigned operand, as nibbles u = int4 + 8, x the signed one: a shift
// e = clamp(s_max - 11, 0, 3) from the row's largest s makes v = sign * (units >> e) a signed
// 16-bit value (|v| <= 15 * 2^11), split into signed bytes v = lo + 256 hi; units = v * 2^e + r,
// and a third plane holds the signed remainder r (|r| < 8) in the blocks where some value has bits
// below e (an e4m3 value under 2^(e - 6): with Gaussian x, 7% of the 128-column blocks).
// sum u v = sum int4 v + 8 sum v: the second term, one integer per segment and plane domain
// (`offset`: -8 sum v, -8 sum r), starts the lo and r accumulators (lane 0). Per segment and row
// V = (hi << 8) + lo (a byte shuffle) and R go to float with the group scale (R's times 2^-e), and
// the row's sum is scaled by 2^e once: so the per-segment work is one shuffle, one add, one
// conversion and one FMA. The nibbles come from byte permutes (vpermb, vpmultishiftqb). Measured
// on a 2-core Sapphire Rapids-class guest (L2-resident weights, group 128): 3.1 ns per row and
// block, of which the per-segment work is about 1 ns and the nibbles 0.7 ns.

struct GemvPlanes {
  int64_t blocks, seg, segs;
  int32_t shift;                   // e
  std::vector<int8_t> bytes;       // (blocks, kPlanes, 128): lo, hi, r; per plane the even columns, then the odd
  std::vector<uint8_t> has_rest;   // (blocks): 1 where the r plane is not all zero
  std::vector<uint8_t> seg_rest;   // (segs): 1 where some block of the segment has_rest
  std::vector<int32_t> offset;     // (segs, 2): -8 * the sums of v and of r over the segment
  std::vector<int64_t> seg_end;    // (segs): the block after the segment's last
  std::vector<int64_t> seg_group;  // (segs): the segment's group
};

// Per shift e, the bytes of the three planes of the magnitude code c (as vpermi2b looks them up):
// lo, hi and r of +units(c), and hi of -units(c) (lo and r of a negative value are the positive
// ones negated, wrapping: -(-128) is -128 again, whose hi then differs by one).
struct GemvPlaneTable {
  std::array<int8_t, 128> lo, hi, hi_negative, rest;
};
constexpr int kGemvShifts = 4;

const std::array<GemvPlaneTable, kGemvShifts>& gemv_plane_tables() {
  static const std::array<GemvPlaneTable, kGemvShifts> tables = [] {
    std::array<GemvPlaneTable, kGemvShifts> t{};
    for (int e = 0; e < kGemvShifts; ++e)
      for (int c = 0; c < 128; ++c) {
        const int units = static_cast<int>(e4m3_magnitude_units(static_cast<uint8_t>(c)));
        const int v = units >> e, lo = static_cast<int8_t>(v & 0xFF);
        t[e].lo[c] = static_cast<int8_t>(lo);
        t[e].hi[c] = static_cast<int8_t>((v - lo) / 256);
        t[e].hi_negative[c] = static_cast<int8_t>((-v - static_cast<int8_t>(-lo)) / 256);
        t[e].rest[c] = static_cast<int8_t>(units & ((1 << e) - 1));
      }
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

// The largest byte of v.
SLAB_VNNI inline int max_byte(__m512i v) {
  v = _mm512_max_epu8(v, _mm512_shuffle_i64x2(v, v, 0x4E));
  v = _mm512_max_epu8(v, _mm512_shuffle_i64x2(v, v, 0xB1));
  alignas(16) uint8_t b[16];  // the 16 bytes of lane 0 now hold the maxima over the four lanes
  _mm_store_si128(reinterpret_cast<__m128i*>(b), _mm512_castsi512_si128(v));
  return *std::max_element(b, b + 16);
}

SLAB_VNNI inline __m512i lookup(const std::array<int8_t, 128>& table, __m512i index) {
  return _mm512_permutex2var_epi8(_mm512_loadu_si512(table.data()), index, _mm512_loadu_si512(table.data() + 64));
}

// The largest magnitude code among `cols` codes, -1 when one is a NaN.
SLAB_VNNI int largest_code(const uint8_t* codes, int64_t cols) {
  const __m512i low7 = _mm512_set1_epi8(0x7F);
  __m512i largest = _mm512_setzero_si512();
  for (int64_t c = 0; c < cols; c += 64) {
    const __m512i mag = _mm512_and_si512(_mm512_maskz_loadu_epi8(byte_mask(cols - c), codes + c), low7);
    if (_mm512_cmpeq_epi8_mask(mag, low7) != 0) return -1;
    largest = _mm512_max_epu8(largest, mag);
  }
  return max_byte(largest);
}

// One block of the planes (see GemvPlanes) from its <= 128 codes at shift e; adds its planes' byte
// sums to `sums` (lanes) and returns whether its r plane has a nonzero byte.
SLAB_VNNI bool gemv_block(const uint8_t* codes, int64_t cols, const GemvPlaneTable& table, int8_t* out, __m512i* sums) {
  const __m512i low7 = _mm512_set1_epi8(0x7F), ones = _mm512_set1_epi8(1), zero = _mm512_setzero_si512();
  __m512i half[2];
  split_block(codes, cols, half);
  bool rest = false;
  for (int h = 0; h < 2; ++h) {
    const __m512i mag = _mm512_and_si512(half[h], low7);
    const __mmask64 negative = _mm512_movepi8_mask(half[h]);
    const __m512i lo = lookup(table.lo, mag), r = lookup(table.rest, mag);
    const __m512i planes[kPlanes] = {
        _mm512_mask_sub_epi8(lo, negative, zero, lo),
        _mm512_mask_mov_epi8(lookup(table.hi, mag), negative, lookup(table.hi_negative, mag)),
        _mm512_mask_sub_epi8(r, negative, zero, r),
    };
    rest |= _mm512_test_epi8_mask(r, r) != 0;
    for (int i = 0; i < kPlanes; ++i) {
      _mm512_storeu_si512(out + i * kBlockCols + h * 64, planes[i]);
      sums[i] = _mm512_dpbusd_epi32(sums[i], ones, planes[i]);
    }
  }
  return rest;
}

// Segment s of the planes at shift e: its blocks and offsets.
SLAB_VNNI void gemv_segment(const GemmParams& p, const Fp8Rows& x, int64_t s, GemvPlanes& a) {
  const int64_t c0 = s * a.seg, c1 = std::min(c0 + a.seg, p.k);
  const GemvPlaneTable& table = gemv_plane_tables()[a.shift];
  __m512i sums[kPlanes] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
  bool rest = false;
  for (int64_t b = c0 / kBlockCols; b < ceil_div(c1, kBlockCols); ++b) {
    const int64_t k0 = b * kBlockCols;
    a.has_rest[b] =
        gemv_block(x.codes + k0, std::min(kBlockCols, p.k - k0), table, a.bytes.data() + b * kBlockBytes, sums);
    rest |= a.has_rest[b] != 0;
  }
  // |sum lo|, |sum hi| <= 512 * 128: 8 * |sum v| below 2^27.
  a.seg_rest[s] = rest;
  a.offset[2 * s] = -8 * (_mm512_reduce_add_epi32(sums[1]) * 256 + _mm512_reduce_add_epi32(sums[0]));
  a.offset[2 * s + 1] = -8 * _mm512_reduce_add_epi32(sums[2]);
}

// The planes of x's one row; false when some code is a NaN.
bool build_gemv_planes(const GemmParams& p, const Fp8Rows& x, int64_t seg, GemvPlanes& a) {
  const int code = largest_code(x.codes, p.k);
  if (code < 0) return false;
  a.blocks = ceil_div(p.k, kBlockCols);
  a.seg = seg;
  a.segs = ceil_div(p.k, seg);
  a.shift = std::clamp(e4m3_units_shift(static_cast<uint8_t>(code)) - 11, 0, kGemvShifts - 1);
  a.bytes.resize(static_cast<size_t>(a.blocks * kBlockBytes));
  a.has_rest.resize(static_cast<size_t>(a.blocks));
  a.seg_rest.resize(static_cast<size_t>(a.segs));
  a.offset.resize(static_cast<size_t>(2 * a.segs));
  a.seg_end.resize(static_cast<size_t>(a.segs));
  a.seg_group.resize(static_cast<size_t>(a.segs));
  for (int64_t s = 0; s < a.segs; ++s) {
    a.seg_end[s] = ceil_div(std::min((s + 1) * seg, p.k), kBlockCols);
    a.seg_group[s] = s * seg / p.group;
  }
  // On one thread: about 1 us at K = 4096 and 2.5 us at 11008 (measured), less than a fork and join.
  for (int64_t s = 0; s < a.segs; ++s) gemv_segment(p, x, s, a);
  return true;
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
  // An odd number of cache lines from row to row: the AMX tiles load 16 rows at once, which at a
  // multiple of 4 KB apart (K = 4096: 12 KB) would all fall in one L1 set and evict each other
  // (measured, M = 16, 4096 x 4096, one thread, warm: 2.05 -> 1.79 ms).
  a.stride = a.blocks * kBlockBytes + ((a.blocks * kBlockBytes / 64) % 2 == 0 ? 64 : 0);
  // Rows from a 64-byte boundary: a tile row of 64 bytes at a vector's 16-byte alignment spans two
  // cache lines, and which one a call got depended on the heap (measured, M = 16, 4096 x 4096, one
  // thread: 1.75-1.8 ms unaligned, 1.15 ms aligned).
  a.bytes.assign(static_cast<size_t>(p.m * a.stride + 64), 0);
  a.lead = (64 - reinterpret_cast<uintptr_t>(a.bytes.data()) % 64) % 64;
  a.offset.resize(static_cast<size_t>(p.m * a.segs));
  const auto& table = plane_table();
  std::atomic<bool> nan{false};
  parallel_for(0, p.m, 1, [&](int64_t begin, int64_t end) {
    bool seen_nan = false;
    for (int64_t t = begin; t < end; ++t) {
      const uint8_t* codes = x.codes + t * x.stride;
      row_planes(codes, p.k, a.row(t));
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

// u = int4 + 8 of index & 15, for the 64 indices vpermb reads.
constexpr auto kNibbleTable = [] {
  std::array<uint8_t, 64> t{};
  for (int i = 0; i < 64; ++i) t[i] = static_cast<uint8_t>((i & 15) ^ 8);
  return t;
}();

// The even columns' (low) and the odd columns' (high) nibbles of 64 packed bytes as u = int4 + 8:
// the high ones first moved down by vpmultishiftqb (byte j of each qword from bit 8j + 4).
SLAB_VNNI inline void weight_nibbles(__m512i bytes, __m512i table, __m512i& even, __m512i& odd) {
  even = _mm512_permutexvar_epi8(bytes, table);
  odd = _mm512_permutexvar_epi8(_mm512_multishift_epi64_epi8(_mm512_set1_epi64(0x3C342C241C140C04), bytes), table);
}

// One block of R weight rows (`w`, rows row_bytes apart) into the segment's sums; kWhole: a full
// 64-byte block (else the row's short last one, `tail` its bytes).
template <int R, bool kWhole>
SLAB_VNNI __attribute__((always_inline)) inline void gemv_step(const uint8_t* w, int64_t row_bytes, __mmask64 tail,
                                                               const int8_t* pb, bool has_rest, __m512i table,
                                                               __m512i* lo_acc, __m512i* hi_acc, __m512i* rest_acc) {
  const __m512i lo_even = _mm512_loadu_si512(pb), lo_odd = _mm512_loadu_si512(pb + 64);
  const __m512i hi_even = _mm512_loadu_si512(pb + kBlockCols), hi_odd = _mm512_loadu_si512(pb + kBlockCols + 64);
  __m512i even[R], odd[R];
  for (int r = 0; r < R; ++r) {
    // The same line kGemvAhead bytes on in each row: the rows' streams are short (a few KB) and
    // interleaved, and the weights arrive late without it.
    _mm_prefetch(reinterpret_cast<const char*>(w + r * row_bytes + kGemvAhead), _MM_HINT_T1);
    const __m512i bytes =
        kWhole ? _mm512_loadu_si512(w + r * row_bytes) : _mm512_maskz_loadu_epi8(tail, w + r * row_bytes);
    weight_nibbles(bytes, table, even[r], odd[r]);
    lo_acc[r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(lo_acc[r], even[r], lo_even), odd[r], lo_odd);
    hi_acc[r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(hi_acc[r], even[r], hi_even), odd[r], hi_odd);
  }
  if (has_rest) {
    const __m512i r_even = _mm512_loadu_si512(pb + 2 * kBlockCols),
                  r_odd = _mm512_loadu_si512(pb + 2 * kBlockCols + 64);
    for (int r = 0; r < R; ++r)
      rest_acc[r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(rest_acc[r], even[r], r_even), odd[r], r_odd);
  }
}

// tot[r] (lanes) = sum over segments of scale * (V + R * 2^-e), for R weight rows from `row`.
// One pass over the blocks; a segment's end (seg_end) closes its sums.
template <int R>
SLAB_VNNI void gemv_rows(const GemmParams& p, const GemvPlanes& a, int64_t row, __m512* tot) {
  const int64_t row_bytes = p.k / 2, groups = p.k / p.group, whole_blocks = row_bytes / 64;
  const __m512i table = _mm512_loadu_si512(kNibbleTable.data());
  // Per dword, bytes 0 1 2 -> 1 2 3 and a zero byte 0 (vpshufb indices within 16-byte lanes): x << 8
  // for |x| < 2^23 (the hi sums).
  const __m512i shift8 = _mm512_broadcast_i32x4(_mm_setr_epi32(0x02010080, 0x06050480, 0x0A090880, 0x0E0D0C80));
  const float rest_weight = 1.0f / static_cast<float>(1 << a.shift);
  const __mmask64 tail = byte_mask(row_bytes % 64);
  const uint8_t* w = p.w + row * row_bytes;
  const int8_t* pb = a.bytes.data();
  const float* scales = p.w_scales + row * groups;
  for (int r = 0; r < R; ++r) tot[r] = _mm512_setzero_ps();
  int64_t b = 0;
  for (int64_t s = 0; s < a.segs; ++s) {
    // Lane 0 only; zext, not cast: a cast leaves the upper lanes undefined.
    const __m512i v_offset = _mm512_zextsi128_si512(_mm_cvtsi32_si128(a.offset[2 * s]));
    const __m512i r_offset = _mm512_zextsi128_si512(_mm_cvtsi32_si128(a.offset[2 * s + 1]));
    __m512i lo_acc[R], hi_acc[R], rest_acc[R];
    for (int r = 0; r < R; ++r) lo_acc[r] = v_offset, hi_acc[r] = _mm512_setzero_si512(), rest_acc[r] = r_offset;
    const int64_t end = a.seg_end[s];
    for (; b < std::min(end, whole_blocks); ++b, w += 64, pb += kBlockBytes)
      gemv_step<R, true>(w, row_bytes, tail, pb, a.has_rest[b] != 0, table, lo_acc, hi_acc, rest_acc);
    if (b < end) {  // a row's short last block (masked loads cost more: only here)
      gemv_step<R, false>(w, row_bytes, tail, pb, a.has_rest[b] != 0, table, lo_acc, hi_acc, rest_acc);
      ++b, w += 64, pb += kBlockBytes;
    }
    const bool rest = a.seg_rest[s] != 0;
    const float* scale = scales + a.seg_group[s];
    for (int r = 0; r < R; ++r) {
      const __m512i v = _mm512_add_epi32(_mm512_shuffle_epi8(hi_acc[r], shift8), lo_acc[r]);
      tot[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(scale[r * groups]), tot[r]);
      if (rest)
        tot[r] =
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(rest_acc[r]), _mm512_set1_ps(scale[r * groups] * rest_weight), tot[r]);
    }
  }
}

SLAB_VNNI void gemv_chunk(const GemmParams& p, const GemvPlanes& a, const std::vector<float>& x_scale, int64_t begin,
                          int64_t end) {
  const float unit = static_cast<float>(1 << a.shift) / 512.0f;
  for (int64_t r0 = begin; r0 < end;) {
    __m512 tot[kGemvRows];
    const int rows = end - r0 >= kGemvRows ? kGemvRows : 1;
    if (rows == kGemvRows)
      gemv_rows<kGemvRows>(p, a, r0, tot);
    else
      gemv_rows<1>(p, a, r0, tot);
    for (int r = 0; r < rows; ++r) store(p, 0, r0 + r, _mm512_reduce_add_ps(tot[r]) * unit, x_scale);
    r0 += rows;
  }
}

void gemv(const GemmParams& p, const GemvPlanes& a, const std::vector<float>& x_scale) {
  parallel_for(0, p.n, kGemvChunk, [&](int64_t begin, int64_t end) { gemv_chunk(p, a, x_scale, begin, end); });
}

// ---- gemv on panel weights (kPanel): lanes are weight rows ---------------------------------------
// x's planes as in the gemv above; per panel (16 rows) and 8 columns one 64-byte load, the nibbles
// by two vpternlogd (and a shift), four vpdpbusd with x's plane dwords broadcast from memory (two
// more where the block has_rest); per segment one gather of the 16 rows' scales, one conversion and
// one FMA for all 16 rows. The panel is one sequential stream: the line kPanelAhead bytes on is
// prefetched into L2. Measured on a 2-core KVM guest (cold 4096 x 4096, interleaved with a sum of
// the same bytes, 7 runs at two different DRAM speeds of the host): 8 KB ahead into L2 took 7-11%
// less time than 2 KB ahead into L1, at 1 and at 2 threads, in every run; 12-16 KB, or a second
// prefetch 1 KB ahead into L1, were no better; no prefetch was 15-30% slower.

// One block's `dwords` (<= 16) 8-column dwords of the panel at `w` into the accumulators.
template <bool kRest>
SLAB_VNNI __attribute__((always_inline)) inline void panel_gemv_block(const uint8_t* w, int64_t dwords,
                                                                      const int8_t* pb, __m512i* lo, __m512i* hi,
                                                                      __m512i* rest) {
  for (int64_t j = 0; j < dwords; ++j, w += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(w + kPanelAhead), _MM_HINT_T2);
    const __m512i bytes = _mm512_loadu_si512(w);
    const __m512i even = low_nibbles(bytes), odd = high_nibbles(bytes);
    const int8_t* at = pb + 4 * j;  // the dword of the 4 even columns of 8 j .. 8 j + 7, per plane
    lo[0] = _mm512_dpbusd_epi32(lo[0], even, broadcast_dword(at));
    lo[1] = _mm512_dpbusd_epi32(lo[1], odd, broadcast_dword(at + 64));
    hi[0] = _mm512_dpbusd_epi32(hi[0], even, broadcast_dword(at + kBlockCols));
    hi[1] = _mm512_dpbusd_epi32(hi[1], odd, broadcast_dword(at + kBlockCols + 64));
    if (kRest)
      *rest = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(*rest, even, broadcast_dword(at + 2 * kBlockCols)), odd,
                                  broadcast_dword(at + 2 * kBlockCols + 64));
  }
}

// y for the 16 rows of the panel from row n0.
SLAB_VNNI void panel_gemv(const GemmParams& p, const GemvPlanes& a, const std::vector<float>& x_scale, int64_t n0) {
  const int64_t groups = p.k / p.group, dwords = ceil_div(p.k, kPanelCols), rows = std::min(kPanelRows, p.n - n0);
  const uint8_t* w = p.w + panel_offset(n0, 0, p.k);
  const __mmask16 valid = static_cast<__mmask16>((1u << rows) - 1);
  const __m512i scale_index =
      _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                         _mm512_set1_epi32(static_cast<int>(groups)));
  const __m512 rest_weight = _mm512_set1_ps(1.0f / static_cast<float>(1 << a.shift));
  // The next panel's scales (contiguous: its rows' groups in turn) into L2: its gathers read one
  // line per row, which would otherwise miss together, twice or more per panel.
  const char* next_scales = reinterpret_cast<const char*>(p.w_scales + (n0 + rows) * groups);
  const int64_t next_bytes = std::min(kPanelRows, p.n - n0 - rows) * groups * 4;
  for (int64_t at = 0; at < next_bytes; at += 64) _mm_prefetch(next_scales + at, _MM_HINT_T1);
  __m512 tot = _mm512_setzero_ps();
  int64_t b = 0;
  for (int64_t s = 0; s < a.segs; ++s) {
    // lo and hi: the even and the odd columns apart, for independent chains.
    __m512i lo[2] = {_mm512_set1_epi32(a.offset[2 * s]), _mm512_setzero_si512()};
    __m512i hi[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
    __m512i rest = _mm512_set1_epi32(a.offset[2 * s + 1]);
    for (; b < a.seg_end[s]; ++b) {
      constexpr int64_t kBlockDwords = kBlockCols / kPanelCols;
      const uint8_t* wb = w + b * kBlockDwords * 64;
      const int64_t n_dwords = std::min(kBlockDwords, dwords - b * kBlockDwords);
      if (a.has_rest[b] != 0)
        panel_gemv_block<true>(wb, n_dwords, a.bytes.data() + b * kBlockBytes, lo, hi, &rest);
      else
        panel_gemv_block<false>(wb, n_dwords, a.bytes.data() + b * kBlockBytes, lo, hi, &rest);
    }
    // scales past the last row are not read (masked gather)
    const __m512 scale =
        _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, scale_index, p.w_scales + n0 * groups + a.seg_group[s], 4);
    const __m512i v =
        _mm512_add_epi32(_mm512_add_epi32(lo[0], lo[1]), _mm512_slli_epi32(_mm512_add_epi32(hi[0], hi[1]), 8));
    tot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), scale, tot);
    if (a.seg_rest[s] != 0) tot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(rest), _mm512_mul_ps(scale, rest_weight), tot);
  }
  alignas(64) float out[kPanelRows];
  _mm512_store_ps(out, _mm512_mul_ps(tot, _mm512_set1_ps(static_cast<float>(1 << a.shift) / 512.0f)));
  store_row(p, 0, n0, rows, out, x_scale);
}

void gemv_panels(const GemmParams& p, const GemvPlanes& a, const std::vector<float>& x_scale) {
  parallel_for(0, ceil_div(p.n, kPanelRows), kGemvChunk / kPanelRows, [&](int64_t begin, int64_t end) {
    for (int64_t panel = begin; panel < end; ++panel) panel_gemv(p, a, x_scale, panel * kPanelRows);
  });
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

// The scales / 512 of weight rows [n0, n0 + 16) as scales[g][16] (zero past n).
void panel_scales(const GemmParams& p, int64_t n0, float* scales) {
  const int64_t groups = p.k / p.group, rows = std::min(kPanelRows, p.n - n0);
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t i = 0; i < kPanelRows; ++i)
      scales[g * kPanelRows + i] = i < rows ? p.w_scales[(n0 + i) * groups + g] * (1.0f / 512.0f) : 0.0f;
}

// Row-major weight rows [n0, n0 + 16) as panel[j][16] (dword j of each row: columns 8j .. 8j + 7;
// rows past n are zero): the kPanel layout of one panel. The next 16 rows are prefetched meanwhile.
SLAB_VNNI void build_panel(const GemmParams& p, int64_t n0, uint32_t* panel) {
  const int64_t row_bytes = p.k / 2, rows = std::min(kPanelRows, p.n - n0);
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

// ---- blocked on AMX tiles (AMX-INT8) -----------------------------------------------------------
// The same integers as panel_tokens, by TDPBSUD (signed x planes times unsigned weight nibbles,
// int32 sums: vpdpbusd's arithmetic on 16 x 16 x 64 tiles). Per 128-column block: B0 and B1 hold
// the panel's low and high nibbles (row g: group g's 16 weight rows' dwords, as low_nibbles gives
// them), and for each plane A0 / A1 its 64 even / odd column bytes of the tokens, read in place
// from the planes (one token's row per tile row); C_i (tokens x 16 weight rows) sums plane i over
// a segment, whose integers then take the same float steps as panel_tokens'. Tiles: C 0-2, B 3-4,
// A 5-6.
constexpr int64_t kAmxTokens = 16;   // tokens per tile pass (tile rows)
constexpr int64_t kAmxAhead = 4096;  // bytes the weight prefetches run ahead (AMX)

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// AMX-INT8 on this CPU, with the kernel's leave to use its tile data (Linux: one request per
// process; elsewhere the vector kernel runs).
bool amx_usable() {
  static const bool usable = [] {
    const char* isa = std::getenv("SLAB_CPU_ISA");
    if (isa != nullptr && (std::string_view(isa) == "avx2" || std::string_view(isa) == "avx512")) return false;
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-int8")) return false;
#if defined(__linux__)
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return usable;
}

// The AMX path's shapes: whole 128-column blocks and segments of whole blocks.
bool amx_shape(const GemmParams& p, const Planes& a) { return p.k % kBlockCols == 0 && a.seg % kBlockCols == 0; }

// The low and the high nibbles (as u = int4 + 8) of a panel's 16 dwords of 16 rows: B tile rows.
// The line kAmxAhead bytes on is prefetched into L2: with one 16-token pass per panel the weights
// stream from DRAM while the tiles multiply (measured, cold, M = 16, 4096 x 4096: 1.69-1.76 ->
// 1.45-1.50 ms at one thread, 0.99-1.07 -> 0.84-0.91 ms at two; 8 and 16 KB ahead less so).
SLAB_VNNI inline void expand_nibbles(const uint32_t* dwords, uint8_t (*out)[16][64]) {
  for (int g = 0; g < 16; ++g) {
    _mm_prefetch(reinterpret_cast<const char*>(dwords + g * kPanelRows) + kAmxAhead, _MM_HINT_T2);
    const __m512i w = _mm512_loadu_si512(dwords + g * kPanelRows);
    _mm512_store_si512(out[0][g], low_nibbles(w));
    _mm512_store_si512(out[1][g], high_nibbles(w));
  }
}

// tot[t][16] as panel_tokens computes it, for `tokens` (<= 16) tokens from t0.
SLAB_AMX void panel_tokens_amx(const GemmParams& p, const Planes& a, const uint32_t* panel, const float* scales,
                               int64_t t0, int64_t tokens, float* tot) {
  TileConfig cfg;
  for (int t = 0; t < 7; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = static_cast<uint8_t>(t == 3 || t == 4 ? 16 : tokens);
  }
  _tile_loadconfig(&cfg);
  // the nibbles of block b in nibbles[b % 2]: the next block's are made while the tiles multiply
  alignas(64) uint8_t nibbles[2][2][16][64];
  alignas(64) int32_t sums[kPlanes][kAmxTokens][kPanelRows];
  for (int64_t t = 0; t < tokens; ++t) _mm512_storeu_ps(tot + t * kPanelRows, _mm512_setzero_ps());
  expand_nibbles(panel, nibbles[0]);
  for (int64_t s = 0; s < a.segs; ++s) {
    const int64_t c0 = s * a.seg, c1 = std::min(c0 + a.seg, p.k);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    for (int64_t blk = c0 / kBlockCols; blk < c1 / kBlockCols; ++blk) {
      _tile_loadd(3, nibbles[blk % 2][0], 64);
      _tile_loadd(4, nibbles[blk % 2][1], 64);
      const int8_t* x = a.row(t0) + blk * kBlockBytes;
      _tile_loadd(5, x, a.stride);
      _tile_loadd(6, x + 64, a.stride);
      _tile_dpbsud(0, 5, 3);
      _tile_dpbsud(0, 6, 4);
      _tile_loadd(5, x + kBlockCols, a.stride);
      _tile_loadd(6, x + kBlockCols + 64, a.stride);
      _tile_dpbsud(1, 5, 3);
      _tile_dpbsud(1, 6, 4);
      _tile_loadd(5, x + 2 * kBlockCols, a.stride);
      _tile_loadd(6, x + 2 * kBlockCols + 64, a.stride);
      _tile_dpbsud(2, 5, 3);
      _tile_dpbsud(2, 6, 4);
      if (blk + 1 < a.blocks) expand_nibbles(panel + (blk + 1) * 16 * kPanelRows, nibbles[(blk + 1) % 2]);
    }
    _tile_stored(0, sums[0], 64);
    _tile_stored(1, sums[1], 64);
    _tile_stored(2, sums[2], 64);
    const __m512 scale = _mm512_loadu_ps(scales + c0 / p.group * kPanelRows);
    for (int64_t t = 0; t < tokens; ++t) {
      __m512i sum[kPlanes];
      for (int i = 0; i < kPlanes; ++i) sum[i] = _mm512_load_si512(sums[i][t]);
      sum[0] = _mm512_add_epi32(sum[0], _mm512_set1_epi32(a.offset[(t0 + t) * a.segs + s]));
      float* out = tot + t * kPanelRows;
      _mm512_storeu_ps(out, _mm512_fmadd_ps(_mm512_cvtepi32_ps(combine_planes(sum)), scale, _mm512_loadu_ps(out)));
    }
  }
  _tile_release();
}

SLAB_VNNI void panel_block(const GemmParams& p, const Planes& a, const std::vector<float>& x_scale, int64_t n0,
                           int64_t t_begin, int64_t t_end, uint32_t* buffer, float* scales) {
  // kPanel weights are read where they are; row-major ones transposed into `buffer` first
  const uint32_t* panel = reinterpret_cast<const uint32_t*>(p.w + panel_offset(n0, 0, p.k));
  if (p.layout == kRowMajor) build_panel(p, n0, buffer), panel = buffer;
  panel_scales(p, n0, scales);
  const int64_t rows = std::min(kPanelRows, p.n - n0);
  if (amx_usable() && amx_shape(p, a)) {
    float tot[kAmxTokens * kPanelRows];
    for (int64_t t0 = t_begin; t0 < t_end; t0 += kAmxTokens) {
      const int64_t tokens = std::min(kAmxTokens, t_end - t0);
      panel_tokens_amx(p, a, panel, scales, t0, tokens, tot);
      for (int64_t t = 0; t < tokens; ++t) store_row(p, t0 + t, n0, rows, tot + t * kPanelRows, x_scale);
    }
    return;
  }
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
    for (int64_t t = 0; t < tokens; ++t) store_row(p, t0 + t, n0, rows, tot + t * kPanelRows, x_scale);
  }
}

void blocked(const GemmParams& p, const Planes& a, const std::vector<float>& x_scale) {
  const int64_t row_blocks = ceil_div(p.n, kPanelRows), groups = p.k / p.group;
  for (int64_t t0 = 0; t0 < p.m; t0 += kTokenTile) {
    const int64_t t1 = std::min(p.m, t0 + kTokenTile);
    parallel_for(0, row_blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<uint32_t> panel(p.layout == kRowMajor ? static_cast<size_t>(a.blocks * 16 * kPanelRows) : 0);
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
  if ((p.layout != kRowMajor && p.layout != kPanel) || p.m == 0 || p.n == 0 || p.k == 0) return false;
  const bool one_row = p.m == 1 && (p.group % kBlockCols == 0 || p.group == p.k);
  if (!one_row && (p.k % 8 != 0 || p.group % 8 != 0)) return false;
  if (one_row) {
    GemvPlanes a;
    if (!build_gemv_planes(p, x, segment_columns(p.k, p.group, kBlockCols), a)) return false;
    if (p.layout == kPanel)
      gemv_panels(p, a, x.scale);
    else
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
