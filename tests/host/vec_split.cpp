// core/vec.h: every element of a streaming range is visited exactly once, by a pack of the right
// width, for every grid size, alignment and length (the loop structure of for_each_pack).
#include <cstring>

#include "check.h"
#include "core/vec.h"

using slab::PackSplit;

// for_each_pack's two grid-stride loops, with `threads` threads in all.
static std::vector<int> visit(int64_t n, int width, bool vectorized, int64_t threads) {
  std::vector<int> seen(static_cast<size_t>(n), 0);
  const PackSplit s = slab::pack_split(n, width, vectorized);
  for (int64_t t = 0; t < threads; ++t) {
    for (int64_t k = t; k < s.packs; k += threads)
      for (int j = 0; j < s.width; ++j) ++seen[static_cast<size_t>(k * s.width + j)];
    for (int64_t k = t; k < s.tail; k += threads) ++seen[static_cast<size_t>(s.packs * s.width + k)];
  }
  return seen;
}

int main() {
  for (int width : {1, 2, 4, 8, 16})
    for (bool vectorized : {false, true})
      for (int64_t n : {0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 100, 1023, 4099})
        for (int64_t threads : {1, 3, 32, 256, 5000}) {
          const auto seen = visit(n, width, vectorized, threads);
          for (int64_t i = 0; i < n; ++i)
            HOST_CHECK(seen[static_cast<size_t>(i)] == 1, "n=%lld width=%d vec=%d threads=%lld i=%lld seen %d",
                       (long long)n, width, vectorized, (long long)threads, (long long)i, seen[static_cast<size_t>(i)]);
          const PackSplit s = slab::pack_split(n, width, vectorized);
          int64_t covered = 0;
          for (int64_t k = 0; k < s.items(); ++k) {
            HOST_CHECK(s.offset(k) == covered, "offset of item %lld", (long long)k);
            covered += s.count(k);
          }
          HOST_CHECK(covered == n, "items cover %lld of %lld", (long long)covered, (long long)n);
        }
  alignas(16) unsigned char buf[64];
  HOST_CHECK(slab::vec_aligned(buf) && !slab::vec_aligned(buf + 4), "alignment test");
  HOST_CHECK(slab::all_vec_aligned(buf, buf + 16, static_cast<const float*>(nullptr)), "null counts as aligned");
  HOST_CHECK(!slab::all_vec_aligned(buf, buf + 8), "one misaligned pointer");
  HOST_CHECK(slab::rows_vec_aligned(8, 2) && !slab::rows_vec_aligned(12, 2) && slab::rows_vec_aligned(4, 4),
             "row alignment");
  static_assert(slab::kPackWidth<float> == 4 && slab::kPackWidth<double> == 2 && slab::kPackWidth<uint16_t> == 8);
  return host_test::finish();
}
