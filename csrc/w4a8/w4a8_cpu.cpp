// W4A8 CPU kernels (row-major packed weights, Layout::kRowMajor).
//   quantize_fp8: per row, the absmax, then the e4m3 encoder of w4a8_math.h; x is read from memory
//     once (the second pass over a row hits L1).
//   gemm, few rows (m <= 8): streams the packed weights from memory once, row after row (parallel
//     over rows; rows of x in groups of up to 4, a second group re-reading the row from L1): 16 bytes = 32 int4 values
//     are widened to fp32 in four AVX2 vectors (shift-based sign extension of the nibbles) and multiplied with the
//     activations, which the prologue decoded once through a 256-entry e4m3 -> fp32 table into a per-32-block (even,
//     odd) column order matching the nibble order; per-group fp32 sums are scaled by the group scale.
//   gemm, more rows: per block of 16 weight rows, the int4 values are decoded once into an fp32
//     panel [k][16] (8 rows x 8 columns at a time, transposed in registers) and reused by every row of x (a 4 x 16
//     broadcast-FMA micro-kernel), again with one fp32 sum per group scaled by the group scale.
// Both compute y[m, n] = x_scale[m] * sum_g w_scale[n, g] * sum_{k in g} fp8(x)[m, k] int4(w)[n, k]
// (+ bias[n]) with fp32 accumulation; they differ only in the fp32 summation order.

#include <algorithm>
#include <array>
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
#include "w4a8/w4a8_math.h"

namespace slab::w4a8 {
namespace {

// x rows up to which the streaming GEMV path is used: it re-decodes the weights once per 4 rows
// of x, the blocked path decodes them once into a panel (a fixed cost worth ~8 GEMV rows here).
constexpr int64_t kGemvMaxRows = 8;
constexpr int64_t kBlockRows = 16;  // weight rows per panel of the blocked path
constexpr int64_t kTokenBlock = 4;  // x rows per micro-kernel call of the blocked path
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

// Quantizes one row: scale = absmax / 448 (1 for a zero row), codes = e4m3(x / scale).
template <typename T>
float quantize_row(const T* x, int64_t cols, uint8_t* q) {
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

// The e4m3 codes of x and their per-row scales: w4a8_gemm's inputs as given, or for w4a8_linear
// the rows quantized here with the same functions as quantize_fp8 (so linear == quantize_fp8 +
// gemm bit for bit).
struct Fp8Rows {
  std::vector<uint8_t> own;  // (m, k) when quantized here
  const uint8_t* codes;      // row r at codes + r * stride
  int64_t stride;
  std::vector<float> scale;  // (m)
};

template <typename T>
void quantize_rows_into(const GemmParams& p, std::vector<uint8_t>& codes, std::vector<float>& scale) {
  const T* x = static_cast<const T*>(p.x);
  parallel_for(0, p.m, std::max<int64_t>(1, 16384 / p.k), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) scale[r] = quantize_row(x + r * p.k, p.k, codes.data() + r * p.k);
  });
}

Fp8Rows fp8_rows(const GemmParams& p) {
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
void store_output(const GemmParams& p, int64_t row, int64_t col, float acc, const std::vector<float>& x_scale) {
  float v = x_scale[row] * acc;
  if (p.bias != nullptr) v += p.bias[col];
  static_cast<O*>(p.y)[row * p.n + col] = static_cast<O>(v);
}

void store(const GemmParams& p, int64_t row, int64_t col, float acc, const std::vector<float>& x_scale) {
  switch (p.out_dtype) {
    case DType::kFloat32:
      store_output<float>(p, row, col, acc, x_scale);
      break;
    case DType::kBFloat16:
      store_output<c10::BFloat16>(p, row, col, acc, x_scale);
      break;
    case DType::kFloat16:
      store_output<c10::Half>(p, row, col, acc, x_scale);
      break;
    case DType::kFloat64:
      store_output<double>(p, row, col, acc, x_scale);
      break;
  }
}

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
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, tot[t]);
    float r = 0.0f;
    for (float l : lanes) r += l;
    out[t] = r + tot_tail[t];
#else
    out[t] = tot[t] + tot_tail[t];
#endif
  }
}

#ifdef SLAB_W4A8_AVX2
// ---- integer GEMV path -------------------------------------------------------------------------
// An e4m3 value times 512 is an integer below 2^18 (e4m3_magnitude_units), split here into three
// 6-bit planes hi * 4096 + mid * 64 + lo. Each plane times the int4 weights is an exact int8 dot
// product (vpmaddubsw: unsigned plane byte x signed weight byte, x's sign moved onto the weight
// with vpsignb), summed exactly in int32 over a group and converted to float once per group --
// the same function as the float path with fewer roundings, and about half the instructions per
// weight (no int -> float conversion per weight). Used for one row of x, when groups are whole
// 64-column blocks (32 packed bytes per step) and x has no NaN (integers cannot carry it).
constexpr int64_t kIntBlock = 64;
constexpr int kPlanes = 3, kPlaneBits = 6;

// Position of column k in its 64-column block: the even columns (low nibbles) first, then the odd.
inline int64_t int_position(int64_t k) { return (k & ~int64_t(63)) + ((k & 1) << 5) + ((k & 63) >> 1); }

struct IntActivations {
  std::vector<uint8_t> planes;  // (kPlanes, k) in int_position order
  std::vector<int8_t> signs;    // (k): +1, -1 or 0
};

// The one row of x as planes and signs; none when some x code is NaN.
std::optional<IntActivations> int_activations(const GemmParams& p, const Fp8Rows& x) {
  IntActivations a;
  const uint8_t* codes = x.codes;
  a.planes.resize(static_cast<size_t>(kPlanes * p.k));
  a.signs.resize(static_cast<size_t>(p.k));
  for (int64_t k = 0; k < p.k; ++k) {
    if ((codes[k] & 0x7F) == 0x7F) return std::nullopt;
    const uint32_t units = e4m3_magnitude_units(codes[k]);
    const int64_t pos = int_position(k);
    for (int i = 0; i < kPlanes; ++i) a.planes[i * p.k + pos] = (units >> (kPlaneBits * i)) & 63u;
    a.signs[pos] = units == 0 ? 0 : ((codes[k] & 0x80) ? -1 : 1);
  }
  return a;
}

// sum_g scale[g] * sum_{k in g} int4(w[k]) x[k] for the one row of x, in integers per group.
float row_dot_int(const uint8_t* w, const float* ws, const IntActivations& a, int64_t k, int64_t group) {
  const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  // Nibble -> its two's-complement int4 value as a byte (vpshufb looks up each 128-bit half).
  const __m256i sign_extend = _mm256_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5,
                                               6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
  const auto load = [](const void* ptr) { return _mm256_loadu_si256(static_cast<const __m256i*>(ptr)); };
  __m256 tot = _mm256_setzero_ps();
  for (int64_t g = 0; g < k / group; ++g) {
    __m256i acc[kPlanes] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int64_t kk = g * group; kk < (g + 1) * group; kk += kIntBlock) {
      const __m256i bytes = load(w + kk / 2);
      const __m256i lo = _mm256_shuffle_epi8(sign_extend, _mm256_and_si256(bytes, nibble));
      const __m256i hi = _mm256_shuffle_epi8(sign_extend, _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble));
      const __m256i w_lo = _mm256_sign_epi8(lo, load(a.signs.data() + kk));
      const __m256i w_hi = _mm256_sign_epi8(hi, load(a.signs.data() + kk + 32));
      for (int i = 0; i < kPlanes; ++i) {
        const uint8_t* plane = a.planes.data() + i * k + kk;
        // Pair sums are at most 2 * 63 * 8: no int16 saturation.
        const __m256i pairs =
            _mm256_add_epi16(_mm256_maddubs_epi16(load(plane), w_lo), _mm256_maddubs_epi16(load(plane + 32), w_hi));
        acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(pairs, ones));
      }
    }
    // The planes combine in float: each plane's lane sums are exact int32 (< 2^22 per 2^13 columns), but
    // hi * 4096 + mid * 64 + lo overflows int32 for long groups (group_size -1 at K ~ 9000 and a row of
    // large values).
    __m256 units = _mm256_cvtepi32_ps(acc[2]);
    units = _mm256_fmadd_ps(units, _mm256_set1_ps(64.0f), _mm256_cvtepi32_ps(acc[1]));
    units = _mm256_fmadd_ps(units, _mm256_set1_ps(64.0f), _mm256_cvtepi32_ps(acc[0]));
    tot = _mm256_fmadd_ps(units, _mm256_set1_ps(ws[g] * (1.0f / 512.0f)), tot);  // units: 2^-9
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, tot);
  float r = 0.0f;
  for (float l : lanes) r += l;
  return r;
}

void gemv_int(const GemmParams& p, const IntActivations& a, const std::vector<float>& x_scale) {
  const int64_t groups = p.k / p.group, row_bytes = p.k / 2;
  parallel_for(0, p.n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      store(p, 0, n, row_dot_int(p.w + n * row_bytes, p.w_scales + n * groups, a, p.k, p.group), x_scale);
  });
}
#endif

void gemv(const GemmParams& p) {
  const Fp8Rows rows = fp8_rows(p);
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
// into scales[g][16].
#ifdef SLAB_W4A8_AVX2
// 8 consecutive int4 values (4 packed bytes, natural column order) of one row as 8 floats: the
// 32-bit word broadcast to every lane, lane j shifted right by 4 j, its low nibble sign-extended.
inline __m256 int4x8_natural(const uint8_t* w) {
  uint32_t word;
  std::memcpy(&word, w, sizeof(word));
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts);
  return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 28), 28));
}

// In-register 8 x 8 transpose: r[i] holds row i; afterwards r[j] holds column j.
inline void transpose8(__m256 (&r)[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {
    u[4 * h + 0] = _mm256_shuffle_ps(t[4 * h + 0], t[4 * h + 2], 0x44);
    u[4 * h + 1] = _mm256_shuffle_ps(t[4 * h + 0], t[4 * h + 2], 0xEE);
    u[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
    u[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x20);
    r[4 + j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x31);
  }
}
#endif

// Decodes weight rows [n0, n0 + 16) into panel[k][16] (rows past n are zero) and their scales
// into scales[g][16]. AVX2: 8 rows x 8 columns at a time, decoded along the rows and transposed
// in registers; the columns past the last multiple of 8 through a byte -> float pair table.
void decode_panel(const GemmParams& p, int64_t n0, float* panel, float* scales) {
  const int64_t groups = p.k / p.group, row_bytes = p.k / 2;
  const int64_t rows = std::min(kBlockRows, p.n - n0);
  int64_t k_done = 0;
#ifdef SLAB_W4A8_AVX2
  k_done = p.k / 8 * 8;
  for (int64_t r0 = 0; r0 < kBlockRows; r0 += 8) {
    for (int64_t k0 = 0; k0 < k_done; k0 += 8) {
      __m256 v[8];
      for (int64_t i = 0; i < 8; ++i)
        v[i] = r0 + i < rows ? int4x8_natural(p.w + (n0 + r0 + i) * row_bytes + k0 / 2) : _mm256_setzero_ps();
      transpose8(v);
      for (int64_t j = 0; j < 8; ++j) _mm256_storeu_ps(panel + (k0 + j) * kBlockRows + r0, v[j]);
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

void blocked(const GemmParams& p) {
  const Fp8Rows x_rows = fp8_rows(p);
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
        for (int64_t t = 0; t < mb; ++t)
          for (int64_t r = 0; r < rows; ++r) store(p, m0 + t, n0 + r, tot[t * kBlockRows + r], x_rows.scale);
      }
    }
  });
}

}  // namespace

void quantize_fp8_cpu(const QuantFp8Params& p) {
  SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { quantize_fp8_impl<T>(p); });
}

void gemm_cpu(const GemmParams& p) {
  if (p.m <= kGemvMaxRows)
    gemv(p);
  else
    blocked(p);
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
