// Fused optimizer ops: schemas, list checks, and the CPU/CUDA bindings of the multi-tensor engine
// (optim.h). The optimizers (python/slab/optim/) call these once per (device, dtype) group of a
// param group; the small scalar rules (DoG's rbar/G/eta) run as tensor ops on the device between
// them, so a step never synchronises with the host.
#include <ATen/ATen.h>

#include <cmath>
#include <string>
#include <vector>

#include "core/binding.h"
#include "optim/optim.h"

namespace slab::optim {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using TensorVec = std::vector<Tensor>;

std::string item(const char* name, size_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

// Host arrays behind a TensorList; keeps the (contiguous) tensors alive for the launch.
struct ListView {
  TensorVec tensors;
  std::vector<int64_t> numel;
  std::vector<void*> data;
  TensorList list() const { return {static_cast<int64_t>(tensors.size()), numel.data(), data.data()}; }
};

ListView view_of(TensorVec tensors) {
  ListView v;
  for (auto& t : tensors) {
    v.numel.push_back(t.numel());
    v.data.push_back(t.data_ptr());
  }
  v.tensors = std::move(tensors);
  return v;
}

// The list that sets device and dtype for the rest: dense, floating, one device and dtype.
DType check_lead(at::TensorList ts, const char* name) {
  TORCH_CHECK_VALUE(!ts.empty(), name, " must hold at least one tensor");
  for (size_t i = 0; i < ts.size(); ++i) {
    const auto n = item(name, i);
    check_defined(ts[i], n.c_str());  // a C++ caller's undefined element; Python refuses None itself
    TORCH_CHECK(ts[i].layout() == at::kStrided, n, " must be a dense (strided) tensor, got layout ",
                ts[i].layout(), "; sparse gradients are not supported");
    TORCH_CHECK(ts[i].device() == ts[0].device(), n, " is on ", ts[i].device(), " but ", name, "[0] is on ",
                ts[0].device(), "; one call takes one device");
    TORCH_CHECK(ts[i].scalar_type() == ts[0].scalar_type(), n, " has dtype ", ts[i].scalar_type(), " but ", name,
                "[0] has ", ts[0].scalar_type(), "; one call takes one dtype");
  }
  return kernel_dtype(ts[0], item(name, 0).c_str());
}

// A list matching `lead` element-wise in shape, on its device, of dtype `dtype`.
void check_like(at::TensorList ts, at::TensorList lead, at::ScalarType dtype, const char* name,
                const char* lead_name) {
  TORCH_CHECK_VALUE(ts.size() == lead.size(), name, " must hold ", lead.size(), " tensors (one per ", lead_name,
                    "), got ", ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    const auto n = item(name, i);
    check_defined(ts[i], n.c_str());
    TORCH_CHECK(ts[i].layout() == at::kStrided, n, " must be a dense (strided) tensor, got layout ",
                ts[i].layout(), "; sparse gradients are not supported");
    check_same_device(ts[i], lead[i], n.c_str());
    TORCH_CHECK(ts[i].sizes() == lead[i].sizes(), n, " must have the shape of ", lead_name, "[", i, "] ",
                lead[i].sizes(), ", got ", ts[i].sizes());
    TORCH_CHECK(ts[i].scalar_type() == dtype, n, " must be ", dtype, ", got ", ts[i].scalar_type());
  }
}

// A one-element float32 tensor on the device of `like` (GradScaler's scale / found_inf).
const float* scalar_f32(const OptTensor& t, const Tensor& like, const char* name) {
  if (!t.has_value()) return nullptr;
  check_same_device(*t, like, name);
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat, name,
              " must be a float32 tensor with one element, got ", t->scalar_type(), " ", t->sizes());
  return t->data_ptr<float>();
}

// A vector of `n` accumulation-type values on the device of `like`.
Tensor acc_vector(const Tensor& t, const Tensor& like, int64_t n, const char* name) {
  check_same_device(t, like, name);
  const auto acc = acc_dtype(like.scalar_type());
  TORCH_CHECK(t.numel() == n && t.scalar_type() == acc, name, " must be a ", acc, " tensor of ", n,
              " elements, got ", t.scalar_type(), " ", t.sizes());
  return t.reshape({n}).contiguous();
}

// LAMB's and AdamP's bias corrections: per tensor [1 / bc1, 1 / sqrt(bc2)] (each tensor counts its
// own steps), shape (n, 2), accumulation type, on the device of `like`.
Tensor bias_corrections(const Tensor& t, const Tensor& like, int64_t n) {
  check_same_device(t, like, "bias_corr");
  const auto acc = acc_dtype(like.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == n && t.size(1) == 2 && t.scalar_type() == acc,
              "bias_corr must be a ", acc, " tensor of shape (", n, ", 2) (one row per tensor), got ",
              t.scalar_type(), " ", t.sizes());
  return t.contiguous();
}

TensorVec contiguous(at::TensorList ts) {
  TensorVec out;
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

// In-place lists: kernels write contiguous buffers; non-contiguous tensors get a temporary that
// is copied back after the launch.
struct InPlace {
  TensorVec orig;
  ListView view;
  explicit InPlace(at::TensorList ts) : orig(ts.begin(), ts.end()), view(view_of(contiguous(ts))) {}
  void write_back() {
    for (size_t i = 0; i < orig.size(); ++i)
      if (!orig[i].is_same(view.tensors[i])) orig[i].copy_(view.tensors[i]);
  }
};

Tensor workspace(const Tensor& like, const TensorList& l) {
  if (like.is_cpu()) return Tensor();
  return at::empty({workspace_floats(l)}, like.options().dtype(acc_dtype(like.scalar_type())));
}

void* ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// ---- ops ---------------------------------------------------------------------------------------
// Every in-place op checks all its arguments, then (AliasCheck) that what it writes owns its
// elements and shares no memory with any other argument, before it copies or writes anything.

Tensor sq_norm_op(at::TensorList a, const std::optional<at::TensorList>& b, double weight_decay,
                  const OptTensor& grad_scale) {
  const DType dt = check_lead(a, "tensors");
  check_finite(weight_decay, "weight_decay", false);
  if (b.has_value() && !b->empty()) check_like(*b, a, a[0].scalar_type(), "others", "tensors");
  TORCH_CHECK_VALUE(weight_decay == 0 || (b.has_value() && !b->empty()),
                    "weight_decay needs the `others` list (the parameters)");
  const ListView av = view_of(contiguous(a));
  const ListView bv = b.has_value() ? view_of(contiguous(*b)) : ListView{};
  Tensor out = at::empty({static_cast<int64_t>(a.size())}, a[0].options().dtype(acc_dtype(a[0].scalar_type())));
  Tensor ws = workspace(a[0], av.list());
  SqNormParams p{dt, av.list(), bv.list(), weight_decay, scalar_f32(grad_scale, a[0], "grad_scale"),
                 out.data_ptr(), ptr_or_null(ws)};
  launch(a[0], p, sq_norm_cpu, SLAB_CUDA_FN(sq_norm_cuda));
  return out;
}

void dog_update_op(at::TensorList params, at::TensorList grads, at::TensorList x0, const Tensor& eta,
                   at::TensorList dist2, double weight_decay, bool maximize, const OptTensor& grad_scale,
                   const OptTensor& found_inf) {
  const DType dt = check_lead(params, "params");
  const auto acc = acc_dtype(params[0].scalar_type());
  check_like(grads, params, params[0].scalar_type(), "grads", "params");
  check_like(x0, params, acc, "x0", "params");
  check_finite(weight_decay, "weight_decay");
  const int64_t n = static_cast<int64_t>(params.size());
  const Tensor eta_c = acc_vector(eta, params[0], n, "eta");
  TORCH_CHECK_VALUE(static_cast<int64_t>(dist2.size()) == n, "dist2 must hold ", n, " tensors, got ", dist2.size());
  std::vector<void*> dist2_ptr;
  for (size_t i = 0; i < dist2.size(); ++i) {
    const auto name = item("dist2", i);
    check_same_device(dist2[i], params[0], name.c_str());
    TORCH_CHECK(dist2[i].numel() == 1 && dist2[i].scalar_type() == acc && dist2[i].is_contiguous(), name,
                " must be a contiguous ", acc, " tensor with one element, got ", dist2[i].scalar_type(), " ",
                dist2[i].sizes());
    dist2_ptr.push_back(dist2[i].data_ptr());
  }
  const float* gs = scalar_f32(grad_scale, params[0], "grad_scale");
  const float* fi = scalar_f32(found_inf, params[0], "found_inf");
  AliasCheck()
      .written(params, "params")
      .written(dist2, "dist2")
      .read(grads, "grads")
      .read(x0, "x0")
      .read(eta, "eta")
      .read(grad_scale, "grad_scale")
      .read(found_inf, "found_inf")
      .check();
  InPlace x(params);
  const ListView gv = view_of(contiguous(grads)), x0v = view_of(contiguous(x0));
  Tensor ws = workspace(params[0], x.view.list());
  DogUpdateParams p{dt, x.view.list(), gv.list(), x0v.list(), dist2_ptr.data(), eta_c.data_ptr(), weight_decay,
                    maximize, gs, fi, ptr_or_null(ws)};
  launch(params[0], p, dog_update_cpu, SLAB_CUDA_FN(dog_update_cuda));
  x.write_back();
}

void check_beta(double beta, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta >= 0 && beta < 1, name, " must be in [0, 1), got ", beta);
}

void lion_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, const Tensor& lr, double beta1,
             double beta2, double weight_decay, bool maximize, const OptTensor& grad_scale,
             const OptTensor& found_inf) {
  const DType dt = check_lead(params, "params");
  check_like(grads, params, params[0].scalar_type(), "grads", "params");
  check_like(exp_avgs, params, acc_dtype(params[0].scalar_type()), "exp_avgs", "params");
  check_beta(beta1, "beta1");
  check_beta(beta2, "beta2");
  check_finite(weight_decay, "weight_decay");
  const Tensor lr_c = acc_vector(lr, params[0], 1, "lr");
  const float* gs = scalar_f32(grad_scale, params[0], "grad_scale");
  const float* fi = scalar_f32(found_inf, params[0], "found_inf");
  AliasCheck()
      .written(params, "params")
      .written(exp_avgs, "exp_avgs")
      .read(grads, "grads")
      .read(lr, "lr")
      .read(grad_scale, "grad_scale")
      .read(found_inf, "found_inf")
      .check();
  InPlace x(params), m(exp_avgs);
  const ListView gv = view_of(contiguous(grads));
  LionParams p{dt, x.view.list(), gv.list(), m.view.list(), lr_c.data_ptr(), beta1, beta2, weight_decay, maximize,
               gs, fi};
  launch(params[0], p, lion_cpu, SLAB_CUDA_FN(lion_cuda));
  x.write_back();
  m.write_back();
}

LambParams lamb_params(at::TensorList params, const Tensor& bias_corr, double beta1, double beta2, double eps,
                       double weight_decay, bool maximize, const OptTensor& grad_scale, const OptTensor& found_inf,
                       Tensor& bc_keep) {
  check_beta(beta1, "beta1");
  check_beta(beta2, "beta2");
  check_finite(eps, "eps");
  check_finite(weight_decay, "weight_decay");
  bc_keep = bias_corrections(bias_corr, params[0], static_cast<int64_t>(params.size()));
  return LambParams{kernel_dtype(params[0], "params"), {}, {}, {}, {}, bc_keep.data_ptr(), beta1, beta2, eps,
                    weight_decay, maximize, scalar_f32(grad_scale, params[0], "grad_scale"),
                    scalar_f32(found_inf, params[0], "found_inf"), nullptr, nullptr, nullptr};
}

// The first stage of LAMB and AdamP writes the moments and reads everything else.
void check_stage1_aliases(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, const Tensor& bias_corr, const OptTensor& grad_scale,
                          const OptTensor& found_inf) {
  AliasCheck()
      .written(exp_avgs, "exp_avgs")
      .written(exp_avg_sqs, "exp_avg_sqs")
      .read(params, "params")
      .read(grads, "grads")
      .read(bias_corr, "bias_corr")
      .read(grad_scale, "grad_scale")
      .read(found_inf, "found_inf")
      .check();
}

Tensor lamb_stage1_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, const Tensor& bias_corr, double beta1, double beta2, double eps,
                      double weight_decay, bool maximize, const OptTensor& grad_scale, const OptTensor& found_inf) {
  check_lead(params, "params");
  const auto acc = acc_dtype(params[0].scalar_type());
  check_like(grads, params, params[0].scalar_type(), "grads", "params");
  check_like(exp_avgs, params, acc, "exp_avgs", "params");
  check_like(exp_avg_sqs, params, acc, "exp_avg_sqs", "params");
  Tensor bc;
  LambParams p = lamb_params(params, bias_corr, beta1, beta2, eps, weight_decay, maximize, grad_scale, found_inf, bc);
  check_stage1_aliases(params, grads, exp_avgs, exp_avg_sqs, bias_corr, grad_scale, found_inf);
  const ListView xv = view_of(contiguous(params)), gv = view_of(contiguous(grads));
  InPlace m(exp_avgs), v(exp_avg_sqs);
  Tensor norms = at::empty({static_cast<int64_t>(params.size()), 2}, params[0].options().dtype(acc));
  Tensor ws;
  if (!params[0].is_cpu()) ws = at::empty({2 * workspace_floats(xv.list())}, params[0].options().dtype(acc));
  p.x = xv.list(), p.g = gv.list(), p.m = m.view.list(), p.v = v.view.list();
  p.norms = norms.data_ptr();
  p.workspace = ptr_or_null(ws);
  launch(params[0], p, lamb_stage1_cpu, SLAB_CUDA_FN(lamb_stage1_cuda));
  m.write_back();
  v.write_back();
  return norms;
}

void lamb_stage2_op(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    const Tensor& bias_corr, const Tensor& lr, double beta1, double beta2, double eps,
                    double weight_decay, const OptTensor& found_inf) {
  check_lead(params, "params");
  const auto acc = acc_dtype(params[0].scalar_type());
  check_like(exp_avgs, params, acc, "exp_avgs", "params");
  check_like(exp_avg_sqs, params, acc, "exp_avg_sqs", "params");
  Tensor bc;
  LambParams p = lamb_params(params, bias_corr, beta1, beta2, eps, weight_decay, false, std::nullopt, found_inf, bc);
  const Tensor lr_c = acc_vector(lr, params[0], static_cast<int64_t>(params.size()), "lr");
  AliasCheck()
      .written(params, "params")
      .read(exp_avgs, "exp_avgs")
      .read(exp_avg_sqs, "exp_avg_sqs")
      .read(bias_corr, "bias_corr")
      .read(lr, "lr")
      .read(found_inf, "found_inf")
      .check();
  InPlace x(params);
  const ListView mv = view_of(contiguous(exp_avgs)), vv = view_of(contiguous(exp_avg_sqs));
  p.x = x.view.list(), p.m = mv.list(), p.v = vv.list();
  p.lr = lr_c.data_ptr();
  launch(params[0], p, lamb_stage2_cpu, SLAB_CUDA_FN(lamb_stage2_cuda));
  x.write_back();
}

void momentum_op(at::TensorList params, at::TensorList grads, at::TensorList bufs, const Tensor& scale,
                 const Tensor& lr, double momentum, double weight_decay, bool maximize, const OptTensor& grad_scale,
                 const OptTensor& found_inf) {
  const DType dt = check_lead(params, "params");
  const auto acc = acc_dtype(params[0].scalar_type());
  check_like(grads, params, params[0].scalar_type(), "grads", "params");
  check_like(bufs, params, acc, "momentum_buffers", "params");
  check_beta(momentum, "momentum");
  check_finite(weight_decay, "weight_decay");
  const Tensor scale_c = acc_vector(scale, params[0], static_cast<int64_t>(params.size()), "scale");
  const Tensor lr_c = acc_vector(lr, params[0], 1, "lr");
  const float* gs = scalar_f32(grad_scale, params[0], "grad_scale");
  const float* fi = scalar_f32(found_inf, params[0], "found_inf");
  AliasCheck()
      .written(params, "params")
      .written(bufs, "momentum_buffers")
      .read(grads, "grads")
      .read(scale, "scale")
      .read(lr, "lr")
      .read(grad_scale, "grad_scale")
      .read(found_inf, "found_inf")
      .check();
  InPlace x(params), b(bufs);
  const ListView gv = view_of(contiguous(grads));
  MomentumParams p{dt, x.view.list(), gv.list(), b.view.list(), scale_c.data_ptr(), lr_c.data_ptr(), momentum,
                   weight_decay, maximize, gs, fi};
  launch(params[0], p, momentum_cpu, SLAB_CUDA_FN(momentum_cuda));
  x.write_back();
  b.write_back();
}

// Rows of AdamP's channel view: size(0) for 2+-D tensors, one row otherwise.
std::vector<int64_t> rows_of(at::TensorList params) {
  std::vector<int64_t> rows;
  for (const auto& t : params) rows.push_back(t.dim() > 1 ? t.size(0) : 1);
  return rows;
}

AdamPParams adamp_params(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, const Tensor& bias_corr, double beta1, double beta2, double eps,
                         bool nesterov, bool maximize, const OptTensor& grad_scale, const OptTensor& found_inf,
                         Tensor& bc_keep) {
  const DType dt = check_lead(params, "params");
  const auto acc = acc_dtype(params[0].scalar_type());
  check_like(grads, params, params[0].scalar_type(), "grads", "params");
  check_like(exp_avgs, params, acc, "exp_avgs", "params");
  check_like(exp_avg_sqs, params, acc, "exp_avg_sqs", "params");
  check_beta(beta1, "beta1");
  check_beta(beta2, "beta2");
  check_finite(eps, "eps");
  bc_keep = bias_corrections(bias_corr, params[0], static_cast<int64_t>(params.size()));
  return AdamPParams{dt, {}, {}, {}, {}, nullptr, bc_keep.data_ptr(), beta1, beta2, eps, nesterov,
                     maximize, scalar_f32(grad_scale, params[0], "grad_scale"),
                     scalar_f32(found_inf, params[0], "found_inf"), nullptr, nullptr, nullptr, nullptr};
}

Tensor adamp_stage1_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, const Tensor& bias_corr, double beta1, double beta2, double eps,
                       bool nesterov, bool maximize, const OptTensor& grad_scale, const OptTensor& found_inf) {
  Tensor bc;
  AdamPParams p = adamp_params(params, grads, exp_avgs, exp_avg_sqs, bias_corr, beta1, beta2, eps, nesterov, maximize,
                               grad_scale, found_inf, bc);
  check_stage1_aliases(params, grads, exp_avgs, exp_avg_sqs, bias_corr, grad_scale, found_inf);
  const auto rows = rows_of(params);
  int64_t total = 0;
  for (int64_t r : rows) total += r;
  const ListView xv = view_of(contiguous(params)), gv = view_of(contiguous(grads));
  InPlace m(exp_avgs), v(exp_avg_sqs);
  Tensor sums = at::empty({total, 4}, params[0].options().dtype(acc_dtype(params[0].scalar_type())));
  p.x = xv.list(), p.g = gv.list(), p.m = m.view.list(), p.v = v.view.list();
  p.rows = rows.data();
  p.row_sums = sums.data_ptr();
  launch(params[0], p, adamp_stage1_cpu, SLAB_CUDA_FN(adamp_stage1_cuda));
  m.write_back();
  v.write_back();
  return sums;
}

void adamp_stage2_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     const Tensor& bias_corr, const Tensor& coef, const Tensor& decay, const Tensor& lr,
                     double beta1, double beta2, double eps, bool nesterov, bool maximize,
                     const OptTensor& grad_scale, const OptTensor& found_inf) {
  Tensor bc;
  AdamPParams p = adamp_params(params, grads, exp_avgs, exp_avg_sqs, bias_corr, beta1, beta2, eps, nesterov, maximize,
                               grad_scale, found_inf, bc);
  const auto rows = rows_of(params);
  int64_t total = 0;
  for (int64_t r : rows) total += r;
  const Tensor coef_c = acc_vector(coef, params[0], total, "coef");
  const Tensor decay_c = acc_vector(decay, params[0], static_cast<int64_t>(params.size()), "decay");
  const Tensor lr_c = acc_vector(lr, params[0], 1, "lr");
  AliasCheck()
      .written(params, "params")
      .read(grads, "grads")
      .read(exp_avgs, "exp_avgs")
      .read(exp_avg_sqs, "exp_avg_sqs")
      .read(bias_corr, "bias_corr")
      .read(coef, "coef")
      .read(decay, "decay")
      .read(lr, "lr")
      .read(grad_scale, "grad_scale")
      .read(found_inf, "found_inf")
      .check();
  InPlace x(params);
  const ListView gv = view_of(contiguous(grads)), mv = view_of(contiguous(exp_avgs)),
                 vv = view_of(contiguous(exp_avg_sqs));
  p.x = x.view.list(), p.g = gv.list(), p.m = mv.list(), p.v = vv.list();
  p.rows = rows.data();
  p.coef = coef_c.data_ptr(), p.decay = decay_c.data_ptr(), p.lr = lr_c.data_ptr();
  launch(params[0], p, adamp_stage2_cpu, SLAB_CUDA_FN(adamp_stage2_cuda));
  x.write_back();
}

void lerp_op(at::TensorList avg, at::TensorList x, double weight) {
  const DType dt = check_lead(avg, "avg");
  check_like(x, avg, avg[0].scalar_type(), "x", "avg");
  check_unit_interval(weight, "weight");
  AliasCheck().written(avg, "avg").read(x, "x").check();
  InPlace a(avg);
  const ListView xv = view_of(contiguous(x));
  LerpParams p{dt, a.view.list(), xv.list(), weight};
  launch(avg[0], p, lerp_cpu, SLAB_CUDA_FN(lerp_cuda));
  a.write_back();
}

}  // namespace
}  // namespace slab::optim

TORCH_LIBRARY_FRAGMENT(slab, m) {
  m.def(
      "multi_tensor_sq_norm(Tensor[] tensors, Tensor[]? others=None, float weight_decay=0.0, "
      "Tensor? grad_scale=None) -> Tensor");
  m.def(
      "dog_update_(Tensor(a!)[] params, Tensor[] grads, Tensor[] x0, Tensor eta, Tensor(b!)[] dist2, "
      "float weight_decay=0.0, bool maximize=False, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def(
      "lion_update_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor lr, float beta1, "
      "float beta2, float weight_decay=0.0, bool maximize=False, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
  m.def("multi_tensor_lerp_(Tensor(a!)[] avg, Tensor[] x, float weight) -> ()");
  m.def(
      "lamb_stage1_(Tensor[] params, Tensor[] grads, Tensor(a!)[] exp_avgs, Tensor(b!)[] exp_avg_sqs, "
      "Tensor bias_corr, float beta1, float beta2, float eps, float weight_decay, bool maximize=False, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> Tensor");
  m.def(
      "lamb_stage2_(Tensor(a!)[] params, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, Tensor bias_corr, Tensor lr, "
      "float beta1, float beta2, float eps, float weight_decay, Tensor? found_inf=None) -> ()");
  m.def(
      "momentum_update_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor scale, "
      "Tensor lr, float momentum, float weight_decay=0.0, bool maximize=False, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
  m.def(
      "adamp_stage1_(Tensor[] params, Tensor[] grads, Tensor(a!)[] exp_avgs, Tensor(b!)[] exp_avg_sqs, "
      "Tensor bias_corr, float beta1, float beta2, float eps, bool nesterov=False, bool maximize=False, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> Tensor");
  m.def(
      "adamp_stage2_(Tensor(a!)[] params, Tensor[] grads, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, Tensor bias_corr, "
      "Tensor coef, Tensor decay, Tensor lr, float beta1, float beta2, float eps, bool nesterov=False, "
      "bool maximize=False, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
}

#define SLAB_OPTIM_KERNELS(m)                                         \
  m.impl("multi_tensor_sq_norm", &slab::optim::sq_norm_op);           \
  m.impl("dog_update_", &slab::optim::dog_update_op);                 \
  m.impl("lion_update_", &slab::optim::lion_op);                      \
  m.impl("multi_tensor_lerp_", &slab::optim::lerp_op);                \
  m.impl("lamb_stage1_", &slab::optim::lamb_stage1_op);               \
  m.impl("lamb_stage2_", &slab::optim::lamb_stage2_op);               \
  m.impl("momentum_update_", &slab::optim::momentum_op);              \
  m.impl("adamp_stage1_", &slab::optim::adamp_stage1_op);             \
  m.impl("adamp_stage2_", &slab::optim::adamp_stage2_op)

TORCH_LIBRARY_IMPL(slab, CPU, m) { SLAB_OPTIM_KERNELS(m); }

#ifdef SLAB_WITH_CUDA
TORCH_LIBRARY_IMPL(slab, CUDA, m) { SLAB_OPTIM_KERNELS(m); }
#else
TORCH_LIBRARY_IMPL(slab, CUDA, m) {
  slab::register_cuda_unavailable(m, {"multi_tensor_sq_norm", "dog_update_", "lion_update_", "multi_tensor_lerp_",
                                      "lamb_stage1_", "lamb_stage2_", "momentum_update_", "adamp_stage1_",
                                      "adamp_stage2_"});
}
#endif
