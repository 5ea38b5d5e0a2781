// Per-element math of the cGMM op, shared by the C++ CPU kernels and the CUDA kernels: the padding of the CPU
// kernels' entry tiles and the backward weight of a row (the CPU kernels' instruction sets: cpu/isa.h).
//
// Row r = (n, p) of patch entries x[r, d], d in (ky, kx, c) order; component k of a diagonal GMM with mean mu[k, :],
// inverse standard deviation sigma[k, :] and log weight log_pi[k]:
//   log_score[r, k] = c[k] - 1/2 sum_d (sigma[k, d] (x[r, d] - mu[k, d]))^2,   c[k] = log_pi[k] + sum_d log sigma[k, d]
// Backward weight per row (design.md):
//   W[r, k] = g_score[r] * (G[kstar[r], k] if mc else resp[r, k]) + resp[r, k] (g_resp[r, k] - sum_j g_resp[r, j] resp[r, j])
// The CUDA backend's per-row forward and per-component training update (csrc/cuda/, emulated on CPU by
// csrc/cpu/step.cpp, so the CPU tests exercise this code) are at the end.
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


// ------------------------------------------------------------------------------------------- CUDA backend maths
// Parameters packed per patch entry d for KMAX components (k >= K zero): prm[(d * KMAX + k) * 2 + {0, 1}] =
// (mu[k, d], sigma[k, d]); c[k] = log_pi[k] + sum_d log sigma[k, d] (k < K).
DCGMM_HD float math_exp(float v) { return expf(v); }
DCGMM_HD double math_exp(double v) { return exp(v); }
DCGMM_HD float math_log(float v) { return logf(v); }
DCGMM_HD double math_log(double v) { return log(v); }
DCGMM_HD float math_fma(float a, float b, float c) { return fmaf(a, b, c); }
DCGMM_HD double math_fma(double a, double b, double c) { return fma(a, b, c); }

// Log scores of one row by the direct form, all KMAX accumulators in registers (every index a constant after
// unrolling). xp: the patch's first entry; a patch row ky is kwc = kw * C contiguous entries at xp + ky * row_stride.
template <int KMAX, typename T>
DCGMM_HD void row_log_scores(const T* xp, int64_t row_stride, int64_t kh, int64_t kwc, const T* prm, const T* c,
                             int64_t K, T (&ls)[KMAX]) {
#pragma unroll
  for (int k = 0; k < KMAX; ++k) ls[k] = T(0);
  const T* q = prm;
  for (int64_t ky = 0; ky < kh; ++ky) {
    const T* xr = xp + ky * row_stride;
    for (int64_t e = 0; e < kwc; ++e, q += 2 * KMAX) {
      const T xd = xr[e];
#pragma unroll
      for (int k = 0; k < KMAX; ++k) {
        const T t = (xd - q[2 * k]) * q[2 * k + 1];
        ls[k] = math_fma(t, t, ls[k]);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < KMAX; ++k) ls[k] = k < K ? c[k] - T(0.5) * ls[k] : -T(INFINITY);
}

// The mc loss's smoothed argmax with the separable G = kron(Gy, Gx) (design.md; n x n factors, K = n^2): 2 K n
// multiply-adds instead of K^2. Over v = ls - m: tmp[jy, kx] = sum_jx Gx[kx, jx] v[jy, jx], then smoothed[ky, kx] =
// sum_jy Gy[ky, jy] tmp[jy, kx], each sum in ascending index order. tmp: K scratch values at tmp[k * ts].
template <int KMAX, typename T>
DCGMM_HD void row_smoothed_argmax_separable(const T (&ls)[KMAX], T m, int64_t K, int64_t n, const T* Gy,
                                            const T* Gx, T* tmp, int64_t ts, T& best, int32_t& bk) {
  for (int64_t k = 0; k < K; ++k) tmp[k * ts] = T(0);
#pragma unroll
  for (int j = 0; j < KMAX; ++j) {
    if (j < K) {
      const T v = ls[j] - m;
      const int64_t jy = j / n, jx = j - jy * n;
      T* row = tmp + jy * n * ts;
      for (int64_t kx = 0; kx < n; ++kx) row[kx * ts] = math_fma(Gx[kx * n + jx], v, row[kx * ts]);
    }
  }
  best = -T(INFINITY), bk = 0;
  for (int64_t ky = 0; ky < n; ++ky)
    for (int64_t kx = 0; kx < n; ++kx) {
      T t = T(0);
      for (int64_t jy = 0; jy < n; ++jy) t = math_fma(Gy[ky * n + jy], tmp[(jy * n + kx) * ts], t);
      if (t > best) best = t, bk = int32_t(ky * n + kx);
    }
}

// Everything after the log scores of a row: lse, resp (written to resp[0..K)), score and kstar (ties -> lowest
// index). G (mc only; loglik always null): null (identity), the dense (K, K) matrix (sep_n == 0), or the stacked
// factors (2, n, n) of G = kron(Gy, Gx) (sep_n == n; tmp: K scratch values at stride ts). The smoothed scores are
// m + sum_j G[k, j] (ls[j] - m) (G's rows sum to 1); dense: one row of G at a time.
template <int KMAX, typename T>
DCGMM_HD void row_epilogue(const T (&ls)[KMAX], int64_t K, bool is_mc, const T* G, int64_t sep_n, T* tmp, int64_t ts,
                           T half_d_log_2pi, T* resp, T& score, T& lse, int32_t& kstar) {
  T m = ls[0];
  int32_t am = 0;
#pragma unroll
  for (int k = 1; k < KMAX; ++k)
    if (k < K && ls[k] > m) m = ls[k], am = k;
  T s = T(0);
#pragma unroll
  for (int k = 0; k < KMAX; ++k)
    if (k < K) s += math_exp(ls[k] - m);
  lse = m + math_log(s);
#pragma unroll
  for (int k = 0; k < KMAX; ++k)
    if (k < K) resp[k] = math_exp(ls[k] - lse);
  if (is_mc && G != nullptr && sep_n > 0) {
    T best;
    int32_t bk;
    row_smoothed_argmax_separable<KMAX, T>(ls, m, K, sep_n, G, G + sep_n * sep_n, tmp, ts, best, bk);
    score = m + best - half_d_log_2pi, kstar = bk;
  } else if (is_mc && G != nullptr) {
    T best = -T(INFINITY);
    int32_t bk = 0;
    for (int64_t k = 0; k < K; ++k) {
      const T* g = G + k * K;
      T t = T(0);
#pragma unroll
      for (int j = 0; j < KMAX; ++j)
        if (j < K) t = math_fma(g[j], ls[j] - m, t);
      if (t > best) best = t, bk = int32_t(k);
    }
    score = m + best - half_d_log_2pi, kstar = bk;
  } else {
    score = (is_mc ? m : lse) - half_d_log_2pi, kstar = am;
  }
}

// One component's step of the original update rule from the step statistics of its GMM (design.md "Training",
// issue 23): stats (K, 1 + 2D) float64 hold per component j sum_r W[r, j], sum_r W[r, j] (x_r - mu_j) and
// sum_r W[r, j] (x_r - mu_j)^2 (centred on the component's own mean: no cancellation near the trained regime), with
// W the one-hot winner (mc) or resp (loglik). With a smoothing G (mc), component k's weights are G[kstar, k]:
//   A0 = sum_j G[j,k] c_j,  A1 = sum_j G[j,k] (S1_j + c_j dl),  A2 = sum_j G[j,k] (S2_j + 2 dl S1_j + c_j dl^2),
// dl = mu_j - mu_k. Gradients of the mean score (g = 1 / rows): d mu = g sigma^2 A1, d sigma = g (A0 / sigma -
// sigma A2), d log_pi = g A0; the update is a single-rounding multiply-add in T (as ATen's addcmul_), sigma clipped.
template <typename T>
DCGMM_HD void step_component(const double* stats, const T* mu, const T* sigma, const T* G, int64_t K, int64_t D,
                             int64_t k, double g, T s_mu, T s_sigma, T lo, T hi, T* new_mu, T* new_sigma,
                             double* g_log_pi) {
  const int64_t E = 1 + 2 * D;
  double a0 = 0.0;
  if (G != nullptr) {
    for (int64_t j = 0; j < K; ++j) a0 += double(G[j * K + k]) * stats[j * E];
  } else {
    a0 = stats[k * E];
  }
  *g_log_pi = g * a0;
  for (int64_t d = 0; d < D; ++d) {
    double a1 = 0.0, a2 = 0.0;
    const double mk = double(mu[k * D + d]);
    if (G != nullptr) {
      for (int64_t j = 0; j < K; ++j) {
        const double w = double(G[j * K + k]);
        if (w == 0.0) continue;
        const double* sj = stats + j * E;
        const double cj = sj[0], s1 = sj[1 + d], s2 = sj[1 + D + d], dl = double(mu[j * D + d]) - mk;
        a1 += w * (s1 + cj * dl);
        a2 += w * (s2 + 2.0 * dl * s1 + cj * dl * dl);
      }
    } else {
      a1 = stats[k * E + 1 + d], a2 = stats[k * E + 1 + D + d];
    }
    const double sg = double(sigma[k * D + d]);
    const T g_mu = T(g * sg * sg * a1), g_sigma = T(g * (a0 / sg - sg * a2));
    new_mu[d] = math_fma(g_mu, s_mu, mu[k * D + d]);
    T ns = math_fma(g_sigma, s_sigma, sigma[k * D + d]);
    new_sigma[d] = ns != ns ? ns : (ns < lo ? lo : (ns > hi ? hi : ns));
  }
}

}  // namespace dcgmm
