// The CUDA mlp kernels: the layer-by-layer chain through the CUDA dense kernels (ops/mlp_chain.cpp). A .cpp
// file: it launches nothing itself, so nvcc need not compile it.
#include <torch/library.h>

#include "ops/mlp.h"

TORCH_LIBRARY_IMPL(fusedlayers, CUDA, m) {
  m.impl("mlp_forward", &fusedlayers::mlp_chain_forward);
  m.impl("mlp_backward", &fusedlayers::mlp_chain_backward);
}
