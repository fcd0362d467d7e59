// The kernel family a differentiable op's `backend` argument names.
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

namespace fusedlayers {

// "native": the C++ CPU or CUDA kernels, picked by the dispatcher from the device; "triton": the triton_* ops.
inline bool is_triton(c10::string_view backend) {
  if (backend == "triton") return true;
  TORCH_CHECK_VALUE(backend == "native", "unknown kernel family '", backend, "'; expected 'native' or 'triton'");
  return false;
}

}  // namespace fusedlayers
