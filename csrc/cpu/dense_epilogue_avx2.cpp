// The dense epilogues for AVX2+FMA CPUs, chosen at run time by cpu_has_avx2().
//
// Only what follows the target pragma is compiled for AVX2. Shared headers come first, so their inline
// functions (which the linker may merge with other files' copies) stay portable; after the pragma come only
// ATen's AVX2 Vectorized (its own namespace, at::vec::AVX2) and our templates instantiated on it.
#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/complex.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
// The pragma does not define the feature macros that sleef.h keys its AVX declarations on.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#undef CPU_CAPABILITY
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define FL_ISA isa_avx2
#include "cpu/dense_epilogue_impl.h"
#pragma GCC pop_options

bool fusedlayers::cpu::cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#else
// Elsewhere the AVX2 names hold portable kernels and are never chosen.
#define FL_ISA isa_avx2
#include "cpu/dense_epilogue_impl.h"
bool fusedlayers::cpu::cpu_has_avx2() { return false; }
#endif
