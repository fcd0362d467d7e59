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

// sizes = [n_0, n_1, ..., n_L], the widths of x and of every layer's output.
inline Shape shape_of(const at::Tensor& x, at::IntArrayRef sizes) {
  Shape s;
  s.rows = dense_rows(x);
  s.widths = sizes.vec();
  for (size_t l = 0; l + 1 < sizes.size(); ++l) {
    s.macs_per_row += sizes[l] * sizes[l + 1];
    s.sizes.outputs += sizes[l + 1];
  }
  s.sizes.max_width = *std::max_element(s.widths.begin(), s.widths.end());
  return s;
}

inline Shape shape_of(const at::Tensor& x, at::TensorList weights) {
  std::vector<int64_t> sizes{x.size(-1)};
  for (const auto& w : weights) sizes.push_back(w.size(0));
  return shape_of(x, sizes);
}

inline bool takes_fused_path(const Shape& s) {
  return s.sizes.max_width <= kMaxFusedWidth && s.rows * s.macs_per_row <= kMaxFusedMacs;
}

// A network's weights (out x in, row-major) and biases as pointers in the math type M, read in place where the
// parameters already are M and contiguous (the usual case), else from converted copies kept here. From per-layer
// tensors, or from one tensor of the flat layout (ops/mlp.h) with no view per layer: for a tiny network each
// ATen call (a view is two) costs about as much as a layer's arithmetic.
template <typename M>
struct LayerPtrs {
  std::vector<at::Tensor> keep;
  std::vector<const M*> w, b;  // b empty without biases

  const M* read(const at::Tensor& t) {
    if (t.scalar_type() == c10::CppTypeToScalarType<M>::value && t.is_contiguous()) return t.template const_data_ptr<M>();
    return keep.emplace_back(t.to(c10::CppTypeToScalarType<M>::value).contiguous()).template const_data_ptr<M>();
  }
};

// Pointers at each layer's weight and bias in a buffer of the flat layout.
template <typename P>
void flat_offsets(P* base, at::IntArrayRef sizes, bool bias, std::vector<P*>& w, std::vector<P*>& b) {
  int64_t offset = 0;
  for (size_t l = 0; l + 1 < sizes.size(); ++l) {
    w.push_back(base + offset);
    offset += sizes[l] * sizes[l + 1];
    if (bias) b.push_back(base + offset);
    offset += bias ? sizes[l + 1] : 0;
  }
}

// Where a call's parameters are: per-layer tensors (flat undefined), or flat, one tensor of the flat layout.
struct Params {
  at::TensorList weights, biases;
  at::Tensor flat;
  at::IntArrayRef sizes;
  bool bias = false;

  template <typename M>
  LayerPtrs<M> read() const {
    LayerPtrs<M> p;
    if (flat.defined()) {
      flat_offsets(p.read(flat), sizes, bias, p.w, p.b);
      return p;
    }
    for (const auto& w : weights) p.w.push_back(p.read(w));
    for (const auto& b : biases) p.b.push_back(p.read(b));
    return p;
  }
};

// A per-thread buffer of at least n elements, kept between calls: a tiny network's whole call costs about as
// much as one heap allocation. The fused path's sizes are bounded (takes_fused_path), and the wide path's tiles
// by kWideTileBytes (at least 8 rows), and so is this.
template <typename M>
inline M* scratch(int64_t n) {
  thread_local std::vector<M> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// sum[i] += tile[i] for one tile's bias gradients, compensated (add_kahan), and tile[i] reset to 0.
template <typename T>
inline void add_compensated(T* sum, T* lost, T* tile, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    add_kahan(sum[i], lost[i], tile[i]);
    tile[i] = T(0);
  }
}

// A CPU tensor of like's dtype, without the dispatcher's two hops of at::empty: the backward of a tiny network
// allocates one per parameter, and each hop costs about as much as a small layer's arithmetic.
inline at::Tensor cpu_empty(c10::IntArrayRef shape, const at::Tensor& like) {
  return at::Tensor(at::detail::empty_cpu(shape, like.scalar_type()));
}

// The wide path (csrc/cpu/mlp_wide.cpp): float and double networks whose hidden layers cost few multiply-adds per
// element they produce. Its forward saves nothing; its backward recomputes the forward, accumulating into the
// zeroed dw and db, and writes dx unless it is null. x, grad_out, y and dx are contiguous (rows x width).
bool takes_wide_path(const Shape& s, at::ScalarType dtype);
template <typename T>
void wide_forward(const Shape& s, const LayerPtrs<T>& net, const std::vector<Activation>& acts, const T* x, T* y);
template <typename T>
void wide_backward(const Shape& s, const LayerPtrs<T>& net, const std::vector<Activation>& acts, const T* x,
                   const T* grad_out, T* dx, const std::vector<T*>& dw, const std::vector<T*>& db);

// The CPU kernels of mlp_forward and mlp_backward, for callers inside the CPU backend that evaluate one network
// many times (the ODE solve, csrc/cpu/odeint.cpp) and skip the dispatcher.
MlpForwardResult mlp_forward(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                             std::vector<std::string> activations, bool save);
MlpBackwardResult mlp_backward(const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights,
                               at::TensorList biases, at::TensorList saved, std::vector<std::string> activations,
                               bool input_grad);

}  // namespace fusedlayers::cpu
