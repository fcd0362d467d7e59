// The explicit Runge-Kutta solver of the odeint family (csrc/cpu/odeint.cpp), generic over the system it
// integrates: torchdiffeq's algorithm step for step (rk_common.py, solvers.py, misc.py), so that on the same
// problem the accepted steps and the number of evaluations are torchdiffeq's. Time is kept in float64, each
// stage's time in the state's type T; the error norm is the RMS over each of the state's segments, their maximum
// (torchdiffeq's rms norm for one segment, its mixed norm for the adjoint's tuple). A solve runs in ascending
// solver time tau; a reversed solve (decreasing t, the adjoint) evaluates the system at -tau and negates it.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

namespace fusedlayers::cpu::ode {

struct Tableau {
  int order;
  bool adaptive;
  std::vector<double> alpha;              // stage i >= 1 at t0 + alpha[i-1] * dt
  std::vector<std::vector<double>> beta;  // stage i >= 1 at y0 + dt * sum_j beta[i-1][j] k_j
  std::vector<double> c_sol, c_error, c_mid;
};

const Tableau* tableau(const std::string& method);  // nullptr for an unknown method

struct Options {
  double rtol = 1e-7, atol = 1e-9;
  std::optional<double> first_step, step_size;
  double safety = 0.9, ifactor = 10.0, dfactor = 0.2, min_step = 0.0;
  double max_step = std::numeric_limits<double>::infinity();
  int64_t max_num_steps = (int64_t(1) << 31) - 1;
  bool perturb = false;                  // the fixed-grid methods' option
  std::vector<double> step_t, jump_t;    // in solver time, ascending
  std::vector<std::pair<int64_t, int64_t>> norm;  // (offset, length) segments of the state
};

enum class Perturb { None, Prev, Next };

// The system dy/dtau = f(t, y) of n elements; eval writes f, vjp (backprop only) adds into g_y the product of
// g_f with df/dy, into *g_t (if not null) its product with df/dt, and accumulates its own parameter gradients.
template <typename T>
struct System {
  int64_t n = 0;
  virtual ~System() = default;
  virtual void eval(T t, const T* y, T* f) = 0;
  virtual void vjp(T t, const T* y, const T* g_f, T* g_y, T* g_t) { TORCH_CHECK(false, "odeint(): no vjp"); }
};

// An accepted step, kept for backpropagation: its start state and stages k_0..k_S.
template <typename T>
struct Step {
  double t0, dt, t1;
  std::vector<T> y0, k;
  bool jump = false;  // the step ended on a jump time: the next step's k_0 was evaluated afresh at t1+
  // d t0 / d h and d dt / d h for the initial step h that initial_step() chose: torchdiffeq differentiates that
  // choice (and holds every later step size constant), so each step's times move with h until one ends on a
  // step_t or jump_t point
  double sigma = 0, delta = 0;
};

template <typename T>
struct Record {
  std::vector<Step<T>> steps;
  std::vector<int64_t> out_step;  // per output j >= 1: the step it was read from
  std::vector<T> out_x;           // its position in the step (adaptive: x in [0, 1]; fixed grid: the slope)
  std::vector<int8_t> out_end;    // fixed grid: 0 -> y0 of the step, 1 -> y1, -1 -> interpolated
};

template <typename T>
class Solver {
 public:
  Solver(System<T>& sys, const Tableau& tab, const Options& opt, bool reversed)
      : sys_(sys), tab_(tab), opt_(opt), sign_(reversed ? -1 : 1), n_(sys.n), S_(int64_t(tab.alpha.size())),
        fsal_(tab.adaptive && tab.c_sol.back() == 0 &&
              std::equal(tab.beta.back().begin(), tab.beta.back().end(), tab.c_sol.begin())) {}

  int64_t nfe = 0, nvjp = 0;

  // Solves at the solver times tau[0] < ... < tau[m-1], writing m x n values into out (out[0] = y0).
  void integrate(const double* tau, int64_t m, const T* y0, T* out, Record<T>* rec) {
    std::copy(y0, y0 + n_, out);
    if (tab_.adaptive) adaptive(tau, m, y0, out, rec);
    else fixed(tau, m, y0, out, rec);
  }

  // Evaluates at solver time tau (torchdiffeq's _PerturbFunc, then _ReverseFunc).
  void call(T tau, Perturb p, const T* y, T* f) {
    if (p == Perturb::Next) tau = std::nextafter(tau, std::numeric_limits<T>::infinity());
    if (p == Perturb::Prev) tau = std::nextafter(tau, -std::numeric_limits<T>::infinity());
    sys_.eval(T(sign_) * tau, y, f);
    if (sign_ < 0)
      for (int64_t i = 0; i < n_; ++i) f[i] = -f[i];
    ++nfe;
  }

  // Adds g's product with the Jacobian of call(tau, p, y, .) into gy, and with its derivative in tau into *gt.
  void vjp_call(T tau, Perturb p, const T* y, const T* g, T* gy, T* gt = nullptr) {
    if (p == Perturb::Next) tau = std::nextafter(tau, std::numeric_limits<T>::infinity());
    if (p == Perturb::Prev) tau = std::nextafter(tau, -std::numeric_limits<T>::infinity());
    if (sign_ < 0) {
      neg_.assign(g, g + n_);
      for (auto& v : neg_) v = -v;
      g = neg_.data();
    }
    T g_t = T(0);
    sys_.vjp(T(sign_) * tau, y, g, gy, gt ? &g_t : nullptr);
    if (gt) *gt += T(sign_) * g_t;
    ++nvjp;
  }

  // The time of stage i >= 1 of a step, and its perturbation (torchdiffeq's _runge_kutta_step / rk4_alt).
  std::pair<T, Perturb> stage_time(int64_t i, double t0, double dt, double t1) const {
    const T a = T(tab_.alpha[i - 1]);
    if (a == T(1)) return {T(t1), tab_.adaptive || opt_.perturb ? Perturb::Prev : Perturb::None};
    return {T(t0) + a * T(dt), Perturb::None};
  }
  Perturb first_perturb() const { return !tab_.adaptive && opt_.perturb ? Perturb::Next : Perturb::None; }
  int64_t size() const { return n_; }
  const Tableau& tab() const { return tab_; }
  const Options& options() const { return opt_; }

  // z = y0 + sum_{j<i} k_j * (beta[i-1][j] * dt), stage i's input.
  void stage_input(int64_t i, const T* y0, const T* k, double dt, T* z) const {
    std::copy(y0, y0 + n_, z);
    acc_.assign(n_, T(0));
    for (int64_t j = 0; j < i; ++j) {
      const T c = T(tab_.beta[i - 1][j]) * T(dt);
      for (int64_t e = 0; e < n_; ++e) acc_[e] += k[j * n_ + e] * c;
    }
    for (int64_t e = 0; e < n_; ++e) z[e] += acc_[e];
  }

  double norm(const std::vector<double>& v) const {
    double best = 0;
    for (const auto& [off, len] : opt_.norm) {
      if (len == 0) continue;
      double s = 0;
      for (int64_t e = off; e < off + len; ++e) s += v[e] * v[e];
      best = std::max(best, std::sqrt(s / double(len)));
    }
    return best;
  }

  // Fills k_1..k_S (k_0 given) and y1; for adaptive methods also the error estimate.
  void rk_step(const T* y0, double t0, double dt, double t1, T* k, T* y1, T* err) {
    std::vector<T>& z = z_;
    z.resize(n_);
    for (int64_t i = 1; i <= S_; ++i) {
      stage_input(i, y0, k, dt, z.data());
      const auto [ti, p] = stage_time(i, t0, dt, t1);
      call(ti, p, z.data(), k + i * n_);
    }
    if (fsal_) {  // y1 is the last stage's input (torchdiffeq's check of c_sol against the last beta row)
      std::copy(z.begin(), z.end(), y1);
    } else {
      std::fill(y1, y1 + n_, T(0));
      for (int64_t j = 0; j <= S_; ++j) {
        const T c = T(dt) * T(tab_.c_sol[j]);
        for (int64_t e = 0; e < n_; ++e) y1[e] += k[j * n_ + e] * c;
      }
      for (int64_t e = 0; e < n_; ++e) y1[e] += y0[e];
    }
    if (!err) return;
    std::fill(err, err + n_, T(0));
    for (int64_t j = 0; j <= S_; ++j) {
      const T c = T(dt) * T(tab_.c_error[j]);
      for (int64_t e = 0; e < n_; ++e) err[e] += k[j * n_ + e] * c;
    }
  }

  // torchdiffeq's _interp_fit of a step: the coefficients [e, d, c, b, a] of e + d x + c x^2 + b x^3 + a x^4.
  void interp_fit(const T* y0, const T* y1, const T* k, double dt, std::vector<T>& coeff) const {
    coeff.resize(5 * n_);
    const T h = T(dt);
    std::vector<T> ymid(n_, T(0));
    for (int64_t j = 0; j <= S_; ++j) {
      const T c = h * T(tab_.c_mid[j]);
      for (int64_t e = 0; e < n_; ++e) ymid[e] += k[j * n_ + e] * c;
    }
    const T* f0 = k;
    const T* f1 = k + S_ * n_;
    for (int64_t e = 0; e < n_; ++e) {
      const T ym = y0[e] + ymid[e];
      coeff[4 * n_ + e] = T(2) * h * (f1[e] - f0[e]) - T(8) * (y1[e] + y0[e]) + T(16) * ym;
      coeff[3 * n_ + e] = h * (T(5) * f0[e] - T(3) * f1[e]) + T(18) * y0[e] + T(14) * y1[e] - T(32) * ym;
      coeff[2 * n_ + e] = h * (f1[e] - T(4) * f0[e]) - T(11) * y0[e] - T(5) * y1[e] + T(16) * ym;
      coeff[1 * n_ + e] = h * f0[e];
      coeff[e] = y0[e];
    }
  }

 private:
  void adaptive(const double* tau, int64_t m, const T* y0_in, T* out, Record<T>* rec);
  void fixed(const double* tau, int64_t m, const T* y0_in, T* out, Record<T>* rec);
  double initial_step(double t0, const T* y0, const T* f0);

  System<T>& sys_;
  const Tableau& tab_;
  const Options& opt_;
  const int sign_;
  const int64_t n_, S_;
  const bool fsal_;
  mutable std::vector<T> acc_, z_;
  std::vector<T> neg_;
};

template <typename T>
double Solver<T>::initial_step(double t0, const T* y0, const T* f0) {
  std::vector<double> r(n_), s(n_);
  for (int64_t e = 0; e < n_; ++e) s[e] = opt_.atol + std::abs(double(y0[e])) * opt_.rtol;
  for (int64_t e = 0; e < n_; ++e) r[e] = double(y0[e]) / s[e];
  const double d0 = norm(r);
  for (int64_t e = 0; e < n_; ++e) r[e] = double(f0[e]) / s[e];
  const double d1 = norm(r);
  const double h0 = (d0 < 1e-5 || d1 < 1e-5) ? double(T(1e-6)) : 0.01 * d0 / d1;
  std::vector<T> y1(n_), f1(n_);
  for (int64_t e = 0; e < n_; ++e) y1[e] = y0[e] + T(h0) * f0[e];
  call(T(t0 + h0), Perturb::None, y1.data(), f1.data());
  for (int64_t e = 0; e < n_; ++e) r[e] = double(f1[e] - f0[e]) / s[e];
  const double d2 = std::abs(norm(r) / h0);
  const int order = tab_.order - 1;
  const double h1 = (d1 <= 1e-15 && d2 <= 1e-15) ? std::max(double(T(1e-6)), h0 * 1e-3)
                                                   : std::pow(0.01 / std::max(d1, d2), 1.0 / double(order + 1));
  return std::min(100 * h0, std::abs(h1));
}

template <typename T>
void Solver<T>::adaptive(const double* tau, int64_t m, const T* y0_in, T* out, Record<T>* rec) {
  const int64_t K = S_ + 1;
  std::vector<T> y(y0_in, y0_in + n_), f(n_), k(K * n_), y1(n_), err(n_), coeff(5 * n_);
  std::vector<double> ratio(n_);
  call(T(tau[0]), Perturb::None, y.data(), f.data());
  double dt = opt_.first_step ? *opt_.first_step : initial_step(tau[0], y.data(), f.data());
  double t0 = tau[0], t1 = tau[0];  // the last accepted step, [t0, t1]
  double shift = 0, live = opt_.first_step ? 0 : 1;  // d t1 / d h and d dt / d h (Step's sigma and delta)
  for (int64_t e = 0; e < n_; ++e) coeff[e] = y[e];
  auto first_after = [&](const std::vector<double>& v) {
    const auto it = std::upper_bound(v.begin(), v.end(), tau[0]);
    return std::min<int64_t>(it - v.begin(), int64_t(v.size()) - 1);
  };
  int64_t next_step = first_after(opt_.step_t), next_jump = first_after(opt_.jump_t);
  for (int64_t j = 1; j < m; ++j) {
    int64_t n_steps = 0;
    while (tau[j] > t1) {
      TORCH_CHECK(n_steps < opt_.max_num_steps, "odeint(): max_num_steps exceeded (", n_steps,
                  ">=", opt_.max_num_steps, ")");
      // one adaptive step from (t1, y, f) (torchdiffeq's _adaptive_step)
      const double s0 = t1;
      // torch.clamp's gradient with tensor bounds: 0 beyond them, half at one
      if (!std::isfinite(dt) || dt < opt_.min_step || dt > opt_.max_step) live = 0;
      else if (dt == opt_.min_step || dt == opt_.max_step) live *= 0.5;
      if (!std::isfinite(dt)) dt = opt_.min_step;
      dt = std::clamp(dt, opt_.min_step, opt_.max_step);
      double s1 = s0 + dt;
      TORCH_CHECK(s0 + dt > s0, "odeint(): underflow in dt ", dt);
      for (int64_t e = 0; e < n_; ++e)
        TORCH_CHECK(std::isfinite(double(y[e])), "odeint(): non-finite values in state `y` at t = ", sign_ * s0);
      bool on_step = false, on_jump = false;
      if (!opt_.step_t.empty()) {
        const double ts = opt_.step_t[next_step];
        on_step = s0 < ts && ts < s0 + dt;
        if (on_step) s1 = ts, dt = s1 - s0;
      }
      if (!opt_.jump_t.empty()) {
        const double tj = opt_.jump_t[next_jump];
        on_jump = s0 < tj && tj < s0 + dt;
        if (on_jump) on_step = false, s1 = tj, dt = s1 - s0;
      }
      std::copy(f.begin(), f.end(), k.begin());
      rk_step(y.data(), s0, dt, s1, k.data(), y1.data(), err.data());
      for (int64_t e = 0; e < n_; ++e)
        ratio[e] = double(err[e]) /
                   (opt_.atol + opt_.rtol * std::max(std::abs(double(y[e])), std::abs(double(y1[e]))));
      const double error_ratio = norm(ratio);
      bool accept = error_ratio <= 1;
      if (dt > opt_.max_step) accept = false;
      if (dt <= opt_.min_step) accept = true;
      if (on_step || on_jump) live = -shift;  // dt = s1 - s0 with s1 fixed
      if (accept) {
        interp_fit(y.data(), y1.data(), k.data(), dt, coeff);
        if (rec) rec->steps.push_back({s0, dt, s1, y, k, on_jump, shift, live});
        shift += live;
        if (on_step && next_step != int64_t(opt_.step_t.size()) - 1) ++next_step;
        y = y1;
        t0 = s0, t1 = s1;
        if (on_jump) {
          if (next_jump != int64_t(opt_.jump_t.size()) - 1) ++next_jump;
          call(T(t1), Perturb::Next, y.data(), f.data());
        } else {
          std::copy(k.end() - n_, k.end(), f.begin());
        }
      } else {
        t0 = t1 = s0;
      }
      // torchdiffeq's _optimal_step_size
      double factor;
      if (error_ratio == 0) {
        factor = opt_.ifactor;
      } else {
        const double dfactor = error_ratio < 1 ? 1.0 : opt_.dfactor;
        factor = std::min(opt_.ifactor, std::max(opt_.safety / std::pow(error_ratio, 1.0 / tab_.order), dfactor));
      }
      dt = std::clamp(dt * factor, opt_.min_step, opt_.max_step);
      live = 0;
      ++n_steps;
    }
    const T x = T((tau[j] - t0) / (t1 - t0));
    T* o = out + j * n_;
    T xp = x;
    for (int64_t e = 0; e < n_; ++e) o[e] = coeff[e] + x * coeff[n_ + e];
    for (int64_t c = 2; c < 5; ++c) {
      xp = xp * x;
      for (int64_t e = 0; e < n_; ++e) o[e] += xp * coeff[c * n_ + e];
    }
    if (rec) rec->out_step.push_back(int64_t(rec->steps.size()) - 1), rec->out_x.push_back(x), rec->out_end.push_back(-1);
  }
}

// The fixed-grid methods (torchdiffeq's FixedGridODESolver with linear interpolation): tau's own points, or with
// step_size the grid tau[0] + i * step_size, its last point moved onto tau[m-1].
template <typename T>
void Solver<T>::fixed(const double* tau, int64_t m, const T* y0_in, T* out, Record<T>* rec) {
  std::vector<double> grid;
  if (opt_.step_size) {
    const double h = *opt_.step_size;
    const int64_t count = int64_t(std::ceil((tau[m - 1] - tau[0]) / h + 1));
    for (int64_t i = 0; i < count; ++i) grid.push_back(double(i) * h + tau[0]);
    grid.back() = tau[m - 1];
  } else {
    grid.assign(tau, tau + m);
  }
  const int64_t K = S_ + 1;
  std::vector<T> y(y0_in, y0_in + n_), k(K * n_), y1(n_);
  int64_t j = 1;
  for (size_t g = 0; g + 1 < grid.size() && j < m; ++g) {
    const double s0 = grid[g], s1 = grid[g + 1], dt = s1 - s0;
    call(T(s0), first_perturb(), y.data(), k.data());
    rk_step(y.data(), s0, dt, s1, k.data(), y1.data(), nullptr);
    if (rec) rec->steps.push_back({s0, dt, s1, y, k, false});
    for (; j < m && s1 >= tau[j]; ++j) {
      T* o = out + j * n_;
      int8_t end = -1;
      T slope = T(0);
      if (tau[j] == s0) {
        end = 0, std::copy(y.begin(), y.end(), o);
      } else if (tau[j] == s1) {
        end = 1, std::copy(y1.begin(), y1.end(), o);
      } else {
        slope = T((tau[j] - s0) / (s1 - s0));
        for (int64_t e = 0; e < n_; ++e) o[e] = y[e] + slope * (y1[e] - y[e]);
      }
      if (rec) rec->out_step.push_back(int64_t(rec->steps.size()) - 1), rec->out_x.push_back(slope), rec->out_end.push_back(end);
    }
    y = y1;
  }
}

}  // namespace fusedlayers::cpu::ode
