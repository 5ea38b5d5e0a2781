// Per-element math of the cGMM op, shared by the C++ CPU kernels and (later) the CUDA kernels: the lane layout of
// the quadratic-form sums and the backward weight of a row.
//
// Row r = (n, p) of patch entries x[r, d], d in (ky, kx, c) order; component k of a diagonal GMM with mean mu[k, :],
// inverse standard deviation sigma[k, :] and log weight log_pi[k]:
//   log_score[r, k] = c[k] - 1/2 sum_d (sigma[k, d] (x[r, d] - mu[k, d]))^2,   c[k] = log_pi[k] + sum_d log sigma[k, d]
// Backward weight per row (design.md):
//   W[r, k] = g_score[r] * (G[kstar[r], k] if mc else resp[r, k]) + resp[r, k] (g_resp[r, k] - sum_j g_resp[r, j] resp[r, j])
// Everything here is a pure function of pointers and sizes: no ATen, no allocation.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define DCGMM_HD __host__ __device__ __forceinline__
#else
#define DCGMM_HD inline
#endif

namespace dcgmm {

// Lanes of the quadratic-form accumulators: 64 bytes (one AVX-512 register) of T. Patch vectors are zero-padded
// to a multiple of PAD_LANES (padded sigma = 0 adds exact zeros), so every row's sum has the same fixed association
// on every ISA and thread count.
template <typename T>
struct Lanes {
  static constexpr int value = int(64 / sizeof(T));
};
constexpr int PAD_LANES = 16;  // a multiple of every Lanes<T>::value

DCGMM_HD int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Fixed-order tree sum of L partial sums (L a power of two).
template <typename T, int L>
DCGMM_HD T lane_sum(const T* acc) {
  T buf[L];
  for (int l = 0; l < L; ++l) buf[l] = acc[l];
  for (int width = L / 2; width >= 1; width /= 2)
    for (int l = 0; l < width; ++l) buf[l] = buf[l] + buf[l + width];
  return buf[0];
}

// Index of the largest entry, ties to the lowest index.
template <typename T>
DCGMM_HD int64_t argmax_first(const T* v, int64_t K) {
  int64_t best = 0;
  for (int64_t k = 1; k < K; ++k)
    if (v[k] > v[best]) best = k;
  return best;
}

// resp = softmax(ls) (max-subtracted); returns lse = logsumexp(ls).
template <typename T>
DCGMM_HD T softmax_lse(const T* ls, int64_t K, T* resp) {
  T mx = ls[0];
  for (int64_t k = 1; k < K; ++k) mx = ls[k] > mx ? ls[k] : mx;
  T sum = T(0);
  for (int64_t k = 0; k < K; ++k) {
    resp[k] = std::exp(ls[k] - mx);
    sum += resp[k];
  }
  const T inv = T(1) / sum;
  for (int64_t k = 0; k < K; ++k) resp[k] *= inv;
  return mx + std::log(sum);
}

// W[k] for one row (see file header). g_resp / G may be null (absent / identity); g_score is a scalar (0 if absent).
template <typename T>
DCGMM_HD void backward_weights_row(const T* resp, const T* g_resp, T g_score, bool is_mc, const T* G, int64_t kstar,
                                   int64_t K, T* W) {
  T dot = T(0);
  if (g_resp != nullptr)
    for (int64_t k = 0; k < K; ++k) dot += g_resp[k] * resp[k];
  for (int64_t k = 0; k < K; ++k) {
    T first;
    if (is_mc)
      first = G != nullptr ? g_score * G[kstar * K + k] : (k == kstar ? g_score : T(0));
    else
      first = g_score * resp[k];
    T v = g_resp != nullptr ? first + resp[k] * (g_resp[k] - dot) : first;
    // weights below the smallest normal contribute nothing measurable; flushing them keeps the parameter sums off
    // the (100x slower) denormal path and lets the kernels skip zero weights
    W[k] = (v < std::numeric_limits<T>::min() && v > -std::numeric_limits<T>::min()) ? T(0) : v;
  }
}

}  // namespace dcgmm
