// The Hopper weight layout (Layout::kSm90, w4a8.h) built on the CPU: every byte from sm90_byte()
// (w4a8_math.h), the same function the CUDA reorder and the host tests use.
#include "core/cpu_types.h"
#include "w4a8/w4a8.h"
#include "w4a8/w4a8_math.h"

namespace slab::w4a8 {

void tile_weights_sm90_cpu(const uint8_t* src, int64_t n, int64_t k, uint8_t* dst) {
  const int64_t total = sm90_packed_rows(n) * sm90_packed_row_bytes(k);
  parallel_for(0, total, 8 * kSm90BlockBytes, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) dst[i] = sm90_byte(src, n, k, i);
  });
}

}  // namespace slab::w4a8
