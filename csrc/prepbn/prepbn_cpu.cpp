// PRepBN CPU kernels: parallel_for over row blocks / rows, at::vec over channels.
// Column statistics are reduced per (row block, channel tile) and merged in row-block order, so
// results do not depend on the number of threads.

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/cpu_types.h"
#include "prepbn/prepbn.h"
#include "prepbn/prepbn_math.h"

namespace slab::prepbn {
namespace {

constexpr int64_t kRowBlock = 256;      // rows per partial of a column reduction
constexpr int64_t kChannelTile = 1024;  // channels per task: the tile's accumulators stay in L1

bool is_kept(const bool* mask, int64_t row) { return mask == nullptr || mask[row]; }

// Runs fn(row_block, c_begin, c_end) for every (row block, channel tile) pair, in parallel.
template <typename Fn>
void for_each_tile(int64_t rows, int64_t channels, const Fn& fn) {
  const int64_t row_blocks = ceil_div(rows, kRowBlock), tiles = ceil_div(channels, kChannelTile);
  parallel_for(0, row_blocks * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c0 = (i % tiles) * kChannelTile;
      fn(i / tiles, c0, std::min(channels, c0 + kChannelTile));
    }
  });
}

// A zero-filled copy padded to whole vectors, for per-channel coefficient arrays.
template <typename A>
std::vector<A> padded(int64_t channels) {
  constexpr int64_t w = at::vec::Vectorized<A>::size();
  return std::vector<A>(round_up(channels, w), A(0));
}

// ---- forward: per-channel moments ---------------------------------------------------------

template <typename T>
void stats(const StatsParams& p) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  constexpr int64_t w = kVecWidth<T>;
  const auto* x = static_cast<const T*>(p.x);
  const int64_t rows = p.rows, channels = p.channels, row_blocks = ceil_div(rows, kRowBlock);
  std::vector<A> part_mean(row_blocks * channels), part_m2(row_blocks * channels);
  std::vector<A> part_n(row_blocks);

  // Welford over the rows of one block, a vector of channels at a time.
  for_each_tile(rows, channels, [&](int64_t rb, int64_t c0, int64_t c1) {
    alignas(64) A mean[kChannelTile] = {}, m2[kChannelTile] = {};
    const int64_t r0 = rb * kRowBlock, r1 = std::min(rows, r0 + kRowBlock);
    A n = 0;
    for (int64_t r = r0; r < r1; ++r) {
      if (!is_kept(p.mask, r)) continue;
      n += 1;
      const V inv_n(A(1) / n);
      const T* row = x + r * channels;
      for_each_vec<w>(c1 - c0, [&](int64_t i, auto full) {
        const V v = load_piece(row, c0 + i, c1, full);
        V mu = V::loadu(mean + i), s = V::loadu(m2 + i);
        const V delta = v - mu;
        mu = mu + delta * inv_n;
        s = s + delta * (v - mu);
        mu.store(mean + i);
        s.store(m2 + i);
      });
    }
    std::copy(mean, mean + (c1 - c0), part_mean.begin() + rb * channels + c0);
    std::copy(m2, m2 + (c1 - c0), part_m2.begin() + rb * channels + c0);
    part_n[rb] = n;
  });

  // Merge the row blocks in order, channels in parallel.
  auto* out_mean = static_cast<A*>(p.mean);
  auto* out_m2 = static_cast<A*>(p.m2);
  parallel_for(0, channels, 256, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      A mean = 0, m2 = 0, n = 0;
      for (int64_t rb = 0; rb < row_blocks; ++rb) {
        merge_moments(mean, m2, n, part_mean[rb * channels + c], part_m2[rb * channels + c], part_n[rb]);
        n += part_n[rb];
      }
      out_mean[c] = mean;
      out_m2[c] = m2;
    }
  });
  A total = 0;
  for (A n : part_n) total += n;
  *static_cast<A*>(p.count) = total;
}

// ---- forward: output pass ------------------------------------------------------------------

template <typename T>
void apply(const ApplyParams& p) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  constexpr int64_t w = kVecWidth<T>;
  const int64_t rows = p.rows, channels = p.channels;
  const auto* x = static_cast<const T*>(p.x);
  auto* y = static_cast<T*>(p.y);
  const auto* nw = static_cast<const A*>(p.norm_weight);
  const auto* nb = static_cast<const A*>(p.norm_bias);
  const auto* bw = static_cast<const A*>(p.bn_weight);
  const auto* bb = static_cast<const A*>(p.bn_bias);
  const auto* bm = static_cast<const A*>(p.bn_mean);
  const auto* br = static_cast<const A*>(p.bn_rstd);
  const A lam = static_cast<A>(p.lam), alpha = *static_cast<const A*>(p.alpha);

  auto mu = padded<A>(channels), s = padded<A>(channels), t = padded<A>(channels), k = padded<A>(channels);
  A al = 0;
  for (int64_t c = 0; c < channels; ++c) {
    const auto f = fwd_coeffs<A>(nw ? nw[c] : A(0), nb ? nb[c] : A(0), bw[c], bb[c], alpha, bm[c], br[c], lam);
    mu[c] = f.mu, s[c] = f.s, t[c] = f.t, k[c] = f.k, al = f.al;
  }
  const V al_v(al);
  auto* row_mean = static_cast<A*>(p.row_mean);
  auto* row_rstd = static_cast<A*>(p.row_rstd);
  const A inv_c = A(1) / A(channels);

  parallel_for(0, rows, std::max<int64_t>(1, 16384 / channels), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * channels;
      A rm = 0, rr = 0;
      const auto sum_all = [&](const auto& term) {
        return at::vec::vec_reduce_all<A>(std::plus<V>(), sum_vecs<V>(channels, term));
      };
      const auto xv = [&](int64_t c, auto full) { return load_piece(xr, c, channels, full); };
      if (p.norm == Norm::kLayer) {  // two passes over the row (in L1): mean, then squared deviations
        rm = sum_all(xv) * inv_c;
        const V rm_v(rm);
        const A ss = sum_all([&](int64_t c, auto full) {
          const V d = xv(c, full) - rm_v;
          return d * d;
        });
        rr = A(1) / std::sqrt(ss * inv_c + A(p.norm_eps));
      } else if (p.norm == Norm::kRms) {
        const A ss = sum_all([&](int64_t c, auto full) {
          const V v = xv(c, full);
          return v * v;
        });
        rr = A(1) / std::sqrt(ss * inv_c + A(p.norm_eps));
      }
      if (p.norm != Norm::kNone) row_mean[r] = rm, row_rstd[r] = rr;
      const V rm_v(rm), rr_v(rr);
      T* yr = y + r * channels;
      for_each_vec<w>(channels, [&](int64_t c, auto full) {
        const V v = load_piece(xr, c, channels, full);
        const V out = fwd_elem<V>(v, V::loadu(&mu[c]), V::loadu(&s[c]), al_v, V::loadu(&t[c]), V::loadu(&k[c]),
                                  row_xhat<V>(v, rm_v, rr_v));
        store_piece(yr, c, channels, out, full);
      });
    }
  });
}

// ---- backward: per-channel sums ------------------------------------------------------------

template <typename T>
void bwd_reduce(const BwdReduceParams& p) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  constexpr int64_t w = kVecWidth<T>;
  const int64_t rows = p.rows, channels = p.channels, row_blocks = ceil_div(rows, kRowBlock);
  const auto* dy = static_cast<const T*>(p.dy);
  const auto* x = static_cast<const T*>(p.x);
  const auto* bm = static_cast<const A*>(p.bn_mean);
  const auto* br = static_cast<const A*>(p.bn_rstd);
  const auto* row_mean = static_cast<const A*>(p.row_mean);
  const auto* row_rstd = static_cast<const A*>(p.row_rstd);
  const bool has_norm = p.norm != Norm::kNone;
  auto bm_p = padded<A>(channels), br_p = padded<A>(channels);
  std::copy(bm, bm + channels, bm_p.begin());
  std::copy(br, br + channels, br_p.begin());
  std::vector<A> part(row_blocks * 3 * channels);

  for_each_tile(rows, channels, [&](int64_t rb, int64_t c0, int64_t c1) {
    alignas(64) A s_dy[kChannelTile] = {}, s_bn[kChannelTile] = {}, s_norm[kChannelTile] = {};
    const int64_t r0 = rb * kRowBlock, r1 = std::min(rows, r0 + kRowBlock);
    for (int64_t r = r0; r < r1; ++r) {
      const T* dyr = dy + r * channels;
      const T* xr = x + r * channels;
      const V rm_v(has_norm ? row_mean[r] : A(0)), rr_v(has_norm ? row_rstd[r] : A(0));
      for_each_vec<w>(c1 - c0, [&](int64_t i, auto full) {
        const int64_t c = c0 + i;
        const V g = load_piece(dyr, c, c1, full), v = load_piece(xr, c, c1, full);
        const V xhat_bn = (v - V::loadu(&bm_p[c])) * V::loadu(&br_p[c]);
        (V::loadu(s_dy + i) + g).store(s_dy + i);
        (V::loadu(s_bn + i) + g * xhat_bn).store(s_bn + i);
        if (has_norm) (V::loadu(s_norm + i) + g * row_xhat<V>(v, rm_v, rr_v)).store(s_norm + i);
      });
    }
    A* out = part.data() + rb * 3 * channels;
    std::copy(s_dy, s_dy + (c1 - c0), out + c0);
    std::copy(s_bn, s_bn + (c1 - c0), out + channels + c0);
    std::copy(s_norm, s_norm + (c1 - c0), out + 2 * channels + c0);
  });

  auto* sums = static_cast<A*>(p.sums);
  parallel_for(0, 3 * channels, 256, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      A total = 0;
      for (int64_t rb = 0; rb < row_blocks; ++rb) total += part[rb * 3 * channels + j];
      sums[j] = total;
    }
  });
  int64_t kept = 0;
  for (int64_t r = 0; r < rows; ++r) kept += is_kept(p.mask, r);
  *static_cast<A*>(p.count) = static_cast<A>(kept);
}

// ---- backward: dx --------------------------------------------------------------------------

template <typename T>
void bwd_apply(const BwdApplyParams& p) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  constexpr int64_t w = kVecWidth<T>;
  const int64_t rows = p.rows, channels = p.channels;
  const auto* dy = static_cast<const T*>(p.dy);
  const auto* x = static_cast<const T*>(p.x);
  auto* dx = static_cast<T*>(p.dx);
  const auto* nw = static_cast<const A*>(p.norm_weight);
  const auto* bw = static_cast<const A*>(p.bn_weight);
  const auto* bm = static_cast<const A*>(p.bn_mean);
  const auto* br = static_cast<const A*>(p.bn_rstd);
  const auto* sums = static_cast<const A*>(p.sums);
  const auto* row_mean = static_cast<const A*>(p.row_mean);
  const auto* row_rstd = static_cast<const A*>(p.row_rstd);
  const A lam = static_cast<A>(p.lam), alpha = *static_cast<const A*>(p.alpha);
  const A count = *static_cast<const A*>(p.count);

  auto mu = padded<A>(channels), pc = padded<A>(channels), c0 = padded<A>(channels), c1r = padded<A>(channels),
       k = padded<A>(channels);
  for (int64_t c = 0; c < channels; ++c) {
    const auto f = bwd_coeffs<A>(nw ? nw[c] : A(0), bw[c], alpha, bm[c], br[c], sums[c], sums[channels + c], count, lam,
                                 p.training);
    mu[c] = f.mu, pc[c] = f.p, c0[c] = f.c0, c1r[c] = f.c1r, k[c] = f.k;
  }
  const bool has_norm = p.norm != Norm::kNone;
  const A inv_c = A(1) / A(channels);

  parallel_for(0, rows, std::max<int64_t>(1, 16384 / channels), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* dyr = dy + r * channels;
      const T* xr = x + r * channels;
      const A rm = has_norm ? row_mean[r] : A(0), rr = has_norm ? row_rstd[r] : A(0);
      const V rm_v(rm), rr_v(rr);
      A h_mean = 0, hx_mean = 0;
      if (has_norm) {
        const auto sums = sum_vec_pairs<V>(channels, [&](int64_t c, auto full) {
          const V h = V::loadu(&k[c]) * load_piece(dyr, c, channels, full);
          return VecPair<V>{h, h * row_xhat<V>(load_piece(xr, c, channels, full), rm_v, rr_v)};
        });
        if (p.norm == Norm::kLayer) h_mean = at::vec::vec_reduce_all<A>(std::plus<V>(), sums.a) * inv_c;
        hx_mean = at::vec::vec_reduce_all<A>(std::plus<V>(), sums.b) * inv_c;
      }
      const V kept(p.training && is_kept(p.mask, r) ? A(1) : A(0));
      const auto row = bwd_row_terms<A>(rr, h_mean, hx_mean);
      const V shift_v(row.shift), slope_v(row.slope);
      T* dxr = dx + r * channels;
      for_each_vec<w>(channels, [&](int64_t c, auto full) {
        const V g = load_piece(dyr, c, channels, full), v = load_piece(xr, c, channels, full);
        const V out = bwd_elem<V>(g, v, V::loadu(&mu[c]), V::loadu(&pc[c]), V::loadu(&c0[c]), V::loadu(&c1r[c]),
                                  V::loadu(&k[c]), kept, rr_v, rm_v, shift_v, slope_v);
        store_piece(dxr, c, channels, out, full);
      });
    }
  });
}

}  // namespace

void stats_cpu(const StatsParams& p) {
  SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { stats<T>(p); });
}
void apply_cpu(const ApplyParams& p) {
  SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { apply<T>(p); });
}
void bwd_reduce_cpu(const BwdReduceParams& p) {
  SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { bwd_reduce<T>(p); });
}
void bwd_apply_cpu(const BwdApplyParams& p) {
  SLAB_DTYPE_SWITCH(p.dtype, CpuScalar, T, [&] { bwd_apply<T>(p); });
}

}  // namespace slab::prepbn
