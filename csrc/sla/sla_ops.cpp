// SLA attention ops: schemas, input checks, and the CPU/CUDA bindings of the kernels in sla.h, on
// torch's stable ABI (core/binding.h). Fake tensors and autograd are registered in
// python/slab/ops/sla.py.
//
//   sla_forward(q, k, v, causal, eps, mask) -> (o, den, state, z)
//   sla_backward(grad_o, q, k, v, o, den, causal, mask) -> (dq, dk, dv)
//   sla_step(q, k, v, state!, z!, eps) -> o          (decode; state and z updated in place)
#include <algorithm>
#include <tuple>
#include <utility>

#include "core/binding.h"
#include "sla/sla.h"

namespace slab::sla {
namespace {

void check_dtype(const Tensor& t, const Tensor& q, const char* name) {
  SLAB_CHECK(t.scalar_type() == q.scalar_type(), name, " must have the dtype of q (", q.scalar_type(), "), got ",
             t.scalar_type());
}

// A (B, H, N, X) operand whose last dimension the kernels read contiguously: returned as is when
// it already is (any strides elsewhere, e.g. a view of a fused qkv projection), else a copy.
Tensor rows_view(const Tensor& t) { return t.size(3) <= 1 || t.stride(3) == 1 ? t : as_contiguous(t); }
RowStrides strides_of(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

#ifdef SLAB_WITH_CUDA
// The CUDA kernels launch one block per (b, h, column tile) (sla_block): at most 2^31 - 1.
void check_cuda_blocks(int64_t batch, int64_t heads, int64_t cols) {
  const int64_t tiles = std::max<int64_t>(1, ceil_div(cols, kCudaColumnTile));
  SLAB_CHECK(checked_mul(checked_mul(batch, heads, "batch * heads"), tiles, "CUDA blocks") <= kMaxCudaBlocks,
             "batch * heads = ", batch, " * ", heads, " is too large for the CUDA kernels (at most ",
             kMaxCudaBlocks / tiles, " (batch, head) slices at this head dimension); split the batch");
}
#endif

// q (B, H, N, D), k like q, v (B, H, N, Dv): one dtype, one device.
SlaShape check_qkv(const Tensor& q, const Tensor& k, const Tensor& v) {
  kernel_dtype(q, "q");
  SLAB_CHECK(q.dim() == 4, "q must have shape (B, H, N, D), got ", q.sizes());
  check_same_device(k, q, "k", "q");
  check_same_device(v, q, "v", "q");
  check_dtype(k, q, "k");
  check_dtype(v, q, "v");
  SLAB_CHECK(k.sizes().equals(q.sizes()), "k must have the shape of q (B, H, N, D) = ", q.sizes(), ", got ", k.sizes());
  SLAB_CHECK(v.dim() == 4 && v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == q.size(2),
             "v must have shape (B, H, N, Dv) = (", q.size(0), ", ", q.size(1), ", ", q.size(2),
             ", Dv) to match q, got ", v.sizes());
#ifdef SLAB_WITH_CUDA
  const int64_t max_dim = q.scalar_type() == ScalarType::Double ? kMaxHeadDimCudaFp64 : kMaxHeadDimCuda;
  SLAB_CHECK(q.size(3) <= max_dim && v.size(3) <= max_dim, "the CUDA kernels take head dimensions D and Dv up to ",
             max_dim, " for ", q.scalar_type(), ", got D = ", q.size(3), " (q), Dv = ", v.size(3), " (v)");
  check_cuda_blocks(q.size(0), q.size(1), std::max(q.size(3), v.size(3)));
#endif
  return {q.size(0), q.size(1), q.size(2), q.size(3), v.size(3)};
}

// mask: bool (B, N), true = real token. Returned contiguous.
OptTensor check_mask(const OptTensor& mask, const Tensor& q) {
  if (!mask.has_value()) return std::nullopt;
  check_same_device(*mask, q, "mask", "q");
  SLAB_CHECK(mask->scalar_type() == ScalarType::Bool, "mask must be a bool tensor (True = real token), got ",
             mask->scalar_type());
  SLAB_CHECK(mask->dim() == 2 && mask->size(0) == q.size(0) && mask->size(1) == q.size(2),
             "mask must have shape (B, N) = (", q.size(0), ", ", q.size(2), "), got ", mask->sizes());
  return as_contiguous(*mask);
}

const bool* mask_ptr(const OptTensor& m) { return m.has_value() ? m->const_data_ptr<bool>() : nullptr; }

bool is_empty(const SlaShape& s) { return s.batch == 0 || s.heads == 0 || s.len == 0 || s.dim == 0 || s.vdim == 0; }

std::tuple<Tensor, Tensor, Tensor, Tensor> sla_forward_op(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                                          bool causal, double eps, const OptTensor& mask_in) {
  const SlaShape s = check_qkv(q_in, k_in, v_in);
  check_finite(eps, "eps");
  const OptTensor mask = check_mask(mask_in, q_in);
  const ScalarType acc = acc_dtype(q_in.scalar_type());
  const Device dev = q_in.device();
  Tensor o = empty({s.batch, s.heads, s.len, s.vdim}, q_in.scalar_type(), dev);
  Tensor den = empty({s.batch, s.heads, s.len}, acc, dev);
  Tensor state = empty({s.batch, s.heads, s.dim, s.vdim}, acc, dev);
  Tensor z = empty({s.batch, s.heads, s.dim}, acc, dev);
  if (is_empty(s)) {  // no keys or no features: S = 0, z = 0, so o = 0 and den = eps
    torch::stable::zero_(o), torch::stable::fill_(den, eps), torch::stable::zero_(state), torch::stable::zero_(z);
    return {o, den, state, z};
  }
  const Tensor q = rows_view(q_in), k = rows_view(k_in), v = rows_view(v_in);
  SlaFwdParams p{kernel_dtype(q, "q"),
                 s,
                 causal,
                 eps,
                 q.data_ptr(),
                 strides_of(q),
                 k.data_ptr(),
                 strides_of(k),
                 v.data_ptr(),
                 strides_of(v),
                 mask_ptr(mask),
                 o.data_ptr(),
                 den.data_ptr(),
                 state.data_ptr(),
                 z.data_ptr(),
                 nullptr};
  Tensor ws;  // CUDA tensor-core path: per-chunk states
#ifdef SLAB_WITH_CUDA
  if (const int64_t elems = forward_workspace_elems_cuda(p); elems > 0) {
    ws = empty({elems}, ScalarType::Float, dev);
    p.workspace = ws.data_ptr();
  }
#endif
  launch(q, p, sla_forward_cpu, SLAB_CUDA_FN(sla_forward_cuda));
  return {o, den, state, z};
}

std::tuple<Tensor, Tensor, Tensor> sla_backward_op(const Tensor& grad_o_in, const Tensor& q_in, const Tensor& k_in,
                                                   const Tensor& v_in, const Tensor& o_in, const Tensor& den_in,
                                                   bool causal, const OptTensor& mask_in) {
  const SlaShape s = check_qkv(q_in, k_in, v_in);
  for (const auto& [t, name] : {std::pair{&grad_o_in, "grad_o"}, std::pair{&o_in, "o"}}) {
    check_same_device(*t, q_in, name, "q");
    check_dtype(*t, q_in, name);
    SLAB_CHECK(t->sizes().equals(v_in.sizes()), name, " must have the shape of v (B, H, N, Dv) = ", v_in.sizes(),
               ", got ", t->sizes());
  }
  check_same_device(den_in, q_in, "den", "q");
  SLAB_CHECK(den_in.scalar_type() == acc_dtype(q_in.scalar_type()) && den_in.dim() == 3 &&
                 den_in.sizes().equals(q_in.sizes().slice(0, 3)),
             "den must be a ", acc_dtype(q_in.scalar_type()), " tensor of shape (B, H, N) = ", q_in.sizes().slice(0, 3),
             ", got ", den_in.scalar_type(), " ", den_in.sizes());
  const OptTensor mask = check_mask(mask_in, q_in);
  const ScalarType dt = q_in.scalar_type();
  const Device dev = q_in.device();
  Tensor dq = empty(shape_of(q_in), dt, dev), dk = empty(shape_of(k_in), dt, dev);
  Tensor dv = empty(shape_of(v_in), dt, dev);
  if (is_empty(s)) {
    torch::stable::zero_(dq), torch::stable::zero_(dk), torch::stable::zero_(dv);
    return {dq, dk, dv};
  }
  const Tensor q = rows_view(q_in), k = rows_view(k_in), v = rows_view(v_in), o = rows_view(o_in);
  const Tensor go = rows_view(grad_o_in), den = as_contiguous(den_in);
  SlaBwdParams p{kernel_dtype(q, "q"),
                 s,
                 causal,
                 q.data_ptr(),
                 strides_of(q),
                 k.data_ptr(),
                 strides_of(k),
                 v.data_ptr(),
                 strides_of(v),
                 o.data_ptr(),
                 strides_of(o),
                 go.data_ptr(),
                 strides_of(go),
                 den.data_ptr(),
                 mask_ptr(mask),
                 dq.data_ptr(),
                 dk.data_ptr(),
                 dv.data_ptr(),
                 nullptr,
                 0};
  Tensor ws;  // CUDA: gden per row, and the chunked path's states
#ifdef SLAB_WITH_CUDA
  p.workspace_elems = backward_workspace_elems_cuda(p);
  ws = empty({p.workspace_elems}, den.scalar_type(), den.device());
  p.workspace = ws.data_ptr();
#endif
  launch(q, p, sla_backward_cpu, SLAB_CUDA_FN(sla_backward_cuda));
  return {dq, dk, dv};
}

// A decode operand: (B, H, X) or (B, H, 1, X) -> a (B, H, X) view with a contiguous last dim.
Tensor step_operand(const Tensor& t, const char* name) {
  SLAB_CHECK(t.dim() == 3 || (t.dim() == 4 && t.size(2) == 1), name,
             " must have shape (B, H, X) or (B, H, 1, X) (one decode token), got ", t.sizes());
  const Tensor t3 = t.dim() == 4 ? torch::stable::select(t, 2, 0) : t;
  return t3.size(2) <= 1 || t3.stride(2) == 1 ? t3 : as_contiguous(t3);
}

// The decode state: float32; float64 too for float64 q (gradcheck-style checks), whose arithmetic is
// float64 throughout (a float32 state is then updated through a float64 copy).
void check_state(const Tensor& t, const Tensor& q, const std::vector<int64_t>& shape, const char* name) {
  check_same_device(t, q, name, "q");
  const bool fp64 = q.scalar_type() == ScalarType::Double;
  SLAB_CHECK(t.scalar_type() == ScalarType::Float || (fp64 && t.scalar_type() == ScalarType::Double), name,
             " must be float32", fp64 ? " or float64" : "", " (the decode state), got ", t.scalar_type());
  SLAB_CHECK(same_shape(t, shape), name, " must have shape ", IntArrayRef(shape), ", got ", t.sizes());
  SLAB_CHECK(t.is_contiguous(), name, " must be contiguous (it is updated in place)");
}

Tensor sla_step_op(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, Tensor state, Tensor z, double eps) {
  const DType dtype = kernel_dtype(q_in, "q");
  check_same_device(k_in, q_in, "k", "q");
  check_same_device(v_in, q_in, "v", "q");
  check_dtype(k_in, q_in, "k");
  check_dtype(v_in, q_in, "v");
  check_finite(eps, "eps");
  const Tensor q = step_operand(q_in, "q"), k = step_operand(k_in, "k"), v = step_operand(v_in, "v");
  SLAB_CHECK(k_in.sizes().equals(q_in.sizes()), "k must have the shape of q ", q_in.sizes(), ", got ", k_in.sizes());
  SLAB_CHECK(v_in.dim() == q_in.dim() && v.size(0) == q.size(0) && v.size(1) == q.size(1), "v must have shape (",
             q.size(0), ", ", q.size(1), q_in.dim() == 4 ? ", 1" : "", ", Dv) to match q, got ", v_in.sizes());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Dv = v.size(2);
#ifdef SLAB_WITH_CUDA
  check_cuda_blocks(B, H, 1);
#endif
  check_state(state, q_in, {B, H, D, Dv}, "state");
  check_state(z, q_in, {B, H, D}, "z");
  AliasCheck().written(state, "state").written(z, "z").read(q_in, "q").read(k_in, "k").read(v_in, "v").check();
  Tensor o = empty(q_in.dim() == 4 ? std::vector<int64_t>{B, H, 1, Dv} : std::vector<int64_t>{B, H, Dv},
                   q_in.scalar_type(), q_in.device());
  if (B * H * Dv == 0) return o;
  if (D == 0) return torch::stable::zero_(o);
  const ScalarType acc = acc_dtype(q_in.scalar_type());
  // A float32 state of float64 q is updated through a float64 working copy, copied back after.
  const Tensor st = to_dtype(state, acc), zt = to_dtype(z, acc);
  SlaStepParams p{dtype,
                  B,
                  H,
                  D,
                  Dv,
                  eps,
                  q.data_ptr(),
                  {q.stride(0), q.stride(1), 0},
                  k.data_ptr(),
                  {k.stride(0), k.stride(1), 0},
                  v.data_ptr(),
                  {v.stride(0), v.stride(1), 0},
                  st.data_ptr(),
                  zt.data_ptr(),
                  o.data_ptr()};
  launch(q_in, p, sla_step_cpu, SLAB_CUDA_FN(sla_step_cuda));
  if (state.scalar_type() != acc) torch::stable::copy_(state, st);
  if (z.scalar_type() != acc) torch::stable::copy_(z, zt);
  return o;
}

}  // namespace
}  // namespace slab::sla

#ifndef SLAB_WITH_CUDA
STABLE_TORCH_LIBRARY_FRAGMENT(slab, m) {
  m.def(
      "sla_forward(Tensor q, Tensor k, Tensor v, bool causal, float eps, Tensor? mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "sla_backward(Tensor grad_o, Tensor q, Tensor k, Tensor v, Tensor o, Tensor den, bool causal, Tensor? mask) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("sla_step(Tensor q, Tensor k, Tensor v, Tensor(a!) state, Tensor(b!) z, float eps) -> Tensor");
}
#endif

STABLE_TORCH_LIBRARY_IMPL(slab, SLAB_KERNEL_KEY, m) {
  m.impl("sla_forward", TORCH_BOX(&slab::sla::sla_forward_op));
  m.impl("sla_backward", TORCH_BOX(&slab::sla::sla_backward_op));
  m.impl("sla_step", TORCH_BOX(&slab::sla::sla_step_op));
}
