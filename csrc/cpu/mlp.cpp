// The mlp op family on the CPU.
//
// Narrow networks (every width <= kMaxFusedWidth) run the whole chain in one call as plain loops: a row at a
// time through every layer, its activations in a small per-thread workspace that stays in L1, no ATen call
// but the output allocations, rows split across threads with per-thread weight-gradient accumulators added
// up at the end. Their backward recomputes each row's forward rather than saving it: for such layers the
// recompute costs less than allocating and reading back the saved activations.
// Wider networks go layer by layer through the dense kernels (mlp_chain.cpp), saving what eager PyTorch saves.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/dense_epilogue.h"
#include "mlp.h"

namespace fusedlayers::cpu {
namespace {

constexpr int64_t kMaxFusedWidth = 64;
// Multiply-adds per parallel task: a task must outweigh waking a thread, which on this project's VMs costs
// milliseconds once the OpenMP workers have gone to sleep (after ~0.2 ms idle; measured, see bench/README.md).
constexpr int64_t kMacsPerTask = 1 << 21;

struct Shape {
  int64_t rows = 0;
  std::vector<int64_t> widths;  // n_0 (in), n_1, ..., n_L (out)
  int64_t macs_per_row = 0;
  int64_t max_width = 0;
};

Shape shape_of(const at::Tensor& x, at::TensorList weights) {
  Shape s;
  s.rows = dense_rows(x);
  s.widths.push_back(x.size(-1));
  for (const auto& w : weights) {
    s.macs_per_row += w.size(0) * w.size(1);
    s.widths.push_back(w.size(0));
  }
  s.max_width = *std::max_element(s.widths.begin(), s.widths.end());
  return s;
}

bool takes_fused_path(const Shape& s) { return s.max_width <= kMaxFusedWidth; }

// The parameters as the loops read them: W_l (n x in) as given for the backward, and W_l transposed
// (in x n) in the math type for the forward, whose inner loop runs over a layer's outputs.
template <typename T>
struct Params {
  using M = at::opmath_type<T>;
  std::vector<const T*> w;
  std::vector<std::vector<M>> wt, b;  // b empty without biases
};

template <typename T>
Params<T> params_of(at::TensorList weights, at::TensorList biases, std::vector<at::Tensor>& keep) {
  using M = at::opmath_type<T>;
  Params<T> p;
  for (const auto& w : weights) {
    const T* wp = keep.emplace_back(w.contiguous()).data_ptr<T>();
    const int64_t n = w.size(0), in = w.size(1);
    std::vector<M> wt(n * in);
    for (int64_t o = 0; o < n; ++o)
      for (int64_t k = 0; k < in; ++k) wt[k * n + o] = M(wp[o * in + k]);
    p.w.push_back(wp);
    p.wt.push_back(std::move(wt));
  }
  for (const auto& b : biases) {
    const T* bp = keep.emplace_back(b.contiguous()).data_ptr<T>();
    p.b.emplace_back(bp, bp + b.numel());
  }
  return p;
}

// One row through layer l: z = W h + b, out = f(z); both loops vectorized over the layer's outputs.
template <typename M, typename T>
void layer_forward(const Params<T>& p, size_t l, Activation a, const M* h, M* z, M* out, int64_t in, int64_t n) {
  if (p.b.empty()) {
    std::fill(z, z + n, M(0));
  } else {
    std::copy(p.b[l].begin(), p.b[l].end(), z);
  }
  const M* wt = p.wt[l].data();
  for (int64_t k = 0; k < in; ++k) {
    const M hk = h[k];
    const M* wk = wt + k * n;
#pragma omp simd
    for (int64_t o = 0; o < n; ++o) z[o] += hk * wk[o];
  }
  forward_rows<M>(a, nullptr, z, out, 0, 1, n, false);
}

template <typename T>
void fused_forward(const Shape& s, const Params<T>& p, const std::vector<Activation>& acts, const T* x, T* y) {
  using M = at::opmath_type<T>;
  const size_t L = acts.size();
  const int64_t grain = std::max<int64_t>(1, kMacsPerTask / std::max<int64_t>(s.macs_per_row, 1));
  at::parallel_for(0, s.rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<M> cur(s.max_width), next(s.max_width), z(s.max_width);
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t k = 0; k < s.widths[0]; ++k) cur[k] = M(x[r * s.widths[0] + k]);
      for (size_t l = 0; l < L; ++l) {
        layer_forward<M>(p, l, acts[l], cur.data(), z.data(), next.data(), s.widths[l], s.widths[l + 1]);
        std::swap(cur, next);
      }
      for (int64_t o = 0; o < s.widths[L]; ++o) y[r * s.widths[L] + o] = T(cur[o]);
    }
  });
}

// Gradients of every layer's weights and biases, and of x when dx is not null.
template <typename T>
void fused_backward(const Shape& s, const Params<T>& p, const std::vector<Activation>& acts, const T* x,
                    const T* grad_out, T* dx, std::vector<T*>& dw, std::vector<T*>& db) {
  using M = at::opmath_type<T>;
  const size_t L = acts.size();
  // Offsets of each layer's weights and biases in one flat accumulator per thread.
  std::vector<int64_t> w_off(L + 1, 0), b_off(L + 1, 0), h_off(L + 1, 0), z_off(L + 1, 0);
  for (size_t l = 0; l < L; ++l) {
    w_off[l + 1] = w_off[l] + s.widths[l] * s.widths[l + 1];
    b_off[l + 1] = b_off[l] + s.widths[l + 1];
    h_off[l + 1] = h_off[l] + s.widths[l];
    z_off[l + 1] = z_off[l] + s.widths[l + 1];
  }
  const int64_t acc_size = w_off[L] + b_off[L];
  const int64_t threads = at::get_num_threads();
  std::vector<M> acc(threads * acc_size, M(0));
  const int64_t grain = std::max<int64_t>(1, kMacsPerTask / std::max<int64_t>(3 * s.macs_per_row, 1));
  at::parallel_for(0, s.rows, grain, [&](int64_t begin, int64_t end) {
    M* dw_acc = acc.data() + at::get_thread_num() * acc_size;
    M* db_acc = dw_acc + w_off[L];
    std::vector<M> hs(h_off[L]), zs(z_off[L]), g(s.max_width), dz(s.max_width), last(s.widths[L]);
    for (int64_t r = begin; r < end; ++r) {
      // The row's forward, keeping each layer's input h_l and pre-activation z_l.
      for (int64_t k = 0; k < s.widths[0]; ++k) hs[k] = M(x[r * s.widths[0] + k]);
      for (size_t l = 0; l < L; ++l) {
        M* out = l + 1 < L ? hs.data() + h_off[l + 1] : last.data();
        layer_forward<M>(p, l, acts[l], hs.data() + h_off[l], zs.data() + z_off[l], out, s.widths[l], s.widths[l + 1]);
      }
      for (int64_t o = 0; o < s.widths[L]; ++o) g[o] = M(grad_out[r * s.widths[L] + o]);
      for (size_t l = L; l-- > 0;) {
        const int64_t in = s.widths[l], n = s.widths[l + 1];
        const M* z = zs.data() + z_off[l];
        const M* h = hs.data() + h_off[l];
        backward_rows<M>(acts[l], g.data(), z, dz.data(), nullptr, 0, 1, n);
        M* dwl = dw_acc + w_off[l];
        M* dbl = db_acc + b_off[l];
        for (int64_t o = 0; o < n; ++o) {
          dbl[o] += dz[o];
          M* dwo = dwl + o * in;
#pragma omp simd
          for (int64_t k = 0; k < in; ++k) dwo[k] += dz[o] * h[k];
        }
        if (l > 0 || dx) {
          std::fill(g.begin(), g.begin() + in, M(0));
          for (int64_t o = 0; o < n; ++o) {
            const T* wo = p.w[l] + o * in;
#pragma omp simd
            for (int64_t k = 0; k < in; ++k) g[k] += dz[o] * M(wo[k]);
          }
        }
      }
      if (dx) {
        for (int64_t k = 0; k < s.widths[0]; ++k) dx[r * s.widths[0] + k] = T(g[k]);
      }
    }
  });
  for (size_t l = 0; l < L; ++l) {
    for (int64_t i = 0; i < w_off[l + 1] - w_off[l]; ++i) {
      M sum = 0;
      for (int64_t t = 0; t < threads; ++t) sum += acc[t * acc_size + w_off[l] + i];
      dw[l][i] = T(sum);
    }
    if (!db.empty()) {
      for (int64_t i = 0; i < b_off[l + 1] - b_off[l]; ++i) {
        M sum = 0;
        for (int64_t t = 0; t < threads; ++t) sum += acc[t * acc_size + w_off[L] + b_off[l] + i];
        db[l][i] = T(sum);
      }
    }
  }
}

void check_cpu_dtype(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || x.scalar_type() == at::kBFloat16,
              "mlp(): the CPU backend supports float32, float64 and bfloat16 x, got ", x.scalar_type());
}

MlpForwardResult mlp_forward(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                             std::vector<std::string> activations, bool save) {
  check_mlp_args(x, weights, biases, activations.size());
  check_cpu_dtype(x);
  const Shape s = shape_of(x, weights);
  if (save || !takes_fused_path(s)) return mlp_chain_forward(x, weights, biases, activations, save);
  const auto acts = parse_activations(activations);
  auto out_shape = x.sizes().vec();
  out_shape.back() = s.widths.back();
  at::Tensor y = at::empty(out_shape, x.options());
  at::Tensor xc = x.contiguous();
  std::vector<at::Tensor> keep;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "mlp_forward", [&] {
    fused_forward<scalar_t>(s, params_of<scalar_t>(weights, biases, keep), acts, xc.data_ptr<scalar_t>(),
                            y.data_ptr<scalar_t>());
  });
  return {y, {}};
}

MlpBackwardResult mlp_backward(const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights,
                               at::TensorList biases, at::TensorList saved, std::vector<std::string> activations,
                               bool input_grad) {
  check_mlp_args(x, weights, biases, activations.size());
  check_cpu_dtype(x);
  const Shape s = shape_of(x, weights);
  if (!saved.empty() || !takes_fused_path(s)) {
    return mlp_chain_backward(grad_out, x, weights, biases, saved, activations, input_grad);
  }
  auto out_shape = x.sizes().vec();
  out_shape.back() = s.widths.back();
  TORCH_CHECK(grad_out.sizes() == c10::IntArrayRef(out_shape), "mlp_backward(): expected grad_out of shape ",
              c10::IntArrayRef(out_shape), ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "mlp_backward(): expected grad_out of dtype ",
              x.scalar_type(), ", got ", grad_out.scalar_type());
  const auto acts = parse_activations(activations);
  at::Tensor dx = input_grad ? at::empty(x.sizes(), x.options()) : at::Tensor();
  std::vector<at::Tensor> dweights, dbiases;
  for (const auto& w : weights) dweights.push_back(at::empty(w.sizes(), w.options()));
  for (const auto& b : biases) dbiases.push_back(at::empty(b.sizes(), b.options()));
  at::Tensor xc = x.contiguous(), gc = grad_out.contiguous();
  std::vector<at::Tensor> keep;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "mlp_backward", [&] {
    std::vector<scalar_t*> dw, db;
    for (auto& t : dweights) dw.push_back(t.data_ptr<scalar_t>());
    for (auto& t : dbiases) db.push_back(t.data_ptr<scalar_t>());
    fused_backward<scalar_t>(s, params_of<scalar_t>(weights, biases, keep), acts, xc.data_ptr<scalar_t>(),
                             gc.data_ptr<scalar_t>(), input_grad ? dx.data_ptr<scalar_t>() : nullptr, dw, db);
  });
  return {dx, dweights, dbiases};
}

}  // namespace

// The fused CPU path recomputes in its backward whatever the forward would save: the autograd asks this
// before deciding to save.
bool mlp_cpu_recomputes(const at::Tensor& x, at::TensorList weights) {
  return x.is_cpu() && !x.unsafeGetTensorImpl()->has_symbolic_sizes_strides() && takes_fused_path(shape_of(x, weights));
}

}  // namespace fusedlayers::cpu

TORCH_LIBRARY_IMPL(fusedlayers, CPU, m) {
  m.impl("mlp_forward", &fusedlayers::cpu::mlp_forward);
  m.impl("mlp_backward", &fusedlayers::cpu::mlp_backward);
}
