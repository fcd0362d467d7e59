// The odeint family on the CPU: a whole solve of dy/dt = net([y, t?, c(t)?]) (fusedlayers.ODEField) in C++, its
// gradient by backpropagation through the accepted steps, and by the continuous adjoint. The solver is
// csrc/cpu/ode_solver.h (torchdiffeq's algorithm); the field calls the mlp kernels (csrc/cpu/mlp.cpp) once per
// evaluation, B trajectories at a time, so each evaluation is one (B x width) pass of the fused network.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/mlp.h"
#include "cpu/ode_backprop.h"
#include "ops/odeint.h"

namespace fusedlayers::cpu {
namespace ode {

// torchdiffeq's tableaus (dopri5.py, bosh3.py, fixed_grid.py; rk4 is its rk4_alt_step_func, the 3/8 rule), and
// Tsitouras' 5(4) pair with its dense output at theta = 1/2 as the midpoint of torchdiffeq's interpolation.
const Tableau* tableau(const std::string& method) {
  static const Tableau dopri5{
      5,
      true,
      {1. / 5, 3. / 10, 4. / 5, 8. / 9, 1., 1.},
      {{1. / 5},
       {3. / 40, 9. / 40},
       {44. / 45, -56. / 15, 32. / 9},
       {19372. / 6561, -25360. / 2187, 64448. / 6561, -212. / 729},
       {9017. / 3168, -355. / 33, 46732. / 5247, 49. / 176, -5103. / 18656},
       {35. / 384, 0, 500. / 1113, 125. / 192, -2187. / 6784, 11. / 84}},
      {35. / 384, 0, 500. / 1113, 125. / 192, -2187. / 6784, 11. / 84, 0},
      {35. / 384 - 1951. / 21600, 0, 500. / 1113 - 22642. / 50085, 125. / 192 - 451. / 720,
       -2187. / 6784 - -12231. / 42400, 11. / 84 - 649. / 6300, -1. / 60.},
      {6025192743. / 30085553152. / 2, 0, 51252292925. / 65400821598. / 2, -2691868925. / 45128329728. / 2,
       187940372067. / 1594534317056. / 2, -1776094331. / 19743644256. / 2, 11237099. / 235043384. / 2}};
  static const Tableau bosh3{3,
                             true,
                             {1. / 2, 3. / 4, 1.},
                             {{1. / 2}, {0., 3. / 4}, {2. / 9, 1. / 3, 4. / 9}},
                             {2. / 9, 1. / 3, 4. / 9, 0.},
                             {2. / 9 - 7. / 24, 1. / 3 - 1. / 4, 4. / 9 - 1. / 3, -1. / 8},
                             {0., 0.5, 0., 0.}};
  static const Tableau tsit5 = [] {
    // b_i(theta) of Tsitouras (2011), Table 2's continuous extension, at theta = 1/2
    const double h = 0.5, h2 = h * h;
    return Tableau{
        5,
        true,
        {0.161, 0.327, 0.9, 0.9800255409045097, 1., 1.},
        {{0.161},
         {-0.008480655492356989, 0.335480655492357},
         {2.897153057105493, -6.359448489975075, 4.3622954328695815},
         {5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525},
         {5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401, -0.028269050394068383},
         {0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081,
          2.324710524099774}},
        {0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081, 2.324710524099774,
         0.},
        {-0.00178001105222577714, -0.0008164344596567469, 0.007880878010261995, -0.1447110071732629,
         0.5823571654525552, -0.45808210592918697, 0.015151515151515152},
        {-1.0530884977290216 * h * (h - 1.3299890189751412) * (h2 - 1.4364028541716351 * h + 0.7139816917074209),
         0.1017 * h2 * (h2 - 2.1966568338249754 * h + 1.2949852507374631),
         2.490627285651252793 * h2 * (h2 - 2.38535645472061657 * h + 1.57803468208092486),
         -16.54810288924490272 * (h - 1.21712927295533244) * (h - 0.61620406037800089) * h2,
         47.37952196281928122 * (h - 1.203071208372362603) * (h - 0.658047292653547382) * h2,
         -34.87065786149660974 * (h - 1.2) * (h - 0.666666666666666667) * h2,
         2.5 * (h - 1) * (h - 0.6) * h2}};
  }();
  static const Tableau euler{1, false, {}, {}, {1.}, {}, {}};
  static const Tableau midpoint{2, false, {0.5}, {{0.5}}, {0., 1.}, {}, {}};
  static const Tableau rk4{4, false, {1. / 3, 2. / 3, 1.}, {{1. / 3}, {-1. / 3, 1.}, {1., -1., 1.}},
                           {1. / 8, 3. / 8, 3. / 8, 1. / 8}, {}, {}};
  if (method == "dopri5") return &dopri5;
  if (method == "bosh3") return &bosh3;
  if (method == "tsit5") return &tsit5;
  if (method == "euler") return &euler;
  if (method == "midpoint") return &midpoint;
  if (method == "rk4") return &rk4;
  return nullptr;
}

}  // namespace ode

namespace {

using ode::Perturb;

// fusedlayers.ODEField's dy/dt = net(cat([y, t if time_input, c(t) if control], -1)) for B trajectories of d
// states, with its vector-Jacobian products. c(t) is the constant control (B, k) or the knots (B, K, k)
// interpolated linearly at t (constant beyond the end knots), as ODEField.control_at computes it.
template <typename T>
struct Field : ode::System<T> {
  std::vector<at::Tensor> weights, biases;
  std::vector<std::string> acts;
  int64_t B, d, k = 0, K = 0, in;
  bool time_input;
  at::Tensor control_c;  // control, contiguous (a transposed or expanded one is copied)
  const T* control = nullptr;
  std::vector<T> times;
  at::Tensor x, g;
  std::vector<T> dparams, dcontrol;  // backprop's accumulators

  Field(const OdeProblem& p) : acts(p.activations), time_input(p.time_input) {
    std::tie(weights, biases) = flat_layers(p.params, p.sizes, p.bias);
    d = p.y0.size(-1);
    B = p.y0.dim() == 2 ? p.y0.size(0) : 1;
    in = p.sizes.front();
    if (p.control) {
      control_c = p.control->contiguous();
      control = control_c.template const_data_ptr<T>();
      k = p.control->size(-1);
      if (p.control_times) {
        const auto ct = p.control_times->contiguous();
        K = ct.size(0);
        times.assign(ct.template const_data_ptr<T>(), ct.template const_data_ptr<T>() + K);
      }
    }
    this->n = B * d;
    x = at::empty({B, in}, p.y0.options());
    g = at::empty({B, p.sizes.back()}, p.y0.options());
  }

  // the knot segment [j, j + 1] holding t, and t's weight on knot j + 1 (unclamped: beyond the end knots it
  // leaves [0, 1], where the control is constant)
  std::pair<int64_t, T> segment(T t) const {
    if (K == 1) return {0, T(0)};
    int64_t j = std::upper_bound(times.begin(), times.end(), t) - times.begin() - 1;
    j = std::clamp<int64_t>(j, 0, K - 2);
    return {j, (t - times[j]) / (times[j + 1] - times[j])};
  }

  void fill(T t, const T* y) {
    T* xp = x.data_ptr<T>();
    const auto [j, w_raw] = control && K ? segment(t) : std::pair<int64_t, T>{0, T(0)};
    const T w = std::clamp(w_raw, T(0), T(1));
    for (int64_t r = 0; r < B; ++r) {
      T* row = xp + r * in;
      std::copy(y + r * d, y + (r + 1) * d, row);
      int64_t c = d;
      if (time_input) row[c++] = t;
      if (!control) continue;
      if (K == 0) {
        std::copy(control + r * k, control + (r + 1) * k, row + c);
      } else {
        const T* lo = control + (r * K + j) * k;
        const T* hi = K == 1 ? lo : lo + k;
        for (int64_t e = 0; e < k; ++e) row[c + e] = lo[e] + w * (hi[e] - lo[e]);
      }
    }
  }

  void eval(T t, const T* y, T* f) override {
    fill(t, y);
    const auto out = std::get<0>(cpu::mlp_forward(x, weights, biases, acts, false));
    std::copy(out.template const_data_ptr<T>(), out.template const_data_ptr<T>() + this->n, f);
  }

  // Adds g_f's products with df/dy, df/dparams (flat layout), df/dcontrol and df/dt into gy, gp, gc and gt (the
  // last two may be null).
  void vjp_into(T t, const T* y, const T* g_f, T* gy, T* gp, T* gc, T* gt = nullptr) {
    fill(t, y);
    std::copy(g_f, g_f + this->n, g.data_ptr<T>());
    const auto [dx, dws, dbs] = cpu::mlp_backward(g, x, weights, biases, {}, acts, true);
    const T* dxp = dx.template const_data_ptr<T>();
    for (int64_t r = 0; r < B; ++r)
      for (int64_t e = 0; e < d; ++e) gy[r * d + e] += dxp[r * in + e];
    int64_t off = 0;
    for (size_t l = 0; l < dws.size(); ++l) {
      for (const auto* part : {&dws[l], biases.empty() ? nullptr : &dbs[l]}) {
        if (!part) continue;
        const auto c = part->contiguous();
        const T* p = c.template const_data_ptr<T>();
        for (int64_t e = 0; e < c.numel(); ++e) gp[off + e] += p[e];
        off += c.numel();
      }
    }
    const int64_t c0 = d + (time_input ? 1 : 0);
    const auto [j, w_raw] = control && K ? segment(t) : std::pair<int64_t, T>{0, T(0)};
    const T w = std::clamp(w_raw, T(0), T(1));
    if (gt) {
      T sum = T(0);
      if (time_input)
        for (int64_t r = 0; r < B; ++r) sum += dxp[r * in + d];
      // dc/dt = (hi - lo) / (t_{j+1} - t_j), and 0 where the weight is clamped: at 0 and 1 too, as
      // torch.clamp's gradient (the torchdiffeq field's interpolation)
      if (control && K > 1 && w_raw > T(0) && w_raw < T(1)) {
        T dw = T(0);
        for (int64_t r = 0; r < B; ++r) {
          const T* lo = control + (r * K + j) * k;
          for (int64_t e = 0; e < k; ++e) dw += dxp[r * in + c0 + e] * (lo[k + e] - lo[e]);
        }
        sum += dw / (times[j + 1] - times[j]);
      }
      *gt += sum;
    }
    if (!gc || !control) return;
    for (int64_t r = 0; r < B; ++r) {
      const T* dc = dxp + r * in + c0;
      if (K == 0) {
        for (int64_t e = 0; e < k; ++e) gc[r * k + e] += dc[e];
      } else {
        T* lo = gc + (r * K + j) * k;
        for (int64_t e = 0; e < k; ++e) {
          if (K == 1) {
            lo[e] += dc[e];
          } else {
            lo[e] += (T(1) - w) * dc[e];
            lo[e + k] += w * dc[e];
          }
        }
      }
    }
  }

  void vjp(T t, const T* y, const T* g_f, T* gy, T* gt) override {
    vjp_into(t, y, g_f, gy, dparams.data(), dcontrol.empty() ? nullptr : dcontrol.data(), gt);
  }
};

// The solver's view of an OdeProblem's options, in solver time (tau = sign * t, ascending). Adaptive methods
// step onto the control's knots: they join jump_t.
ode::Options solver_options(const OdeProblem& p, const OdeSolve& s, int sign) {
  const at::Tensor& t = p.t;
  ode::Options o;
  o.rtol = s.rtol, o.atol = s.atol, o.first_step = s.first_step, o.step_size = s.step_size;
  o.safety = s.safety, o.ifactor = s.ifactor, o.dfactor = s.dfactor, o.min_step = s.min_step;
  o.max_step = s.max_step, o.max_num_steps = s.max_num_steps, o.perturb = s.perturb;
  // the solve's earliest solver time: the adjoint's intervals each start later, and find their next jump
  const double t0 = std::min(sign * t[0].item<double>(), sign * t[-1].item<double>());
  auto times = [&](const std::optional<at::Tensor>& v) {
    std::vector<double> out;
    if (!v) return out;
    const auto c = v->to(at::kDouble).contiguous();
    for (int64_t i = 0; i < c.numel(); ++i)
      if (sign * c.const_data_ptr<double>()[i] >= t0) out.push_back(sign * c.const_data_ptr<double>()[i]);
    std::sort(out.begin(), out.end());
    return out;
  };
  o.step_t = times(s.step_t);
  o.jump_t = times(s.jump_t);
  if (p.control_times && ode::tableau(s.method)->adaptive) {
    const auto knots = times(p.control_times);
    o.jump_t.insert(o.jump_t.end(), knots.begin(), knots.end());
    std::sort(o.jump_t.begin(), o.jump_t.end());
    o.jump_t.erase(std::unique(o.jump_t.begin(), o.jump_t.end()), o.jump_t.end());
  }
  for (double v : o.step_t)
    TORCH_CHECK(!std::binary_search(o.jump_t.begin(), o.jump_t.end(), v), "odeint(): `step_t` and `jump_t` must "
                "not have any repeated elements between them (the control's knots are jump times), got ", sign * v,
                " in both");
  return o;
}

std::vector<double> solver_times(const at::Tensor& t, int sign) {
  const auto c = t.to(at::kDouble).contiguous();
  std::vector<double> tau(c.const_data_ptr<double>(), c.const_data_ptr<double>() + c.numel());
  for (auto& v : tau) v *= sign;
  return tau;
}

int sign_of(const at::Tensor& t) { return t.numel() > 1 && t[0].item<double>() > t[1].item<double>() ? -1 : 1; }

template <typename T>
std::tuple<at::Tensor, at::Tensor> solve(const OdeProblem& p, const OdeSolve& s) {
  Field<T> field(p);
  const int sign = sign_of(p.t);
  auto opt = solver_options(p, s, sign);
  opt.norm = {{0, field.n}};  // torchdiffeq's RMS norm over the state
  const auto tau = solver_times(p.t, sign);
  ode::Solver<T> solver(field, *ode::tableau(s.method), opt, sign < 0);
  auto shape = p.y0.sizes().vec();
  shape.insert(shape.begin(), int64_t(tau.size()));
  at::Tensor ys = at::empty(shape, p.y0.options());
  const auto y0 = p.y0.contiguous();
  ode::Record<T> rec;
  solver.integrate(tau.data(), int64_t(tau.size()), y0.template const_data_ptr<T>(), ys.data_ptr<T>(), &rec);
  return {ys, at::tensor({solver.nfe, int64_t(rec.steps.size())}, at::kLong)};
}

// Backpropagation through the accepted steps of a solve (recomputed, then reversed: csrc/cpu/ode_backprop.h).
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backprop(const at::Tensor& grad, const OdeProblem& p,
                                                                    const OdeSolve& s) {
  Field<T> field(p);
  const int64_t n = field.n;
  field.dparams.assign(p.params.numel(), T(0));
  if (p.control) field.dcontrol.assign(p.control->numel(), T(0));
  const int sign = sign_of(p.t);
  auto opt = solver_options(p, s, sign);
  opt.norm = {{0, field.n}};  // torchdiffeq's RMS norm over the state
  const auto tau = solver_times(p.t, sign);
  const int64_t m = int64_t(tau.size());
  const ode::Tableau& tab = *ode::tableau(s.method);
  ode::Solver<T> solver(field, tab, opt, sign < 0);
  std::vector<T> ys(m * n);
  ode::Record<T> rec;
  const auto y0 = p.y0.contiguous();
  solver.integrate(tau.data(), m, y0.template const_data_ptr<T>(), ys.data(), &rec);
  const int64_t nfe_forward = solver.nfe;

  const auto opts = p.y0.options();
  at::Tensor dy0 = at::empty(p.y0.sizes(), opts), dparams = at::empty({p.params.numel()}, opts);
  ode::backprop_steps(solver, rec, grad.contiguous().template const_data_ptr<T>(), m, dy0.data_ptr<T>());
  std::copy(field.dparams.begin(), field.dparams.end(), dparams.data_ptr<T>());
  at::Tensor dcontrol = at::empty({0}, opts);  // no control: empty
  if (p.control) {
    dcontrol = at::empty(p.control->sizes(), opts);
    std::copy(field.dcontrol.begin(), field.dcontrol.end(), dcontrol.data_ptr<T>());
  }
  return {dy0, dparams, dcontrol, at::tensor({nfe_forward, solver.nvjp, int64_t(rec.steps.size())}, at::kLong)};
}

// torchdiffeq's augmented adjoint system [a_t, y, a, a_params, a_control], evaluated at t:
// [-a^T df/dt, f(t, y), -a^T df/dy, -a^T df/dparams, -a^T df/dcontrol]. a_t is no gradient (t takes none) but
// enters the error norm, as in torchdiffeq, whose augmented dynamics differentiate w.r.t. t always.
template <typename T>
struct Augmented : ode::System<T> {
  Field<T>& field;
  int64_t ny, P, C;
  std::vector<T> neg;
  Augmented(Field<T>& f, int64_t P_, int64_t C_) : field(f), ny(f.n), P(P_), C(C_), neg(f.n) {
    this->n = 1 + 2 * ny + P + C;
  }
  void eval(T t, const T* z, T* dz) override {
    std::fill(dz, dz + this->n, T(0));
    field.eval(t, z + 1, dz + 1);
    for (int64_t e = 0; e < ny; ++e) neg[e] = -z[1 + ny + e];
    field.vjp_into(t, z + 1, neg.data(), dz + 1 + ny, dz + 1 + 2 * ny, C ? dz + 1 + 2 * ny + P : nullptr, dz);
  }
};

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adjoint(const at::Tensor& grad, const at::Tensor& ys,
                                                                   const OdeProblem& p, const OdeSolve& s,
                                                                   at::IntArrayRef param_norm, bool control_grad,
                                                                   bool seminorm) {
  Field<T> field(p);
  const int64_t ny = field.n, P = p.params.numel(), C = control_grad ? p.control->numel() : 0;
  Augmented<T> aug(field, P, C);
  const int sign = -sign_of(p.t);  // each interval is solved backwards
  auto opt = solver_options(p, s, sign);
  opt.norm = {{0, 1}, {1, ny}, {1 + ny, ny}};
  if (!seminorm) {
    for (size_t i = 0; i + 1 < param_norm.size(); i += 2) opt.norm.push_back({1 + 2 * ny + param_norm[i], param_norm[i + 1]});
    if (C) opt.norm.push_back({1 + 2 * ny + P, C});
  }
  const ode::Tableau& tab = *ode::tableau(s.method);
  const auto tt = p.t.to(at::kDouble).contiguous();
  const double* t = tt.const_data_ptr<double>();
  const int64_t m = tt.numel();
  const auto yc = ys.contiguous(), gc = grad.contiguous();
  const T* Y = yc.template const_data_ptr<T>();
  const T* G = gc.template const_data_ptr<T>();
  std::vector<T> zs(2 * aug.n, T(0));
  T* z = zs.data();
  std::copy(Y + (m - 1) * ny, Y + m * ny, z + 1);
  std::copy(G + (m - 1) * ny, G + m * ny, z + 1 + ny);
  int64_t nfe = 0;
  for (int64_t i = m - 1; i >= 1; --i) {
    const double tau[2] = {sign * t[i], sign * t[i - 1]};
    ode::Solver<T> solver(aug, tab, opt, sign < 0);
    solver.integrate(tau, 2, z, zs.data(), nullptr);
    std::copy(zs.begin() + aug.n, zs.end(), zs.begin());
    nfe += solver.nfe;
    std::copy(Y + (i - 1) * ny, Y + i * ny, z + 1);
    for (int64_t e = 0; e < ny; ++e) z[1 + ny + e] += G[(i - 1) * ny + e];
  }
  const auto opts = p.y0.options();
  at::Tensor dy0 = at::empty(p.y0.sizes(), opts), dparams = at::empty({P}, opts), dcontrol = at::empty({0}, opts);
  std::copy(z + 1 + ny, z + 1 + 2 * ny, dy0.data_ptr<T>());
  std::copy(z + 1 + 2 * ny, z + 1 + 2 * ny + P, dparams.data_ptr<T>());
  if (C) {
    dcontrol = at::empty(p.control->sizes(), opts);
    std::copy(z + 1 + 2 * ny + P, z + aug.n, dcontrol.data_ptr<T>());
  }
  return {dy0, dparams, dcontrol, at::tensor({nfe}, at::kLong)};
}

void check_cpu(const OdeProblem& p, const OdeSolve& s) {
  TORCH_CHECK(p.y0.scalar_type() == at::kFloat || p.y0.scalar_type() == at::kDouble,
              "odeint(): the fused CPU solve supports float32 and float64 states, got ", py(p.y0.scalar_type()));
  TORCH_CHECK(ode::tableau(s.method), "odeint(): unknown method '", s.method, "'");
}

std::tuple<at::Tensor, at::Tensor> odeint_cpu(ODE_PROBLEM_ARGS, ODE_SOLVE_ARGS) {
  const OdeProblem p{ODE_PROBLEM_NAMES};
  const OdeSolve s{ODE_SOLVE_NAMES};
  check_cpu(p, s);
  return AT_DISPATCH_FLOATING_TYPES(y0.scalar_type(), "odeint", [&] { return solve<scalar_t>(p, s); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> odeint_backward_cpu(const at::Tensor& grad, ODE_PROBLEM_ARGS,
                                                                               ODE_SOLVE_ARGS) {
  const OdeProblem p{ODE_PROBLEM_NAMES};
  const OdeSolve s{ODE_SOLVE_NAMES};
  check_cpu(p, s);
  return AT_DISPATCH_FLOATING_TYPES(y0.scalar_type(), "odeint_backward", [&] { return backprop<scalar_t>(grad, p, s); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> odeint_adjoint_backward_cpu(
    const at::Tensor& grad, const at::Tensor& ys, ODE_PROBLEM_ARGS, ODE_SOLVE_ARGS, at::IntArrayRef param_norm,
    bool control_grad, bool seminorm) {
  const OdeProblem p{ODE_PROBLEM_NAMES};
  const OdeSolve s{ODE_SOLVE_NAMES};
  check_cpu(p, s);
  return AT_DISPATCH_FLOATING_TYPES(y0.scalar_type(), "odeint_adjoint_backward", [&] {
    return adjoint<scalar_t>(grad, ys, p, s, param_norm, control_grad, seminorm);
  });
}

}  // namespace
}  // namespace fusedlayers::cpu

TORCH_LIBRARY_IMPL(fusedlayers, CPU, m) {
  m.impl("odeint", &fusedlayers::cpu::odeint_cpu);
  m.impl("odeint_backward", &fusedlayers::cpu::odeint_backward_cpu);
  m.impl("odeint_adjoint_backward", &fusedlayers::cpu::odeint_adjoint_backward_cpu);
}
