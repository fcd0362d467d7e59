// The wide path of the CPU mlp kernels (csrc/cpu/mlp.cpp chooses it): row tiles through every layer with
// single-threaded BLAS GEMMs.
//
// Networks whose hidden layers produce many elements for few multiply-adds (seed004's 1-1000-20-1): the chain
// materializes every (rows x width) intermediate, and its cost is then the memory, not the arithmetic (a fresh
// 80 MB tensor costs ~40 ms of page faults here, more than the GEMM that fills it). Here each thread takes whole tiles of rows through every
// layer with its activations in a per-thread workspace sized to stay in L2, and the backward recomputes a
// tile's forward from x (the autograd saves nothing: csrc/cpu/mlp.cpp registers that it recomputes),
// accumulating the weight and bias gradients per thread, reduced at the end. Float and double only (bfloat16
// takes the chain).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <vector>

#include "cpu/mlp.h"

// The Fortran BLAS that ATen links (MKL here), called directly: ATen's own float/double GEMM entry points are
// not exported, and a dispatched at::mm per tile would cost more than a small tile's arithmetic.
extern "C" {
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
}

namespace fusedlayers::cpu {
namespace {

// The rule: the wide path runs networks whose hidden layers cost few multiply-adds per element they produce
// (the chain is then memory-bound, and recomputing the forward in the backward is cheap), the chain the rest.
// Measured here (one thread, thread time, fwd+bwd of the parameter gradients, wide path / chain, each with its
// multiply-adds per hidden element, MACs / sum of hidden widths, per row):
//   [16]*4 tanh (24) float32: 0.79 at 200 rows, 0.93 at 500, 0.85 at 1,000, 0.73 at 10,000, 0.83 at 30,000;
//   [32]*4 tanh (48): 0.87 at 200 rows, 1.01 at 1,000;
//   1-1000-20-1 identity (21) float64: 1.06 at 100 rows, 0.54 at 300, 0.81 at 1,000, 0.32 at 3,000;
//   [128]*4 tanh (192): 1.06-1.10 up to 256 rows, 1.04 at 1,024, 0.96 at 2,048, 0.78 at 8,192;
//   64-512-512-64 gelu (320): 1.25 at 256 rows, 1.19 at 2,048, 1.12 at 4,096;
//   784-300-100-10 relu (665): 1.49 at 256 rows, 1.40 at 1,024, 1.27-1.31 at 4,096-8,192.
// Beyond the threshold the recompute (a quarter to a half more multiply-adds) costs more than the memory it
// saves, except for very large batches of moderately wide nets ([128]*4 from ~2,000 rows), left to the chain.
constexpr int64_t kWideMaxMacsPerElement = 64;
// Bytes of a tile's activations and gradients: half of this machine's 2 MB per-core L2, leaving room for the
// weights the tile's GEMMs stream. Measured on seed004 (1-1000-20-1, float64, 10,000 rows, one thread,
// fwd+bwd): 256 KB (8-row tiles) 50 ms, 512 KB 43 ms, 1 MB (40 rows) 37 ms, 2 MB 39 ms, 4 MB 43 ms, 16 MB 44 ms.
constexpr int64_t kWideTileBytes = 1024 * 1024;

// FUSEDLAYERS_MLP_WIDE_MAX_MACS overrides kWideMaxMacsPerElement, so the tests can send any network down
// this path (a huge value) or none (0).
int64_t wide_max_macs_per_element() {
  const char* env = std::getenv("FUSEDLAYERS_MLP_WIDE_MAX_MACS");
  return env ? std::strtoll(env, nullptr, 10) : kWideMaxMacsPerElement;
}

// Where a tile's buffers sit in its thread's workspace, in elements: the inputs h_l of layers 1..L-1, the
// pre-activation z_l of every non-identity layer (identity layers' z is their output), and two gradient
// buffers of the widest layer.
struct WideLayout {
  int64_t R = 0;
  std::vector<int64_t> h, z;  // h[l]: input of layer l (l >= 1); z[l]: -1 for identity layers
  int64_t g0 = 0, g1 = 0, size = 0;
};

WideLayout wide_layout(const Shape& s, const std::vector<Activation>& acts, int64_t elem_bytes) {
  const int64_t L = static_cast<int64_t>(acts.size());
  int64_t per_row = 2 * s.sizes.max_width;
  for (int64_t l = 1; l < L; ++l) per_row += s.widths[l];
  for (int64_t l = 0; l < L; ++l) per_row += acts[l] != Activation::Identity ? s.widths[l + 1] : 0;
  WideLayout w;
  // Rows per tile: what fits the budget, a multiple of 8 between 8 and 256, and no more than a thread's share.
  const int64_t threads = at::get_num_threads();
  const int64_t share = (s.rows + threads - 1) / threads;
  w.R = std::clamp<int64_t>(kWideTileBytes / (per_row * elem_bytes) / 8 * 8, 8, 256);
  w.R = std::max<int64_t>(1, std::min(w.R, share));
  int64_t off = 0;
  w.h.assign(L, -1);
  w.z.assign(L, -1);
  for (int64_t l = 1; l < L; ++l) {
    w.h[l] = off;
    off += s.widths[l] * w.R;
  }
  for (int64_t l = 0; l < L; ++l) {
    if (acts[l] == Activation::Identity) continue;
    w.z[l] = off;
    off += s.widths[l + 1] * w.R;
  }
  w.g0 = off;
  w.g1 = off + s.sizes.max_width * w.R;
  w.size = w.g1 + s.sizes.max_width * w.R;
  return w;
}

// Column-major C (m x n) = alpha op(A) op(B) + beta C, op given by 'N' or 'T'. Inside an OpenMP parallel
// region the BLAS runs single-threaded. Every size is a tile's rows or a layer's width (checked to fit an int).
template <typename T>
void blas_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
               int64_t ldb, T beta, T* c, int64_t ldc) {
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ilda = static_cast<int>(lda), ildb = static_cast<int>(ldb), ildc = static_cast<int>(ldc);
  if constexpr (std::is_same_v<T, double>) {
    dgemm_(&ta, &tb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
  } else {
    sgemm_(&ta, &tb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
  }
}

// z (count x n_out, row-major) = h (count x n_in) @ W^T: in BLAS's column-major terms z^T = W h^T.
template <typename T>
void tile_linear(const T* h, const T* w, T* z, int64_t count, int64_t n_in, int64_t n_out) {
  blas_gemm<T>('T', 'N', n_out, count, n_in, T(1), w, n_in, h, n_in, T(0), z, n_out);
}

// The tile's forward through layers [0, upto): every layer's input h_l and non-identity z_l into the
// workspace; layer upto - 1 writes its output to out when not null (the forward's y).
template <typename T>
void wide_tile_forward(const Shape& s, const LayerPtrs<T>& net, const std::vector<Activation>& acts,
                       const WideLayout& lay, T* ws, const T* x, int64_t count, int64_t upto, T* out) {
  const T* h = x;
  for (int64_t l = 0; l < upto; ++l) {
    const int64_t n_in = s.widths[l], n_out = s.widths[l + 1];
    const bool last = l + 1 == upto;
    T* y = last && out ? out : ws + (l + 1 < static_cast<int64_t>(acts.size()) ? lay.h[l + 1] : lay.g0);
    T* z = lay.z[l] >= 0 && !(last && out) ? ws + lay.z[l] : y;
    const T* bias = net.b.empty() ? nullptr : net.b[l];
    tile_linear(h, net.w[l], z, count, n_in, n_out);
    if (bias || acts[l] != Activation::Identity)
      kernels<T>().dense_forward_rows(acts[l], bias, z, y, 0, count, n_out, z != y);
    h = y;
  }
}

// db[c] += the sum over the rows of g[., c].
template <typename T>
void add_column_sums(const T* g, T* db, int64_t count, int64_t cols) {
  for (int64_t r = 0; r < count; ++r) {
    const T* __restrict__ gr = g + r * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) db[c] += gr[c];
  }
}

// One tile's gradients: dW_l += dz_l^T h_l and db_l += sums of dz_l into the chunk's accumulators; dx rows
// written when dx is not null.
template <typename T>
void wide_tile_backward(const Shape& s, const LayerPtrs<T>& net, const std::vector<Activation>& acts,
                        const WideLayout& lay, T* ws, const T* x, const T* grad_out, T* dx, int64_t count,
                        const std::vector<T*>& dw, const std::vector<T*>& db) {
  const int64_t L = static_cast<int64_t>(acts.size());
  // Recompute the inputs of every layer, and the last layer's z unless it is the identity (then unneeded).
  wide_tile_forward(s, net, acts, lay, ws, x, count, acts.back() == Activation::Identity ? L - 1 : L,
                    static_cast<T*>(nullptr));
  T* buf[2] = {ws + lay.g0, ws + lay.g1};
  const T* g = grad_out;
  for (int64_t l = L - 1; l >= 0; --l) {
    const int64_t n_in = s.widths[l], n_out = s.widths[l + 1];
    const T* h = l == 0 ? x : ws + lay.h[l];
    const T* dz = g;
    if (acts[l] == Activation::Identity) {
      if (!db.empty()) add_column_sums(g, db[l], count, n_out);
    } else {
      T* d = g == buf[0] ? buf[1] : buf[0];
      kernels<T>().dense_backward_rows(acts[l], g, ws + lay.z[l], d, db.empty() ? nullptr : db[l], 0, count, n_out);
      dz = d;
    }
    // dW (n_out x n_in, row-major) += dz^T h: column-major dW^T = h^T dz.
    blas_gemm<T>('N', 'T', n_in, n_out, count, T(1), h, n_in, dz, n_out, T(1), dw[l], n_in);
    if (l == 0 && !dx) break;
    // The gradient of the layer's input: dz @ W, (count x n_in).
    T* gin = l == 0 ? dx : (dz == buf[0] ? buf[1] : buf[0]);
    blas_gemm<T>('N', 'N', n_in, count, n_out, T(1), net.w[l], n_in, dz, n_out, T(0), gin, n_in);
    g = gin;
  }
}

}  // namespace

template <typename T>
void wide_forward(const Shape& s, const LayerPtrs<T>& net, const std::vector<Activation>& acts, const T* x, T* y) {
  const WideLayout lay = wide_layout(s, acts, sizeof(T));
  const int64_t L = static_cast<int64_t>(acts.size()), in = s.widths.front(), out = s.widths.back();
  const int64_t tiles = (s.rows + lay.R - 1) / lay.R;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    T* ws = scratch<T>(lay.size);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r0 = t * lay.R, count = std::min(lay.R, s.rows - r0);
      wide_tile_forward(s, net, acts, lay, ws, x + r0 * in, count, L, y + r0 * out);
    }
  });
}

// The tiles are split into one contiguous chunk per thread, each with its own gradient accumulators (chunk 0
// accumulates into the outputs), summed into the outputs at the end.
template <typename T>
void wide_backward(const Shape& s, const LayerPtrs<T>& net, const std::vector<Activation>& acts, const T* x,
                   const T* grad_out, T* dx, const std::vector<T*>& dw, const std::vector<T*>& db) {
  const WideLayout lay = wide_layout(s, acts, sizeof(T));
  const int64_t L = static_cast<int64_t>(acts.size()), in = s.widths.front(), out = s.widths.back();
  const int64_t tiles = (s.rows + lay.R - 1) / lay.R;
  const int64_t chunks = std::min<int64_t>(at::get_num_threads(), tiles);
  std::vector<int64_t> w_size(L), b_size(db.empty() ? 0 : L);
  int64_t total = 0;
  for (int64_t l = 0; l < L; ++l) {
    w_size[l] = s.widths[l] * s.widths[l + 1];
    total += w_size[l];
    if (!db.empty()) total += b_size[l] = s.widths[l + 1];
  }
  std::vector<T> extra((chunks - 1) * total, T(0));
  std::vector<std::vector<T*>> cdw(chunks, dw), cdb(chunks, db);
  for (int64_t c = 1; c < chunks; ++c) {
    T* p = extra.data() + (c - 1) * total;
    for (int64_t l = 0; l < L; ++l) {
      cdw[c][l] = p;
      p += w_size[l];
      if (!db.empty()) {
        cdb[c][l] = p;
        p += b_size[l];
      }
    }
  }
  int64_t total_b = 0;
  for (int64_t n : b_size) total_b += n;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    T* ws = scratch<T>(lay.size);
    // each tile's db, added to the chunk's with add_compensated
    std::vector<T> tile_db(total_b, T(0)), lost(total_b, T(0));
    std::vector<T*> tdb(b_size.size());
    for (size_t l = 0, off = 0; l < b_size.size(); off += b_size[l++]) tdb[l] = tile_db.data() + off;
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t t = c * tiles / chunks; t < (c + 1) * tiles / chunks; ++t) {
        const int64_t r0 = t * lay.R, count = std::min(lay.R, s.rows - r0);
        wide_tile_backward(s, net, acts, lay, ws, x + r0 * in, grad_out + r0 * out, dx ? dx + r0 * in : nullptr,
                           count, cdw[c], tdb);
        for (size_t l = 0, off = 0; l < b_size.size(); off += b_size[l++]) {
          add_compensated(cdb[c][l], lost.data() + off, tile_db.data() + off, b_size[l]);
        }
      }
    }
  });
  for (int64_t c = 1; c < chunks; ++c) {
    for (int64_t l = 0; l < L; ++l) {
      for (int64_t i = 0; i < w_size[l]; ++i) dw[l][i] += cdw[c][l][i];
      if (!db.empty())
        for (int64_t i = 0; i < b_size[l]; ++i) db[l][i] += cdb[c][l][i];
    }
  }
}

bool takes_wide_path(const Shape& s, at::ScalarType dtype) {
  if (dtype != at::kFloat && dtype != at::kDouble) return false;
  if (s.widths.size() < 3 || s.rows == 0 || takes_fused_path(s)) return false;  // no hidden layer, or small
  if (*std::min_element(s.widths.begin(), s.widths.end()) == 0) return false;
  if (*std::max_element(s.widths.begin(), s.widths.end()) > std::numeric_limits<int>::max() / 256) return false;
  const int64_t hidden = s.sizes.outputs - s.widths.back();  // elements of the hidden layers per row
  return s.macs_per_row <= wide_max_macs_per_element() * hidden;
}

template void wide_forward<float>(const Shape&, const LayerPtrs<float>&, const std::vector<Activation>&,
                                  const float*, float*);
template void wide_forward<double>(const Shape&, const LayerPtrs<double>&, const std::vector<Activation>&,
                                   const double*, double*);
template void wide_backward<float>(const Shape&, const LayerPtrs<float>&, const std::vector<Activation>&,
                                   const float*, const float*, float*, const std::vector<float*>&,
                                   const std::vector<float*>&);
template void wide_backward<double>(const Shape&, const LayerPtrs<double>&, const std::vector<Activation>&,
                                    const double*, const double*, double*, const std::vector<double*>&,
                                    const std::vector<double*>&);

}  // namespace fusedlayers::cpu
