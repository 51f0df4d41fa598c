// Minimal check helpers for the host-side schedule tests (tests/test_host_schedules.py).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

namespace host_test {

inline int64_t& checks() {
  static int64_t n = 0;
  return n;
}

#define HOST_CHECK(cond, ...)                                       \
  do {                                                              \
    ++::host_test::checks();                                        \
    if (!(cond)) {                                                  \
      std::printf("FAILED %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                     \
      std::printf("\n");                                            \
      std::exit(1);                                                 \
    }                                                               \
  } while (0)

// |got - want| <= atol + rtol |want|, and NaN never passes.
inline bool close(double got, double want, double atol, double rtol) {
  return std::isfinite(got) && std::abs(got - want) <= atol + rtol * std::abs(want);
}

inline std::vector<double> randn(int64_t n, uint32_t seed, double scale = 1.0) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(0.0, scale);
  std::vector<double> v(static_cast<size_t>(n));
  for (auto& x : v) x = dist(gen);
  return v;
}

inline int finish() {
  std::printf("%lld checks passed\n", static_cast<long long>(checks()));
  return 0;
}

}  // namespace host_test
