// The dense op family on CUDA: y = f(x @ W.T + b) and its manual gradient.
//
// Forward:  one cuBLASLt GEMM writes z = x @ W.T + b (bias fused with CUBLASLT_EPILOGUE_BIAS), then one
//           elementwise kernel writes y = f(z) (in place over z unless z is to be saved).
// Backward: one elementwise kernel dz = g * f'(z) (none for identity; z recomputed by the forward GEMM, and
//           overwritten by dz, when it was not saved), then dW = dz.T @ x with the bias gradient fused into the
//           same GEMM (CUBLASLT_EPILOGUE_BGRADB), and dx = dz @ W.
//
// The activation-fused cuBLASLt epilogues are not used: RELU_AUX* saves a bit mask and GELU_AUX* the
// tanh-approximated GELU's input in cuBLASLt's own layout, while the saved tensor of this op family is z, the
// pre-activation of y's shape, that every backend (CPU, Triton, CUDA) must accept; and one elementwise kernel
// from the activation table covers all activations with the same numerics.
//
// Every cuBLASLt GEMM has a fallback: when cuBLASLt rejects a problem (no algorithm for the epilogue, dtype,
// architecture, alignment or shape: torch's addmm, for one, avoids cuBLASLt when the weight has a dimension of 1
// because the heuristic query fails there), a fused epilogue is retried as a plain GEMM with the bias (or its
// gradient) done by ATen, and a plain GEMM runs as at::mm_out (cuBLAS). Any other cuBLASLt error is raised.
//
// Only the elementwise kernels are templates over (dtype x activation); the GEMM code is dtype-generic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <cublasLt.h>

#include <algorithm>
#include <type_traits>

#include "ops/dense.h"

// Every cuBLASLt call's status is checked, and a failure names the call and the status.
#define FL_CUBLASLT_CHECK(expr)                                                                               \
  do {                                                                                                        \
    const cublasStatus_t fl_status_ = (expr);                                                                 \
    TORCH_CHECK(fl_status_ == CUBLAS_STATUS_SUCCESS, "dense() CUDA backend: ", #expr, " failed with ",         \
                cublasLtGetStatusName(fl_status_), " (", static_cast<int>(fl_status_), "): ",                 \
                cublasLtGetStatusString(fl_status_));                                                         \
  } while (0)

namespace fusedlayers::cuda {
namespace {

// ---- elementwise kernels ----------------------------------------------------------------------------------

constexpr int kThreads = 256;

int64_t grid_size(int64_t n) {
  // Enough blocks to fill the GPU; the grid-stride loops cover the rest.
  const int64_t max_blocks = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * (2048 / kThreads);
  return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, max_blocks));
}

// y = f(z). y may be z (in place).
template <typename Act, typename T>
__global__ void __launch_bounds__(kThreads) forward_act_kernel(const T* z, T* y, int64_t n) {
  using M = at::opmath_type<T>;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
#pragma unroll 1  // an unrolled grid-stride loop costs a 64-bit division for its trip count, and spills
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    y[i] = T(Act::f(M(z[i])));
  }
}

// dz = g * f'(z). dz may be z (in place).
template <typename Act, typename T>
__global__ void __launch_bounds__(kThreads) backward_act_kernel(const T* g, const T* z, T* dz, int64_t n) {
  using M = at::opmath_type<T>;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
#pragma unroll 1  // an unrolled grid-stride loop costs a 64-bit division for its trip count, and spills
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    dz[i] = T(times_df<Act>(M(g[i]), M(z[i])));
  }
}

// out = f^(order)(z) for order 0 to 3, times g unless g is null: the activation_derivative op of higher-order gradients. The order
// is a run-time argument (the same for every thread, so no divergence): one kernel per activation and dtype.
template <typename Act, typename T>
__global__ void __launch_bounds__(kThreads) derivative_kernel(const T* g, const T* z, T* out, int64_t n, int order) {
  using M = at::opmath_type<T>;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
#pragma unroll 1  // an unrolled grid-stride loop costs a 64-bit division for its trip count, and spills
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const M v = M(z[i]);
    const M d = order == 0 ? Act::f(v) : order == 1 ? Act::df(v) : order == 2 ? Act::d2f(v) : Act::d3f(v);
    out[i] = T(!g ? d : order == 1 ? times_df<Act>(M(g[i]), v) : M(g[i]) * d);
  }
}

// Identity never reaches these launchers (y = z, dz = g), so its kernels are not instantiated.
void launch_forward_act(Activation a, const at::Tensor& z, at::Tensor& y) {
  const int64_t n = z.numel();
  if (n == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "dense_forward_act", [&] {
    dispatch_activation(a, [&](auto act) {
      using Act = decltype(act);
      if constexpr (std::is_same_v<Act, act::Identity>) {
        TORCH_INTERNAL_ASSERT(false, "dense(): the identity needs no activation kernel");
      } else {
        forward_act_kernel<Act, scalar_t><<<grid_size(n), kThreads, 0, stream>>>(
            z.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
}

void launch_backward_act(Activation a, const at::Tensor& g, const at::Tensor& z, at::Tensor& dz) {
  const int64_t n = g.numel();
  if (n == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "dense_backward_act", [&] {
    dispatch_activation(a, [&](auto act) {
      using Act = decltype(act);
      if constexpr (std::is_same_v<Act, act::Identity>) {
        TORCH_INTERNAL_ASSERT(false, "dense(): the identity needs no activation-gradient kernel");
      } else {
        backward_act_kernel<Act, scalar_t><<<grid_size(n), kThreads, 0, stream>>>(
            g.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(), dz.mutable_data_ptr<scalar_t>(), n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
}

// ---- cuBLASLt ---------------------------------------------------------------------------------------------
//
// cuBLASLt is column-major; our tensors are row-major and contiguous. A row-major (R, C) matrix with row
// stride C is, as the same bytes, a column-major (C, R) matrix with leading dimension C: its transpose. So a
// row-major product P = Q @ S is computed as the column-major product P^T = S^T @ Q^T, in which every operand
// is just the row-major tensor's memory: swap the operands, keep each one's own row length as its ld. Each
// call site below writes out its (m, n, k), operands and transposes in these terms.

template <typename Desc, cublasStatus_t (*destroy)(Desc)>
struct LtHandle {
  Desc desc = nullptr;
  LtHandle() = default;
  LtHandle(const LtHandle&) = delete;
  LtHandle& operator=(const LtHandle&) = delete;
  ~LtHandle() {
    if (desc != nullptr) destroy(desc);  // cannot throw from a destructor; a failed destroy only leaks
  }
};
using MatmulDesc = LtHandle<cublasLtMatmulDesc_t, &cublasLtMatmulDescDestroy>;
using MatrixLayout = LtHandle<cublasLtMatrixLayout_t, &cublasLtMatrixLayoutDestroy>;
using Preference = LtHandle<cublasLtMatmulPreference_t, &cublasLtMatmulPreferenceDestroy>;

struct LtTypes {
  cudaDataType_t data;
  cublasComputeType_t compute;
  cudaDataType_t scale;
};

LtTypes lt_types(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return {CUDA_R_16F, CUBLAS_COMPUTE_32F, CUDA_R_32F};
    case at::kBFloat16: return {CUDA_R_16BF, CUBLAS_COMPUTE_32F, CUDA_R_32F};
    case at::kFloat:  // torch.backends.cuda.matmul.allow_tf32, as torch's own matmuls
      return {CUDA_R_32F, at::globalContext().allowTF32CuBLAS() ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F,
              CUDA_R_32F};
    case at::kDouble: return {CUDA_R_64F, CUBLAS_COMPUTE_64F, CUDA_R_64F};
    default: TORCH_CHECK(false, "dense(): the CUDA backend does not support ", t);
  }
}

// The largest power of two up to 256 that divides the address, as the heuristic's alignment preferences.
uint32_t alignment_of(const void* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  uint32_t alignment = 256;
  while (address % alignment != 0) alignment /= 2;
  return alignment;
}

// Column-major D (m x n, ld ldd) = op(A) (m x k) @ op(B) (k x n), all of `dtype`, with `epilogue` whose vector
// (bias, or bias gradient) is `epilogue_vec`. m, n, k > 0. Returns false, with nothing run, when cuBLASLt rejects
// the problem (the caller then falls back); raises any other cuBLASLt error.
bool lt_matmul(at::ScalarType dtype, cublasOperation_t transa, cublasOperation_t transb, int64_t m, int64_t n,
               int64_t k, const void* A, int64_t lda, const void* B, int64_t ldb, void* D, int64_t ldd,
               cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT, void* epilogue_vec = nullptr) {
  TORCH_INTERNAL_ASSERT(m > 0 && n > 0 && k > 0, "dense(): cuBLASLt called with an empty GEMM");
  const LtTypes types = lt_types(dtype);

  MatmulDesc op;
  FL_CUBLASLT_CHECK(cublasLtMatmulDescCreate(&op.desc, types.compute, types.scale));
  FL_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(op.desc, CUBLASLT_MATMUL_DESC_TRANSA, &transa, sizeof(transa)));
  FL_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(op.desc, CUBLASLT_MATMUL_DESC_TRANSB, &transb, sizeof(transb)));
  if (epilogue != CUBLASLT_EPILOGUE_DEFAULT) {
    TORCH_INTERNAL_ASSERT(epilogue_vec != nullptr);
    FL_CUBLASLT_CHECK(
        cublasLtMatmulDescSetAttribute(op.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
    // Set before the heuristic query: it reads the pointer's alignment. The vector has D's type (the default).
    FL_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(op.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &epilogue_vec,
                                                     sizeof(epilogue_vec)));
  }

  // Stored (pre-op) shapes: op(A) is m x k, op(B) is k x n.
  const bool ta = transa != CUBLAS_OP_N, tb = transb != CUBLAS_OP_N;
  MatrixLayout a_layout, b_layout, d_layout;
  FL_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&a_layout.desc, types.data, ta ? k : m, ta ? m : k, lda));
  FL_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&b_layout.desc, types.data, tb ? n : k, tb ? k : n, ldb));
  FL_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&d_layout.desc, types.data, m, n, ldd));

  const size_t workspace_size = at::cuda::getCUDABlasLtWorkspaceSize();
  void* workspace = at::cuda::getCUDABlasLtWorkspace();
  Preference pref;
  FL_CUBLASLT_CHECK(cublasLtMatmulPreferenceCreate(&pref.desc));
  FL_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.desc, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                         &workspace_size, sizeof(workspace_size)));
  const uint32_t align_a = alignment_of(A), align_b = alignment_of(B), align_d = alignment_of(D);
  FL_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.desc, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                                         &align_a, sizeof(align_a)));
  FL_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.desc, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                                         &align_b, sizeof(align_b)));
  FL_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.desc, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                                         &align_d, sizeof(align_d)));
  FL_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.desc, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                                         &align_d, sizeof(align_d)));
  // torch.backends.cuda.matmul.allow_{fp16,bf16}_reduced_precision_reduction, as torch's own matmuls.
  if (dtype == at::kHalf || dtype == at::kBFloat16) {
    const auto option = dtype == at::kHalf ? at::globalContext().allowFP16ReductionCuBLAS()
                                           : at::globalContext().allowBF16ReductionCuBLAS();
    if (option != at::CuBLASReductionOption::AllowReducedPrecisionWithSplitK) {
      const uint32_t mask = option == at::CuBLASReductionOption::DisallowReducedPrecisionAllowSplitK
                                ? uint32_t(CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE | CUBLASLT_REDUCTION_SCHEME_NONE)
                                : uint32_t(CUBLASLT_REDUCTION_SCHEME_NONE);
      FL_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.desc, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                                                             &mask, sizeof(mask)));
    }
  }

  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  cublasLtMatmulHeuristicResult_t heuristic = {};
  int found = 0;
  const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(handle, op.desc, a_layout.desc, b_layout.desc,
                                                                d_layout.desc, d_layout.desc, pref.desc, 1,
                                                                &heuristic, &found);
  // Rejections: no heuristic for this configuration (NOT_SUPPORTED), a configuration it refuses (INVALID_VALUE,
  // as for some shapes with a dimension of 1), or no algorithm found.
  if (status == CUBLAS_STATUS_NOT_SUPPORTED || status == CUBLAS_STATUS_INVALID_VALUE) return false;
  FL_CUBLASLT_CHECK(status);
  if (found == 0 || heuristic.state != CUBLAS_STATUS_SUCCESS) return false;

  // alpha = 1, beta = 0 in the scale type; C is D (not read since beta = 0).
  const float alpha_f = 1.f, beta_f = 0.f;
  const double alpha_d = 1.0, beta_d = 0.0;
  const bool f64 = types.scale == CUDA_R_64F;
  const void* alpha = f64 ? static_cast<const void*>(&alpha_d) : static_cast<const void*>(&alpha_f);
  const void* beta = f64 ? static_cast<const void*>(&beta_d) : static_cast<const void*>(&beta_f);
  const cublasStatus_t run = cublasLtMatmul(handle, op.desc, alpha, A, a_layout.desc, B, b_layout.desc, beta, D,
                                            d_layout.desc, D, d_layout.desc, &heuristic.algo, workspace,
                                            workspace_size, at::cuda::getCurrentCUDAStream());
  if (run == CUBLAS_STATUS_NOT_SUPPORTED) return false;  // rejected before launch: nothing written
  FL_CUBLASLT_CHECK(run);
  return true;
}

// z = x2 @ w.T + b, (rows, out) contiguous. x2 (rows, in) and w (out, in) contiguous; b (out,) contiguous or
// undefined.
at::Tensor preactivation(const at::Tensor& x2, const at::Tensor& w, const at::Tensor& b) {
  const int64_t rows = x2.size(0), in = x2.size(1), out = w.size(0);
  at::Tensor z = at::empty({rows, out}, x2.options());
  if (z.numel() == 0) return z;
  if (in == 0) {  // an empty sum: z is the bias
    if (b.defined()) {
      z.copy_(b.unsqueeze(0).expand({rows, out}));
    } else {
      z.zero_();
    }
    return z;
  }
  // Column-major z^T (out x rows, ld out) = W (out x in) @ x^T (in x rows):
  //   A = w, stored column-major as W^T (in x out, ld in), op T;  B = x2, stored as x^T (in x rows, ld in), op N;
  //   m = out, n = rows, k = in. The bias has m = out elements, one per row of D: CUBLASLT_EPILOGUE_BIAS.
  const bool bias_fused =
      b.defined() && lt_matmul(x2.scalar_type(), CUBLAS_OP_T, CUBLAS_OP_N, out, rows, in, w.const_data_ptr(), in,
                               x2.const_data_ptr(), in, z.mutable_data_ptr(), out, CUBLASLT_EPILOGUE_BIAS,
                               const_cast<void*>(b.const_data_ptr()));
  if (!bias_fused) {
    if (!lt_matmul(x2.scalar_type(), CUBLAS_OP_T, CUBLAS_OP_N, out, rows, in, w.const_data_ptr(), in,
                   x2.const_data_ptr(), in, z.mutable_data_ptr(), out)) {
      at::mm_out(z, x2, w.t());
    }
    if (b.defined()) z.add_(b);
  }
  return z;
}

// ---- the ops ----------------------------------------------------------------------------------------------

void check_cuda_dtype(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kDouble,
              "dense(): the CUDA backend supports float32, float16, bfloat16 and float64 x, got ", x.scalar_type());
}

// Product of all but the last dimension (not numel / in, which is wrong when in == 0).

std::tuple<at::Tensor, at::Tensor> dense_forward(const at::Tensor& x, const at::Tensor& weight,
                                                 const std::optional<at::Tensor>& bias, c10::string_view activation,
                                                 bool save_preact) {
  check_dense_args(x, weight, bias);
  check_cuda_dtype(x);
  const Activation a = parse_activation(activation);
  const bool store_z = save_preact && !derivative_is_constant(a);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t in = weight.size(1), out = weight.size(0), rows = dense_rows(x);
  const auto out_shape = dense_output_shape(x, weight);
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();

  at::Tensor z = preactivation(x.reshape({rows, in}).contiguous(), weight.contiguous(), b);
  at::Tensor y = z;  // identity: y is z; otherwise f(z) in place unless z is kept
  if (a != Activation::Identity) {
    if (store_z) y = at::empty_like(z);
    launch_forward_act(a, z, y);
  }
  return {y.view(out_shape), store_z ? z.view(out_shape) : at::empty({0}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                              const at::Tensor& weight,
                                                              const std::optional<at::Tensor>& bias,
                                                              const std::optional<at::Tensor>& preact,
                                                              c10::string_view activation,
                                                              std::array<bool, 3> output_mask) {
  check_dense_args(x, weight, bias);
  check_cuda_dtype(x);
  const Activation a = parse_activation(activation);
  const int64_t in = weight.size(1), out = weight.size(0), rows = dense_rows(x);
  const bool has_bias = bias.has_value() && bias->defined();
  const bool need_dx = output_mask[0], need_dw = output_mask[1], need_db = output_mask[2] && has_bias;
  const bool const_df = derivative_is_constant(a);
  const bool have_z = preact.has_value() && preact->defined() && !const_df;
  check_dense_backward_args(grad_out, x, weight, preact, have_z);
  at::Tensor dx, dw, db;
  if (!need_dx && !need_dw && !need_db) return {dx, dw, db};
  const c10::cuda::CUDAGuard guard(x.device());

  const at::Tensor g2 = grad_out.reshape({rows, out}).contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor x2;
  if (need_dw || (!const_df && !have_z)) x2 = x.reshape({rows, in}).contiguous();

  // dz = g * f'(z), (rows, out) contiguous.
  at::Tensor dz;
  if (const_df) {  // identity: dz = g
    dz = g2;
  } else if (have_z) {
    const at::Tensor z = preact->reshape({rows, out}).contiguous();
    dz = at::empty_like(g2);
    launch_backward_act(a, g2, z, dz);
  } else {  // recompute z into a scratch buffer, then overwrite it with dz
    dz = preactivation(x2, w, has_bias ? bias->contiguous() : at::Tensor());
    launch_backward_act(a, g2, dz, dz);
  }

  bool db_fused = false;
  if (need_dw) {
    dw = at::empty({out, in}, x.options());
    if (rows > 0 && in > 0 && out > 0) {
      // Column-major dW^T (in x out, ld in) = x^T (in x rows) @ dz (rows x out):
      //   A = x2, stored column-major as x^T (in x rows, ld in), op N;
      //   B = dz, stored column-major as dz^T (out x rows, ld out), op T, so op(B) = dz is (k = rows) x (n = out);
      //   m = in, n = out, k = rows. D's memory is row-major dW (out, in).
      // The bias gradient is a sum over rows, the GEMM's k, and has out elements, one per column of D (n): that
      // is CUBLASLT_EPILOGUE_BGRADB, db[j] = sum_k op(B)[k, j] = sum_r dz[r, j]. (BGRADA would sum op(A) = x^T
      // over k and give in elements.)
      if (need_db) {
        db = at::empty({out}, x.options());
        db_fused = lt_matmul(x.scalar_type(), CUBLAS_OP_N, CUBLAS_OP_T, in, out, rows, x2.const_data_ptr(), in,
                             dz.const_data_ptr(), out, dw.mutable_data_ptr(), in, CUBLASLT_EPILOGUE_BGRADB,
                             db.mutable_data_ptr());
      }
      if (!db_fused && !lt_matmul(x.scalar_type(), CUBLAS_OP_N, CUBLAS_OP_T, in, out, rows, x2.const_data_ptr(), in,
                                  dz.const_data_ptr(), out, dw.mutable_data_ptr(), in)) {
        at::mm_out(dw, dz.t(), x2);
      }
    } else {
      dw.zero_();  // an empty sum (rows == 0), or an empty dW
    }
  }
  // No fused bias gradient (dW not wanted, no algorithm for BGRADB, or an empty GEMM): sum over rows, which is
  // zeros when rows == 0.
  if (need_db && !db_fused) db = dz.sum(0);

  if (need_dx) {
    dx = at::empty({rows, in}, x.options());
    if (rows > 0 && in > 0 && out > 0) {
      // Column-major dx^T (in x rows, ld in) = W^T (in x out) @ dz^T (out x rows):
      //   A = w, stored column-major as W^T (in x out, ld in), op N;  B = dz, stored as dz^T (out x rows, ld out),
      //   op N;  m = in, n = rows, k = out.
      if (!lt_matmul(x.scalar_type(), CUBLAS_OP_N, CUBLAS_OP_N, in, rows, out, w.const_data_ptr(), in,
                     dz.const_data_ptr(), out, dx.mutable_data_ptr(), in)) {
        at::mm_out(dx, dz, w);
      }
    } else {
      dx.zero_();  // an empty sum (out == 0), or an empty dx
    }
    dx = dx.view(x.sizes());
  }
  return {dx, dw, db};
}

// f^(order)(z), times grad unless it is undefined: activation_derivative and activation_grad.
at::Tensor derivative_times(const at::Tensor& grad, const at::Tensor& z, c10::string_view activation, int64_t order,
                            const char* op) {
  const Activation a = parse_activation(activation);
  check_derivative_order(order);
  if (grad.defined()) check_activation_grad_args(grad, z);
  TORCH_CHECK(z.is_floating_point(), op, "(): expected z to be a floating-point tensor, got ", z.scalar_type());
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor zc = z.contiguous();
  const at::Tensor gc = grad.defined() ? grad.contiguous() : grad;
  at::Tensor out = at::empty_like(zc);
  const int64_t n = zc.numel();
  if (n == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "activation_derivative", [&] {
    dispatch_activation(a, [&](auto act) {
      derivative_kernel<decltype(act), scalar_t><<<grid_size(n), kThreads, 0, stream>>>(
          gc.defined() ? gc.const_data_ptr<scalar_t>() : nullptr, zc.const_data_ptr<scalar_t>(),
          out.mutable_data_ptr<scalar_t>(), n, static_cast<int>(order));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor activation_derivative(const at::Tensor& z, c10::string_view activation, int64_t order) {
  return derivative_times(at::Tensor(), z, activation, order, "activation_derivative");
}

at::Tensor activation_grad(const at::Tensor& grad, const at::Tensor& z, c10::string_view activation, int64_t order) {
  return derivative_times(grad, z, activation, order, "activation_grad");
}

}  // namespace
}  // namespace fusedlayers::cuda

TORCH_LIBRARY_IMPL(fusedlayers, CUDA, m) {
  m.impl("dense_forward", &fusedlayers::cuda::dense_forward);
  m.impl("dense_backward", &fusedlayers::cuda::dense_backward);
  m.impl("activation_derivative", &fusedlayers::cuda::activation_derivative);
  m.impl("activation_grad", &fusedlayers::cuda::activation_grad);
}
