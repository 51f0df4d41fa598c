// The binding layer on torch's stable ABI (torch/csrc/stable, targeting torch 2.11): what every
// family's <family>_ops.cpp uses to check arguments, allocate, call ATen ops and launch kernels,
// without one unstable libtorch symbol, so that one library serves every torch from 2.11 on.
//
// Each *_ops.cpp is compiled twice: into libslab_ops.so (schemas and CPU kernels) and, with
// SLAB_WITH_CUDA defined, into libslab_cuda.so (CUDA kernels only), which Python loads only when
// torch has CUDA. SLAB_KERNEL_KEY is the dispatch key the library registers its kernels under.
//
// Errors are std::runtime_error (a RuntimeError in Python: the stable ABI carries no other type)
// with a message that names the argument.
#pragma once
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "core/common.h"

#ifdef SLAB_WITH_CUDA
#define SLAB_KERNEL_KEY CUDA
#define SLAB_CUDA_FN(fn) fn
#else
#define SLAB_KERNEL_KEY CPU
#define SLAB_CUDA_FN(fn) nullptr
#endif

struct CUstream_st;

namespace slab {

using Tensor = torch::stable::Tensor;
using OptTensor = std::optional<Tensor>;
using ScalarType = torch::headeronly::ScalarType;
using IntArrayRef = torch::headeronly::IntHeaderOnlyArrayRef;
using torch::stable::Device;

// ---- messages -------------------------------------------------------------------------------

inline std::ostream& operator<<(std::ostream& os, IntArrayRef shape) {
  os << "[";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  return os << "]";
}

inline std::ostream& operator<<(std::ostream& os, const Device& d) {
  switch (d.type()) {
    case torch::headeronly::DeviceType::CPU:
      os << "cpu";
      break;
    case torch::headeronly::DeviceType::CUDA:
      os << "cuda";
      break;
    case torch::headeronly::DeviceType::Meta:
      os << "meta";
      break;
    default:
      os << "device type " << static_cast<int>(d.type());
      break;
  }
  if (d.type() != torch::headeronly::DeviceType::CPU && d.has_index()) os << ":" << static_cast<int>(d.index());
  return os;
}

template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  std::ostringstream s;
  (s << ... << args);
  throw std::runtime_error(s.str());
}

}  // namespace slab

// SLAB_CHECK(cond, "x must be ...", value, ...): a RuntimeError with the message when cond is false.
#define SLAB_CHECK(COND, ...)               \
  do {                                      \
    if (!(COND)) ::slab::fail(__VA_ARGS__); \
  } while (0)

namespace slab {

// ---- ATen ops through the dispatcher ------------------------------------------------------------

// The outputs of `op.overload` called with `args` (Tensor, optional, int64_t, double, bool,
// ScalarType, int lists, ...): the first (R) or the first two (aten2).
template <typename... Args>
std::array<StableIValue, std::max<size_t>(sizeof...(Args), 2)> call_op(const char* op, const char* overload,
                                                                       const Args&... args) {
  std::array<StableIValue, std::max<size_t>(sizeof...(Args), 2)> stack{torch::stable::detail::from(args)...};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(op, overload, stack.data(), TORCH_ABI_VERSION));
  return stack;
}

template <typename R = Tensor, typename... Args>
R aten(const char* op, const char* overload, const Args&... args) {
  auto stack = call_op(op, overload, args...);
  if constexpr (!std::is_void_v<R>) return torch::stable::detail::to<R>(stack[0]);
}

template <typename... Args>
std::pair<Tensor, Tensor> aten2(const char* op, const char* overload, const Args&... args) {
  auto stack = call_op(op, overload, args...);
  return {torch::stable::detail::to<Tensor>(stack[0]), torch::stable::detail::to<Tensor>(stack[1])};
}

// `t` itself when it is contiguous: torch::stable::contiguous is a dispatcher round trip (a few
// microseconds, more than a small op's kernel) even when it has nothing to do.
inline Tensor as_contiguous(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }
inline Tensor to_dtype(const Tensor& t, ScalarType dt) { return t.scalar_type() == dt ? t : torch::stable::to(t, dt); }
// A contiguous uninitialized tensor through the shim's aoti_torch_empty_strided, not
// torch::stable::empty: that one looks aten::empty up in the dispatcher on every call (a lock, a
// hash of the name, the boxed call), 1-2 us warm and 4-5 us from cold caches, as much as a GEMV
// step's whole kernel on small shapes. CPU tensors take device index 0, as AOTInductor passes it.
inline Tensor empty(std::vector<int64_t> shape, ScalarType dt, const Device& device) {
  std::vector<int64_t> strides(shape.size());
  int64_t stride = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    strides[i] = stride;
    SLAB_CHECK(!__builtin_mul_overflow(stride, std::max<int64_t>(shape[i], 1), &stride),
               "a tensor's element count overflows int64");
  }
  AtenTensorHandle handle = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(
      aoti_torch_empty_strided(static_cast<int64_t>(shape.size()), shape.data(), strides.data(),
                               torch::stable::detail::to<int32_t>(torch::stable::detail::from(dt)),
                               torch::stable::detail::to<int32_t>(torch::stable::detail::from(device.type())),
                               device.is_cpu() ? 0 : device.index(), &handle));
  return Tensor(handle);
}
inline Tensor zeros(std::vector<int64_t> shape, ScalarType dt, const Device& device) {
  return torch::stable::fill_(empty(std::move(shape), dt, device), 0.0);
}
inline std::vector<int64_t> shape_of(const Tensor& t) { return {t.sizes().begin(), t.sizes().end()}; }
inline bool same_shape(const Tensor& a, IntArrayRef shape) { return a.sizes().equals(shape); }

// ---- argument checks ---------------------------------------------------------------------------

// The name of element i of a tensor-list argument in messages: "grads[3]".
inline std::string item(const char* name, size_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

// A tensor argument the schema requires: None reaches the kernel as an undefined tensor.
inline void check_defined(const Tensor& t, const char* name) {
  SLAB_CHECK(t.defined(), name, " must be a tensor, got None");
}

inline DType kernel_dtype(const Tensor& t, const char* name) {
  check_defined(t, name);
  switch (t.scalar_type()) {
    case ScalarType::Float:
      return DType::kFloat32;
    case ScalarType::Half:
      return DType::kFloat16;
    case ScalarType::BFloat16:
      return DType::kBFloat16;
    case ScalarType::Double:
      return DType::kFloat64;
    default:
      fail(name, " must be float32, bfloat16 or float16 (float64 for gradcheck), got ", t.scalar_type());
  }
}

// A real floating-point dtype, as c10::isFloatingType: float64/32/16, bfloat16, float8, float4.
inline bool is_floating_point(ScalarType t) {
  switch (t) {
    case ScalarType::Double:
    case ScalarType::Float:
    case ScalarType::Half:
    case ScalarType::BFloat16:
    case ScalarType::Float8_e5m2:
    case ScalarType::Float8_e5m2fnuz:
    case ScalarType::Float8_e4m3fn:
    case ScalarType::Float8_e4m3fnuz:
    case ScalarType::Float8_e8m0fnu:
    case ScalarType::Float4_e2m1fn_x2:
      return true;
    default:
      return false;
  }
}

// Accumulation dtype of statistics and states for inputs of dtype `t`.
inline ScalarType acc_dtype(ScalarType t) { return t == ScalarType::Double ? ScalarType::Double : ScalarType::Float; }

// A scalar hyperparameter: finite, and >= 0 unless `non_negative` is false.
inline void check_finite(double v, const char* name, bool non_negative = true) {
  SLAB_CHECK(std::isfinite(v) && (!non_negative || v >= 0), name, " must be finite", non_negative ? " and >= 0" : "",
             ", got ", v);
}

// A fraction (momentum, interpolation weight): finite and in [0, 1].
inline void check_unit_interval(double v, const char* name) {
  SLAB_CHECK(std::isfinite(v) && v >= 0 && v <= 1, name, " must be in [0, 1], got ", v);
}

inline void check_same_device(const Tensor& t, const Tensor& ref, const char* name, const char* ref_name = "x") {
  check_defined(t, name);
  SLAB_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device(),
             "; all tensors must be on one device");
}

// a * b for sizes that feed an allocation or a loop bound (int64 products of user integers can
// wrap and then pass a shape check).
inline int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t out = 0;
  SLAB_CHECK(!__builtin_mul_overflow(a, b, &out), what, " overflows int64: ", a, " * ", b);
  return out;
}

// A per-channel vector (weights, statistics): 1-D of `channels` elements, dtype that of x or the
// accumulation dtype (as torch's own norms accept), same device. Returns a contiguous tensor in
// the accumulation dtype; no copy when it already is one.
inline Tensor channel_vector(const Tensor& t, const Tensor& x, int64_t channels, const char* name) {
  check_same_device(t, x, name);
  SLAB_CHECK(t.dim() == 1 && t.size(0) == channels, name, " must have shape (", channels,
             ",) to match the last dimension of x, got ", t.sizes());
  const ScalarType acc = acc_dtype(x.scalar_type());
  if (x.scalar_type() == acc) {
    SLAB_CHECK(t.scalar_type() == acc, name, " must be ", acc, " to match x, got ", t.scalar_type());
  } else {
    SLAB_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == acc, name, " must be ", x.scalar_type(), " or ",
               acc, " to match x, got ", t.scalar_type());
  }
  return as_contiguous(to_dtype(t, acc));
}

inline OptTensor channel_vector(const OptTensor& t, const Tensor& x, int64_t channels, const char* name) {
  if (!t.has_value()) return std::nullopt;
  return channel_vector(*t, x, channels, name);
}

inline const void* data_or_null(const OptTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }
inline void* data_or_null(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// `t` contiguous with its data aligned to `bytes`, for kernels that read it in words of that size:
// a view with a misaligned storage offset is copied into a fresh (aligned) allocation.
inline Tensor aligned_contiguous(const Tensor& t, int64_t bytes) {
  Tensor c = as_contiguous(t);
  if (c.numel() > 0 && reinterpret_cast<uintptr_t>(c.data_ptr()) % bytes != 0) c = torch::stable::clone(c);
  return c;
}

// In-place ops: every written tensor must own its elements (no stride-0 / expanded view) and share
// no memory with any other argument, as torch's own in-place and out= ops require. Checked before
// anything is written, e.g.
//   AliasCheck().written(state, "state").read(q, "q").read(k, "k").check();
// Two tensors count as overlapping when the byte ranges their elements span intersect: exact for
// contiguous tensors, conservative for interleaved views (x[0::2] and x[1::2] are refused too).
class AliasCheck {
 public:
  AliasCheck& written(const Tensor& t, const char* name) { return add(t, name, true); }
  AliasCheck& read(const Tensor& t, const char* name) { return add(t, name, false); }
  AliasCheck& read(const OptTensor& t, const char* name) { return t.has_value() ? add(*t, name, false) : *this; }
  AliasCheck& written(const std::vector<Tensor>& ts, const char* name) { return add_list(ts, name, true); }
  AliasCheck& read(const std::vector<Tensor>& ts, const char* name) { return add_list(ts, name, false); }
  void check() const;

 private:
  struct Entry {
    uintptr_t lo, hi;  // bytes [lo, hi) the elements span
    std::string name;
    bool written;
  };
  AliasCheck& add(const Tensor& t, std::string name, bool written);
  AliasCheck& add_list(const std::vector<Tensor>& ts, const char* name, bool written);
  std::vector<Entry> entries_;
};

// ---- launching kernels -------------------------------------------------------------------------

#ifdef SLAB_WITH_CUDA
// The current CUDA stream of `device` (torch's, so kernels order with torch's own work).
CUstream_st* current_stream(const Tensor& like);
// A RuntimeError naming the launch when the last kernel launch failed.
void check_launch(const char* what);
#endif

// Runs `cpu()` in the CPU library, or `cuda(stream)` in the CUDA library: under a guard of
// `like`'s device, on its current stream, then checks the launch (`what` names it).
template <typename Cpu, typename Cuda>
void run_on_device(const Tensor& like, Cpu&& cpu, Cuda&& cuda, const char* what = "slab CUDA kernel") {
#ifdef SLAB_WITH_CUDA
  (void)cpu;
  torch::stable::accelerator::DeviceGuard guard(like.get_device_index());
  cuda(current_stream(like));
  check_launch(what);
#else
  (void)like, (void)cuda, (void)what;
  cpu();
#endif
}

// Runs the kernel of this library's device on `like`'s device, on the current stream.
template <typename Params>
void launch(const Tensor& like, const Params& p, void (*cpu)(const Params&),
            std::type_identity_t<void (*)(const Params&, CUstream_st*)> cuda) {
  run_on_device(like, [&] { cpu(p); }, [&](CUstream_st* stream) { cuda(p, stream); });
}

}  // namespace slab
