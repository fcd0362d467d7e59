// The hot loops of the CPU backend, compiled once per instruction set (kernels_{default,avx2,avx512}.cpp)
// and chosen at run time, so the library runs on any x86-64 CPU and uses the widest vectors it has:
//   - the elementwise passes of the dense op over a range of rows of a row-major (rows, cols) matrix;
//   - the fused mlp: a tile of kMlpTileRows rows through a whole narrow network, feature-major (row index
//     innermost), so every loop runs across the tile's rows in vector lanes;
//   - the second-order Taylor jet of an activation (mlp_jet), over three planes of elements;
//   - softmax cross-entropy, one row of logits at a time.
#pragma once

#include <cstdint>
#include <limits>

#include "activations.h"

namespace fusedlayers::cpu {

// sum += term, compensated (Kahan): lost holds the rounding error to take back next time, none once the sum is
// inf or NaN (inf - inf would make every later sum NaN). A plain running float32 sum over
// thousands of rows (gradient terms often share a sign) was several times less accurate than torch's cascade sum.
template <typename M>
inline void add_kahan(M& sum, M& lost, M term) {
  const M t = term - lost;
  const M next = sum + t;
  const M err = (next - sum) - t;
  lost = next - next == M(0) ? err : M(0);
  sum = next;
}

constexpr int64_t kMlpTileRows = 32;

// What the tile kernels' workspace is made of: every layer's output h and pre-activation z (outputs =
// widths[1] + ... + widths[L] rows of the tile each), then the gradient flowing back and dz (max_width rows
// each), so 2 * (outputs + max_width) * R elements for a tile of R rows.
struct MlpNetSizes {
  int64_t outputs;
  int64_t max_width;
};

// A narrow network in the math type M (float or double): layer l maps widths[l] -> widths[l + 1] with the
// row-major weights w[l] (widths[l + 1] x widths[l]), biases b[l] (b null without biases), activation acts[l].
template <typename M>
struct MlpNet {
  int64_t layers;
  const int64_t* widths;
  const Activation* acts;
  const M* const* w;
  const M* const* b;
  MlpNetSizes sizes;
};

// One row of softmax cross-entropy in the math type M (the formulas of csrc/ops/cross_entropy.cpp): x holds the row's C
// logits; weight is null (every class weighs 1) or holds C class weights summing to weight_sum; softcap 0
// means none; target is the row's class, or -1 when the row is ignored.
template <typename M>
struct CeRow {
  const M* x;
  int64_t C;
  const M* weight;
  M weight_sum;
  int64_t target;
  M label_smoothing;
  M z_loss;
  M softcap;
};

// The row's softmax as p = exp((z - shift) - log_norm): the forward's (max, log of the sum of exp(z - max)),
// exact at any logit scale, where lse = shift + log_norm is rounded at the scale of the max.
template <typename M>
struct CeSoftmax {
  M shift;
  M log_norm;
  // +inf with a +inf logit and no NaN (shift is NaN with one), as torch.logsumexp (shift + log_norm is inf + nan)
  M lse() const { return shift == std::numeric_limits<M>::infinity() ? shift : shift + log_norm; }
};

// One instruction set's CPU kernels for the math type T (float or double), a function pointer each: every
// instruction set fills one such table, isa_X::table<T>() (kernels_isa.h), and kernels<T>() is this CPU's.
// A new kernel is a member here, its definition in its family's cpu/isa/*.h and its entry in that table.
template <typename T>
struct Kernels {
  // The dense op (cpu/isa/dense.h), over the rows [begin, end) of row-major (rows, cols) matrices.
  // y = f(z + bias); z + bias is written back into z when store_z (z and y may alias when not).
  void (*dense_forward_rows)(Activation a, const T* bias, T* z, T* y, int64_t begin, int64_t end, int64_t cols,
                             bool store_z);
  // dz = g * f'(z); db[c] += sum over the rows of dz[., c] when db is not null.
  void (*dense_backward_rows)(Activation a, const T* g, const T* z, T* dz, T* db, int64_t begin, int64_t end,
                              int64_t cols);
  // out = f^(order)(z) for order 0 to 3, over n elements; times g elementwise unless g is null.
  void (*activation_elements)(Activation a, int order, const T* g, const T* z, T* out, int64_t n);

  // The jet of f along a direction (cpu/isa/jet.h): z and h hold three planes (value, first and second
  // derivative) of n elements each, `plane` elements apart: h = (f(z0), f'(z0) z1, f''(z0) z1^2 + f'(z0) z2);
  // z2_zero: the z2 plane is zero by construction and its terms are left out (JetStep, ops/mlp_jet.h).
  void (*jet_forward_elements)(Activation a, const T* z, T* h, int64_t n, int64_t plane, bool z2_zero);
  // Its vector-Jacobian product: dz = the gradient w.r.t. (z0, z1, z2) of <g, h>, planes as above.
  void (*jet_backward_elements)(Activation a, const T* g, const T* z, T* dz, int64_t n, int64_t plane,
                                bool z2_zero);

  // The fused mlp (cpu/isa/mlp_tile.h). Tiles are feature-major: x (widths[0] x R), y (widths[L] x R),
  // R <= kMlpTileRows rows.
  void (*mlp_tile_forward)(const MlpNet<T>& net, int64_t R, T* workspace, const T* x, T* y);
  // Adds the tile's weight and bias gradients into dw (all layers' dW flat, layer after layer) and db (null
  // without biases); writes dx (widths[0] x R) unless null. Rows of g that are zero contribute nothing.
  void (*mlp_tile_backward)(const MlpNet<T>& net, int64_t R, T* workspace, const T* x, const T* g, T* dx, T* dw,
                            T* db);

  // Softmax cross-entropy (cpu/isa/cross_entropy.h). Returns the row's loss and stores its softmax's (max,
  // log-sum), whose sum is its logsumexp, in *softmax: one pass, online max.
  T (*ce_forward_row)(const CeRow<T>& row, CeSoftmax<T>* softmax);
  // That (max, log-sum) alone: the same pass, the same bits, without the loss.
  CeSoftmax<T> (*ce_softmax_row)(const CeRow<T>& row);
  // grad (C values) = d(grad_loss * loss + grad_lse * lse) / dx, one pass; grad may be row.x itself.
  void (*ce_backward_row)(const CeRow<T>& row, CeSoftmax<T> softmax, T grad_loss, T grad_lse, T* grad);
  // With class probabilities `target` (C values) in place of row.target: the row's loss, its (max, log-sum) in
  // *softmax; and grad (C values, not row.x) = d(grad_loss * loss + grad_lse * lse) / dx.
  T (*ce_soft_forward_row)(const CeRow<T>& row, const T* target, CeSoftmax<T>* softmax);
  void (*ce_soft_backward_row)(const CeRow<T>& row, const T* target, CeSoftmax<T> softmax, T grad_loss, T grad_lse,
                               T* grad);
};

// Each instruction set's table, for T = float and double (defined by kernels_{default,avx2,avx512}.cpp).
namespace isa_default {
template <typename T>
const Kernels<T>& table();
}
namespace isa_avx2 {
template <typename T>
const Kernels<T>& table();
}
namespace isa_avx512 {
template <typename T>
const Kernels<T>& table();
}

// The table of the widest instruction set this CPU runs (capped by FUSEDLAYERS_CPU_ISA), chosen once at first
// use; defined in kernels.cpp for float and double.
template <typename T>
const Kernels<T>& kernels();

// True when this CPU runs the kernels of that instruction set.
bool cpu_has_avx2();
bool cpu_has_avx512();

}  // namespace fusedlayers::cpu
