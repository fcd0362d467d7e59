// The CPU kernels for AVX2+FMA CPUs.
#define FL_TARGET_AVX2
#include "cpu/kernels_isa.h"

bool fusedlayers::cpu::cpu_has_avx2() {
#if FL_X86
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}
