// What the CUDA row kernels (one block per row: cross_entropy.cu) share: reading a row as 16-byte vectors, and
// the online logsumexp of its elements merged across the block.
#pragma once

#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace fusedlayers::cuda {

constexpr int kMaxThreads = 512;
constexpr int kWarp = 32;

// ---- row traversal ----------------------------------------------------------------------------------------

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// 16-byte vectors; the leading elements of a row before its first 16-byte boundary go one by one.
template <typename scalar_t>
struct RowSplit {
  static constexpr int kVec = 16 / sizeof(scalar_t);
  int64_t head, vectors, tail_begin;
  __device__ RowSplit(const scalar_t* row, int64_t C) {
    const int64_t misaligned = (reinterpret_cast<uintptr_t>(row) / sizeof(scalar_t)) % kVec;
    head = misaligned == 0 ? 0 : std::min<int64_t>(C, kVec - misaligned);
    vectors = (C - head) / kVec;
    tail_begin = head + vectors * kVec;
  }
};

// f(c, x[c] in acc_t) for this thread's share of the row x[0, C).
template <typename scalar_t, typename acc_t, typename F>
__device__ __forceinline__ void for_each_logit(const scalar_t* x, int64_t C, F&& f) {
  const RowSplit<scalar_t> split(x, C);
  constexpr int kVec = RowSplit<scalar_t>::kVec;
  for (int64_t c = threadIdx.x; c < split.head; c += blockDim.x) f(c, acc_t(x[c]));
  const auto* xv = reinterpret_cast<const Pack<scalar_t, kVec>*>(x + split.head);
  for (int64_t i = threadIdx.x; i < split.vectors; i += blockDim.x) {
    const Pack<scalar_t, kVec> pack = xv[i];
#pragma unroll
    for (int k = 0; k < kVec; ++k) f(split.head + i * kVec + k, acc_t(pack.v[k]));
  }
  for (int64_t c = split.tail_begin + threadIdx.x; c < C; c += blockDim.x) f(c, acc_t(x[c]));
}

// out[c] = f(c, x[c] in acc_t) over the row; vectors only when out has x's alignment (`vectorize`).
template <typename scalar_t, typename acc_t, typename F>
__device__ __forceinline__ void map_logits(const scalar_t* x, scalar_t* out, int64_t C, bool vectorize, F&& f) {
  if (!vectorize) {
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) out[c] = scalar_t(f(c, acc_t(x[c])));
    return;
  }
  const RowSplit<scalar_t> split(x, C);
  constexpr int kVec = RowSplit<scalar_t>::kVec;
  for (int64_t c = threadIdx.x; c < split.head; c += blockDim.x) out[c] = scalar_t(f(c, acc_t(x[c])));
  const auto* xv = reinterpret_cast<const Pack<scalar_t, kVec>*>(x + split.head);
  auto* ov = reinterpret_cast<Pack<scalar_t, kVec>*>(out + split.head);
  for (int64_t i = threadIdx.x; i < split.vectors; i += blockDim.x) {
    const Pack<scalar_t, kVec> in = xv[i];
    Pack<scalar_t, kVec> res;
#pragma unroll
    for (int k = 0; k < kVec; ++k) res.v[k] = scalar_t(f(split.head + i * kVec + k, acc_t(in.v[k])));
    ov[i] = res;
  }
  for (int64_t c = split.tail_begin + threadIdx.x; c < C; c += blockDim.x) out[c] = scalar_t(f(c, acc_t(x[c])));
}

// ---- online logsumexp ---------------------------------------------------------------------------------------

// Over the logits seen so far: m = max z (lowest() before any, so that m - z never is -inf - -inf), s = sum
// exp(z - m), and with label smoothing wz = sum w * (z - m) and ws = sum w.
template <typename acc_t>
struct OnlineState {
  acc_t m, s, wz, ws;

  __device__ static OnlineState empty() { return {std::numeric_limits<acc_t>::lowest(), acc_t(0), acc_t(0), acc_t(0)}; }

  __device__ __forceinline__ void add(acc_t z, acc_t w, bool smoothing) {
    if (z > m) {  // a new max: rebase the sums on it (rare after the first few logits)
      const acc_t d = m - z;
      s = s * ::exp(d) + acc_t(1);
      if (smoothing && ws != acc_t(0)) wz += d * ws;
      m = z;
    } else {  // NaN lands here and propagates through s
      s += ::exp(z - m);
      if (smoothing) wz += w * (z - m);
    }
    if (smoothing) ws += w;
  }

  __device__ __forceinline__ static OnlineState merge(const OnlineState& a, const OnlineState& b) {
    OnlineState r;
    r.m = a.m > b.m ? a.m : b.m;
    const acc_t da = a.m - r.m, db = b.m - r.m;
    r.s = a.s * ::exp(da) + b.s * ::exp(db);
    // ws == 0: nothing to rebase, and no 0 * -inf when a max is lowest()
    r.wz = a.wz + b.wz + (a.ws != acc_t(0) ? da * a.ws : acc_t(0)) + (b.ws != acc_t(0) ? db * b.ws : acc_t(0));
    r.ws = a.ws + b.ws;
    return r;
  }

  __device__ __forceinline__ OnlineState shfl_xor(int lane_mask) const {
    return {__shfl_xor_sync(0xffffffffu, m, lane_mask), __shfl_xor_sync(0xffffffffu, s, lane_mask),
            __shfl_xor_sync(0xffffffffu, wz, lane_mask), __shfl_xor_sync(0xffffffffu, ws, lane_mask)};
  }
};

// The merged state of the whole block, in every thread. blockDim.x is a multiple of 32, at most kMaxThreads.
template <typename acc_t>
__device__ OnlineState<acc_t> block_merge(OnlineState<acc_t> st) {
  __shared__ OnlineState<acc_t> partial[kMaxThreads / kWarp];
  for (int mask = kWarp / 2; mask > 0; mask /= 2) st = OnlineState<acc_t>::merge(st, st.shfl_xor(mask));
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) partial[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < int(blockDim.x / kWarp) ? partial[lane] : OnlineState<acc_t>::empty();
    for (int mask = kWarp / 2; mask > 0; mask /= 2) st = OnlineState<acc_t>::merge(st, st.shfl_xor(mask));
    if (lane == 0) partial[0] = st;
  }
  __syncthreads();
  return partial[0];
}

}  // namespace fusedlayers::cuda
