// Torch-side helpers shared by every family's binding layer (<family>_ops.cpp): dtype mapping,
// argument checks with messages that name the argument, and the CPU/CUDA launch switch.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <type_traits>

#include "core/common.h"

#ifdef SLAB_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#define SLAB_CUDA_FN(fn) fn
#else
#define SLAB_CUDA_FN(fn) nullptr
#endif

struct CUstream_st;

namespace slab {

inline DType kernel_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default:
      TORCH_CHECK(false, name, " must be float32, bfloat16 or float16 (float64 for gradcheck), got ",
                  t.scalar_type());
  }
}

// Accumulation dtype of statistics and states for inputs of dtype `t`.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// A scalar hyperparameter: finite, and >= 0 unless `non_negative` is false.
inline void check_finite(double v, const char* name, bool non_negative = true) {
  TORCH_CHECK_VALUE(std::isfinite(v) && (!non_negative || v >= 0), name, " must be finite",
                    non_negative ? " and >= 0" : "", ", got ", v);
}

// A fraction (momentum, interpolation weight): finite and in [0, 1].
inline void check_unit_interval(double v, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(v) && v >= 0 && v <= 1, name, " must be in [0, 1], got ", v);
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but x is on ", ref.device(),
              "; all tensors must be on one device");
}

// A per-channel vector (weights, statistics): 1-D of `channels` elements, dtype that of x or the
// accumulation dtype (as torch's own norms accept), same device. Returns a contiguous tensor in
// the accumulation dtype; no copy when it already is one.
inline at::Tensor channel_vector(const at::Tensor& t, const at::Tensor& x, int64_t channels,
                                 const char* name) {
  check_same_device(t, x, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, name, " must have shape (", channels,
              ",) to match the last dimension of x, got ", t.sizes());
  const auto acc = acc_dtype(x.scalar_type());
  TORCH_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == acc, name, " must be ",
              x.scalar_type(), " or ", acc, " to match x, got ", t.scalar_type());
  return t.to(acc).contiguous();
}

inline std::optional<at::Tensor> channel_vector(const std::optional<at::Tensor>& t, const at::Tensor& x,
                                                int64_t channels, const char* name) {
  if (!t.has_value()) return std::nullopt;
  return channel_vector(*t, x, channels, name);
}

inline const void* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr() : nullptr;
}

// Runs the CPU or the CUDA launcher of a kernel on the device of `like`, on the current stream.
template <typename Params>
void launch(const at::Tensor& like, const Params& p, void (*cpu)(const Params&),
            std::type_identity_t<void (*)(const Params&, CUstream_st*)> cuda) {
  if (like.is_cpu()) {
    cpu(p);
    return;
  }
#ifdef SLAB_WITH_CUDA
  TORCH_CHECK(like.is_cuda() && cuda != nullptr, "slab: no kernel for device ", like.device());
  c10::DeviceGuard guard(like.device());
  cuda(p, c10::cuda::getCurrentCUDAStream(like.device().index()).stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
  (void)cuda;
  TORCH_CHECK(false, "slab: no kernel for device ", like.device(), " (this build has CPU kernels only)");
#endif
}

// In a CPU-only build, CUDA tensors reaching an op get this error instead of a dispatcher one.
void register_cuda_unavailable(torch::Library& m, std::initializer_list<const char*> ops);

}  // namespace slab
