// The kernels declared in dense_epilogue.h, for the instruction set the including file selects
// (FL_ISA names the namespace; CPU_CAPABILITY selects ATen's Vectorized implementation).
//
// Every element goes through Vectorized, the row tails by partial loads: so this file instantiates the
// activation functors only for its own ISA's vector types, never for plain float/double, whose copies
// other files compile for the baseline ISA.
#include <ATen/cpu/vec/vec.h>

#include <algorithm>

#include "cpu/dense_epilogue.h"
#include "cpu/vec_math.h"

namespace fusedlayers::cpu::FL_ISA {
namespace {

template <typename Act, typename T>
void forward_rows(const T* bias, T* z, T* y, int64_t begin, int64_t end, int64_t cols, bool store_z) {
  using V = at::vec::Vectorized<T>;
  for (int64_t r = begin; r < end; ++r) {
    T* zr = z + r * cols;
    T* yr = y + r * cols;
    for (int64_t c = 0; c < cols; c += V::size()) {
      const int n = static_cast<int>(std::min<int64_t>(V::size(), cols - c));
      V v = V::loadu(zr + c, n);
      if (bias) v = v + V::loadu(bias + c, n);
      if (store_z) v.store(zr + c, n);
      Act::f(v).store(yr + c, n);
    }
  }
}

template <typename Act, typename T>
void backward_rows(const T* g, const T* z, T* dz, T* db, int64_t begin, int64_t end, int64_t cols) {
  using V = at::vec::Vectorized<T>;
  for (int64_t r = begin; r < end; ++r) {
    const T* gr = g + r * cols;
    const T* zr = z + r * cols;
    T* dzr = dz + r * cols;
    for (int64_t c = 0; c < cols; c += V::size()) {
      const int n = static_cast<int>(std::min<int64_t>(V::size(), cols - c));
      // Lanes past n hold zeros from the partial loads and are never stored.
      V d = V::loadu(gr + c, n) * Act::df(V::loadu(zr + c, n));
      d.store(dzr + c, n);
      if (db) (V::loadu(db + c, n) + d).store(db + c, n);
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

template <typename T>
void dense_backward_rows(Activation a, const T* g, const T* z, T* dz, T* db, int64_t begin, int64_t end,
                         int64_t cols) {
  dispatch_activation(a, [&](auto act) { backward_rows<decltype(act)>(g, z, dz, db, begin, end, cols); });
}

template void dense_forward_rows<float>(Activation, const float*, float*, float*, int64_t, int64_t, int64_t, bool);
template void dense_forward_rows<double>(Activation, const double*, double*, double*, int64_t, int64_t, int64_t, bool);
template void dense_backward_rows<float>(Activation, const float*, const float*, float*, float*, int64_t, int64_t,
                                         int64_t);
template void dense_backward_rows<double>(Activation, const double*, const double*, double*, double*, int64_t,
                                          int64_t, int64_t);

}  // namespace fusedlayers::cpu::FL_ISA
