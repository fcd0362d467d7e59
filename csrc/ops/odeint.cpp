// The odeint family: a whole ODE solve of an MLP vector field as one op (fusedlayers.odeint with an ODEField).
// Schemas only: the kernels are the CPU's (csrc/cpu/odeint.cpp), the autograd and the fakes are Python's
// (fusedlayers/ops/odeint.py), where the arguments are checked.
#include <torch/library.h>

#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>

#include "ops/odeint.h"

TORCH_LIBRARY_FRAGMENT(fusedlayers, m) {
  // (solution (len(t), *y0.shape), stats [evaluations, accepted steps])
  m.def("odeint(" ODE_PROBLEM_SCHEMA ", " ODE_SOLVE_SCHEMA ") -> (Tensor, Tensor)");
  // Backpropagation through the accepted steps (the solve recomputed): (dy0, dparams, dcontrol or an empty tensor,
  // stats [forward evaluations, vector-Jacobian products, accepted steps]).
  m.def("odeint_backward(Tensor grad, " ODE_PROBLEM_SCHEMA ", " ODE_SOLVE_SCHEMA
        ") -> (Tensor, Tensor, Tensor, Tensor)");
  // The continuous adjoint from the solution ys, solved with the adjoint's method and options: param_norm holds
  // (offset, length) pairs of params whose adjoint enters the error norm (one per adjoint parameter);
  // (dy0, dparams, dcontrol or an empty tensor without control_grad, stats [evaluations]).
  m.def("odeint_adjoint_backward(Tensor grad, Tensor ys, " ODE_PROBLEM_SCHEMA ", " ODE_SOLVE_SCHEMA
        ", int[] param_norm, bool control_grad, bool seminorm) -> (Tensor, Tensor, Tensor, Tensor)");
  // Differentiated by fusedlayers/ops/odeint.py's autograd.Functions; called directly on tensors that require
  // grad, they raise rather than return a result with no gradient.
  for (const char* op : {"odeint", "odeint_backward", "odeint_adjoint_backward"})
    m.impl(op, torch::dispatch(c10::DispatchKey::Autograd, torch::autograd::autogradNotImplementedFallback()));
}
