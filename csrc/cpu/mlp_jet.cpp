// The CPU kernels of mlp_jet: the device-generic layer loop of csrc/ops/mlp_jet.cpp with each layer's
// elementwise step fused into one pass over the three planes (cpu/isa/jet.h), for float and double; other
// dtypes take the composite step.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/kernels.h"
#include "ops/mlp_jet.h"

namespace fusedlayers::cpu {
namespace {

// Elementwise passes split over threads in chunks of at least this many elements of a plane.
constexpr int64_t kJetGrain = 16384;

at::Tensor jet_activation(const at::Tensor& z, const std::string& activation, bool z2_zero) {
  const Activation a = parse_activation(activation);
  if (a == Activation::Identity) return z;
  at::Tensor h = at::empty_like(z);
  const int64_t plane = z.size(1) * z.size(2);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "mlp_jet", [&] {
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* hp = h.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, plane, kJetGrain, [&](int64_t begin, int64_t end) {
      kernels<scalar_t>().jet_forward_elements(a, zp + begin, hp + begin, end - begin, plane, z2_zero);
    });
  });
  return h;
}

at::Tensor jet_activation_backward(const at::Tensor& g, const at::Tensor& z, const std::string& activation,
                                   bool z2_zero) {
  const Activation a = parse_activation(activation);
  if (a == Activation::Identity) return g;
  at::Tensor dz = at::empty_like(z);
  const int64_t plane = z.size(1) * z.size(2);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "mlp_jet_backward", [&] {
    const at::Tensor gc = g.contiguous();
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* dp = dz.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, plane, kJetGrain, [&](int64_t begin, int64_t end) {
      kernels<scalar_t>().jet_backward_elements(a, gp + begin, zp + begin, dp + begin, end - begin, plane,
                                                 z2_zero);
    });
  });
  return dz;
}

const JetStep kFusedStep{&jet_activation, &jet_activation_backward, /*bias_in_place=*/true};

const JetStep& step_for(const at::Tensor& x) {
  const bool fused = x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble;
  return fused ? kFusedStep : kCompositeJetStep;
}

JetForwardResult mlp_jet_forward(const at::Tensor& x, const at::Tensor& direction, at::TensorList weights,
                                 at::TensorList biases, std::vector<std::string> activations) {
  return jet_forward_kernel(x, direction, weights, biases, activations, step_for(x));
}

JetGrads mlp_jet_backward(const std::optional<at::Tensor>& grad_u, const std::optional<at::Tensor>& grad_du,
                          const std::optional<at::Tensor>& grad_d2u, const at::Tensor& x, const at::Tensor& direction,
                          at::TensorList weights, at::TensorList biases, at::TensorList saved,
                          std::vector<std::string> activations, std::array<bool, 3> mask) {
  return jet_backward_kernel(grad_u, grad_du, grad_d2u, x, direction, weights, biases, saved, activations, mask,
                             step_for(x));
}

}  // namespace
}  // namespace fusedlayers::cpu

TORCH_LIBRARY_IMPL(fusedlayers, CPU, m) {
  m.impl("mlp_jet_forward", &fusedlayers::cpu::mlp_jet_forward);
  m.impl("mlp_jet_backward", &fusedlayers::cpu::mlp_jet_backward);
}
