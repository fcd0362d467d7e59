// The dense family's argument contract (the checks every backend's kernels make, with the messages of
// fusedlayers/ops/dense.py) and the shapes its kernels share.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <string_view>

#include "ops/activation.h"
#include "ops/common.h"

namespace fusedlayers {

inline void check_dense_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1, "dense(): expected x to have at least 1 dimension, got a 0-dimensional tensor");
  TORCH_CHECK(weight.dim() == 2, "dense(): expected weight to be 2-D (out_features, in_features), got shape ",
              weight.sizes());
  // sym_size: size() of a tensor with a symbolic shape (torch.export) materializes, and so specializes, every dim
  TORCH_CHECK(x.sym_size(-1) == weight.sym_size(1),
              "dense(): expected x.size(-1) == weight.size(1) (in_features), got x of shape ", x.sizes(),
              " and weight of shape ", weight.sizes());
  TORCH_CHECK(x.is_floating_point(), "dense(): expected x to be a floating-point tensor, got ", py(x.scalar_type()));
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "dense(): expected weight to have the dtype of x (",
              py(x.scalar_type()), "), got ", py(weight.scalar_type()));
  TORCH_CHECK(weight.device() == x.device(), "dense(): expected weight on the device of x (", x.device(), "), got ",
              weight.device());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0),
                "dense(): expected bias of shape [", weight.size(0), "] (out_features), got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "dense(): expected bias to have the dtype of x (",
                py(x.scalar_type()), "), got ", py(bias->scalar_type()));
    TORCH_CHECK(bias->device() == x.device(), "dense(): expected bias on the device of x (", x.device(), "), got ",
                bias->device());
  }
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
                py(x.scalar_type()), ", got ", py(t->scalar_type()));
    TORCH_CHECK(t->device() == x.device(), "dense_backward(): expected ", name, " on the device of x (", x.device(),
                "), got ", t->device());
  }
}

}  // namespace fusedlayers
