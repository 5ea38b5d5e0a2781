// Per-element math of the cGMM op, shared by the C++ CPU kernels and (later) the CUDA kernels: the vector width
// and padding of the CPU kernels, their multi-versioning, and the backward weight of a row.
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

// The CPU kernels' hot functions are compiled for AVX-512, AVX2+FMA and baseline x86-64; GCC's function
// multi-versioning picks one when the library loads.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define DCGMM_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DCGMM_MULTIVERSION
#endif

namespace dcgmm {

// One 64-byte vector (one AVX-512 register) of T: the lanes of the CPU backward's tiles of patch entries, which
// are zero-padded to a multiple of PAD_LANES.
template <typename T>
struct Lanes {
  static constexpr int value = int(64 / sizeof(T));
};
constexpr int PAD_LANES = 16;  // a multiple of every Lanes<T>::value

DCGMM_HD int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

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
