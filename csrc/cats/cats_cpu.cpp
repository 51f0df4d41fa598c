// CATS CPU kernels: elementwise cats / its backward with at::vec; the sparse gated MLP for
// decoding (gate + up GEMV in parallel over neuron rows, then the down projection streamed over
// the kept rows of w_down_t, in parallel over chunks of kept rows with per-chunk partial sums);
// token sparsity (order-keeping top-k index per sequence, row gather / scatter).

#include <algorithm>
#include <cmath>
#include <vector>

#include "cats/cats.h"
#include "cats/cats_math.h"
#include "core/cpu_types.h"

namespace slab::cats {
namespace {

constexpr int64_t kElemGrain = 16384;    // elements per elementwise task
constexpr int64_t kRowGrain = 16;        // neurons per gate/up task
constexpr int64_t kPrefetchBytes = 512;  // distance of the software prefetch in weight streams

// ---- elementwise cats and its backward ---------------------------------------------------------

template <typename T>
void cats_forward(const CatsParams& p) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  const auto* x = static_cast<const T*>(p.x);
  auto* y = static_cast<T*>(p.y);
  const V t(static_cast<A>(p.threshold)), zero(0);
  parallel_for(0, p.n, kElemGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i += kVecWidth<T>) {
      const int64_t n = std::min(end, i + kVecWidth<T>);
      const V v = load_at(x, i, n);
      const V s = silu_from_sigmoid(v, sigmoid_from_exp(exp_vec(v.neg())));
      store_at(y, i, n, V::blendv(zero, s, keep(s, t)));
    }
  });
}

template <typename T>
void cats_backward(const CatsBwdParams& p) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  const auto* x = static_cast<const T*>(p.x);
  const auto* dy = static_cast<const T*>(p.dy);
  auto* dx = static_cast<T*>(p.dx);
  const V t(static_cast<A>(p.threshold)), zero(0);
  parallel_for(0, p.n, kElemGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i += kVecWidth<T>) {
      const int64_t n = std::min(end, i + kVecWidth<T>);
      const V v = load_at(x, i, n), g = load_at(dy, i, n);
      const V sig = sigmoid_from_exp(exp_vec(v.neg()));
      const V d = g * silu_grad_from_sigmoid(v, sig);
      store_at(dx, i, n, V::blendv(zero, d, keep(silu_from_sigmoid(v, sig), t)));
    }
  });
}

// ---- sparse gated MLP ---------------------------------------------------------------------------

// Dot products of R weight rows with G tokens (x already widened to the accumulation type and
// zero-padded to whole vectors): out[r * out_stride + g] = rows[r] . x[g]. Several rows at once
// keep several DRAM streams in flight (one sequential stream per core does not reach the memory
// bandwidth) and share every x load between the rows.
template <int R, int G, typename T>
void dot_rows(const T* const* rows, const acc_t<T>* x, int64_t x_stride, int64_t dim, acc_t<T>* out,
              int64_t out_stride) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  constexpr int64_t vw = kVecWidth<T>;
  V acc[R][G];
  for (int r = 0; r < R; ++r) {
    for (int g = 0; g < G; ++g) acc[r][g] = V(0);
  }
  int64_t d = 0;
  for (; d + vw <= dim; d += vw) {
    V w[R];
    for (int r = 0; r < R; ++r) {
      __builtin_prefetch(reinterpret_cast<const char*>(rows[r] + d) + kPrefetchBytes, 0, 0);
      w[r] = load_vec(rows[r] + d);
    }
    for (int g = 0; g < G; ++g) {
      const V xv = V::loadu(x + g * x_stride + d);
      for (int r = 0; r < R; ++r) acc[r][g] = at::vec::fmadd(w[r], xv, acc[r][g]);
    }
  }
  if (d < dim) {  // x is zero past dim, so the zero-padded tail adds nothing
    for (int g = 0; g < G; ++g) {
      const V xv = V::loadu(x + g * x_stride + d);
      for (int r = 0; r < R; ++r) acc[r][g] = at::vec::fmadd(load_vec_n(rows[r] + d, dim - d), xv, acc[r][g]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int g = 0; g < G; ++g) out[r * out_stride + g] = at::vec::vec_reduce_all<A>(std::plus<V>(), acc[r][g]);
  }
}

// out[r * kMaxTokens + m] = rows[r] . x[m] for R rows and every token, two tokens per pass over
// the rows (R * 2 accumulators stay in registers).
template <int R, typename T>
void dot_block(const T* const* rows, const acc_t<T>* x, int64_t x_stride, int64_t dim, int64_t tokens, acc_t<T>* out) {
  int64_t m = 0;
  for (; m + 2 <= tokens; m += 2) dot_rows<R, 2>(rows, x + m * x_stride, x_stride, dim, out + m, kMaxTokens);
  if (m < tokens) dot_rows<R, 1>(rows, x + m * x_stride, x_stride, dim, out + m, kMaxTokens);
}

template <typename T>
void dot_any(int n, const T* const* rows, const acc_t<T>* x, int64_t x_stride, int64_t dim, int64_t tokens,
             acc_t<T>* out) {
  switch (n) {
    case 4:
      dot_block<4>(rows, x, x_stride, dim, tokens, out);
      break;
    case 3:
      dot_block<3>(rows, x, x_stride, dim, tokens, out);
      break;
    case 2:
      dot_block<2>(rows, x, x_stride, dim, tokens, out);
      break;
    case 1:
      dot_block<1>(rows, x, x_stride, dim, tokens, out);
      break;
    default:
      break;
  }
}

constexpr int kRowBlock = 4;  // weight rows streamed together in the gate / up GEMVs

// Gate GEMV + silu + threshold for every neuron; up GEMV only for neurons some token keeps.
// act[f, m] = cats(gate)[m] * up[m] (0 for a token that drops the neuron), keep[f] = union.
template <typename T>
void gate_up(const MlpParams& p, const acc_t<T>* x, int64_t x_stride) {
  using A = acc_t<T>;
  const int64_t M = p.tokens, D = p.dim;
  const auto* wg = static_cast<const T*>(p.w_gate);
  const auto* wu = static_cast<const T*>(p.w_up);
  auto* act = static_cast<A*>(p.act);
  const A t = static_cast<A>(p.threshold);
  parallel_for(0, p.features, kRowGrain, [&](int64_t begin, int64_t end) {
    A gate[kRowBlock][kMaxTokens], up[kRowBlock][kMaxTokens];
    for (int64_t f0 = begin; f0 < end; f0 += kRowBlock) {
      const int n = static_cast<int>(std::min<int64_t>(kRowBlock, end - f0));
      const T* rows[kRowBlock];
      for (int r = 0; r < n; ++r) rows[r] = wg + (f0 + r) * D;
      dot_any(n, rows, x, x_stride, D, M, &gate[0][0]);
      int kept[kRowBlock], nkept = 0;
      for (int r = 0; r < n; ++r) {
        bool any = false;
        for (int64_t m = 0; m < M; ++m) {
          const A g = gate[r][m];
          const A s = silu_from_sigmoid(g, sigmoid_from_exp(A(std::exp(-g))));
          const bool k = keep(s, t);
          gate[r][m] = k ? s : A(0);
          any = any || k;
        }
        p.keep[f0 + r] = any;
        if (any) kept[nkept++] = r;
      }
      // Up rows of the kept neurons only: a dropped neuron's W_up row is never read.
      for (int i = 0; i < nkept; ++i) rows[i] = wu + (f0 + kept[i]) * D;
      dot_any(nkept, rows, x, x_stride, D, M, &up[0][0]);
      for (int i = 0; i < nkept; ++i) {
        const int r = kept[i];
        for (int64_t m = 0; m < M; ++m) act[(f0 + r) * M + m] = gate[r][m] * up[i][m];
      }
    }
  });
}

// Accumulates G tokens x NV vectors of columns [c, c + NV * vw) over kept rows [r0, r1): the
// accumulators stay in registers across the rows, so the column accumulators in memory are
// touched once per row tile instead of once per row.
template <int G, int NV, typename T>
void down_block(const T* wd, const acc_t<T>* act, const int64_t* kept, int64_t r0, int64_t r1, int64_t dim,
                int64_t tokens, int64_t c, int64_t end, acc_t<T>* acc, int64_t acc_stride) {
  using V = AccVec<T>;
  constexpr int64_t vw = kVecWidth<T>;
  V a[G][NV];
  for (int g = 0; g < G; ++g) {
    for (int j = 0; j < NV; ++j) a[g][j] = V::loadu(acc + g * acc_stride + j * vw);
  }
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = wd + kept[r] * dim;
    V w[NV];
    for (int j = 0; j < NV; ++j) {
      const int64_t col = c + j * vw;
      w[j] = col < end ? load_at(row, col, end) : V(0);
    }
    for (int g = 0; g < G; ++g) {
      const V s(act[kept[r] * tokens + g]);
      for (int j = 0; j < NV; ++j) a[g][j] = at::vec::fmadd(s, w[j], a[g][j]);
    }
  }
  for (int g = 0; g < G; ++g) {
    for (int j = 0; j < NV; ++j) a[g][j].store(acc + g * acc_stride + j * vw);
  }
}

// G tokens (1..4) starting at token m: two vectors of columns per step when G is large (8
// accumulators), four when it is small.
template <int G, typename T>
void down_tokens(const T* wd, const acc_t<T>* act, const int64_t* kept, int64_t r0, int64_t r1, int64_t dim,
                 int64_t tokens, int64_t begin, int64_t end, acc_t<T>* acc, int64_t width) {
  constexpr int NV = G <= 2 ? 4 : 2;
  constexpr int64_t step = NV * kVecWidth<T>;
  for (int64_t c = begin; c < end; c += step) {
    down_block<G, NV>(wd, act, kept, r0, r1, dim, tokens, c, end, acc + (c - begin), width);
  }
}

// y[m, :] = sum over kept f of act[f, m] * w_down_t[f, :]. The kept rows are split into chunks
// (a count independent of the thread count, so results do not depend on it); a task streams the
// full rows of its chunk (a dropped neuron's row is never read), kRowTile rows at a time so the
// accumulators stay in registers across a tile, into its own partial sums; the partials are
// then added in chunk order.
constexpr int64_t kRowTile = 8;  // rows streamed together (few enough for the prefetchers)
constexpr int64_t kMinRowsPerChunk = 32;
constexpr int64_t kMaxChunks = 16;

template <typename T>
void down_chunk(const MlpParams& p, const int64_t* kept, int64_t r0, int64_t r1, acc_t<T>* acc, int64_t width) {
  using A = acc_t<T>;
  const int64_t M = p.tokens, D = p.dim;
  const auto* wd = static_cast<const T*>(p.w_down_t);
  std::fill(acc, acc + M * width, A(0));
  for (int64_t t0 = r0; t0 < r1; t0 += kRowTile) {
    const int64_t t1 = std::min(r1, t0 + kRowTile);
    // act is indexed act[f * M + m]; shifting its base by m selects token m of a group.
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
      down_tokens<4>(wd, static_cast<const A*>(p.act) + m, kept, t0, t1, D, M, 0, D, acc + m * width, width);
    }
    const A* act_m = static_cast<const A*>(p.act) + m;
    switch (M - m) {
      case 3:
        down_tokens<3>(wd, act_m, kept, t0, t1, D, M, 0, D, acc + m * width, width);
        break;
      case 2:
        down_tokens<2>(wd, act_m, kept, t0, t1, D, M, 0, D, acc + m * width, width);
        break;
      case 1:
        down_tokens<1>(wd, act_m, kept, t0, t1, D, M, 0, D, acc + m * width, width);
        break;
      default:
        break;
    }
  }
}

template <typename T>
void down(const MlpParams& p, const std::vector<int64_t>& kept) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  constexpr int64_t vw = kVecWidth<T>;
  const int64_t M = p.tokens, D = p.dim, nkept = static_cast<int64_t>(kept.size());
  const int64_t width = round_up(D, 4 * vw);  // whole steps of down_tokens
  const int64_t chunks = std::clamp<int64_t>(ceil_div(nkept, kMinRowsPerChunk), 1, kMaxChunks);
  const int64_t per = ceil_div(nkept, chunks);
  std::vector<A> partial(chunks * M * width);
  parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      down_chunk<T>(p, kept.data(), std::min(nkept, c * per), std::min(nkept, (c + 1) * per),
                    partial.data() + c * M * width, width);
    }
  });
  auto* y = static_cast<T*>(p.y);
  parallel_for(0, M * width / vw, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t m = i * vw / width, c = i * vw % width;
      if (c >= D) continue;
      V sum = V::loadu(partial.data() + m * width + c);
      for (int64_t k = 1; k < chunks; ++k) sum = sum + V::loadu(partial.data() + (k * M + m) * width + c);
      store_at(y + m * D, c, D, sum);
    }
  });
}

template <typename T>
void mlp(const MlpParams& p) {
  using A = acc_t<T>;
  const int64_t M = p.tokens, D = p.dim, stride = round_up(D, kVecWidth<T>);
  // Tokens widened once, zero-padded to whole vectors: the dot products then need no tail masks.
  std::vector<A> x(M * stride, A(0));
  const auto* xin = static_cast<const T*>(p.x);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t d = 0; d < D; d += kVecWidth<T>) load_at(xin + m * D, d, D).store(x.data() + m * stride + d);
  }
  gate_up<T>(p, x.data(), stride);
  std::vector<int64_t> kept;  // in neuron order, so the sum order is fixed
  kept.reserve(p.features);
  for (int64_t f = 0; f < p.features; ++f) {
    if (p.keep[f]) kept.push_back(f);
  }
  down<T>(p, kept);
}

// ---- token sparsity -----------------------------------------------------------------------------

template <typename T>
void token_index(const TokenIndexParams& p) {
  using A = acc_t<T>;
  const auto* scores = static_cast<const T*>(p.scores);
  const auto* kth = static_cast<const A*>(p.kth);
  parallel_for(0, p.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const T* s = scores + b * p.tokens;
      int64_t* out = p.index + b * p.keep;
      const int64_t ties_allowed = p.keep - p.n_greater[b];
      int64_t ties = 0, j = 0;
      for (int64_t i = 0; i < p.tokens && j < p.keep; ++i) {
        const A v = static_cast<A>(s[i]);
        if (token_kept(v, kth[b], ties, ties_allowed)) out[j++] = i;
        ties += v == kth[b];
      }
      for (; j < p.keep; ++j) out[j] = -1;  // unreachable with a consistent kth / n_greater
    }
  });
}

}  // namespace

void token_index_cpu(const TokenIndexParams& p) {
  SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { token_index<T>(p); });
}

// The same word choice and row map as the CUDA kernel, so CPU tests exercise them.
void token_rows_cpu(const TokenRowsParams& p) {
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, p.row_bytes));
  SLAB_WORD_SWITCH(p.word_bytes, W, [&] {
    const int64_t words = p.row_bytes / static_cast<int64_t>(sizeof(W));
    const W* src = static_cast<const W*>(p.src);
    W* dst = static_cast<W*>(p.dst);
    parallel_for(0, p.batch * p.keep, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t full = full_row(p.index, i, p.keep, p.tokens);
        if (full < 0) continue;
        const int64_t from = (p.gather ? full : i) * words, to = (p.gather ? i : full) * words;
        std::copy(src + from, src + from + words, dst + to);
      }
    });
  });
}

void cats_cpu(const CatsParams& p) {
  SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { cats_forward<T>(p); });
}
void cats_backward_cpu(const CatsBwdParams& p) {
  SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { cats_backward<T>(p); });
}
void mlp_cpu(const MlpParams& p) {
  SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { mlp<T>(p); });
}

}  // namespace slab::cats
