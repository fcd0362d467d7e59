// Argument checks and helpers shared by the CPU and CUDA kernels of the dense op family.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <string_view>

#include "activations.h"

namespace fusedlayers {

// An unknown name is a ValueError that lists the known ones.
inline Activation parse_activation(std::string_view name) {
  for (int i = 0; i < kNumActivations; ++i) {
    if (name == kActivationNames[i]) return static_cast<Activation>(i);
  }
  std::string known;
  for (int i = 0; i < kNumActivations; ++i) known += std::string(i ? ", " : "") + kActivationNames[i];
  TORCH_CHECK_VALUE(false, "unknown activation '", name, "'; expected one of: ", known);
}

// The activation table's kernels give f (order 0) to f'''; higher orders come from the differentiable
// torch formulas of fusedlayers/activations.py (the activation_derivative_formula op).
constexpr int64_t kMaxTableOrder = 3;

inline void check_derivative_order(int64_t order) {
  TORCH_CHECK_VALUE(order >= 0 && order <= kMaxTableOrder, "activation_derivative(): expected order 0 to ",
                    kMaxTableOrder, ", got ", order, "; higher orders are activation_derivative_formula's");
}

// activation_grad(grad, z): grad * f^(order)(z) elementwise, the two of one shape, dtype and device.
inline void check_activation_grad_args(const at::Tensor& grad, const at::Tensor& z) {
  TORCH_CHECK(grad.sizes() == z.sizes(), "activation_grad(): expected grad of the shape of z (", z.sizes(), "), got ",
              grad.sizes());
  TORCH_CHECK(grad.scalar_type() == z.scalar_type(), "activation_grad(): expected grad of the dtype of z (",
              z.scalar_type(), "), got ", grad.scalar_type());
  TORCH_CHECK(grad.device() == z.device(), "activation_grad(): expected grad on the device of z (", z.device(),
              "), got ", grad.device());
}

// The checks every dense kernel makes, with the same messages as the Python fake kernels.
inline void check_dense_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1, "dense(): expected x to have at least 1 dimension, got a 0-dimensional tensor");
  TORCH_CHECK(weight.dim() == 2, "dense(): expected weight to be 2-D (out_features, in_features), got shape ",
              weight.sizes());
  TORCH_CHECK(x.size(-1) == weight.size(1), "dense(): expected x.size(-1) == weight.size(1) (in_features), got x of shape ",
              x.sizes(), " and weight of shape ", weight.sizes());
  TORCH_CHECK(x.is_floating_point(), "dense(): expected x to be a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "dense(): expected weight to have the dtype of x (",
              x.scalar_type(), "), got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), "dense(): expected weight on the device of x (", x.device(), "), got ",
              weight.device());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0),
                "dense(): expected bias of shape [", weight.size(0), "] (out_features), got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "dense(): expected bias to have the dtype of x (",
                x.scalar_type(), "), got ", bias->scalar_type());
    TORCH_CHECK(bias->device() == x.device(), "dense(): expected bias on the device of x (", x.device(), "), got ",
                bias->device());
  }
}

// f^(order)(z) through the dispatcher (activation_derivative): differentiable to any order, in reverse and
// forward mode; orders past the activation table's come from the torch formulas (csrc/ops.cpp).
at::Tensor derivative(const at::Tensor& z, c10::string_view activation, int64_t order);

// An undefined tensor (a gradient autograd did not materialize) as an empty optional argument.
inline std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The number of rows of x seen as a (rows, in_features) matrix.
inline int64_t dense_rows(const at::Tensor& x) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  return rows;
}

// The shape of y (and of the saved pre-activation): x's with the last dimension out_features.
inline std::vector<int64_t> dense_output_shape(const at::Tensor& x, const at::Tensor& weight) {
  auto shape = x.sizes().vec();
  shape.back() = weight.size(0);
  return shape;
}

// The backward's own arguments: grad_out and (when given and needed) preact match y in shape, dtype, device.
inline void check_dense_backward_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& preact, bool uses_preact) {
  const auto shape = dense_output_shape(x, weight);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"grad_out", &grad_out},
                                {"preact", uses_preact ? &*preact : nullptr}}) {
    if (!t) continue;
    TORCH_CHECK(t->sizes() == c10::IntArrayRef(shape), "dense_backward(): expected ", name, " of shape ",
                c10::IntArrayRef(shape), ", got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "dense_backward(): expected ", name, " of dtype ",
                x.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == x.device(), "dense_backward(): expected ", name, " on the device of x (", x.device(),
                "), got ", t->device());
  }
}

}  // namespace fusedlayers
