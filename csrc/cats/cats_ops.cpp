// CATS ops: schemas, input checks, and the CPU/CUDA bindings of the kernels in cats.h, on torch's
// stable ABI (core/binding.h). Fake tensors and autograd are registered in
// python/slab/ops/cats.py.
#include <limits>

#include "cats/cats.h"
#include "core/binding.h"

namespace slab::cats {
namespace {

Tensor cats_op(const Tensor& x, double threshold) {
  const DType dtype = kernel_dtype(x, "x");
  check_finite(threshold, "threshold", /*non_negative=*/false);
  const Tensor xc = as_contiguous(x);
  Tensor y = torch::stable::empty_like(xc);
  if (xc.numel() == 0) return y;
  CatsParams p{dtype, xc.numel(), xc.data_ptr(), y.data_ptr(), threshold};
  launch(x, p, cats_cpu, SLAB_CUDA_FN(cats_cuda));
  return y;
}

Tensor cats_backward_op(const Tensor& dy, const Tensor& x, double threshold) {
  const DType dtype = kernel_dtype(x, "x");
  check_finite(threshold, "threshold", /*non_negative=*/false);
  check_same_device(dy, x, "grad");
  SLAB_CHECK(dy.sizes().equals(x.sizes()) && dy.scalar_type() == x.scalar_type(), "grad must have the shape ",
             x.sizes(), " and dtype ", x.scalar_type(), " of x, got ", dy.sizes(), " ", dy.scalar_type());
  const Tensor xc = as_contiguous(x), dyc = as_contiguous(dy);
  Tensor dx = torch::stable::empty_like(xc);
  if (xc.numel() == 0) return dx;
  CatsBwdParams p{dtype, xc.numel(), dyc.data_ptr(), xc.data_ptr(), dx.data_ptr(), threshold};
  launch(x, p, cats_backward_cpu, SLAB_CUDA_FN(cats_backward_cuda));
  return dx;
}

void check_weight(const Tensor& w, const Tensor& x, int64_t features, const char* name) {
  check_same_device(w, x, name);
  SLAB_CHECK(w.scalar_type() == x.scalar_type(), name, " must have the dtype of x (", x.scalar_type(), "), got ",
             w.scalar_type());
  SLAB_CHECK(w.dim() == 2 && w.size(0) == features && w.size(1) == x.size(1), name, " must have shape (", features,
             ", ", x.size(1), ") = (features, dim of x), got ", w.sizes());
}

Tensor cats_mlp_op(const Tensor& x, const Tensor& w_gate, const Tensor& w_up, const Tensor& w_down_t,
                   double threshold) {
  const DType dtype = kernel_dtype(x, "x");
  check_finite(threshold, "threshold", /*non_negative=*/false);
  SLAB_CHECK(x.dim() == 2, "x must have shape (tokens, dim), got ", x.sizes());
  const int64_t M = x.size(0), D = x.size(1);
  SLAB_CHECK(M >= 1 && M <= kMaxTokens, "x must hold 1 to ", kMaxTokens,
             " tokens (cats_mlp is the decoding kernel; use the dense path for more), got ", M);
  SLAB_CHECK(D >= 1, "x must have a non-empty dim, got shape ", x.sizes());
  check_same_device(w_gate, x, "w_gate");
  SLAB_CHECK(w_gate.dim() == 2, "w_gate must have shape (features, ", D, "), got ", w_gate.sizes());
  const int64_t F = w_gate.size(0);
  SLAB_CHECK(F >= 1, "w_gate must have at least one row (feature), got shape ", w_gate.sizes());
  check_weight(w_gate, x, F, "w_gate");
  check_weight(w_up, x, F, "w_up");
  check_weight(w_down_t, x, F, "w_down_t");
  // Weights are read in place; a non-contiguous one (e.g. W_down.t() instead of a transposed copy)
  // is copied here, which costs a full pass over it.
  const Tensor xc = as_contiguous(x), wg = as_contiguous(w_gate), wu = as_contiguous(w_up), wd = as_contiguous(w_down_t);
  Tensor y = empty({M, D}, x.scalar_type(), x.device());
  Tensor act = empty({F, M}, acc_dtype(x.scalar_type()), x.device());
  Tensor keep = empty({F}, ScalarType::Byte, x.device());
  Tensor partial, kept;
#ifdef SLAB_WITH_CUDA
  SLAB_CHECK(F < std::numeric_limits<int32_t>::max(), "w_gate must have fewer than 2^31 - 1 rows on CUDA, got ", F);
  partial = empty({mlp_workspace_elems(M, D, F, static_cast<int>(x.element_size()))}, act.scalar_type(), x.device());
  kept = empty({F + 1}, ScalarType::Int, x.device());
#endif
  MlpParams p{dtype,
              M,
              D,
              F,
              xc.data_ptr(),
              wg.data_ptr(),
              wu.data_ptr(),
              wd.data_ptr(),
              y.data_ptr(),
              act.data_ptr(),
              keep.mutable_data_ptr<uint8_t>(),
              data_or_null(partial),
              static_cast<int32_t*>(data_or_null(kept)),
              threshold};
  launch(x, p, mlp_cpu, SLAB_CUDA_FN(mlp_cuda));
  return y;
}

// ---- token sparsity (LeMo) -------------------------------------------------------------------------

Tensor token_select_index_op(const Tensor& scores, int64_t keep) {
  const DType dtype = kernel_dtype(scores, "scores");
  SLAB_CHECK(scores.dim() == 2, "scores must have shape (batch, tokens), got ", scores.sizes());
  const int64_t B = scores.size(0), N = scores.size(1);
  SLAB_CHECK(keep >= 1 && keep <= N, "keep must be in [1, ", N, "] (tokens per sequence), got ", keep);
  Tensor index = empty({B, keep}, ScalarType::Long, scores.device());
  if (B == 0) return index;
  // NaN scores rank lowest; kth = the keep-th largest score of each sequence, n_greater = scores above it.
  const double neg_inf = -std::numeric_limits<double>::infinity();
  const Tensor s = as_contiguous(aten("aten::nan_to_num", "", scores, std::optional<double>(neg_inf),
                                   std::optional<double>(), std::optional<double>()));
  const Tensor top = aten2("aten::topk", "", s, keep, int64_t{-1}, true, true).first;
  const Tensor kth = as_contiguous(torch::stable::select(top, -1, keep - 1));
  const Tensor above = aten("aten::gt", "Tensor", s, torch::stable::unsqueeze(kth, -1));
  const Tensor n_greater = as_contiguous(torch::stable::sum(above, std::vector<int64_t>{-1}, false, ScalarType::Long));
  const Tensor kth_acc = to_dtype(kth, acc_dtype(scores.scalar_type()));
  TokenIndexParams p{dtype,
                     B,
                     N,
                     keep,
                     s.data_ptr(),
                     kth_acc.data_ptr(),
                     n_greater.const_data_ptr<int64_t>(),
                     index.mutable_data_ptr<int64_t>()};
  launch(scores, p, token_index_cpu, SLAB_CUDA_FN(token_index_cuda));
  return index;
}

// x (batch, tokens, channels), index (batch, keep) int64 in [0, tokens).
void check_rows(const Tensor& x, const Tensor& index, const char* x_name) {
  check_defined(x, x_name);
  SLAB_CHECK(x.dim() == 3, x_name, " must have shape (batch, tokens, channels), got ", x.sizes());
  check_same_device(index, x, "index", x_name);
  SLAB_CHECK(index.scalar_type() == ScalarType::Long, "index must be int64, got ", index.scalar_type());
  SLAB_CHECK(index.dim() == 2 && index.size(0) == x.size(0), "index must have shape (", x.size(0),
             ", keep) = (batch of ", x_name, ", keep), got ", index.sizes());
}

// On the CPU the values are checked (free); a CUDA kernel skips rows outside [0, tokens) instead.
void check_index_values(const Tensor& index, int64_t tokens) {
#ifndef SLAB_WITH_CUDA
  const int64_t* v = index.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < index.numel(); ++i)
    SLAB_CHECK(v[i] >= 0 && v[i] < tokens, "index values must be in [0, ", tokens, "), got ", v[i]);
#else
  (void)index, (void)tokens;
#endif
}

// Moves rows between `full` (batch, tokens, channels) and its kept rows; src/dst are contiguous.
void move_rows(const Tensor& full, const Tensor& index, const Tensor& src, const Tensor& dst, bool gather) {
  if (index.numel() == 0 || full.size(2) == 0) return;
  const int64_t row_bytes = full.size(2) * static_cast<int64_t>(full.element_size());
  const int word = copy_word_bytes(row_bytes, reinterpret_cast<uintptr_t>(src.data_ptr()),
                                   reinterpret_cast<uintptr_t>(dst.data_ptr()));
  TokenRowsParams p{full.size(0),   full.size(1),   index.size(1), row_bytes, word, index.const_data_ptr<int64_t>(),
                    src.data_ptr(), dst.data_ptr(), gather};
  launch(full, p, token_rows_cpu, SLAB_CUDA_FN(token_rows_cuda));
}

Tensor token_gather_op(const Tensor& x, const Tensor& index) {
  check_rows(x, index, "x");
  const Tensor xc = as_contiguous(x), ic = as_contiguous(index);
  check_index_values(ic, x.size(1));
  Tensor out = empty({x.size(0), index.size(1), x.size(2)}, x.scalar_type(), x.device());
  move_rows(xc, ic, xc, out, true);
  return out;
}

Tensor token_scatter_op(const Tensor& x, const Tensor& y, const Tensor& index) {
  check_rows(x, index, "x");
  check_same_device(y, x, "y");
  SLAB_CHECK(y.scalar_type() == x.scalar_type(), "y must have the dtype of x (", x.scalar_type(), "), got ",
             y.scalar_type());
  SLAB_CHECK(y.dim() == 3 && y.size(0) == x.size(0) && y.size(1) == index.size(1) && y.size(2) == x.size(2),
             "y must have shape (", x.size(0), ", ", index.size(1), ", ", x.size(2),
             ") = (batch, keep, channels), got ", y.sizes());
  const Tensor yc = as_contiguous(y), ic = as_contiguous(index);
  check_index_values(ic, x.size(1));
  Tensor out = torch::stable::clone(as_contiguous(x));
  move_rows(out, ic, yc, out, false);
  return out;
}

}  // namespace
}  // namespace slab::cats

#ifndef SLAB_WITH_CUDA
STABLE_TORCH_LIBRARY_FRAGMENT(slab, m) {
  m.def("cats(Tensor x, float threshold) -> Tensor");
  m.def("cats_backward(Tensor grad, Tensor x, float threshold) -> Tensor");
  m.def("cats_mlp(Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down_t, float threshold) -> Tensor");
  m.def("token_select_index(Tensor scores, int keep) -> Tensor");
  m.def("token_gather(Tensor x, Tensor index) -> Tensor");
  m.def("token_scatter(Tensor x, Tensor y, Tensor index) -> Tensor");
}
#endif

STABLE_TORCH_LIBRARY_IMPL(slab, SLAB_KERNEL_KEY, m) {
  m.impl("cats", TORCH_BOX(&slab::cats::cats_op));
  m.impl("cats_backward", TORCH_BOX(&slab::cats::cats_backward_op));
  m.impl("cats_mlp", TORCH_BOX(&slab::cats::cats_mlp_op));
  m.impl("token_select_index", TORCH_BOX(&slab::cats::token_select_index_op));
  m.impl("token_gather", TORCH_BOX(&slab::cats::token_gather_op));
  m.impl("token_scatter", TORCH_BOX(&slab::cats::token_scatter_op));
}
