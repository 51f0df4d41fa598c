// W4A8 ops: schemas, input checks, and the CPU/CUDA bindings of the kernels in w4a8.h.
// Fake tensors are registered in python/slab/ops/w4a8.py. Inference only: no autograd.
#include <ATen/ATen.h>

#include <tuple>

#include "core/binding.h"
#include "w4a8/w4a8.h"

namespace slab::w4a8 {
namespace {

using at::Tensor;

// Columns per scale for `group_size` (-1: one scale per row of k columns); checks it divides k.
int64_t group_columns(int64_t group_size, int64_t k) {
  TORCH_CHECK_VALUE(group_size == 32 || group_size == 64 || group_size == 128 || group_size == -1,
                    "group_size must be 32, 64, 128 or -1 (one scale per row), got ", group_size);
  TORCH_CHECK_VALUE(k > 0 && k % 2 == 0, "K = ", k, " (the last dimension of x) must be even and > 0 (two int4 "
                    "values per byte) for any group_size (got group_size ", group_size, ")");
  const int64_t g = group_size == -1 ? k : group_size;
  TORCH_CHECK_VALUE(k % g == 0, "group_size ", group_size, " must divide K = ", k, " (the last dimension of x)");
  return g;
}

DType out_kernel_dtype(at::ScalarType t, const char* name) {
  TORCH_CHECK_VALUE(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, name,
                    " must be float32, bfloat16 or float16, got ", t);
  return t == at::kFloat ? DType::kFloat32 : (t == at::kBFloat16 ? DType::kBFloat16 : DType::kFloat16);
}

// Checks the packed weights and scales against (n from w_scales, k from x); returns n.
int64_t check_weights(const Tensor& w, const Tensor& w_scales, int64_t k, int64_t group, int64_t layout,
                      const Tensor& like, const char* like_name) {
  check_same_device(w, like, "w_packed", like_name);
  check_same_device(w_scales, like, "w_scales", like_name);
  TORCH_CHECK(w.scalar_type() == at::kByte, "w_packed must be uint8 (two int4 values per byte), got ", w.scalar_type());
  TORCH_CHECK(w_scales.scalar_type() == at::kFloat, "w_scales must be float32, got ", w_scales.scalar_type());
  TORCH_CHECK(w_scales.dim() == 2, "w_scales must have shape (N, K / group_size), got ", w_scales.sizes());
  const int64_t n = w_scales.size(0);
  TORCH_CHECK(w_scales.size(1) == k / group, "w_scales must have shape (N, ", k / group, ") = (N, K / group_size) for K = ",
              k, ", got ", w_scales.sizes());
  TORCH_CHECK(w.dim() == 2, "w_packed must be 2-D, got shape ", w.sizes());
  if (layout == kRowMajor) {
    TORCH_CHECK(w.size(0) == n && w.size(1) == k / 2, "w_packed must have shape (", n, ", ", k / 2,
                ") = (N of w_scales, K / 2), got ", w.sizes());
  } else {
    TORCH_CHECK_VALUE(layout == kTiled, "layout must be 0 (row-major) or 1 (CUDA tiles), got ", layout);
    TORCH_CHECK(w.size(0) == round_up(n, kTileRows) && w.size(1) == round_up(k, kTileCols) / 2,
                "w_packed in the CUDA tile layout must have shape (", round_up(n, kTileRows), ", ",
                round_up(k, kTileCols) / 2, ") for N = ", n, ", K = ", k, ", got ", w.sizes());
  }
  return n;
}

// ---- quantize_fp8 --------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> quantize_fp8_op(const Tensor& x) {
  const DType dtype = kernel_dtype(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x must have at least one dimension (rows are quantized along the last), got a scalar");
  const Tensor xc = x.contiguous();
  const int64_t cols = x.size(-1);
  Tensor q = at::empty(x.sizes(), x.options().dtype(at::kFloat8_e4m3fn));
  auto lead = x.sizes().vec();
  lead.pop_back();
  Tensor scale = at::empty(lead, x.options().dtype(at::kFloat));
  const int64_t rows = scale.numel();
  if (rows == 0) return {q, scale};
  if (cols == 0) {  // an empty row is a zero row
    scale.fill_(1.0);
    return {q, scale};
  }
  QuantFp8Params p{dtype, rows, cols, xc.data_ptr(), static_cast<uint8_t*>(q.data_ptr()), cols,
                   scale.data_ptr<float>()};
  launch(x, p, quantize_fp8_cpu, SLAB_CUDA_FN(quantize_fp8_cuda));
  return {q, scale};
}

// ---- weight tiles --------------------------------------------------------------------------------

Tensor tile_weights_op(const Tensor& packed) {
  check_defined(packed, "packed");
  TORCH_CHECK(packed.scalar_type() == at::kByte, "packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK(packed.dim() == 2 && packed.size(1) > 0, "packed must have shape (N, K / 2), got ", packed.sizes());
  const int64_t n = packed.size(0), k = 2 * packed.size(1);
  const Tensor src = packed.contiguous();
  Tensor out = at::empty({round_up(n, kTileRows), round_up(k, kTileCols) / 2}, packed.options());
  if (n == 0) return out;
  if (packed.is_cpu()) {
    tile_weights_cpu(src.data_ptr<uint8_t>(), n, k, out.data_ptr<uint8_t>());
  } else {
#ifdef SLAB_WITH_CUDA
    c10::DeviceGuard guard(packed.device());
    tile_weights_cuda(src.data_ptr<uint8_t>(), n, k, out.data_ptr<uint8_t>(),
                      c10::cuda::getCurrentCUDAStream(packed.device().index()).stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
    TORCH_CHECK(false, "slab: no kernel for device ", packed.device(), " (this build has CPU kernels only)");
#endif
  }
  return out;
}

// The int4 -> e4m3 byte conversion of the CUDA GEMM (test hook): packed (..., 2 j) uint8 ->
// (..., 4 j) uint8, the e4m3 bits of every nibble, low nibble first.
Tensor int4_to_e4m3_op(const Tensor& packed) {
  check_defined(packed, "packed");
  TORCH_CHECK(packed.scalar_type() == at::kByte, "packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK(packed.dim() >= 1 && packed.size(-1) % 2 == 0, "packed must have an even last dimension, got ",
              packed.sizes());
  const Tensor src = aligned_contiguous(packed, 2);  // read as 16-bit words
  auto shape = packed.sizes().vec();
  shape.back() *= 2;
  Tensor out = at::empty(shape, packed.options());
  const int64_t words = packed.numel() / 2;
  if (words == 0) return out;
  const auto* in = reinterpret_cast<const uint16_t*>(src.data_ptr<uint8_t>());
  auto* dst = reinterpret_cast<uint32_t*>(out.data_ptr<uint8_t>());
  if (packed.is_cpu()) {
    int4_to_e4m3_cpu(in, words, dst);
  } else {
#ifdef SLAB_WITH_CUDA
    c10::DeviceGuard guard(packed.device());
    int4_to_e4m3_cuda(in, words, dst, c10::cuda::getCurrentCUDAStream(packed.device().index()).stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
    TORCH_CHECK(false, "slab: no kernel for device ", packed.device(), " (this build has CPU kernels only)");
#endif
  }
  return out;
}

// ---- GEMM ----------------------------------------------------------------------------------------

// The weights in the layout the kernel of `like`'s device reads: CPU kernels read row-major; CUDA
// kernels read tiles (row-major weights are tiled here, on every call: prepack once instead).
Tensor kernel_weights(const Tensor& w, int64_t layout, const Tensor& like) {
  if (like.is_cpu()) {
    TORCH_CHECK(layout == kRowMajor, "w_packed is in the CUDA tile layout (layout=1); the CPU kernels read the "
                "row-major layout: prepack the weights for the CPU (slab.quant.prepack_w4(..., device='cpu'))");
    return w.contiguous();
  }
  // The CUDA GEMM reads each lane's tile chunk as one 16-byte word.
  return layout == kTiled ? aligned_contiguous(w, 16) : tile_weights_op(w);
}

Tensor run_gemm(GemmParams p, const Tensor& like, const Tensor& w, const Tensor& w_scales, Tensor& y) {
  const Tensor wk = kernel_weights(w, p.layout, like);
  const Tensor ws = w_scales.contiguous();
  p.layout = like.is_cpu() ? kRowMajor : kTiled;
  p.w = wk.data_ptr<uint8_t>();
  p.w_scales = ws.data_ptr<float>();
  Tensor workspace;
#ifdef SLAB_WITH_CUDA
  if (like.is_cuda()) {
    TORCH_CHECK_VALUE(p.m <= kMaxCudaRows, "the CUDA W4A8 GEMM takes at most ", kMaxCudaRows,
                      " rows of x per call, got ", p.m, "; split x along its rows");
    c10::DeviceGuard guard(like.device());  // the split plan reads the current device's SM count
    const GemmPlan plan = plan_gemm_cuda(p.m, p.n, p.k);
    C10_CUDA_CHECK(static_cast<cudaError_t>(plan.cuda_error));
    p.splits = plan.splits, p.tiles_per_split = plan.tiles_per_split;
    if (plan.splits > 1) {
      workspace = at::empty({checked_mul(plan.splits, checked_mul(p.m, p.n, "m * n"), "split-K workspace")},
                            like.options().dtype(at::kFloat));
      p.workspace = workspace.data_ptr<float>();
    }
  }
#endif
  launch(like, p, gemm_cpu, SLAB_CUDA_FN(gemm_cuda));
  return y;
}

// CUDA reads activation rows with 16-byte loads over whole 64-column tiles: rows padded with
// zeros to a multiple of 64 columns and 16-byte aligned. The CPU reads x as it is.
Tensor kernel_activations(const Tensor& x_fp8, int64_t k) {
  Tensor xb = x_fp8.contiguous().view(at::kByte);
  if (x_fp8.is_cpu()) return xb;
  const int64_t kp = round_up(k, kTileCols);
  if (kp == k && reinterpret_cast<uintptr_t>(xb.data_ptr()) % 16 == 0) return xb;
  Tensor padded = at::zeros({xb.size(0), kp}, xb.options());
  padded.narrow(1, 0, k).copy_(xb);
  return padded;
}

Tensor w4a8_gemm_op(const Tensor& x_fp8, const Tensor& x_scale, const Tensor& w, const Tensor& w_scales,
                    int64_t group_size, int64_t layout, at::ScalarType out_dtype) {
  check_defined(x_fp8, "x_fp8");
  TORCH_CHECK(x_fp8.scalar_type() == at::kFloat8_e4m3fn, "x_fp8 must be float8_e4m3fn (from quantize_fp8), got ",
              x_fp8.scalar_type());
  TORCH_CHECK(x_fp8.dim() == 2, "x_fp8 must have shape (M, K), got ", x_fp8.sizes());
  const int64_t m = x_fp8.size(0), k = x_fp8.size(1);
  const int64_t group = group_columns(group_size, k);
  const DType odt = out_kernel_dtype(out_dtype, "out_dtype");
  check_same_device(x_scale, x_fp8, "x_scale", "x_fp8");
  TORCH_CHECK(x_scale.scalar_type() == at::kFloat, "x_scale must be float32, got ", x_scale.scalar_type());
  TORCH_CHECK(x_scale.numel() == m && (x_scale.dim() == 1 || (x_scale.dim() == 2 && x_scale.size(1) == 1)),
              "x_scale must have shape (", m, ",) or (", m, ", 1) = one scale per row of x_fp8, got ", x_scale.sizes());
  const int64_t n = check_weights(w, w_scales, k, group, layout, x_fp8, "x_fp8");
  Tensor y = at::empty({m, n}, x_fp8.options().dtype(out_dtype));
  if (m == 0 || n == 0) return y;
  const Tensor xb = kernel_activations(x_fp8, k);
  const Tensor xs = x_scale.reshape({m}).contiguous();
  GemmParams p{};
  p.m = m, p.n = n, p.k = k, p.group = group, p.layout = static_cast<int>(layout);
  p.x_fp8 = xb.data_ptr<uint8_t>(), p.x_stride = xb.size(1), p.x_scale = xs.data_ptr<float>();
  p.x = nullptr, p.x_dtype = DType::kFloat32;
  p.bias = nullptr, p.y = y.data_ptr(), p.out_dtype = odt;
  return run_gemm(p, x_fp8, w, w_scales, y);
}

Tensor w4a8_linear_op(const Tensor& x, const Tensor& w, const Tensor& w_scales, int64_t group_size, int64_t layout,
                      const std::optional<Tensor>& bias) {
  check_defined(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, "x must have shape (M, K), got ", x.sizes());
  const int64_t m = x.size(0), k = x.size(1);
  const int64_t group = group_columns(group_size, k);
  const int64_t n = check_weights(w, w_scales, k, group, layout, x, "x");
  Tensor b;
  if (bias.has_value()) {
    check_same_device(*bias, x, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "bias must have shape (", n, ",) = (N,), got ", bias->sizes());
    TORCH_CHECK(at::isFloatingType(bias->scalar_type()), "bias must be a floating-point tensor, got ", bias->scalar_type());
    b = bias->to(at::kFloat).contiguous();
  }
  Tensor y = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y;
  GemmParams p{};
  p.m = m, p.n = n, p.k = k, p.group = group, p.layout = static_cast<int>(layout);
  p.bias = b.defined() ? b.data_ptr<float>() : nullptr;
  p.y = y.data_ptr(), p.out_dtype = kernel_dtype(x, "x");
  const Tensor xc = x.contiguous();
  Tensor q, qs;
  if (x.is_cpu()) {
    // Quantized inside the GEMM prologue, straight into the fp32 values the kernel multiplies.
    p.x = xc.data_ptr(), p.x_dtype = kernel_dtype(x, "x");
  } else {
    // CUDA: one small quantize pass (M x K bytes; the weights dominate the traffic) into rows
    // padded to whole 64-column tiles, then the GEMM.
    q = at::zeros({m, round_up(k, kTileCols)}, x.options().dtype(at::kByte));
    qs = at::empty({m}, x.options().dtype(at::kFloat));
    QuantFp8Params qp{kernel_dtype(x, "x"), m, k, xc.data_ptr(), q.data_ptr<uint8_t>(), q.size(1), qs.data_ptr<float>()};
    launch(x, qp, quantize_fp8_cpu, SLAB_CUDA_FN(quantize_fp8_cuda));
    p.x_fp8 = q.data_ptr<uint8_t>(), p.x_stride = q.size(1), p.x_scale = qs.data_ptr<float>();
  }
  return run_gemm(p, x, w, w_scales, y);
}

}  // namespace
}  // namespace slab::w4a8

TORCH_LIBRARY_FRAGMENT(slab, m) {
  m.def("quantize_fp8(Tensor x) -> (Tensor, Tensor)");
  m.def("w4a8_tile_weights(Tensor packed) -> Tensor");
  m.def("w4a8_int4_to_e4m3(Tensor packed) -> Tensor");
  m.def("w4a8_gemm(Tensor x_fp8, Tensor x_scale, Tensor w_packed, Tensor w_scales, int group_size, int layout, "
        "ScalarType out_dtype) -> Tensor");
  m.def("w4a8_linear(Tensor x, Tensor w_packed, Tensor w_scales, int group_size, int layout, Tensor? bias) -> Tensor");
}

#define SLAB_W4A8_KERNELS(m)                                         \
  m.impl("quantize_fp8", &slab::w4a8::quantize_fp8_op);              \
  m.impl("w4a8_tile_weights", &slab::w4a8::tile_weights_op);         \
  m.impl("w4a8_int4_to_e4m3", &slab::w4a8::int4_to_e4m3_op);         \
  m.impl("w4a8_gemm", &slab::w4a8::w4a8_gemm_op);                    \
  m.impl("w4a8_linear", &slab::w4a8::w4a8_linear_op)

TORCH_LIBRARY_IMPL(slab, CPU, m) { SLAB_W4A8_KERNELS(m); }

#ifdef SLAB_WITH_CUDA
TORCH_LIBRARY_IMPL(slab, CUDA, m) { SLAB_W4A8_KERNELS(m); }
#else
TORCH_LIBRARY_IMPL(slab, CUDA, m) {
  slab::register_cuda_unavailable(m, {"quantize_fp8", "w4a8_tile_weights", "w4a8_int4_to_e4m3", "w4a8_gemm", "w4a8_linear"});
}
#endif
