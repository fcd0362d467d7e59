// The kernels of the dense op family (cpu/dense.cpp; the mlp's wide path and tiles reuse them): the bias and
// activation pass, its gradient, and f^(order) elementwise.
//
// Every element goes through Vectorized, the row tails by partial loads: so this file instantiates the
// activation functors only for its own ISA's vector types, never for plain float/double, whose copies
// other files compile for the baseline ISA.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <numeric>

#include "cpu/kernels.h"
#include "cpu/vec_math.h"

namespace fusedlayers::cpu::FL_ISA {
namespace {

// A row of a narrow matrix (cols not a multiple of the vector width) ends in a partial vector, and the
// per-row loop costs more than the arithmetic (12 columns: the bias pass of a 4096-row layer took as long as
// its GEMM). Rows are taken instead k at a time, k * cols = lcm(cols, vector width) elements that are whole
// vectors, against the bias repeated k times. Periods longer than kMaxPeriod elements (cols wide enough that
// the partial vector hardly matters) keep the row loop.
constexpr int64_t kMaxPeriod = 2048;

template <typename T>
int64_t period_rows(int64_t cols) {
  const int64_t lanes = at::vec::Vectorized<T>::size();
  return lanes / std::gcd(cols, lanes);
}

// f over the elements [b, b + n) of a matrix whose bias (null: none) for element i is bias[i % period]
// (period a multiple of the vector width unless n is one row).
template <typename Act, typename T>
void forward_span(const T* bias, T* z, T* y, int64_t n, bool store_z) {
  using V = at::vec::Vectorized<T>;
  for (int64_t c = 0; c < n; c += V::size()) {
    const int cnt = static_cast<int>(std::min<int64_t>(V::size(), n - c));
    V v = V::loadu(z + c, cnt);
    if (bias) v = v + V::loadu(bias + c, cnt);
    if (store_z) v.store(z + c, cnt);
    Act::f(v).store(y + c, cnt);
  }
}

template <typename Act, typename T>
void backward_span(const T* g, const T* z, T* dz, T* db, int64_t n) {
  using V = at::vec::Vectorized<T>;
  for (int64_t c = 0; c < n; c += V::size()) {
    const int cnt = static_cast<int>(std::min<int64_t>(V::size(), n - c));
    // Lanes past cnt hold zeros from the partial loads and are never stored.
    V d = times_df<Act>(V::loadu(g + c, cnt), V::loadu(z + c, cnt));
    d.store(dz + c, cnt);
    if (db) (V::loadu(db + c, cnt) + d).store(db + c, cnt);
  }
}

template <typename Act, int Order, typename T>
void derivative_loop(const T* g, const T* z, T* out, int64_t n) {
  using V = at::vec::Vectorized<T>;
  for (int64_t i = 0; i < n; i += V::size()) {
    const int m = static_cast<int>(std::min<int64_t>(V::size(), n - i));
    const V v = V::loadu(z + i, m);
    V d;
    if constexpr (Order == 0) d = Act::f(v);
    else if constexpr (Order == 1) d = Act::df(v);
    else if constexpr (Order == 2) d = Act::d2f(v);
    else d = Act::d3f(v);
    if (g) d = Order == 1 ? times_df<Act>(V::loadu(g + i, m), v) : d * V::loadu(g + i, m);
    d.store(out + i, m);
  }
}

template <typename Act, typename T>
void forward_rows(const T* bias, T* z, T* y, int64_t begin, int64_t end, int64_t cols, bool store_z) {
  z += begin * cols;
  y += begin * cols;
  int64_t rows = end - begin;
  if (!bias) return forward_span<Act>(bias, z, y, rows * cols, store_z);
  const int64_t k = period_rows<T>(cols);
  if (k > 1 && k * cols <= kMaxPeriod && rows >= k) {
    T rep[kMaxPeriod];
    for (int64_t j = 0; j < k; ++j) std::copy(bias, bias + cols, rep + j * cols);
    const int64_t blocks = rows / k;
    for (int64_t i = 0; i < blocks; ++i) forward_span<Act>(rep, z + i * k * cols, y + i * k * cols, k * cols, store_z);
    z += blocks * k * cols;
    y += blocks * k * cols;
    rows -= blocks * k;
  }
  for (int64_t r = 0; r < rows; ++r) forward_span<Act>(bias, z + r * cols, y + r * cols, cols, store_z);
}

template <typename Act, typename T>
void backward_rows(const T* g, const T* z, T* dz, T* db, int64_t begin, int64_t end, int64_t cols) {
  g += begin * cols;
  z += begin * cols;
  dz += begin * cols;
  int64_t rows = end - begin;
  if (!db) return backward_span<Act>(g, z, dz, db, rows * cols);
  const int64_t k = period_rows<T>(cols);
  if (k > 1 && k * cols <= kMaxPeriod && rows >= k) {
    T rep[kMaxPeriod] = {};  // k rows of partial bias-gradient sums, folded into db at the end
    const int64_t blocks = rows / k, step = k * cols;
    for (int64_t i = 0; i < blocks; ++i) backward_span<Act>(g + i * step, z + i * step, dz + i * step, rep, step);
    for (int64_t j = 0; j < k; ++j)
      for (int64_t c = 0; c < cols; ++c) db[c] += rep[j * cols + c];
    g += blocks * step;
    z += blocks * step;
    dz += blocks * step;
    rows -= blocks * k;
  }
  for (int64_t r = 0; r < rows; ++r) backward_span<Act>(g + r * cols, z + r * cols, dz + r * cols, db, cols);
}

}  // namespace

template <typename T>
void dense_forward_rows(Activation a, const T* bias, T* z, T* y, int64_t begin, int64_t end, int64_t cols,
                        bool store_z) {
  dispatch_activation(a, [&](auto act) {
    forward_rows<decltype(act)>(bias, z, y, begin, end, cols, store_z);
  });
}

template <typename T>
void dense_backward_rows(Activation a, const T* g, const T* z, T* dz, T* db, int64_t begin, int64_t end,
                         int64_t cols) {
  dispatch_activation(a, [&](auto act) { backward_rows<decltype(act)>(g, z, dz, db, begin, end, cols); });
}

template <typename T>
void activation_elements(Activation a, int order, const T* g, const T* z, T* out, int64_t n) {
  dispatch_activation(a, [&](auto act) {
    using Act = decltype(act);
    if (order == 0) derivative_loop<Act, 0>(g, z, out, n);
    else if (order == 1) derivative_loop<Act, 1>(g, z, out, n);
    else if (order == 2) derivative_loop<Act, 2>(g, z, out, n);
    else derivative_loop<Act, 3>(g, z, out, n);
  });
}

}  // namespace fusedlayers::cpu::FL_ISA
