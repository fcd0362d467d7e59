// The CPU kernels for AVX-512 CPUs (F, BW, VL, DQ: what ATen's AVX512 Vectorized needs).
#define FL_TARGET_AVX512
#include "cpu/kernels_isa.h"

bool fusedlayers::cpu::cpu_has_avx512() {
#if FL_X86
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
#else
  return false;
#endif
}
