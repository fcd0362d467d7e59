// The mlp op family on the CPU.
//
// Narrow, small networks (takes_fused_path) run the whole chain in one call: a tile of kMlpTileRows rows at a
// time through every layer (the kernels in cpu/isa/mlp_tile.h), its activations in a small workspace that stays
// in L1, no ATen call but the output allocations. Their backward recomputes each tile's forward rather than
// saving it: for such layers the recompute costs less than allocating and reading back the saved
// activations. One thread: the path is chosen only for work too small to split (see the rule below).
// Wider networks with few multiply-adds per hidden element (memory-bound ones: wide layers fed by narrow ones)
// take the wide path: row tiles sized for L2 through every layer with BLAS GEMMs, one parallel region, the
// backward again recomputing each tile's forward, so no (rows x width) intermediate is ever materialized.
// The rest go layer by layer through the dense kernels (ops/mlp_chain.cpp), saving what eager PyTorch saves.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <optional>
#include <utility>
#include <vector>

#include "cpu/mlp.h"
#include "ops/mlp.h"

namespace fusedlayers::cpu {
namespace {

// The network in the math type M, as the tile kernels read it.
template <typename M>
struct Net {
  const Shape& shape;
  const LayerPtrs<M>& params;
  const std::vector<Activation>& acts;
  MlpNet<M> view() const {
    return {static_cast<int64_t>(acts.size()), shape.widths.data(), acts.data(), params.w.data(),
            params.b.empty() ? nullptr : params.b.data(), shape.sizes};
  }
  // Elements of the tile kernels' workspace for tiles of R rows (see MlpNetSizes).
  int64_t workspace(int64_t R) const { return 2 * (shape.sizes.outputs + shape.sizes.max_width) * R; }
};

// Rows per tile: kMlpTileRows, or all of them when fewer (a single vector computes one lane, not 32).
int64_t tile_rows(const Shape& s) { return std::max<int64_t>(1, std::min(kMlpTileRows, s.rows)); }

// Rows [r0, r0 + count) of a row-major (rows, width) matrix into a feature-major (width x R) tile, zero-padded.
template <typename M, typename T>
void load_tile(const T* src, int64_t r0, int64_t count, int64_t width, int64_t R, M* tile) {
  std::fill(tile, tile + width * R, M(0));
  for (int64_t r = 0; r < count; ++r)
    for (int64_t k = 0; k < width; ++k) tile[k * R + r] = M(src[(r0 + r) * width + k]);
}

template <typename M, typename T>
void store_tile(const M* tile, int64_t r0, int64_t count, int64_t width, int64_t R, T* dst) {
  for (int64_t r = 0; r < count; ++r)
    for (int64_t k = 0; k < width; ++k) dst[(r0 + r) * width + k] = T(tile[k * R + r]);
}

template <typename T>
void fused_forward(const Shape& s, const Net<at::opmath_type<T>>& net, const T* x, T* y) {
  using M = at::opmath_type<T>;
  const auto view = net.view();
  const int64_t R = tile_rows(s), in = s.widths.front(), out = s.widths.back();
  M* ws = scratch<M>(net.workspace(R) + (in + out) * R);
  M* xt = ws + net.workspace(R);
  M* yt = xt + in * R;
  for (int64_t r0 = 0; r0 < s.rows; r0 += R) {
    const int64_t count = std::min(R, s.rows - r0);
    load_tile(x, r0, count, in, R, xt);
    kernels<M>().mlp_tile_forward(view, R, ws, xt, yt);
    store_tile(yt, r0, count, out, R, y);
  }
}

// Gradients of every layer's weights and biases, and of x when dx is not null.
template <typename T>
void fused_backward(const Shape& s, const Net<at::opmath_type<T>>& net, const T* x, const T* grad_out, T* dx,
                    std::vector<T*>& dw, std::vector<T*>& db) {
  using M = at::opmath_type<T>;
  const auto view = net.view();
  const int64_t L = view.layers, in = s.widths.front(), out = s.widths.back();
  int64_t w_size = 0, b_size = 0;
  for (int64_t l = 0; l < L; ++l) {
    w_size += s.widths[l] * s.widths[l + 1];
    b_size += s.widths[l + 1];
  }
  const int64_t R = tile_rows(s);
  // every layer's dW, then every layer's db; the tile's db and the rounding error of db's running sum
  M* acc = scratch<M>(w_size + 3 * b_size + net.workspace(R) + (2 * in + out) * R);
  std::fill(acc, acc + w_size + 3 * b_size, M(0));
  M* db_tile = acc + w_size + b_size;
  M* db_lost = db_tile + b_size;
  M* ws = db_lost + b_size;
  M* xt = ws + net.workspace(R);
  M* gt = xt + in * R;
  M* dxt = gt + out * R;
  for (int64_t r0 = 0; r0 < s.rows; r0 += R) {
    // the last tile as narrow as its rows: zero-padded rows would add 0 * f'(W 0) to dW, NaN at an inf weight
    const int64_t count = std::min(R, s.rows - r0);
    load_tile(x, r0, count, in, count, xt);
    load_tile(grad_out, r0, count, out, count, gt);
    kernels<M>().mlp_tile_backward(view, count, ws, xt, gt, dx ? dxt : nullptr, acc, db.empty() ? nullptr : db_tile);
    if (dx) store_tile(dxt, r0, count, in, count, dx);
    if (!db.empty()) add_compensated(acc + w_size, db_lost, db_tile, b_size);
  }
  int64_t w_off = 0, b_off = w_size;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t nw = s.widths[l] * s.widths[l + 1], nb = s.widths[l + 1];
    std::copy(acc + w_off, acc + w_off + nw, dw[l]);
    if (!db.empty()) std::copy(acc + b_off, acc + b_off + nb, db[l]);
    w_off += nw;
    b_off += nb;
  }
}

void check_cpu_dtype(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || x.scalar_type() == at::kBFloat16,
              "mlp(): the CPU backend supports float32, float64 and bfloat16 x, got ", x.scalar_type());
}

// The fused path, or the wide one (float and double only) when wide.
template <typename T>
void run_forward(const Shape& s, bool wide, const LayerPtrs<at::opmath_type<T>>& p,
                 const std::vector<Activation>& acts, const T* x, T* y) {
  if constexpr (std::is_same_v<at::opmath_type<T>, T>) {
    if (wide) return wide_forward(s, p, acts, x, y);
  }
  fused_forward<T>(s, {s, p, acts}, x, y);
}

template <typename T>
void run_backward(const Shape& s, bool wide, const LayerPtrs<at::opmath_type<T>>& p,
                  const std::vector<Activation>& acts, const T* x, const T* grad_out, T* dx, std::vector<T*>& dw,
                  std::vector<T*>& db) {
  if constexpr (std::is_same_v<at::opmath_type<T>, T>) {
    if (wide) return wide_backward(s, p, acts, x, grad_out, dx, dw, db);
  }
  fused_backward<T>(s, {s, p, acts}, x, grad_out, dx, dw, db);
}

// The fused or the wide path (wide), whichever takes_fused_path / takes_wide_path chose, for params.
at::Tensor path_forward(const Shape& s, bool wide, const at::Tensor& x, const Params& params,
                        const std::vector<std::string>& activations) {
  const auto acts = parse_activations(activations);
  auto out_shape = x.sizes().vec();
  out_shape.back() = s.widths.back();
  at::Tensor y = cpu_empty(out_shape, x);
  const at::Tensor xc = x.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "mlp_forward", [&] {
    run_forward(s, wide, params.read<at::opmath_type<scalar_t>>(), acts, xc.const_data_ptr<scalar_t>(),
                y.data_ptr<scalar_t>());
  });
  return y;
}

// The backward of either path into preallocated gradients (zeroed for the wide path, which accumulates): dw and
// db give each layer's place for a scalar type, in per-layer tensors or in one of the flat layout. dx is written
// unless undefined.
template <typename GradPtrs>
void path_backward(const Shape& s, bool wide, const at::Tensor& grad_out, const at::Tensor& x, const Params& params,
                   const std::vector<std::string>& activations, at::Tensor& dx, const GradPtrs& grad_ptrs) {
  auto out_shape = x.sizes().vec();
  out_shape.back() = s.widths.back();
  TORCH_CHECK(grad_out.sizes() == c10::IntArrayRef(out_shape), "mlp_backward(): expected grad_out of shape ",
              c10::IntArrayRef(out_shape), ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "mlp_backward(): expected grad_out of dtype ",
              x.scalar_type(), ", got ", grad_out.scalar_type());
  const auto acts = parse_activations(activations);
  const at::Tensor xc = x.contiguous(), gc = grad_out.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "mlp_backward", [&] {
    std::vector<scalar_t*> dw, db;
    grad_ptrs(dw, db);
    run_backward(s, wide, params.read<at::opmath_type<scalar_t>>(), acts, xc.const_data_ptr<scalar_t>(),
                 gc.const_data_ptr<scalar_t>(), dx.defined() ? dx.data_ptr<scalar_t>() : nullptr, dw, db);
  });
}

// Which path takes a call, after the CPU's dtype check: nothing when the chain of dense kernels does (it alone
// saves the forward's intermediates: a forward asked to save them, or a backward given them), else whether it is
// the wide path (or the fused one).
std::optional<bool> own_path(const Shape& s, const at::Tensor& x, bool saves) {
  check_cpu_dtype(x);
  const bool wide = !saves && takes_wide_path(s, x.scalar_type());
  if (saves || !(wide || takes_fused_path(s))) return std::nullopt;
  return wide;
}

}  // namespace

MlpForwardResult mlp_forward(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                             std::vector<std::string> activations, bool save) {
  check_mlp_args(x, weights, biases, activations.size());
  const Shape s = shape_of(x, weights);
  const auto wide = own_path(s, x, save);
  if (!wide) return mlp_chain_forward(x, weights, biases, activations, save);
  return {path_forward(s, *wide, x, Params{weights, biases}, activations), {}};
}

MlpBackwardResult mlp_backward(const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights,
                               at::TensorList biases, at::TensorList saved, std::vector<std::string> activations,
                               bool input_grad) {
  check_mlp_args(x, weights, biases, activations.size());
  const Shape s = shape_of(x, weights);
  const auto wide = own_path(s, x, !saved.empty());
  if (!wide) return mlp_chain_backward(grad_out, x, weights, biases, saved, activations, input_grad);
  at::Tensor dx = input_grad ? cpu_empty(x.sizes(), x) : at::Tensor();
  std::vector<at::Tensor> dweights, dbiases;
  for (const auto& w : weights) dweights.push_back(*wide ? at::zeros(w.sizes(), w.options()) : cpu_empty(w.sizes(), w));
  for (const auto& b : biases) dbiases.push_back(*wide ? at::zeros(b.sizes(), b.options()) : cpu_empty(b.sizes(), b));
  path_backward(s, *wide, grad_out, x, Params{weights, biases}, activations, dx, [&](auto& dw, auto& db) {
    using P = typename std::remove_reference_t<decltype(dw)>::value_type;
    for (auto& t : dweights) dw.push_back(static_cast<P>(t.data_ptr()));
    for (auto& t : dbiases) db.push_back(static_cast<P>(t.data_ptr()));
  });
  return {dx, dweights, dbiases};
}

namespace {

// mlp_forward and mlp_backward for parameters in the flat layout: the fused and wide paths read the layers from it
// and write the gradients into one tensor of that layout, with no view per layer and no join.
MlpForwardResult mlp_flat_forward(const at::Tensor& x, const at::Tensor& params, at::IntArrayRef sizes, bool bias,
                                  std::vector<std::string> activations, bool save) {
  check_flat_args(x, params, sizes, bias, activations.size());
  const Shape s = shape_of(x, sizes);
  const auto wide = own_path(s, x, save);
  if (!wide) {
    const auto [weights, biases] = flat_layers(params, sizes, bias);
    return mlp_chain_forward(x, weights, biases, activations, save);
  }
  return {path_forward(s, *wide, x, Params{{}, {}, params, sizes, bias}, activations), {}};
}

std::tuple<at::Tensor, at::Tensor> mlp_flat_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                     const at::Tensor& params, at::TensorList saved,
                                                     at::IntArrayRef sizes, bool bias,
                                                     std::vector<std::string> activations, bool input_grad) {
  check_flat_args(x, params, sizes, bias, activations.size());
  const Shape s = shape_of(x, sizes);
  const auto wide = own_path(s, x, !saved.empty());
  if (!wide) {
    const auto [weights, biases] = flat_layers(params, sizes, bias);
    auto [dx, dweights, dbiases] = mlp_chain_backward(grad_out, x, weights, biases, saved, activations, input_grad);
    return {dx, join_flat(dweights, dbiases)};
  }
  at::Tensor dx = input_grad ? cpu_empty(x.sizes(), x) : at::Tensor();
  const int64_t numel = flat_numel(sizes, bias);
  at::Tensor dparams = *wide ? at::zeros({numel}, x.options()) : cpu_empty({numel}, x);
  path_backward(s, *wide, grad_out, x, Params{{}, {}, params, sizes, bias}, activations, dx, [&](auto& dw, auto& db) {
    using P = typename std::remove_reference_t<decltype(dw)>::value_type;
    flat_offsets(static_cast<P>(dparams.data_ptr()), sizes, bias, dw, db);
  });
  return {dx, dparams};
}

// The fused and wide CPU paths recompute in their backward whatever the forward would save: the autograd asks this
// before deciding to save (ops/mlp.h).
bool recomputes(const at::Tensor& x, at::IntArrayRef sizes) {
  const Shape s = shape_of(x, sizes);
  return takes_fused_path(s) || takes_wide_path(s, x.scalar_type());
}

const bool kRecomputesRegistered = register_mlp_recomputes(Backend::Native, c10::DeviceType::CPU, &recomputes);

}  // namespace
}  // namespace fusedlayers::cpu

TORCH_LIBRARY_IMPL(fusedlayers, CPU, m) {
  m.impl("mlp_forward", &fusedlayers::cpu::mlp_forward);
  m.impl("mlp_backward", &fusedlayers::cpu::mlp_backward);
  m.impl("mlp_flat_forward", &fusedlayers::cpu::mlp_flat_forward);
  m.impl("mlp_flat_backward", &fusedlayers::cpu::mlp_flat_backward);
}

