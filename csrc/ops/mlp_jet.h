// The mlp_jet family's argument contract and its device-generic kernels (csrc/ops/mlp_jet.cpp), which a
// backend's kernels (csrc/cpu/mlp_jet.cpp) run with their own elementwise step.
//
// Layout: a jet is a (3, rows, width) tensor, planes 0, 1, 2 = value, first, second derivative.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "ops/mlp.h"

namespace fusedlayers {

// The checks of every mlp_jet kernel, with the messages of check_jet_args in fusedlayers/ops/mlp_jet.py.
void check_jet_args(const at::Tensor& x, const at::Tensor& direction, at::TensorList weights, at::TensorList biases,
                    size_t num_activations);

// A layer's elementwise step: the activation's jet (f(z0), f'(z0) z1, f''(z0) z1^2 + f'(z0) z2) of a
// pre-activation jet z, and its vector-Jacobian product (the gradient w.r.t. z of <g, step(z)>). z2_zero: z's d2
// plane is zero by construction (no curved activation below): its terms are left out, never multiplied (an inf
// f' or upstream times that 0 is NaN where torch's graph has no such term). bias_in_place:
// the bias may be added into the GEMM's output (not under vmap, which cannot add a batched bias into an
// unbatched tensor in place).
struct JetStep {
  at::Tensor (*forward)(const at::Tensor& z, const std::string& activation, bool z2_zero);
  at::Tensor (*backward)(const at::Tensor& g, const at::Tensor& z, const std::string& activation, bool z2_zero);
  bool bias_in_place;
};

// ATen ops and activation_derivative: any device and dtype, differentiable to any order.
extern const JetStep kCompositeJetStep;

using JetForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>>;
using JetGrads = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>;

// The mlp_jet_forward and mlp_jet_backward kernels with the given elementwise step.
JetForwardResult jet_forward_kernel(const at::Tensor& x, const at::Tensor& direction, at::TensorList weights,
                                    at::TensorList biases, const std::vector<std::string>& activations,
                                    const JetStep& step);
JetGrads jet_backward_kernel(const std::optional<at::Tensor>& grad_u, const std::optional<at::Tensor>& grad_du,
                             const std::optional<at::Tensor>& grad_d2u, const at::Tensor& x,
                             const at::Tensor& direction, at::TensorList weights, at::TensorList biases,
                             at::TensorList saved, const std::vector<std::string>& activations,
                             std::array<bool, 3> mask, const JetStep& step);

}  // namespace fusedlayers
