// What the CPU mlp kernels' two own paths share (csrc/cpu/mlp.cpp: the fused tiles and the choice of path;
// csrc/cpu/mlp_wide.cpp: the wide path).
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>

#include <algorithm>
#include <vector>

#include "activations.h"
#include "cpu/kernels.h"
#include "ops/common.h"
#include "ops/mlp.h"

namespace fusedlayers::cpu {

// Measured here (3 tanh layers of equal width, fwd+bwd, one thread, tiles vs the chain of dense kernels, with
// the tiles' weight gradients reduced in vector registers): the tiles take 0.65-0.8x the chain's time at width
// 32 up to 32 rows (16 rows in float64: 0.72x), break even at width 32 x 64 rows and width 16 x 256 rows
// (about 2e5 multiply-adds), and lose beyond (width 16 x 1000 rows: 1.2-1.3x; width 32 x 128 rows: 1.13x).
// Width 64 wins only for a single vector (0.9x) and loses at 8 rows (2x: a partial tile's products are not
// kept in registers), so the rule stops at width 32 and 2^17 multiply-adds.
constexpr int64_t kMaxFusedWidth = 32;
constexpr int64_t kMaxFusedMacs = 1 << 17;  // rows * multiply-adds per row

struct Shape {
  int64_t rows = 0;
  std::vector<int64_t> widths;  // n_0 (in), n_1, ..., n_L (out)
  int64_t macs_per_row = 0;
  MlpNetSizes sizes{0, 0};  // sum of the layers' output widths, widest layer
};

inline Shape shape_of(const at::Tensor& x, at::TensorList weights) {
  Shape s;
  s.rows = dense_rows(x);
  s.widths.push_back(x.size(-1));
  for (const auto& w : weights) {
    s.macs_per_row += w.size(0) * w.size(1);
    s.sizes.outputs += w.size(0);
    s.widths.push_back(w.size(0));
  }
  s.sizes.max_width = *std::max_element(s.widths.begin(), s.widths.end());
  return s;
}

inline bool takes_fused_path(const Shape& s) {
  return s.sizes.max_width <= kMaxFusedWidth && s.rows * s.macs_per_row <= kMaxFusedMacs;
}

// A per-thread buffer of at least n elements, kept between calls: a tiny network's whole call costs about as
// much as one heap allocation. The fused path's sizes are bounded (takes_fused_path), and the wide path's tiles
// by kWideTileBytes (at least 8 rows), and so is this.
template <typename M>
inline M* scratch(int64_t n) {
  thread_local std::vector<M> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// A CPU tensor of like's dtype, without the dispatcher's two hops of at::empty: the backward of a tiny network
// allocates one per parameter, and each hop costs about as much as a small layer's arithmetic.
// sum[i] += tile[i] for one tile's bias gradients, compensated (add_kahan), and tile[i] reset to 0.
template <typename T>
inline void add_compensated(T* sum, T* lost, T* tile, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    add_kahan(sum[i], lost[i], tile[i]);
    tile[i] = T(0);
  }
}

inline at::Tensor cpu_empty(c10::IntArrayRef shape, const at::Tensor& like) {
  return at::Tensor(at::detail::empty_cpu(shape, like.scalar_type()));
}

// The wide path (csrc/cpu/mlp_wide.cpp): float and double networks whose hidden layers cost few multiply-adds per
// element they produce. Its forward saves nothing; its backward recomputes the forward, accumulating into the
// zeroed dweights and dbiases, and writes dx unless it is undefined.
bool takes_wide_path(const Shape& s, at::ScalarType dtype);
void wide_forward(const Shape& s, const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                  const std::vector<Activation>& acts, at::Tensor& y);
void wide_backward(const Shape& s, const at::Tensor& x, const at::Tensor& grad_out, at::TensorList weights,
                   at::TensorList biases, const std::vector<Activation>& acts, at::Tensor& dx,
                   std::vector<at::Tensor>& dweights, std::vector<at::Tensor>& dbiases);

// The CPU kernels of mlp_forward and mlp_backward, for callers inside the CPU backend that evaluate one network
// many times (the ODE solve, csrc/cpu/odeint.cpp) and skip the dispatcher.
MlpForwardResult mlp_forward(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                             std::vector<std::string> activations, bool save);
MlpBackwardResult mlp_backward(const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights,
                               at::TensorList biases, at::TensorList saved, std::vector<std::string> activations,
                               bool input_grad);

}  // namespace fusedlayers::cpu
