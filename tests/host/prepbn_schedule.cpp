// prepbn.h: the CUDA kernels' work decomposition run serially on the CPU with prepbn_math.h in
// float (the kernels' accumulation type), against float64 references computed here.
//   RowSchedule (apply_kernel, bwd_apply_kernel): every element of a row in exactly one
//     (thread, segment, slot); the whole row in registers up to 4096 channels; row statistics,
//     y and dx of the emulated groups.
//   ColSchedule (stats_kernel, bwd_reduce_kernel): blocks (tile, split) x threads (lane, row lane),
//     the in-block merge over row lanes, the last block's merge of a tile's splits in the fixed
//     order, the d_alpha merge over tiles; bitwise the same whatever order the blocks finish in.
//   access_width: the 16-byte path only for aligned bases and rows of whole packs.
#include <algorithm>
#include <cstring>
#include <tuple>

#include "check.h"
#include "prepbn/prepbn.h"
#include "prepbn/prepbn_math.h"

using namespace slab;
using namespace slab::prepbn;
using host_test::close;

namespace {

constexpr int kPack = kPackWidth<float>;

// A float buffer whose element `offset` is the start of the data: offset 0 is 16-byte aligned.
struct Buffer {
  std::vector<float> storage;
  float* data;
  Buffer(int64_t n, int offset) : storage(static_cast<size_t>(n + 8)) {
    auto addr = reinterpret_cast<uintptr_t>(storage.data());
    float* base = storage.data() + (kVecBytes - addr % kVecBytes) % kVecBytes / sizeof(float);
    data = base + offset;
  }
};

std::vector<float> to_float(const std::vector<double>& v) { return {v.begin(), v.end()}; }

// ---- row schedule --------------------------------------------------------------------------------

void check_row_cover(int64_t channels, int width) {
  const RowSchedule rs = row_schedule(channels, width);
  HOST_CHECK(rs.slots * width == kRowElems, "C=%lld width=%d slots %d", (long long)channels, width, rs.slots);
  HOST_CHECK(rs.threads() * rs.rows_per_block <= kRowBlockThreads && rs.rows_per_block >= 1, "block size");
  HOST_CHECK(channels > kMaxRowWarps * 32 * kRowElems || rs.segments == 1, "C=%lld not in registers",
             (long long)channels);
  HOST_CHECK(rs.warps == kMaxRowWarps || rs.warps == 1 || (rs.warps - 1) * 32 * kRowElems < channels,
             "C=%lld: %d warps, fewer would do", (long long)channels, rs.warps);
  std::vector<int> seen(static_cast<size_t>(channels), 0);
  for (int g = 0; g < rs.segments; ++g)
    for (int s = 0; s < rs.slots; ++s)
      for (int t = 0; t < rs.threads(); ++t) {
        const int64_t e = rs.element(g, s, t);
        if (e < 0) continue;
        HOST_CHECK(e % width == 0 && e + width <= channels, "pack at %lld of C=%lld", (long long)e,
                   (long long)channels);
        for (int i = 0; i < width; ++i) ++seen[static_cast<size_t>(e + i)];
      }
  for (int64_t c = 0; c < channels; ++c)
    HOST_CHECK(seen[static_cast<size_t>(c)] == 1, "C=%lld width=%d element %lld seen %d", (long long)channels, width,
               (long long)c, seen[static_cast<size_t>(c)]);
}

// Thread partials of a group in thread order (the kernel's warp butterfly and the in-order warp
// sum add the same values; any order is within float rounding of the reference).
template <typename Fn>
float group_sum(const RowSchedule& rs, Fn&& per_element) {
  float total = 0;
  for (int t = 0; t < rs.threads(); ++t) {
    float acc = 0;
    for (int g = 0; g < rs.segments; ++g)
      for (int s = 0; s < rs.slots; ++s) {
        const int64_t e = rs.element(g, s, t);
        if (e >= 0)
          for (int i = 0; i < rs.width; ++i) acc += per_element(e + i);
      }
    total += acc;
  }
  return total;
}

struct Layer {
  Norm norm;
  std::vector<double> nw, nb, bw, bb, bm, br;
  double alpha, lam, eps;
};

Layer make_layer(int64_t c, Norm norm, uint32_t seed) {
  auto pos = host_test::randn(c, seed + 5, 0.3);
  for (auto& v : pos) v = 1.0 / (0.7 + std::abs(v));
  return {norm,
          host_test::randn(c, seed, 0.5),
          host_test::randn(c, seed + 1, 0.5),
          host_test::randn(c, seed + 2, 0.5),
          host_test::randn(c, seed + 3, 0.5),
          host_test::randn(c, seed + 4),
          pos,
          0.3,
          0.4,
          1e-6};
}

// Row mean and rstd of the norm in double.
void ref_row_stats(const float* x, int64_t c, Norm norm, double eps, double& mean, double& rstd) {
  double s = 0, q = 0;
  if (norm == Norm::kLayer)
    for (int64_t i = 0; i < c; ++i) s += x[i];
  mean = norm == Norm::kLayer ? s / c : 0.0;
  for (int64_t i = 0; i < c; ++i) q += (x[i] - mean) * (x[i] - mean);
  rstd = 1.0 / std::sqrt(q / c + eps);
}

// apply_kernel's schedule over rows of x at element offset `offset` (a misaligned view when 1).
void check_apply(int64_t rows, int64_t c, Norm norm, int offset, uint32_t seed) {
  const Layer L = make_layer(c, norm, seed);
  Buffer xb(rows * c, offset), yb(rows * c, offset);
  const auto xs = host_test::randn(rows * c, seed + 9, 2.0);
  for (int64_t i = 0; i < rows * c; ++i) xb.data[i] = static_cast<float>(xs[static_cast<size_t>(i)] + 1.5);
  const int width = access_width(kPack, c, 4, xb.data, yb.data);
  HOST_CHECK(width == ((offset == 0 && c % kPack == 0) ? kPack : 1), "access width %d (C=%lld offset %d)", width,
             (long long)c, offset);
  const RowSchedule rs = row_schedule(c, width);
  const auto nw = to_float(L.nw), nb = to_float(L.nb), bw = to_float(L.bw), bb = to_float(L.bb), bm = to_float(L.bm),
             br = to_float(L.br);
  const float inv_c = 1.0f / static_cast<float>(c), lam = static_cast<float>(L.lam);
  for (int64_t blk = 0; blk < ceil_div(rows, rs.rows_per_block); ++blk)
    for (int grp = 0; grp < rs.rows_per_block; ++grp) {
      const int64_t r = blk * rs.rows_per_block + grp;
      if (r >= rows) continue;
      const float* x = xb.data + r * c;
      float rm = 0, rr = 0;
      if (norm != Norm::kNone) {
        if (norm == Norm::kLayer) rm = group_sum(rs, [&](int64_t e) { return x[e]; }) * inv_c;
        const float q = group_sum(rs, [&](int64_t e) { return (x[e] - rm) * (x[e] - rm); });
        rr = 1.0f / std::sqrt(q * inv_c + static_cast<float>(L.eps));
      }
      for (int g = 0; g < rs.segments; ++g)
        for (int s = 0; s < rs.slots; ++s)
          for (int t = 0; t < rs.threads(); ++t) {
            const int64_t e = rs.element(g, s, t);
            for (int i = 0; e >= 0 && i < width; ++i) {
              const int64_t k = e + i;
              const auto f = fwd_coeffs<float>(norm == Norm::kNone ? 0.f : nw[k], norm == Norm::kNone ? 0.f : nb[k],
                                               bw[k], bb[k], static_cast<float>(L.alpha), bm[k], br[k], lam);
              yb.data[r * c + k] = fwd_elem<float>(x[k], f.mu, f.s, f.al, f.t, f.k, row_xhat<float>(x[k], rm, rr));
            }
          }
      double mean = 0, rstd = 0;
      if (norm != Norm::kNone) ref_row_stats(x, c, norm, L.eps, mean, rstd);
      double scale = 0;
      std::vector<double> want(static_cast<size_t>(c));
      for (int64_t k = 0; k < c; ++k) {
        const size_t j = static_cast<size_t>(k);
        const double xh = norm == Norm::kNone ? 0.0 : (x[k] - mean) * rstd;
        const double n1 = norm == Norm::kNone ? 0.0 : xh * L.nw[j] + L.nb[j];
        want[j] = L.lam * n1 + (1 - L.lam) * ((x[k] - L.bm[j]) * L.br[j] * L.bw[j] + L.bb[j] + L.alpha * x[k]);
        scale = std::max(scale, std::abs(want[j]));
      }
      for (int64_t k = 0; k < c; ++k)
        HOST_CHECK(close(yb.data[r * c + k], want[static_cast<size_t>(k)], 2e-5 * scale, 2e-5),
                   "apply rows=%lld C=%lld norm=%d off=%d: y[%lld,%lld] %g vs %g", (long long)rows, (long long)c,
                   (int)norm, offset, (long long)r, (long long)k, yb.data[r * c + k], want[static_cast<size_t>(k)]);
    }
}

// bwd_apply_kernel's group sums and dx for one row against the same formula in double.
void check_bwd_apply(int64_t c, Norm norm, int offset, uint32_t seed) {
  const Layer L = make_layer(c, norm, seed);
  Buffer xb(c, offset), gb(c, offset);
  const auto xs = host_test::randn(c, seed + 11, 1.5), gs = host_test::randn(c, seed + 12);
  for (int64_t i = 0; i < c; ++i)
    xb.data[i] = static_cast<float>(xs[size_t(i)]), gb.data[i] = static_cast<float>(gs[size_t(i)]);
  const int width = access_width(kPack, c, 4, xb.data, gb.data);
  const RowSchedule rs = row_schedule(c, width);
  const float* x = xb.data;
  const float* dy = gb.data;
  double mean_d = 0, rstd_d = 0;
  if (norm != Norm::kNone) ref_row_stats(x, c, norm, L.eps, mean_d, rstd_d);
  const float rm = static_cast<float>(mean_d), rr = static_cast<float>(rstd_d), lam = static_cast<float>(L.lam);
  const float inv_c = 1.0f / static_cast<float>(c);
  const auto nw = to_float(L.nw);
  const float h_mean =
      norm == Norm::kLayer ? group_sum(rs, [&](int64_t e) { return lam * nw[size_t(e)] * dy[e]; }) * inv_c : 0.f;
  const float hx_mean =
      norm == Norm::kNone ? 0.f : group_sum(rs, [&](int64_t e) {
                                    return lam * nw[size_t(e)] * dy[e] * row_xhat<float>(x[e], rm, rr);
                                  }) * inv_c;
  double h_d = 0, hx_d = 0;
  for (int64_t k = 0; k < c; ++k) {
    const double h = L.lam * L.nw[size_t(k)] * dy[k];
    h_d += h, hx_d += h * (x[k] - mean_d) * rstd_d;
  }
  if (norm != Norm::kLayer) h_d = 0;
  if (norm == Norm::kNone) hx_d = 0;
  HOST_CHECK(close(h_mean, h_d / c, 1e-6, 1e-5) && close(hx_mean, hx_d / c, 1e-6, 1e-5), "bwd group sums C=%lld",
             (long long)c);
  // dx = p dy - kept (c0 + xhat_bn c1) + row_rstd (h - h_mean - xhat_row hx_mean), batch sums given.
  const double s_dy = 0.7, s_bn = -0.4, count = 37;
  for (int64_t k = 0; k < c; ++k) {
    const size_t j = size_t(k);
    const double nwk = norm == Norm::kNone ? 0.0 : L.nw[j];
    const auto f = bwd_coeffs<float>(float(nwk), float(L.bw[j]), float(L.alpha), float(L.bm[j]), float(L.br[j]),
                                     float(s_dy), float(s_bn), float(count), lam, true);
    const auto row = bwd_row_terms<float>(rr, h_mean, hx_mean);
    const float got = bwd_elem<float>(dy[k], x[k], f.mu, f.p, f.c0, f.c1r, f.k, 1.f, rr, rm, row.shift, row.slope);
    const double q = (1 - L.lam) * L.bw[j] * L.br[j] / count, xbn = (x[k] - L.bm[j]) * L.br[j];
    const double want =
        (1 - L.lam) * (L.bw[j] * L.br[j] + L.alpha) * dy[k] - (q * s_dy + xbn * q * s_bn) +
        (norm == Norm::kNone ? 0.0 : rstd_d * (L.lam * nwk * dy[k] - h_d / c - (x[k] - mean_d) * rstd_d * hx_d / c));
    HOST_CHECK(close(got, want, 1e-5, 1e-4), "dx C=%lld norm=%d [%lld] %g vs %g", (long long)c, (int)norm, (long long)k,
               got, want);
  }
}

// ---- column schedule -----------------------------------------------------------------------------

enum class MaskKind { kNone, kAllFalse, kOneTrue, kRandom };

std::vector<bool> make_mask(int64_t rows, MaskKind kind, uint32_t seed) {
  std::vector<bool> m(static_cast<size_t>(rows), kind != MaskKind::kAllFalse);
  if (kind == MaskKind::kOneTrue) {
    std::fill(m.begin(), m.end(), false);
    if (rows > 0) m[static_cast<size_t>(rows / 2)] = true;
  } else if (kind == MaskKind::kRandom) {
    const auto u = host_test::randn(rows, seed);
    for (int64_t r = 0; r < rows; ++r) m[size_t(r)] = u[size_t(r)] > -0.3;
  }
  return m;
}

// The blocks of a column launch in a given finishing order; on_last(tile) runs when the tile's
// ticket reaches `splits` (arrives_last), with d_alpha's second ticket counted over tiles.
template <typename Block, typename Last>
void run_col_blocks(const ColSchedule& cs, bool reverse, Block&& block, Last&& on_last) {
  std::vector<int> tickets(static_cast<size_t>(cs.tiles), 0);
  std::vector<std::pair<int64_t, int>> order;
  for (int s = 0; s < cs.splits; ++s)
    for (int64_t t = 0; t < cs.tiles; ++t) order.push_back({t, s});
  if (reverse) std::reverse(order.begin(), order.end());
  for (auto [tile, split] : order) {
    block(tile, split);
    if (++tickets[static_cast<size_t>(tile)] == cs.splits) on_last(tile);
  }
}

struct StatsOut {
  std::vector<float> mean, m2, rstd, var;
  float count;
};

// stats_kernel's schedule: Welford per (lane, row lane), row lanes merged in order, partials
// merged by the tile's last block in the fixed order, batch_stats at the end.
StatsOut emulate_stats(const float* x, const std::vector<bool>& mask, int64_t rows, int64_t c, int width,
                       bool reverse) {
  const ColSchedule cs = col_schedule(rows, c, width);
  std::vector<float> ws(static_cast<size_t>(cs.acc_elems()), -1e30f);  // garbage before use
  StatsOut out{std::vector<float>(size_t(c)), std::vector<float>(size_t(c)), std::vector<float>(size_t(c)),
               std::vector<float>(size_t(c)), -1};
  // Row lane 0's merge of its own and the row lanes 1..7 results (merge_row_lanes).
  auto merge_lanes = [](std::vector<float>& mean, std::vector<float>& m2, std::vector<float>& n, int64_t i) {
    float mu = mean[size_t(i)], q = m2[size_t(i)], cnt = n[0];
    for (int j = 1; j < kColRowLanes; ++j) {
      merge_moments(mu, q, cnt, mean[size_t(j * 32 * kPack * 4 + i)], m2[size_t(j * 32 * kPack * 4 + i)], n[size_t(j)]);
      cnt += n[size_t(j)];
    }
    return std::tuple<float, float, float>(mu, q, cnt);
  };
  const int64_t lane_elems = 32 * kPack * 4;  // room for any width
  auto block = [&](int64_t tile, int split) {
    std::vector<float> mean(size_t(kColRowLanes * lane_elems), 0.f), m2(mean.size(), 0.f), n(kColRowLanes, 0.f);
    for (int ry = 0; ry < kColRowLanes; ++ry)
      for (int64_t r = cs.split_begin(split) + ry; r < cs.split_end(split); r += kColRowLanes) {
        if (!mask[size_t(r)]) continue;
        n[size_t(ry)] += 1;
        const float inv_n = 1.0f / n[size_t(ry)];
        for (int lane = 0; lane < 32; ++lane) {
          const int64_t c0 = cs.channel(tile, lane);
          for (int i = 0; c0 < c && i < width; ++i)
            welford_push(mean[size_t(ry * lane_elems + lane * width + i)],
                         m2[size_t(ry * lane_elems + lane * width + i)], inv_n, x[r * c + c0 + i]);
        }
      }
    for (int lane = 0; lane < 32; ++lane) {
      const int64_t c0 = cs.channel(tile, lane);
      for (int i = 0; c0 < c && i < width; ++i) {
        auto [mu, q, cnt] = merge_lanes(mean, m2, n, lane * width + i);
        ws[size_t(cs.value(split, 0, c0 + i))] = mu;
        ws[size_t(cs.value(split, 1, c0 + i))] = q;
        (void)cnt;
      }
    }
    float total = n[0];
    for (int j = 1; j < kColRowLanes; ++j) total += n[size_t(j)];
    ws[size_t(cs.count(tile, split))] = total;
  };
  auto last = [&](int64_t tile) {
    std::vector<float> mean(size_t(kColRowLanes * lane_elems), 0.f), m2(mean.size(), 0.f), n(kColRowLanes, 0.f);
    for (int ry = 0; ry < kColRowLanes; ++ry)
      for (int s = ry; s < cs.splits; s += kColRowLanes) {
        const float n_b = ws[size_t(cs.count(tile, s))];
        for (int lane = 0; lane < 32; ++lane) {
          const int64_t c0 = cs.channel(tile, lane);
          for (int i = 0; c0 < c && i < width; ++i) {
            const size_t k = size_t(ry * lane_elems + lane * width + i);
            merge_moments(mean[k], m2[k], n[size_t(ry)], ws[size_t(cs.value(s, 0, c0 + i))],
                          ws[size_t(cs.value(s, 1, c0 + i))], n_b);
          }
        }
        n[size_t(ry)] += n_b;
      }
    for (int lane = 0; lane < 32; ++lane) {
      const int64_t c0 = cs.channel(tile, lane);
      for (int i = 0; c0 < c && i < width; ++i) {
        auto [mu, q, cnt] = merge_lanes(mean, m2, n, lane * width + i);
        const auto bs = batch_stats(mu, q, cnt, 1e-5f);
        out.mean[size_t(c0 + i)] = mu, out.m2[size_t(c0 + i)] = q;
        out.rstd[size_t(c0 + i)] = bs.rstd, out.var[size_t(c0 + i)] = bs.var;
        if (tile == 0 && lane == 0) out.count = cnt;
      }
    }
  };
  run_col_blocks(cs, reverse, block, last);
  return out;
}

void check_stats(int64_t rows, int64_t c, MaskKind kind, int offset, uint32_t seed) {
  Buffer xb(rows * c, offset);
  const auto xs = host_test::randn(rows * c, seed, 3.0);
  for (int64_t i = 0; i < rows * c; ++i) xb.data[i] = static_cast<float>(xs[size_t(i)] + 20.0);  // offset mean
  const auto mask = make_mask(rows, kind, seed + 1);
  const int width = access_width(kPack, c, 4, xb.data);
  const StatsOut a = emulate_stats(xb.data, mask, rows, c, width, false);
  const StatsOut b = emulate_stats(xb.data, mask, rows, c, width, true);
  HOST_CHECK(std::memcmp(a.mean.data(), b.mean.data(), a.mean.size() * 4) == 0 &&
                 std::memcmp(a.m2.data(), b.m2.data(), a.m2.size() * 4) == 0 && a.count == b.count,
             "stats depend on the block finishing order (rows=%lld C=%lld)", (long long)rows, (long long)c);
  const int64_t kept = std::count(mask.begin(), mask.end(), true);
  HOST_CHECK(a.count == static_cast<float>(kept), "count %g vs %lld", a.count, (long long)kept);
  for (int64_t k = 0; k < c; ++k) {
    double s = 0, q = 0;
    for (int64_t r = 0; r < rows; ++r) s += mask[size_t(r)] ? xb.data[r * c + k] : 0.0;
    const double mean = kept ? s / kept : 0.0;
    for (int64_t r = 0; r < rows; ++r)
      if (mask[size_t(r)]) q += (xb.data[r * c + k] - mean) * (xb.data[r * c + k] - mean);
    const size_t j = size_t(k);
    HOST_CHECK(close(a.mean[j], mean, 1e-5, 1e-5) && close(a.m2[j], q, 1e-4 * (kept + 1), 1e-4),
               "stats rows=%lld C=%lld kind=%d [%lld]: mean %g vs %g, m2 %g vs %g", (long long)rows, (long long)c,
               (int)kind, (long long)k, a.mean[j], mean, a.m2[j], q);
    if (kept < 2) {
      HOST_CHECK(std::isnan(a.rstd[j]) && std::isnan(a.var[j]), "fewer than 2 kept rows give NaN statistics");
    } else {
      HOST_CHECK(
          close(a.rstd[j], 1.0 / std::sqrt(q / kept + 1e-5), 0, 1e-4) && close(a.var[j], q / (kept - 1), 0, 1e-4),
          "rstd/var [%lld]", (long long)k);
    }
  }
}

// bwd_reduce_kernel's schedule: sums per (lane, row lane), row lanes in order, splits in the
// fixed order by the tile's last block; d_alpha over the tile's lanes, then tiles in order.
void check_bwd_reduce(int64_t rows, int64_t c, MaskKind kind, int offset, uint32_t seed) {
  Buffer xb(rows * c, offset), gb(rows * c, offset);
  const auto xs = host_test::randn(rows * c, seed, 2.0), gs = host_test::randn(rows * c, seed + 1);
  for (int64_t i = 0; i < rows * c; ++i) xb.data[i] = float(xs[size_t(i)]), gb.data[i] = float(gs[size_t(i)]);
  const auto mask = make_mask(rows, kind, seed + 2);
  const Layer L = make_layer(c, Norm::kLayer, seed + 3);
  std::vector<double> rmean(static_cast<size_t>(rows)), rrstd(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r)
    ref_row_stats(xb.data + r * c, c, Norm::kLayer, 1e-6, rmean[size_t(r)], rrstd[size_t(r)]);
  const int width = access_width(kPack, c, 4, xb.data, gb.data);
  const ColSchedule cs = col_schedule(rows, c, width);
  for (bool reverse : {false, true}) {
    std::vector<float> ws(static_cast<size_t>(cs.acc_elems()), -1e30f), sums(static_cast<size_t>(3 * c));
    float count = -1, d_alpha = 0;
    auto block = [&](int64_t tile, int split) {
      float n = 0;
      for (int lane = 0; lane < 32; ++lane) {
        const int64_t c0 = cs.channel(tile, lane);
        for (int i = 0; c0 < c && i < width; ++i) {
          const int64_t k = c0 + i;
          float acc_lane[3][kColRowLanes] = {};
          for (int ry = 0; ry < kColRowLanes; ++ry)
            for (int64_t r = cs.split_begin(split) + ry; r < cs.split_end(split); r += kColRowLanes) {
              const float g = gb.data[r * c + k], v = xb.data[r * c + k];
              acc_lane[0][ry] += g;
              acc_lane[1][ry] += g * (v - float(L.bm[size_t(k)])) * float(L.br[size_t(k)]);
              acc_lane[2][ry] += g * row_xhat<float>(v, float(rmean[size_t(r)]), float(rrstd[size_t(r)]));
            }
          for (int q = 0; q < 3; ++q) {
            float t = acc_lane[q][0];
            for (int j = 1; j < kColRowLanes; ++j) t += acc_lane[q][j];
            ws[size_t(cs.value(split, q, k))] = t;
          }
        }
      }
      for (int64_t r = cs.split_begin(split); r < cs.split_end(split); ++r) n += mask[size_t(r)] ? 1.f : 0.f;
      ws[size_t(cs.count(tile, split))] = n;
    };
    int tiles_done = 0;
    auto last = [&](int64_t tile) {
      float lane_terms[32] = {};
      for (int lane = 0; lane < 32; ++lane) {
        const int64_t c0 = cs.channel(tile, lane);
        for (int i = 0; c0 < c && i < width; ++i) {
          const int64_t k = c0 + i;
          float per_ry[3][kColRowLanes] = {};
          for (int ry = 0; ry < kColRowLanes; ++ry)
            for (int s = ry; s < cs.splits; s += kColRowLanes)
              for (int q = 0; q < 3; ++q) per_ry[q][ry] += ws[size_t(cs.value(s, q, k))];
          for (int q = 0; q < 3; ++q) {
            float t = per_ry[q][0];
            for (int j = 1; j < kColRowLanes; ++j) t += per_ry[q][j];
            sums[size_t(q * c + k)] = t;
          }
          lane_terms[lane] += alpha_grad_term(sums[size_t(k)], sums[size_t(c + k)], float(L.bm[size_t(k)]),
                                              float(L.br[size_t(k)]), float(L.lam));
        }
      }
      if (tile == 0) {
        float n = 0;
        for (int s = 0; s < cs.splits; ++s) n += ws[size_t(cs.count(0, s))];
        count = n;
      }
      for (int off = 16; off > 0; off /= 2) {  // the warp butterfly (xor shuffles)
        float next[32];
        for (int l = 0; l < 32; ++l) next[l] = lane_terms[l] + lane_terms[l ^ off];
        std::copy(next, next + 32, lane_terms);
      }
      ws[size_t(cs.alpha_part(tile))] = lane_terms[0];
      if (++tiles_done == cs.tiles) {
        for (int64_t j = 0; j < cs.tiles; ++j) d_alpha += ws[size_t(cs.alpha_part(j))];
      }
    };
    run_col_blocks(cs, reverse, block, last);
    const int64_t kept = std::count(mask.begin(), mask.end(), true);
    HOST_CHECK(count == float(kept), "bwd count %g vs %lld", count, (long long)kept);
    double alpha_want = 0, alpha_scale = 0;
    for (int64_t k = 0; k < c; ++k) {
      double s[3] = {0, 0, 0};
      for (int64_t r = 0; r < rows; ++r) {
        const double g = gb.data[r * c + k], v = xb.data[r * c + k];
        s[0] += g, s[1] += g * (v - L.bm[size_t(k)]) * L.br[size_t(k)];
        s[2] += g * (v - rmean[size_t(r)]) * rrstd[size_t(r)];
      }
      for (int q = 0; q < 3; ++q)
        HOST_CHECK(close(sums[size_t(q * c + k)], s[q], 1e-4 * std::sqrt(double(rows) + 1), 1e-4),
                   "bwd sums rows=%lld C=%lld [%d][%lld] %g vs %g", (long long)rows, (long long)c, q, (long long)k,
                   sums[size_t(q * c + k)], s[q]);
      const double term = (1 - L.lam) * (s[1] / L.br[size_t(k)] + L.bm[size_t(k)] * s[0]);
      alpha_want += term, alpha_scale += std::abs(term);
    }
    HOST_CHECK(close(d_alpha, alpha_want, 1e-4 * (alpha_scale + 1), 1e-4), "d_alpha %g vs %g", d_alpha, alpha_want);
  }
}

}  // namespace

int main() {
  for (int width : {1, 2, 4, 8})
    for (int64_t c : {1, 3, 5, 8, 16, 17, 64, 127, 128, 384, 385, 1000, 1024, 4096, 4097, 6000, 8192, 12289})
      if (c % width == 0) check_row_cover(c, width);
  HOST_CHECK(row_schedule(4096, 1).segments == 1 && row_schedule(4096, 4).segments == 1 &&
                 row_schedule(4096, 8).segments == 1 && row_schedule(4096, 2).segments == 1,
             "C = 4096 in registers for every access width");
  HOST_CHECK(access_width(kPack, 384, 4, static_cast<const float*>(nullptr)) == kPack, "null is aligned");

  uint32_t seed = 1;
  for (Norm norm : {Norm::kLayer, Norm::kRms, Norm::kNone})
    for (int64_t c : {1, 5, 12, 33, 384, 4096, 5000})
      for (int offset : {0, 1})
        for (int64_t rows : {1, 3, 19}) check_apply(rows, c, norm, offset, seed++);
  for (Norm norm : {Norm::kLayer, Norm::kRms, Norm::kNone})
    for (int64_t c : {1, 7, 64, 385, 4096, 4100})
      for (int offset : {0, 1}) check_bwd_apply(c, norm, offset, seed++);

  for (MaskKind kind : {MaskKind::kNone, MaskKind::kAllFalse, MaskKind::kOneTrue, MaskKind::kRandom})
    for (int64_t c : {1, 3, 8, 13, 128, 200})
      for (int offset : {0, 1})
        for (int64_t rows : {1, 2, 7, 300, 2000}) check_stats(rows, c, kind, offset, seed++);
  check_stats(0, 5, MaskKind::kNone, 0, seed++);
  check_stats(70000, 4, MaskKind::kRandom, 0, seed++);  // more splits than the 8 row lanes of the merge
  for (MaskKind kind : {MaskKind::kNone, MaskKind::kOneTrue, MaskKind::kRandom})
    for (int64_t c : {1, 5, 12, 300})
      for (int offset : {0, 1})
        for (int64_t rows : {1, 9, 700}) check_bwd_reduce(rows, c, kind, offset, seed++);
  check_bwd_reduce(20000, 8, MaskKind::kRandom, 0, seed++);
  return host_test::finish();
}
