// CATS ops: schemas, input checks, and the CPU/CUDA bindings of the kernels in cats.h.
// Fake tensors and autograd are registered in python/slab/ops/cats.py.
#include <ATen/ATen.h>

#include <limits>

#include "cats/cats.h"
#include "core/binding.h"

namespace slab::cats {
namespace {

using at::Tensor;

Tensor cats_op(const Tensor& x, double threshold) {
  const DType dtype = kernel_dtype(x, "x");
  check_finite(threshold, "threshold", /*non_negative=*/false);
  const Tensor xc = x.contiguous();
  Tensor y = at::empty_like(xc);
  if (xc.numel() == 0) return y;
  CatsParams p{dtype, xc.numel(), xc.data_ptr(), y.data_ptr(), threshold};
  launch(x, p, cats_cpu, SLAB_CUDA_FN(cats_cuda));
  return y;
}

Tensor cats_bwd_op(const Tensor& dy, const Tensor& x, double threshold) {
  const DType dtype = kernel_dtype(x, "x");
  check_finite(threshold, "threshold", /*non_negative=*/false);
  check_same_device(dy, x, "grad");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), "grad must have the shape ",
              x.sizes(), " and dtype ", x.scalar_type(), " of x, got ", dy.sizes(), " ", dy.scalar_type());
  const Tensor xc = x.contiguous(), dyc = dy.contiguous();
  Tensor dx = at::empty_like(xc);
  if (xc.numel() == 0) return dx;
  CatsBwdParams p{dtype, xc.numel(), dyc.data_ptr(), xc.data_ptr(), dx.data_ptr(), threshold};
  launch(x, p, cats_bwd_cpu, SLAB_CUDA_FN(cats_bwd_cuda));
  return dx;
}

void check_weight(const Tensor& w, const Tensor& x, int64_t features, const char* name) {
  check_same_device(w, x, name);
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), name, " must have the dtype of x (", x.scalar_type(), "), got ",
              w.scalar_type());
  TORCH_CHECK(w.dim() == 2 && w.size(0) == features && w.size(1) == x.size(1), name, " must have shape (",
              features, ", ", x.size(1), ") = (features, dim of x), got ", w.sizes());
}

Tensor cats_mlp_op(const Tensor& x, const Tensor& w_gate, const Tensor& w_up, const Tensor& w_down_t,
                   double threshold) {
  const DType dtype = kernel_dtype(x, "x");
  check_finite(threshold, "threshold", /*non_negative=*/false);
  TORCH_CHECK(x.dim() == 2, "x must have shape (tokens, dim), got ", x.sizes());
  const int64_t M = x.size(0), D = x.size(1);
  TORCH_CHECK_VALUE(M >= 1 && M <= kMaxTokens, "x must hold 1 to ", kMaxTokens,
                    " tokens (cats_mlp is the decoding kernel; use the dense path for more), got ", M);
  TORCH_CHECK(D >= 1, "x must have a non-empty dim, got shape ", x.sizes());
  check_same_device(w_gate, x, "w_gate");
  TORCH_CHECK(w_gate.dim() == 2, "w_gate must have shape (features, ", D, "), got ", w_gate.sizes());
  const int64_t F = w_gate.size(0);
  TORCH_CHECK(F >= 1, "w_gate must have at least one row (feature), got shape ", w_gate.sizes());
  check_weight(w_gate, x, F, "w_gate");
  check_weight(w_up, x, F, "w_up");
  check_weight(w_down_t, x, F, "w_down_t");
  // Weights are read in place; a non-contiguous one (e.g. W_down.t() instead of a transposed copy)
  // is copied here, which costs a full pass over it.
  const Tensor xc = x.contiguous(), wg = w_gate.contiguous(), wu = w_up.contiguous(), wd = w_down_t.contiguous();
  Tensor y = at::empty({M, D}, x.options());
  Tensor act = at::empty({F, M}, x.options().dtype(acc_dtype(x.scalar_type())));
  Tensor keep = at::empty({F}, x.options().dtype(at::kByte));
  Tensor partial;
#ifdef SLAB_WITH_CUDA
  if (x.is_cuda()) partial = at::empty({workspace_elems_cuda(M, D, F)}, act.options());
#endif
  MlpParams p{dtype, M, D, F, xc.data_ptr(), wg.data_ptr(), wu.data_ptr(), wd.data_ptr(), y.data_ptr(),
              act.data_ptr(), keep.data_ptr<uint8_t>(), partial.defined() ? partial.data_ptr() : nullptr,
              threshold};
  launch(x, p, mlp_cpu, SLAB_CUDA_FN(mlp_cuda));
  return y;
}

// ---- token sparsity (LeMo) -------------------------------------------------------------------------

Tensor token_select_index_op(const Tensor& scores, int64_t keep) {
  const DType dtype = kernel_dtype(scores, "scores");
  TORCH_CHECK(scores.dim() == 2, "scores must have shape (batch, tokens), got ", scores.sizes());
  const int64_t B = scores.size(0), N = scores.size(1);
  TORCH_CHECK_VALUE(keep >= 1 && keep <= N, "keep must be in [1, ", N, "] (tokens per sequence), got ", keep);
  Tensor index = at::empty({B, keep}, scores.options().dtype(at::kLong));
  if (B == 0) return index;
  // NaN scores rank lowest; kth = the keep-th largest score of each sequence, n_greater = scores above it.
  const Tensor s = at::nan_to_num(scores, -std::numeric_limits<double>::infinity()).contiguous();
  const Tensor kth = std::get<0>(at::topk(s, keep, -1)).select(-1, keep - 1).contiguous();
  const Tensor n_greater = at::gt(s, kth.unsqueeze(-1)).sum(-1).to(at::kLong).contiguous();
  const Tensor kth_acc = kth.to(acc_dtype(scores.scalar_type()));
  TokenIndexParams p{dtype, B, N, keep, s.data_ptr(), kth_acc.data_ptr(), n_greater.data_ptr<int64_t>(),
                     index.data_ptr<int64_t>()};
  launch(scores, p, token_index_cpu, SLAB_CUDA_FN(token_index_cuda));
  return index;
}

// x (batch, tokens, channels), index (batch, keep) int64 in [0, tokens).
void check_rows(const Tensor& x, const Tensor& index, const char* x_name) {
  check_defined(x, x_name);
  TORCH_CHECK(x.dim() == 3, x_name, " must have shape (batch, tokens, channels), got ", x.sizes());
  check_same_device(index, x, "index");
  TORCH_CHECK(index.scalar_type() == at::kLong, "index must be int64, got ", index.scalar_type());
  TORCH_CHECK(index.dim() == 2 && index.size(0) == x.size(0), "index must have shape (", x.size(0),
              ", keep) = (batch of ", x_name, ", keep), got ", index.sizes());
  if (index.is_cpu() && index.numel() > 0) {  // free on the CPU; a CUDA kernel skips bad rows instead
    const auto [lo, hi] = at::aminmax(index);
    TORCH_CHECK_VALUE(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < x.size(1), "index values must be in [0, ",
                      x.size(1), "), got [", lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
  }
}

// Moves rows between `full` (batch, tokens, channels) and its kept rows; src/dst are contiguous.
void move_rows(const Tensor& full, const Tensor& index, const Tensor& src, Tensor& dst, bool gather) {
  if (index.numel() == 0 || full.size(2) == 0) return;
  const int64_t row_bytes = full.size(2) * static_cast<int64_t>(full.element_size());
  const int word = copy_word_bytes(row_bytes, reinterpret_cast<uintptr_t>(src.data_ptr()),
                                   reinterpret_cast<uintptr_t>(dst.data_ptr()));
  TokenRowsParams p{full.size(0), full.size(1), index.size(1), row_bytes, word, index.data_ptr<int64_t>(),
                    src.data_ptr(), dst.data_ptr(), gather};
  launch(full, p, token_rows_cpu, SLAB_CUDA_FN(token_rows_cuda));
}

Tensor token_gather_op(const Tensor& x, const Tensor& index) {
  check_rows(x, index, "x");
  const Tensor xc = x.contiguous(), ic = index.contiguous();
  Tensor out = at::empty({x.size(0), index.size(1), x.size(2)}, x.options());
  move_rows(xc, ic, xc, out, true);
  return out;
}

Tensor token_scatter_op(const Tensor& x, const Tensor& y, const Tensor& index) {
  check_rows(x, index, "x");
  check_same_device(y, x, "y");
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), "y must have the dtype of x (", x.scalar_type(), "), got ",
              y.scalar_type());
  TORCH_CHECK(y.dim() == 3 && y.size(0) == x.size(0) && y.size(1) == index.size(1) && y.size(2) == x.size(2),
              "y must have shape (", x.size(0), ", ", index.size(1), ", ", x.size(2),
              ") = (batch, keep, channels), got ", y.sizes());
  Tensor out = x.clone(at::MemoryFormat::Contiguous);
  const Tensor yc = y.contiguous(), ic = index.contiguous();
  move_rows(out, ic, yc, out, false);
  return out;
}

}  // namespace
}  // namespace slab::cats

TORCH_LIBRARY_FRAGMENT(slab, m) {
  m.def("cats(Tensor x, float threshold) -> Tensor");
  m.def("cats_backward(Tensor grad, Tensor x, float threshold) -> Tensor");
  m.def("cats_mlp(Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down_t, float threshold) -> Tensor");
  m.def("token_select_index(Tensor scores, int keep) -> Tensor");
  m.def("token_gather(Tensor x, Tensor index) -> Tensor");
  m.def("token_scatter(Tensor x, Tensor y, Tensor index) -> Tensor");
}

#define SLAB_CATS_KERNELS(m)                              \
  m.impl("cats", &slab::cats::cats_op);                   \
  m.impl("cats_backward", &slab::cats::cats_bwd_op);      \
  m.impl("cats_mlp", &slab::cats::cats_mlp_op);                        \
  m.impl("token_select_index", &slab::cats::token_select_index_op);    \
  m.impl("token_gather", &slab::cats::token_gather_op);                \
  m.impl("token_scatter", &slab::cats::token_scatter_op)

TORCH_LIBRARY_IMPL(slab, CPU, m) { SLAB_CATS_KERNELS(m); }

#ifdef SLAB_WITH_CUDA
TORCH_LIBRARY_IMPL(slab, CUDA, m) { SLAB_CATS_KERNELS(m); }
#else
TORCH_LIBRARY_IMPL(slab, CUDA, m) { slab::register_cuda_unavailable(m, {"cats", "cats_backward", "cats_mlp", "token_select_index", "token_gather", "token_scatter"}); }
#endif
