// The activation family: activation names, and the derivative ops every higher-order gradient is made of
// (activation_derivative, activation_grad; csrc/ops/activation.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <string>
#include <string_view>
#include <vector>

#include "activations.h"
#include "ops/common.h"

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

inline std::vector<Activation> parse_activations(const std::vector<std::string>& names) {
  std::vector<Activation> acts;
  acts.reserve(names.size());
  for (const auto& n : names) acts.push_back(parse_activation(n));
  return acts;
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
              py(z.scalar_type()), "), got ", py(grad.scalar_type()));
  TORCH_CHECK(grad.device() == z.device(), "activation_grad(): expected grad on the device of z (", z.device(),
              "), got ", grad.device());
}

// f^(order)(z) through the dispatcher (activation_derivative): differentiable to any order, in reverse and
// forward mode; orders past the activation table's come from the torch formulas.
at::Tensor derivative(const at::Tensor& z, c10::string_view activation, int64_t order);

// grad * f^(order)(z) through the dispatcher (activation_grad): one node and one pass, differentiable to any order;
// zeros where f^(order) is identically zero (relu's orders past the first), as torch's own double backward.
at::Tensor derivative_times(const at::Tensor& grad, const at::Tensor& z, c10::string_view activation, int64_t order);

}  // namespace fusedlayers
