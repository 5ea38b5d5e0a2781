// Per-element math of the cGMM op, shared by the C++ CPU kernels and (later) the CUDA kernels.
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

#if defined(__CUDACC__)
#define DCGMM_HD __host__ __device__ __forceinline__
#else
#define DCGMM_HD inline
#endif

namespace dcgmm {

// Lanes of the quadratic-form accumulators. Patch vectors are zero-padded to a multiple of LANES (padded
// sigma = 0 adds exact zeros), so every row's sum has the same fixed association on every ISA and thread count.
constexpr int LANES = 8;

DCGMM_HD int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Fixed-order tree sum of LANES partial sums.
template <typename T>
DCGMM_HD T lane_sum(const T* acc) {
  T s4[4];
  for (int l = 0; l < 4; ++l) s4[l] = acc[l] + acc[l + 4];
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// sum_d (s[d] (x[d] - m[d]))^2 for RB rows of x (row stride ld) at once, D_pad a multiple of LANES.
// The parameters are loaded once per RB rows; each row keeps LANES independent accumulators.
template <typename T, int RB>
DCGMM_HD void quad_rows(const T* __restrict__ x, int64_t ld, const T* __restrict__ m, const T* __restrict__ s,
                        int64_t D_pad, T* __restrict__ out) {
  T acc[RB][LANES];
  for (int r = 0; r < RB; ++r)
    for (int l = 0; l < LANES; ++l) acc[r][l] = T(0);
  for (int64_t d = 0; d < D_pad; d += LANES) {
    T mv[LANES], sv[LANES];
    for (int l = 0; l < LANES; ++l) {
      mv[l] = m[d + l];
      sv[l] = s[d + l];
    }
    for (int r = 0; r < RB; ++r) {
      const T* xr = x + r * ld + d;
      for (int l = 0; l < LANES; ++l) {
        T t = sv[l] * (xr[l] - mv[l]);
        acc[r][l] += t * t;
      }
    }
  }
  for (int r = 0; r < RB; ++r) out[r] = lane_sum(acc[r]);
}

// Index of the largest entry, ties to the lowest index (NaN never wins).
template <typename T>
DCGMM_HD int64_t argmax_first(const T* v, int64_t K) {
  int64_t best = 0;
  T bv = v[0];
  for (int64_t k = 1; k < K; ++k)
    if (v[k] > bv) {
      bv = v[k];
      best = k;
    }
  return best;
}

// lse = logsumexp(ls), resp = exp(ls - lse) (the softmax, max-subtracted).
template <typename T>
DCGMM_HD T softmax_lse(const T* ls, int64_t K, T* resp) {
  T mx = ls[0];
  for (int64_t k = 1; k < K; ++k) mx = ls[k] > mx ? ls[k] : mx;
  if (!(mx > -INFINITY)) {  // every component has weight 0: uniform responsibilities, lse = -inf
    for (int64_t k = 0; k < K; ++k) resp[k] = T(1) / T(K);
    return mx;
  }
  T sum = T(0);
  for (int64_t k = 0; k < K; ++k) {
    resp[k] = std::exp(ls[k] - mx);
    sum += resp[k];
  }
  const T inv = T(1) / sum;
  for (int64_t k = 0; k < K; ++k) resp[k] *= inv;
  return mx + std::log(sum);
}

// smoothed[k] = sum_j G[k, j] ls[j]
template <typename T>
DCGMM_HD void smooth_row(const T* G, const T* ls, int64_t K, T* smoothed) {
  for (int64_t k = 0; k < K; ++k) {
    const T* g = G + k * K;
    T acc = T(0);
    for (int64_t j = 0; j < K; ++j) acc += g[j] * ls[j];
    smoothed[k] = acc;
  }
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
    W[k] = g_resp != nullptr ? first + resp[k] * (g_resp[k] - dot) : first;
  }
}

}  // namespace dcgmm
