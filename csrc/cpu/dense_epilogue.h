// The elementwise passes of the dense op on the CPU, over a range of rows of a row-major (rows, cols) matrix.
// They are compiled once per instruction set (dense_epilogue_{default,avx2,avx512}.cpp) and chosen at run
// time, so the library runs on any x86-64 CPU and uses the widest vectors it has.
#pragma once

#include <cstdint>

#include "activations.h"

namespace fusedlayers::cpu {

// Declares the kernels of one instruction set; T is float or double.
#define FL_DECLARE_DENSE_EPILOGUE(ISA)                                                                           \
  namespace ISA {                                                                                                \
  /* y = f(z + bias); z + bias is written back into z when store_z (z and y may alias when not). */             \
  template <typename T>                                                                                          \
  void dense_forward_rows(Activation a, const T* bias, T* z, T* y, int64_t begin, int64_t end, int64_t cols,   \
                          bool store_z);                                                                         \
  /* dz = g * f'(z); db[c] += sum over the rows of dz[., c] when db is not null. */                            \
  template <typename T>                                                                                          \
  void dense_backward_rows(Activation a, const T* g, const T* z, T* dz, T* db, int64_t begin, int64_t end,      \
                           int64_t cols);                                                                        \
  }

FL_DECLARE_DENSE_EPILOGUE(isa_default)
FL_DECLARE_DENSE_EPILOGUE(isa_avx2)
FL_DECLARE_DENSE_EPILOGUE(isa_avx512)
#undef FL_DECLARE_DENSE_EPILOGUE

// The kernels of the widest instruction set this CPU runs (capped by FUSEDLAYERS_CPU_ISA), for float and
// double; defined in dense.cpp.
template <typename T>
void forward_rows(Activation a, const T* bias, T* z, T* y, int64_t begin, int64_t end, int64_t cols, bool store_z);
template <typename T>
void backward_rows(Activation a, const T* g, const T* z, T* dz, T* db, int64_t begin, int64_t end, int64_t cols);

// True when this CPU runs the kernels of that instruction set.
bool cpu_has_avx2();
bool cpu_has_avx512();

}  // namespace fusedlayers::cpu
