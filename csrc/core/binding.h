// Torch-side helpers shared by every family's binding layer (<family>_ops.cpp): dtype mapping,
// argument checks with messages that name the argument, and the CPU/CUDA launch switch.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

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

// A tensor argument the schema requires: None reaches the kernel as an undefined tensor.
inline void check_defined(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " must be a tensor, got None");
}

inline DType kernel_dtype(const at::Tensor& t, const char* name) {
  check_defined(t, name);
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

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name = "x") {
  check_defined(t, name);
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device(),
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
  if (x.scalar_type() == acc) {
    TORCH_CHECK(t.scalar_type() == acc, name, " must be ", acc, " to match x, got ", t.scalar_type());
  } else {
    TORCH_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == acc, name, " must be ", x.scalar_type(),
                " or ", acc, " to match x, got ", t.scalar_type());
  }
  return t.to(acc).contiguous();
}

inline std::optional<at::Tensor> channel_vector(const std::optional<at::Tensor>& t, const at::Tensor& x,
                                                int64_t channels, const char* name) {
  if (!t.has_value()) return std::nullopt;
  return channel_vector(*t, x, channels, name);
}

// `t` contiguous with its data aligned to `bytes`, for kernels that read it in words of that size:
// a view with a misaligned storage offset is copied into a fresh (aligned) allocation.
inline at::Tensor aligned_contiguous(const at::Tensor& t, int64_t bytes) {
  at::Tensor c = t.contiguous();
  if (c.numel() > 0 && reinterpret_cast<uintptr_t>(c.data_ptr()) % bytes != 0) c = c.clone();
  return c;
}

inline const void* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr() : nullptr;
}

// A plain tensor with concrete sizes and real memory, not one of the fake, functional or symbolic
// tensors a composite kernel sees under torch.compile / opcheck tracing (whose fakes check shapes):
// only such tensors get a composite kernel's own size and memory checks.
inline bool is_concrete(const at::Tensor& t) {
  const auto keys = t.key_set();
  return t.defined() && !t.is_meta() && !t.unsafeGetTensorImpl()->has_symbolic_sizes_strides() &&
         !keys.has(c10::DispatchKey::Python) && !keys.has(c10::DispatchKey::Functionalize);
}

// a * b for sizes that feed an allocation or a loop bound (int64 products of user integers can
// wrap and then pass a shape check): a ValueError naming `what` when it overflows.
inline int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t out = 0;
  TORCH_CHECK_VALUE(!c10::mul_overflows(a, b, &out), what, " overflows int64: ", a, " * ", b);
  return out;
}

// In-place ops: every written tensor must own its elements (no stride-0 / expanded view) and share
// no memory with any other argument, as torch's own in-place and out= ops require. Checked before
// anything is written, e.g.
//   AliasCheck().written(state, "state").read(q, "q").read(k, "k").check();
class AliasCheck {
 public:
  AliasCheck& written(const at::Tensor& t, const char* name) { return add(t, std::string(name), true); }
  AliasCheck& read(const at::Tensor& t, const char* name) { return add(t, std::string(name), false); }
  AliasCheck& read(const std::optional<at::Tensor>& t, const char* name) {
    return t.has_value() ? add(*t, std::string(name), false) : *this;
  }
  AliasCheck& written(at::TensorList ts, const char* name) { return add(ts, name, true); }  // name[i]
  AliasCheck& read(at::TensorList ts, const char* name) { return add(ts, name, false); }
  void check() const;

 private:
  struct Entry {
    at::Tensor t;
    std::string name;
    bool written;
  };
  AliasCheck& add(const at::Tensor& t, std::string name, bool written);
  AliasCheck& add(at::TensorList ts, const char* name, bool written);
  std::vector<Entry> entries_;
};

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
