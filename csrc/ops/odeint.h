// The odeint family's problem and solver arguments, shared by its three ops (csrc/ops/odeint.cpp) and their CPU
// kernels (csrc/cpu/odeint.cpp). The ops take them as plain arguments; these macros keep the three signatures
// and the schemas in one place.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

namespace fusedlayers {

// dy/dt = net(cat([y, t if time_input, c(t) if control], -1)) from y(t[0]) = y0 (fusedlayers.ODEField): net is
// an MLP with parameters in the flat layout (ops/mlp.h); control is (B, k), or knots (B, K, k) at control_times.
#define ODE_PROBLEM_SCHEMA                                                                                          \
  "Tensor y0, Tensor params, Tensor? control, Tensor? control_times, Tensor t, int[] sizes, bool bias, "          \
  "str[] activations, bool time_input"
#define ODE_PROBLEM_ARGS                                                                                            \
  const at::Tensor &y0, const at::Tensor &params, const std::optional<at::Tensor> &control,                        \
      const std::optional<at::Tensor> &control_times, const at::Tensor &t, at::IntArrayRef sizes, bool bias,       \
      std::vector<std::string> activations, bool time_input
#define ODE_PROBLEM_NAMES y0, params, control, control_times, t, sizes, bias, activations, time_input
struct OdeProblem {
  const at::Tensor& y0;
  const at::Tensor& params;
  const std::optional<at::Tensor>& control;
  const std::optional<at::Tensor>& control_times;
  const at::Tensor& t;
  at::IntArrayRef sizes;
  bool bias;
  const std::vector<std::string>& activations;
  bool time_input;
};

// torchdiffeq's method, tolerances and options (None where torchdiffeq's default is None).
#define ODE_SOLVE_SCHEMA                                                                                            \
  "str method, float rtol, float atol, float? first_step, float? step_size, Tensor? step_t, Tensor? jump_t, "     \
  "float safety, float ifactor, float dfactor, float min_step, float max_step, int max_num_steps, bool perturb"
#define ODE_SOLVE_ARGS                                                                                              \
  std::string method, double rtol, double atol, std::optional<double> first_step, std::optional<double> step_size, \
      const std::optional<at::Tensor> &step_t, const std::optional<at::Tensor> &jump_t, double safety,             \
      double ifactor, double dfactor, double min_step, double max_step, int64_t max_num_steps, bool perturb
#define ODE_SOLVE_NAMES                                                                                             \
  method, rtol, atol, first_step, step_size, step_t, jump_t, safety, ifactor, dfactor, min_step, max_step,         \
      max_num_steps, perturb
struct OdeSolve {
  const std::string& method;
  double rtol, atol;
  std::optional<double> first_step, step_size;
  const std::optional<at::Tensor>& step_t;
  const std::optional<at::Tensor>& jump_t;
  double safety, ifactor, dfactor, min_step, max_step;
  int64_t max_num_steps;
  bool perturb;
};

}  // namespace fusedlayers
