// Out-of-line parts of the binding helpers (binding.h): the memory-overlap check of in-place ops.
#include "core/binding.h"

#include <ATen/MemoryOverlap.h>

#include <algorithm>

namespace slab {
namespace {

// Bytes [lo, hi) of a tensor's storage that its elements can touch (strides of any sign).
std::pair<int64_t, int64_t> byte_span(const at::Tensor& t) {
  const int64_t item = static_cast<int64_t>(t.element_size());
  int64_t lo = t.storage_offset(), hi = t.storage_offset();
  for (int64_t d = 0; d < t.dim(); ++d) {
    const int64_t reach = (t.size(d) - 1) * t.stride(d);
    (reach < 0 ? lo : hi) += reach;
  }
  return {lo * item, (hi + 1) * item};
}

}  // namespace

AliasCheck& AliasCheck::add(const at::Tensor& t, std::string name, bool written) {
  if (!t.defined() || t.numel() == 0 || !t.has_storage()) return *this;
  if (written) {
    TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, "unsupported operation: ", name,
                " is written in place, but more than one of its elements refer to a single memory location "
                "(an expanded or stride-0 view); pass a tensor that owns its elements (e.g. ", name, ".clone())");
  }
  entries_.push_back({t, std::move(name), written});
  return *this;
}

AliasCheck& AliasCheck::add(at::TensorList ts, const char* name, bool written) {
  for (size_t i = 0; i < ts.size(); ++i) add(ts[i], std::string(name) + "[" + std::to_string(i) + "]", written);
  return *this;
}

void AliasCheck::check() const {
  struct Span {
    const void* storage;
    int64_t lo, hi;
    const Entry* e;
  };
  std::vector<Span> spans;
  spans.reserve(entries_.size());
  for (const auto& e : entries_) {
    const auto [lo, hi] = byte_span(e.t);
    spans.push_back({e.t.storage().unsafeGetStorageImpl(), lo, hi, &e});
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    return a.storage != b.storage ? std::less<const void*>()(a.storage, b.storage) : a.lo < b.lo;
  });
  // Sweep each storage in order of start; a span can only meet spans that start before it ends.
  for (size_t i = 0; i < spans.size(); ++i) {
    for (size_t j = i + 1; j < spans.size() && spans[j].storage == spans[i].storage && spans[j].lo < spans[i].hi;
         ++j) {
      const Entry &a = *spans[i].e, &b = *spans[j].e;
      if (!a.written && !b.written) continue;
      // Interleaved views (x[0::2] and x[1::2]) share a span but no element; torch's exact test
      // decides where it can, and anything it cannot prove disjoint is refused.
      if (at::get_overlap_status(a.t, b.t) == at::MemOverlapStatus::No) continue;
      const Entry& w = a.written ? a : b;
      const Entry& o = a.written ? b : a;
      TORCH_CHECK(false, "unsupported operation: some elements of ", o.name, " and ", w.name,
                  " (written in place) refer to a single memory location; pass distinct tensors (e.g. ", o.name,
                  ".clone())");
    }
  }
}

}  // namespace slab
