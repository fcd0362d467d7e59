// The mlp family's argument contract, the layout of what the native forward saves, and the layer-by-layer
// chain through the dense kernels (ops/mlp_chain.cpp) that CUDA uses always and the CPU for large layers.
//
// Native saved layout (what mlp_forward returns with save, and the fake kernel in fusedlayers/ops/mlp.py mirrors):
//   [h_1, ..., h_{L-1}]  the inputs of layers 1..L-1 (layer 0's is x), then
//   [z_l for every layer l whose f' is not constant]  the pre-activations.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <tuple>
#include <vector>

#include "backend.h"
#include "ops/dense.h"

namespace fusedlayers {

// The checks of every mlp kernel, with the messages of check_mlp_args in fusedlayers/ops/mlp.py; op names the
// caller.
inline void check_mlp_args(const at::Tensor& x, at::TensorList weights, at::TensorList biases, size_t num_activations,
                           const char* op = "mlp") {
  const size_t L = weights.size();
  TORCH_CHECK(L >= 1, op, "(): expected at least one layer, got an empty weights list");
  TORCH_CHECK(biases.empty() || biases.size() == L, op, "(): expected biases to be empty or one per layer (", L,
              "), got ", biases.size());
  TORCH_CHECK(num_activations == L, op, "(): expected one activation per layer (", L, "), got ", num_activations);
  TORCH_CHECK(x.dim() >= 1, op, "(): expected x to have at least 1 dimension, got a 0-dimensional tensor");
  // sym_size: size() of a tensor with a symbolic shape (torch.export) materializes, and so specializes, every dim
  c10::SymInt width = x.sym_size(-1);
  for (size_t i = 0; i < L; ++i) {
    const auto& w = weights[i];
    TORCH_CHECK(w.dim() == 2, op, "(): expected weights[", i, "] to be 2-D, got shape ", w.sizes());
    TORCH_CHECK(w.sym_size(1) == width, op, "(): expected weights[", i, "].size(1) == ", width,
                " (the width of the layer's input), got shape ", w.sizes());
    TORCH_CHECK(w.scalar_type() == x.scalar_type(), op, "(): expected weights[", i, "] to have the dtype of x (",
                py(x.scalar_type()), "), got ", py(w.scalar_type()));
    TORCH_CHECK(w.device() == x.device(), op, "(): expected weights[", i, "] on the device of x (", x.device(),
                "), got ", w.device());
    if (!biases.empty()) {
      const auto& b = biases[i];
      TORCH_CHECK(b.dim() == 1 && b.sym_size(0) == w.sym_size(0), op, "(): expected biases[", i, "] of shape [",
                  w.size(0), "], got ", b.sizes());
      TORCH_CHECK(b.scalar_type() == x.scalar_type(), op, "(): expected biases[", i, "] to have the dtype of x (",
                  py(x.scalar_type()), "), got ", py(b.scalar_type()));
      TORCH_CHECK(b.device() == x.device(), op, "(): expected biases[", i, "] on the device of x (", x.device(),
                  "), got ", b.device());
    }
    width = w.sym_size(0);
  }
  TORCH_CHECK(x.is_floating_point(), op, "(): expected x to be a floating-point tensor, got ", py(x.scalar_type()));
}

using MlpForwardResult = std::tuple<at::Tensor, std::vector<at::Tensor>>;
using MlpBackwardResult = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>;

// Layer by layer through the dense_forward / dense_backward ops (of any device).
MlpForwardResult mlp_chain_forward(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                                   std::vector<std::string> activations, bool save);
MlpBackwardResult mlp_chain_backward(const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights,
                                     at::TensorList biases, at::TensorList saved,
                                     std::vector<std::string> activations, bool input_grad);

// The flat layout of a network's parameters (the mlp_flat op; FusedMLP's one Parameter): layer after layer, its
// weight (out x in, row-major) then its bias (out), when the network has biases. sizes = [in, h1, ..., out].
int64_t flat_numel(at::IntArrayRef sizes, bool bias);
// The layers' weights and biases as views of a flat tensor (any 1-D strides) of that layout.
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> flat_layers(const at::Tensor& flat, at::IntArrayRef sizes,
                                                                         bool bias);
// The checks of every op and kernel on the flat layout (mlp_flat's messages).
void check_flat_args(const at::Tensor& x, const at::Tensor& params, at::IntArrayRef sizes, bool bias,
                     size_t num_activations);
// Per-layer gradients joined into one tensor of that layout (a copy; differentiable, for create_graph).
at::Tensor join_flat(const std::vector<at::Tensor>& dweights, const std::vector<at::Tensor>& dbiases);

// Whether a backend's kernels for x's device recompute the forward in their backward for this network: the
// autograd then does not ask the forward to save anything. Asked before the call, from concrete shapes, because
// the fake kernels must know at trace time what the forward saves. A backend's folder registers its answer at
// static initialization (csrc/cpu/mlp.cpp); a (backend, device) with none, and a traced x, save as asked.
// sizes = [x's width, every layer's output width].
using MlpRecomputesFn = bool (*)(const at::Tensor& x, at::IntArrayRef sizes);
bool register_mlp_recomputes(Backend backend, c10::DeviceType device, MlpRecomputesFn fn);
bool mlp_recomputes(Backend backend, const at::Tensor& x, at::IntArrayRef sizes);
bool mlp_recomputes(Backend backend, const at::Tensor& x, at::TensorList weights);

}  // namespace fusedlayers
