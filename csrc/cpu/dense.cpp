// The dense op family on the CPU: y = f(x @ W.T + b) and its manual gradient.
//
// Small layers (few multiply-adds) run as plain loops in one thread with no ATen call but the output
// allocations: there, dispatch and GEMM set-up cost more than the arithmetic. Larger layers use ATen's GEMM
// (MKL/OpenBLAS) and one vectorized, parallel pass for bias + activation (forward) or for g * f'(z) and the
// bias gradient (backward).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "cpu/kernels.h"
#include "ops/dense.h"

namespace fusedlayers::cpu {

namespace {

// Layers with at most this many multiply-adds per call, and this many outputs, take the plain-loop path. Its
// activation is scalar (a tanh costs ~13 ns there against ~0.5 ns vectorized): a 256 x 1 -> 32 tanh layer
// took 106 us that way against 4 us for its GEMM, so many outputs go to the vectorized path.
constexpr int64_t kSmallLayerMacs = 16384;
constexpr int64_t kSmallLayerOutputs = 1024;
// Elements per parallel chunk of an elementwise pass.
constexpr int64_t kElementsPerTask = 32768;

bool is_small(int64_t rows, int64_t in, int64_t out) {
  return rows * in * out <= kSmallLayerMacs && rows * out <= kSmallLayerOutputs;
}

int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(cols, 1)); }

void check_cpu_dtype(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || x.scalar_type() == at::kBFloat16,
              "dense(): the CPU backend supports float32, float64 and bfloat16 x, got ", x.scalar_type());
}

// The vectorized passes run in float or double; bfloat16 goes through float copies.
at::ScalarType math_dtype(at::ScalarType t) { return t == at::kBFloat16 ? at::kFloat : t; }

// ---- the small-layer path: all of it in plain loops -------------------------------------------------------

template <typename M, typename T>
M dot(const T* a, const T* b, int64_t n) {
  M acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < n; ++k) acc += M(a[k]) * M(b[k]);
  return acc;
}

template <typename Act, typename T>
void small_forward(const T* x, const T* w, const T* b, T* z, T* y, int64_t rows, int64_t in, int64_t out) {
  using M = at::opmath_type<T>;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t o = 0; o < out; ++o) {
      M v = (b ? M(b[o]) : M(0)) + dot<M>(x + r * in, w + o * in, in);
      if (z) z[r * out + o] = T(v);
      y[r * out + o] = T(Act::f(v));
    }
  }
}

// z null: recompute it. Any of dx, dw, db may be null (not wanted).
template <typename Act, typename T>
void small_backward(const T* g, const T* x, const T* w, const T* b, const T* z, T* dx, T* dw, T* db, int64_t rows,
                    int64_t in, int64_t out) {
  using M = at::opmath_type<T>;
  std::vector<M> dz(out), dx_row(dx ? in : 0), dw_acc(dw ? out * in : 0), db_acc(db ? out : 0);
  std::vector<M> dw_lost(dw_acc.size()), db_lost(db_acc.size());
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * in;
    for (int64_t o = 0; o < out; ++o) {
      M zv = z ? M(z[r * out + o]) : (b ? M(b[o]) : M(0)) + dot<M>(xr, w + o * in, in);
      dz[o] = times_df<Act>(M(g[r * out + o]), zv);
      if (db) add_kahan(db_acc[o], db_lost[o], dz[o]);
    }
    if (dx) {
      std::fill(dx_row.begin(), dx_row.end(), M(0));
      for (int64_t o = 0; o < out; ++o) {
        const T* wo = w + o * in;
#pragma omp simd
        for (int64_t k = 0; k < in; ++k) dx_row[k] += dz[o] * M(wo[k]);
      }
      for (int64_t k = 0; k < in; ++k) dx[r * in + k] = T(dx_row[k]);
    }
    if (dw) {
      for (int64_t o = 0; o < out; ++o) {
        M* acc = dw_acc.data() + o * in;
        M* lost = dw_lost.data() + o * in;
#pragma omp simd
        for (int64_t k = 0; k < in; ++k) add_kahan(acc[k], lost[k], dz[o] * M(xr[k]));
      }
    }
  }
  if (dw) std::copy(dw_acc.begin(), dw_acc.end(), dw);
  if (db) std::copy(db_acc.begin(), db_acc.end(), db);
}

// A buffer shaped like t for a temporary that never leaves the op (the backward's dz), reused across calls
// on this thread: a fresh allocation of tens of MB is returned to the OS when freed, and touching it again
// costs page faults that here exceed the elementwise pass itself. Up to kMaxReusedScratchBytes is kept until
// the thread ends; never shared between threads; dz is dead before the op returns, so calls cannot see
// each other's.
at::Tensor reusable_scratch(const at::Tensor& t) {
  constexpr int64_t kMaxReusedScratchBytes = int64_t(256) << 20;
  thread_local at::Tensor bytes;
  const int64_t needed = t.numel() * t.element_size();
  if (needed > kMaxReusedScratchBytes) return at::empty_like(t);
  if (!bytes.defined() || bytes.numel() < needed) bytes = at::empty({needed}, t.options().dtype(at::kByte));
  return bytes.narrow(0, 0, needed).view(t.scalar_type()).view(t.sizes());
}

// ---- the ops ----------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> dense_forward(const at::Tensor& x, const at::Tensor& weight,
                                                 const std::optional<at::Tensor>& bias, c10::string_view activation,
                                                 bool save_preact) {
  check_dense_args(x, weight, bias);
  check_cpu_dtype(x);
  const Activation a = parse_activation(activation);
  const bool store_z = save_preact && !derivative_is_constant(a);
  const int64_t in = weight.size(1), out = weight.size(0), rows = dense_rows(x);
  const auto out_shape = dense_output_shape(x, weight);
  at::Tensor bias_c = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  at::Tensor y, z;

  if (is_small(rows, in, out)) {
    at::Tensor xc = x.contiguous(), wc = weight.contiguous();
    y = at::empty(out_shape, x.options());
    z = store_z ? at::empty(out_shape, x.options()) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "dense_forward", [&] {
      dispatch_activation(a, [&](auto act) {
        small_forward<decltype(act)>(xc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
                                     bias_c.defined() ? bias_c.data_ptr<scalar_t>() : nullptr,
                                     store_z ? z.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), rows, in, out);
      });
    });
  } else {
    const auto math = math_dtype(x.scalar_type());
    // A bfloat16 GEMM rounds its result: the bias goes inside it, as in eager's addmm, not after that rounding
    // (which doubled the error of smooth activations against eager's under autocast).
    const bool bias_in_gemm = bias_c.defined() && x.scalar_type() == at::kBFloat16;
    const at::Tensor x2 = x.reshape({rows, in});
    z = (bias_in_gemm ? at::addmm(bias_c, x2, weight.t()) : at::mm(x2, weight.t())).to(math);
    y = store_z ? at::empty_like(z) : z;
    if ((bias_c.defined() && !bias_in_gemm) || a != Activation::Identity) {
      at::Tensor b = bias_c.defined() && !bias_in_gemm ? bias_c.to(math) : at::Tensor();
      AT_DISPATCH_FLOATING_TYPES(math, "dense_forward", [&] {
        const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
        scalar_t* zp = z.data_ptr<scalar_t>();
        scalar_t* yp = y.data_ptr<scalar_t>();
        at::parallel_for(0, rows, grain_rows(out), [&](int64_t begin, int64_t end) {
          kernels<scalar_t>().dense_forward_rows(a, bp, zp, yp, begin, end, out, store_z);
        });
      });
    }
    y = y.to(x.scalar_type());
    z = z.to(x.scalar_type());
    y = y.view(out_shape);
    if (store_z) z = z.view(out_shape);
  }
  return {y, store_z ? z : at::empty({0}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                              const at::Tensor& weight,
                                                              const std::optional<at::Tensor>& bias,
                                                              const std::optional<at::Tensor>& preact,
                                                              c10::string_view activation,
                                                              std::array<bool, 3> output_mask) {
  check_dense_args(x, weight, bias);
  check_cpu_dtype(x);
  const Activation a = parse_activation(activation);
  const int64_t in = weight.size(1), out = weight.size(0), rows = dense_rows(x);
  const bool has_bias = bias.has_value() && bias->defined();
  const bool need_db = output_mask[2] && has_bias;
  const bool have_z = preact.has_value() && preact->defined() && !derivative_is_constant(a);
  check_dense_backward_args(grad_out, x, weight, preact, have_z);
  at::Tensor dx, dw, db;

  if (is_small(rows, in, out)) {
    at::Tensor g = grad_out.contiguous(), xc = x.contiguous(), wc = weight.contiguous();
    at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();
    at::Tensor zc = have_z ? preact->contiguous() : at::Tensor();
    if (output_mask[0]) dx = at::empty(x.sizes(), x.options());
    if (output_mask[1]) dw = at::empty(weight.sizes(), weight.options());
    if (need_db) db = at::empty({out}, x.options());
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "dense_backward", [&] {
      auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
      dispatch_activation(a, [&](auto act) {
        small_backward<decltype(act)>(ptr(g), ptr(xc), ptr(wc), ptr(bc), derivative_is_constant(a) ? ptr(g) : ptr(zc),
                                      ptr(dx), ptr(dw), ptr(db), rows, in, out);
      });
    });
    return {dx, dw, db};
  }

  at::Tensor x2 = x.reshape({rows, in});
  at::Tensor g2 = grad_out.reshape({rows, out}).contiguous();
  if (derivative_is_constant(a)) {  // dz = g
    if (output_mask[0]) dx = at::mm(g2, weight).view(x.sizes());
    if (output_mask[1]) dw = at::mm(g2.t(), x2);
    if (need_db) db = g2.sum(0);
    return {dx, dw, db};
  }
  at::Tensor z = have_z ? preact->reshape({rows, out}).contiguous()
                        : (has_bias ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t()));
  const auto math = math_dtype(x.scalar_type());
  at::Tensor gm = g2.to(math), zm = z.to(math).contiguous();
  at::Tensor dz = reusable_scratch(gm);
  AT_DISPATCH_FLOATING_TYPES(math, "dense_backward", [&] {
    const scalar_t* gp = gm.data_ptr<scalar_t>();
    const scalar_t* zp = zm.data_ptr<scalar_t>();
    scalar_t* dzp = dz.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(out), [&](int64_t begin, int64_t end) {
      kernels<scalar_t>().dense_backward_rows(a, gp, zp, dzp, nullptr, begin, end, out);
    });
  });
  // torch's cascade sum: a running sum over thousands of rows lost float32 digits.
  if (need_db) db = dz.sum(0).to(x.scalar_type());
  dz = dz.to(x.scalar_type());
  if (output_mask[0]) dx = at::mm(dz, weight).view(x.sizes());
  if (output_mask[1]) dw = at::mm(dz.t(), x2);
  return {dx, dw, db};
}

// f^(order)(z), times grad unless it is undefined: activation_derivative and activation_grad.
at::Tensor derivative_times(const at::Tensor& grad, const at::Tensor& z, c10::string_view activation, int64_t order,
                            const char* op) {
  const Activation a = parse_activation(activation);
  check_derivative_order(order);
  if (grad.defined()) check_activation_grad_args(grad, z);
  TORCH_CHECK(z.is_floating_point(), op, "(): expected z to be a floating-point tensor, got ", z.scalar_type());
  const auto math = math_dtype(z.scalar_type());
  at::Tensor zm = z.to(math).contiguous();
  at::Tensor gm = grad.defined() ? grad.to(math).contiguous() : grad;
  at::Tensor out = at::empty(z.sizes(), zm.options());
  AT_DISPATCH_FLOATING_TYPES(math, "activation_derivative", [&] {
    const scalar_t* gp = gm.defined() ? gm.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* zp = zm.const_data_ptr<scalar_t>();
    scalar_t* outp = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, zm.numel(), kElementsPerTask, [&](int64_t begin, int64_t end) {
      kernels<scalar_t>().activation_elements(a, static_cast<int>(order), gp ? gp + begin : nullptr, zp + begin,
                                              outp + begin, end - begin);
    });
  });
  return out.to(z.scalar_type());
}

at::Tensor activation_derivative(const at::Tensor& z, c10::string_view activation, int64_t order) {
  return derivative_times(at::Tensor(), z, activation, order, "activation_derivative");
}

at::Tensor activation_grad(const at::Tensor& grad, const at::Tensor& z, c10::string_view activation, int64_t order) {
  return derivative_times(grad, z, activation, order, "activation_grad");
}

}  // namespace
}  // namespace fusedlayers::cpu

TORCH_LIBRARY_IMPL(fusedlayers, CPU, m) {
  m.impl("dense_forward", &fusedlayers::cpu::dense_forward);
  m.impl("dense_backward", &fusedlayers::cpu::dense_backward);
  m.impl("activation_derivative", &fusedlayers::cpu::activation_derivative);
  m.impl("activation_grad", &fusedlayers::cpu::activation_grad);
}
