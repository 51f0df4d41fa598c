// The SLA depthwise-conv branch's CUDA decompositions (sla/dwc.h) run on the CPU:
// - row_pack: the (row, channel pack) items of dwc_kernel / step_kernel cover every channel once;
// - the weight gradient's (slice, token range) blocks and their partial rows, added in row order
//   as weight_grad_reduce_kernel does, against a float64 reference, for 1-D and 2-D grids, odd
//   sizes, more ranges than fit, and few tokens.
#include "check.h"
#include "sla/dwc.h"
#include "sla/dwc_math.h"

using namespace slab::sla;

static void check_row_pack() {
  for (int64_t channels : {1, 2, 8, 12, 64, 384, 1000})
    for (int width : {1, 2, 4, 8})
      if (channels % width == 0)
        for (int64_t rows : {1, 3, 17}) {
          std::vector<int> seen(size_t(rows * channels), 0);
          for (int64_t e = 0; e < rows * (channels / width); ++e) {
            const RowPack it = row_pack(e, channels, width);
            HOST_CHECK(it.row < rows && it.channel % width == 0 && it.channel + width <= channels, "item %lld",
                       (long long)e);
            for (int w = 0; w < width; ++w) ++seen[size_t(it.row * channels + it.channel + w)];
          }
          for (int v : seen)
            HOST_CHECK(v == 1, "C=%lld width=%d: a channel seen %d times", (long long)channels, width, v);
        }
}

static void check_weight_grad(int64_t B, int64_t H, int64_t C, int64_t gh, int64_t gw, int64_t kh, int64_t kw,
                              uint32_t seed) {
  const DwcGeometry g{B, H, C, gh, gw, kh, kw, kh / 2, kw / 2};
  const int64_t N = gh * gw, taps = kh * kw, slices = B * H, row_len = (taps + 1) * C;
  const auto grad = host_test::randn(slices * N * C, seed), v = host_test::randn(slices * N * C, seed + 1);
  auto at = [&](const std::vector<double>& t, int64_t s, int64_t n, int64_t c) {
    return t[size_t((s * N + n) * C + c)];
  };
  // Reference: direct sums over every output token and in-grid tap.
  std::vector<double> ref(size_t(row_len), 0.0);
  for (int64_t s = 0; s < slices; ++s)
    for (int64_t y = 0; y < gh; ++y)
      for (int64_t x = 0; x < gw; ++x)
        for (int64_t c = 0; c < C; ++c) {
          const double gr = at(grad, s, y * gw + x, c);
          ref[size_t(taps * C + c)] += gr;
          for (int64_t i = 0; i < kh; ++i)
            for (int64_t j = 0; j < kw; ++j) {
              const int64_t yy = y + i - g.pad_top, xx = x + j - g.pad_left;
              if (yy >= 0 && yy < gh && xx >= 0 && xx < gw)
                ref[size_t((i * kw + j) * C + c)] += gr * at(v, s, yy * gw + xx, c);
            }
        }
  // The kernels' schedule: blocks over (slice, token range), then the ordered reduction.
  const int64_t splits = grad_token_splits(N, slices);
  HOST_CHECK(splits >= 1 && (splits == 1 || N / splits >= kGradMinTokens), "splits %lld for N=%lld", (long long)splits,
             (long long)N);
  std::vector<double> partial(size_t(slices * splits * row_len));
  std::vector<int> covered(size_t(slices * N), 0);
  for (int64_t block = 0; block < slices * splits; ++block) {
    const int64_t s = block / splits;
    int64_t n0, n1;
    grad_token_range(N, splits, block % splits, n0, n1);
    for (int64_t n = n0; n < n1; ++n) ++covered[size_t(s * N + n)];
    for (int64_t e = 0; e < row_len; ++e) {
      const int64_t tap = e / C, c = e % C, i = tap / kw, j = tap % kw;
      double total = 0;
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t y = n / gw, x = n % gw;
        const double gr = at(grad, s, n, c);
        if (tap == taps) {
          total += gr;
          continue;
        }
        int64_t ilo, ihi, jlo, jhi;
        tap_range(y, g.pad_top, gh, kh, ilo, ihi);
        tap_range(x, g.pad_left, gw, kw, jlo, jhi);
        if (i >= ilo && i < ihi && j >= jlo && j < jhi)
          total = tap_fma(total, gr, at(v, s, tap_source(g, y, x, i, j), c));
      }
      partial[size_t(block * row_len + e)] = total;
    }
  }
  for (int cov : covered) HOST_CHECK(cov == 1, "a token in %d ranges", cov);
  for (int64_t e = 0; e < row_len; ++e) {
    double total = 0;
    for (int64_t r = 0; r < slices * splits; ++r) total += partial[size_t(r * row_len + e)];
    HOST_CHECK(host_test::close(total, ref[size_t(e)], 1e-9, 1e-9),
               "geometry %lldx%lld k %lldx%lld: entry %lld %g vs %g", (long long)gh, (long long)gw, (long long)kh,
               (long long)kw, (long long)e, total, ref[size_t(e)]);
  }
}

int main() {
  check_row_pack();
  for (int64_t tokens : {0, 1, 63, 64, 127, 128, 1000, 100000})
    for (int64_t slices : {1, 3, 64, 5000}) {
      const int64_t splits = grad_token_splits(tokens, slices);
      HOST_CHECK(splits >= 1 && splits * slices <= std::max<int64_t>(slices, kGradTargetBlocks + slices), "splits");
      int64_t prev_end = 0;
      for (int64_t s = 0; s < splits; ++s) {
        int64_t b, e;
        grad_token_range(tokens, splits, s, b, e);
        HOST_CHECK(b == prev_end && e >= b, "ranges contiguous");
        prev_end = e;
      }
      HOST_CHECK(prev_end == tokens, "ranges cover the tokens");
    }
  uint32_t seed = 11;
  check_weight_grad(1, 1, 3, 14, 14, 5, 5, seed++);  // vision grid, one slice: many ranges
  check_weight_grad(2, 3, 5, 7, 9, 3, 3, seed++);    // odd grid, few tokens: one range
  check_weight_grad(1, 2, 4, 1, 700, 1, 4, seed++);  // causal-style 1-D row (grid_w = N)
  check_weight_grad(1, 1, 2, 300, 1, 4, 1, seed++);  // 1-D column
  return host_test::finish();
}
