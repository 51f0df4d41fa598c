// SLA depthwise-convolution branch: schemas, input checks and the CPU/CUDA bindings of the
// kernels in dwc.h, on torch's stable ABI (core/binding.h). Fake tensors and autograd are
// registered in python/slab/ops/dwc.py.
//
// The output of sla_dwc has shape (B, H, N, C) but the memory order (B, N, H, C): the module
// that calls it next merges the heads back into (B, N, H * C) for its output projection, which
// is then a free view instead of a copy.
#include <tuple>
#include <vector>

#include "core/binding.h"
#include "sla/dwc.h"

namespace slab::sla {
namespace {

RowStrides token_strides(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// Channels must be contiguous; other dimensions may be strided.
Tensor channels_contiguous(const Tensor& t) { return t.stride(3) == 1 || t.size(3) == 1 ? t : as_contiguous(t); }

struct Kernel {
  int64_t h, w;
};

// A depthwise Conv2d weight (C, 1, kh, kw) or Conv1d weight (C, 1, k) (kernel k x 1).
Kernel check_weight(const Tensor& weight, const Tensor& v) {
  check_same_device(weight, v, "weight", "v");
  const int64_t C = v.size(3);
  SLAB_CHECK((weight.dim() == 4 || weight.dim() == 3) && weight.size(0) == C && weight.size(1) == 1,
             "weight must be a depthwise convolution weight of shape (", C, ", 1, kh, kw) or (", C, ", 1, k) for the ",
             C, " channels of v, got ", weight.sizes());
  SLAB_CHECK(is_floating_point(weight.scalar_type()), "weight must be floating point, got ", weight.scalar_type());
  const Kernel k{weight.size(2), weight.dim() == 4 ? weight.size(3) : 1};
  SLAB_CHECK(k.h >= 1 && k.w >= 1, "weight must have a non-empty kernel, got ", weight.sizes());
  return k;
}

// Weights as the kernels read them: [taps, C] in the accumulation type, optionally flipped.
Tensor tap_major(const Tensor& weight, ScalarType acc, bool flip) {
  Tensor w = to_dtype(torch::stable::reshape(weight, std::vector<int64_t>{weight.size(0), -1}), acc);
  if (flip) w = aten("aten::flip", "", w, std::vector<int64_t>{1});
  return as_contiguous(torch::stable::transpose(w, 0, 1));
}

DwcGeometry geometry(const Tensor& v, Kernel k, int64_t grid_h, int64_t grid_w, int64_t pad_top, int64_t pad_left) {
  SLAB_CHECK(v.dim() == 4, "v must have shape (batch, heads, tokens, channels), got ", v.sizes());
  SLAB_CHECK(grid_h >= 1 && grid_w >= 1 && checked_mul(grid_h, grid_w, "grid_h * grid_w") == v.size(2), "grid (",
             grid_h, ", ", grid_w, ") must hold the ", v.size(2), " tokens of v");
  SLAB_CHECK(pad_top >= 0 && pad_top < k.h && pad_left >= 0 && pad_left < k.w, "padding (", pad_top, ", ", pad_left,
             ") must lie inside the kernel (", k.h, ", ", k.w, ")");
  return {v.size(0), v.size(1), v.size(3), grid_h, grid_w, k.h, k.w, pad_top, pad_left};
}

Tensor heads_interleaved_like(const Tensor& v) {
  return torch::stable::permute(empty({v.size(0), v.size(2), v.size(1), v.size(3)}, v.scalar_type(), v.device()),
                                std::vector<int64_t>{0, 2, 1, 3});
}

Tensor run_dwc(const Tensor& v, const Tensor& taps, const OptTensor& bias, const OptTensor& residual,
               const DwcGeometry& g) {
  Tensor out = heads_interleaved_like(v);
  if (out.numel() == 0) return out;
  DwcParams p{kernel_dtype(v, "v"),   g,
              v.data_ptr(),           token_strides(v),
              data_or_null(residual), residual ? token_strides(*residual) : RowStrides{0, 0, 0},
              out.data_ptr(),         token_strides(out),
              taps.data_ptr(),        data_or_null(bias)};
  launch(v, p, dwc_cpu, SLAB_CUDA_FN(dwc_cuda));
  return out;
}

// The optional residual, checked against v (same shape, dtype and device) and laid out by
// `layout` (channels_contiguous for the token kernels, contiguous for the decode step).
OptTensor checked_residual(const OptTensor& residual, const Tensor& v, Tensor (*layout)(const Tensor&)) {
  if (!residual) return std::nullopt;
  check_same_device(*residual, v, "residual", "v");
  SLAB_CHECK(residual->sizes().equals(v.sizes()) && residual->scalar_type() == v.scalar_type(),
             "residual must have the shape ", v.sizes(), " and dtype ", v.scalar_type(), " of v, got ",
             residual->sizes(), " ", residual->scalar_type());
  return layout(*residual);
}

// as_contiguous() as a plain function (torch::stable::contiguous takes a defaulted memory format).
Tensor fully_contiguous(const Tensor& t) { return as_contiguous(t); }

OptTensor checked_bias(const OptTensor& bias, const Tensor& v) {
  if (!bias) return std::nullopt;
  check_same_device(*bias, v, "bias", "v");
  SLAB_CHECK(bias->dim() == 1 && bias->size(0) == v.size(3) && is_floating_point(bias->scalar_type()),
             "bias must be a floating-point vector of the ", v.size(3), " channels of v, got ", bias->sizes(), " ",
             bias->scalar_type());
  return as_contiguous(to_dtype(*bias, acc_dtype(v.scalar_type())));
}

Tensor dwc_op(const Tensor& v, const Tensor& weight, const OptTensor& bias, const OptTensor& residual, int64_t grid_h,
              int64_t grid_w, int64_t pad_top, int64_t pad_left) {
  kernel_dtype(v, "v");
  SLAB_CHECK(v.dim() == 4, "v must have shape (batch, heads, tokens, channels), got ", v.sizes());
  const Kernel k = check_weight(weight, v);
  const DwcGeometry g = geometry(v, k, grid_h, grid_w, pad_top, pad_left);
  const ScalarType acc = acc_dtype(v.scalar_type());
  return run_dwc(channels_contiguous(v), tap_major(weight, acc, false), checked_bias(bias, v),
                 checked_residual(residual, v, channels_contiguous), g);
}

// Gradients of sla_dwc: grad_v is the same convolution of grad with the taps flipped and the
// padding mirrored; grad_weight (weight's shape) and grad_bias ((C,)) come back in weight's dtype.
std::tuple<Tensor, Tensor, Tensor> dwc_backward_op(const Tensor& grad, const Tensor& v, const Tensor& weight,
                                                   int64_t grid_h, int64_t grid_w, int64_t pad_top, int64_t pad_left) {
  const DType dtype = kernel_dtype(v, "v");
  SLAB_CHECK(v.dim() == 4, "v must have shape (batch, heads, tokens, channels), got ", v.sizes());
  check_same_device(grad, v, "grad", "v");
  SLAB_CHECK(grad.sizes().equals(v.sizes()) && grad.scalar_type() == v.scalar_type(), "grad must have the shape ",
             v.sizes(), " and dtype ", v.scalar_type(), " of v, got ", grad.sizes(), " ", grad.scalar_type());
  const Kernel k = check_weight(weight, v);
  const DwcGeometry g = geometry(v, k, grid_h, grid_w, pad_top, pad_left);
  const DwcGeometry mirrored{g.batch,    g.heads,    g.channels,        g.grid_h,          g.grid_w,
                             g.kernel_h, g.kernel_w, k.h - 1 - pad_top, k.w - 1 - pad_left};
  const ScalarType acc = acc_dtype(v.scalar_type());
  const Tensor gc = channels_contiguous(grad), vc = channels_contiguous(v);
  Tensor grad_v = run_dwc(gc, tap_major(weight, acc, true), std::nullopt, std::nullopt, mirrored);

  const int64_t taps = k.h * k.w;
  Tensor grad_taps = zeros({taps, g.channels}, acc, v.device());
  Tensor grad_bias = zeros({g.channels}, acc, v.device());
  if (v.numel() > 0) {
#ifdef SLAB_WITH_CUDA
    const int64_t splits = grad_token_splits(g.grid_h * g.grid_w, g.batch * g.heads);
#else
    const int64_t splits = 1;
#endif
    Tensor partial =
        empty({checked_mul(g.batch * g.heads, splits, "batch * heads * token ranges"), taps + 1, g.channels}, acc,
              v.device());
    DwcWeightGradParams p{dtype,
                          g,
                          splits,
                          gc.data_ptr(),
                          token_strides(gc),
                          vc.data_ptr(),
                          token_strides(vc),
                          partial.data_ptr(),
                          grad_taps.data_ptr(),
                          grad_bias.data_ptr()};
    launch(v, p, dwc_weight_grad_cpu, SLAB_CUDA_FN(dwc_weight_grad_cuda));
  }
  Tensor grad_weight = torch::stable::view(
      as_contiguous(to_dtype(torch::stable::transpose(grad_taps, 0, 1), weight.scalar_type())), weight.sizes());
  return {grad_v, grad_weight, to_dtype(grad_bias, weight.scalar_type())};
}

// One decode token of the causal 1-D branch; cache (B, H, k - 1, C) is updated in place.
Tensor dwc_step_op(const Tensor& v, const Tensor& cache, const Tensor& weight, const OptTensor& bias,
                   const OptTensor& residual) {
  const DType dtype = kernel_dtype(v, "v");
  SLAB_CHECK(v.dim() == 3, "v must have shape (batch, heads, channels) (one token), got ", v.sizes());
  const Tensor v4 = torch::stable::unsqueeze(v, 2);
  const Kernel k = check_weight(weight, v4);
  SLAB_CHECK(weight.dim() == 3, "weight must be a Conv1d weight (C, 1, k) for the causal 1-D branch, got ",
             weight.sizes());
  check_same_device(cache, v, "cache", "v");
  SLAB_CHECK(cache.dim() == 4 && cache.size(0) == v.size(0) && cache.size(1) == v.size(1) && cache.size(2) == k.h - 1 &&
                 cache.size(3) == v.size(2),
             "cache must have shape (", v.size(0), ", ", v.size(1), ", ", k.h - 1, ", ", v.size(2),
             ") = (batch, heads, kernel - 1, channels), got ", cache.sizes());
  SLAB_CHECK(cache.scalar_type() == v.scalar_type() && cache.is_contiguous(), "cache must be a contiguous ",
             v.scalar_type(), " tensor (it is updated in place), got ", cache.scalar_type(),
             cache.is_contiguous() ? "" : " (non-contiguous)");
  AliasCheck()
      .written(cache, "cache")
      .read(v, "v")
      .read(weight, "weight")
      .read(bias, "bias")
      .read(residual, "residual")
      .check();
  const OptTensor res = checked_residual(residual, v, fully_contiguous);
  const ScalarType acc = acc_dtype(v.scalar_type());
  const Tensor vc = as_contiguous(v), taps = tap_major(weight, acc, false);
  const OptTensor b = checked_bias(bias, v4);
  Tensor out = torch::stable::empty_like(vc);
  if (out.numel() == 0) return out;
  DwcStepParams p{dtype,          v.size(0),         v.size(1),        v.size(2),      k.h,
                  vc.data_ptr(),  data_or_null(res), cache.data_ptr(), out.data_ptr(), taps.data_ptr(),
                  data_or_null(b)};
  launch(v, p, dwc_step_cpu, SLAB_CUDA_FN(dwc_step_cuda));
  return out;
}

}  // namespace
}  // namespace slab::sla

#ifndef SLAB_WITH_CUDA
STABLE_TORCH_LIBRARY_FRAGMENT(slab, m) {
  m.def(
      "sla_dwc(Tensor v, Tensor weight, Tensor? bias, Tensor? residual, int grid_h, int grid_w, int pad_top, "
      "int pad_left) -> Tensor");
  m.def(
      "sla_dwc_backward(Tensor grad, Tensor v, Tensor weight, int grid_h, int grid_w, int pad_top, "
      "int pad_left) -> (Tensor, Tensor, Tensor)");
  m.def("sla_dwc_step(Tensor v, Tensor(a!) cache, Tensor weight, Tensor? bias, Tensor? residual) -> Tensor");
}
#endif

STABLE_TORCH_LIBRARY_IMPL(slab, SLAB_KERNEL_KEY, m) {
  m.impl("sla_dwc", TORCH_BOX(&slab::sla::dwc_op));
  m.impl("sla_dwc_backward", TORCH_BOX(&slab::sla::dwc_backward_op));
  m.impl("sla_dwc_step", TORCH_BOX(&slab::sla::dwc_step_op));
}
