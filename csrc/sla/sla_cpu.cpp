// SLA CPU kernels. Parallel over (batch, head) slices; inside a slice the work is a sequence of
// small fp32 (fp64 for fp64 inputs) matrix products on chunks of tokens held in per-thread
// scratch, computed by a register-blocked micro-kernel (6 rows x 2 vectors of accumulators).
//
// Every scratch matrix has its dimensions padded to kPad (whole register blocks) and zero-filled,
// so padding rows / columns add nothing and the micro-kernel needs no column tails. Chunk rows
// past the end of the sequence are zero too, and so are the k and v rows of masked-out tokens
// (never read: padding may hold anything, even NaN, without reaching the outputs).

#include <algorithm>
#include <iterator>
#include <vector>

#include "core/cpu_types.h"
#include "sla/sla.h"
#include "sla/sla_math.h"

namespace slab::sla {
namespace {

constexpr int64_t kChunkCpu = 64;  // causal chunk: intra-chunk work grows with it, inter-chunk shrinks
constexpr int64_t kPad = 16;       // 2 AVX2 vectors of floats (4 of doubles)
constexpr int kRows = 6;           // micro-kernel rows: 6 x 2 accumulators + 2 loads + 1 broadcast <= 16 ymm

int64_t padded(int64_t n) { return (n + kPad - 1) / kPad * kPad; }

// Which part of a product is known to be zero (causal masks), so the kernel skips it:
//   kLowerA: A is lower triangular (row i has entries k <= i), kUpperA: upper (k >= i);
//   kLowerC: only C's lower triangle is wanted (blocks wholly above the diagonal are not written).
enum class Tri { kNone, kLowerA, kUpperA, kLowerC };

// c[R x 2W] (+)= a[R x k0..k1] b[k0..k1 x 2W]; element (r, k) of a at a[r * sar + k * sak] (A is
// only ever broadcast one element at a time, so a transposed A costs nothing), b and c row-major.
template <int R, typename A>
inline void micro_kernel(int64_t k0, int64_t k1, const A* a, int64_t sar, int64_t sak, const A* b, int64_t ldb, A* c,
                         int64_t ldc, bool accumulate) {
  using V = at::vec::Vectorized<A>;
  constexpr int64_t W = V::size();
  V acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) {
    acc0[r] = accumulate ? V::loadu(c + r * ldc) : V(A(0));
    acc1[r] = accumulate ? V::loadu(c + r * ldc + W) : V(A(0));
  }
  for (int64_t k = k0; k < k1; ++k) {
    const V b0 = V::loadu(b + k * ldb), b1 = V::loadu(b + k * ldb + W);
    for (int r = 0; r < R; ++r) {
      const V av(a[r * sar + k * sak]);
      acc0[r] = at::vec::fmadd(av, b0, acc0[r]);
      acc1[r] = at::vec::fmadd(av, b1, acc1[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    acc0[r].store(c + r * ldc);
    acc1[r].store(c + r * ldc + W);
  }
}

// C[m x n] (+)= op(A)[m x k] B[k x n], B and C row-major, n a multiple of kPad; op(A) = A (row-major
// m x k, leading dim lda) or, with a_trans, the transpose of a row-major k x m matrix.
template <typename A>
void gemm_op(int64_t m, int64_t n, int64_t k, const A* a, int64_t lda, bool a_trans, const A* b, int64_t ldb, A* c,
             int64_t ldc, bool accumulate, Tri tri) {
  const int64_t sar = a_trans ? 1 : lda, sak = a_trans ? lda : 1;
  constexpr int64_t nb = 2 * at::vec::Vectorized<A>::size();
  for (int64_t i0 = 0; i0 < m; i0 += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, m - i0));
    int64_t k0 = 0, k1 = k, n1 = n;
    if (tri == Tri::kLowerA) k1 = std::min(k, i0 + rows);
    if (tri == Tri::kUpperA) k0 = std::min(k, i0);
    if (tri == Tri::kLowerC) n1 = std::min(n, (i0 + rows + nb - 1) / nb * nb);
    const A* ai = a + i0 * sar;
    A* ci = c + i0 * ldc;
    for (int64_t j0 = 0; j0 < n1; j0 += nb) {
      switch (rows) {
        case 6:
          micro_kernel<6>(k0, k1, ai, sar, sak, b + j0, ldb, ci + j0, ldc, accumulate);
          break;
        case 5:
          micro_kernel<5>(k0, k1, ai, sar, sak, b + j0, ldb, ci + j0, ldc, accumulate);
          break;
        case 4:
          micro_kernel<4>(k0, k1, ai, sar, sak, b + j0, ldb, ci + j0, ldc, accumulate);
          break;
        case 3:
          micro_kernel<3>(k0, k1, ai, sar, sak, b + j0, ldb, ci + j0, ldc, accumulate);
          break;
        case 2:
          micro_kernel<2>(k0, k1, ai, sar, sak, b + j0, ldb, ci + j0, ldc, accumulate);
          break;
        default:
          micro_kernel<1>(k0, k1, ai, sar, sak, b + j0, ldb, ci + j0, ldc, accumulate);
          break;
      }
    }
  }
}

template <typename A>
void gemm(int64_t m, int64_t n, int64_t k, const A* a, int64_t lda, const A* b, int64_t ldb, A* c, int64_t ldc,
          bool accumulate, Tri tri = Tri::kNone) {
  gemm_op(m, n, k, a, lda, false, b, ldb, c, ldc, accumulate, tri);
}

// C (+)= A^T B with A stored row-major as k x m (leading dim lda).
template <typename A>
void gemm_tn(int64_t m, int64_t n, int64_t k, const A* a, int64_t lda, const A* b, int64_t ldb, A* c, int64_t ldc,
             bool accumulate, Tri tri = Tri::kNone) {
  gemm_op(m, n, k, a, lda, true, b, ldb, c, ldc, accumulate, tri);
}

// dst (cols x rows) = src (rows x cols)^T; both padded, so the padding is copied (as zeros) too.
template <typename A>
void transpose(const A* src, int64_t ld_src, int64_t rows, int64_t cols, A* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
  }
}

// Zeroes P[i][j] for j > i (the future tokens of a causal chunk), rows < m, columns < n.
template <typename A>
void zero_upper(A* p, int64_t ld, int64_t m, int64_t n) {
  for (int64_t i = 0; i < m; ++i) std::fill(p + i * ld + std::min(n, i + 1), p + i * ld + n, A(0));
}

enum class Feature { kRaw, kPhi };

// Rows [0, rows) of a strided (rows, cols) slice into dst (ld columns, rows_pad rows), widened to
// the accumulation type; phi applied for kPhi; a row whose keep flag is false becomes zero (a
// masked-out key). Rows past `rows` and columns past `cols` are zeroed.
template <typename T>
void load_rows(const T* src, int64_t stride, int64_t rows, int64_t cols, acc_t<T>* dst, int64_t ld, int64_t rows_pad,
               Feature f, const bool* keep = nullptr) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  constexpr int64_t W = kVecWidth<T>;
  for (int64_t r = 0; r < rows; ++r) {
    A* out = dst + r * ld;
    if (keep != nullptr && !keep[r]) {
      std::fill(out, out + ld, A(0));
      continue;
    }
    const T* in = src + r * stride;
    for (int64_t c = 0; c < ld; c += W) {
      V x = c + W <= cols ? load_vec(in + c) : (c < cols ? load_vec_n(in + c, cols - c) : V(A(0)));
      if (f == Feature::kPhi) x = at::vec::maximum(x, V(A(0)));  // phi on a vector (NaN propagates)
      x.store(out + c);
    }
  }
  std::fill(dst + rows * ld, dst + rows_pad * ld, A(0));
}

// dst row r (cols values, contiguous rows of dst_ld) = src row r * scale[r] (scale null: 1),
// times phi'(gate row r) when gate is given (gate holds phi(x): 1 where positive, else 0).
template <typename T>
void store_rows(const acc_t<T>* src, int64_t ld, int64_t rows, int64_t cols, T* dst, int64_t dst_ld,
                const acc_t<T>* scale = nullptr, const acc_t<T>* gate = nullptr) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  constexpr int64_t W = kVecWidth<T>;
  const V zero(A(0)), one(A(1));
  for (int64_t r = 0; r < rows; ++r) {
    const V s(scale != nullptr ? scale[r] : A(1));
    for (int64_t c = 0; c < cols; c += W) {
      V x = V::loadu(src + r * ld + c) * s;
      if (gate != nullptr) x = x * V::blendv(zero, one, V::loadu(gate + r * ld + c) > zero);
      if (c + W <= cols)
        store_vec(dst + r * dst_ld + c, x);
      else
        store_vec_n(dst + r * dst_ld + c, cols - c, x);
    }
  }
}

// a . b over n values, n a multiple of the vector width (padded scratch rows).
template <typename A>
A dot(const A* a, const A* b, int64_t n) {
  using V = at::vec::Vectorized<A>;
  V acc(A(0));
  for (int64_t i = 0; i < n; i += V::size()) acc = at::vec::fmadd(V::loadu(a + i), V::loadu(b + i), acc);
  return at::vec::vec_reduce_all<A>(std::plus<V>(), acc);
}

template <typename A>
A sum(const A* a, int64_t n) {  // n a multiple of the vector width
  using V = at::vec::Vectorized<A>;
  V acc(A(0));
  for (int64_t i = 0; i < n; i += V::size()) acc = acc + V::loadu(a + i);
  return at::vec::vec_reduce_all<A>(std::plus<V>(), acc);
}

// y[0:n] += sum_r w[r] x[r][0:n] over `rows` rows of x (leading dim ld); w null: weights 1. n a
// multiple of the vector width.
template <typename A>
void add_rows(const A* x, int64_t ld, int64_t rows, int64_t n, const A* w, A* y) {
  using V = at::vec::Vectorized<A>;
  for (int64_t c = 0; c < n; c += V::size()) {
    V acc = V::loadu(y + c);
    for (int64_t r = 0; r < rows; ++r) {
      const V xv = V::loadu(x + r * ld + c);
      acc = w != nullptr ? at::vec::fmadd(V(w[r]), xv, acc) : acc + xv;
    }
    acc.store(y + c);
  }
}

// Per-thread scratch of one slice's chunk: features (and their transposes), the chunk's score
// matrices, outputs and the running states. Allocated once per parallel task.
template <typename A>
struct Scratch {
  int64_t cp, dp, vp;  // padded chunk length, D, Dv
  std::vector<A> buf;
  A *q, *k, *kt, *v, *vt, *g, *gden, *den, *p, *dp_, *out_d, *out_v;
  A *S, *St, *z, *dS, *dSt, *dz;

  Scratch(int64_t chunk, int64_t dim, int64_t vdim) : cp(padded(chunk)), dp(padded(dim)), vp(padded(vdim)) {
    const int64_t sizes[] = {cp * dp, cp * dp, dp * cp, cp * vp, vp * cp, cp * vp, cp,      cp,      cp * cp,
                             cp * cp, cp * dp, cp * vp, dp * vp, vp * dp, dp,      dp * vp, vp * dp, dp};
    A** ptrs[] = {&q, &k, &kt, &v, &vt, &g, &gden, &den, &p, &dp_, &out_d, &out_v, &S, &St, &z, &dS, &dSt, &dz};
    int64_t total = 0;
    for (int64_t s : sizes) total += s;
    buf.assign(total, A(0));
    A* at = buf.data();
    for (size_t i = 0; i < std::size(ptrs); ++i) {
      *ptrs[i] = at;
      at += sizes[i];
    }
  }
  void zero_state() {
    std::fill(S, S + dp * vp, A(0));
    std::fill(z, z + dp, A(0));
    std::fill(dS, dS + dp * vp, A(0));
    std::fill(dz, dz + dp, A(0));
  }
};

// The (b, h) slice of a tensor described by strides.
template <typename T>
const T* slice(const void* base, const RowStrides& s, int64_t b, int64_t h) {
  return static_cast<const T*>(base) + b * s.b + h * s.h;
}

// State of the slice (S, z over every kept token) into the outputs.
template <typename A>
void write_state(const Scratch<A>& w, int64_t dim, int64_t vdim, A* state, A* z) {
  for (int64_t d = 0; d < dim; ++d) std::copy(w.S + d * w.vp, w.S + d * w.vp + vdim, state + d * vdim);
  std::copy(w.z, w.z + dim, z);
}

// ---- forward ----------------------------------------------------------------------------------------

// The views of one slice the forward reads and writes.
template <typename T>
struct FwdSlice {
  const T *q, *k, *v;
  const bool* keep;
  T* o;
  acc_t<T>* den;

  FwdSlice(const SlaFwdParams& p, int64_t b, int64_t h) {
    const int64_t bh = b * p.s.heads + h, N = p.s.len;
    q = slice<T>(p.q, p.q_stride, b, h);
    k = slice<T>(p.k, p.k_stride, b, h);
    v = slice<T>(p.v, p.v_stride, b, h);
    keep = p.mask != nullptr ? p.mask + b * N : nullptr;
    o = static_cast<T*>(p.o) + bh * N * p.s.vdim;
    den = static_cast<acc_t<T>*>(p.den) + bh * N;
  }
};

// Chunked forward of one slice. kCausal: chunks of `chunk` tokens with the running state;
// otherwise (the quadratic non-causal order) one chunk holding the whole sequence.
template <typename T, bool kCausal>
void fwd_chunked(const SlaFwdParams& p, int64_t b, int64_t h, int64_t chunk, Scratch<acc_t<T>>& w) {
  using A = acc_t<T>;
  const auto [B, H, N, D, Dv] = p.s;
  const int64_t cp = w.cp, dp = w.dp, vp = w.vp, bh = b * H + h;
  const auto [q, k, v, keep, o, den_out] = FwdSlice<T>(p, b, h);
  const A eps = static_cast<A>(p.eps);
  constexpr Tri lower_c = kCausal ? Tri::kLowerC : Tri::kNone, lower_a = kCausal ? Tri::kLowerA : Tri::kNone;
  w.zero_state();
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t L = std::min(chunk, N - n0);
    load_rows(q + n0 * p.q_stride.n, p.q_stride.n, L, D, w.q, dp, cp, Feature::kPhi);
    load_rows(k + n0 * p.k_stride.n, p.k_stride.n, L, D, w.k, dp, cp, Feature::kPhi, keep ? keep + n0 : nullptr);
    load_rows(v + n0 * p.v_stride.n, p.v_stride.n, L, Dv, w.v, vp, cp, Feature::kRaw, keep ? keep + n0 : nullptr);
    transpose(w.k, dp, cp, dp, w.kt, cp);
    gemm(L, cp, D, w.q, dp, w.kt, cp, w.p, cp, false, lower_c);  // P = phi(Q) phi(K)^T
    if (kCausal) zero_upper(w.p, cp, L, cp);
    const bool first = n0 == 0;
    if (!first) gemm(L, vp, D, w.q, dp, w.S, vp, w.out_v, vp, false);  // earlier chunks: phi(Q) S
    gemm(L, vp, L, w.p, cp, w.v, vp, w.out_v, vp, !first, lower_a);    // this chunk: P V
    for (int64_t i = 0; i < L; ++i) {
      const A d = denominator(sum(w.p + i * cp, cp) + dot(w.q + i * dp, w.z, dp), eps);
      den_out[n0 + i] = d;
      w.den[i] = A(1) / d;
    }
    store_rows<T>(w.out_v, vp, L, Dv, o + n0 * Dv, Dv, w.den);
    gemm_tn(D, vp, L, w.k, dp, w.v, vp, w.S, vp, true);  // S += phi(K)^T V
    add_rows(w.k, dp, L, dp, static_cast<const A*>(nullptr), w.z);
  }
  write_state(w, D, Dv, static_cast<A*>(p.state) + bh * D * Dv, static_cast<A*>(p.z) + bh * D);
}

// Two-pass non-causal forward (long sequences): S, z over every chunk, then o = phi(Q) S / den.
template <typename T>
void fwd_linear(const SlaFwdParams& p, int64_t b, int64_t h, int64_t chunk, Scratch<acc_t<T>>& w) {
  using A = acc_t<T>;
  const auto [B, H, N, D, Dv] = p.s;
  const int64_t cp = w.cp, dp = w.dp, vp = w.vp, bh = b * H + h;
  const auto [q, k, v, keep, o, den_out] = FwdSlice<T>(p, b, h);
  const A eps = static_cast<A>(p.eps);
  w.zero_state();
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t L = std::min(chunk, N - n0);
    load_rows(k + n0 * p.k_stride.n, p.k_stride.n, L, D, w.k, dp, cp, Feature::kPhi, keep ? keep + n0 : nullptr);
    load_rows(v + n0 * p.v_stride.n, p.v_stride.n, L, Dv, w.v, vp, cp, Feature::kRaw, keep ? keep + n0 : nullptr);
    gemm_tn(D, vp, L, w.k, dp, w.v, vp, w.S, vp, true);
    add_rows(w.k, dp, L, dp, static_cast<const A*>(nullptr), w.z);
  }
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t L = std::min(chunk, N - n0);
    load_rows(q + n0 * p.q_stride.n, p.q_stride.n, L, D, w.q, dp, cp, Feature::kPhi);
    gemm(L, vp, D, w.q, dp, w.S, vp, w.out_v, vp, false);
    for (int64_t i = 0; i < L; ++i) {
      const A d = denominator(dot(w.q + i * dp, w.z, dp), eps);
      den_out[n0 + i] = d;
      w.den[i] = A(1) / d;
    }
    store_rows<T>(w.out_v, vp, L, Dv, o + n0 * Dv, Dv, w.den);
  }
  write_state(w, D, Dv, static_cast<A*>(p.state) + bh * D * Dv, static_cast<A*>(p.z) + bh * D);
}

// ---- backward ---------------------------------------------------------------------------------------

// The views of one slice the backward reads.
template <typename T>
struct BwdSlice {
  const T *q, *k, *v, *o, *go;
  const acc_t<T>* den;
  const bool* keep;
  T *dq, *dk, *dv;

  BwdSlice(const SlaBwdParams& p, int64_t b, int64_t h) {
    const int64_t bh = b * p.s.heads + h, N = p.s.len;
    q = slice<T>(p.q, p.q_stride, b, h);
    k = slice<T>(p.k, p.k_stride, b, h);
    v = slice<T>(p.v, p.v_stride, b, h);
    o = slice<T>(p.o, p.o_stride, b, h);
    go = slice<T>(p.grad_o, p.grad_o_stride, b, h);
    den = static_cast<const acc_t<T>*>(p.den) + bh * N;
    keep = p.mask != nullptr ? p.mask + b * N : nullptr;
    dq = static_cast<T*>(p.dq) + bh * N * p.s.dim;
    dk = static_cast<T*>(p.dk) + bh * N * p.s.dim;
    dv = static_cast<T*>(p.dv) + bh * N * p.s.vdim;
  }
};

// Loads what the chunk [n0, n0 + L) needs: q -> phi(q), k -> phi(k) and v (0 where masked), and
// g = grad_o / den, gden = -(grad_o . o) / den.
template <typename T>
void load_bwd_chunk(const SlaBwdParams& p, const BwdSlice<T>& s, int64_t n0, int64_t L, Scratch<acc_t<T>>& w) {
  using A = acc_t<T>;
  const int64_t D = p.s.dim, Dv = p.s.vdim, cp = w.cp;
  load_rows(s.q + n0 * p.q_stride.n, p.q_stride.n, L, D, w.q, w.dp, cp, Feature::kPhi);
  load_rows(s.k + n0 * p.k_stride.n, p.k_stride.n, L, D, w.k, w.dp, cp, Feature::kPhi, s.keep ? s.keep + n0 : nullptr);
  load_rows(s.v + n0 * p.v_stride.n, p.v_stride.n, L, Dv, w.v, w.vp, cp, Feature::kRaw, s.keep ? s.keep + n0 : nullptr);
  load_rows(s.go + n0 * p.grad_o_stride.n, p.grad_o_stride.n, L, Dv, w.g, w.vp, cp, Feature::kRaw);
  load_rows(s.o + n0 * p.o_stride.n, p.o_stride.n, L, Dv, w.out_v, w.vp, cp, Feature::kRaw);
  using V = at::vec::Vectorized<A>;
  for (int64_t i = 0; i < L; ++i) {
    const A inv = A(1) / s.den[n0 + i];
    A* g = w.g + i * w.vp;
    w.gden[i] = grad_den(dot(g, w.out_v + i * w.vp, w.vp), inv);
    for (int64_t c = 0; c < w.vp; c += V::size()) (V::loadu(g + c) * V(inv)).store(g + c);
  }
  std::fill(w.gden + L, w.gden + cp, A(0));
}

// dP = g V^T + gden (the gradient of the chunk's scores), masked like P.
template <typename A, bool kCausal>
void chunk_dscores(Scratch<A>& w, int64_t L, int64_t Dv) {
  const int64_t cp = w.cp;
  transpose(w.v, w.vp, cp, w.vp, w.vt, cp);
  gemm(L, cp, Dv, w.g, w.vp, w.vt, cp, w.dp_, cp, false, kCausal ? Tri::kLowerC : Tri::kNone);
  for (int64_t i = 0; i < L; ++i) {
    const int64_t end = kCausal ? i + 1 : L;
    for (int64_t j = 0; j < end; ++j) w.dp_[i * cp + j] += w.gden[i];
  }
  if (kCausal) zero_upper(w.dp_, cp, L, cp);
}

// dk and dv of one slice: the chunks from last to first with the reverse running dS, dz.
template <typename T, bool kCausal>
void bwd_dkdv(const SlaBwdParams& p, const BwdSlice<T>& s, int64_t chunk, Scratch<acc_t<T>>& w) {
  const int64_t N = p.s.len, D = p.s.dim, Dv = p.s.vdim, cp = w.cp, dp = w.dp, vp = w.vp;
  constexpr Tri upper_a = kCausal ? Tri::kUpperA : Tri::kNone;
  w.zero_state();
  const int64_t chunks = (N + chunk - 1) / chunk;
  for (int64_t c = chunks - 1; c >= 0; --c) {
    const int64_t n0 = c * chunk, L = std::min(chunk, N - n0);
    const bool last = c == chunks - 1;
    load_bwd_chunk(p, s, n0, L, w);
    transpose(w.k, dp, cp, dp, w.kt, cp);
    gemm(L, cp, D, w.q, dp, w.kt, cp, w.p, cp, false, kCausal ? Tri::kLowerC : Tri::kNone);
    if (kCausal) zero_upper(w.p, cp, L, cp);
    chunk_dscores<acc_t<T>, kCausal>(w, L, Dv);
    gemm_tn(L, dp, L, w.dp_, cp, w.q, dp, w.out_d, dp, false, upper_a);  // dphi(K) = dP^T phi(Q)
    gemm_tn(L, vp, L, w.p, cp, w.g, vp, w.out_v, vp, false, upper_a);    // dV = P^T g
    if (!last) {  // later chunks: dphi(k_j) += dS v_j + dz, dv_j += dS^T phi(k_j)
      gemm(L, dp, Dv, w.v, vp, w.dSt, dp, w.out_d, dp, true);
      for (int64_t i = 0; i < L; ++i) {
        add_rows(w.dz, dp, 1, dp, static_cast<const acc_t<T>*>(nullptr), w.out_d + i * dp);
      }
      gemm(L, vp, D, w.k, dp, w.dS, vp, w.out_v, vp, true);
    }
    store_rows<T>(w.out_d, dp, L, D, s.dk + n0 * D, D, nullptr, w.k);
    store_rows<T>(w.out_v, vp, L, Dv, s.dv + n0 * Dv, Dv);
    if (c > 0) {
      gemm_tn(D, vp, L, w.q, dp, w.g, vp, w.dS, vp, true);  // dS += phi(Q)^T g
      add_rows(w.q, dp, L, dp, w.gden, w.dz);
      transpose(w.dS, vp, dp, vp, w.dSt, dp);
    }
  }
}

// dq of one slice: the chunks from first to last with the running S, z.
template <typename T, bool kCausal>
void bwd_dq(const SlaBwdParams& p, const BwdSlice<T>& s, int64_t chunk, Scratch<acc_t<T>>& w) {
  const int64_t N = p.s.len, D = p.s.dim, Dv = p.s.vdim, cp = w.cp, dp = w.dp, vp = w.vp;
  w.zero_state();
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t L = std::min(chunk, N - n0);
    load_bwd_chunk(p, s, n0, L, w);
    chunk_dscores<acc_t<T>, kCausal>(w, L, Dv);
    gemm(L, dp, L, w.dp_, cp, w.k, dp, w.out_d, dp, false, kCausal ? Tri::kLowerA : Tri::kNone);
    if (n0 > 0) {  // earlier chunks: dphi(q_i) += S g_i + z gden_i
      gemm(L, dp, Dv, w.g, vp, w.St, dp, w.out_d, dp, true);
      for (int64_t i = 0; i < L; ++i) add_rows(w.z, dp, 1, dp, w.gden + i, w.out_d + i * dp);
    }
    store_rows<T>(w.out_d, dp, L, D, s.dq + n0 * D, D, nullptr, w.q);
    if (n0 + L < N) {
      gemm_tn(D, vp, L, w.k, dp, w.v, vp, w.S, vp, true);
      add_rows(w.k, dp, L, dp, static_cast<const acc_t<T>*>(nullptr), w.z);
      transpose(w.S, vp, dp, vp, w.St, dp);
    }
  }
}

// Two-pass non-causal backward: S, z, dS, dz over all chunks, then every row's gradients.
template <typename T>
void bwd_linear(const SlaBwdParams& p, const BwdSlice<T>& s, int64_t chunk, Scratch<acc_t<T>>& w) {
  const int64_t N = p.s.len, D = p.s.dim, Dv = p.s.vdim, dp = w.dp, vp = w.vp;
  w.zero_state();
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t L = std::min(chunk, N - n0);
    load_bwd_chunk(p, s, n0, L, w);
    gemm_tn(D, vp, L, w.k, dp, w.v, vp, w.S, vp, true);
    add_rows(w.k, dp, L, dp, static_cast<const acc_t<T>*>(nullptr), w.z);
    gemm_tn(D, vp, L, w.q, dp, w.g, vp, w.dS, vp, true);
    add_rows(w.q, dp, L, dp, w.gden, w.dz);
  }
  transpose(w.S, vp, dp, vp, w.St, dp);
  transpose(w.dS, vp, dp, vp, w.dSt, dp);
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t L = std::min(chunk, N - n0);
    load_bwd_chunk(p, s, n0, L, w);
    gemm(L, dp, Dv, w.g, vp, w.St, dp, w.out_d, dp, false);  // dphi(q_i) = S g_i + z gden_i
    for (int64_t i = 0; i < L; ++i) add_rows(w.z, dp, 1, dp, w.gden + i, w.out_d + i * dp);
    store_rows<T>(w.out_d, dp, L, D, s.dq + n0 * D, D, nullptr, w.q);
    gemm(L, dp, Dv, w.v, vp, w.dSt, dp, w.out_d, dp, false);  // dphi(k_j) = dS v_j + dz
    for (int64_t i = 0; i < L; ++i) add_rows(w.dz, dp, 1, dp, static_cast<const acc_t<T>*>(nullptr), w.out_d + i * dp);
    store_rows<T>(w.out_d, dp, L, D, s.dk + n0 * D, D, nullptr, w.k);
    gemm(L, vp, D, w.k, dp, w.dS, vp, w.out_v, vp, false);  // dv_j = dS^T phi(k_j)
    store_rows<T>(w.out_v, vp, L, Dv, s.dv + n0 * Dv, Dv);
  }
}

// Chunk length and order: causal -> kChunkCpu; non-causal -> the whole sequence when the quadratic
// order is cheaper, else the two-pass form with kChunkCpu-token chunks.
struct Plan {
  int64_t chunk;
  bool quadratic;
};

Plan plan(const SlaShape& s, bool causal) {
  if (!causal && use_quadratic(s.len, s.dim, s.vdim)) return {std::max<int64_t>(s.len, 1), true};
  return {kChunkCpu, false};
}

template <typename T>
void fwd(const SlaFwdParams& p) {
  const Plan pl = plan(p.s, p.causal);
  parallel_for(0, p.s.batch * p.s.heads, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t<T>> w(pl.chunk, p.s.dim, p.s.vdim);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.s.heads, h = bh % p.s.heads;
      if (p.causal)
        fwd_chunked<T, true>(p, b, h, pl.chunk, w);
      else if (pl.quadratic)
        fwd_chunked<T, false>(p, b, h, pl.chunk, w);
      else
        fwd_linear<T>(p, b, h, pl.chunk, w);
    }
  });
}

template <typename T>
void bwd(const SlaBwdParams& p) {
  const Plan pl = plan(p.s, p.causal);
  parallel_for(0, p.s.batch * p.s.heads, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t<T>> w(pl.chunk, p.s.dim, p.s.vdim);
    for (int64_t bh = begin; bh < end; ++bh) {
      const BwdSlice<T> s(p, bh / p.s.heads, bh % p.s.heads);
      if (p.causal) {
        bwd_dkdv<T, true>(p, s, pl.chunk, w);
        bwd_dq<T, true>(p, s, pl.chunk, w);
      } else if (pl.quadratic) {
        bwd_dkdv<T, false>(p, s, pl.chunk, w);
        bwd_dq<T, false>(p, s, pl.chunk, w);
      } else {
        bwd_linear<T>(p, s, pl.chunk, w);
      }
    }
  });
}

// ---- decode step ------------------------------------------------------------------------------------

// Columns [c0, c0 + NV * W) of one slice's state: S[d] += phi(k_d) v and num += phi(q_d) S[d] row
// by row, with v and the column sums in registers (one pass over the state). A row with
// phi(k_d) = 0 is unchanged (read, not written) and one with phi(q_d) = 0 as well is not read:
// with ReLU features that skips a large part of the state traffic. (Exact, except that a NaN/Inf in
// v no longer reaches the rows of keys that are 0.)
template <int NV, typename A>
void step_columns(A* S, int64_t D, int64_t Dv, int64_t c0, const A* qf, const A* kf, const A* vf, A* num) {
  using V = at::vec::Vectorized<A>;
  constexpr int64_t W = V::size();
  V vv[NV], acc[NV];
  for (int j = 0; j < NV; ++j) {
    vv[j] = V::loadu(vf + c0 + j * W);
    acc[j] = V(A(0));
  }
  for (int64_t d = 0; d < D; ++d) {
    A* row = S + d * Dv + c0;
    const V qd(qf[d]);
    if (kf[d] == A(0)) {
      if (qf[d] == A(0)) continue;
      for (int j = 0; j < NV; ++j) acc[j] = at::vec::fmadd(qd, V::loadu(row + j * W), acc[j]);
      continue;
    }
    const V kd(kf[d]);
    for (int j = 0; j < NV; ++j) {
      const V s = at::vec::fmadd(kd, vv[j], V::loadu(row + j * W));
      s.store(row + j * W);
      acc[j] = at::vec::fmadd(qd, s, acc[j]);
    }
  }
  for (int j = 0; j < NV; ++j) acc[j].store(num + c0 + j * W);
}

// One token per slice: the state update and output column block by column block, then z.
template <typename T>
void step(const SlaStepParams& p) {
  using A = acc_t<T>;
  constexpr int64_t W = kVecWidth<T>;
  const int64_t D = p.dim, Dv = p.vdim, vp = padded(Dv);
  const A eps = static_cast<A>(p.eps);
  parallel_for(0, p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> qf(padded(D)), kf(padded(D)), vf(vp), num(vp);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.heads, h = bh % p.heads;
      load_rows(slice<T>(p.q, p.q_stride, b, h), 0, 1, D, qf.data(), padded(D), 1, Feature::kPhi);
      load_rows(slice<T>(p.k, p.k_stride, b, h), 0, 1, D, kf.data(), padded(D), 1, Feature::kPhi);
      load_rows(slice<T>(p.v, p.v_stride, b, h), 0, 1, Dv, vf.data(), vp, 1, Feature::kRaw);
      A* S = static_cast<A*>(p.state) + bh * D * Dv;
      A* z = static_cast<A*>(p.z) + bh * D;
      int64_t c0 = 0;
      for (; c0 + 4 * W <= Dv; c0 += 4 * W) step_columns<4>(S, D, Dv, c0, qf.data(), kf.data(), vf.data(), num.data());
      for (; c0 + W <= Dv; c0 += W) step_columns<1>(S, D, Dv, c0, qf.data(), kf.data(), vf.data(), num.data());
      for (int64_t c = c0; c < Dv; ++c) {  // the last columns, fewer than a vector
        A acc = 0;
        for (int64_t d = 0; d < D; ++d) {
          S[d * Dv + c] += kf[d] * vf[c];
          acc += qf[d] * S[d * Dv + c];
        }
        num[c] = acc;
      }
      A qz = 0;
      for (int64_t d = 0; d < D; ++d) {
        z[d] += kf[d];
        qz += qf[d] * z[d];
      }
      const A inv = A(1) / denominator(qz, eps);
      store_rows<T>(num.data(), vp, 1, Dv, static_cast<T*>(p.o) + bh * Dv, Dv, &inv);
    }
  });
}

}  // namespace

void sla_forward_cpu(const SlaFwdParams& p) {
  SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { fwd<T>(p); });
}
void sla_backward_cpu(const SlaBwdParams& p) {
  SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { bwd<T>(p); });
}
void sla_step_cpu(const SlaStepParams& p) {
  SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { step<T>(p); });
}

}  // namespace slab::sla
