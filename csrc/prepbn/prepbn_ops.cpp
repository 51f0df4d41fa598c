// PRepBN ops: schemas, input checks, and the CPU/CUDA bindings of the kernels in prepbn.h.
// Autograd and fake tensors are registered in python/slab/ops.py.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <string_view>
#include <tuple>

#include "core/binding.h"
#include "prepbn/prepbn.h"

namespace slab::prepbn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

Norm parse_norm(std::string_view norm) {
  if (norm == "none") return Norm::kNone;
  if (norm == "layer") return Norm::kLayer;
  if (norm == "rms") return Norm::kRms;
  TORCH_CHECK_VALUE(false, "norm must be \"layer\" or \"rms\" (\"none\" for RepBN alone), got \"", norm, "\"");
}

struct Shape {
  int64_t rows, channels;
};

// x (..., C) -> (rows, C), checked; the kernels see a contiguous row-major matrix.
Shape check_x(const Tensor& x, const char* name = "x") {
  kernel_dtype(x, name);
  TORCH_CHECK(x.dim() >= 1, name, " must have at least one dimension (..., C), got a scalar");
  const int64_t channels = x.size(-1);
  TORCH_CHECK(channels > 0, name, " must have a non-empty last (channel) dimension, got shape ", x.sizes());
  return {x.numel() / channels, channels};
}

void check_same_shape(const Tensor& t, const Tensor& x, const char* name) {
  check_same_device(t, x, name);
  TORCH_CHECK(t.sizes() == x.sizes(), name, " must have the shape of x ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must have the dtype of x (", x.scalar_type(),
              "), got ", t.scalar_type());
}

// mask: bool of shape x.shape[:-1]; true = token enters the batch statistics.
OptTensor check_mask(const OptTensor& mask, const Tensor& x) {
  if (!mask.has_value()) return std::nullopt;
  check_same_device(*mask, x, "mask");
  TORCH_CHECK(mask->scalar_type() == at::kBool, "mask must be a bool tensor, got ", mask->scalar_type());
  TORCH_CHECK(mask->sizes() == x.sizes().slice(0, x.dim() - 1), "mask must have shape x.shape[:-1] = ",
              x.sizes().slice(0, x.dim() - 1), ", got ", mask->sizes());
  return mask->contiguous();
}

void check_norm_weight(Norm norm, const OptTensor& norm_weight, c10::string_view norm_name) {
  TORCH_CHECK_VALUE(norm == Norm::kNone || norm_weight.has_value(), "norm_weight is required for norm=\"",
                    norm_name, "\"");
}

const bool* mask_ptr(const OptTensor& mask) { return mask.has_value() ? mask->data_ptr<bool>() : nullptr; }

Tensor alpha_scalar(const Tensor& alpha, const Tensor& x) {
  check_same_device(alpha, x, "alpha");
  TORCH_CHECK(alpha.numel() == 1, "alpha must hold one element (shape (1,) or ()), got shape ", alpha.sizes());
  TORCH_CHECK(at::isFloatingType(alpha.scalar_type()), "alpha must be a floating-point (real) tensor, got ",
              alpha.scalar_type());
  return alpha.reshape({1}).to(acc_dtype(x.scalar_type())).contiguous();
}

Tensor stat_vector(const Tensor& t, const Tensor& x, int64_t n, const char* name) {
  check_same_device(t, x, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.scalar_type() == acc_dtype(x.scalar_type()), name,
              " must be a ", acc_dtype(x.scalar_type()), " tensor of shape (", n, ",), got ", t.scalar_type(),
              " ", t.sizes());
  return t.contiguous();
}

Tensor workspace(const Tensor& x, int64_t rows, int64_t channels) {
  if (x.is_cpu()) return Tensor();
#ifdef SLAB_WITH_CUDA
  return at::empty({static_cast<int64_t>(workspace_bytes_cuda(rows, channels, kernel_dtype(x, "x")))},
                   x.options().dtype(at::kByte));
#else
  (void)rows, (void)channels;
  return Tensor();
#endif
}

void* ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// ---- stage ops -------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> stats_op(const Tensor& x, const OptTensor& mask_in) {
  const auto [rows, channels] = check_x(x);
  const auto mask = check_mask(mask_in, x);
  const Tensor xc = x.contiguous();
  const auto opts = x.options().dtype(acc_dtype(x.scalar_type()));
  Tensor mean = at::empty({channels}, opts), m2 = at::empty({channels}, opts), count = at::empty({1}, opts);
  Tensor ws = workspace(x, rows, channels);
  StatsParams p{kernel_dtype(x, "x"), rows, channels, xc.data_ptr(), mask_ptr(mask),
                mean.data_ptr(), m2.data_ptr(), count.data_ptr(), ptr_or_null(ws)};
  launch(x, p, stats_cpu, SLAB_CUDA_FN(stats_cuda));
  return {mean, m2, count};
}

std::tuple<Tensor, Tensor, Tensor> apply_op(const Tensor& x, const OptTensor& norm_weight,
                                            const OptTensor& norm_bias, const Tensor& bn_weight,
                                            const Tensor& bn_bias, const Tensor& alpha, const Tensor& bn_mean,
                                            const Tensor& bn_rstd, double lam, double norm_eps,
                                            c10::string_view norm_name) {
  const auto [rows, channels] = check_x(x);
  const Norm norm = parse_norm(norm_name);
  check_norm_weight(norm, norm_weight, norm_name);
  TORCH_CHECK_VALUE(norm != Norm::kRms || !norm_bias.has_value(), "norm_bias must be None for norm=\"rms\"");
  check_finite(lam, "lam", /*non_negative=*/false);
  check_finite(norm_eps, "norm_eps", /*non_negative=*/false);
  const auto nw = channel_vector(norm_weight, x, channels, "norm_weight");
  const auto nb = channel_vector(norm_bias, x, channels, "norm_bias");
  const Tensor bw = channel_vector(bn_weight, x, channels, "bn_weight");
  const Tensor bb = channel_vector(bn_bias, x, channels, "bn_bias");
  const Tensor al = alpha_scalar(alpha, x);
  const Tensor mean = stat_vector(bn_mean, x, channels, "bn_mean");
  const Tensor rstd = stat_vector(bn_rstd, x, channels, "bn_rstd");
  const Tensor xc = x.contiguous();
  Tensor y = at::empty_like(xc);
  const auto opts = x.options().dtype(acc_dtype(x.scalar_type()));
  const int64_t row_stats = norm == Norm::kNone ? 0 : rows;
  Tensor row_mean = at::empty({row_stats}, opts), row_rstd = at::empty({row_stats}, opts);
  ApplyParams p{kernel_dtype(x, "x"), norm, rows, channels, xc.data_ptr(), y.data_ptr(),
                data_or_null(nw), data_or_null(nb), bw.data_ptr(), bb.data_ptr(), al.data_ptr(),
                mean.data_ptr(), rstd.data_ptr(), lam, norm_eps, row_mean.data_ptr(), row_rstd.data_ptr()};
  launch(x, p, apply_cpu, SLAB_CUDA_FN(apply_cuda));
  return {y, row_mean, row_rstd};
}

std::tuple<Tensor, Tensor> bwd_reduce_op(const Tensor& dy, const Tensor& x, const Tensor& row_mean,
                                         const Tensor& row_rstd, const Tensor& bn_mean, const Tensor& bn_rstd,
                                         c10::string_view norm_name, const OptTensor& mask_in) {
  const auto [rows, channels] = check_x(x);
  check_same_shape(dy, x, "dy");
  const Norm norm = parse_norm(norm_name);
  const int64_t row_stats = norm == Norm::kNone ? 0 : rows;
  const Tensor rm = stat_vector(row_mean, x, row_stats, "row_mean");
  const Tensor rr = stat_vector(row_rstd, x, row_stats, "row_rstd");
  const Tensor mean = stat_vector(bn_mean, x, channels, "bn_mean");
  const Tensor rstd = stat_vector(bn_rstd, x, channels, "bn_rstd");
  const auto mask = check_mask(mask_in, x);
  const Tensor xc = x.contiguous(), dyc = dy.contiguous();
  const auto opts = x.options().dtype(acc_dtype(x.scalar_type()));
  Tensor sums = at::empty({3, channels}, opts), count = at::empty({1}, opts);
  Tensor ws = workspace(x, rows, channels);
  BwdReduceParams p{kernel_dtype(x, "x"), norm, rows, channels, dyc.data_ptr(), xc.data_ptr(), mask_ptr(mask),
                    rm.data_ptr(), rr.data_ptr(), mean.data_ptr(), rstd.data_ptr(), sums.data_ptr(),
                    count.data_ptr(), ptr_or_null(ws)};
  launch(x, p, bwd_reduce_cpu, SLAB_CUDA_FN(bwd_reduce_cuda));
  return {sums, count};
}

Tensor bwd_apply_op(const Tensor& dy, const Tensor& x, const OptTensor& norm_weight, const Tensor& bn_weight,
                    const Tensor& alpha, const Tensor& row_mean, const Tensor& row_rstd, const Tensor& bn_mean,
                    const Tensor& bn_rstd, const Tensor& sums, const Tensor& count, double lam, bool training,
                    c10::string_view norm_name, const OptTensor& mask_in) {
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
  TORCH_CHECK(sums.dim() == 2 && sums.size(0) == 3 && sums.size(1) == channels &&
                  sums.scalar_type() == acc_dtype(x.scalar_type()),
              "sums must be a ", acc_dtype(x.scalar_type()), " tensor of shape (3, ", channels, "), got ",
              sums.scalar_type(), " ", sums.sizes());
  const Tensor sc = sums.contiguous();
  const Tensor cnt = stat_vector(count, x, 1, "count");
  const auto mask = check_mask(mask_in, x);
  const Tensor xc = x.contiguous(), dyc = dy.contiguous();
  Tensor dx = at::empty_like(xc);
  BwdApplyParams p{kernel_dtype(x, "x"), norm, training, rows, channels, dyc.data_ptr(), xc.data_ptr(),
                   mask_ptr(mask), data_or_null(nw), bw.data_ptr(), al.data_ptr(), rm.data_ptr(), rr.data_ptr(),
                   mean.data_ptr(), rstd.data_ptr(), sc.data_ptr(), cnt.data_ptr(), lam, dx.data_ptr()};
  launch(x, p, bwd_apply_cpu, SLAB_CUDA_FN(bwd_apply_cuda));
  return dx;
}

// ---- fused ops -------------------------------------------------------------------------------

// The running statistics are written in place: they must own their elements and share memory with
// no other argument.
AliasCheck running_stats_alias_check(const Tensor& running_mean, const Tensor& running_var) {
  AliasCheck c;
  c.written(running_mean, "running_mean").written(running_var, "running_var");
  return c;
}

void check_training_count(const Tensor& x, int64_t rows, const OptTensor& mask, const Tensor& count) {
  // Like torch's batch norm: the unbiased running variance needs two values per channel.
  TORCH_CHECK_VALUE(rows > 1, "Expected more than 1 value per channel when training, got x of shape ",
                    x.sizes());
  if (mask.has_value()) {  // the kept count is data: reading it costs a host sync on CUDA
    const double kept = count.item<double>();
    TORCH_CHECK_VALUE(kept > 1, "Expected more than 1 unmasked token when training, got ", kept);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> fwd_op(
    const Tensor& x, const OptTensor& norm_weight, const OptTensor& norm_bias, const Tensor& bn_weight,
    const Tensor& bn_bias, const Tensor& alpha, const Tensor& running_mean, const Tensor& running_var, double lam,
    bool training, double eps, double norm_eps, c10::string_view norm, const OptTensor& mask) {
  const auto [rows, channels] = check_x(x);
  check_finite(eps, "eps");
  const Tensor rmean = channel_vector(running_mean, x, channels, "running_mean");
  const Tensor rvar = channel_vector(running_var, x, channels, "running_var");
  Tensor bn_mean, bn_var, bn_rstd;
  if (training) {
    auto [mean, m2, count] = stats_op(x, mask);
    check_training_count(x, rows, mask, count);
    bn_mean = mean;
    bn_rstd = at::rsqrt(m2 / count + eps);
    bn_var = m2 / (count - 1);
  } else {
    bn_mean = rmean.clone();
    bn_var = rvar.clone();
    bn_rstd = at::rsqrt(rvar + eps);
  }
  auto [y, row_mean, row_rstd] =
      apply_op(x, norm_weight, norm_bias, bn_weight, bn_bias, alpha, bn_mean, bn_rstd, lam, norm_eps, norm);
  return {y, row_mean, row_rstd, bn_mean, bn_rstd, bn_var};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bwd_op(
    const Tensor& dy, const Tensor& x, const OptTensor& norm_weight, const Tensor& bn_weight, const Tensor& alpha,
    const Tensor& row_mean, const Tensor& row_rstd, const Tensor& bn_mean, const Tensor& bn_rstd, double lam,
    bool training, c10::string_view norm, const OptTensor& mask) {
  check_finite(lam, "lam", /*non_negative=*/false);
  auto [sums, count] = bwd_reduce_op(dy, x, row_mean, row_rstd, bn_mean, bn_rstd, norm, mask);
  Tensor dx = bwd_apply_op(dy, x, norm_weight, bn_weight, alpha, row_mean, row_rstd, bn_mean, bn_rstd, sums,
                           count, lam, training, norm, mask);
  const Tensor s_dy = sums[0], s_bn = sums[1], s_norm = sums[2];
  const double one_m = 1.0 - lam;
  Tensor d_alpha = (one_m * (s_bn / bn_rstd + bn_mean * s_dy)).sum().reshape({1});
  return {dx, lam * s_norm, lam * s_dy, one_m * s_bn, one_m * s_dy, d_alpha};
}

// A running statistic (updated in place) or a batch statistic: a real floating tensor shaped like `ref`.
void check_stat(const Tensor& t, const Tensor& ref, const char* name) {
  check_same_device(t, ref, name, "running_mean");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating-point (real) tensor, got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == ref.sizes(), name, " must have the shape ", ref.sizes(), " of running_mean, got ",
              t.sizes());
}

void update_running_stats_op(Tensor& running_mean, Tensor& running_var, const Tensor& mean, const Tensor& var,
                             double momentum) {
  check_unit_interval(momentum, "momentum");
  check_stat(running_mean, running_mean, "running_mean");  // the module's buffers set the shape
  check_stat(running_var, running_mean, "running_var");
  check_stat(mean, running_mean, "mean");
  check_stat(var, running_mean, "var");
  running_stats_alias_check(running_mean, running_var).read(mean, "mean").read(var, "var").check();
  running_mean.lerp_(mean.to(running_mean.scalar_type()), momentum);
  running_var.lerp_(var.to(running_var.scalar_type()), momentum);
}

// ---- the public composites: forward with autograd + the in-place running-stat update -------

// What the public op calls the BatchNorm affine: rep_bn's weight / bias are prep_bn's bn_weight / bn_bias.
struct AffineNames {
  const char* weight;
  const char* bias;
};

Tensor prep_bn_composite(const Tensor& x, const OptTensor& norm_weight, const OptTensor& norm_bias,
                         const Tensor& bn_weight, const Tensor& bn_bias, const Tensor& alpha, Tensor& running_mean,
                         Tensor& running_var, double lam, bool training, double momentum, double eps,
                         double norm_eps, c10::string_view norm, const OptTensor& mask, AffineNames names) {
  static auto fwd = c10::Dispatcher::singleton().findSchemaOrThrow("slab::prep_bn_fwd", "").typed<decltype(fwd_op)>();
  static auto update = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("slab::bn_update_running_stats", "")
                           .typed<decltype(update_running_stats_op)>();
  check_unit_interval(momentum, "momentum");
  if (is_concrete(x)) {
    // The stage ops name the affine bn_weight / bn_bias; check it here under the caller's names.
    const int64_t channels = check_x(x).channels;
    channel_vector(bn_weight, x, channels, names.weight);
    channel_vector(bn_bias, x, channels, names.bias);
    if (training) {
      running_stats_alias_check(running_mean, running_var)
          .read(x, "x").read(norm_weight, "norm_weight").read(norm_bias, "norm_bias").read(bn_weight, names.weight)
          .read(bn_bias, names.bias).read(alpha, "alpha").read(mask, "mask").check();
    }
  }
  auto outs = fwd.call(x, norm_weight, norm_bias, bn_weight, bn_bias, alpha, running_mean, running_var, lam,
                       training, eps, norm_eps, norm, mask);
  if (training) update.call(running_mean, running_var, std::get<3>(outs), std::get<5>(outs), momentum);
  return std::get<0>(outs);
}

Tensor prep_bn(const Tensor& x, const Tensor& norm_weight, const OptTensor& norm_bias, const Tensor& bn_weight,
               const Tensor& bn_bias, const Tensor& alpha, Tensor& running_mean, Tensor& running_var, double lam,
               bool training, double momentum, double eps, double norm_eps, c10::string_view norm,
               const OptTensor& mask) {
  TORCH_CHECK_VALUE(norm == "layer" || norm == "rms", "norm must be \"layer\" or \"rms\", got \"", norm, "\"");
  return prep_bn_composite(x, norm_weight, norm_bias, bn_weight, bn_bias, alpha, running_mean, running_var, lam,
                           training, momentum, eps, norm_eps, norm, mask, {"bn_weight", "bn_bias"});
}

Tensor rep_bn(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& alpha, Tensor& running_mean,
              Tensor& running_var, bool training, double momentum, double eps, const OptTensor& mask) {
  return prep_bn_composite(x, std::nullopt, std::nullopt, weight, bias, alpha, running_mean, running_var, 0.0,
                           training, momentum, eps, 0.0, "none", mask, {"weight", "bias"});
}

}  // namespace
}  // namespace slab::prepbn

TORCH_LIBRARY_FRAGMENT(slab, m) {
  m.def(
      "rep_bn(Tensor x, Tensor weight, Tensor bias, Tensor alpha, Tensor(a!) running_mean, "
      "Tensor(b!) running_var, bool training, float momentum=0.1, float eps=1e-05, Tensor? mask=None) -> Tensor");
  m.def(
      "prep_bn(Tensor x, Tensor norm_weight, Tensor? norm_bias, Tensor bn_weight, Tensor bn_bias, Tensor alpha, "
      "Tensor(a!) running_mean, Tensor(b!) running_var, float lam, bool training, float momentum=0.1, "
      "float eps=1e-05, float norm_eps=1e-06, str norm=\"layer\", Tensor? mask=None) -> Tensor");
  m.def(
      "prep_bn_fwd(Tensor x, Tensor? norm_weight, Tensor? norm_bias, Tensor bn_weight, Tensor bn_bias, "
      "Tensor alpha, Tensor running_mean, Tensor running_var, float lam, bool training, float eps, "
      "float norm_eps, str norm, Tensor? mask) -> (Tensor y, Tensor row_mean, Tensor row_rstd, Tensor bn_mean, "
      "Tensor bn_rstd, Tensor bn_var)");
  m.def(
      "prep_bn_bwd(Tensor dy, Tensor x, Tensor? norm_weight, Tensor bn_weight, Tensor alpha, Tensor row_mean, "
      "Tensor row_rstd, Tensor bn_mean, Tensor bn_rstd, float lam, bool training, str norm, Tensor? mask) -> "
      "(Tensor dx, Tensor d_norm_weight, Tensor d_norm_bias, Tensor d_bn_weight, Tensor d_bn_bias, "
      "Tensor d_alpha)");
  m.def("prep_bn_stats(Tensor x, Tensor? mask) -> (Tensor mean, Tensor m2, Tensor count)");
  m.def(
      "prep_bn_apply(Tensor x, Tensor? norm_weight, Tensor? norm_bias, Tensor bn_weight, Tensor bn_bias, "
      "Tensor alpha, Tensor bn_mean, Tensor bn_rstd, float lam, float norm_eps, str norm) -> "
      "(Tensor y, Tensor row_mean, Tensor row_rstd)");
  m.def(
      "prep_bn_bwd_reduce(Tensor dy, Tensor x, Tensor row_mean, Tensor row_rstd, Tensor bn_mean, "
      "Tensor bn_rstd, str norm, Tensor? mask) -> (Tensor sums, Tensor count)");
  m.def(
      "prep_bn_bwd_apply(Tensor dy, Tensor x, Tensor? norm_weight, Tensor bn_weight, Tensor alpha, "
      "Tensor row_mean, Tensor row_rstd, Tensor bn_mean, Tensor bn_rstd, Tensor sums, Tensor count, float lam, "
      "bool training, str norm, Tensor? mask) -> Tensor");
  m.def(
      "bn_update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, "
      "float momentum) -> ()");
}

TORCH_LIBRARY_IMPL(slab, CompositeImplicitAutograd, m) {
  m.impl("rep_bn", &slab::prepbn::rep_bn);
  m.impl("prep_bn", &slab::prepbn::prep_bn);
}

TORCH_LIBRARY_IMPL(slab, CompositeExplicitAutograd, m) {
  m.impl("bn_update_running_stats", &slab::prepbn::update_running_stats_op);
}

#define SLAB_PREPBN_KERNELS(m)                                 \
  m.impl("prep_bn_fwd", &slab::prepbn::fwd_op);                \
  m.impl("prep_bn_bwd", &slab::prepbn::bwd_op);                \
  m.impl("prep_bn_stats", &slab::prepbn::stats_op);            \
  m.impl("prep_bn_apply", &slab::prepbn::apply_op);            \
  m.impl("prep_bn_bwd_reduce", &slab::prepbn::bwd_reduce_op); \
  m.impl("prep_bn_bwd_apply", &slab::prepbn::bwd_apply_op)

TORCH_LIBRARY_IMPL(slab, CPU, m) { SLAB_PREPBN_KERNELS(m); }

#ifdef SLAB_WITH_CUDA
TORCH_LIBRARY_IMPL(slab, CUDA, m) { SLAB_PREPBN_KERNELS(m); }
#else
TORCH_LIBRARY_IMPL(slab, CUDA, m) {
  slab::register_cuda_unavailable(
      m, {"prep_bn_fwd", "prep_bn_bwd", "prep_bn_stats", "prep_bn_apply", "prep_bn_bwd_reduce", "prep_bn_bwd_apply"});
}
#endif
