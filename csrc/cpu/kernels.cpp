// Which instruction set's kernels (kernels.h) run: the widest this CPU has, chosen once at first use.
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "cpu/kernels.h"

namespace fusedlayers::cpu {

enum class Isa { Default, AVX2, AVX512 };

// FUSEDLAYERS_CPU_ISA=default|avx2 caps the choice (the tests run every variant that way).
Isa cpu_isa() {
  static const Isa isa = [] {
    const char* cap = std::getenv("FUSEDLAYERS_CPU_ISA");
    const std::string want = cap ? cap : "avx512";
    TORCH_CHECK_VALUE(want == "default" || want == "avx2" || want == "avx512",
                      "FUSEDLAYERS_CPU_ISA must be default, avx2 or avx512, got '", want, "'");
    if (want == "avx512" && cpu_has_avx512()) return Isa::AVX512;
    if (want != "default" && cpu_has_avx2()) return Isa::AVX2;
    return Isa::Default;
  }();
  return isa;
}

// The kernel `name` instantiated for T, in the chosen instruction set's namespace.
#define FL_CHOSEN_KERNEL(name, T)                                                                  \
  (cpu_isa() == Isa::AVX512 ? isa_avx512::name<T> : cpu_isa() == Isa::AVX2 ? isa_avx2::name<T> \
                                                                           : isa_default::name<T>)

template <typename T>
void forward_rows(Activation a, const T* bias, T* z, T* y, int64_t begin, int64_t end, int64_t cols, bool store_z) {
  FL_CHOSEN_KERNEL(dense_forward_rows, T)(a, bias, z, y, begin, end, cols, store_z);
}

template <typename T>
void backward_rows(Activation a, const T* g, const T* z, T* dz, T* db, int64_t begin, int64_t end, int64_t cols) {
  FL_CHOSEN_KERNEL(dense_backward_rows, T)(a, g, z, dz, db, begin, end, cols);
}

template <typename T>
void derivative_elements(Activation a, int order, const T* g, const T* z, T* out, int64_t n) {
  FL_CHOSEN_KERNEL(activation_elements, T)(a, order, g, z, out, n);
}

template <typename T>
void jet_forward(Activation a, const T* z, T* h, int64_t n, int64_t plane) {
  FL_CHOSEN_KERNEL(jet_forward_elements, T)(a, z, h, n, plane);
}

template <typename T>
void jet_backward(Activation a, const T* g, const T* z, T* dz, int64_t n, int64_t plane) {
  FL_CHOSEN_KERNEL(jet_backward_elements, T)(a, g, z, dz, n, plane);
}

template <typename M>
void mlp_tile_forward(const MlpNet<M>& net, int64_t R, M* workspace, const M* x, M* y) {
  FL_CHOSEN_KERNEL(mlp_tile_forward, M)(net, R, workspace, x, y);
}

template <typename M>
void mlp_tile_backward(const MlpNet<M>& net, int64_t R, M* workspace, const M* x, const M* g, M* dx, M* dw, M* db) {
  FL_CHOSEN_KERNEL(mlp_tile_backward, M)(net, R, workspace, x, g, dx, dw, db);
}

template <typename M>
M ce_forward_row(const CeRow<M>& row, M* lse) {
  return FL_CHOSEN_KERNEL(ce_forward_row, M)(row, lse);
}

template <typename M>
void ce_backward_row(const CeRow<M>& row, M lse, M grad_loss, M grad_lse, M* grad) {
  FL_CHOSEN_KERNEL(ce_backward_row, M)(row, lse, grad_loss, grad_lse, grad);
}

#undef FL_CHOSEN_KERNEL

template void forward_rows<float>(Activation, const float*, float*, float*, int64_t, int64_t, int64_t, bool);
template void forward_rows<double>(Activation, const double*, double*, double*, int64_t, int64_t, int64_t, bool);
template void backward_rows<float>(Activation, const float*, const float*, float*, float*, int64_t, int64_t, int64_t);
template void backward_rows<double>(Activation, const double*, const double*, double*, double*, int64_t, int64_t,
                                    int64_t);
template void derivative_elements<float>(Activation, int, const float*, const float*, float*, int64_t);
template void derivative_elements<double>(Activation, int, const double*, const double*, double*, int64_t);
template void jet_forward<float>(Activation, const float*, float*, int64_t, int64_t);
template void jet_forward<double>(Activation, const double*, double*, int64_t, int64_t);
template void jet_backward<float>(Activation, const float*, const float*, float*, int64_t, int64_t);
template void jet_backward<double>(Activation, const double*, const double*, double*, int64_t, int64_t);
template void mlp_tile_forward<float>(const MlpNet<float>&, int64_t, float*, const float*, float*);
template void mlp_tile_forward<double>(const MlpNet<double>&, int64_t, double*, const double*, double*);
template void mlp_tile_backward<float>(const MlpNet<float>&, int64_t, float*, const float*, const float*, float*,
                                       float*, float*);
template void mlp_tile_backward<double>(const MlpNet<double>&, int64_t, double*, const double*, const double*,
                                        double*, double*, double*);
template float ce_forward_row<float>(const CeRow<float>&, float*);
template double ce_forward_row<double>(const CeRow<double>&, double*);
template void ce_backward_row<float>(const CeRow<float>&, float, float, float, float*);
template void ce_backward_row<double>(const CeRow<double>&, double, double, double, double*);

}  // namespace fusedlayers::cpu

TORCH_LIBRARY_FRAGMENT(fusedlayers, m) {
  // Which instruction set the CPU kernels run with: "default", "avx2" or "avx512".
  m.def("cpu_isa() -> str", [] {
    using fusedlayers::cpu::Isa;
    const Isa isa = fusedlayers::cpu::cpu_isa();
    return std::string(isa == Isa::AVX512 ? "avx512" : isa == Isa::AVX2 ? "avx2" : "default");
  });
}
