// optim.h + optim_math.h: the CUDA schedule of the multi-tensor engine run serially on the CPU.
// Launch tables (for_each_launch), the chunk -> tensor map (chunk_span), the thread -> pack map
// inside a chunk (for_each_item) and the rules' apply are the kernel's own; the emulation walks
// every (launch, block, thread) as rule_kernel and finalize_kernel do and checks the results
// against a float64 reference: every element visited once, by a 16-byte pack only when all its
// lists are aligned, tails, empty tensors, misaligned views, absent lists and lists longer than
// one launch.
#include <cmath>
#include <cstring>

#include "check.h"
#include "optim/optim.h"
#include "optim/optim_math.h"

using namespace slab;
using namespace slab::optim;

namespace {

constexpr int kThreads = 256;  // optim_cuda.cu's block size

// optim_cuda.cu's CudaOps on host scalars (T is float or double here: stored is the identity).
template <typename T>
struct HostOps {
  static T sqrt(T v) { return std::sqrt(v); }
  static T sign(T c) { return sign_of<T>(c); }
  static T stored(T v) { return static_cast<T>(v); }
};

// Storage of one list: every tensor in its own buffer, at an element offset (offset 1 makes a
// misaligned view, as x[1:] would).
template <typename E>
struct List {
  std::vector<std::vector<E>> buf;
  std::vector<int64_t> numel;
  std::vector<void*> data;
  int offset = 0;
  List(const std::vector<int64_t>& sizes, int off, uint32_t seed, double scale, bool positive)
      : numel(sizes), offset(off) {
    for (size_t t = 0; t < sizes.size(); ++t) {
      auto v = host_test::randn(sizes[t] + off, seed + static_cast<uint32_t>(t), scale);
      std::vector<E> b(v.size());
      for (size_t i = 0; i < v.size(); ++i) b[i] = static_cast<E>(positive ? std::abs(v[i]) : v[i]);
      buf.push_back(std::move(b));
    }
    // The buffers are allocated now (no later reallocation), so their data pointers are stable.
    for (auto& b : buf) data.push_back(b.data() + off);
  }
  TensorList list() const { return {static_cast<int64_t>(numel.size()), numel.data(), data.data()}; }
  E at(size_t t, int64_t i) const { return buf[t][static_cast<size_t>(i + offset)]; }
};

// rule_kernel + finalize_kernel over `lists`, serially: returns the sums per tensor (term j of
// tensor i at [j * count + i]) and counts every element's visits in `seen` (lead list's shape).
template <typename T, typename Rule>
std::vector<double> emulate(const Rule& rule, const TensorList (&lists)[Rule::kLists],
                            std::vector<std::vector<int>>& seen) {
  using A = acc_t<T>;
  constexpr int kW = kPackWidth<T>;
  const int64_t count = lists[0].count;
  std::vector<A> partial(static_cast<size_t>(kMaxSums * workspace_elems(lists[0]) + 1), A(0));
  const int64_t stride = workspace_elems(lists[0]);
  std::vector<double> sums(static_cast<size_t>(kMaxSums * count), 0.0);
  int launches = 0;
  for_each_launch(lists, Rule::kLists, [&](const ChunkTable& t, int64_t offset) {
    ++launches;
    HOST_CHECK(t.count >= 1 && t.count <= kMaxTensors, "launch of %d tensors", t.count);
    for (int block = 0; block < t.first_chunk[t.count]; ++block) {
      const ChunkSpan c = chunk_span(t, block);
      HOST_CHECK(c.n > 0 && c.n <= kCudaChunk && c.begin + c.n <= t.numel[c.slot], "chunk %d: [%lld, +%lld) of %lld",
                 block, (long long)c.begin, (long long)c.n, (long long)t.numel[c.slot]);
      void* ptr[kMaxLists] = {};
      const bool aligned = chunk_pointers<T, Rule>(t, c, ptr);
      const auto k = rule.template consts<A>(t.index[c.slot]);
      A block_acc[kMaxSums] = {};
      for (int tid = 0; tid < kThreads; ++tid) {
        A acc[kMaxSums] = {};
        for_each_item<kW>(c.n, aligned, tid, kThreads, [&](int64_t i, auto w) {
          constexpr int W = decltype(w)::value;
          HOST_CHECK(W == 1 || (aligned && (c.begin + i) % kW == 0), "pack at %lld unaligned", (long long)i);
          A r[kMaxLists][W];
          static_for<Rule::kLists>([&](auto l) {
            using E = ListElem<T, Rule, decltype(l)::value>;
            for (int e = 0; e < W; ++e) r[l][e] = ptr[l] ? A(static_cast<const E*>(ptr[l])[i + e]) : A(0);
          });
          for (int e = 0; e < W; ++e) {
            ++seen[static_cast<size_t>(t.index[c.slot])][static_cast<size_t>(c.begin + i + e)];
            A v[kMaxLists], s[kMaxSums];
            for (int l = 0; l < kMaxLists; ++l) v[l] = l < Rule::kLists ? r[l][e] : A(0);
            Rule::template apply<HostOps<A>>(k, v, s);
            for (int l = 0; l < Rule::kLists; ++l) r[l][e] = v[l];
            for (int j = 0; j < Rule::kSums; ++j) acc[j] = std::fma(s[j], s[j], acc[j]);
          }
          static_for<Rule::kLists>([&](auto l) {
            using E = ListElem<T, Rule, decltype(l)::value>;
            if constexpr (((Rule::kWritten >> decltype(l)::value) & 1) != 0)
              for (int e = 0; e < W; ++e) static_cast<E*>(ptr[l])[i + e] = static_cast<E>(r[l][e]);
          });
        });
        for (int j = 0; j < Rule::kSums; ++j) block_acc[j] += acc[j];
      }
      for (int j = 0; j < Rule::kSums; ++j) partial[static_cast<size_t>(j * stride + offset + block)] = block_acc[j];
    }
    // finalize_kernel: per tensor and term, its chunks' partials
    for (int slot = 0; slot < t.count; ++slot)
      for (int j = 0; j < Rule::kSums; ++j) {
        A total = 0;
        for (int ch = t.first_chunk[slot]; ch < t.first_chunk[slot + 1]; ++ch)
          total += partial[static_cast<size_t>(j * stride + offset + ch)];
        sums[static_cast<size_t>(j * count + t.index[slot])] = total;
      }
  });
  HOST_CHECK(launches == ceil_div(count, kMaxTensors), "%d launches for %lld tensors", launches, (long long)count);
  return sums;
}

std::vector<std::vector<int>> zeros_like(const std::vector<int64_t>& sizes) {
  std::vector<std::vector<int>> seen;
  for (int64_t n : sizes) seen.emplace_back(static_cast<size_t>(n), 0);
  return seen;
}

void check_seen_once(const std::vector<std::vector<int>>& seen, const char* what) {
  for (size_t t = 0; t < seen.size(); ++t)
    for (size_t i = 0; i < seen[t].size(); ++i)
      HOST_CHECK(seen[t][i] == 1, "%s: tensor %zu element %zu visited %d times", what, t, i, seen[t][i]);
}

template <typename T>
double tol() {
  return sizeof(T) == 4 ? 2e-5 : 1e-12;
}

// DoG: x <- x - eta (g s + wd x), dist2 = ||x_new - x0||^2 (x0 misaligned when off0 != 0).
template <typename T>
void check_dog(const std::vector<int64_t>& sizes, int off, int off0) {
  using A = acc_t<T>;
  List<T> x(sizes, off, 1, 1.0, false), g(sizes, off, 100, 0.1, false);
  List<A> x0(sizes, off0, 200, 1.0, false);
  List<T> x_orig(sizes, off, 1, 1.0, false);
  std::vector<A> eta(sizes.size());
  for (size_t t = 0; t < sizes.size(); ++t) eta[t] = static_cast<A>(0.01 * (1 + t % 7));
  const float grad_scale = 4.0f;
  const double wd = 0.1;
  const DogRule<A> rule{nullptr, &grad_scale, true, static_cast<A>(wd), eta.data()};
  auto seen = zeros_like(sizes);
  const auto sums = emulate<T>(rule, {x.list(), g.list(), x0.list()}, seen);
  check_seen_once(seen, "dog");
  for (size_t t = 0; t < sizes.size(); ++t) {
    double d2 = 0;
    for (int64_t i = 0; i < sizes[t]; ++i) {
      const double xv = x_orig.at(t, i), d = -double(g.at(t, i)) / grad_scale + wd * xv;
      const double xn = xv - double(eta[t]) * d;
      HOST_CHECK(host_test::close(x.at(t, i), xn, tol<T>(), tol<T>()), "dog x[%zu][%lld] = %g, want %g", t,
                 (long long)i, double(x.at(t, i)), xn);
      d2 += (xn - x0.at(t, i)) * (xn - x0.at(t, i));
    }
    HOST_CHECK(host_test::close(sums[t], d2, tol<T>(), 10 * tol<T>()), "dog dist2[%zu] = %g, want %g", t, sums[t], d2);
  }
}

// LAMB stage 1: two sums (||x||^2, ||u||^2), written moments, a sqrt.
template <typename T>
void check_lamb1(const std::vector<int64_t>& sizes, int off) {
  using A = acc_t<T>;
  List<T> x(sizes, off, 3, 1.0, false), g(sizes, off, 300, 0.1, false);
  List<A> m(sizes, off, 400, 0.1, false), v(sizes, off, 500, 0.01, true);
  const List<A> m0 = m, v0 = v;
  std::vector<A> bc(2 * sizes.size());
  for (size_t t = 0; t < sizes.size(); ++t) {
    bc[2 * t] = A(1.0 / (1 - std::pow(0.9, 1 + t % 3)));
    bc[2 * t + 1] = A(1.0 / std::sqrt(1 - std::pow(0.999, 1 + t % 3)));
  }
  const double b1 = 0.1, b2 = 0.001, eps = 1e-6, wd = 0.01;
  const LambStage1Rule<A> rule{{nullptr, nullptr, false, A(b1), A(b2), A(eps), bc.data()}, A(wd)};
  auto seen = zeros_like(sizes);
  const auto sums = emulate<T>(rule, {x.list(), g.list(), m.list(), v.list()}, seen);
  check_seen_once(seen, "lamb1");
  const int64_t n = static_cast<int64_t>(sizes.size());
  for (size_t t = 0; t < sizes.size(); ++t) {
    double xs = 0, us = 0;
    for (int64_t i = 0; i < sizes[t]; ++i) {
      const double xv = x.at(t, i), gv = g.at(t, i);
      const double mv = m0.at(t, i) + (gv - m0.at(t, i)) * b1, vv = v0.at(t, i) + (gv * gv - v0.at(t, i)) * b2;
      HOST_CHECK(host_test::close(m.at(t, i), mv, tol<T>(), tol<T>()), "lamb1 m[%zu][%lld]", t, (long long)i);
      HOST_CHECK(host_test::close(v.at(t, i), vv, tol<T>(), tol<T>()), "lamb1 v[%zu][%lld]", t, (long long)i);
      const double u = mv * bc[2 * t] / (std::sqrt(vv) * bc[2 * t + 1] + eps) + wd * xv;
      xs += xv * xv;
      us += u * u;
    }
    HOST_CHECK(host_test::close(sums[t], xs, tol<T>(), 10 * tol<T>()), "lamb1 ||x||^2[%zu] = %g, want %g", t, sums[t],
               xs);
    HOST_CHECK(host_test::close(sums[static_cast<size_t>(n) + t], us, tol<T>(), 10 * tol<T>()),
               "lamb1 ||u||^2[%zu] = %g, want %g", t, sums[static_cast<size_t>(n) + t], us);
  }
}

// Squared norms with the optional list absent (reads as 0) and present (misaligned).
template <typename T>
void check_sq_norm(const std::vector<int64_t>& sizes, int off, bool with_b) {
  using A = acc_t<T>;
  List<T> a(sizes, off, 7, 1.0, false), b(sizes, 0, 700, 1.0, false);
  const double wd = with_b ? 0.5 : 0.0;
  const SqNormRule<A> rule{nullptr, nullptr, A(wd)};
  TensorList none{};
  auto seen = zeros_like(sizes);
  const auto sums = emulate<T>(rule, {a.list(), with_b ? b.list() : none}, seen);
  check_seen_once(seen, "sq_norm");
  for (size_t t = 0; t < sizes.size(); ++t) {
    double want = 0;
    for (int64_t i = 0; i < sizes[t]; ++i) {
      const double d = double(a.at(t, i)) + (with_b ? wd * b.at(t, i) : 0.0);
      want += d * d;
    }
    HOST_CHECK(host_test::close(sums[t], want, tol<T>(), 10 * tol<T>()), "sq_norm[%zu] = %g, want %g", t, sums[t],
               want);
  }
}

// Lion: sign of the interpolation, two written lists, no sums.
template <typename T>
void check_lion(const std::vector<int64_t>& sizes, int off) {
  using A = acc_t<T>;
  List<T> x(sizes, off, 9, 1.0, false), g(sizes, off, 900, 0.1, false);
  List<A> m(sizes, off, 950, 0.1, false);
  const List<T> x0 = x;
  const List<A> m0 = m;
  const A lr = A(0.01);
  const double b1 = 0.1, b2 = 0.01, wd = 0.1;
  const LionRule<A> rule{nullptr, nullptr, false, A(b1), A(b2), A(wd), &lr};
  auto seen = zeros_like(sizes);
  emulate<T>(rule, {x.list(), g.list(), m.list()}, seen);
  check_seen_once(seen, "lion");
  for (size_t t = 0; t < sizes.size(); ++t)
    for (int64_t i = 0; i < sizes[t]; ++i) {
      const double gv = g.at(t, i), mv = m0.at(t, i), c = mv + (gv - mv) * b1;
      const double xn = x0.at(t, i) * (1 - double(lr) * wd) - double(lr) * (c > 0 ? 1 : (c < 0 ? -1 : 0));
      HOST_CHECK(host_test::close(x.at(t, i), xn, tol<T>(), tol<T>()), "lion x[%zu][%lld]", t, (long long)i);
      HOST_CHECK(host_test::close(m.at(t, i), mv + (gv - mv) * b2, tol<T>(), tol<T>()), "lion m[%zu][%lld]", t,
                 (long long)i);
    }
}

template <typename T>
void check_all(const std::vector<int64_t>& sizes) {
  for (int off : {0, 1}) {
    check_dog<T>(sizes, off, 0);
    check_dog<T>(sizes, 0, off);  // only x0 misaligned: the whole chunk takes the scalar path
    check_lamb1<T>(sizes, off);
    check_sq_norm<T>(sizes, off, false);
    check_sq_norm<T>(sizes, off, true);
    check_lion<T>(sizes, off);
  }
}

}  // namespace

int main() {
  // The chunk map: empty tensors own no chunk and are skipped.
  {
    const int first[] = {0, 0, 2, 2, 2, 5};  // tensors 0 and 2, 3 empty; 5 chunks
    const int want[] = {1, 1, 4, 4, 4};
    for (int c = 0; c < 5; ++c)
      HOST_CHECK(slot_of_chunk(first, 5, c) == want[c], "chunk %d -> slot %d", c, slot_of_chunk(first, 5, c));
  }
  const int64_t C = kCudaChunk;
  // Odd sizes, tails, empty tensors, exact chunk multiples.
  const std::vector<int64_t> odd = {0, 1, 3, 4, 5, 7, 0, 33, C - 1, C, C + 1, 2 * C + 7, 0};
  check_all<float>(odd);
  check_all<double>(odd);
  // More tensors than one launch holds (three launches), empty ones at the launch boundary.
  std::vector<int64_t> many;
  for (int i = 0; i < 2 * kMaxTensors + 5; ++i)
    many.push_back(i == kMaxTensors - 1 || i == kMaxTensors ? 0 : 1 + 37 * i);
  check_all<float>(many);
  return host_test::finish();
}
