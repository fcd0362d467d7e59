// Compiles the CPU kernels (the families in cpu/isa/*.h) and their table for one instruction set, chosen at run
// time by kernels.cpp. The including file (kernels_{default,avx2,avx512}.cpp) defines FL_TARGET_DEFAULT,
// FL_TARGET_AVX2 or FL_TARGET_AVX512.
//
// Only what follows the target pragma is compiled for that instruction set. Shared headers come first, so
// their inline functions (which the linker may merge with other files' copies) stay portable; after the
// pragma come ATen's Vectorized for the ISA (its own namespace, at::vec::AVX2 or at::vec::AVX512) and our
// headers, whose templates (the activation table, the kernels) must be defined under the pragma: instantiated
// on these vector types outside it, they would be compiled without the ISA and pass vectors with the wrong ABI.
#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/Half.h>
#include <c10/util/complex.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>

#if defined(FL_TARGET_AVX512)
#define FL_ISA isa_avx512
#elif defined(FL_TARGET_AVX2)
#define FL_ISA isa_avx2
#elif defined(FL_TARGET_DEFAULT)
#define FL_ISA isa_default
#else
#error "define FL_TARGET_DEFAULT, FL_TARGET_AVX2 or FL_TARGET_AVX512 before including cpu/kernels_isa.h"
#endif

// Elsewhere than x86 with GCC or Clang, isa_avx2 and isa_avx512 hold portable kernels and are never chosen.
#if defined(__x86_64__) && defined(__GNUC__)
#define FL_X86 1
#else
#define FL_X86 0
#endif

#if FL_X86 && !defined(FL_TARGET_DEFAULT)
#pragma GCC push_options
#undef CPU_CAPABILITY
// The pragma does not define the feature macros that sleef.h and ATen key their declarations on.
#if defined(FL_TARGET_AVX512)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#else
#pragma GCC target("avx2,fma")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#if defined(FL_TARGET_AVX512) && !defined(__AVX512F__)
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#endif
#endif

#include "cpu/isa/cross_entropy.h"
#include "cpu/isa/dense.h"
#include "cpu/isa/jet.h"
#include "cpu/isa/mlp_tile.h"
#include "cpu/kernels.h"

namespace fusedlayers::cpu::FL_ISA {

// This instruction set's kernels, one entry per member of Kernels (kernels.h), in its order. Taking their
// addresses here, under the pragma, instantiates them for float and double; a member left out is an error.
template <typename T>
const Kernels<T>& table() {
#pragma GCC diagnostic push
#pragma GCC diagnostic error "-Wmissing-field-initializers"
  static constexpr Kernels<T> entries = {
      .dense_forward_rows = dense_forward_rows<T>,
      .dense_backward_rows = dense_backward_rows<T>,
      .activation_elements = activation_elements<T>,
      .jet_forward_elements = jet_forward_elements<T>,
      .jet_backward_elements = jet_backward_elements<T>,
      .mlp_tile_forward = mlp_tile_forward<T>,
      .mlp_tile_backward = mlp_tile_backward<T>,
      .ce_forward_row = ce_forward_row<T>,
      .ce_softmax_row = ce_softmax_row<T>,
      .ce_backward_row = ce_backward_row<T>,
      .ce_soft_forward_row = ce_soft_forward_row<T>,
      .ce_soft_backward_row = ce_soft_backward_row<T>,
  };
#pragma GCC diagnostic pop
  return entries;
}

template const Kernels<float>& table<float>();
template const Kernels<double>& table<double>();

}  // namespace fusedlayers::cpu::FL_ISA

#if FL_X86 && !defined(FL_TARGET_DEFAULT)
#pragma GCC pop_options
#endif
