// What the differentiable ops of every family share: the autograd plumbing around their kernels.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <charconv>
#include <cmath>
#include <initializer_list>
#include <optional>
#include <string>

namespace fusedlayers {

// A dtype and a float as Python prints them (torch.float64, 0.0): the C++ contracts' messages are the Python
// contracts' (fusedlayers/ops/), to the letter.
inline std::string py(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline std::string py(double v) {
  char buf[32];
  const auto end = std::to_chars(buf, buf + sizeof buf, v).ptr;
  std::string s(buf, end);
  if (s.find_first_of(".eni") == std::string::npos) s += ".0";  // Python's repr of a whole float: 2.0, not 2
  return s;
}

// An undefined tensor (a gradient autograd did not materialize) as an empty optional argument.
inline std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// Forward-mode AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad) reaches the ops through
// fusedlayers.functional, which routes tangents to an autograd.Function with a jvp formula
// (fusedlayers/ops/<family>.py). The raw ops have none: called directly with a tangent, they raise rather than
// give a zero tangent.
inline void check_no_forward_grad(std::initializer_list<const at::Tensor*> tensors, at::TensorList lists = {}) {
  bool dual = false;
  for (const auto* t : tensors) dual = dual || (t && t->defined() && t->_fw_grad(/*level=*/0).defined());
  for (const auto& t : lists) dual = dual || t._fw_grad(/*level=*/0).defined();
  TORCH_CHECK(!dual, "the raw fusedlayers ops do not support forward-mode AD (torch.func.jvp, jacfwd, "
              "torch.autograd.forward_ad): call them through fusedlayers.functional or the modules, which do");
}

// Whether t is being traced (torch.compile's fake and functional tensors): it has no values to read.
inline bool traced(const at::Tensor& t) {
  return t.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize}));
}

// Whether an upstream gradient is exactly 1 (loss.backward()), where that costs no device synchronization: read
// from a real CPU scalar only.
inline bool is_one(const at::Tensor& g) {
  if (!g.is_cpu() || g.dim() != 0 || traced(g)) return false;
  // read in place: item() is a dispatched op, a microsecond of a small loss's backward
  if (g.scalar_type() == at::kFloat) return *g.const_data_ptr<float>() == 1.0f;
  if (g.scalar_type() == at::kDouble) return *g.const_data_ptr<double>() == 1.0;
  return g.item<double>() == 1.0;
}

// Whether a gradient precomputed in the forward for an upstream gradient of 1, in x's dtype, may have overflowed
// where the actual one (scaled by g) would not: float16's range is small, so unless g is known on the host to be
// at least 1 in magnitude (reading it on a GPU would synchronize), the backward recomputes instead.
inline bool precomputed_may_overflow(const at::Tensor& x, const at::Tensor& g) {
  if (x.scalar_type() != at::kHalf) return false;
  if (!g.is_cpu() || g.dim() != 0 || traced(g)) return true;
  return !(std::abs(g.item<double>()) >= 1.0);
}

// The number of rows of x seen as a (rows, in_features) matrix.
inline int64_t dense_rows(const at::Tensor& x) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  return rows;
}

// A differentiable op's two kernels, registered from its family's TORCH_LIBRARY_FRAGMENT: the Autograd one
// (records the family's node) and, below autograd, the one that only computes.
template <typename Autograd, typename NoAutograd>
void impl_differentiable(torch::Library& m, const char* op, Autograd* autograd, NoAutograd* no_autograd) {
  m.impl(op, torch::dispatch(c10::DispatchKey::Autograd, autograd));
  m.impl(op, torch::dispatch(c10::DispatchKey::CompositeExplicitAutograd, no_autograd));
}

// A gradient written as a composite of ATen ops: differentiable again, and under vmap it decomposes too (as
// functorch does for ATen's composites), so its ops batch by their own rules instead of a per-sample loop.
template <typename Fn>
void impl_composite(torch::Library& m, const char* op, Fn* fn) {
  m.impl(op, torch::dispatch(c10::DispatchKey::CompositeImplicitAutograd, fn));
  m.impl(op, torch::dispatch(c10::DispatchKey::FuncTorchBatchedDecomposition, fn));
}

}  // namespace fusedlayers
