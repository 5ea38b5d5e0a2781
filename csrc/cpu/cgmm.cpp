// Fused C++ CPU kernels of the cGMM op and its helpers (design.md "The cGMM op", "Helper ops").
//
// cgmm_fwd_cpu: per block of patch rows, gather the rows straight from the NHWC input (implicit im2col, never the
//   patch matrix) and compute every component's log score by the direct form (scores_block) into an (M, K)
//   buffer; the optional K x K smoothing is one GEMM over it; then per row softmax / logsumexp and max / argmax
//   (cgmm_math.h), written once into resp, score, lse and kstar.
// cgmm_bwd_cpu: W (rows x K) from the saved resp and kstar, then parameter gradients as sums over fixed blocks of
//   ROW_BLOCK rows (float partial sums per block, added in block order to double totals: deterministic and
//   independent of the thread count), and the x gradient folded back to pixels one image per task (no races).
// patch_average_cpu, sample_components_cpu: the sampling helpers.
// Includes ATen and torch/library.h only (torch/extension.h costs ~23 s per file).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../cgmm_math.h"

namespace dcgmm {
namespace {

constexpr int RB = 8;               // rows per forward block (parameters loaded once per RB rows)
constexpr int64_t ROW_BLOCK = 256;  // rows per partial sum of the parameter gradients (fixed: determinism)

struct Geometry {
  int64_t N, H, W, C, kh, kw, sh, sw, Ho, Wo, P, M, D, D_pad, K, G;
  bool independent;
};

Geometry make_geometry(const at::Tensor& x, const at::Tensor& mu, at::IntArrayRef kernel, at::IntArrayRef stride) {
  TORCH_CHECK(x.dim() == 4, "x: expected (N, H, W, C), got ", x.sizes());
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2, "kernel, stride: expected 2 ints each");
  Geometry g{};
  g.N = x.size(0), g.H = x.size(1), g.W = x.size(2), g.C = x.size(3);
  g.kh = kernel[0], g.kw = kernel[1], g.sh = stride[0], g.sw = stride[1];
  TORCH_CHECK(g.kh >= 1 && g.kw >= 1 && g.sh >= 1 && g.sw >= 1, "kernel, stride: expected positive ints");
  TORCH_CHECK(g.kh <= g.H && g.kw <= g.W, "kernel: ", kernel, " is larger than the input (H, W) = (", g.H, ", ",
              g.W, ")");
  g.Ho = (g.H - g.kh) / g.sh + 1, g.Wo = (g.W - g.kw) / g.sw + 1;
  g.P = g.Ho * g.Wo, g.M = g.N * g.P, g.D = g.kh * g.kw * g.C, g.D_pad = round_up(g.D, PAD_LANES);
  TORCH_CHECK(mu.dim() == 2 || mu.dim() == 3, "mu: expected (K, D) or (P, K, D), got ", mu.sizes());
  g.independent = mu.dim() == 3;
  g.K = mu.size(-2), g.G = g.independent ? g.P : 1;
  TORCH_CHECK(mu.size(-1) == g.D, "mu: expected D = kh*kw*C = ", g.D, ", got ", mu.sizes());
  TORCH_CHECK(!g.independent || mu.size(0) == g.P, "mu: independent mode needs P = ", g.P, " GMMs, got ",
              mu.sizes());
  return g;
}

void check_params(const at::Tensor& x, const at::Tensor& mu, const at::Tensor& sigma, const at::Tensor& log_pi) {
  TORCH_CHECK(x.device().is_cpu(), "x: expected a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "x: expected float32 or float64, got ",
              x.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"mu", mu}, {"sigma", sigma},
                                {"log_pi", log_pi}}) {
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, ": expected dtype ", x.scalar_type(), ", got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == x.device(), name, ": expected device ", x.device(), ", got ", t.device());
  }
  TORCH_CHECK(sigma.sizes() == mu.sizes(), "sigma: expected the shape of mu ", mu.sizes(), ", got ", sigma.sizes());
  TORCH_CHECK(log_pi.sizes() == mu.sizes().slice(0, mu.dim() - 1), "log_pi: expected ",
              mu.sizes().slice(0, mu.dim() - 1), ", got ", log_pi.sizes());
}

// Copy (rows, D) into zero-padded (rows, D_pad) after applying f elementwise.
template <typename T, typename F>
std::vector<T> padded(const T* src, int64_t rows, int64_t D, int64_t D_pad, F f) {
  std::vector<T> out(rows * D_pad, T(0));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d) out[r * D_pad + d] = f(r * D + d);
  return out;
}

// Patch row (n, p) of the NHWC input into buf[0:D]; buf[D:D_pad] stays zero. kh contiguous segments of kw*C values.
template <typename T>
inline void gather_row(const T* x, const Geometry& g, int64_t n, int64_t p, T* buf) {
  const int64_t oy = p / g.Wo, ox = p % g.Wo, seg = g.kw * g.C;
  const T* base = x + ((n * g.H + oy * g.sh) * g.W + ox * g.sw) * g.C;
  if (seg <= 8) {  // short segments (3x3 one-channel patches): a library memcpy call per segment costs more
    for (int64_t ky = 0; ky < g.kh; ++ky)
      for (int64_t i = 0; i < seg; ++i) buf[ky * seg + i] = base[ky * g.W * g.C + i];
    return;
  }
  for (int64_t ky = 0; ky < g.kh; ++ky) std::memcpy(buf + ky * seg, base + ky * g.W * g.C, seg * sizeof(T));
}

// Tests set DCGMM_POISON=1: outputs are then filled with NaN (-1 for kstar) before a kernel writes them, so a
// test can check that every element was written.
bool poison() {
  const char* v = std::getenv("DCGMM_POISON");
  return v != nullptr && v[0] == '1';
}

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  auto t = at::empty(sizes, opts);
  if (poison()) {
    if (opts.dtype() == at::kInt)
      t.fill_(-1);
    else
      t.fill_(NAN);
  }
  return t;
}

// Rows of GMM gi, in the order every kernel walks them: all rows (shared) or n = 0..N-1 at position gi (independent).
inline int64_t rows_per_gmm(const Geometry& g) { return g.independent ? g.N : g.M; }
inline int64_t row_of(const Geometry& g, int64_t gi, int64_t j) { return g.independent ? j * g.P + gi : j; }

// ---------------------------------------------------------------------------------------------------- forward
// The hot loop: log scores of RB rows against all K components, the direct form with one 64-byte vector (GCC vector
// extension: one AVX-512 register, two AVX2 or four SSE registers) of LANES partial sums per row, in the same lane
// order as cgmm_math.h quad_rows (so results do not depend on the ISA). Compiled for AVX-512, AVX2+FMA and
// baseline x86-64; GCC's function multi-versioning picks one when the library loads.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
};

template <typename T>
inline __attribute__((always_inline)) void scores_block_impl(const T* xb, const T* mu, const T* sig, const T* c,
                                                             int64_t K, int64_t D_pad, T* ls) {
  using V = typename Vec<T>::type;
  constexpr int L = Lanes<T>::value;
  for (int64_t k = 0; k < K; ++k) {
    const T* m = mu + k * D_pad;
    const T* s = sig + k * D_pad;
    V acc[RB];
    for (int i = 0; i < RB; ++i) acc[i] = V{} * T(0);
    for (int64_t d = 0; d < D_pad; d += L) {
      V mv, sv;
      __builtin_memcpy(&mv, m + d, sizeof(V));
      __builtin_memcpy(&sv, s + d, sizeof(V));
      for (int i = 0; i < RB; ++i) {
        V xv;
        __builtin_memcpy(&xv, xb + i * D_pad + d, sizeof(V));
        const V t = sv * (xv - mv);
        acc[i] += t * t;
      }
    }
    for (int i = 0; i < RB; ++i) {
      T lanes[L];
      __builtin_memcpy(lanes, &acc[i], sizeof(V));
      ls[i * K + k] = c[k] - T(0.5) * lane_sum<T, L>(lanes);
    }
  }
}

// Small D (<= SMALL_D, e.g. 3x3 patches of one channel): vectorise over components instead of patch entries, so no
// horizontal sums: acc[k] += (sigma[d, k] (x[d] - mu[d, k]))^2 over d in order, parameters transposed to (D, K_pad).
constexpr int64_t SMALL_D = 16;

template <typename T>
inline __attribute__((always_inline)) void scores_block_kvec_impl(const T* xb, int64_t ldx, int64_t D, const T* muT,
                                                                  const T* sigT, const T* c, int64_t K, int64_t K_pad,
                                                                  T* ls) {
  using V = typename Vec<T>::type;
  constexpr int L = Lanes<T>::value;
  for (int i = 0; i < RB; ++i) {
    const T* xr = xb + i * ldx;
    for (int64_t k0 = 0; k0 < K_pad; k0 += L) {
      V acc = V{} * T(0);
      for (int64_t d = 0; d < D; ++d) {
        V mv, sv;
        __builtin_memcpy(&mv, muT + d * K_pad + k0, sizeof(V));
        __builtin_memcpy(&sv, sigT + d * K_pad + k0, sizeof(V));
        const V t = sv * (xr[d] - mv);
        acc += t * t;
      }
      T lanes[L];
      __builtin_memcpy(lanes, &acc, sizeof(V));
      for (int l = 0; l < L && k0 + l < K; ++l) ls[i * K + k0 + l] = c[k0 + l] - T(0.5) * lanes[l];
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DCGMM_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DCGMM_MULTIVERSION
#endif

DCGMM_MULTIVERSION void scores_block(const float* xb, const float* mu, const float* sig, const float* c, int64_t K,
                                     int64_t D_pad, float* ls) {
  scores_block_impl<float>(xb, mu, sig, c, K, D_pad, ls);
}
DCGMM_MULTIVERSION void scores_block(const double* xb, const double* mu, const double* sig, const double* c,
                                     int64_t K, int64_t D_pad, double* ls) {
  scores_block_impl<double>(xb, mu, sig, c, K, D_pad, ls);
}
DCGMM_MULTIVERSION void scores_block_kvec(const float* xb, int64_t ldx, int64_t D, const float* muT, const float* sigT,
                                          const float* c, int64_t K, int64_t K_pad, float* ls) {
  scores_block_kvec_impl<float>(xb, ldx, D, muT, sigT, c, K, K_pad, ls);
}
DCGMM_MULTIVERSION void scores_block_kvec(const double* xb, int64_t ldx, int64_t D, const double* muT,
                                          const double* sigT, const double* c, int64_t K, int64_t K_pad, double* ls) {
  scores_block_kvec_impl<double>(xb, ldx, D, muT, sigT, c, K, K_pad, ls);
}

// (G, K, D) parameters transposed to (G, D, K_pad), zero-padded (sigma = 0: padded components add exact zeros).
template <typename T>
std::vector<T> transposed(const T* src, int64_t G, int64_t K, int64_t D, int64_t K_pad) {
  std::vector<T> out(G * D * K_pad, T(0));
  for (int64_t gi = 0; gi < G; ++gi)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t d = 0; d < D; ++d) out[(gi * D + d) * K_pad + k] = src[(gi * K + k) * D + d];
  return out;
}

// Pass 1: log scores (M, K) of every row, blocks of RB rows in parallel (rows of one GMM per block).
// mu_p, sig_p: (G, K, D_pad) for large D, or (G, D, K_pad) transposed for D <= SMALL_D.
template <typename T>
void log_scores(const Geometry& g, const T* x, const T* mu_p, const T* sig_p, const T* c, T* ls) {
  const int64_t rows = rows_per_gmm(g), blocks = (rows + RB - 1) / RB, K = g.K, D_pad = g.D_pad;
  const bool small = g.D <= SMALL_D;
  const int64_t K_pad = round_up(K, PAD_LANES);
  at::parallel_for(0, blocks * g.G, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> xb(RB * D_pad, T(0)), lb(RB * K);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t gi = t / blocks, j0 = (t % blocks) * RB, nvalid = std::min<int64_t>(RB, rows - j0);
      for (int i = 0; i < RB; ++i) {
        T* buf = xb.data() + i * D_pad;
        if (i < nvalid) {
          const int64_t r = row_of(g, gi, j0 + i);
          gather_row(x, g, r / g.P, r % g.P, buf);
        } else {
          std::fill(buf, buf + g.D, T(0));
        }
      }
      if (small)
        scores_block_kvec(xb.data(), D_pad, g.D, mu_p + gi * g.D * K_pad, sig_p + gi * g.D * K_pad, c + gi * K, K,
                          K_pad, lb.data());
      else
        scores_block(xb.data(), mu_p + gi * K * D_pad, sig_p + gi * K * D_pad, c + gi * K, K, D_pad, lb.data());
      for (int i = 0; i < nvalid; ++i)
        std::memcpy(ls + row_of(g, gi, j0 + i) * K, lb.data() + i * K, K * sizeof(T));
    }
  });
}

// Large D: the centred expansion as GEMMs on blocks of gathered rows (BLAS does the heavy lifting):
//   log_score = xc @ B^T - 1/2 (xc * xc) @ S^T + c',  xc = x - ctr, S = sigma^2, B = (mu - ctr) S,
//   c' = log_pi + sum log sigma - 1/2 sum S (mu - ctr)^2, ctr = the mean of the GMM's means (limits cancellation).
// Rows are gathered block by block (implicit im2col: never the whole patch matrix). Used where it measured faster
// (shared mode, D and K >= 64: 4x4s2 D400 K100 forward 23 -> 18.5 ms; per-position GEMMs in independent mode and
// K = 25 were slower or equal, 2026-11-25). DCGMM_CPU_GEMM=0 turns it off.
constexpr int64_t GEMM_MIN_D = 64;
constexpr int64_t GEMM_MIN_K = 64;
constexpr int64_t GEMM_ROWS = 1024;

bool gemm_form_enabled() {
  const char* v = std::getenv("DCGMM_CPU_GEMM");
  return v == nullptr || v[0] != '0';
}

void log_scores_gemm(const Geometry& g, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& sigma,
                     const at::Tensor& log_pi, at::Tensor& ls) {
  auto mu3 = mu.view({g.G, g.K, g.D}), s3 = sigma.view({g.G, g.K, g.D});
  auto ctr = mu3.mean(1, /*keepdim=*/true);  // (G, 1, D)
  auto S = s3 * s3, muc = mu3 - ctr;
  auto Bt = (muc * S).transpose(1, 2).contiguous();  // (G, D, K)
  auto St = (S * -0.5).transpose(1, 2).contiguous();
  auto c = (log_pi.view({g.G, g.K}).to(at::kDouble) + s3.log().to(at::kDouble).sum(-1) -
            0.5 * (S.to(at::kDouble) * muc.to(at::kDouble).square()).sum(-1))
               .to(x.scalar_type());  // (G, K)
  const int64_t rows = rows_per_gmm(g);
  auto xb = at::empty({std::min(rows, GEMM_ROWS), g.D}, x.options());
  auto lb = at::empty({std::min(rows, GEMM_ROWS), g.K}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cgmm_fwd_gemm", [&] {
    using T = scalar_t;
    const T* xp = x.data_ptr<T>();
    T* out = ls.data_ptr<T>();
    for (int64_t gi = 0; gi < g.G; ++gi) {
      const T* cen = ctr.data_ptr<T>() + gi * g.D;
      for (int64_t j0 = 0; j0 < rows; j0 += GEMM_ROWS) {
        const int64_t nb = std::min(GEMM_ROWS, rows - j0);
        T* xbp = xb.data_ptr<T>();
        at::parallel_for(0, nb, 64, [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) {
            const int64_t r = row_of(g, gi, j0 + i);
            T* row = xbp + i * g.D;
            gather_row(xp, g, r / g.P, r % g.P, row);
            for (int64_t d = 0; d < g.D; ++d) row[d] -= cen[d];
          }
        });
        auto xc = xb.narrow(0, 0, nb), l = lb.narrow(0, 0, nb);
        at::addmm_out(l, c[gi].unsqueeze(0), xc, Bt[gi]);
        l.addmm_(xc.square(), St[gi]);
        const T* lp = l.data_ptr<T>();
        at::parallel_for(0, nb, 256, [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i)
            std::memcpy(out + row_of(g, gi, j0 + i) * g.K, lp + i * g.K, g.K * sizeof(T));
        });
      }
    }
  });
}

// The smoothing of the mc loss: a dense (K, K) G, or its separable factors (2, n, n) = (Gy, Gx), G = kron(Gy, Gx).
at::Tensor checked_smoothing(const at::Tensor& smoothing, int64_t K, at::ScalarType dtype) {
  const auto G = smoothing.contiguous();
  const int64_t n = int64_t(std::llround(std::sqrt(double(K))));
  const bool dense = G.dim() == 2 && G.size(0) == K && G.size(1) == K;
  const bool factored = G.dim() == 3 && G.size(0) == 2 && G.size(1) == n && G.size(2) == n && n * n == K;
  TORCH_CHECK(G.scalar_type() == dtype && (dense || factored), "smoothing: expected (K, K) = (", K, ", ", K,
              ") or factors (2, n, n) = (2, ", n, ", ", n, ") of dtype ", dtype, ", got ", G.sizes(), " ",
              G.scalar_type());
  return G;
}

at::Tensor dense_smoothing(const at::Tensor& G) { return G.dim() == 3 ? at::kron(G[0], G[1]).contiguous() : G; }

// Separable smoothing of SMOOTH_ROWS rows at a time, rows in the vector lanes: the K = n * n log scores of a row
// as an n x n grid L (k = ky * n + kx) give out = Gy L Gx^T, 2 K n multiply-adds instead of K^2 per row.
// lt, tmp, out: (K, SMOOTH_ROWS), row i of the block in lane i (lanes past the block's rows hold zeros).
constexpr int64_t SMOOTH_ROWS = 16;
template <typename T>
inline __attribute__((always_inline)) void smooth_block_impl(const T* __restrict__ lt, const T* __restrict__ gy,
                                                             const T* __restrict__ gx, int64_t n, T* __restrict__ tmp,
                                                             T* __restrict__ out) {
  constexpr int64_t B = SMOOTH_ROWS;
  for (int64_t a = 0; a < n; ++a)  // tmp[a, c] = sum_b Gx[c, b] L[a, b]
    for (int64_t c = 0; c < n; ++c) {
      T acc[B] = {};
      for (int64_t b = 0; b < n; ++b) {
        const T w = gx[c * n + b];
        const T* src = lt + (a * n + b) * B;
        for (int64_t i = 0; i < B; ++i) acc[i] += w * src[i];
      }
      for (int64_t i = 0; i < B; ++i) tmp[(a * n + c) * B + i] = acc[i];
    }
  for (int64_t a = 0; a < n; ++a)  // out[a, c] = sum_b Gy[a, b] tmp[b, c]
    for (int64_t c = 0; c < n; ++c) {
      T acc[B] = {};
      for (int64_t b = 0; b < n; ++b) {
        const T w = gy[a * n + b];
        const T* src = tmp + (b * n + c) * B;
        for (int64_t i = 0; i < B; ++i) acc[i] += w * src[i];
      }
      for (int64_t i = 0; i < B; ++i) out[(a * n + c) * B + i] = acc[i];
    }
}
DCGMM_MULTIVERSION void smooth_block(const float* lt, const float* gy, const float* gx, int64_t n, float* tmp,
                                     float* out) {
  smooth_block_impl<float>(lt, gy, gx, n, tmp, out);
}
DCGMM_MULTIVERSION void smooth_block(const double* lt, const double* gy, const double* gx, int64_t n, double* tmp,
                                     double* out) {
  smooth_block_impl<double>(lt, gy, gx, n, tmp, out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cgmm_fwd_cpu(
    const at::Tensor& x_, const at::Tensor& mu_, const at::Tensor& sigma_, const at::Tensor& log_pi_,
    at::IntArrayRef kernel, at::IntArrayRef stride, c10::string_view loss, const std::optional<at::Tensor>& smoothing) {
  check_params(x_, mu_, sigma_, log_pi_);
  const Geometry g = make_geometry(x_, mu_, kernel, stride);
  TORCH_CHECK(loss == "mc" || loss == "loglik", "loss: expected 'mc' or 'loglik', got ", loss);
  const bool is_mc = loss == "mc";
  TORCH_CHECK(!(smoothing.has_value() && !is_mc), "smoothing: must be None for loss 'loglik'");
  auto x = x_.contiguous(), mu = mu_.contiguous(), sigma = sigma_.contiguous(), log_pi = log_pi_.contiguous();
  at::Tensor G;
  if (smoothing.has_value()) G = checked_smoothing(*smoothing, g.K, x.scalar_type());
  auto opts = x.options();
  auto resp = new_output({g.N, g.Ho, g.Wo, g.K}, opts);
  auto score = new_output({g.N, g.Ho, g.Wo}, opts);
  auto lse = new_output({g.N, g.Ho, g.Wo}, opts);
  auto kstar = new_output({g.N, g.Ho, g.Wo}, opts.dtype(at::kInt));
  auto ls = at::empty({g.M, g.K}, opts);
  if (!g.independent && g.D >= GEMM_MIN_D && g.K >= GEMM_MIN_K && gemm_form_enabled()) {
    log_scores_gemm(g, x, mu, sigma, log_pi, ls);
  } else AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cgmm_fwd_cpu", [&] {
    using T = scalar_t;
    const T* s = sigma.data_ptr<T>();
    const T* m = mu.data_ptr<T>();
    const bool small = g.D <= SMALL_D;
    const int64_t K_pad = round_up(g.K, PAD_LANES);
    auto mu_p = small ? transposed<T>(m, g.G, g.K, g.D, K_pad)
                      : padded<T>(m, g.G * g.K, g.D, g.D_pad, [&](int64_t i) { return m[i]; });
    auto sig_p = small ? transposed<T>(s, g.G, g.K, g.D, K_pad)
                       : padded<T>(s, g.G * g.K, g.D, g.D_pad, [&](int64_t i) { return s[i]; });
    // c = log_pi + sum_d log sigma (vectorised logs, summed in double)
    auto c = (log_pi.to(at::kDouble) + sigma.log().to(at::kDouble).sum(-1)).to(x.scalar_type()).contiguous();
    log_scores<T>(g, x.data_ptr<T>(), mu_p.data(), sig_p.data(), c.data_ptr<T>(), ls.data_ptr<T>());
  });
  // Smoothing as one GEMM over all rows, then pass 2 per row: softmax / logsumexp and max / argmax (ties -> lowest).
  // A dense G: one GEMM over all rows. Factors: smoothed per row inside the pass below (no (M, K) temporary).
  const bool factored = is_mc && G.defined() && G.dim() == 3;
  const at::Tensor ranked = (is_mc && G.defined() && !factored) ? at::mm(ls, G.t()) : ls;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cgmm_fwd_cpu_rows", [&] {
    using T = scalar_t;
    const T cst = T(0.5 * double(g.D) * std::log(2.0 * M_PI));
    const T *l = ls.data_ptr<T>(), *rk = ranked.data_ptr<T>();
    T *rp = resp.data_ptr<T>(), *sp = score.data_ptr<T>(), *lp = lse.data_ptr<T>();
    int32_t* kp = kstar.data_ptr<int32_t>();
    const int64_t K = g.K, n = factored ? G.size(1) : 0, B = SMOOTH_ROWS;
    const T* gy = factored ? G.data_ptr<T>() : nullptr;
    at::parallel_for(0, g.M, 512, [&](int64_t r0, int64_t r1) {
      std::vector<T> lt(factored ? K * B : 0), tmp(lt.size()), sm(lt.size());
      for (int64_t b0 = r0; b0 < r1; b0 += B) {
        const int64_t nb = std::min(B, r1 - b0);
        if (factored) {  // the block's log scores transposed, smoothed with rows in the vector lanes
          std::fill(lt.begin(), lt.end(), T(0));
          for (int64_t i = 0; i < nb; ++i)
            for (int64_t k = 0; k < K; ++k) lt[k * B + i] = l[(b0 + i) * K + k];
          smooth_block(lt.data(), gy, gy + n * n, n, tmp.data(), sm.data());
        }
        for (int64_t i = 0; i < nb; ++i) {
          const int64_t r = b0 + i;
          lp[r] = softmax_lse(l + r * K, K, rp + r * K);
          int64_t k = 0;
          T best;
          if (factored) {  // first maximum: ties -> lowest index
            best = sm[i];
            for (int64_t j = 1; j < K; ++j)
              if (sm[j * B + i] > best) best = sm[j * B + i], k = j;
          } else {
            k = argmax_first(rk + r * K, K);
            best = rk[r * K + k];
          }
          kp[r] = int32_t(k);
          sp[r] = (is_mc ? best : lp[r]) - cst;
        }
      }
    });
  });
  return {resp, score, lse, kstar};
}

// ---------------------------------------------------------------------------------------------------- backward
// For k in [k0, k1) with W[k] != 0: a_k += W[k] u_k, b_k += W[k] v_k over n entries, where u_k = u + k * u_stride
// and a_k = a + (k - k0) * a_stride (stride 0: the same vector for every component), and w[k - k0] += W[k] when w is
// given: the inner loops of the backward sums, one multi-versioned call per row.
template <typename T>
inline __attribute__((always_inline)) void accumulate_row_impl(const T* __restrict__ W, int64_t k0, int64_t k1,
                                                               const T* __restrict__ u, const T* __restrict__ v,
                                                               T* __restrict__ a, T* __restrict__ b, T* w, int64_t n,
                                                               int64_t u_stride, int64_t a_stride) {
  for (int64_t k = k0; k < k1; ++k) {
    const T wk = W[k];
    if (wk == T(0)) continue;
    T* ak = a + (k - k0) * a_stride;
    T* bk = b + (k - k0) * a_stride;
    const T* uk = u + k * u_stride;
    const T* vk = v + k * u_stride;
    for (int64_t d = 0; d < n; ++d) {
      ak[d] += wk * uk[d];
      bk[d] += wk * vk[d];
    }
    if (w != nullptr) w[k - k0] += wk;
  }
}
DCGMM_MULTIVERSION void accumulate_row(const float* W, int64_t k0, int64_t k1, const float* u, const float* v, float* a,
                                       float* b, float* w, int64_t n, int64_t u_stride, int64_t a_stride) {
  accumulate_row_impl<float>(W, k0, k1, u, v, a, b, w, n, u_stride, a_stride);
}
DCGMM_MULTIVERSION void accumulate_row(const double* W, int64_t k0, int64_t k1, const double* u, const double* v,
                                       double* a, double* b, double* w, int64_t n, int64_t u_stride, int64_t a_stride) {
  accumulate_row_impl<double>(W, k0, k1, u, v, a, b, w, n, u_stride, a_stride);
}

template <typename T>
void weights(const Geometry& g, const T* resp, const T* g_resp, const T* g_score, bool is_mc, const T* Gm,
             const int32_t* kstar, T* W) {
  at::parallel_for(0, g.M, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      backward_weights_row(resp + r * g.K, g_resp ? g_resp + r * g.K : nullptr, g_score ? g_score[r] : T(0), is_mc,
                           Gm, int64_t(kstar[r]), g.K, W + r * g.K);
  });
}

// d log_pi, d mu, d sigma of GMM component o from its totals w, A1[d] = sum W x, A2[d] = sum W x^2 (design.md).
template <typename T>
inline void write_param_grads(int64_t o, int64_t D, double w, const double* A1, const double* A2, const T* mu,
                              const T* sigma, T* d_mu, T* d_sigma, T* d_log_pi) {
  d_log_pi[o] = T(w);
  for (int64_t d = 0; d < D; ++d) {
    const double m = mu[o * D + d], s = sigma[o * D + d];
    d_mu[o * D + d] = T(s * s * (A1[d] - w * m));
    d_sigma[o * D + d] = T(w / s - s * (A2[d] - 2.0 * m * A1[d] + w * m * m));
  }
}

// Parameter gradients. Tasks are (GMM, range of components); each walks its GMM's rows in fixed blocks of ROW_BLOCK,

// Parameter gradients. Tasks are (GMM, range of components); each walks its GMM's rows in fixed blocks of ROW_BLOCK,
// sums w, W^T x, W^T x^2 per block in T and adds the block to double totals. The per-(k, d) order of additions is
// the same for any split into tasks, so the result does not depend on the thread count.
template <typename T>
void param_grads(const Geometry& g, const T* x, const T* mu, const T* sigma, const T* W, T* d_mu, T* d_sigma,
                 T* d_log_pi) {
  const int64_t K = g.K, D = g.D, D_pad = g.D_pad, rows = rows_per_gmm(g);
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(K, (threads + g.G - 1) / g.G));
  const int64_t per = (K + chunks - 1) / chunks;
  at::parallel_for(0, g.G * chunks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> xb(D_pad, T(0)), x2(D_pad), a1(per * D_pad), a2(per * D_pad), w(per);
    std::vector<double> A1(per * D_pad), A2(per * D_pad), wt(per);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t gi = t / chunks, k0 = (t % chunks) * per, k1 = std::min(K, k0 + per), nk = k1 - k0;
      if (nk <= 0) continue;
      std::fill(A1.begin(), A1.end(), 0.0), std::fill(A2.begin(), A2.end(), 0.0), std::fill(wt.begin(), wt.end(), 0.0);
      for (int64_t j0 = 0; j0 < rows; j0 += ROW_BLOCK) {
        std::fill(a1.begin(), a1.end(), T(0)), std::fill(a2.begin(), a2.end(), T(0)), std::fill(w.begin(), w.end(), T(0));
        for (int64_t j = j0; j < std::min(rows, j0 + ROW_BLOCK); ++j) {
          const int64_t r = row_of(g, gi, j);
          const T* Wr = W + r * K;
          bool any = false;
          for (int64_t k = k0; k < k1; ++k) any |= Wr[k] != T(0);
          if (!any) continue;
          gather_row(x, g, r / g.P, r % g.P, xb.data());
          for (int64_t d = 0; d < D_pad; ++d) x2[d] = xb[d] * xb[d];
          accumulate_row(Wr, k0, k1, xb.data(), x2.data(), a1.data(), a2.data(), w.data(), D_pad, 0, D_pad);
        }
        for (int64_t i = 0; i < nk * D_pad; ++i) A1[i] += double(a1[i]), A2[i] += double(a2[i]);
        for (int64_t i = 0; i < nk; ++i) wt[i] += double(w[i]);
      }
      for (int64_t k = k0; k < k1; ++k) {
        write_param_grads(gi * K + k, D, wt[k - k0], A1.data() + (k - k0) * D_pad, A2.data() + (k - k0) * D_pad, mu,
                          sigma, d_mu, d_sigma, d_log_pi);
      }
    }
  });
}

// Large D: the same sums as BLAS GEMMs, A1_b = W_b^T X_b and A2_b = W_b^T X_b^2 per fixed block b of ROW_BLOCK rows
// (at::mm inside the parallel loop runs on one thread, so each block's result does not depend on the thread count),
// then the blocks added in block order in double. Partials take (blocks x K x D) floats. DCGMM_CPU_GEMM=0 turns it off.
template <typename T>
void param_grads_gemm(const Geometry& g, const T* x, const T* mu, const T* sigma, const T* W, T* d_mu, T* d_sigma,
                      T* d_log_pi) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const int64_t K = g.K, D = g.D, rows = rows_per_gmm(g), nb = (rows + ROW_BLOCK - 1) / ROW_BLOCK;
  const int64_t tasks = g.G * nb;
  std::vector<T> part1(tasks * K * D), part2(tasks * K * D), partw(tasks * K);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> xb(ROW_BLOCK * D), x2(ROW_BLOCK * D), wb(ROW_BLOCK * K), row(round_up(D, PAD_LANES));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t gi = t / nb, j0 = (t % nb) * ROW_BLOCK, n = std::min(ROW_BLOCK, rows - j0);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t r = row_of(g, gi, j0 + i);
        gather_row(x, g, r / g.P, r % g.P, row.data());
        for (int64_t d = 0; d < D; ++d) {
          xb[i * D + d] = row[d];
          x2[i * D + d] = row[d] * row[d];
        }
        std::memcpy(wb.data() + i * K, W + r * K, K * sizeof(T));
      }
      T* w = partw.data() + t * K;
      for (int64_t k = 0; k < K; ++k) w[k] = T(0);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t k = 0; k < K; ++k) w[k] += wb[i * K + k];
      // (K x D) = W_b^T (K x n) X_b (n x D), written straight into the block's partials
      auto wt = at::from_blob(wb.data(), {n, K}, opts).t();
      auto a1 = at::from_blob(part1.data() + t * K * D, {K, D}, opts);
      auto a2 = at::from_blob(part2.data() + t * K * D, {K, D}, opts);
      at::mm_out(a1, wt, at::from_blob(xb.data(), {n, D}, opts));
      at::mm_out(a2, wt, at::from_blob(x2.data(), {n, D}, opts));
    }
  });
  at::parallel_for(0, g.G * K, 1, [&](int64_t o0, int64_t o1) {
    std::vector<double> A1(D), A2(D);
    for (int64_t o = o0; o < o1; ++o) {  // o = gi * K + k
      const int64_t gi = o / K, k = o % K;
      double wk = 0.0;
      std::fill(A1.begin(), A1.end(), 0.0), std::fill(A2.begin(), A2.end(), 0.0);
      for (int64_t b = 0; b < nb; ++b) {  // block order
        const int64_t t = gi * nb + b;
        wk += double(partw[t * K + k]);
        const T* p1 = part1.data() + (t * K + k) * D;
        const T* p2 = part2.data() + (t * K + k) * D;
        for (int64_t d = 0; d < D; ++d) A1[d] += double(p1[d]), A2[d] += double(p2[d]);
      }
      write_param_grads(o, D, wk, A1.data(), A2.data(), mu, sigma, d_mu, d_sigma, d_log_pi);
    }
  });
}

// dpatch[d] += sum_k W[k] sigma^2[k, d] (mu[k, d] - x[d]) over the components with W[k] != 0, in the direct form:
// the expanded W S mu - x (W S) cancels by factors of 10-50 once mu sits on the data and sigma near its ceiling.
template <typename T>
inline __attribute__((always_inline)) void dx_row_impl(const T* __restrict__ W, int64_t K, const T* __restrict__ s2,
                                                       const T* __restrict__ mu, const T* __restrict__ x,
                                                       T* __restrict__ out, int64_t n) {
  for (int64_t k = 0; k < K; ++k) {
    const T wk = W[k];
    if (wk == T(0)) continue;
    const T* sk = s2 + k * n;
    const T* mk = mu + k * n;
    for (int64_t d = 0; d < n; ++d) out[d] += wk * sk[d] * (mk[d] - x[d]);
  }
}
DCGMM_MULTIVERSION void dx_row(const float* W, int64_t K, const float* s2, const float* mu, const float* x, float* out,
                               int64_t n) {
  dx_row_impl<float>(W, K, s2, mu, x, out, n);
}
DCGMM_MULTIVERSION void dx_row(const double* W, int64_t K, const double* s2, const double* mu, const double* x,
                               double* out, int64_t n) {
  dx_row_impl<double>(W, K, s2, mu, x, out, n);
}

// dx: per image, every patch's dpatch = sum_k W[k] sigma^2 (mu - x) folded onto its pixels (one task per image).
template <typename T>
void x_grad(const Geometry& g, const T* x, const T* mu_p, const T* s2_p, const T* W, T* dx) {
  const int64_t K = g.K, D_pad = g.D_pad, seg = g.kw * g.C;
  at::parallel_for(0, g.N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<T> xb(D_pad, T(0)), b1(D_pad);
    for (int64_t n = n0; n < n1; ++n) {
      T* img = dx + n * g.H * g.W * g.C;
      std::fill(img, img + g.H * g.W * g.C, T(0));
      for (int64_t p = 0; p < g.P; ++p) {
        const int64_t r = n * g.P + p, gi = g.independent ? p : 0;
        std::fill(b1.begin(), b1.end(), T(0));
        gather_row(x, g, n, p, xb.data());
        dx_row(W + r * K, K, s2_p + gi * K * D_pad, mu_p + gi * K * D_pad, xb.data(), b1.data(), D_pad);
        const int64_t oy = p / g.Wo, ox = p % g.Wo;
        T* base = img + ((oy * g.sh) * g.W + ox * g.sw) * g.C;
        for (int64_t ky = 0; ky < g.kh; ++ky) {
          T* dst = base + ky * g.W * g.C;
          for (int64_t i = 0; i < seg; ++i) dst[i] += b1[ky * seg + i];
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cgmm_bwd_cpu(
    const std::optional<at::Tensor>& g_resp_, const std::optional<at::Tensor>& g_score_, const at::Tensor& x_,
    const at::Tensor& mu_, const at::Tensor& sigma_, const at::Tensor& log_pi_, at::IntArrayRef kernel,
    at::IntArrayRef stride, c10::string_view loss, const std::optional<at::Tensor>& smoothing, const at::Tensor& resp_,
    const at::Tensor& lse, const at::Tensor& kstar_, bool need_x_grad) {
  check_params(x_, mu_, sigma_, log_pi_);
  const Geometry g = make_geometry(x_, mu_, kernel, stride);
  TORCH_CHECK(loss == "mc" || loss == "loglik", "loss: expected 'mc' or 'loglik', got ", loss);
  const bool is_mc = loss == "mc";
  auto x = x_.contiguous(), mu = mu_.contiguous(), sigma = sigma_.contiguous();
  auto resp = resp_.contiguous(), kstar = kstar_.contiguous();
  TORCH_CHECK(resp.numel() == g.M * g.K && resp.scalar_type() == x.scalar_type(), "resp: expected (N, H', W', K) = (",
              g.N, ", ", g.Ho, ", ", g.Wo, ", ", g.K, "), got ", resp.sizes());
  TORCH_CHECK(kstar.numel() == g.M && kstar.scalar_type() == at::kInt, "kstar: expected (N, H', W') int32, got ",
              kstar.sizes(), " ", kstar.scalar_type());
  at::Tensor g_resp, g_score, G;
  if (g_resp_.has_value() && g_resp_->defined()) {
    g_resp = g_resp_->contiguous().to(x.scalar_type());
    TORCH_CHECK(g_resp.numel() == g.M * g.K, "g_resp: expected the shape of resp, got ", g_resp.sizes());
  }
  if (g_score_.has_value() && g_score_->defined()) {
    g_score = g_score_->contiguous().to(x.scalar_type());
    TORCH_CHECK(g_score.numel() == g.M, "g_score: expected (N, H', W'), got ", g_score.sizes());
  }
  // the backward reads rows G[kstar, :] of the dense matrix: kron(Gy, Gx) of a factored smoothing (K^2, once)
  if (smoothing.has_value() && smoothing->defined()) G = dense_smoothing(checked_smoothing(*smoothing, g.K, x.scalar_type()));
  auto d_mu = new_output(mu.sizes(), mu.options()), d_sigma = new_output(sigma.sizes(), sigma.options());
  auto d_log_pi = new_output(log_pi_.sizes(), log_pi_.options());
  auto dx = need_x_grad ? new_output(x.sizes(), x.options()) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cgmm_bwd_cpu", [&] {
    using T = scalar_t;
    std::vector<T> W(g.M * g.K);
    weights<T>(g, resp.data_ptr<T>(), g_resp.defined() ? g_resp.data_ptr<T>() : nullptr,
               g_score.defined() ? g_score.data_ptr<T>() : nullptr, is_mc, G.defined() ? G.data_ptr<T>() : nullptr,
               kstar.data_ptr<int32_t>(), W.data());
    if (g.D >= GEMM_MIN_D && gemm_form_enabled())
      param_grads_gemm<T>(g, x.data_ptr<T>(), mu.data_ptr<T>(), sigma.data_ptr<T>(), W.data(), d_mu.data_ptr<T>(),
                          d_sigma.data_ptr<T>(), d_log_pi.data_ptr<T>());
    else
      param_grads<T>(g, x.data_ptr<T>(), mu.data_ptr<T>(), sigma.data_ptr<T>(), W.data(), d_mu.data_ptr<T>(),
                     d_sigma.data_ptr<T>(), d_log_pi.data_ptr<T>());
    if (need_x_grad) {
      const T* m = mu.data_ptr<T>();
      const T* s = sigma.data_ptr<T>();
      auto mu_p = padded<T>(m, g.G * g.K, g.D, g.D_pad, [&](int64_t i) { return m[i]; });
      auto s2 = padded<T>(s, g.G * g.K, g.D, g.D_pad, [&](int64_t i) { return s[i] * s[i]; });
      x_grad<T>(g, x.data_ptr<T>(), mu_p.data(), s2.data(), W.data(), dx.data_ptr<T>());
    }
  });
  return {dx, d_mu, d_sigma, d_log_pi};
}

// ---------------------------------------------------------------------------------------------------- helpers
at::Tensor patch_average_cpu(const at::Tensor& v_, at::IntArrayRef image_hw, at::IntArrayRef kernel,
                             at::IntArrayRef stride) {
  TORCH_CHECK(v_.dim() == 4, "v: expected (N, H', W', D), got ", v_.sizes());
  TORCH_CHECK(v_.scalar_type() == at::kFloat || v_.scalar_type() == at::kDouble, "v: expected float32 or float64");
  TORCH_CHECK(image_hw.size() == 2 && kernel.size() == 2 && stride.size() == 2, "image_hw, kernel, stride: 2 ints");
  const int64_t N = v_.size(0), Ho = v_.size(1), Wo = v_.size(2), D = v_.size(3);
  const int64_t H = image_hw[0], W = image_hw[1], kh = kernel[0], kw = kernel[1], sh = stride[0], sw = stride[1];
  TORCH_CHECK(kh >= 1 && kw >= 1 && sh >= 1 && sw >= 1 && kh <= H && kw <= W, "kernel, stride: bad for image_hw");
  TORCH_CHECK(D % (kh * kw) == 0, "v: D = ", D, " is not a multiple of kh*kw = ", kh * kw);
  TORCH_CHECK(Ho == (H - kh) / sh + 1 && Wo == (W - kw) / sw + 1, "v: (H', W') = (", Ho, ", ", Wo,
              ") does not match image_hw, kernel and stride");
  const int64_t C = D / (kh * kw), seg = kw * C;
  auto v = v_.contiguous();
  auto out = new_output({N, H, W, C}, v.options());
  std::vector<int32_t> count(H * W * C, 0);
  for (int64_t oy = 0; oy < Ho; ++oy)
    for (int64_t ox = 0; ox < Wo; ++ox)
      for (int64_t ky = 0; ky < kh; ++ky)
        for (int64_t i = 0; i < seg; ++i) ++count[((oy * sh + ky) * W + ox * sw) * C + i];
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "patch_average_cpu", [&] {
    using T = scalar_t;
    const T* vp = v.data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
      std::vector<double> acc(H * W * C);  // double sums: float32 rounds once (exact round trip of patches(x))
      for (int64_t n = n0; n < n1; ++n) {
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t p = 0; p < Ho * Wo; ++p) {
          const T* src = vp + (n * Ho * Wo + p) * D;
          const int64_t base = ((p / Wo) * sh * W + (p % Wo) * sw) * C;
          for (int64_t ky = 0; ky < kh; ++ky)
            for (int64_t i = 0; i < seg; ++i) acc[base + ky * W * C + i] += double(src[ky * seg + i]);
        }
        for (int64_t i = 0; i < H * W * C; ++i) op[n * H * W * C + i] = count[i] ? T(acc[i] / count[i]) : T(0);
      }
    });
  });
  return out;
}

at::Tensor sample_components_cpu(const at::Tensor& topdown_, const at::Tensor& mu_, const at::Tensor& sigma_,
                                 int64_t top_s, double divisor, const at::Tensor& u_, const at::Tensor& eps_,
                                 double sigma_ceiling) {
  TORCH_CHECK(topdown_.dim() == 4, "topdown: expected (N, H', W', K), got ", topdown_.sizes());
  const int64_t N = topdown_.size(0), Ho = topdown_.size(1), Wo = topdown_.size(2), K = topdown_.size(3);
  TORCH_CHECK(mu_.dim() == 2 || mu_.dim() == 3, "mu: expected (K, D) or (P, K, D), got ", mu_.sizes());
  TORCH_CHECK(mu_.size(-2) == K, "mu: expected K = ", K, " components, got ", mu_.sizes());
  const bool indep = mu_.dim() == 3;
  TORCH_CHECK(!indep || mu_.size(0) == Ho * Wo, "mu: independent mode needs P = ", Ho * Wo, " GMMs");
  TORCH_CHECK(sigma_.sizes() == mu_.sizes() && sigma_.scalar_type() == mu_.scalar_type(), "sigma: expected mu's shape");
  const int64_t D = mu_.size(-1), rows = N * Ho * Wo;
  TORCH_CHECK(u_.numel() == rows, "u: expected (N, H', W'), got ", u_.sizes());
  TORCH_CHECK(eps_.numel() == rows * D, "eps: expected (N, H', W', D), got ", eps_.sizes());
  auto mu = mu_.contiguous(), sigma = sigma_.contiguous();
  auto topdown = topdown_.contiguous().to(mu.scalar_type());
  auto u = u_.contiguous().to(mu.scalar_type()), eps = eps_.contiguous().to(mu.scalar_type());
  auto out = new_output({N, Ho, Wo, D}, mu.options());
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "sample_components_cpu", [&] {
    using T = scalar_t;
    const T *td = topdown.data_ptr<T>(), *m = mu.data_ptr<T>(), *s = sigma.data_ptr<T>();
    const T *up = u.data_ptr<T>(), *ep = eps.data_ptr<T>();
    T* op = out.data_ptr<T>();
    const T ceil_ = T(sigma_ceiling), div = T(divisor);
    at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
      std::vector<T> a(K), sorted(K);
      for (int64_t r = r0; r < r1; ++r) {
        const T* t = td + r * K;
        T* o = op + r * D;
        T total = T(0);
        for (int64_t k = 0; k < K; ++k) total += t[k];
        if (!(total > T(0))) {  // dead position (e.g. flagged by sparse un-pooling)
          std::fill(o, o + D, T(0));
          continue;
        }
        for (int64_t k = 0; k < K; ++k) a[k] = std::min(std::max(t[k], T(1e-6)), T(11000));
        if (top_s > 0 && top_s < K) {
          sorted = a;
          std::nth_element(sorted.begin(), sorted.begin() + (top_s - 1), sorted.end(), std::greater<T>());
          const T kth = sorted[top_s - 1];
          for (int64_t k = 0; k < K; ++k) a[k] = a[k] >= kth ? a[k] : T(0);
        }
        double run = 0.0;  // cumulative sums as torch.cumsum does on CPU: a double accumulator, rounded per entry
        for (int64_t k = 0; k < K; ++k) {
          run += double(a[k]);
          a[k] = T(run);
        }
        const T last = a[K - 1];
        int64_t k = 0;  // first k with cdf[k] > u: the number of cdf entries <= u
        while (k < K && a[k] / last <= up[r]) ++k;
        k = std::min(k, K - 1);
        const int64_t o_k = ((indep ? r % (Ho * Wo) : 0) * K + k) * D;
        for (int64_t d = 0; d < D; ++d) {
          const T sd = s[o_k + d];
          const T noisy = sd < ceil_ ? T(1) : T(0);
          o[d] = m[o_k + d] + ep[r * D + d] * noisy / (sd * div);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dcgmm, CPU, m) {
  m.impl("cgmm_fwd_cpp", &cgmm_fwd_cpu);
  m.impl("cgmm_bwd_cpp", &cgmm_bwd_cpu);
  m.impl("patch_average_cpp", &patch_average_cpu);
  m.impl("sample_components_cpp", &sample_components_cpu);
}

}  // namespace dcgmm
