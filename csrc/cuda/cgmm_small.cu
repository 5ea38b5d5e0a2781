// The cGMM op for layers of up to 128 components (the paper's small-patch layers: 3x3 and 4x4 on one channel,
// D <= 64; any D works, the direct form costs K*D per row): one thread per patch row, the K log scores in
// registers (cgmm_math.h row_log_scores / row_epilogue, the code the CPU tests run through csrc/cpu/step.cpp).
//
// Rows are taken in fixed blocks of ROWS = 64: in shared mode consecutive rows (n, p), in independent mode one
// position p and 64 consecutive images (one GMM per block). Every sum over rows is a block's float32 sum in row
// order, then the blocks' sums in block order in float64: deterministic, independent of the GPU's SM count.
//
//   dcgmm_cgmm_fwd            pack, forward                                   (2 launches)
//   dcgmm_cgmm_bwd            pack, weights + dx patches + block sums, sums to gradients, dx fold   (<= 4)
//   dcgmm_cgmm_step_partials  pack, forward + block sums of the step's weights, sums to statistics (3)
//   dcgmm_cgmm_step_finalize  update of mu and sigma, update of pi_logits (2; cgmm_math.h step_component)
#include <math_constants.h>

#include "cgmm_math.h"
#include "common.cuh"

namespace dcgmm {
namespace cuda {
namespace {

struct RowAt {
  int64_t r, n, p, gi;
  bool valid;
};

// Row of thread t in this block (see the file header).
__device__ __forceinline__ RowAt row_at(const Geo& g, int t) {
  RowAt a;
  if (g.independent) {
    a.n = int64_t(blockIdx.x) * ROWS + t, a.p = blockIdx.y, a.valid = a.n < g.N, a.r = a.n * g.P + a.p, a.gi = a.p;
  } else {
    a.r = int64_t(blockIdx.x) * ROWS + t, a.valid = a.r < g.M, a.n = a.r / g.P, a.p = a.r - a.n * g.P, a.gi = 0;
  }
  return a;
}

__device__ __forceinline__ const float* patch_origin(const Geo& g, const float* x, int64_t n, int64_t p) {
  const int64_t oy = p / g.Wo, ox = p - oy * g.Wo;
  return x + n * g.sN + oy * g.sh * g.sH + ox * g.sw * g.C;
}

// The block's sums over its rows, for every component k: sum W, sum W (x - mu_k), sum W (x - mu_k)^2 (row order,
// float32), into out (K, 1 + 2D). Ws (ROWS, K) holds each row's weights (0 for rows past the end); Xs is scratch
// for DCHUNK patch entries of every row. Called by every thread of the block.
__device__ void block_sums(const Geo& g, const float* __restrict__ x, const float* __restrict__ prm, int64_t gi,
                           const float* Ws, float* Xs, float* __restrict__ out) {
  const int t = threadIdx.x;
  const int64_t K = g.K, D = g.D, E = 1 + 2 * D, kwc = g.kw * g.C;
  __syncthreads();
  for (int64_t k = t; k < K; k += ROWS) {
    float a = 0.f;
    for (int rr = 0; rr < ROWS; ++rr) a += Ws[rr * K + k];
    out[k * E] = a;
  }
  for (int64_t d0 = 0; d0 < D; d0 += DCHUNK) {
    const int64_t dc = D - d0 < DCHUNK ? D - d0 : DCHUNK;
    for (int64_t i = t; i < ROWS * dc; i += ROWS) {
      const int rr = int(i / dc);
      const int64_t d = d0 + i % dc;
      const RowAt a = row_at(g, rr);
      float v = 0.f;
      if (a.valid) v = patch_origin(g, x, a.n, a.p)[(d / kwc) * g.sH + d % kwc];
      Xs[rr * DCHUNK + (d - d0)] = v;
    }
    __syncthreads();
    for (int64_t i = t; i < K * dc; i += ROWS) {
      const int64_t k = i / dc, dl = i % dc, d = d0 + dl;
      const float m = prm[((gi * D + d) * g.kmax + k) * 2];
      float a1 = 0.f, a2 = 0.f;
      for (int rr = 0; rr < ROWS; ++rr) {
        const float w = Ws[rr * K + k];
        if (w != 0.f) {
          const float diff = Xs[rr * DCHUNK + dl] - m;
          a1 = fmaf(w, diff, a1);
          a2 = fmaf(w * diff, diff, a2);
        }
      }
      out[k * E + 1 + d] = a1;
      out[k * E + 1 + D + d] = a2;
    }
    __syncthreads();
  }
}

template <int KMAX, bool STEP>
__global__ void __launch_bounds__(ROWS, 1) forward_kernel(Geo g, const float* __restrict__ x,
                                                       const float* __restrict__ prm, const float* __restrict__ c,
                                                       int is_mc, const float* __restrict__ G, int sep_n,
                                                       float* resp, float* __restrict__ score,
                                                       float* __restrict__ lse, int32_t* __restrict__ kstar,
                                                       float* __restrict__ partials) {
  extern __shared__ float smem[];
  const int t = threadIdx.x;
  const RowAt a = row_at(g, t);
  float ls[KMAX];
  float l = 0.f;
  int32_t ks = 0;
  if (a.valid) {
    row_log_scores<KMAX>(patch_origin(g, x, a.n, a.p), g.sH, g.kh, g.kw * g.C, prm + a.gi * g.D * KMAX * 2,
                         c + a.gi * KMAX, g.K, ls);
    float sc;
    // separable smoothing: this thread's K scratch values in shared memory, column t (conflict-free)
    row_epilogue<KMAX>(ls, g.K, is_mc != 0, G, sep_n, smem + t, ROWS, float(0.5 * double(g.D) * 1.8378770664093453),
                       resp + a.r * g.K, sc, l, ks);
    score[a.r] = sc, lse[a.r] = l, kstar[a.r] = ks;
  }
  if (STEP) {  // the step's weights: the one-hot winner (mc) or resp (loglik)
    __syncthreads();  // the smoothing's scratch and Ws share the shared memory
    float* Ws = smem;  // resp read back (this thread's own writes): the log scores are dead by now
    const float* rp = resp + a.r * g.K;
    for (int64_t k = 0; k < g.K; ++k)
      Ws[t * g.K + k] = !a.valid ? 0.f : (is_mc ? (k == ks ? 1.f : 0.f) : rp[k]);
    block_sums(g, x, prm, a.gi, Ws, smem + ROWS * g.K,
               partials + (int64_t(blockIdx.x) * g.Gc + a.gi) * g.K * (1 + 2 * g.D));
  }
}

template <int KMAX>
__global__ void __launch_bounds__(ROWS) backward_kernel(Geo g, const float* __restrict__ g_resp,
                                                        const float* __restrict__ g_score, int g_score_scalar,
                                                        const float* __restrict__ x, const float* __restrict__ prm,
                                                        int is_mc, const float* __restrict__ G, int sep_n,
                                                        const float* __restrict__ resp,
                                                        const int32_t* __restrict__ kstar, int need_x, int need_p,
                                                        float* __restrict__ dxp, float* __restrict__ partials) {
  extern __shared__ float smem[];
  const int t = threadIdx.x;
  const RowAt a = row_at(g, t);
  const int64_t K = g.K;
  float w[KMAX];
#pragma unroll
  for (int k = 0; k < KMAX; ++k) w[k] = 0.f;
  if (a.valid) {  // W of design.md, as cgmm_math.h backward_weights_row (denormal weights flushed)
    const float* rp = resp + a.r * K;
    const float* gr = g_resp == nullptr ? nullptr : g_resp + a.r * K;
    const float gs = g_score == nullptr ? 0.f : g_score[g_score_scalar ? 0 : a.r];
    const int32_t ks = kstar[a.r];
    float dot = 0.f;
    if (gr != nullptr) {
#pragma unroll
      for (int k = 0; k < KMAX; ++k)
        if (k < K) dot += gr[k] * rp[k];
    }
#pragma unroll
    for (int k = 0; k < KMAX; ++k) {
      if (k < K) {
        // G[kstar, k]: a row of the dense G, or Gy[kstar / n, k / n] Gx[kstar % n, k % n] of the factors
        const float gk = G == nullptr ? 0.f
                         : sep_n > 0 ? G[(ks / sep_n) * sep_n + k / sep_n] *
                                           G[sep_n * sep_n + (ks % sep_n) * sep_n + k % sep_n]
                                     : G[ks * K + k];
        float first = is_mc ? (G != nullptr ? gs * gk : (k == ks ? gs : 0.f)) : gs * rp[k];
        float v = gr != nullptr ? first + rp[k] * (gr[k] - dot) : first;
        w[k] = fabsf(v) < 1.17549435e-38f ? 0.f : v;
      }
    }
    if (need_x) {  // dx patch entries: sum_k W[k] sigma^2 (mu - x)
      const float* xp = patch_origin(g, x, a.n, a.p);
      const float* q = prm + a.gi * g.D * KMAX * 2;
      float* o = dxp + a.r * g.D;
      const int64_t kwc = g.kw * g.C;
      for (int64_t ky = 0; ky < g.kh; ++ky)
        for (int64_t e = 0; e < kwc; ++e, q += 2 * KMAX) {
          const float xd = xp[ky * g.sH + e];
          float acc = 0.f;
#pragma unroll
          for (int k = 0; k < KMAX; ++k) {
            const float s = q[2 * k + 1];
            acc = fmaf(w[k] * s * s, q[2 * k] - xd, acc);
          }
          *o++ = acc;
        }
    }
  }
  if (need_p) {
    float* Ws = smem;
#pragma unroll
    for (int k = 0; k < KMAX; ++k)
      if (k < K) Ws[t * K + k] = w[k];
    block_sums(g, x, prm, a.gi, Ws, smem + ROWS * K,
               partials + (int64_t(blockIdx.x) * g.Gc + a.gi) * K * (1 + 2 * g.D));
  }
}

// Blocks' sums in block order (float64) -> statistics (Gc, K, 1 + 2D) float64.
__global__ void stats_kernel(Geo g, const float* __restrict__ partials, double* __restrict__ stats) {
  const int64_t E = 1 + 2 * g.D, i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= g.Gc * g.K * E) return;
  const int64_t gi = i / (g.K * E), ke = i - gi * g.K * E;
  const int64_t nb = g.independent ? g.nchunks : g.nblocks;
  double s = 0.0;
  for (int64_t b = 0; b < nb; ++b) s += double(partials[(b * g.Gc + gi) * g.K * E + ke]);
  stats[i] = s;
}

// Blocks' sums -> d mu = sigma^2 A1, d sigma = A0 / sigma - sigma A2, d log_pi = A0 (centred sums, float64).
__global__ void grads_kernel(Geo g, const float* __restrict__ partials, const float* __restrict__ sigma,
                             float* __restrict__ d_mu, float* __restrict__ d_sigma, float* __restrict__ d_log_pi) {
  const int64_t D = g.D, E = 1 + 2 * D, i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= g.Gc * g.K * D) return;
  const int64_t d = i % D, gk = i / D, gi = gk / g.K, k = gk - gi * g.K;
  const int64_t nb = g.independent ? g.nchunks : g.nblocks;
  double a0 = 0.0, a1 = 0.0, a2 = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    const float* q = partials + ((b * g.Gc + gi) * g.K + k) * E;
    a0 += double(q[0]), a1 += double(q[1 + d]), a2 += double(q[1 + D + d]);
  }
  const double s = double(sigma[i]);
  d_mu[i] = float(s * s * a1);
  d_sigma[i] = float(a0 / s - s * a2);
  if (d == 0) d_log_pi[gk] = float(a0);
}

// dx (N, H, W, C): each pixel's sum over the patches covering it, in (oy, ox) order.
__global__ void fold_kernel(Geo g, const float* __restrict__ dxp, float* __restrict__ dx) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= g.N * g.H * g.W * g.C) return;
  const int64_t c = i % g.C, xx = (i / g.C) % g.W, y = (i / (g.C * g.W)) % g.H, n = i / (g.C * g.W * g.H);
  const int64_t oy0 = y - g.kh + 1 <= 0 ? 0 : (y - g.kh + g.sh) / g.sh, oy1 = min(g.Ho - 1, y / g.sh);
  const int64_t ox0 = xx - g.kw + 1 <= 0 ? 0 : (xx - g.kw + g.sw) / g.sw, ox1 = min(g.Wo - 1, xx / g.sw);
  float acc = 0.f;
  for (int64_t oy = oy0; oy <= oy1; ++oy)
    for (int64_t ox = ox0; ox <= ox1; ++ox) {
      const int64_t ky = y - oy * g.sh, kx = xx - ox * g.sw;
      acc += dxp[(n * g.P + oy * g.Wo + ox) * g.D + (ky * g.kw + kx) * g.C + c];
    }
  dx[i] = acc;
}

__device__ __forceinline__ void atomic_abs_max(float* where, float v) {
  const unsigned bits = v != v ? 0x7fffffffu : __float_as_uint(fabsf(v));  // NaN above every number
  atomicMax(reinterpret_cast<unsigned*>(where), bits);
}

__global__ void finalize_params_kernel(Geo g, const double* __restrict__ stats, const float* __restrict__ mu,
                                       const float* __restrict__ sigma, const float* __restrict__ G, double scale,
                                       const float* __restrict__ steps, float lo, float hi,
                                       float* __restrict__ new_mu, float* __restrict__ new_sigma,
                                       double* __restrict__ glp, float* maxima) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= g.Gc * g.K) return;
  const int64_t gi = i / g.K, k = i - gi * g.K, D = g.D;
  step_component<float>(stats + gi * g.K * (1 + 2 * D), mu + gi * g.K * D, sigma + gi * g.K * D, G, g.K, D, k,
                        scale, steps[0], steps[1], lo, hi, new_mu + i * D, new_sigma + i * D, glp + i);
  float m = 0.f;
  for (int64_t d = 0; d < D; ++d) {
    const float v = new_mu[i * D + d];
    m = (v != v || m != m) ? CUDART_NAN_F : fmaxf(m, fabsf(v));
  }
  atomic_abs_max(maxima, m);
}

constexpr int PI_THREADS = 128;

// d pi_logits = d log_pi - softmax * sum(d log_pi) over a GMM's K entries (or all P*K with pi_global).
__global__ void __launch_bounds__(PI_THREADS) finalize_pi_kernel(Geo g, const double* __restrict__ glp,
                                                                const float* __restrict__ pi_logits,
                                                                const float* __restrict__ log_pi,
                                                                const float* __restrict__ steps, int pi_global,
                                                                float* __restrict__ new_pi, float* maxima) {
  __shared__ double red[PI_THREADS];
  const int t = threadIdx.x;
  const int64_t count = pi_global ? g.Gc * g.K : g.K, base = pi_global ? 0 : int64_t(blockIdx.x) * g.K;
  double s = 0.0;
  for (int64_t i = t; i < count; i += PI_THREADS) s += glp[base + i];
  red[t] = s;
  __syncthreads();
  for (int h = PI_THREADS / 2; h > 0; h >>= 1) {
    if (t < h) red[t] += red[t + h];
    __syncthreads();
  }
  const double total = red[0];
  float m = 0.f;
  for (int64_t i = t; i < count; i += PI_THREADS) {
    const int64_t j = base + i;
    const float d = float(glp[j] - exp(double(log_pi[j])) * total);
    const float v = fmaf(d, steps[2], pi_logits[j]);
    new_pi[j] = v;
    m = (v != v || m != m) ? CUDART_NAN_F : fmaxf(m, fabsf(v));
  }
  atomic_abs_max(maxima + 1, m);
}

inline dim3 row_grid(const Geo& g) {
  return g.independent ? dim3(unsigned(g.nchunks), unsigned(g.P)) : dim3(unsigned(g.nblocks));
}

inline size_t sums_smem(const Geo& g) { return size_t(ROWS) * size_t(g.K + DCHUNK) * sizeof(float); }

inline unsigned blocks_for(int64_t n, int threads) { return unsigned((n + threads - 1) / threads); }

template <bool STEP>
int launch_forward(const Geo& g, const float* x, const float* prm, const float* c, int is_mc, const float* G,
                   int sep_n, float* resp, float* score, float* lse, int32_t* kstar, float* partials,
                   cudaStream_t st) {
  const size_t scratch = G != nullptr && sep_n > 0 ? size_t(ROWS) * size_t(g.K) * sizeof(float) : 0;
  const size_t smem = STEP && sums_smem(g) > scratch ? sums_smem(g) : scratch;
  if (g.kmax == 32)
    forward_kernel<32, STEP><<<row_grid(g), ROWS, smem, st>>>(g, x, prm, c, is_mc, G, sep_n, resp, score, lse,
                                                              kstar, partials);
  else if (g.kmax == 64)
    forward_kernel<64, STEP><<<row_grid(g), ROWS, smem, st>>>(g, x, prm, c, is_mc, G, sep_n, resp, score, lse,
                                                              kstar, partials);
  else
    forward_kernel<128, STEP><<<row_grid(g), ROWS, smem, st>>>(g, x, prm, c, is_mc, G, sep_n, resp, score, lse,
                                                               kstar, partials);
  return launched();
}

#define DCGMM_TRY(expr)           \
  do {                            \
    const int err_ = (expr);      \
    if (err_ != 0) return err_;   \
  } while (0)

}  // namespace
}  // namespace cuda
}  // namespace dcgmm

using namespace dcgmm::cuda;

extern "C" {

int dcgmm_cgmm_fwd(const dcgmm_shape* s, const float* x, const float* mu, const float* sigma, const float* log_pi,
                   int is_mc, const float* smoothing, int smoothing_n, float* resp, float* score, float* lse,
                   int32_t* kstar, void* workspace, int64_t workspace_bytes, void* stream) {
  Geo g;
  Workspace w;
  DCGMM_TRY(prologue(s, x, smoothing, smoothing_n, DCGMM_WS_FORWARD, workspace, workspace_bytes, g, w));
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  DCGMM_TRY(pack_params(g, mu, sigma, log_pi, w.prm, w.c, st));
  return launch_forward<false>(g, x, w.prm, w.c, is_mc, is_mc ? smoothing : nullptr, smoothing_n, resp, score, lse,
                               kstar, nullptr, st);
}

int dcgmm_cgmm_step_partials(const dcgmm_shape* s, const float* x, const float* mu, const float* sigma,
                             const float* log_pi, int is_mc, const float* smoothing, int smoothing_n, float* resp,
                             float* score, float* lse, int32_t* kstar, double* stats, void* workspace,
                             int64_t workspace_bytes, void* stream) {
  Geo g;
  Workspace w;
  DCGMM_TRY(prologue(s, x, smoothing, smoothing_n, DCGMM_WS_STEP_PARTIALS, workspace, workspace_bytes, g, w));
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  DCGMM_TRY(pack_params(g, mu, sigma, log_pi, w.prm, w.c, st));
  DCGMM_TRY(launch_forward<true>(g, x, w.prm, w.c, is_mc, is_mc ? smoothing : nullptr, smoothing_n, resp, score,
                                 lse, kstar, w.partials, st));
  const int64_t n = g.Gc * g.K * (1 + 2 * g.D);
  stats_kernel<<<blocks_for(n, 256), 256, 0, st>>>(g, w.partials, stats);
  return launched();
}

int dcgmm_cgmm_bwd(const dcgmm_shape* s, const float* g_resp, const float* g_score, int g_score_scalar,
                   const float* x, const float* mu, const float* sigma, const float* log_pi, int is_mc,
                   const float* smoothing, int smoothing_n, const float* resp, const int32_t* kstar, int need_x_grad,
                   int need_param_grads, float* dx, float* d_mu, float* d_sigma, float* d_log_pi, void* workspace,
                   int64_t workspace_bytes, void* stream) {
  Geo g;
  Workspace w;
  DCGMM_TRY(prologue(s, x, smoothing, smoothing_n, DCGMM_WS_BACKWARD, workspace, workspace_bytes, g, w));
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  const float* G = is_mc ? smoothing : nullptr;
  if (!need_x_grad && !need_param_grads) return 0;
  DCGMM_TRY(pack_params(g, mu, sigma, log_pi, w.prm, w.c, st));
  const size_t smem = need_param_grads ? sums_smem(g) : 0;
  const int nx = need_x_grad ? 1 : 0, np = need_param_grads ? 1 : 0;
  if (g.kmax == 32)
    backward_kernel<32><<<row_grid(g), ROWS, smem, st>>>(g, g_resp, g_score, g_score_scalar, x, w.prm, is_mc, G,
                                                        smoothing_n, resp, kstar, nx, np, w.dxp, w.partials);
  else if (g.kmax == 64)
    backward_kernel<64><<<row_grid(g), ROWS, smem, st>>>(g, g_resp, g_score, g_score_scalar, x, w.prm, is_mc, G,
                                                        smoothing_n, resp, kstar, nx, np, w.dxp, w.partials);
  else
    backward_kernel<128><<<row_grid(g), ROWS, smem, st>>>(g, g_resp, g_score, g_score_scalar, x, w.prm, is_mc, G,
                                                        smoothing_n, resp, kstar, nx, np, w.dxp, w.partials);
  DCGMM_TRY(launched());
  if (need_param_grads) {
    const int64_t n = g.Gc * g.K * g.D;
    grads_kernel<<<blocks_for(n, 256), 256, 0, st>>>(g, w.partials, sigma, d_mu, d_sigma, d_log_pi);
    DCGMM_TRY(launched());
  }
  if (need_x_grad) {
    const int64_t n = g.N * g.H * g.W * g.C;
    fold_kernel<<<blocks_for(n, 256), 256, 0, st>>>(g, w.dxp, dx);
    DCGMM_TRY(launched());
  }
  return 0;
}

int dcgmm_cgmm_step_finalize(const dcgmm_shape* s, const double* stats, const float* mu, const float* sigma,
                             const float* pi_logits, const float* log_pi, const float* smoothing, double scale,
                             const float* steps, float sigma_min, float sigma_max, int pi_global, float* new_mu,
                             float* new_sigma, float* new_pi_logits, float* maxima, void* workspace,
                             int64_t workspace_bytes, void* stream) {
  Geo g;
  Workspace w;
  DCGMM_TRY(make_geo(s, g));
  DCGMM_TRY(check_workspace(g, DCGMM_WS_STEP_FINALIZE, workspace, workspace_bytes, w));
  if (!(sigma_min > 0.f && sigma_max >= sigma_min))
    return fail("sigma_min, sigma_max: expected 0 < sigma_min <= sigma_max");
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  DCGMM_TRY(static_cast<int>(cudaMemsetAsync(maxima, 0, 2 * sizeof(float), st)));
  const int64_t n = g.Gc * g.K;
  finalize_params_kernel<<<blocks_for(n, 128), 128, 0, st>>>(g, stats, mu, sigma, smoothing, scale, steps,
                                                             sigma_min, sigma_max, new_mu, new_sigma, w.glp, maxima);
  DCGMM_TRY(launched());
  const bool global = pi_global != 0 || !g.independent;
  finalize_pi_kernel<<<global ? 1u : unsigned(g.Gc), PI_THREADS, 0, st>>>(g, w.glp, pi_logits, log_pi, steps,
                                                                          global ? 1 : 0, new_pi_logits, maxima);
  return launched();
}

}  // extern "C"
