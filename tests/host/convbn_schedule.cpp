// convbn.h / convbn_math.h: the CUDA fold kernels' schedules run serially on the CPU. Forward: the
// grid-stride pass over packs of the flattened weight (a pack never straddles two channels);
// backward: blocks (channel, split) over packs of a row, each block's sum reduced as block_sum
// does (an xor butterfly per warp, then the warps in order), the splits added in order by the
// per-channel pass. Checked against a float64 reference on odd sizes, empty rows, misaligned
// bases (the scalar path) and grids smaller than the work (the grid-stride loops).
#include <cstring>

#include "check.h"
#include "convbn/convbn.h"
#include "convbn/convbn_math.h"

using namespace slab::convbn;

namespace {

struct Case {
  int64_t channels, k;
  bool misaligned;  // bases one element past a 16-byte boundary: the scalar path
  int64_t grid;     // blocks of the emulated grid (0: as many as the launcher asks for)
};

// Per-channel vectors in the accumulation type and float64 copies for the reference.
template <typename A>
struct Vectors {
  std::vector<A> bias, gamma, beta, mean, var, grad_bias;
  Vectors(int64_t c, uint32_t seed) {
    const auto take = [&](uint32_t s, double shift, double scale) {
      std::vector<A> v;
      for (double x : host_test::randn(c, seed + s, scale)) v.push_back(static_cast<A>(x + shift));
      return v;
    };
    bias = take(1, 0, 1), gamma = take(2, 1, 0.5), beta = take(3, 0, 1), mean = take(4, 0, 1);
    var = take(5, 0, 1), grad_bias = take(6, 0, 1);
    for (auto& v : var) v = v * v + A(0.1);
  }
};

// block_sum of kBwdThreads per-thread values: each warp's xor butterfly, then the warps in order.
template <typename A>
A block_sum(std::vector<A> v) {
  A total = A(0);
  for (int w = 0; w < kBwdThreads / 32; ++w) {
    A* lane = v.data() + w * 32;
    for (int offset = 16; offset > 0; offset >>= 1) {
      A next[32];
      for (int l = 0; l < 32; ++l) next[l] = lane[l] + lane[l ^ offset];
      std::memcpy(lane, next, sizeof(next));
    }
    total += lane[0];
  }
  return total;
}

template <typename T>
void run(const Case& cs, uint32_t seed) {
  using A = T;  // float or double: acc_t<T> == T
  const int64_t C = cs.channels, K = cs.k, n = C * K;
  const int pack = slab::kPackWidth<T>;
  // 16-byte aligned storage; a misaligned case views it from element 1
  std::vector<T> gw_buf(n + pack), w_buf(n + pack), out_buf(n + pack, T(-7));
  const int64_t off = cs.misaligned ? 1 : 0;
  const auto align = [&](std::vector<T>& b) {
    auto* p = b.data();
    while (reinterpret_cast<uintptr_t>(p) % 16 != 0) ++p;  // vector storage is at least 8-aligned
    return p + off;
  };
  T* gw = align(gw_buf);
  T* w = align(w_buf);
  T* dw = align(out_buf);
  // keep the aligned view inside the buffers
  HOST_CHECK(gw + n <= gw_buf.data() + gw_buf.size() && dw + n <= out_buf.data() + out_buf.size(), "buffer");
  const auto g64 = host_test::randn(n, seed, 1.0), w64 = host_test::randn(n, seed + 9, 1.0);
  for (int64_t i = 0; i < n; ++i) gw[i] = static_cast<T>(g64[i]), w[i] = static_cast<T>(w64[i]);
  const Vectors<A> v(C, seed + 17);
  const A eps = A(1e-5);

  const int width = fold_width(pack, K, sizeof(T), gw, w, dw);
  HOST_CHECK(width == 1 || width == pack, "width %d", width);
  if (cs.misaligned || (K * static_cast<int64_t>(sizeof(T))) % 16 != 0) HOST_CHECK(width == 1, "must be scalar");
  const double tol = sizeof(T) == 4 ? 2e-6 : 1e-13;

  // ---- forward: for_each_pack's loops over the flattened weight ----
  const slab::PackSplit split = slab::pack_split(n, pack, width > 1);
  HOST_CHECK(split.tail == 0 || width == 1, "a vector pass leaves no tail");
  const int64_t threads = (cs.grid ? cs.grid : 4) * kFoldThreads;
  std::vector<int> seen(static_cast<size_t>(n), 0);
  for (int64_t t = 0; t < threads; ++t) {
    for (int64_t item = t; item < split.items(); item += threads) {
      const int64_t e = split.offset(item), cnt = split.count(item);
      const int64_t o = e / K;
      HOST_CHECK((e + cnt - 1) / K == o, "pack at %lld straddles channels (k=%lld)", (long long)e, (long long)K);
      const A g = channel(v.bias.data(), v.gamma.data(), v.mean.data(), v.var.data(), eps, o).g;
      for (int64_t i = e; i < e + cnt; ++i) {
        dw[i] = static_cast<T>(scale_elem(static_cast<A>(w[i]), g));
        ++seen[static_cast<size_t>(i)];
      }
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t o = i / K;
    const double g = double(v.gamma[o]) / std::sqrt(double(v.var[o]) + double(eps));
    HOST_CHECK(seen[i] == 1, "fwd element %lld seen %d times", (long long)i, seen[i]);
    HOST_CHECK(host_test::close(dw[i], double(w[i]) * g, tol * std::abs(g), tol), "fwd w' at %lld", (long long)i);
  }
  for (int64_t o = 0; o < C; ++o) {
    const Channel<A> c = channel(v.bias.data(), v.gamma.data(), v.mean.data(), v.var.data(), eps, o);
    const double g = double(v.gamma[o]) / std::sqrt(double(v.var[o]) + double(eps));
    const double want = double(v.beta[o]) + (double(v.bias[o]) - double(v.mean[o])) * g;
    HOST_CHECK(host_test::close(fold_bias(v.beta[o], c.centered, c.g), want, tol * 10, tol * 10), "fwd b' %lld",
               (long long)o);
  }

  // ---- backward: bwd_rows_kernel over blocks (channel, split), then bwd_channels_kernel ----
  std::fill(seen.begin(), seen.end(), 0);
  const int64_t items = bwd_items(K, width);
  const int splits = bwd_splits(C, items);
  HOST_CHECK(C * splits <= fold_backward_workspace_elems(C, K), "workspace too small: %lld", (long long)(C * splits));
  std::vector<A> partial(static_cast<size_t>(C * splits), A(-1));
  // grid (x blocks over the channels, splits): blockIdx.y = s, channels grid-strided over x
  const int64_t grid = cs.grid ? cs.grid : (C > 65535 ? 65535 : C), per = bwd_per_split(items, splits);
  for (int s = 0; s < splits; ++s) {
    for (int64_t bx = 0; bx < grid; ++bx) {
      for (int64_t o = bx; o < C; o += grid) {
        const Range r = bwd_range(items, per, s);
        HOST_CHECK(r.begin <= r.end && r.end <= items, "range");
        const A g = channel(v.bias.data(), v.gamma.data(), v.mean.data(), v.var.data(), eps, o).g;
        std::vector<A> acc(kBwdThreads, A(0));
        for (int t = 0; t < kBwdThreads; ++t)
          for (int64_t q = r.begin + t; q < r.end; q += kBwdThreads)
            for (int i = 0; i < width; ++i) {
              const int64_t e = o * K + q * width + i;
              acc[t] = dot_step(acc[t], static_cast<A>(gw[e]), static_cast<A>(w[e]));
              dw[e] = static_cast<T>(scale_elem(static_cast<A>(gw[e]), g));
              ++seen[static_cast<size_t>(e)];
            }
        partial[static_cast<size_t>(o * splits + s)] = block_sum(acc);
      }
    }
  }
  for (int64_t i = 0; i < n; ++i) HOST_CHECK(seen[i] == 1, "bwd element %lld seen %d times", (long long)i, seen[i]);
  for (int64_t o = 0; o < C; ++o) {
    A dot = A(0);
    for (int s = 0; s < splits; ++s) dot += partial[static_cast<size_t>(o * splits + s)];
    const Channel<A> c = channel(v.bias.data(), v.gamma.data(), v.mean.data(), v.var.data(), eps, o);
    const ChannelGrads<A> got = channel_grads(c, v.grad_bias[o], dot);
    const double r = 1.0 / std::sqrt(double(v.var[o]) + double(eps)), g = double(v.gamma[o]) * r;
    const double centered = double(v.bias[o]) - double(v.mean[o]);
    double ref = 0, mag = 0;
    for (int64_t kk = 0; kk < K; ++kk) {
      const int64_t e = o * K + kk;
      ref += double(gw[e]) * double(w[e]);
      mag += std::abs(double(gw[e]) * double(w[e]));
      HOST_CHECK(host_test::close(dw[e], double(gw[e]) * g, tol * std::abs(g), tol), "dw at %lld", (long long)e);
    }
    const double want_gamma = r * (ref + double(v.grad_bias[o]) * centered);
    const double scale = r * (mag + std::abs(double(v.grad_bias[o]) * centered));
    HOST_CHECK(host_test::close(got.gamma, want_gamma, 4 * tol * (scale + 1), tol),
               "dgamma[%lld] of (%lld, %lld), splits %d: got %g want %g", (long long)o, (long long)C, (long long)K,
               splits, double(got.gamma), want_gamma);
    HOST_CHECK(host_test::close(got.bias, double(v.grad_bias[o]) * g, tol * 10, tol * 10), "dbias");
    HOST_CHECK(got.beta == v.grad_bias[o], "dbeta");
  }
}

// The splits of a row partition it; rows are split only while there are few channels.
void check_splits() {
  for (int64_t c : {1, 2, 5, 64, 1000, 1024, 5000, 70000})
    for (int64_t items : {0, 1, 255, 1024, 1025, 100000, 1 << 22}) {
      const int s = bwd_splits(c, items);
      HOST_CHECK(s >= 1 && s <= kBwdMaxSplits, "splits %d", s);
      HOST_CHECK(s == 1 || c * (s - 1) < kBwdTargetBlocks, "too many splits %d for %lld channels", s, (long long)c);
      HOST_CHECK(s == 1 || items / s >= kBwdMinItems - 1, "splits %d too small for %lld", s, (long long)items);
      int64_t next = 0;
      for (int k = 0; k < s; ++k) {
        const Range r = bwd_range(items, bwd_per_split(items, s), k);
        HOST_CHECK(r.begin == next && r.end >= r.begin, "ranges must tile the row");
        next = r.end;
      }
      HOST_CHECK(next == items, "ranges cover %lld of %lld", (long long)next, (long long)items);
    }
}

}  // namespace

int main() {
  check_splits();
  uint32_t seed = 1;
  for (int64_t c : {1, 2, 3, 17, 64, 300})
    for (int64_t k : {0, 1, 3, 4, 8, 9, 27, 64, 1000, 4608, 20000, 100003})
      for (bool misaligned : {false, true})
        for (int64_t grid : {0, 1, 7}) {
          if (c * k > 1000000 || (grid != 0 && c * k > 300000)) continue;
          run<float>({c, k, misaligned, grid}, seed);
          run<double>({c, k, misaligned, grid}, seed + 1);
          seed += 2;
        }
  return host_test::finish();
}
