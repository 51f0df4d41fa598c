// Fused optimizer ops: schemas, list checks, and the CPU/CUDA bindings of the multi-tensor engine
// (optim.h). The optimizers (python/slab/optim/) call these once per (device, dtype) group of a
// param group; the small scalar rules (DoG's rbar/G/eta) run as tensor ops on the device between
// them, so a step never synchronises with the host. On torch's stable ABI (core/binding.h);
// fake tensors are registered in python/slab/ops/optim.py.
#include <cmath>
#include <string>
#include <vector>

#include "core/binding.h"
#include "optim/optim.h"

namespace slab::optim {
namespace {

using TensorVec = std::vector<Tensor>;
using OptTensorVec = std::optional<TensorVec>;
using torch::headeronly::Layout;

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

const char* layout_name(Layout l) {
  switch (l) {
    case Layout::Strided:
      return "Strided";
    case Layout::Sparse:
      return "Sparse";
    case Layout::SparseCsr:
      return "SparseCsr";
    case Layout::Mkldnn:
      return "Mkldnn";
    case Layout::SparseCsc:
      return "SparseCsc";
    case Layout::SparseBsr:
      return "SparseBsr";
    case Layout::SparseBsc:
      return "SparseBsc";
    case Layout::Jagged:
      return "Jagged";
    default:
      return "unknown";
  }
}

void check_dense(const Tensor& t, const std::string& name) {
  SLAB_CHECK(t.layout() == Layout::Strided, name, " must be a dense (strided) tensor, got layout ",
             layout_name(t.layout()), "; sparse gradients are not supported");
}

// The list that sets device and dtype for the rest: dense, floating, one device and dtype.
DType check_lead(const TensorVec& ts, const char* name) {
  SLAB_CHECK(!ts.empty(), name, " must hold at least one tensor");
  for (size_t i = 0; i < ts.size(); ++i) {
    const auto n = item(name, i);
    check_defined(ts[i], n.c_str());  // a C++ caller's undefined element; Python refuses None itself
    check_dense(ts[i], n);
    SLAB_CHECK(ts[i].device() == ts[0].device(), n, " is on ", ts[i].device(), " but ", name, "[0] is on ",
               ts[0].device(), "; one call takes one device");
    SLAB_CHECK(ts[i].scalar_type() == ts[0].scalar_type(), n, " has dtype ", ts[i].scalar_type(), " but ", name,
               "[0] has ", ts[0].scalar_type(), "; one call takes one dtype");
  }
  return kernel_dtype(ts[0], item(name, 0).c_str());
}

// A list matching `lead` element-wise in shape, on its device, of dtype `dtype`.
void check_like(const TensorVec& ts, const TensorVec& lead, ScalarType dtype, const char* name, const char* lead_name) {
  SLAB_CHECK(ts.size() == lead.size(), name, " must hold ", lead.size(), " tensors (one per ", lead_name, "), got ",
             ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    const auto n = item(name, i);
    check_defined(ts[i], n.c_str());
    check_dense(ts[i], n);
    check_same_device(ts[i], lead[i], n.c_str());
    SLAB_CHECK(ts[i].sizes().equals(lead[i].sizes()), n, " must have the shape of ", lead_name, "[", i, "] ",
               lead[i].sizes(), ", got ", ts[i].sizes());
    SLAB_CHECK(ts[i].scalar_type() == dtype, n, " must be ", dtype, ", got ", ts[i].scalar_type());
  }
}

// A one-element float32 tensor on the device of `like` (GradScaler's scale / found_inf).
const float* scalar_f32(const OptTensor& t, const Tensor& like, const char* name) {
  if (!t.has_value()) return nullptr;
  check_same_device(*t, like, name);
  SLAB_CHECK(t->numel() == 1 && t->scalar_type() == ScalarType::Float, name,
             " must be a float32 tensor with one element, got ", t->scalar_type(), " ", t->sizes());
  return t->const_data_ptr<float>();
}

// A vector of `n` accumulation-type values on the device of `like`.
Tensor acc_vector(const Tensor& t, const Tensor& like, int64_t n, const char* name) {
  check_same_device(t, like, name);
  const ScalarType acc = acc_dtype(like.scalar_type());
  SLAB_CHECK(t.numel() == n && t.scalar_type() == acc, name, " must be a ", acc, " tensor of ", n, " elements, got ",
             t.scalar_type(), " ", t.sizes());
  return as_contiguous(torch::stable::reshape(t, {n}));
}

// LAMB's and AdamP's bias corrections: per tensor [1 / bc1, 1 / sqrt(bc2)] (each tensor counts its
// own steps), shape (n, 2), accumulation type, on the device of `like`.
Tensor bias_corrections(const Tensor& t, const Tensor& like, int64_t n) {
  check_same_device(t, like, "bias_corr");
  const ScalarType acc = acc_dtype(like.scalar_type());
  SLAB_CHECK(t.dim() == 2 && t.size(0) == n && t.size(1) == 2 && t.scalar_type() == acc, "bias_corr must be a ", acc,
             " tensor of shape (", n, ", 2) (one row per tensor), got ", t.scalar_type(), " ", t.sizes());
  return as_contiguous(t);
}

TensorVec contiguous_list(const TensorVec& ts) {
  TensorVec out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(as_contiguous(t));
  return out;
}

// In-place lists: kernels write contiguous buffers; non-contiguous tensors get a temporary that
// is copied back after the launch.
struct InPlace {
  TensorVec orig;
  ListView view;
  std::vector<bool> copied;  // view.tensors[i] is a temporary, not orig[i] itself
  explicit InPlace(const TensorVec& ts) : orig(ts), view(view_of(contiguous_list(ts))) {
    for (size_t i = 0; i < orig.size(); ++i) copied.push_back(view.tensors[i].data_ptr() != orig[i].data_ptr());
  }
  void write_back() {
    for (size_t i = 0; i < orig.size(); ++i)
      if (copied[i]) torch::stable::copy_(orig[i], view.tensors[i]);
  }
};

// The partial sums of the CUDA reductions; the CPU kernels need none.
Tensor workspace(const Tensor& like, const TensorList& l, int64_t per_chunk = 1) {
#ifdef SLAB_WITH_CUDA
  return empty({per_chunk * workspace_elems(l)}, acc_dtype(like.scalar_type()), like.device());
#else
  (void)like, (void)l, (void)per_chunk;
  return Tensor();
#endif
}

// ---- ops ---------------------------------------------------------------------------------------
// Every in-place op checks all its arguments, then (AliasCheck) that what it writes owns its
// elements and shares no memory with any other argument, before it copies or writes anything.

Tensor sq_norm_op(const TensorVec& a, const OptTensorVec& b, double weight_decay, const OptTensor& grad_scale) {
  const DType dt = check_lead(a, "tensors");
  check_finite(weight_decay, "weight_decay", false);
  if (b.has_value() && !b->empty()) check_like(*b, a, a[0].scalar_type(), "others", "tensors");
  SLAB_CHECK(weight_decay == 0 || (b.has_value() && !b->empty()),
             "weight_decay needs the `others` list (the parameters)");
  const ListView av = view_of(contiguous_list(a));
  const ListView bv = b.has_value() ? view_of(contiguous_list(*b)) : ListView{};
  Tensor out = empty({static_cast<int64_t>(a.size())}, acc_dtype(a[0].scalar_type()), a[0].device());
  Tensor ws = workspace(a[0], av.list());
  SqNormParams p{dt,
                 av.list(),
                 bv.list(),
                 weight_decay,
                 scalar_f32(grad_scale, a[0], "grad_scale"),
                 out.data_ptr(),
                 data_or_null(ws)};
  launch(a[0], p, sq_norm_cpu, SLAB_CUDA_FN(sq_norm_cuda));
  return out;
}

void dog_update_op(const TensorVec& params, const TensorVec& grads, const TensorVec& x0, const Tensor& eta,
                   const TensorVec& dist2, double weight_decay, bool maximize, const OptTensor& grad_scale,
                   const OptTensor& found_inf) {
  const DType dt = check_lead(params, "params");
  const ScalarType acc = acc_dtype(params[0].scalar_type());
  check_like(grads, params, params[0].scalar_type(), "grads", "params");
  check_like(x0, params, acc, "x0", "params");
  check_finite(weight_decay, "weight_decay");
  const int64_t n = static_cast<int64_t>(params.size());
  const Tensor eta_c = acc_vector(eta, params[0], n, "eta");
  SLAB_CHECK(static_cast<int64_t>(dist2.size()) == n, "dist2 must hold ", n, " tensors, got ", dist2.size());
  std::vector<void*> dist2_ptr;
  for (size_t i = 0; i < dist2.size(); ++i) {
    const auto name = item("dist2", i);
    check_same_device(dist2[i], params[0], name.c_str());
    SLAB_CHECK(dist2[i].numel() == 1 && dist2[i].scalar_type() == acc && dist2[i].is_contiguous(), name,
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
  const ListView gv = view_of(contiguous_list(grads)), x0v = view_of(contiguous_list(x0));
  Tensor ws = workspace(params[0], x.view.list());
  DogUpdateParams p{dt,           x.view.list(), gv.list(), x0v.list(), dist2_ptr.data(), eta_c.data_ptr(),
                    weight_decay, maximize,      gs,        fi,         data_or_null(ws)};
  launch(params[0], p, dog_update_cpu, SLAB_CUDA_FN(dog_update_cuda));
  x.write_back();
}

void check_beta(double beta, const char* name) {
  SLAB_CHECK(std::isfinite(beta) && beta >= 0 && beta < 1, name, " must be in [0, 1), got ", beta);
}

void lion_op(const TensorVec& params, const TensorVec& grads, const TensorVec& exp_avgs, const Tensor& lr, double beta1,
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
  const ListView gv = view_of(contiguous_list(grads));
  LionParams p{dt, x.view.list(), gv.list(), m.view.list(), lr_c.data_ptr(), beta1, beta2, weight_decay, maximize, gs,
               fi};
  launch(params[0], p, lion_cpu, SLAB_CUDA_FN(lion_cuda));
  x.write_back();
  m.write_back();
}

LambParams lamb_params(const TensorVec& params, const Tensor& bias_corr, double beta1, double beta2, double eps,
                       double weight_decay, bool maximize, const OptTensor& grad_scale, const OptTensor& found_inf,
                       Tensor& bc_keep) {
  check_beta(beta1, "beta1");
  check_beta(beta2, "beta2");
  check_finite(eps, "eps");
  check_finite(weight_decay, "weight_decay");
  bc_keep = bias_corrections(bias_corr, params[0], static_cast<int64_t>(params.size()));
  return LambParams{kernel_dtype(params[0], "params"),
                    {},
                    {},
                    {},
                    {},
                    bc_keep.data_ptr(),
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                    maximize,
                    scalar_f32(grad_scale, params[0], "grad_scale"),
                    scalar_f32(found_inf, params[0], "found_inf"),
                    nullptr,
                    nullptr,
                    nullptr};
}

// The first stage of LAMB and AdamP writes the moments and reads everything else.
void check_stage1_aliases(const TensorVec& params, const TensorVec& grads, const TensorVec& exp_avgs,
                          const TensorVec& exp_avg_sqs, const Tensor& bias_corr, const OptTensor& grad_scale,
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

Tensor lamb_stage1_op(const TensorVec& params, const TensorVec& grads, const TensorVec& exp_avgs,
                      const TensorVec& exp_avg_sqs, const Tensor& bias_corr, double beta1, double beta2, double eps,
                      double weight_decay, bool maximize, const OptTensor& grad_scale, const OptTensor& found_inf) {
  check_lead(params, "params");
  const ScalarType acc = acc_dtype(params[0].scalar_type());
  check_like(grads, params, params[0].scalar_type(), "grads", "params");
  check_like(exp_avgs, params, acc, "exp_avgs", "params");
  check_like(exp_avg_sqs, params, acc, "exp_avg_sqs", "params");
  Tensor bc;
  LambParams p = lamb_params(params, bias_corr, beta1, beta2, eps, weight_decay, maximize, grad_scale, found_inf, bc);
  check_stage1_aliases(params, grads, exp_avgs, exp_avg_sqs, bias_corr, grad_scale, found_inf);
  const ListView xv = view_of(contiguous_list(params)), gv = view_of(contiguous_list(grads));
  InPlace m(exp_avgs), v(exp_avg_sqs);
  Tensor norms = empty({static_cast<int64_t>(params.size()), 2}, acc, params[0].device());
  Tensor ws = workspace(params[0], xv.list(), 2);
  p.x = xv.list(), p.g = gv.list(), p.m = m.view.list(), p.v = v.view.list();
  p.norms = norms.data_ptr();
  p.workspace = data_or_null(ws);
  launch(params[0], p, lamb_stage1_cpu, SLAB_CUDA_FN(lamb_stage1_cuda));
  m.write_back();
  v.write_back();
  return norms;
}

void lamb_stage2_op(const TensorVec& params, const TensorVec& exp_avgs, const TensorVec& exp_avg_sqs,
                    const Tensor& bias_corr, const Tensor& lr, double beta1, double beta2, double eps,
                    double weight_decay, const OptTensor& found_inf) {
  check_lead(params, "params");
  const ScalarType acc = acc_dtype(params[0].scalar_type());
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
  const ListView mv = view_of(contiguous_list(exp_avgs)), vv = view_of(contiguous_list(exp_avg_sqs));
  p.x = x.view.list(), p.m = mv.list(), p.v = vv.list();
  p.lr = lr_c.data_ptr();
  launch(params[0], p, lamb_stage2_cpu, SLAB_CUDA_FN(lamb_stage2_cuda));
  x.write_back();
}

void momentum_op(const TensorVec& params, const TensorVec& grads, const TensorVec& bufs, const Tensor& scale,
                 const Tensor& lr, double momentum, double weight_decay, bool maximize, const OptTensor& grad_scale,
                 const OptTensor& found_inf) {
  const DType dt = check_lead(params, "params");
  const ScalarType acc = acc_dtype(params[0].scalar_type());
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
  const ListView gv = view_of(contiguous_list(grads));
  MomentumParams p{dt,
                   x.view.list(),
                   gv.list(),
                   b.view.list(),
                   scale_c.data_ptr(),
                   lr_c.data_ptr(),
                   momentum,
                   weight_decay,
                   maximize,
                   gs,
                   fi};
  launch(params[0], p, momentum_cpu, SLAB_CUDA_FN(momentum_cuda));
  x.write_back();
  b.write_back();
}

// Rows of AdamP's channel view: size(0) for 2+-D tensors, one row otherwise.
std::vector<int64_t> rows_of(const TensorVec& params) {
  std::vector<int64_t> rows;
  for (const auto& t : params) rows.push_back(t.dim() > 1 ? t.size(0) : 1);
  return rows;
}

AdamPParams adamp_params(const TensorVec& params, const TensorVec& grads, const TensorVec& exp_avgs,
                         const TensorVec& exp_avg_sqs, const Tensor& bias_corr, double beta1, double beta2, double eps,
                         bool nesterov, bool maximize, const OptTensor& grad_scale, const OptTensor& found_inf,
                         Tensor& bc_keep) {
  const DType dt = check_lead(params, "params");
  const ScalarType acc = acc_dtype(params[0].scalar_type());
  check_like(grads, params, params[0].scalar_type(), "grads", "params");
  check_like(exp_avgs, params, acc, "exp_avgs", "params");
  check_like(exp_avg_sqs, params, acc, "exp_avg_sqs", "params");
  check_beta(beta1, "beta1");
  check_beta(beta2, "beta2");
  check_finite(eps, "eps");
  bc_keep = bias_corrections(bias_corr, params[0], static_cast<int64_t>(params.size()));
  return AdamPParams{dt,
                     {},
                     {},
                     {},
                     {},
                     nullptr,
                     bc_keep.data_ptr(),
                     beta1,
                     beta2,
                     eps,
                     nesterov,
                     maximize,
                     scalar_f32(grad_scale, params[0], "grad_scale"),
                     scalar_f32(found_inf, params[0], "found_inf"),
                     nullptr,
                     nullptr,
                     nullptr,
                     nullptr};
}

Tensor adamp_stage1_op(const TensorVec& params, const TensorVec& grads, const TensorVec& exp_avgs,
                       const TensorVec& exp_avg_sqs, const Tensor& bias_corr, double beta1, double beta2, double eps,
                       bool nesterov, bool maximize, const OptTensor& grad_scale, const OptTensor& found_inf) {
  Tensor bc;
  AdamPParams p = adamp_params(params, grads, exp_avgs, exp_avg_sqs, bias_corr, beta1, beta2, eps, nesterov, maximize,
                               grad_scale, found_inf, bc);
  check_stage1_aliases(params, grads, exp_avgs, exp_avg_sqs, bias_corr, grad_scale, found_inf);
  const auto rows = rows_of(params);
  int64_t total = 0;
  for (int64_t r : rows) total += r;
  const ListView xv = view_of(contiguous_list(params)), gv = view_of(contiguous_list(grads));
  InPlace m(exp_avgs), v(exp_avg_sqs);
  Tensor sums = empty({total, 4}, acc_dtype(params[0].scalar_type()), params[0].device());
  p.x = xv.list(), p.g = gv.list(), p.m = m.view.list(), p.v = v.view.list();
  p.rows = rows.data();
  p.row_sums = sums.data_ptr();
  launch(params[0], p, adamp_stage1_cpu, SLAB_CUDA_FN(adamp_stage1_cuda));
  m.write_back();
  v.write_back();
  return sums;
}

void adamp_stage2_op(const TensorVec& params, const TensorVec& grads, const TensorVec& exp_avgs,
                     const TensorVec& exp_avg_sqs, const Tensor& bias_corr, const Tensor& coef, const Tensor& decay,
                     const Tensor& lr, double beta1, double beta2, double eps, bool nesterov, bool maximize,
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
  const ListView gv = view_of(contiguous_list(grads)), mv = view_of(contiguous_list(exp_avgs)),
                 vv = view_of(contiguous_list(exp_avg_sqs));
  p.x = x.view.list(), p.g = gv.list(), p.m = mv.list(), p.v = vv.list();
  p.rows = rows.data();
  p.coef = coef_c.data_ptr(), p.decay = decay_c.data_ptr(), p.lr = lr_c.data_ptr();
  launch(params[0], p, adamp_stage2_cpu, SLAB_CUDA_FN(adamp_stage2_cuda));
  x.write_back();
}

void lerp_op(const TensorVec& avg, const TensorVec& x, double weight) {
  const DType dt = check_lead(avg, "avg");
  check_like(x, avg, avg[0].scalar_type(), "x", "avg");
  check_unit_interval(weight, "weight");
  AliasCheck().written(avg, "avg").read(x, "x").check();
  InPlace a(avg);
  const ListView xv = view_of(contiguous_list(x));
  LerpParams p{dt, a.view.list(), xv.list(), weight};
  launch(avg[0], p, lerp_cpu, SLAB_CUDA_FN(lerp_cuda));
  a.write_back();
}

}  // namespace
}  // namespace slab::optim

#ifndef SLAB_WITH_CUDA
STABLE_TORCH_LIBRARY_FRAGMENT(slab, m) {
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
#endif

STABLE_TORCH_LIBRARY_IMPL(slab, SLAB_KERNEL_KEY, m) {
  m.impl("multi_tensor_sq_norm", TORCH_BOX(&slab::optim::sq_norm_op));
  m.impl("dog_update_", TORCH_BOX(&slab::optim::dog_update_op));
  m.impl("lion_update_", TORCH_BOX(&slab::optim::lion_op));
  m.impl("multi_tensor_lerp_", TORCH_BOX(&slab::optim::lerp_op));
  m.impl("lamb_stage1_", TORCH_BOX(&slab::optim::lamb_stage1_op));
  m.impl("lamb_stage2_", TORCH_BOX(&slab::optim::lamb_stage2_op));
  m.impl("momentum_update_", TORCH_BOX(&slab::optim::momentum_op));
  m.impl("adamp_stage1_", TORCH_BOX(&slab::optim::adamp_stage1_op));
  m.impl("adamp_stage2_", TORCH_BOX(&slab::optim::adamp_stage2_op));
}
