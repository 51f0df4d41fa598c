// W4A8 ops: schemas, input checks, and the CPU/CUDA bindings of the kernels in w4a8.h, on torch's
// stable ABI (core/binding.h). Fake tensors are registered in python/slab/ops/w4a8.py.
// Inference only: no autograd.
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#include "core/binding.h"
#include "w4a8/w4a8.h"
#include "w4a8/w4a8_math.h"  // the sm90 layout's padded shape

#ifdef SLAB_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace slab::w4a8 {
namespace {

// Columns per scale for `group_size` (-1: one scale per row of k columns); checks it divides k.
int64_t group_columns(int64_t group_size, int64_t k) {
  SLAB_CHECK(group_size == 32 || group_size == 64 || group_size == 128 || group_size == -1,
             "group_size must be 32, 64, 128 or -1 (one scale per row), got ", group_size);
  SLAB_CHECK(k > 0 && k % 2 == 0, "K = ", k,
             " (the last dimension of x) must be even and > 0 (two int4 "
             "values per byte) for any group_size (got group_size ",
             group_size, ")");
  const int64_t g = group_size == -1 ? k : group_size;
  SLAB_CHECK(k % g == 0, "group_size ", group_size, " must divide K = ", k, " (the last dimension of x)");
  return g;
}

DType out_kernel_dtype(ScalarType t, const char* name) {
  SLAB_CHECK(t == ScalarType::Float || t == ScalarType::BFloat16 || t == ScalarType::Half, name,
             " must be float32, bfloat16 or float16, got ", t);
  return t == ScalarType::Float ? DType::kFloat32 : (t == ScalarType::BFloat16 ? DType::kBFloat16 : DType::kFloat16);
}

// The weight layout named `layout`: the vocabulary of slab.ops.w4a8.LAYOUTS.
Layout parse_layout(const std::string& layout) {
  if (layout == "rowmajor") return kRowMajor;
  if (layout == "tiled") return kTiled;
  if (layout == "sm90") return kSm90;
  if (layout == "panel") return kPanel;
  fail("layout must be 'rowmajor', 'tiled', 'sm90' or 'panel', got '", layout, "'");
}

const char* layout_name(Layout layout) {
  switch (layout) {
    case kRowMajor:
      return "rowmajor";
    case kTiled:
      return "tiled";
    case kSm90:
      return "sm90";
    case kPanel:
      return "panel";
  }
  return "unknown";
}

// (rows, bytes per row) of n x k weights packed in `layout` (zero padded).
std::pair<int64_t, int64_t> packed_shape(Layout layout, int64_t n, int64_t k) {
  switch (layout) {
    case kRowMajor:
      return {n, k / 2};
    case kTiled:
      return {round_up(n, kTileRows), round_up(k, kTileCols) / 2};
    case kSm90:
      return {sm90_packed_rows(n), sm90_packed_row_bytes(k)};
    case kPanel:
      return {round_up(n, kPanelRows), round_up(k, kPanelCols) / 2};
  }
  fail("unknown weight layout ", static_cast<int>(layout));
}

#ifdef SLAB_WITH_CUDA
// Columns the CUDA kernels of `layout` read per activation row: whole tiles (64) or blocks (128).
int64_t padded_columns(Layout layout, int64_t k) { return round_up(k, layout == kSm90 ? kSm90BlockCols : kTileCols); }
#endif

// Checks the packed weights and scales against (n from w_scales, k from x); returns n.
int64_t check_weights(const Tensor& w, const Tensor& w_scales, int64_t k, int64_t group, Layout layout,
                      const Tensor& like, const char* like_name) {
  check_same_device(w, like, "w_packed", like_name);
  check_same_device(w_scales, like, "w_scales", like_name);
  SLAB_CHECK(w.scalar_type() == ScalarType::Byte, "w_packed must be uint8 (two int4 values per byte), got ",
             w.scalar_type());
  SLAB_CHECK(w_scales.scalar_type() == ScalarType::Float, "w_scales must be float32, got ", w_scales.scalar_type());
  SLAB_CHECK(w_scales.dim() == 2, "w_scales must have shape (N, K / group_size), got ", w_scales.sizes());
  const int64_t n = w_scales.size(0);
  SLAB_CHECK(w_scales.size(1) == k / group, "w_scales must have shape (N, ", k / group,
             ") = (N, K / group_size) for K = ", k, ", got ", w_scales.sizes());
  SLAB_CHECK(w.dim() == 2, "w_packed must be 2-D, got shape ", w.sizes());
  const auto [rows, row_bytes] = packed_shape(layout, n, k);
  SLAB_CHECK(w.size(0) == rows && w.size(1) == row_bytes, "w_packed must have shape (", rows, ", ", row_bytes,
             ") for layout '", layout_name(layout), "', N = ", n, " (rows of w_scales) and K = ", k, ", got ",
             w.sizes());
  return n;
}

// ---- quantize_fp8 --------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> quantize_fp8_op(const Tensor& x) {
  const DType dtype = kernel_dtype(x, "x");
  SLAB_CHECK(x.dim() >= 1, "x must have at least one dimension (rows are quantized along the last), got a scalar");
  const Tensor xc = as_contiguous(x);
  const int64_t cols = x.size(-1);
  std::vector<int64_t> lead = shape_of(x);
  Tensor q = empty(lead, ScalarType::Float8_e4m3fn, x.device());
  lead.pop_back();
  Tensor scale = empty(lead, ScalarType::Float, x.device());
  const int64_t rows = scale.numel();
  if (rows == 0) return {q, scale};
  if (cols == 0) {  // an empty row is a zero row
    torch::stable::fill_(scale, 1.0);
    return {q, scale};
  }
  QuantFp8Params p{dtype,
                   rows,
                   cols,
                   xc.data_ptr(),
                   static_cast<uint8_t*>(q.mutable_data_ptr()),
                   cols,
                   scale.mutable_data_ptr<float>()};
  launch(x, p, quantize_fp8_cpu, SLAB_CUDA_FN(quantize_fp8_cuda));
  return {q, scale};
}

// ---- weight tiles --------------------------------------------------------------------------------

// Row-major codes (N, K/2) -> the CUDA layout `layout` ("tiled" or "sm90"), zero padded.
Tensor tile_weights_op(const Tensor& packed, const std::string& layout_arg) {
  check_defined(packed, "packed");
  const Layout layout = parse_layout(layout_arg);
  SLAB_CHECK(layout != kRowMajor, "layout must be a tile layout ('tiled' or 'sm90'): 'rowmajor' is packed's own");
  SLAB_CHECK(layout != kPanel,
             "layout must be a tile layout ('tiled' or 'sm90'): the CPU layout 'panel' is built by "
             "slab.quant.prepack_w4(..., layout='panel')");
  SLAB_CHECK(packed.scalar_type() == ScalarType::Byte, "packed must be uint8, got ", packed.scalar_type());
  SLAB_CHECK(packed.dim() == 2 && packed.size(1) > 0, "packed must have shape (N, K / 2), got ", packed.sizes());
  const int64_t n = packed.size(0), k = 2 * packed.size(1);
  const Tensor src = as_contiguous(packed);
  const auto [rows, row_bytes] = packed_shape(layout, n, k);
  Tensor out = empty({rows, row_bytes}, ScalarType::Byte, packed.device());
  if (n == 0) return out;
  const uint8_t* in = src.const_data_ptr<uint8_t>();
  uint8_t* dst = out.mutable_data_ptr<uint8_t>();
  const bool sm90 = layout == kSm90;
  run_on_device(
      packed, [&] { (sm90 ? tile_weights_sm90_cpu : tile_weights_cpu)(in, n, k, dst); },
      [&](CUstream_st* stream) { (sm90 ? tile_weights_sm90_cuda : tile_weights_cuda)(in, n, k, dst, stream); },
      "slab w4a8_tile_weights CUDA kernel");
  return out;
}

// The int4 -> e4m3 byte conversion of the CUDA GEMM (test hook): packed (..., 2 j) uint8 ->
// (..., 4 j) uint8, the e4m3 bits of every nibble, low nibble first.
Tensor int4_to_e4m3_op(const Tensor& packed) {
  check_defined(packed, "packed");
  SLAB_CHECK(packed.scalar_type() == ScalarType::Byte, "packed must be uint8, got ", packed.scalar_type());
  SLAB_CHECK(packed.dim() >= 1 && packed.size(-1) % 2 == 0, "packed must have an even last dimension, got ",
             packed.sizes());
  const Tensor src = aligned_contiguous(packed, 2);  // read as 16-bit words
  std::vector<int64_t> shape = shape_of(packed);
  shape.back() *= 2;
  Tensor out = empty(shape, ScalarType::Byte, packed.device());
  const int64_t words = packed.numel() / 2;
  if (words == 0) return out;
  const auto* in = reinterpret_cast<const uint16_t*>(src.const_data_ptr<uint8_t>());
  auto* dst = reinterpret_cast<uint32_t*>(out.mutable_data_ptr<uint8_t>());
  run_on_device(
      packed, [&] { int4_to_e4m3_cpu(in, words, dst); },
      [&](CUstream_st* stream) { int4_to_e4m3_cuda(in, words, dst, stream); }, "slab w4a8_int4_to_e4m3 CUDA kernel");
  return out;
}

// ---- GEMM ----------------------------------------------------------------------------------------

// The weights in a layout the kernels of this library's device read, and that layout: the CPU
// kernels read "rowmajor" or "panel"; the CUDA kernels read "tiled" (row-major weights are tiled
// here, on every call: prepack once instead) or, on a compute capability 9.0 device, "sm90".
std::pair<Tensor, Layout> kernel_weights(const Tensor& w, Layout layout) {
#ifndef SLAB_WITH_CUDA
  SLAB_CHECK(layout == kRowMajor || layout == kPanel, "w_packed is in the CUDA layout '", layout_name(layout),
             "'; the CPU kernels read the layouts 'rowmajor' and 'panel': prepack the weights for the CPU "
             "(slab.quant.prepack_w4(..., device='cpu'))");
  return {as_contiguous(w), layout};
#else
  SLAB_CHECK(layout != kPanel,
             "w_packed is in the CPU layout 'panel'; prepack the weights for this device "
             "(slab.quant.prepack_w4(..., device='cuda'))");
  if (layout == kRowMajor) return {tile_weights_op(w, "tiled"), kTiled};
  if (layout == kSm90) {
    torch::stable::accelerator::DeviceGuard guard(w.get_device_index());
    SLAB_CHECK(layout_supported_cuda(kSm90),
               "w_packed is in the 'sm90' layout, which needs a compute capability 9.0 GPU (H100/H200) and slab's "
               "sm_90a kernels; prepack for this device with layout='tiled' (slab.quant.prepack_w4)");
  }
  return {aligned_contiguous(w, 16), layout};  // the kernels read each lane's chunk as one 16-byte word
#endif
}

Tensor run_gemm(GemmParams p, const Tensor& like, const Tensor& w, Layout layout, const Tensor& w_scales,
                const Tensor& y) {
  const auto [wk, kernel_layout] = kernel_weights(w, layout);
  const Tensor ws = as_contiguous(w_scales);
  p.w = wk.const_data_ptr<uint8_t>();
  p.w_scales = ws.const_data_ptr<float>();
  p.layout = kernel_layout;
  Tensor workspace;
#ifdef SLAB_WITH_CUDA
  SLAB_CHECK(p.m <= kMaxCudaRows, "the CUDA W4A8 GEMM takes at most ", kMaxCudaRows, " rows of x per call, got ", p.m,
             "; split x along its rows");
  // SLAB_W4A8_ORACLE=1: the first-draft mma.sync kernel for every M, to compare the others with on the device
  const char* oracle = std::getenv("SLAB_W4A8_ORACLE");
  p.oracle = oracle != nullptr && std::string(oracle) == "1";
  SLAB_CHECK(!p.oracle || p.layout == kTiled,
             "SLAB_W4A8_ORACLE=1 runs the first-draft kernel, which reads the 'tiled' layout; w_packed is in "
             "layout 'sm90'");
  GemmPlan plan{};
  {
    // the split plan reads the current device's SM count
    torch::stable::accelerator::DeviceGuard guard(like.get_device_index());
    plan = plan_gemm_cuda(p.m, p.n, p.k, p.layout, p.oracle);
  }
  SLAB_CHECK(plan.cuda_error == 0, "the CUDA W4A8 GEMM could not plan its launch: CUDA error: ",
             cudaGetErrorString(static_cast<cudaError_t>(plan.cuda_error)));
  p.splits = plan.splits, p.tiles_per_split = plan.tiles_per_split;
  if (plan.splits > 1) {
    workspace = empty({checked_mul(plan.splits, checked_mul(p.m, p.n, "m * n"), "split-K workspace")},
                      ScalarType::Float, like.device());
    p.workspace = workspace.mutable_data_ptr<float>();
  }
#endif
  launch(like, p, gemm_cpu, SLAB_CUDA_FN(gemm_cuda));
  return y;
}

// CUDA reads activation rows with 16-byte loads over whole tiles (64 columns; 128 for "sm90"): rows
// padded with zeros to that multiple and 16-byte aligned (as bytes). The CPU reads x as it is.
Tensor kernel_activations(const Tensor& x_fp8, int64_t k, Layout layout) {
#ifndef SLAB_WITH_CUDA
  (void)k, (void)layout;
  return as_contiguous(x_fp8);
#else
  Tensor xb = aten("aten::view", "dtype", as_contiguous(x_fp8), ScalarType::Byte);
  const int64_t kp = padded_columns(layout, k);
  if (kp == k && reinterpret_cast<uintptr_t>(xb.data_ptr()) % 16 == 0) return xb;
  Tensor padded = zeros({xb.size(0), kp}, ScalarType::Byte, xb.device());
  Tensor head = torch::stable::narrow(padded, 1, 0, k);
  torch::stable::copy_(head, xb);
  return padded;
#endif
}

Tensor w4a8_gemm_op(const Tensor& x_fp8, const Tensor& x_scale, const Tensor& w, const Tensor& w_scales,
                    int64_t group_size, const std::string& layout_arg, ScalarType out_dtype) {
  check_defined(x_fp8, "x_fp8");
  SLAB_CHECK(x_fp8.scalar_type() == ScalarType::Float8_e4m3fn, "x_fp8 must be float8_e4m3fn (from quantize_fp8), got ",
             x_fp8.scalar_type());
  SLAB_CHECK(x_fp8.dim() == 2, "x_fp8 must have shape (M, K), got ", x_fp8.sizes());
  const int64_t m = x_fp8.size(0), k = x_fp8.size(1);
  const int64_t group = group_columns(group_size, k);
  const Layout layout = parse_layout(layout_arg);
  const DType odt = out_kernel_dtype(out_dtype, "out_dtype");
  check_same_device(x_scale, x_fp8, "x_scale", "x_fp8");
  SLAB_CHECK(x_scale.scalar_type() == ScalarType::Float, "x_scale must be float32, got ", x_scale.scalar_type());
  SLAB_CHECK(x_scale.numel() == m && (x_scale.dim() == 1 || (x_scale.dim() == 2 && x_scale.size(1) == 1)),
             "x_scale must have shape (", m, ",) or (", m, ", 1) = one scale per row of x_fp8, got ", x_scale.sizes());
  const int64_t n = check_weights(w, w_scales, k, group, layout, x_fp8, "x_fp8");
  Tensor y = empty({m, n}, out_dtype, x_fp8.device());
  if (m == 0 || n == 0) return y;
  const Tensor xb = kernel_activations(x_fp8, k, layout);
  const Tensor xs = as_contiguous(x_scale);  // (M) or (M, 1): the same M floats
  GemmParams p{};
  p.m = m, p.n = n, p.k = k, p.group = group;
  p.x_fp8 = static_cast<const uint8_t*>(xb.data_ptr()), p.x_stride = xb.size(1), p.x_scale = xs.const_data_ptr<float>();
  p.x = nullptr, p.x_dtype = DType::kFloat32;
  p.bias = nullptr, p.y = y.mutable_data_ptr(), p.out_dtype = odt;
  return run_gemm(p, x_fp8, w, layout, w_scales, y);
}

Tensor w4a8_linear_op(const Tensor& x, const Tensor& w, const Tensor& w_scales, int64_t group_size,
                      const std::string& layout_arg, const OptTensor& bias) {
  check_defined(x, "x");
  SLAB_CHECK(x.scalar_type() == ScalarType::Float || x.scalar_type() == ScalarType::BFloat16 ||
                 x.scalar_type() == ScalarType::Half,
             "x must be float32, bfloat16 or float16, got ", x.scalar_type());
  SLAB_CHECK(x.dim() == 2, "x must have shape (M, K), got ", x.sizes());
  const int64_t m = x.size(0), k = x.size(1);
  const int64_t group = group_columns(group_size, k);
  const Layout layout = parse_layout(layout_arg);
  const int64_t n = check_weights(w, w_scales, k, group, layout, x, "x");
  Tensor b;
  if (bias.has_value()) {
    check_same_device(*bias, x, "bias");
    SLAB_CHECK(bias->dim() == 1 && bias->size(0) == n, "bias must have shape (", n, ",) = (N,), got ", bias->sizes());
    SLAB_CHECK(is_floating_point(bias->scalar_type()), "bias must be a floating-point tensor, got ",
               bias->scalar_type());
    b = as_contiguous(to_dtype(*bias, ScalarType::Float));
  }
  Tensor y = empty({m, n}, x.scalar_type(), x.device());
  if (m == 0 || n == 0) return y;
  GemmParams p{};
  p.m = m, p.n = n, p.k = k, p.group = group;
  p.bias = b.defined() ? b.const_data_ptr<float>() : nullptr;
  p.y = y.mutable_data_ptr(), p.out_dtype = kernel_dtype(x, "x");
  const Tensor xc = as_contiguous(x);
  Tensor q, qs;
#ifndef SLAB_WITH_CUDA
  // Quantized inside the GEMM prologue, straight into the fp32 values the kernel multiplies.
  p.x = xc.data_ptr(), p.x_dtype = kernel_dtype(x, "x");
#else
  // CUDA: one small quantize pass (M x K bytes; the weights dominate the traffic) into rows
  // padded to whole tiles (kernel_activations), then the GEMM.
  q = zeros({m, padded_columns(layout, k)}, ScalarType::Byte, x.device());
  qs = empty({m}, ScalarType::Float, x.device());
  QuantFp8Params qp{kernel_dtype(x, "x"),        m, k, xc.data_ptr(), q.mutable_data_ptr<uint8_t>(), q.size(1),
                    qs.mutable_data_ptr<float>()};
  launch(x, qp, quantize_fp8_cpu, SLAB_CUDA_FN(quantize_fp8_cuda));
  p.x_fp8 = q.const_data_ptr<uint8_t>(), p.x_stride = q.size(1), p.x_scale = qs.const_data_ptr<float>();
#endif
  return run_gemm(p, x, w, layout, w_scales, y);
}

}  // namespace
}  // namespace slab::w4a8

#ifndef SLAB_WITH_CUDA
STABLE_TORCH_LIBRARY_FRAGMENT(slab, m) {
  m.def("quantize_fp8(Tensor x) -> (Tensor, Tensor)");
  m.def("w4a8_tile_weights(Tensor packed, str layout=\"tiled\") -> Tensor");
  m.def("w4a8_int4_to_e4m3(Tensor packed) -> Tensor");
  m.def(
      "w4a8_gemm(Tensor x_fp8, Tensor x_scale, Tensor w_packed, Tensor w_scales, int group_size, str layout, "
      "ScalarType out_dtype) -> Tensor");
  m.def("w4a8_linear(Tensor x, Tensor w_packed, Tensor w_scales, int group_size, str layout, Tensor? bias) -> Tensor");
}
#endif

STABLE_TORCH_LIBRARY_IMPL(slab, SLAB_KERNEL_KEY, m) {
  m.impl("quantize_fp8", TORCH_BOX(&slab::w4a8::quantize_fp8_op));
  m.impl("w4a8_tile_weights", TORCH_BOX(&slab::w4a8::tile_weights_op));
  m.impl("w4a8_int4_to_e4m3", TORCH_BOX(&slab::w4a8::int4_to_e4m3_op));
  m.impl("w4a8_gemm", TORCH_BOX(&slab::w4a8::w4a8_gemm_op));
  m.impl("w4a8_linear", TORCH_BOX(&slab::w4a8::w4a8_linear_op));
}
