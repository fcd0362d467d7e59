// The kernels declared in dense_epilogue.h, for the instruction set the including file selects
// (FL_ISA names the namespace; CPU_CAPABILITY selects ATen's Vectorized implementation).
#include <ATen/OpMathType.h>

#include <type_traits>

#include "cpu/dense_epilogue.h"
#include "cpu/vec_math.h"

namespace fusedlayers::cpu::FL_ISA {
namespace {

template <typename Act, typename T>
void forward_rows(const T* bias, T* z, T* y, int64_t begin, int64_t end, int64_t cols, bool store_z) {
  using M = at::opmath_type<T>;
  for (int64_t r = begin; r < end; ++r) {
    T* zr = z + r * cols;
    T* yr = y + r * cols;
    int64_t c = 0;
    if constexpr (std::is_same_v<T, M>) {
      using V = at::vec::Vectorized<T>;
      for (; c + V::size() <= cols; c += V::size()) {
        V v = V::loadu(zr + c);
        if (bias) v = v + V::loadu(bias + c);
        if (store_z) v.store(zr + c);
        Act::f(v).store(yr + c);
      }
    }
    for (; c < cols; ++c) {
      M v = M(zr[c]) + (bias ? M(bias[c]) : M(0));
      if (store_z) zr[c] = T(v);
      yr[c] = T(Act::f(v));
    }
  }
}

template <typename Act, typename T, typename acc_t>
void backward_rows(const T* g, const T* z, T* dz, acc_t* db, int64_t begin, int64_t end, int64_t cols) {
  using M = at::opmath_type<T>;
  for (int64_t r = begin; r < end; ++r) {
    const T* gr = g + r * cols;
    const T* zr = z + r * cols;
    T* dzr = dz + r * cols;
    int64_t c = 0;
    if constexpr (std::is_same_v<T, M> && std::is_same_v<T, acc_t>) {
      using V = at::vec::Vectorized<T>;
      for (; c + V::size() <= cols; c += V::size()) {
        V d = V::loadu(gr + c) * Act::df(V::loadu(zr + c));
        d.store(dzr + c);
        if (db) (V::loadu(db + c) + d).store(db + c);
      }
    }
    for (; c < cols; ++c) {
      M d = M(gr[c]) * Act::df(M(zr[c]));
      dzr[c] = T(d);
      if (db) db[c] += acc_t(d);
    }
  }
}

}  // namespace

template <typename T>
void dense_forward_rows(Activation a, const T* bias, T* z, T* y, int64_t begin, int64_t end, int64_t cols,
                        bool store_z) {
  dispatch_activation(a, [&](auto act) {
    forward_rows<decltype(act)>(bias, z, y, begin, end, cols, store_z);
  });
}

template <typename T, typename acc_t>
void dense_backward_rows(Activation a, const T* g, const T* z, T* dz, acc_t* db, int64_t begin, int64_t end,
                         int64_t cols) {
  dispatch_activation(a, [&](auto act) { backward_rows<decltype(act)>(g, z, dz, db, begin, end, cols); });
}

template void dense_forward_rows<float>(Activation, const float*, float*, float*, int64_t, int64_t, int64_t, bool);
template void dense_forward_rows<double>(Activation, const double*, double*, double*, int64_t, int64_t, int64_t, bool);
template void dense_forward_rows<c10::BFloat16>(Activation, const c10::BFloat16*, c10::BFloat16*, c10::BFloat16*,
                                                int64_t, int64_t, int64_t, bool);
template void dense_backward_rows<float, float>(Activation, const float*, const float*, float*, float*, int64_t,
                                                int64_t, int64_t);
template void dense_backward_rows<double, double>(Activation, const double*, const double*, double*, double*,
                                                  int64_t, int64_t, int64_t);
template void dense_backward_rows<c10::BFloat16, float>(Activation, const c10::BFloat16*, const c10::BFloat16*,
                                                        c10::BFloat16*, float*, int64_t, int64_t, int64_t);

}  // namespace fusedlayers::cpu::FL_ISA
