// W4A8 CPU kernels (row-major packed weights, Layout::kRowMajor).
//   quantize_fp8: per row, the absmax, then the e4m3 encoder of w4a8_math.h on 8-lane vectors
//     (float_to_e4m3's integer steps, bit for bit; a row holding a NaN through the scalar loop); x is
//     read from memory once (the second pass over a row hits L1). w4a8_linear's prologue is the same.
//   gemm, one row of x (m = 1, groups of whole 64-column blocks, no NaN in x): integer dot products
//     (vpmaddubsw of unsigned weight nibbles with three signed 6-bit planes of x's e4m3 values times 512,
//     see "integer GEMV path"), two weight rows per pass over the planes, long rows in L1-sized
//     column passes; about three vector instructions per 8 weights.
//   gemm, few rows (m <= 8): streams the packed weights from memory once, row after row (parallel
//     over rows; rows of x in groups of up to 4, a second group re-reading the row from L1): 16 bytes = 32 int4 values
//     are widened to fp32 in four AVX2 vectors (shift-based sign extension of the nibbles) and multiplied with the
//     activations, which the prologue decoded once through a 256-entry e4m3 -> fp32 table into a per-32-block (even,
//     odd) column order matching the nibble order; per-group fp32 sums are scaled by the group scale.
//   gemm, more rows: per block of 16 weight rows, the int4 values are decoded once into an fp32
//     panel [k][16] (8 rows x 32 columns at a time, bytes transposed in registers) and reused by every row of x (a 6 x
//     16 broadcast-FMA micro-kernel, 12 accumulators), again with one fp32 sum per group scaled by the group scale.
// All compute y[m, n] = x_scale[m] * sum_g w_scale[n, g] * sum_{k in g} fp8(x)[m, k] int4(w)[n, k]
// (+ bias[n]) with fp32 accumulation; they differ only in the summation order.

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SLAB_W4A8_AVX2 1
#endif

#include "core/cpu_types.h"
#include "w4a8/w4a8.h"
#include "w4a8/w4a8_cpu_internal.h"
#include "w4a8/w4a8_math.h"

namespace slab::w4a8 {
using cpu::CodePlanes;
using cpu::fp8_rows;
using cpu::Fp8Rows;
using cpu::kPlaneBits;
using cpu::kPlanes;
using cpu::plane_table;
using cpu::store;
using cpu::store_row;

namespace {

// x rows up to which the streaming GEMV path is used: it re-decodes the weights once per 4 rows
// of x, the blocked path decodes them once into a panel (a fixed cost worth ~8 GEMV rows here).
constexpr int64_t kGemvMaxRows = 8;
constexpr int64_t kBlockRows = 16;  // weight rows per panel of the blocked path
constexpr int64_t kTokenBlock = 6;  // x rows per micro-kernel call of the blocked path (12 accumulators)
constexpr int64_t kVecCols = 32;    // columns per step of the GEMV path (16 packed bytes)

// e4m3 -> fp32 for all 256 codes (NaN codes decode to NaN).
const std::array<float, 256>& e4m3_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[i] = e4m3_to_float(static_cast<uint8_t>(i));
    return t;
  }();
  return table;
}

// Packed byte -> its two int4 values as floats (low nibble first).
const std::array<std::array<float, 2>, 256>& int4_pair_table() {
  static const std::array<std::array<float, 2>, 256> table = [] {
    std::array<std::array<float, 2>, 256> t{};
    for (int i = 0; i < 256; ++i) {
      t[i][0] = static_cast<float>(int4_value(static_cast<uint8_t>(i), false));
      t[i][1] = static_cast<float>(int4_value(static_cast<uint8_t>(i), true));
    }
    return t;
  }();
  return table;
}

// Position of column k of a row in the GEMV activation order: inside each full 32-column block,
// the even columns of its first half, then its odd ones, then the same for the second half (the
// order in which the nibbles of 16 packed bytes come out of the decoder); columns past the last
// full block keep their place.
inline int64_t gemv_position(int64_t k, int64_t full_cols) {
  if (k >= full_cols) return k;
  const int64_t base = k & ~int64_t(31), i = k & 31;
  const int64_t half = i >> 4, j = i & 15;
  return base + 16 * half + 8 * (j & 1) + (j >> 1);
}

template <typename T>
float load_float(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

#ifdef SLAB_W4A8_AVX2
// float_to_e4m3 of 8 lanes (the same integer steps, every branch computed and selected), as 8
// int32 codes.
inline __m256i float_to_e4m3_x8(__m256 f) {
  const __m256i u = _mm256_castps_si256(f);
  const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(u, 24), _mm256_set1_epi32(0x80));
  const __m256i a = _mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF));
  const __m256 scaled = _mm256_mul_ps(_mm256_castsi256_ps(a), _mm256_set1_ps(512.0f));
  const __m256 big = _mm256_set1_ps(8388608.0f);
  const __m256i sub = _mm256_cvttps_epi32(_mm256_sub_ps(_mm256_add_ps(scaled, big), big));
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(a, 20), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(_mm256_add_epi32(a, _mm256_set1_epi32(0x7FFFF)), odd);
  const __m256i normal = _mm256_sub_epi32(_mm256_srli_epi32(r, 20), _mm256_set1_epi32(120 << 3));
  __m256i code = _mm256_blendv_epi8(normal, sub, _mm256_cmpgt_epi32(_mm256_set1_epi32(0x3C800000), a));
  code = _mm256_blendv_epi8(code, _mm256_set1_epi32(0x7E), _mm256_cmpgt_epi32(a, _mm256_set1_epi32(0x43E7FFFF)));
  code = _mm256_blendv_epi8(code, _mm256_set1_epi32(0x7F), _mm256_cmpgt_epi32(a, _mm256_set1_epi32(0x7F800000)));
  return _mm256_or_si256(code, sign);
}

// The low byte of each int32 lane, in lane order.
inline void store_low_bytes(const __m256i v, uint8_t* out) {
  const __m128i pick = _mm_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const int lo = _mm_cvtsi128_si32(_mm_shuffle_epi8(_mm256_castsi256_si128(v), pick));
  const int hi = _mm_cvtsi128_si32(_mm_shuffle_epi8(_mm256_extracti128_si256(v, 1), pick));
  std::memcpy(out, &lo, 4);
  std::memcpy(out + 4, &hi, 4);
}

// Quantizes one row with 8-lane vectors; false (nothing written) for a row holding a NaN, whose
// scale and codes the scalar loop defines (the first NaN's bits propagate).
template <typename T>
bool quantize_row_avx2(const T* x, int64_t cols, uint8_t* q, float& scale) {
  constexpr int64_t W = 8;
  __m256 m = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for_each_vec<W>(cols, [&](int64_t c, auto full) {
    const __m256 v = load_piece(x, c, cols, full);
    m = _mm256_max_ps(m, _mm256_and_ps(v, abs_mask));
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  });
  if (_mm256_movemask_ps(nan) != 0) return false;
  alignas(32) float lanes[W];
  _mm256_store_ps(lanes, m);
  scale = fp8_row_scale(*std::max_element(lanes, lanes + W));
  const __m256 s = _mm256_set1_ps(scale);
  int64_t c = 0;
  for (; c + W <= cols; c += W) store_low_bytes(float_to_e4m3_x8(_mm256_div_ps(load_vec(x + c), s)), q + c);
  for (; c < cols; ++c) q[c] = float_to_e4m3(load_float(x, c) / scale);
  return true;
}
#endif

// Quantizes one row: scale = absmax / 448 (1 for a zero row), codes = e4m3(x / scale).
template <typename T>
float quantize_row(const T* x, int64_t cols, uint8_t* q) {
#ifdef SLAB_W4A8_AVX2
  if constexpr (!std::is_same_v<T, double>) {
    float scale;
    if (quantize_row_avx2(x, cols, q, scale)) return scale;
  }
#endif
  float m = 0.0f;
  for (int64_t i = 0; i < cols; ++i) m = absmax_update(m, load_float(x, i));
  const float scale = fp8_row_scale(m);
  for (int64_t i = 0; i < cols; ++i) q[i] = float_to_e4m3(load_float(x, i) / scale);
  return scale;
}

template <typename T>
void quantize_fp8_impl(const QuantFp8Params& p) {
  const T* x = static_cast<const T*>(p.x);
  parallel_for(0, p.rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(p.cols, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) p.scale[r] = quantize_row(x + r * p.cols, p.cols, p.q + r * p.q_stride);
  });
}

// ---- activation prologue -----------------------------------------------------------------------

template <typename T>
void quantize_rows_into(const GemmParams& p, std::vector<uint8_t>& codes, std::vector<float>& scale) {
  const T* x = static_cast<const T*>(p.x);
  parallel_for(0, p.m, std::max<int64_t>(1, 16384 / p.k), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) scale[r] = quantize_row(x + r * p.k, p.k, codes.data() + r * p.k);
  });
}

}  // namespace

Fp8Rows cpu::fp8_rows(const GemmParams& p) {
  Fp8Rows x{{}, p.x_fp8, p.x_stride, std::vector<float>(static_cast<size_t>(p.m))};
  if (p.x != nullptr) {
    x.own.resize(static_cast<size_t>(p.m * p.k));
    SLAB_DTYPE_SWITCH(p.x_dtype, CpuScalar, T, [&] { quantize_rows_into<T>(p, x.own, x.scale); });
    x.codes = x.own.data();
    x.stride = p.k;
  } else {
    std::copy(p.x_scale, p.x_scale + p.m, x.scale.begin());
  }
  return x;
}

const std::array<CodePlanes, 256>& cpu::plane_table() {
  static const std::array<CodePlanes, 256> table = [] {
    std::array<CodePlanes, 256> t{};
    for (int c = 0; c < 256; ++c) {
      const int units = static_cast<int>(e4m3_magnitude_units(static_cast<uint8_t>(c)));
      const int sign = (c & 0x80) ? -1 : 1;
      uint32_t packed = 0;
      for (int i = 0; i < kPlanes; ++i)
        packed |= static_cast<uint32_t>(static_cast<uint8_t>(sign * ((units >> (kPlaneBits * i)) & 63))) << (8 * i);
      t[c] = {packed, 8 * sign * units, (c & 0x7F) == 0x7F};
    }
    return t;
  }();
  return table;
}

namespace {

// The activations as fp32 (decoded e4m3 values), (m, k), each row in GEMV order when `gemv_order`.
std::vector<float> decode_activations(const GemmParams& p, const Fp8Rows& x, bool gemv_order) {
  std::vector<float> values(static_cast<size_t>(p.m * p.k));
  const auto& table = e4m3_table();
  const int64_t full = p.k / kVecCols * kVecCols;
  parallel_for(0, p.m, std::max<int64_t>(1, 16384 / p.k), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* out = values.data() + r * p.k;
      const uint8_t* in = x.codes + r * x.stride;
      for (int64_t k = 0; k < p.k; ++k) out[gemv_order ? gemv_position(k, full) : k] = table[in[k]];
    }
  });
  return values;
}

// ---- output ------------------------------------------------------------------------------------

template <typename O>
void store_outputs(const GemmParams& p, int64_t row, int64_t col, int64_t count, const float* acc,
                   const std::vector<float>& x_scale) {
  O* y = static_cast<O*>(p.y) + row * p.n + col;
  for (int64_t i = 0; i < count; ++i) {
    float v = x_scale[row] * acc[i];
    if (p.bias != nullptr) v += p.bias[col + i];
    y[i] = static_cast<O>(v);
  }
}

}  // namespace

void cpu::store_row(const GemmParams& p, int64_t row, int64_t col, int64_t count, const float* acc,
                    const std::vector<float>& x_scale) {
  switch (p.out_dtype) {
    case DType::kFloat32:
      store_outputs<float>(p, row, col, count, acc, x_scale);
      break;
    case DType::kBFloat16:
      store_outputs<c10::BFloat16>(p, row, col, count, acc, x_scale);
      break;
    case DType::kFloat16:
      store_outputs<c10::Half>(p, row, col, count, acc, x_scale);
      break;
    case DType::kFloat64:
      store_outputs<double>(p, row, col, count, acc, x_scale);
      break;
  }
}

void cpu::store(const GemmParams& p, int64_t row, int64_t col, float acc, const std::vector<float>& x_scale) {
  store_row(p, row, col, 1, &acc, x_scale);
}

namespace {

#ifdef SLAB_W4A8_AVX2
// The sum of the 8 lanes, in lane order.
inline float lane_sum(__m256 v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  float r = 0.0f;
  for (float l : lanes) r += l;
  return r;
}
#endif

// ---- GEMV path ---------------------------------------------------------------------------------

// Dot products of one packed weight row with MT activation rows (fp32, GEMV order, stride k):
// out[t] = sum_g scale[g] * sum_{k in g} int4(w[k]) x[t][k].
template <int MT>
void row_dot(const uint8_t* w, const float* ws, const float* x, int64_t k, int64_t group, float* out) {
  const int64_t groups = k / group;
  const int64_t vec_per_group = group / kVecCols * kVecCols;
  float tot_tail[MT] = {};
#ifdef SLAB_W4A8_AVX2
  // Four independent accumulator chains in all (FMA latency), split between the MT rows.
  constexpr int C = MT >= 4 ? 1 : 4 / MT;
  __m256 tot[MT];
  for (int t = 0; t < MT; ++t) tot[t] = _mm256_setzero_ps();
#else
  float tot[MT] = {};
#endif
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t k0 = g * group, kv = k0 + vec_per_group;
#ifdef SLAB_W4A8_AVX2
    __m256 acc[MT][C];
    for (int t = 0; t < MT; ++t)
      for (int c = 0; c < C; ++c) acc[t][c] = _mm256_setzero_ps();
    for (int64_t kk = k0; kk < kv; kk += kVecCols) {
      // Bytes sign-extended to int32 lanes (8 bytes per load): the high nibble is then one
      // arithmetic shift away; the low one is shifted to the top and back.
      const __m256i lo = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + kk / 2)));
      const __m256i hi = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + kk / 2 + 8)));
      const __m256 v[4] = {_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(lo, 28), 28)),
                           _mm256_cvtepi32_ps(_mm256_srai_epi32(lo, 4)),
                           _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(hi, 28), 28)),
                           _mm256_cvtepi32_ps(_mm256_srai_epi32(hi, 4))};
      for (int t = 0; t < MT; ++t) {
        const float* xt = x + t * k + kk;
        for (int j = 0; j < 4; ++j) acc[t][j % C] = _mm256_fmadd_ps(v[j], _mm256_loadu_ps(xt + 8 * j), acc[t][j % C]);
      }
    }
    const __m256 s = _mm256_set1_ps(ws[g]);
    for (int t = 0; t < MT; ++t) {
      __m256 sum = acc[t][0];
      for (int c = 1; c < C; ++c) sum = _mm256_add_ps(sum, acc[t][c]);
      tot[t] = _mm256_fmadd_ps(sum, s, tot[t]);
    }
#else
    for (int t = 0; t < MT; ++t) {
      float sum = 0.0f;
      for (int64_t kk = k0; kk < kv; ++kk) sum += int4_value(w[kk / 2], kk & 1) * x[t * k + kk];
      tot[t] += sum * ws[g];
    }
#endif
    // Columns past the last full 32-block (only when one group spans a row whose length is not
    // a multiple of 32): in natural order, scalar.
    if (kv < k0 + group) {
      for (int t = 0; t < MT; ++t) {
        float sum = 0.0f;
        for (int64_t kk = kv; kk < k0 + group; ++kk) sum += int4_value(w[kk / 2], kk & 1) * x[t * k + kk];
        tot_tail[t] += sum * ws[g];
      }
    }
  }
  for (int t = 0; t < MT; ++t) {
#ifdef SLAB_W4A8_AVX2
    out[t] = lane_sum(tot[t]) + tot_tail[t];
#else
    out[t] = tot[t] + tot_tail[t];
#endif
  }
}

#ifdef SLAB_W4A8_AVX2
// ---- integer GEMV path -------------------------------------------------------------------------
// An e4m3 value times 512 is an integer of magnitude below 2^18 (e4m3_magnitude_units), split here
// into three signed 6-bit planes (hi * 4096 + mid * 64 + lo, each carrying x's sign). The weights
// enter as unsigned nibbles u = int4 + 8 (a mask and a shift per byte, no lookup), so
// vpmaddubsw (unsigned byte x signed byte, pairs summed in int16) multiplies them with a plane
// exactly; sum u x = sum int4 x + 8 sum x, and the second term, which does not depend on the
// weights, is subtracted once per segment (`offset`). Per segment of at most 512 columns the
// int16 sums stay below 2^15 (16 products of 15 * 63, twice), the planes combine exactly in int32,
// and one conversion to float and one FMA with the group scale follow -- the same function as
// the float path with fewer roundings and about a third of its instructions per weight. Two weight
// rows share each plane load, and for long rows the planes are walked in blocks that stay in L1
// while a chunk of rows streams through. Used for one row of x, when groups are whole 64-column
// blocks and x has no NaN (integers cannot carry it).
constexpr int64_t kIntBlock = 64;                        // columns per step: 32 packed bytes, low nibbles then high
constexpr int64_t kIntBlockBytes = kPlanes * kIntBlock;  // plane bytes of one 64-column block
constexpr int64_t kIntSegMax = 512;                      // columns per int16 accumulation (see above)
constexpr int64_t kIntL1Bytes = 16384;                   // plane bytes walked per pass over a chunk of rows
constexpr int64_t kIntRowChunk = 32;                     // weight rows per pass

// Position of column k in its 64-column block: the even columns (low nibbles) first, then the odd.
inline int64_t int_position(int64_t k) { return ((k & 1) << 5) + ((k & 63) >> 1); }

struct IntActivations {
  int64_t seg;  // columns per segment (a multiple of 64; the last may be shorter)
  int64_t segs;
  std::vector<int8_t> planes;   // per 64-column block: kPlanes x 64 bytes in int_position order
  std::vector<int32_t> offset;  // per segment, 8 int32 lanes: 8 * sum x (units) over each lane's columns
};

// The one row of x as planes and segment offsets (segments in parallel); none when some x code is NaN.
std::optional<IntActivations> int_activations(const GemmParams& p, const Fp8Rows& x) {
  const int64_t seg = std::min(p.group, kIntSegMax);
  IntActivations a{seg, ceil_div(p.k, seg), std::vector<int8_t>(static_cast<size_t>(p.k / kIntBlock * kIntBlockBytes)),
                   std::vector<int32_t>(static_cast<size_t>(ceil_div(p.k, seg) * 8))};
  const auto& table = plane_table();
  std::atomic<bool> nan{false};
  parallel_for(0, a.segs, std::max<int64_t>(1, 2048 / seg), [&](int64_t s0, int64_t s1) {
    bool seen_nan = false;
    for (int64_t k = s0 * seg; k < std::min(s1 * seg, p.k); ++k) {
      const CodePlanes& c = table[x.codes[k]];
      seen_nan |= c.nan;
      const int64_t pos = int_position(k);
      int8_t* block = a.planes.data() + k / kIntBlock * kIntBlockBytes + pos;
      block[0] = static_cast<int8_t>(c.planes);
      block[kIntBlock] = static_cast<int8_t>(c.planes >> 8);
      block[2 * kIntBlock] = static_cast<int8_t>(c.planes >> 16);
      a.offset[(k / seg) * 8 + (pos & 31) / 4] += c.offset;
    }
    if (seen_nan) nan.store(true, std::memory_order_relaxed);
  });
  if (nan.load()) return std::nullopt;
  return a;
}

// tot[r] += scale * (sum over segments [s0, s1) of int4(w) . x in units) for R weight rows from `row`.
template <int R>
void int_rows(const GemmParams& p, const IntActivations& a, int64_t row, int64_t s0, int64_t s1, __m256* tot) {
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const auto load = [](const void* ptr) { return _mm256_loadu_si256(static_cast<const __m256i*>(ptr)); };
  const int64_t groups = p.k / p.group, row_bytes = p.k / 2;
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t c0 = s * a.seg, steps = (std::min(c0 + a.seg, p.k) - c0) / kIntBlock;
    const uint8_t* w[R];
    for (int r = 0; r < R; ++r) w[r] = p.w + (row + r) * row_bytes + c0 / 2;
    const int8_t* planes = a.planes.data() + c0 / kIntBlock * kIntBlockBytes;
    __m256i acc[R][kPlanes];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < kPlanes; ++i) acc[r][i] = _mm256_setzero_si256();
    for (int64_t st = 0; st < steps; ++st, planes += kIntBlockBytes) {
      __m256i lo[R], hi[R];
      for (int r = 0; r < R; ++r) {
        // The same line of the next R rows (the next call's): each row pair reads only a few KB
        // before the next pair starts, too short a stream for the hardware prefetcher to run
        // ahead of; measured 1.2-1.4x faster from DRAM at 2 threads.
        if (st % 2 == 0)
          _mm_prefetch(reinterpret_cast<const char*>(w[r] + st * kIntBlock / 2 + R * row_bytes), _MM_HINT_T0);
        const __m256i bytes = _mm256_xor_si256(load(w[r] + st * kIntBlock / 2), _mm256_set1_epi8(char(0x88)));
        lo[r] = _mm256_and_si256(bytes, nibble);
        hi[r] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble);
      }
      for (int i = 0; i < kPlanes; ++i) {
        const __m256i p_lo = load(planes + i * kIntBlock), p_hi = load(planes + i * kIntBlock + 32);
        for (int r = 0; r < R; ++r)
          acc[r][i] = _mm256_add_epi16(
              acc[r][i], _mm256_add_epi16(_mm256_maddubs_epi16(lo[r], p_lo), _mm256_maddubs_epi16(hi[r], p_hi)));
      }
    }
    const __m256i offset = load(a.offset.data() + s * 8);
    const int64_t g = c0 / p.group;
    for (int r = 0; r < R; ++r) {
      const __m256i units = _mm256_add_epi32(_mm256_add_epi32(_mm256_madd_epi16(acc[r][2], _mm256_set1_epi16(4096)),
                                                              _mm256_madd_epi16(acc[r][1], _mm256_set1_epi16(64))),
                                             _mm256_madd_epi16(acc[r][0], _mm256_set1_epi16(1)));
      const float scale = p.w_scales[(row + r) * groups + g] * (1.0f / 512.0f);  // units: 2^-9
      tot[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(units, offset)), _mm256_set1_ps(scale), tot[r]);
    }
  }
}

void gemv_int(const GemmParams& p, const IntActivations& a, const std::vector<float>& x_scale) {
  // Segments per pass: the planes of a pass fit kIntL1Bytes, the passes about equal.
  const int64_t seg_bytes = a.seg / kIntBlock * kIntBlockBytes;
  const int64_t passes = ceil_div(a.segs * seg_bytes, kIntL1Bytes);
  const int64_t segs_per_pass = ceil_div(a.segs, passes);
  parallel_for(0, p.n, kIntRowChunk, [&](int64_t begin, int64_t end) {
    __m256 tot[kIntRowChunk];
    for (int64_t r0 = begin; r0 < end; r0 += kIntRowChunk) {
      const int64_t rows = std::min(kIntRowChunk, end - r0);
      for (int64_t r = 0; r < rows; ++r) tot[r] = _mm256_setzero_ps();
      for (int64_t s0 = 0; s0 < a.segs; s0 += segs_per_pass) {
        const int64_t s1 = std::min(a.segs, s0 + segs_per_pass);
        int64_t r = 0;
        for (; r + 2 <= rows; r += 2) int_rows<2>(p, a, r0 + r, s0, s1, tot + r);
        if (r < rows) int_rows<1>(p, a, r0 + r, s0, s1, tot + r);
      }
      for (int64_t r = 0; r < rows; ++r) store(p, 0, r0 + r, lane_sum(tot[r]), x_scale);
    }
  });
}
#endif

void gemv(const GemmParams& p, const Fp8Rows& rows) {
#ifdef SLAB_W4A8_AVX2
  // One row only: with more rows the float path shares each weight conversion between them,
  // while the integer path's cost (three planes) grows with every row.
  if (p.m == 1 && p.group % kIntBlock == 0) {
    if (const auto a = int_activations(p, rows)) {
      gemv_int(p, *a, rows.scale);
      return;
    }
  }
#endif
  const std::vector<float> x = decode_activations(p, rows, /*gemv_order=*/
#ifdef SLAB_W4A8_AVX2
                                                  true
#else
                                                  false
#endif
  );
  const int64_t groups = p.k / p.group, row_bytes = p.k / 2;
  parallel_for(0, p.n, 16, [&](int64_t begin, int64_t end) {
    float out[4];
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* w = p.w + n * row_bytes;
      const float* ws = p.w_scales + n * groups;
      for (int64_t m0 = 0; m0 < p.m;) {
        const float* xr = x.data() + m0 * p.k;
        const int64_t left = p.m - m0;
        const int mt = left >= 4 ? 4 : (left >= 2 ? 2 : 1);
        switch (mt) {
          case 4:
            row_dot<4>(w, ws, xr, p.k, p.group, out);
            break;
          case 2:
            row_dot<2>(w, ws, xr, p.k, p.group, out);
            break;
          default:
            row_dot<1>(w, ws, xr, p.k, p.group, out);
            break;
        }
        for (int t = 0; t < mt; ++t) store(p, m0 + t, n, out[t], rows.scale);
        m0 += mt;
      }
    }
  });
}

// ---- blocked path ------------------------------------------------------------------------------

// Decodes weight rows [n0, n0 + 16) into panel[k][16] (rows past n are zero) and their scales
// into scales[g][16]. AVX2: 8 rows x 32 columns (16 packed bytes each) at a time, the bytes
// transposed in registers so that one 8-byte lane holds one packed column of the 8 rows, whose two
// nibbles then become two 8-row fp32 vectors (sign-extended bytes, shifts); the columns past the
// last multiple of 32 through a byte -> float pair table.
void decode_panel(const GemmParams& p, int64_t n0, float* panel, float* scales) {
  const int64_t groups = p.k / p.group, row_bytes = p.k / 2;
  const int64_t rows = std::min(kBlockRows, p.n - n0);
  int64_t k_done = 0;
#ifdef SLAB_W4A8_AVX2
  k_done = p.k / 32 * 32;
  // The 8-row vectors of packed column c (low nibble: column 2c, high: 2c + 1), from the low 8 bytes of b.
  const auto store_column = [&](__m128i b, int64_t col, int64_t r0) {
    const __m256i v = _mm256_cvtepi8_epi32(b);
    _mm256_storeu_ps(panel + col * kBlockRows + r0,
                     _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 28), 28)));
    _mm256_storeu_ps(panel + (col + 1) * kBlockRows + r0, _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 4)));
  };
  for (int64_t r0 = 0; r0 < kBlockRows; r0 += 8) {
    for (int64_t k0 = 0; k0 < k_done; k0 += 32) {
      __m128i b[8];
      for (int64_t i = 0; i < 8; ++i)
        b[i] = r0 + i < rows
                   ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.w + (n0 + r0 + i) * row_bytes + k0 / 2))
                   : _mm_setzero_si128();
      // byte transpose: after three unpack levels t[j] holds packed columns 2j' and 2j' + 1 (see
      // below) of rows 0..7, 8 bytes each
      __m128i u[8], v[8];
      for (int i = 0; i < 4; ++i) {
        u[2 * i] = _mm_unpacklo_epi8(b[2 * i], b[2 * i + 1]);      // cols 0..7, rows 2i, 2i+1
        u[2 * i + 1] = _mm_unpackhi_epi8(b[2 * i], b[2 * i + 1]);  // cols 8..15
      }
      for (int h = 0; h < 2; ++h)                                                     // column half
        for (int q = 0; q < 2; ++q) {                                                 // row quad
          v[4 * h + 2 * q] = _mm_unpacklo_epi16(u[4 * q + h], u[4 * q + 2 + h]);      // cols 8h..8h+3, rows 4q..4q+3
          v[4 * h + 2 * q + 1] = _mm_unpackhi_epi16(u[4 * q + h], u[4 * q + 2 + h]);  // cols 8h+4..8h+7
        }
      for (int h = 0; h < 2; ++h)
        for (int e = 0; e < 2; ++e) {                                             // cols 8h + 4e .. 8h + 4e + 3
          const __m128i lo = _mm_unpacklo_epi32(v[4 * h + e], v[4 * h + 2 + e]);  // cols c, c+1, rows 0..7
          const __m128i hi = _mm_unpackhi_epi32(v[4 * h + e], v[4 * h + 2 + e]);  // cols c+2, c+3
          const int64_t c = 8 * h + 4 * e;
          store_column(lo, k0 + 2 * c, r0);
          store_column(_mm_srli_si128(lo, 8), k0 + 2 * (c + 1), r0);
          store_column(hi, k0 + 2 * (c + 2), r0);
          store_column(_mm_srli_si128(hi, 8), k0 + 2 * (c + 3), r0);
        }
    }
  }
#endif
  const auto& pairs = int4_pair_table();
  for (int64_t r = 0; r < kBlockRows; ++r) {
    for (int64_t b = k_done / 2; b < row_bytes; ++b) {
      const auto& v = r < rows ? pairs[p.w[(n0 + r) * row_bytes + b]] : pairs[0];  // rows past n: zeros
      panel[(2 * b) * kBlockRows + r] = v[0];
      panel[(2 * b + 1) * kBlockRows + r] = v[1];
    }
  }
  for (int64_t r = 0; r < kBlockRows; ++r)
    for (int64_t g = 0; g < groups; ++g)
      scales[g * kBlockRows + r] = r < rows ? p.w_scales[(n0 + r) * groups + g] : 0.0f;
}

// tot[t][16] += sum_g scales[g] * sum_{k in g} x[t][k] panel[k] for MB rows of x.
template <int MB>
void panel_micro(const float* panel, const float* scales, const float* x, int64_t k, int64_t group, float* tot) {
  const int64_t groups = k / group;
#ifdef SLAB_W4A8_AVX2
  for (int64_t g = 0; g < groups; ++g) {
    __m256 acc[MB][2];
    for (int t = 0; t < MB; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    const float* pk = panel + g * group * kBlockRows;
    const float* xg = x + g * group;
    for (int64_t kk = 0; kk < group; ++kk) {
      const __m256 w0 = _mm256_loadu_ps(pk + kk * kBlockRows), w1 = _mm256_loadu_ps(pk + kk * kBlockRows + 8);
      for (int t = 0; t < MB; ++t) {
        const __m256 xb = _mm256_broadcast_ss(xg + t * k + kk);
        acc[t][0] = _mm256_fmadd_ps(w0, xb, acc[t][0]);
        acc[t][1] = _mm256_fmadd_ps(w1, xb, acc[t][1]);
      }
    }
    const __m256 s0 = _mm256_loadu_ps(scales + g * kBlockRows), s1 = _mm256_loadu_ps(scales + g * kBlockRows + 8);
    for (int t = 0; t < MB; ++t) {
      float* tt = tot + t * kBlockRows;
      _mm256_storeu_ps(tt, _mm256_fmadd_ps(acc[t][0], s0, _mm256_loadu_ps(tt)));
      _mm256_storeu_ps(tt + 8, _mm256_fmadd_ps(acc[t][1], s1, _mm256_loadu_ps(tt + 8)));
    }
  }
#else
  for (int64_t g = 0; g < groups; ++g) {
    for (int t = 0; t < MB; ++t) {
      for (int64_t r = 0; r < kBlockRows; ++r) {
        float sum = 0.0f;
        for (int64_t kk = g * group; kk < (g + 1) * group; ++kk) sum += panel[kk * kBlockRows + r] * x[t * k + kk];
        tot[t * kBlockRows + r] += sum * scales[g * kBlockRows + r];
      }
    }
  }
#endif
}

void blocked(const GemmParams& p, const Fp8Rows& x_rows) {
  const std::vector<float> x = decode_activations(p, x_rows, /*gemv_order=*/false);
  const int64_t groups = p.k / p.group;
  const int64_t blocks = ceil_div(p.n, kBlockRows);
  parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> panel(static_cast<size_t>(p.k * kBlockRows));
    std::vector<float> scales(static_cast<size_t>(groups * kBlockRows));
    float tot[kTokenBlock * kBlockRows];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * kBlockRows, rows = std::min(kBlockRows, p.n - n0);
      decode_panel(p, n0, panel.data(), scales.data());
      for (int64_t m0 = 0; m0 < p.m; m0 += kTokenBlock) {
        const int64_t mb = std::min(kTokenBlock, p.m - m0);
        std::fill(tot, tot + kTokenBlock * kBlockRows, 0.0f);
        const float* xr = x.data() + m0 * p.k;
        switch (mb) {
          case 6:
            panel_micro<6>(panel.data(), scales.data(), xr, p.k, p.group, tot);
            break;
          case 5:
            panel_micro<5>(panel.data(), scales.data(), xr, p.k, p.group, tot);
            break;
          case 4:
            panel_micro<4>(panel.data(), scales.data(), xr, p.k, p.group, tot);
            break;
          case 3:
            panel_micro<3>(panel.data(), scales.data(), xr, p.k, p.group, tot);
            break;
          case 2:
            panel_micro<2>(panel.data(), scales.data(), xr, p.k, p.group, tot);
            break;
          default:
            panel_micro<1>(panel.data(), scales.data(), xr, p.k, p.group, tot);
            break;
        }
        for (int64_t t = 0; t < mb; ++t) store_row(p, m0 + t, n0, rows, tot + t * kBlockRows, x_rows.scale);
      }
    }
  });
}

}  // namespace

void quantize_fp8_cpu(const QuantFp8Params& p) {
  SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { quantize_fp8_impl<T>(p); });
}

// kPanel weights (n_pad, k_pad / 2) back in kRowMajor order (n, k / 2), for the float kernels.
static std::vector<uint8_t> unpanel(const GemmParams& p) {
  const int64_t row_bytes = p.k / 2;
  std::vector<uint8_t> rows(static_cast<size_t>(p.n * row_bytes));
  parallel_for(0, p.n, kPanelRows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t c = 0; c < row_bytes; ++c) rows[r * row_bytes + c] = p.w[panel_offset(r, c, p.k)];
  });
  return rows;
}

void gemm_cpu(const GemmParams& p) {
  const Fp8Rows x = fp8_rows(p);
  if (cpu::vnni_usable() && cpu::gemm_vnni(p, x)) return;
  // The float kernels read row-major weights: kPanel ones are reordered for this call (a copy:
  // on CPUs without AVX-512 VNNI, or for x with a NaN, or shapes the VNNI kernels do not take).
  std::vector<uint8_t> rows;
  GemmParams q = p;
  if (p.layout == kPanel) rows = unpanel(p), q.w = rows.data(), q.layout = kRowMajor;
  if (q.m <= kGemvMaxRows)
    gemv(q, x);
  else
    blocked(q, x);
}

void int4_to_e4m3_cpu(const uint16_t* in, int64_t words, uint32_t* out) {
  parallel_for(0, words, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = int4x4_to_e4m3x4(in[i]);
  });
}

void tile_weights_cpu(const uint8_t* src, int64_t n, int64_t k, uint8_t* dst) {
  const int64_t total = round_up(n, kTileRows) * round_up(k, kTileCols) / 2;
  parallel_for(0, total, 64 * kTileBytes, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) dst[i] = tiled_byte(src, n, k, i);
  });
}

}  // namespace slab::w4a8
