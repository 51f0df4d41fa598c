// PRepBN ops: schemas, input checks, and the CPU/CUDA bindings of the kernels in prepbn.h, on torch's
// stable ABI (core/binding.h). The public composites (rep_bn, prep_bn), the in-place
// running-stat update (bn_update_running_stats), fake tensors and autograd are registered in
// python/slab/ops/prepbn.py.
#include <string>
#include <tuple>

#include "core/binding.h"
#include "prepbn/prepbn.h"

namespace slab::prepbn {
namespace {

Norm parse_norm(const std::string& norm) {
  if (norm == "none") return Norm::kNone;
  if (norm == "layer") return Norm::kLayer;
  if (norm == "rms") return Norm::kRms;
  fail("norm must be \"layer\" or \"rms\" (\"none\" for RepBN alone), got \"", norm, "\"");
}

struct Shape {
  int64_t rows, channels;
};

// x (..., C) -> (rows, C), checked; the kernels see a contiguous row-major matrix.
Shape check_x(const Tensor& x, const char* name = "x") {
  kernel_dtype(x, name);
  SLAB_CHECK(x.dim() >= 1, name, " must have at least one dimension (..., C), got a scalar");
  const int64_t channels = x.size(-1);
  SLAB_CHECK(channels > 0, name, " must have a non-empty last (channel) dimension, got shape ", x.sizes());
  return {x.numel() / channels, channels};
}

void check_same_shape(const Tensor& t, const Tensor& x, const char* name) {
  check_same_device(t, x, name);
  SLAB_CHECK(t.sizes().equals(x.sizes()), name, " must have the shape of x ", x.sizes(), ", got ", t.sizes());
  SLAB_CHECK(t.scalar_type() == x.scalar_type(), name, " must have the dtype of x (", x.scalar_type(), "), got ",
             t.scalar_type());
}

// mask: bool of shape x.shape[:-1]; true = token enters the batch statistics.
OptTensor check_mask(const OptTensor& mask, const Tensor& x) {
  if (!mask.has_value()) return std::nullopt;
  check_same_device(*mask, x, "mask");
  SLAB_CHECK(mask->scalar_type() == ScalarType::Bool, "mask must be a bool tensor, got ", mask->scalar_type());
  const IntArrayRef lead = x.sizes().slice(0, x.dim() - 1);
  SLAB_CHECK(mask->sizes().equals(lead), "mask must have shape x.shape[:-1] = ", lead, ", got ", mask->sizes());
  return as_contiguous(*mask);
}

void check_norm_weight(Norm norm, const OptTensor& norm_weight, const std::string& norm_name) {
  SLAB_CHECK(norm == Norm::kNone || norm_weight.has_value(), "norm_weight is required for norm=\"", norm_name, "\"");
}

const bool* mask_ptr(const OptTensor& mask) {
  return mask.has_value() ? static_cast<const bool*>(mask->data_ptr()) : nullptr;
}

Tensor alpha_scalar(const Tensor& alpha, const Tensor& x) {
  check_same_device(alpha, x, "alpha");
  SLAB_CHECK(alpha.numel() == 1, "alpha must hold one element (shape (1,) or ()), got shape ", alpha.sizes());
  SLAB_CHECK(is_floating_point(alpha.scalar_type()), "alpha must be a floating-point (real) tensor, got ",
             alpha.scalar_type());
  return as_contiguous(to_dtype(torch::stable::reshape(alpha, {1}), acc_dtype(x.scalar_type())));
}

Tensor stat_vector(const Tensor& t, const Tensor& x, int64_t n, const char* name) {
  check_same_device(t, x, name);
  SLAB_CHECK(t.dim() == 1 && t.size(0) == n && t.scalar_type() == acc_dtype(x.scalar_type()), name, " must be a ",
             acc_dtype(x.scalar_type()), " tensor of shape (", n, ",), got ", t.scalar_type(), " ", t.sizes());
  return as_contiguous(t);
}

// Scratch of the CUDA column reductions; none on the CPU.
Tensor workspace(const Tensor& x, int64_t rows, int64_t channels) {
#ifdef SLAB_WITH_CUDA
  return empty({static_cast<int64_t>(workspace_bytes_cuda(rows, channels, kernel_dtype(x, "x")))}, ScalarType::Byte,
               x.device());
#else
  (void)x, (void)rows, (void)channels;
  return Tensor();
#endif
}

// ---- elementwise helpers (ATen ops take no Scalar through the stable ABI: 0-dim tensors) -------

// A 0-dim CPU tensor holding `v` in dtype `dt`: a scalar operand of elementwise ops on any device,
// rounded to dt as a Scalar operand of that dtype would be.
Tensor scalar(double v, ScalarType dt) { return torch::stable::full({}, v, dt); }

Tensor add(const Tensor& a, const Tensor& b) { return torch::stable::subtract(a, b, -1.0); }  // a + 1 * b
Tensor sub(const Tensor& a, const Tensor& b) { return torch::stable::subtract(a, b); }
Tensor mul(const Tensor& a, const Tensor& b) { return aten("aten::mul", "Tensor", a, b); }
Tensor div(const Tensor& a, const Tensor& b) { return aten("aten::div", "Tensor", a, b); }
Tensor rsqrt(const Tensor& a) { return aten("aten::rsqrt", "", a); }

// ---- stage ops -------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> stats_op(const Tensor& x, const OptTensor& mask_in) {
  const auto [rows, channels] = check_x(x);
  const auto mask = check_mask(mask_in, x);
  const Tensor xc = as_contiguous(x);
  const ScalarType acc = acc_dtype(x.scalar_type());
  Tensor mean = empty({channels}, acc, x.device()), m2 = empty({channels}, acc, x.device()),
         count = empty({1}, acc, x.device());
  Tensor ws = workspace(x, rows, channels);
  StatsParams p{kernel_dtype(x, "x"),
                rows,
                channels,
                xc.data_ptr(),
                mask_ptr(mask),
                mean.data_ptr(),
                m2.data_ptr(),
                count.data_ptr(),
                data_or_null(ws),
                0.0,
                nullptr,
                nullptr};
  launch(x, p, stats_cpu, SLAB_CUDA_FN(stats_cuda));
  return {mean, m2, count};
}

// The apply stage: checks, outputs and the launch; `amend` may set the fused op's extra fields.
template <typename Amend>
std::tuple<Tensor, Tensor, Tensor> apply_impl(const Tensor& x, const OptTensor& norm_weight, const OptTensor& norm_bias,
                                              const Tensor& bn_weight, const Tensor& bn_bias, const Tensor& alpha,
                                              const Tensor& bn_mean, const Tensor& bn_rstd, double lam, double norm_eps,
                                              const std::string& norm_name, Amend&& amend) {
  const auto [rows, channels] = check_x(x);
  const Norm norm = parse_norm(norm_name);
  check_norm_weight(norm, norm_weight, norm_name);
  SLAB_CHECK(norm != Norm::kRms || !norm_bias.has_value(), "norm_bias must be None for norm=\"rms\"");
  check_finite(lam, "lam", /*non_negative=*/false);
  check_finite(norm_eps, "norm_eps", /*non_negative=*/false);
  const auto nw = channel_vector(norm_weight, x, channels, "norm_weight");
  const auto nb = channel_vector(norm_bias, x, channels, "norm_bias");
  const Tensor bw = channel_vector(bn_weight, x, channels, "bn_weight");
  const Tensor bb = channel_vector(bn_bias, x, channels, "bn_bias");
  const Tensor al = alpha_scalar(alpha, x);
  const Tensor mean = stat_vector(bn_mean, x, channels, "bn_mean");
  const Tensor rstd = stat_vector(bn_rstd, x, channels, "bn_rstd");
  const Tensor xc = as_contiguous(x);
  Tensor y = torch::stable::empty_like(xc);
  const ScalarType acc = acc_dtype(x.scalar_type());
  const int64_t row_stats = norm == Norm::kNone ? 0 : rows;
  Tensor row_mean = empty({row_stats}, acc, x.device()), row_rstd = empty({row_stats}, acc, x.device());
  ApplyParams p{kernel_dtype(x, "x"),
                norm,
                rows,
                channels,
                xc.data_ptr(),
                y.data_ptr(),
                data_or_null(nw),
                data_or_null(nb),
                bw.data_ptr(),
                bb.data_ptr(),
                al.data_ptr(),
                mean.data_ptr(),
                rstd.data_ptr(),
                lam,
                norm_eps,
                row_mean.data_ptr(),
                row_rstd.data_ptr(),
                nullptr,
                0.0,
                nullptr,
                nullptr,
                nullptr};
  amend(p);
  launch(x, p, apply_cpu, SLAB_CUDA_FN(apply_cuda));
  return {y, row_mean, row_rstd};
}

std::tuple<Tensor, Tensor, Tensor> apply_op(const Tensor& x, const OptTensor& norm_weight, const OptTensor& norm_bias,
                                            const Tensor& bn_weight, const Tensor& bn_bias, const Tensor& alpha,
                                            const Tensor& bn_mean, const Tensor& bn_rstd, double lam, double norm_eps,
                                            const std::string& norm_name) {
  return apply_impl(x, norm_weight, norm_bias, bn_weight, bn_bias, alpha, bn_mean, bn_rstd, lam, norm_eps, norm_name,
                    [](ApplyParams&) {});
}

// The backward reduction stage; `amend` may set the fused op's extra fields.
template <typename Amend>
std::tuple<Tensor, Tensor> bwd_reduce_impl(const Tensor& dy, const Tensor& x, const Tensor& row_mean,
                                           const Tensor& row_rstd, const Tensor& bn_mean, const Tensor& bn_rstd,
                                           const std::string& norm_name, const OptTensor& mask_in, Amend&& amend) {
  const auto [rows, channels] = check_x(x);
  check_same_shape(dy, x, "dy");
  const Norm norm = parse_norm(norm_name);
  const int64_t row_stats = norm == Norm::kNone ? 0 : rows;
  const Tensor rm = stat_vector(row_mean, x, row_stats, "row_mean");
  const Tensor rr = stat_vector(row_rstd, x, row_stats, "row_rstd");
  const Tensor mean = stat_vector(bn_mean, x, channels, "bn_mean");
  const Tensor rstd = stat_vector(bn_rstd, x, channels, "bn_rstd");
  const auto mask = check_mask(mask_in, x);
  const Tensor xc = as_contiguous(x), dyc = as_contiguous(dy);
  const ScalarType acc = acc_dtype(x.scalar_type());
  Tensor sums = empty({3, channels}, acc, x.device()), count = empty({1}, acc, x.device());
  Tensor ws = workspace(x, rows, channels);
  BwdReduceParams p{kernel_dtype(x, "x"),
                    norm,
                    rows,
                    channels,
                    dyc.data_ptr(),
                    xc.data_ptr(),
                    mask_ptr(mask),
                    rm.data_ptr(),
                    rr.data_ptr(),
                    mean.data_ptr(),
                    rstd.data_ptr(),
                    sums.data_ptr(),
                    count.data_ptr(),
                    data_or_null(ws),
                    0.0,
                    nullptr,
                    nullptr,
                    nullptr,
                    nullptr,
                    nullptr};
  amend(p);
  launch(x, p, bwd_reduce_cpu, SLAB_CUDA_FN(bwd_reduce_cuda));
  return {sums, count};
}

std::tuple<Tensor, Tensor> bwd_reduce_op(const Tensor& dy, const Tensor& x, const Tensor& row_mean,
                                         const Tensor& row_rstd, const Tensor& bn_mean, const Tensor& bn_rstd,
                                         const std::string& norm_name, const OptTensor& mask_in) {
  return bwd_reduce_impl(dy, x, row_mean, row_rstd, bn_mean, bn_rstd, norm_name, mask_in, [](BwdReduceParams&) {});
}

Tensor bwd_apply_op(const Tensor& dy, const Tensor& x, const OptTensor& norm_weight, const Tensor& bn_weight,
                    const Tensor& alpha, const Tensor& row_mean, const Tensor& row_rstd, const Tensor& bn_mean,
                    const Tensor& bn_rstd, const Tensor& sums, const Tensor& count, double lam, bool training,
                    const std::string& norm_name, const OptTensor& mask_in) {
  const auto [rows, channels] = check_x(x);
  check_same_shape(dy, x, "dy");
  const Norm norm = parse_norm(norm_name);
  check_norm_weight(norm, norm_weight, norm_name);
  check_finite(lam, "lam", /*non_negative=*/false);
  const int64_t row_stats = norm == Norm::kNone ? 0 : rows;
  const auto nw = channel_vector(norm_weight, x, channels, "norm_weight");
  const Tensor bw = channel_vector(bn_weight, x, channels, "bn_weight");
  const Tensor al = alpha_scalar(alpha, x);
  const Tensor rm = stat_vector(row_mean, x, row_stats, "row_mean");
  const Tensor rr = stat_vector(row_rstd, x, row_stats, "row_rstd");
  const Tensor mean = stat_vector(bn_mean, x, channels, "bn_mean");
  const Tensor rstd = stat_vector(bn_rstd, x, channels, "bn_rstd");
  check_same_device(sums, x, "sums");
  SLAB_CHECK(sums.dim() == 2 && sums.size(0) == 3 && sums.size(1) == channels &&
                 sums.scalar_type() == acc_dtype(x.scalar_type()),
             "sums must be a ", acc_dtype(x.scalar_type()), " tensor of shape (3, ", channels, "), got ",
             sums.scalar_type(), " ", sums.sizes());
  const Tensor sc = as_contiguous(sums);
  const Tensor cnt = stat_vector(count, x, 1, "count");
  const auto mask = check_mask(mask_in, x);
  const Tensor xc = as_contiguous(x), dyc = as_contiguous(dy);
  Tensor dx = torch::stable::empty_like(xc);
  BwdApplyParams p{kernel_dtype(x, "x"),
                   norm,
                   training,
                   rows,
                   channels,
                   dyc.data_ptr(),
                   xc.data_ptr(),
                   mask_ptr(mask),
                   data_or_null(nw),
                   bw.data_ptr(),
                   al.data_ptr(),
                   rm.data_ptr(),
                   rr.data_ptr(),
                   mean.data_ptr(),
                   rstd.data_ptr(),
                   sc.data_ptr(),
                   cnt.data_ptr(),
                   lam,
                   dx.data_ptr()};
  launch(x, p, bwd_apply_cpu, SLAB_CUDA_FN(bwd_apply_cuda));
  return dx;
}

// ---- fused ops -------------------------------------------------------------------------------

// The kept-token count (a 1-element float / double tensor), read on the host: a copy of one value
// (and a sync) for a CUDA tensor.
double host_count(const Tensor& count) {
  const Tensor host = count.is_cpu() ? count : torch::stable::to(count, Device(torch::headeronly::DeviceType::CPU));
  return host.scalar_type() == ScalarType::Double ? *host.const_data_ptr<double>()
                                                  : static_cast<double>(*host.const_data_ptr<float>());
}

void check_training_rows(const Tensor& x, int64_t rows) {
  // Like torch's batch norm: the unbiased running variance needs two values per channel.
  SLAB_CHECK(rows > 1, "Expected more than 1 value per channel when training, got x of shape ", x.sizes());
}

void check_training_count(const Tensor& x, int64_t rows, const OptTensor& mask, const Tensor& count) {
  check_training_rows(x, rows);
  if (mask.has_value()) {  // the kept count is data: reading it costs a host sync on CUDA
    const double kept = host_count(count);
    SLAB_CHECK(kept > 1, "Expected more than 1 unmasked token when training, got ", kept);
  }
}

using FwdOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// CUDA: two launches (stats with its in-kernel merge and finalisation, then apply) in training,
// one (apply, the running statistics folded in) in eval; no host sync. Fewer than 2 kept tokens
// (a mask is data) cannot raise here without reading the count to the host, which would sync
// every layer and break CUDA-graph capture: the batch statistics are NaN instead (batch_stats in
// prepbn_math.h), so y, the gradients and the updated running statistics are NaN. The CPU raises.
FwdOutputs fwd_cuda(const Tensor& x, const OptTensor& norm_weight, const OptTensor& norm_bias, const Tensor& bn_weight,
                    const Tensor& bn_bias, const Tensor& alpha, const Tensor& rmean, const Tensor& rvar, double lam,
                    bool training, double eps, double norm_eps, const std::string& norm, const OptTensor& mask_in,
                    int64_t rows, int64_t channels) {
  const ScalarType acc = acc_dtype(x.scalar_type());
  Tensor bn_mean = empty({channels}, acc, x.device()), bn_rstd = empty({channels}, acc, x.device()),
         bn_var = empty({channels}, acc, x.device());
  const Tensor xc = as_contiguous(x);
  if (training) {
    check_training_rows(x, rows);
    const auto mask = check_mask(mask_in, x);
    Tensor count = empty({1}, acc, x.device());
    Tensor ws = workspace(x, rows, channels);
    StatsParams p{kernel_dtype(x, "x"),
                  rows,
                  channels,
                  xc.data_ptr(),
                  mask_ptr(mask),
                  bn_mean.data_ptr(),
                  nullptr,
                  count.data_ptr(),
                  data_or_null(ws),
                  eps,
                  bn_rstd.data_ptr(),
                  bn_var.data_ptr()};
    launch(x, p, stats_cpu, SLAB_CUDA_FN(stats_cuda));
    auto [y, row_mean, row_rstd] = apply_impl(xc, norm_weight, norm_bias, bn_weight, bn_bias, alpha, bn_mean, bn_rstd,
                                              lam, norm_eps, norm, [](ApplyParams&) {});
    return {y, row_mean, row_rstd, bn_mean, bn_rstd, bn_var};
  }
  auto [y, row_mean, row_rstd] = apply_impl(
      xc, norm_weight, norm_bias, bn_weight, bn_bias, alpha, rmean, bn_rstd, lam, norm_eps, norm, [&](ApplyParams& p) {
        p.bn_var = rvar.data_ptr(), p.eps = eps;
        p.out_mean = bn_mean.data_ptr(), p.out_rstd = bn_rstd.data_ptr(), p.out_var = bn_var.data_ptr();
      });
  return {y, row_mean, row_rstd, bn_mean, bn_rstd, bn_var};
}

FwdOutputs fwd_op(const Tensor& x, const OptTensor& norm_weight, const OptTensor& norm_bias, const Tensor& bn_weight,
                  const Tensor& bn_bias, const Tensor& alpha, const Tensor& running_mean, const Tensor& running_var,
                  double lam, bool training, double eps, double norm_eps, const std::string& norm,
                  const OptTensor& mask) {
  const auto [rows, channels] = check_x(x);
  check_finite(eps, "eps");
  const Tensor rmean = channel_vector(running_mean, x, channels, "running_mean");
  const Tensor rvar = channel_vector(running_var, x, channels, "running_var");
  if (!x.is_cpu())
    return fwd_cuda(x, norm_weight, norm_bias, bn_weight, bn_bias, alpha, rmean, rvar, lam, training, eps, norm_eps,
                    norm, mask, rows, channels);
  // CPU: the stage kernels and ATen ops for the scalar glue.
  const ScalarType acc = acc_dtype(x.scalar_type());
  const Tensor eps_t = scalar(eps, acc);
  Tensor bn_mean, bn_var, bn_rstd;
  if (training) {
    auto [mean, m2, count] = stats_op(x, mask);
    check_training_count(x, rows, mask, count);
    bn_mean = mean;
    bn_rstd = rsqrt(add(div(m2, count), eps_t));     // rsqrt(m2 / count + eps)
    bn_var = div(m2, sub(count, scalar(1.0, acc)));  // m2 / (count - 1)
  } else {
    bn_mean = torch::stable::clone(rmean);
    bn_var = torch::stable::clone(rvar);
    bn_rstd = rsqrt(add(rvar, eps_t));
  }
  auto [y, row_mean, row_rstd] =
      apply_op(x, norm_weight, norm_bias, bn_weight, bn_bias, alpha, bn_mean, bn_rstd, lam, norm_eps, norm);
  return {y, row_mean, row_rstd, bn_mean, bn_rstd, bn_var};
}

using BwdOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// CUDA: two launches; the reduction's merging blocks write the parameter gradients and d_alpha.
BwdOutputs bwd_cuda(const Tensor& dy, const Tensor& x, const OptTensor& norm_weight, const Tensor& bn_weight,
                    const Tensor& alpha, const Tensor& row_mean, const Tensor& row_rstd, const Tensor& bn_mean,
                    const Tensor& bn_rstd, double lam, bool training, const std::string& norm, const OptTensor& mask) {
  const int64_t channels = check_x(x).channels;
  const ScalarType acc = acc_dtype(x.scalar_type());
  Tensor d_nw = empty({channels}, acc, x.device()), d_nb = empty({channels}, acc, x.device()),
         d_bw = empty({channels}, acc, x.device()), d_bb = empty({channels}, acc, x.device()),
         d_alpha = empty({1}, acc, x.device());
  auto [sums, count] =
      bwd_reduce_impl(dy, x, row_mean, row_rstd, bn_mean, bn_rstd, norm, mask, [&](BwdReduceParams& p) {
        p.lam = lam;
        p.d_norm_weight = d_nw.data_ptr(), p.d_norm_bias = d_nb.data_ptr();
        p.d_bn_weight = d_bw.data_ptr(), p.d_bn_bias = d_bb.data_ptr(), p.d_alpha = d_alpha.data_ptr();
      });
  Tensor dx = bwd_apply_op(dy, x, norm_weight, bn_weight, alpha, row_mean, row_rstd, bn_mean, bn_rstd, sums, count, lam,
                           training, norm, mask);
  return {dx, d_nw, d_nb, d_bw, d_bb, d_alpha};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bwd_op(const Tensor& dy, const Tensor& x,
                                                                  const OptTensor& norm_weight, const Tensor& bn_weight,
                                                                  const Tensor& alpha, const Tensor& row_mean,
                                                                  const Tensor& row_rstd, const Tensor& bn_mean,
                                                                  const Tensor& bn_rstd, double lam, bool training,
                                                                  const std::string& norm, const OptTensor& mask) {
  check_finite(lam, "lam", /*non_negative=*/false);
  check_x(x);
  if (!x.is_cpu())
    return bwd_cuda(dy, x, norm_weight, bn_weight, alpha, row_mean, row_rstd, bn_mean, bn_rstd, lam, training, norm,
                    mask);
  // CPU: the stage kernels and ATen ops for the parameter gradients.
  auto [sums, count] = bwd_reduce_op(dy, x, row_mean, row_rstd, bn_mean, bn_rstd, norm, mask);
  Tensor dx = bwd_apply_op(dy, x, norm_weight, bn_weight, alpha, row_mean, row_rstd, bn_mean, bn_rstd, sums, count, lam,
                           training, norm, mask);
  const Tensor s_dy = torch::stable::select(sums, 0, 0), s_bn = torch::stable::select(sums, 0, 1),
               s_norm = torch::stable::select(sums, 0, 2);
  const ScalarType acc = sums.scalar_type();
  const Tensor lam_t = scalar(lam, acc), one_m = scalar(1.0 - lam, acc);
  // d_alpha = ((1 - lam) * (s_bn / bn_rstd + bn_mean * s_dy)).sum()
  Tensor d_alpha =
      torch::stable::reshape(torch::stable::sum(mul(one_m, add(div(s_bn, bn_rstd), mul(bn_mean, s_dy)))), {1});
  return {dx, mul(lam_t, s_norm), mul(lam_t, s_dy), mul(one_m, s_bn), mul(one_m, s_dy), d_alpha};
}

}  // namespace
}  // namespace slab::prepbn

#ifndef SLAB_WITH_CUDA
STABLE_TORCH_LIBRARY_FRAGMENT(slab, m) {
  m.def(
      "rep_bn(Tensor x, Tensor weight, Tensor bias, Tensor alpha, Tensor(a!) running_mean, "
      "Tensor(b!) running_var, bool training, float momentum=0.1, float eps=1e-05, Tensor? mask=None) -> Tensor");
  m.def(
      "prep_bn(Tensor x, Tensor norm_weight, Tensor? norm_bias, Tensor bn_weight, Tensor bn_bias, Tensor alpha, "
      "Tensor(a!) running_mean, Tensor(b!) running_var, float lam, bool training, float momentum=0.1, "
      "float eps=1e-05, float norm_eps=1e-06, str norm=\"layer\", Tensor? mask=None) -> Tensor");
  m.def(
      "prep_bn_forward(Tensor x, Tensor? norm_weight, Tensor? norm_bias, Tensor bn_weight, Tensor bn_bias, "
      "Tensor alpha, Tensor running_mean, Tensor running_var, float lam, bool training, float eps, "
      "float norm_eps, str norm, Tensor? mask) -> (Tensor y, Tensor row_mean, Tensor row_rstd, Tensor bn_mean, "
      "Tensor bn_rstd, Tensor bn_var)");
  m.def(
      "prep_bn_backward(Tensor dy, Tensor x, Tensor? norm_weight, Tensor bn_weight, Tensor alpha, Tensor row_mean, "
      "Tensor row_rstd, Tensor bn_mean, Tensor bn_rstd, float lam, bool training, str norm, Tensor? mask) -> "
      "(Tensor dx, Tensor d_norm_weight, Tensor d_norm_bias, Tensor d_bn_weight, Tensor d_bn_bias, "
      "Tensor d_alpha)");
  m.def("prep_bn_stats(Tensor x, Tensor? mask) -> (Tensor mean, Tensor m2, Tensor count)");
  m.def(
      "prep_bn_apply(Tensor x, Tensor? norm_weight, Tensor? norm_bias, Tensor bn_weight, Tensor bn_bias, "
      "Tensor alpha, Tensor bn_mean, Tensor bn_rstd, float lam, float norm_eps, str norm) -> "
      "(Tensor y, Tensor row_mean, Tensor row_rstd)");
  m.def(
      "prep_bn_backward_reduce(Tensor dy, Tensor x, Tensor row_mean, Tensor row_rstd, Tensor bn_mean, "
      "Tensor bn_rstd, str norm, Tensor? mask) -> (Tensor sums, Tensor count)");
  m.def(
      "prep_bn_backward_apply(Tensor dy, Tensor x, Tensor? norm_weight, Tensor bn_weight, Tensor alpha, "
      "Tensor row_mean, Tensor row_rstd, Tensor bn_mean, Tensor bn_rstd, Tensor sums, Tensor count, float lam, "
      "bool training, str norm, Tensor? mask) -> Tensor");
  m.def(
      "bn_update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, "
      "float momentum) -> ()");
}
#endif

STABLE_TORCH_LIBRARY_IMPL(slab, SLAB_KERNEL_KEY, m) {
  m.impl("prep_bn_forward", TORCH_BOX(&slab::prepbn::fwd_op));
  m.impl("prep_bn_backward", TORCH_BOX(&slab::prepbn::bwd_op));
  m.impl("prep_bn_stats", TORCH_BOX(&slab::prepbn::stats_op));
  m.impl("prep_bn_apply", TORCH_BOX(&slab::prepbn::apply_op));
  m.impl("prep_bn_backward_reduce", TORCH_BOX(&slab::prepbn::bwd_reduce_op));
  m.impl("prep_bn_backward_apply", TORCH_BOX(&slab::prepbn::bwd_apply_op));
}
