// Compiles the dense epilogues (dense_epilogue_impl.h) for one x86 instruction set, chosen at run time by
// dense.cpp. The including file defines FL_TARGET_AVX2 or FL_TARGET_AVX512.
//
// Only what follows the target pragma is compiled for that instruction set. Shared headers come first, so
// their inline functions (which the linker may merge with other files' copies) stay portable; after the
// pragma come ATen's Vectorized for the ISA (its own namespace, at::vec::AVX2 or at::vec::AVX512) and our
// headers, whose templates (the activation table) must be defined under the pragma: instantiated on these
// vector types outside it, they would be compiled without the ISA and pass vectors with the wrong ABI.
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

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#undef CPU_CAPABILITY
// The pragma does not define the feature macros that sleef.h and ATen key their declarations on.
#if defined(FL_TARGET_AVX512)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define FL_ISA isa_avx512
#else
#pragma GCC target("avx2,fma")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define FL_ISA isa_avx2
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
#include "cpu/kernels_impl.h"
#pragma GCC pop_options
#define FL_X86 1
#else
// Elsewhere these names hold portable kernels and are never chosen.
#if defined(FL_TARGET_AVX512)
#define FL_ISA isa_avx512
#else
#define FL_ISA isa_avx2
#endif
#include "cpu/kernels_impl.h"
#define FL_X86 0
#endif
