// Conv-BN fold ops (Efficient ConvBN Tune mode): schemas, input checks and the CPU/CUDA bindings
// of the kernels in convbn.h, on torch's stable ABI (core/binding.h). Fake tensors and autograd
// are registered in python/slab/ops/convbn.py.
#include <tuple>

#include "convbn/convbn.h"
#include "core/binding.h"

namespace slab::convbn {
namespace {

struct Shape {
  int64_t channels, k;
};

// A conv (O, I/groups, *kernel) or linear (O, I) weight, viewed as (O, k).
Shape check_weight(const Tensor& weight) {
  kernel_dtype(weight, "weight");
  SLAB_CHECK(weight.dim() >= 2, "weight must have at least 2 dimensions (out_channels, in_channels, *kernel), got ",
             weight.sizes());
  int64_t k = 1;
  for (int64_t d = 1; d < weight.dim(); ++d) k = checked_mul(k, weight.size(d), "weight's elements per channel");
  return {weight.size(0), k};
}

// A per-channel vector: (O,), dtype that of weight or the accumulation dtype, weight's device;
// returned contiguous in the accumulation dtype (no copy when it already is).
Tensor channel_vec(const Tensor& t, const Tensor& weight, int64_t channels, const char* name) {
  check_same_device(t, weight, name, "weight");
  SLAB_CHECK(t.dim() == 1 && t.size(0) == channels, name, " must have shape (", channels,
             ",) = (out_channels of weight,), got ", t.sizes());
  const ScalarType wt = weight.scalar_type(), acc = acc_dtype(wt);
  SLAB_CHECK(t.scalar_type() == wt || t.scalar_type() == acc, name, " must be ", wt, wt == acc ? "" : " or float32",
             " to match weight, got ", t.scalar_type());
  return as_contiguous(to_dtype(t, acc));
}

OptTensor channel_vec(const OptTensor& t, const Tensor& weight, int64_t channels, const char* name) {
  if (!t.has_value()) return std::nullopt;
  return channel_vec(*t, weight, channels, name);
}

std::tuple<Tensor, Tensor> fold_op(const Tensor& weight, const OptTensor& bias, const OptTensor& bn_weight,
                                   const OptTensor& bn_bias, const Tensor& running_mean, const Tensor& running_var,
                                   double eps) {
  const DType dtype = kernel_dtype(weight, "weight");
  const Shape s = check_weight(weight);
  const OptTensor b = channel_vec(bias, weight, s.channels, "bias");
  const OptTensor gamma = channel_vec(bn_weight, weight, s.channels, "bn_weight");
  const OptTensor beta = channel_vec(bn_bias, weight, s.channels, "bn_bias");
  const Tensor mean = channel_vec(running_mean, weight, s.channels, "running_mean");
  const Tensor var = channel_vec(running_var, weight, s.channels, "running_var");
  check_finite(eps, "eps");
  const Tensor w = as_contiguous(weight);
  Tensor out_w = empty(shape_of(weight), weight.scalar_type(), weight.device());
  Tensor out_b = empty({s.channels}, weight.scalar_type(), weight.device());
  if (s.channels == 0) return {out_w, out_b};
  FoldParams p{
      dtype,           s.channels,     s.k, w.data_ptr(),     data_or_null(b), data_or_null(gamma), data_or_null(beta),
      mean.data_ptr(), var.data_ptr(), eps, out_w.data_ptr(), out_b.data_ptr()};
  launch(weight, p, fold_cpu, SLAB_CUDA_FN(fold_cuda));
  return {out_w, out_b};
}

// Gradients of fold_op: (dw in weight's dtype, or shape (0,) unless weight_grad; db, dgamma (shape
// (0,) unless bn_weight_grad) and dbeta, (O,) in the accumulation dtype).
std::tuple<Tensor, Tensor, Tensor, Tensor> fold_backward_op(const Tensor& grad_weight, const OptTensor& grad_bias,
                                                            const Tensor& weight, const OptTensor& bias,
                                                            const OptTensor& bn_weight, const Tensor& running_mean,
                                                            const Tensor& running_var, double eps, bool weight_grad,
                                                            bool bn_weight_grad) {
  const DType dtype = kernel_dtype(weight, "weight");
  const Shape s = check_weight(weight);
  check_same_device(grad_weight, weight, "grad_weight", "weight");
  SLAB_CHECK(grad_weight.sizes().equals(weight.sizes()) && grad_weight.scalar_type() == weight.scalar_type(),
             "grad_weight must have the shape ", weight.sizes(), " and dtype ", weight.scalar_type(),
             " of weight, got ", grad_weight.sizes(), " ", grad_weight.scalar_type());
  const OptTensor gb = channel_vec(grad_bias, weight, s.channels, "grad_bias");
  const OptTensor b = channel_vec(bias, weight, s.channels, "bias");
  const OptTensor gamma = channel_vec(bn_weight, weight, s.channels, "bn_weight");
  const Tensor mean = channel_vec(running_mean, weight, s.channels, "running_mean");
  const Tensor var = channel_vec(running_var, weight, s.channels, "running_var");
  check_finite(eps, "eps");
  const ScalarType acc = acc_dtype(weight.scalar_type());
  const Device dev = weight.device();
  Tensor dw = weight_grad ? empty(shape_of(weight), weight.scalar_type(), dev) : empty({0}, weight.scalar_type(), dev);
  Tensor d_bias = empty({s.channels}, acc, dev), d_beta = empty({s.channels}, acc, dev);
  Tensor d_gamma = empty({bn_weight_grad ? s.channels : 0}, acc, dev);
  if (s.channels == 0) return {dw, d_bias, d_gamma, d_beta};
  const Tensor gw = as_contiguous(grad_weight);
  const Tensor w = bn_weight_grad ? as_contiguous(weight) : Tensor();
  Tensor workspace;
#ifdef SLAB_WITH_CUDA
  workspace = empty({fold_backward_workspace_elems(s.channels, s.k)}, acc, dev);
#endif
  FoldBwdParams p{dtype,
                  s.channels,
                  s.k,
                  gw.data_ptr(),
                  data_or_null(gb),
                  data_or_null(w),
                  data_or_null(b),
                  data_or_null(gamma),
                  mean.data_ptr(),
                  var.data_ptr(),
                  eps,
                  weight_grad ? dw.data_ptr() : nullptr,
                  d_bias.data_ptr(),
                  bn_weight_grad ? d_gamma.data_ptr() : nullptr,
                  d_beta.data_ptr(),
                  data_or_null(workspace)};
  launch(weight, p, fold_backward_cpu, SLAB_CUDA_FN(fold_backward_cuda));
  return {dw, d_bias, d_gamma, d_beta};
}

}  // namespace
}  // namespace slab::convbn

#ifndef SLAB_WITH_CUDA
STABLE_TORCH_LIBRARY_FRAGMENT(slab, m) {
  m.def(
      "fold_conv_bn(Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, Tensor running_mean, "
      "Tensor running_var, float eps) -> (Tensor, Tensor)");
  m.def(
      "fold_conv_bn_backward(Tensor grad_weight, Tensor? grad_bias, Tensor weight, Tensor? bias, "
      "Tensor? bn_weight, Tensor running_mean, Tensor running_var, float eps, bool weight_grad, "
      "bool bn_weight_grad) -> (Tensor, Tensor, Tensor, Tensor)");
}
#endif

STABLE_TORCH_LIBRARY_IMPL(slab, SLAB_KERNEL_KEY, m) {
  m.impl("fold_conv_bn", TORCH_BOX(&slab::convbn::fold_op));
  m.impl("fold_conv_bn_backward", TORCH_BOX(&slab::convbn::fold_backward_op));
}
