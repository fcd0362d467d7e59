// What the kernel families (cpu/isa/*.h) share. These headers are compiled once per instruction set, included
// only by kernels_isa.h: FL_ISA names the namespace, CPU_CAPABILITY selects ATen's Vectorized implementation and
// the target pragma the compiler's auto-vectorization of the plain loops.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

namespace fusedlayers::cpu::FL_ISA {
namespace {

// The sum of a vector's lanes: ATen's shuffles for float; double (no such specialization) through memory.
template <typename M>
M lane_sum(const at::vec::Vectorized<M>& v) {
  using V = at::vec::Vectorized<M>;
  if constexpr (std::is_same_v<M, float>) {
    return at::vec::vec_reduce_all<M>([](const V& a, const V& b) { return a + b; }, v);
  } else {
    M lanes[V::size()];
    v.store(lanes);
    for (int64_t w = V::size() / 2; w > 0; w /= 2)
      for (int64_t i = 0; i < w; ++i) lanes[i] += lanes[i + w];
    return lanes[0];
  }
}

}  // namespace
}  // namespace fusedlayers::cpu::FL_ISA
