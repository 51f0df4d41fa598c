// Out-of-line parts of the binding helpers (binding.h): the memory-overlap check of
// in-place ops and, in the CUDA library, the current stream and the launch check.
#include "core/binding.h"

#include <algorithm>

#ifdef SLAB_WITH_CUDA
#include <cuda_runtime_api.h>

// The AOTI shim declares this only when torch itself is built with USE_CUDA; it is part of the
// stable C shim of every CUDA build of torch.
extern "C" AOTITorchError aoti_torch_get_current_cuda_stream(int32_t device_index, void** ret_stream);
#endif

namespace slab {

AliasCheck& AliasCheck::add(const Tensor& t, std::string name, bool written) {
  if (!t.defined() || t.numel() == 0) return *this;
  int64_t lo = 0, hi = 0;  // element offsets from data_ptr that the tensor reaches
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) <= 1) continue;
    SLAB_CHECK(!written || t.stride(d) != 0, "unsupported operation: ", name,
               " is written in place, but more than one of its elements refer to a single memory location "
               "(an expanded or stride-0 view); pass a tensor that owns its elements (e.g. ",
               name, ".clone())");
    const int64_t reach = (t.size(d) - 1) * t.stride(d);
    (reach < 0 ? lo : hi) += reach;
  }
  const auto base = reinterpret_cast<uintptr_t>(t.data_ptr());
  const auto item = static_cast<int64_t>(t.element_size());
  entries_.push_back({base + lo * item, base + (hi + 1) * item, std::move(name), written});
  return *this;
}

AliasCheck& AliasCheck::add_list(const std::vector<Tensor>& ts, const char* name, bool written) {
  for (size_t i = 0; i < ts.size(); ++i) add(ts[i], item(name, i), written);
  return *this;
}

void AliasCheck::check() const {
  std::vector<size_t> order(entries_.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return entries_[a].lo < entries_[b].lo; });
  // A span can only meet spans that start before it ends.
  for (size_t i = 0; i < order.size(); ++i) {
    const Entry& a = entries_[order[i]];
    for (size_t j = i + 1; j < order.size() && entries_[order[j]].lo < a.hi; ++j) {
      const Entry& b = entries_[order[j]];
      if (!a.written && !b.written) continue;
      const Entry& w = a.written ? a : b;
      const Entry& o = a.written ? b : a;
      fail("unsupported operation: some elements of ", o.name, " and ", w.name,
           " (written in place) refer to a single memory location; pass distinct tensors (e.g. ", o.name, ".clone())");
    }
  }
}

#ifdef SLAB_WITH_CUDA
CUstream_st* current_stream(const Tensor& like) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(like.get_device_index(), &stream));
  return static_cast<CUstream_st*>(stream);
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  SLAB_CHECK(err == cudaSuccess, what, " failed to launch: ", cudaGetErrorString(err));
}
#endif

}  // namespace slab
