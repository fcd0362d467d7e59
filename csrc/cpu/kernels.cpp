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

template <typename T>
const Kernels<T>& kernels() {
  static const Kernels<T>& chosen = cpu_isa() == Isa::AVX512 ? isa_avx512::table<T>()
                                    : cpu_isa() == Isa::AVX2 ? isa_avx2::table<T>()
                                                             : isa_default::table<T>();
  return chosen;
}

template const Kernels<float>& kernels<float>();
template const Kernels<double>& kernels<double>();

}  // namespace fusedlayers::cpu

TORCH_LIBRARY_FRAGMENT(fusedlayers, m) {
  // Which instruction set the CPU kernels run with: "default", "avx2" or "avx512".
  m.def("cpu_isa() -> str", [] {
    using fusedlayers::cpu::Isa;
    const Isa isa = fusedlayers::cpu::cpu_isa();
    return std::string(isa == Isa::AVX512 ? "avx512" : isa == Isa::AVX2 ? "avx2" : "default");
  });
}
