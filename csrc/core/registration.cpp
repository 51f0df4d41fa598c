// The slab op library: TORCH_LIBRARY declares the namespace; each family adds its schemas with
// TORCH_LIBRARY_FRAGMENT in csrc/<family>/<family>_ops.cpp.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include "core/binding.h"

namespace slab {
namespace {

bool compiled_with_cuda() {
#ifdef SLAB_WITH_CUDA
  return true;
#else
  return false;
#endif
}

void cuda_unavailable(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK(false, op.schema().name(),
              ": got a CUDA tensor, but this slab build has CPU kernels only. Rebuild with a CUDA "
              "build of torch and nvcc present (SLAB_CUDA=1), or move the tensors to the CPU.");
}

}  // namespace

void register_cuda_unavailable(torch::Library& m, std::initializer_list<const char*> ops) {
  for (const char* name : ops) m.impl(name, torch::CppFunction::makeFromBoxedFunction<&cuda_unavailable>());
}

}  // namespace slab

TORCH_LIBRARY(slab, m) {
  m.def("_compiled_with_cuda() -> bool", &slab::compiled_with_cuda);
}
