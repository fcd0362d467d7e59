// Backpropagation through a solve of csrc/cpu/ode_solver.h: the derivative of the computation torchdiffeq runs
// under autograd, from the accepted steps the solver recorded. Every step size is a constant except the first one
// that initial_step() chose, which torchdiffeq differentiates (its later ones come from _optimal_step_size under
// no_grad): that h moves the stages, the interpolation and the times of the steps after it (Step's sigma, delta).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/ode_solver.h"

namespace fusedlayers::cpu::ode {

// Adds g_norm times the gradient of solver.norm(v) (= value) into gv: the RMS of the segment that is the maximum.
template <typename T>
void norm_vjp(const Solver<T>& solver, const std::vector<double>& v, double value, double g_norm,
              std::vector<double>& gv) {
  if (value == 0 || g_norm == 0) return;
  for (const auto& [off, len] : solver.options().norm) {
    if (len == 0) continue;
    double s = 0;
    for (int64_t e = off; e < off + len; ++e) s += v[e] * v[e];
    if (std::sqrt(s / double(len)) != value) continue;
    for (int64_t e = off; e < off + len; ++e) gv[e] += g_norm * v[e] / (double(len) * value);
    return;
  }
}

// The derivative of Solver::initial_step (torchdiffeq's _select_initial_step) at (t0, y0, f0 = f(t0, y0)): adds
// g_h times dh/dy0 into gy0 and dh/df0 into gf0; its evaluation at t0 + h0 accumulates the system's own gradients.
template <typename T>
void initial_step_vjp(Solver<T>& solver, double t0, const T* y0, const T* f0, double g_h, T* gy0, T* gf0) {
  const Options& o = solver.options();
  const int64_t n = solver.size();
  std::vector<double> s(n), v0(n), v1(n), w(n), gv(n, 0.0);
  for (int64_t e = 0; e < n; ++e) {
    s[e] = o.atol + std::abs(double(y0[e])) * o.rtol;
    v0[e] = double(y0[e]) / s[e], v1[e] = double(f0[e]) / s[e];
  }
  const double d0 = solver.norm(v0), d1 = solver.norm(v1);
  const bool h0_fixed = d0 < 1e-5 || d1 < 1e-5;
  const double h0 = h0_fixed ? double(T(1e-6)) : 0.01 * d0 / d1;
  std::vector<T> y1(n), f1(n), gy1(n, T(0)), gf1(n);
  for (int64_t e = 0; e < n; ++e) y1[e] = y0[e] + T(h0) * f0[e];
  solver.call(T(t0 + h0), Perturb::None, y1.data(), f1.data());
  for (int64_t e = 0; e < n; ++e) w[e] = double(f1[e] - f0[e]) / s[e];
  const double n2 = solver.norm(w), d2 = std::abs(n2 / h0), p = solver.tab().order;
  const bool h1_fixed = d1 <= 1e-15 && d2 <= 1e-15;
  const double h1 = h1_fixed ? std::max(double(T(1e-6)), h0 * 1e-3) : std::pow(0.01 / std::max(d1, d2), 1.0 / p);
  // h = min(100 h0, h1), torch.minimum's gradient (halved at a tie)
  const double a = 100 * h0, share = a < h1 ? 1.0 : a > h1 ? 0.0 : 0.5;
  double gh0 = 100 * g_h * share, gh1 = g_h * (1 - share), gd0 = 0, gd1 = 0, gd2 = 0;
  if (h1_fixed) {
    const double b = h0 * 1e-3, lo = double(T(1e-6));
    gh0 += 1e-3 * gh1 * (b > lo ? 1.0 : b < lo ? 0.0 : 0.5);
  } else {
    (d2 > d1 ? gd2 : gd1) += -gh1 * h1 / (p * std::max(d1, d2));  // Python's max(d1, d2) takes d1 at a tie
  }
  // d2 = n2 / h0, n2 = norm((f1 - f0) / s), f1 = f(t0 + h0, y0 + h0 f0)
  gh0 -= gd2 * n2 / (h0 * h0);
  norm_vjp(solver, w, n2, gd2 / h0, gv);
  std::vector<double> gs(n, 0.0);
  for (int64_t e = 0; e < n; ++e) {
    gf1[e] = T(gv[e] / s[e]);
    gf0[e] -= T(gv[e] / s[e]);
    gs[e] -= gv[e] * w[e] / s[e];
  }
  T gt = T(0);
  solver.vjp_call(T(t0 + h0), Perturb::None, y1.data(), gf1.data(), gy1.data(), &gt);
  gh0 += double(gt);
  for (int64_t e = 0; e < n; ++e) {
    gy0[e] += gy1[e];
    gh0 += double(gy1[e]) * double(f0[e]);
    gf0[e] += T(h0) * gy1[e];
  }
  if (!h0_fixed) gd0 += gh0 * 0.01 / d1, gd1 -= gh0 * h0 / d1;  // h0 = 0.01 d0 / d1
  std::fill(gv.begin(), gv.end(), 0.0);
  norm_vjp(solver, v1, d1, gd1, gv);
  for (int64_t e = 0; e < n; ++e) gf0[e] += T(gv[e] / s[e]), gs[e] -= gv[e] * v1[e] / s[e];
  std::fill(gv.begin(), gv.end(), 0.0);
  norm_vjp(solver, v0, d0, gd0, gv);
  for (int64_t e = 0; e < n; ++e) {
    gs[e] -= gv[e] * v0[e] / s[e];  // s = atol + |y0| rtol
    const double sgn = y0[e] > T(0) ? 1.0 : y0[e] < T(0) ? -1.0 : 0.0;
    gy0[e] += T(gv[e] / s[e] + gs[e] * o.rtol * sgn);
  }
}

// The reverse pass over rec's steps for the upstream gradient G (m x n, one row per output time): writes the
// gradient w.r.t. y0 into a_y_out; the system accumulates its own parameter gradients through vjp_call.
template <typename T>
void backprop_steps(Solver<T>& solver, const Record<T>& rec, const T* G, int64_t m, T* a_y_out) {
  const Tableau& tab = solver.tab();
  const int64_t n = solver.size();
  const int64_t S = int64_t(tab.alpha.size()), N = int64_t(rec.steps.size());
  std::vector<T> a_y(n, T(0)), a_kS(n, T(0)), gk((S + 1) * n), gy0(n), a_y1(n), z(n), gz(n), y1(n), coeff,
      gx(5 * n);
  double g_h = 0;  // d loss / d h, gathered from the steps whose times or size move with h
  int64_t j = m - 1;  // outputs are read in order, so their steps are nondecreasing
  for (int64_t si = N - 1; si >= 0; --si) {
    const auto& st = rec.steps[si];
    const bool moves = st.sigma != 0 || st.delta != 0;
    const T* k = st.k.data();
    std::fill(gk.begin(), gk.end(), T(0));
    std::fill(gy0.begin(), gy0.end(), T(0));
    a_y1 = a_y;
    for (int64_t e = 0; e < n; ++e) gk[S * n + e] += a_kS[e];
    const T h = T(st.dt);
    if (moves && tab.adaptive && j >= 1 && rec.out_step[j - 1] == si) {  // the coefficients, for dx/dt0
      std::fill(y1.begin(), y1.end(), T(0));
      for (int64_t q = 0; q <= S; ++q)
        for (int64_t e = 0; e < n; ++e) y1[e] += k[q * n + e] * (h * T(tab.c_sol[q]));
      for (int64_t e = 0; e < n; ++e) y1[e] += st.y0[e];
      solver.interp_fit(st.y0.data(), y1.data(), k, st.dt, coeff);
    }
    // the outputs read from this step: torchdiffeq's interpolation e + d x + c x^2 + b x^3 + a x^4 of (y0, y1,
    // ymid, f0, f1) (its _interp_fit), or the fixed grid's linear one; gx[p] gathers x^p g over the outputs
    bool read = false;
    std::fill(gx.begin(), gx.end(), T(0));
    for (; j >= 1 && rec.out_step[j - 1] == si; --j) {
      const T* g = G + j * n;
      const T x = rec.out_x[j - 1];
      read = true;
      if (tab.adaptive) {
        T xp = T(1);
        for (int p = 0; p < 5; ++p, xp *= x)
          for (int64_t e = 0; e < n; ++e) gx[p * n + e] += xp * g[e];
        if (!moves) continue;
        // x = (t - t0) / (t1 - t0) moves with the step's times
        const T* c = coeff.data();
        double g_x = 0;
        for (int64_t e = 0; e < n; ++e)
          g_x += double(g[e] * (c[n + e] + x * (T(2) * c[2 * n + e] + x * (T(3) * c[3 * n + e] + x * T(4) * c[4 * n + e]))));
        g_h += g_x * (-st.sigma - double(x) * st.delta) / st.dt;
      } else {
        const int8_t end = rec.out_end[j - 1];
        for (int64_t e = 0; e < n; ++e) {
          if (end == 0) gy0[e] += g[e];
          else if (end == 1) a_y1[e] += g[e];
          else gy0[e] += g[e] - x * g[e], a_y1[e] += x * g[e];
        }
      }
    }
    if (read && tab.adaptive) {
      double g_dt = 0;  // the coefficients' own dependence on dt
      for (int64_t e = 0; e < n; ++e) {
        const T ga = gx[4 * n + e], gb = gx[3 * n + e], gcc = gx[2 * n + e], gd = gx[n + e];
        const T gym = T(16) * ga - T(32) * gb + T(16) * gcc, f0 = k[e], f1 = k[S * n + e];
        gy0[e] += gx[e] - T(8) * ga + T(18) * gb - T(11) * gcc + gym;
        a_y1[e] += -T(8) * ga + T(14) * gb - T(5) * gcc;
        gk[e] += h * (-T(2) * ga + T(5) * gb - T(4) * gcc + gd);
        gk[S * n + e] += h * (T(2) * ga - T(3) * gb + gcc);
        T mid = T(0);
        for (int64_t q = 0; q <= S; ++q) gk[q * n + e] += h * T(tab.c_mid[q]) * gym, mid += T(tab.c_mid[q]) * k[q * n + e];
        if (st.delta != 0)
          g_dt += double(ga * (T(2) * (f1 - f0)) + gb * (T(5) * f0 - T(3) * f1) + gcc * (f1 - T(4) * f0) + gd * f0 +
                         gym * mid);
      }
      g_h += g_dt * st.delta;
    }
    // y1 = y0 + sum_q k_q * (dt * c_sol[q])
    for (int64_t e = 0; e < n; ++e) gy0[e] += a_y1[e];
    for (int64_t q = 0; q <= S; ++q)
      for (int64_t e = 0; e < n; ++e) {
        gk[q * n + e] += h * T(tab.c_sol[q]) * a_y1[e];
        if (st.delta != 0) g_h += st.delta * double(a_y1[e] * k[q * n + e] * T(tab.c_sol[q]));
      }
    for (int64_t i = S; i >= 1; --i) {
      solver.stage_input(i, st.y0.data(), k, st.dt, z.data());
      const auto [ti, pert] = solver.stage_time(i, st.t0, st.dt, st.t1);
      std::fill(gz.begin(), gz.end(), T(0));
      T gt = T(0);
      solver.vjp_call(ti, pert, z.data(), gk.data() + i * n, gz.data(), moves ? &gt : nullptr);
      g_h += (st.sigma + tab.alpha[i - 1] * st.delta) * double(gt);  // stage time t0 + alpha dt
      for (int64_t e = 0; e < n; ++e) gy0[e] += gz[e];
      for (int64_t q = 0; q < i; ++q) {
        const T c = T(tab.beta[i - 1][q]) * h;
        for (int64_t e = 0; e < n; ++e) gk[q * n + e] += c * gz[e];
        if (st.delta != 0)
          for (int64_t e = 0; e < n; ++e) g_h += st.delta * double(gz[e] * k[q * n + e] * T(tab.beta[i - 1][q]));
      }
    }
    // the first step's size h = initial_step(t0, y0, k_0)
    if (si == 0 && st.delta != 0) initial_step_vjp(solver, st.t0, st.y0.data(), k, g_h, gy0.data(), gk.data());
    // k_0: a fresh evaluation at the step's start, or (adaptive) the previous step's last stage
    const bool fresh = !tab.adaptive || si == 0 || rec.steps[si - 1].jump;
    if (fresh) {
      const Perturb pert = !tab.adaptive ? solver.first_perturb() : si == 0 ? Perturb::None : Perturb::Next;
      solver.vjp_call(T(st.t0), pert, st.y0.data(), gk.data(), gy0.data());
      std::fill(a_kS.begin(), a_kS.end(), T(0));
    } else {
      std::copy(gk.begin(), gk.begin() + n, a_kS.begin());
    }
    a_y = gy0;
  }
  for (int64_t e = 0; e < n; ++e) a_y_out[e] = a_y[e] + G[e];
}

}  // namespace fusedlayers::cpu::ode
