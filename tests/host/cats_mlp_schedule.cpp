// cats/cats.h: the CUDA decode schedule of cats_mlp (gate/up rows per warp and lane items, the
// compaction of the kept neurons, the down projection's tiles, splits, chunks and warp rows), run
// serially with the kernels' own schedule functions and cats_math.h, against a float64 reference:
// every weight element the schedule must read is read exactly once (the up and down rows of dropped
// neurons never), kept[] is the ascending list of kept neurons, and y matches.
#include <algorithm>
#include <cstring>

#include "cats/cats.h"
#include "cats/cats_math.h"
#include "check.h"

namespace cats = slab::cats;

namespace {

struct Case {
  int64_t M, D, F;
  int elem_bytes;   // the dtype the layout is planned for (2, 4 or 8): pack width 16 / elem_bytes
  int64_t offset;   // elements from a 16-byte boundary at which every base starts
  double sparsity;  // 0: threshold -1 (keeps everything), 1: nothing kept, else a quantile of |silu|
  uint32_t seed;
};

double silu(double v) { return cats::silu_from_sigmoid(v, cats::sigmoid_from_exp(std::exp(-v))); }

struct Data {
  std::vector<double> x, wg, wu, wd;  // [M, D], [F, D] x 3 (wd = w_down_t)
  double t = 0;
};

// A threshold halfway between two neighbouring |silu(gate)| values of the reference, so no
// value lies within rounding of it (the schedule sums in another order than the reference).
double pick_threshold(const Case& c, const Data& d) {
  if (c.sparsity <= 0) return -1.0;
  if (c.sparsity >= 1) return 1e300;
  std::vector<double> s;
  for (int64_t m = 0; m < c.M; ++m)
    for (int64_t f = 0; f < c.F; ++f) {
      double g = 0;
      for (int64_t e = 0; e < c.D; ++e) g += d.wg[f * c.D + e] * d.x[m * c.D + e];
      s.push_back(std::abs(silu(g)));
    }
  if (s.size() < 2) return c.sparsity < 0.5 ? -1.0 : 1e300;
  std::sort(s.begin(), s.end());
  const size_t i = std::min(s.size() - 2, static_cast<size_t>(c.sparsity * static_cast<double>(s.size())));
  return 0.5 * (s[i] + s[i + 1]);
}

// The float64 reference: y[m] = sum_f [keep(s[m,f])] s[m,f] up[m,f] w_down_t[f]; kept = union.
void reference(const Case& c, const Data& d, std::vector<double>& y, std::vector<uint8_t>& keep) {
  y.assign(c.M * c.D, 0.0);
  keep.assign(c.F, 0);
  for (int64_t f = 0; f < c.F; ++f)
    for (int64_t m = 0; m < c.M; ++m) {
      double g = 0, u = 0;
      for (int64_t e = 0; e < c.D; ++e) {
        g += d.wg[f * c.D + e] * d.x[m * c.D + e];
        u += d.wu[f * c.D + e] * d.x[m * c.D + e];
      }
      const double s = silu(g);
      if (!cats::keep(s, d.t)) continue;
      keep[f] = 1;
      for (int64_t e = 0; e < c.D; ++e) y[m * c.D + e] += s * u * d.wd[f * c.D + e];
    }
}

// Fake, never dereferenced base addresses: only their alignment matters to mlp_vectorized.
const void* base(int64_t region, const Case& c) {
  return reinterpret_cast<const void*>(static_cast<uintptr_t>((region + 1) << 24) + c.offset * c.elem_bytes);
}

struct Run {
  std::vector<double> y;
  std::vector<uint8_t> keep;
  std::vector<int32_t> kept;  // [F + 1]
};

// gate_up_kernel over (block, warp, lane), with its lane_dots item loop.
template <int MB>
void gate_up(const Case& c, const Data& d, int W, std::vector<uint8_t>& keep, std::vector<double>& act,
             std::vector<int>& gate_reads, std::vector<int>& up_reads) {
  constexpr int R = cats::gate_rows_per_warp(MB);
  const int64_t items = c.D / W;
  HOST_CHECK(items * W == c.D, "a vectorized row is whole packs (D=%lld W=%d)", (long long)c.D, W);
  auto dots = [&](const std::vector<double>& w, const bool (&use)[R], int64_t f0, std::vector<int>& reads,
                  double (&out)[R][MB]) {
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) out[r][m] = 0;
    for (int lane = 0; lane < 32; ++lane) {
      double acc[R][MB] = {};
      for (int64_t k0 = lane; k0 < items; k0 += 32 * cats::kGateUnroll)
        for (int u = 0; u < cats::kGateUnroll; ++u) {
          const int64_t k = k0 + 32 * u;
          if (k >= items) continue;
          for (int r = 0; r < R; ++r) {
            if (!use[r]) continue;
            for (int i = 0; i < W; ++i) {
              const int64_t e = (f0 + r) * c.D + k * W + i;
              ++reads[static_cast<size_t>(e)];
              for (int m = 0; m < MB; ++m)
                if (m < c.M) acc[r][m] += w[static_cast<size_t>(e)] * d.x[static_cast<size_t>(m * c.D + k * W + i)];
            }
          }
        }
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < MB; ++m) out[r][m] += acc[r][m];  // warp_sum
    }
  };
  for (int64_t b = 0; b < cats::gate_blocks(c.F, MB); ++b)
    for (int warp = 0; warp < cats::kGateWarps; ++warp) {
      const int64_t f0 = cats::gate_first_row(b, warp, MB);
      if (f0 >= c.F) continue;
      bool valid[R], kept[R];
      for (int r = 0; r < R; ++r) valid[r] = f0 + r < c.F;
      double gate[R][MB], up[R][MB];
      dots(d.wg, valid, f0, gate_reads, gate);
      bool any = false;
      for (int r = 0; r < R; ++r) {
        kept[r] = false;
        for (int m = 0; m < MB; ++m) {
          if (!valid[r] || m >= c.M) continue;
          const double s = silu(gate[r][m]);
          const bool k = cats::keep(s, d.t);
          gate[r][m] = k ? s : 0.0;
          kept[r] = kept[r] || k;
        }
        any = any || kept[r];
        if (valid[r]) keep[static_cast<size_t>(f0 + r)] = kept[r];
      }
      if (!any) continue;
      dots(d.wu, kept, f0, up_reads, up);
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < MB; ++m)
          if (kept[r] && m < c.M) act[static_cast<size_t>((f0 + r) * c.M + m)] = gate[r][m] * up[r][m];
    }
}

// compact_kernel over (block, thread): offset from the flags before the block, rank by a scan.
void compact(const Case& c, const std::vector<uint8_t>& keep, std::vector<int32_t>& kept) {
  kept.assign(static_cast<size_t>(c.F + 1), -1);
  const int64_t blocks = cats::compact_blocks(c.F);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t first = b * cats::kCompactRows;
    int64_t offset = 0, rank = 0;
    for (int t = 0; t < cats::kCompactRows; ++t)
      for (int64_t i = t; i < first; i += cats::kCompactRows) offset += keep[static_cast<size_t>(i)];
    for (int t = 0; t < cats::kCompactRows; ++t) {  // exclusive scan in thread order
      const int64_t f = first + t;
      if (f < c.F && keep[static_cast<size_t>(f)]) kept[static_cast<size_t>(offset + rank++)] = static_cast<int32_t>(f);
    }
    if (b == blocks - 1) kept[static_cast<size_t>(c.F)] = static_cast<int32_t>(offset + rank);
  }
}

// down_partial_kernel over (tile, split, warp, lane) with stage_chunk and the warp-order sum,
// then down_reduce_kernel.
template <int MB>
void down(const Case& c, const Data& d, int W, const std::vector<double>& act, const std::vector<int32_t>& kept,
          std::vector<int>& down_reads, std::vector<double>& y) {
  constexpr int U = cats::down_unroll(MB);
  const int splits = cats::down_splits(c.M, c.D, c.F, c.elem_bytes);
  HOST_CHECK(splits >= 1 && splits <= 65535, "splits %d", splits);
  const int64_t count = kept[static_cast<size_t>(c.F)];
  std::vector<double> partial(static_cast<size_t>(cats::mlp_workspace_elems(c.M, c.D, c.F, c.elem_bytes)), 0.0);
  std::vector<int> written(partial.size(), 0);
  std::vector<int> covered(static_cast<size_t>(count), 0);
  for (int s = 0; s < splits; ++s) {
    const cats::Range range = cats::down_range(count, splits, s);
    HOST_CHECK(range.begin <= range.end && range.end <= count, "split %d range", s);
    for (int64_t k = range.begin; k < range.end; ++k) ++covered[static_cast<size_t>(k)];
    for (int64_t tile = 0; tile < cats::down_tiles(c.D, W); ++tile) {
      std::vector<double> sum(static_cast<size_t>(cats::kDownWarps * 32 * W * MB), 0.0);  // [warp][m][column]
      for (int64_t c0 = range.begin; c0 < range.end; c0 += cats::kDownChunk) {
        const int n = static_cast<int>(cats::min64(cats::kDownChunk, range.end - c0));
        int32_t rows[cats::kDownChunk];
        double a[cats::kDownChunk][MB];
        for (int j = 0; j < n * MB; ++j) {
          const int row = j / MB, m = j % MB;
          const int32_t f = kept[static_cast<size_t>(c0 + row)];
          if (m == 0) rows[row] = f;
          a[row][m] = m < c.M ? act[static_cast<size_t>(f * c.M + m)] : 0.0;
        }
        for (int warp = 0; warp < cats::kDownWarps; ++warp)
          for (int lane = 0; lane < 32; ++lane) {
            const int64_t col = cats::down_column(tile, lane, W);
            if (col >= c.D) continue;  // whole packs: col < D means col + W <= D
            HOST_CHECK(col + W <= c.D, "pack past the row end");
            for (int j0 = warp; j0 < n; j0 += cats::kDownWarps * U)
              for (int u = 0; u < U; ++u) {
                const int j = j0 + cats::kDownWarps * u;
                if (j >= n) continue;
                for (int i = 0; i < W; ++i) {
                  const int64_t e = rows[j] * c.D + col + i;
                  ++down_reads[static_cast<size_t>(e)];
                  for (int m = 0; m < MB; ++m)
                    sum[static_cast<size_t>((warp * MB + m) * 32 * W + lane * W + i)] +=
                        a[j][m] * d.wd[static_cast<size_t>(e)];
                }
              }
          }
      }
      const int64_t tile0 = cats::down_column(tile, 0, W);
      for (int m = 0; m < c.M; ++m)
        for (int64_t cc = 0; cc < 32 * W; ++cc) {
          if (tile0 + cc >= c.D) continue;
          double total = 0;
          for (int warp = 0; warp < cats::kDownWarps; ++warp)
            total += sum[static_cast<size_t>((warp * MB + m) * 32 * W + cc)];
          const size_t at = static_cast<size_t>((s * c.M + m) * c.D + tile0 + cc);
          partial[at] = total;
          ++written[at];
        }
    }
  }
  for (int64_t k = 0; k < count; ++k)
    HOST_CHECK(covered[static_cast<size_t>(k)] == 1, "kept position %lld in %d splits", (long long)k,
               covered[static_cast<size_t>(k)]);
  for (size_t i = 0; i < written.size(); ++i)
    HOST_CHECK(written[i] == 1, "partial %zu written %d times", i, written[i]);
  y.assign(static_cast<size_t>(c.M * c.D), 0.0);
  for (int64_t i = 0; i < c.M * c.D; ++i)
    for (int s = 0; s < splits; ++s) y[static_cast<size_t>(i)] += partial[static_cast<size_t>(s * c.M * c.D + i)];
}

template <int MB>
void run_bucket(const Case& c, const Data& d, int W, Run& out, std::vector<int>& gate_reads, std::vector<int>& up_reads,
                std::vector<int>& down_reads) {
  std::vector<double> act(static_cast<size_t>(c.F * c.M), std::nan(""));  // dropped rows stay unwritten
  out.keep.assign(static_cast<size_t>(c.F), 2);
  gate_up<MB>(c, d, W, out.keep, act, gate_reads, up_reads);
  compact(c, out.keep, out.kept);
  down<MB>(c, d, W, act, out.kept, down_reads, out.y);
}

void check_case(const Case& c) {
  Data d;
  d.x = host_test::randn(c.M * c.D, c.seed);
  d.wg = host_test::randn(c.F * c.D, c.seed + 1, 1.0 / std::sqrt(static_cast<double>(c.D)));
  d.wu = host_test::randn(c.F * c.D, c.seed + 2, 1.0 / std::sqrt(static_cast<double>(c.D)));
  d.wd = host_test::randn(c.F * c.D, c.seed + 3);
  d.t = pick_threshold(c, d);
  cats::MlpParams p{};
  p.dim = c.D;
  p.x = base(0, c), p.w_gate = base(1, c), p.w_up = base(2, c), p.w_down_t = base(3, c);
  const bool vec = cats::mlp_vectorized(p, c.elem_bytes);
  HOST_CHECK(vec == (c.offset * c.elem_bytes % 16 == 0 && c.D * c.elem_bytes % 16 == 0), "vector path choice");
  const int W = vec ? 16 / c.elem_bytes : 1;
  Run got;
  std::vector<int> gate_reads(static_cast<size_t>(c.F * c.D), 0), up_reads = gate_reads, down_reads = gate_reads;
  switch (cats::token_bucket(c.M)) {
    case 1:
      run_bucket<1>(c, d, W, got, gate_reads, up_reads, down_reads);
      break;
    case 2:
      run_bucket<2>(c, d, W, got, gate_reads, up_reads, down_reads);
      break;
    case 4:
      run_bucket<4>(c, d, W, got, gate_reads, up_reads, down_reads);
      break;
    case 8:
      run_bucket<8>(c, d, W, got, gate_reads, up_reads, down_reads);
      break;
    default:
      run_bucket<16>(c, d, W, got, gate_reads, up_reads, down_reads);
      break;
  }
  std::vector<double> want;
  std::vector<uint8_t> keep;
  reference(c, d, want, keep);
  const auto tag = [&] {
    static char buf[160];
    std::snprintf(buf, sizeof buf, "M=%lld D=%lld F=%lld bytes=%d offset=%lld sparsity=%.2f W=%d", (long long)c.M,
                  (long long)c.D, (long long)c.F, c.elem_bytes, (long long)c.offset, c.sparsity, W);
    return buf;
  };
  int64_t count = 0;
  for (int64_t f = 0; f < c.F; ++f) {
    HOST_CHECK(got.keep[static_cast<size_t>(f)] == keep[static_cast<size_t>(f)], "%s: keep[%lld]", tag(), (long long)f);
    if (keep[static_cast<size_t>(f)])
      HOST_CHECK(got.kept[static_cast<size_t>(count++)] == f, "%s: kept[] order", tag());
    for (int64_t e = 0; e < c.D; ++e) {
      const size_t i = static_cast<size_t>(f * c.D + e);
      HOST_CHECK(gate_reads[i] == 1, "%s: gate element (%lld, %lld) read %d times", tag(), (long long)f, (long long)e,
                 gate_reads[i]);
      const int want_reads = keep[static_cast<size_t>(f)];
      HOST_CHECK(up_reads[i] == want_reads && down_reads[i] == want_reads,
                 "%s: row %lld read up %d / down %d times, want %d", tag(), (long long)f, up_reads[i], down_reads[i],
                 want_reads);
    }
  }
  HOST_CHECK(got.kept[static_cast<size_t>(c.F)] == count, "%s: count %d, want %lld", tag(),
             got.kept[static_cast<size_t>(c.F)], (long long)count);
  if (c.sparsity >= 1) HOST_CHECK(count == 0, "%s: everything dropped", tag());
  if (c.sparsity <= 0) HOST_CHECK(count == c.F, "%s: everything kept", tag());
  double scale = 0;
  for (double v : want) scale = std::max(scale, std::abs(v));
  for (size_t i = 0; i < want.size(); ++i)
    HOST_CHECK(host_test::close(got.y[i], want[i], 1e-12 * (1 + scale), 1e-12), "%s: y[%zu] = %.17g, want %.17g", tag(),
               i, got.y[i], want[i]);
}

}  // namespace

int main() {
  static_assert(cats::token_bucket(1) == 1 && cats::token_bucket(3) == 4 && cats::token_bucket(9) == 16 &&
                cats::token_bucket(cats::kMaxTokens) == 16);
  for (int64_t m = 1; m <= cats::kMaxTokens; ++m) {
    HOST_CHECK(cats::token_bucket(m) >= m && cats::token_bucket(m) < 2 * m, "bucket of %lld", (long long)m);
    HOST_CHECK(cats::gate_rows_per_warp(cats::token_bucket(m)) >= 1, "rows per warp");
  }
  // Even shares: every position in exactly one split, none longer than ceil(count / splits).
  for (int64_t count : {0, 1, 5, 64, 1000})
    for (int splits : {1, 3, 7, 64, 2000}) {
      int64_t next = 0;
      for (int s = 0; s < splits; ++s) {
        const cats::Range r = cats::down_range(count, splits, s);
        HOST_CHECK(r.begin == next && r.end - r.begin <= slab::ceil_div(count, splits), "down_range(%lld, %d, %d)",
                   (long long)count, splits, s);
        next = r.end;
      }
      HOST_CHECK(next == count, "down_range covers %lld of %lld", (long long)next, (long long)count);
    }
  // The Llama-7B decode shape: splits bounded by the target block count and the partial traffic.
  HOST_CHECK(cats::down_splits(1, 4096, 11008, 2) == 64 && cats::down_splits(16, 4096, 11008, 2) == 21,
             "llama splits %d %d", cats::down_splits(1, 4096, 11008, 2), cats::down_splits(16, 4096, 11008, 2));

  uint32_t seed = 1;
  const double sparsities[] = {0.0, 0.3, 0.7, 1.0};
  // Every token count on two shapes (odd, and whole packs for every width), every width, aligned
  // and misaligned bases.
  for (int64_t m = 1; m <= cats::kMaxTokens; ++m)
    for (auto [dim, features] : {std::pair<int64_t, int64_t>{9, 33}, {64, 300}})
      for (int bytes : {2, 4, 8})
        for (int64_t offset : {0, 1})
          for (double s : sparsities) check_case(Case{m, dim, features, bytes, offset, s, seed++});
  // Tails: one column, rows shorter than a pack, several tiles, F not a multiple of the rows per
  // block or the compaction block, chunked splits (few splits over many kept rows).
  for (int64_t m : {1, 3, 16})
    for (auto [dim, features] : {std::pair<int64_t, int64_t>{1, 1}, {7, 31}, {8, 257}, {24, 2000}, {264, 70}})
      for (int bytes : {2, 4, 8})
        for (int64_t offset : {0, 3})
          for (double s : {0.0, 0.5, 1.0}) check_case(Case{m, dim, features, bytes, offset, s, seed++});
  return host_test::finish();
}
