// The fused training step of the CUDA backend (csrc/cuda/cgmm_small.cu) on CPU tensors, with the same arithmetic:
// the parameters packed per patch entry, one row at a time through cgmm_math.h's row_log_scores / row_epilogue, the
// step weights summed over the same fixed blocks of 64 rows (float in row order per block, then double in block
// order), and step_component's update. It is what lets the CPU tests check the CUDA kernels' maths against the
// float64 reference; training on CPU keeps the cpp backend's own forward/backward (faster there).
//
//   cgmm_step_partials_cpp(x, mu, sigma, log_pi, kernel, stride, loss, smoothing) -> (resp, score, lse, kstar, stats)
//   cgmm_step_finalize_cpp(stats, mu, sigma, pi_logits, log_pi, smoothing, scale, steps, sigma_min, sigma_max,
//                          pi_global) -> (mu, sigma, pi_logits, maxima)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <cstring>
#include <vector>

#include "../cgmm_math.h"
#include "output.h"

namespace dcgmm {
namespace {

constexpr int64_t ROWS = 64;  // csrc/cuda/common.cuh ROWS


struct StepGeo {
  int64_t N, H, W, C, kh, kw, sh, sw, Ho, Wo, P, M, D, K, Gc, nchunks, nblocks;
  bool independent;
};

StepGeo step_geo(const at::Tensor& x, const at::Tensor& mu, at::IntArrayRef kernel, at::IntArrayRef stride) {
  TORCH_CHECK(x.dim() == 4, "x: expected (N, H, W, C), got ", x.sizes());
  TORCH_CHECK(mu.dim() == 2 || mu.dim() == 3, "mu: expected (K, D) or (P, K, D), got ", mu.sizes());
  StepGeo g{};
  g.N = x.size(0), g.H = x.size(1), g.W = x.size(2), g.C = x.size(3);
  g.kh = kernel[0], g.kw = kernel[1], g.sh = stride[0], g.sw = stride[1];
  TORCH_CHECK(g.kh <= g.H && g.kw <= g.W, "kernel: larger than the input");
  g.Ho = (g.H - g.kh) / g.sh + 1, g.Wo = (g.W - g.kw) / g.sw + 1, g.P = g.Ho * g.Wo, g.M = g.N * g.P;
  g.D = g.kh * g.kw * g.C, g.K = mu.size(-2), g.independent = mu.dim() == 3, g.Gc = g.independent ? g.P : 1;
  TORCH_CHECK(mu.size(-1) == g.D, "mu: expected D = ", g.D, ", got ", mu.sizes());
  TORCH_CHECK(g.K <= 128, "K: the fused step takes at most 128 components, got ", g.K);
  g.nchunks = (g.N + ROWS - 1) / ROWS;
  g.nblocks = g.independent ? g.nchunks * g.P : (g.M + ROWS - 1) / ROWS;
  return g;
}

template <int KMAX, typename T>
void partials_impl(const StepGeo& g, const T* x, const T* mu, const T* sigma, const T* log_pi, bool is_mc, const T* G,
                   int64_t sep_n, T* resp, T* score, T* lse, int32_t* kstar, double* stats) {
  const int64_t K = g.K, D = g.D, E = 1 + 2 * D, kwc = g.kw * g.C, sH = g.W * g.C, sN = g.H * sH;
  std::vector<T> prm(g.Gc * D * KMAX * 2, T(0)), c(g.Gc * KMAX, T(0));
  for (int64_t gi = 0; gi < g.Gc; ++gi)
    for (int64_t k = 0; k < K; ++k) {
      double acc = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        const int64_t src = (gi * K + k) * D + d, dst = ((gi * D + d) * KMAX + k) * 2;
        prm[dst] = mu[src], prm[dst + 1] = sigma[src];
        acc += std::log(double(sigma[src]));
      }
      c[gi * KMAX + k] = T(double(log_pi[gi * K + k]) + acc);
    }
  const T half = T(0.5 * double(D) * 1.8378770664093453);
  std::vector<T> partials(g.nblocks * K * E);
  at::parallel_for(0, g.nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> Ws(ROWS * K), Xs(ROWS * D), tmp(K);
    for (int64_t b = b0; b < b1; ++b) {
      // block b's rows, in the CUDA grid's order: independent (chunk, p) = (b / P, b % P); shared consecutive rows
      const int64_t chunk = g.independent ? b / g.P : b, p_fixed = g.independent ? b % g.P : 0;
      const int64_t gi = g.independent ? p_fixed : 0;
      for (int64_t t = 0; t < ROWS; ++t) {
        int64_t n, p, r;
        bool valid;
        if (g.independent) {
          n = chunk * ROWS + t, p = p_fixed, valid = n < g.N, r = n * g.P + p;
        } else {
          r = chunk * ROWS + t, valid = r < g.M, n = valid ? r / g.P : 0, p = valid ? r - n * g.P : 0;
        }
        for (int64_t k = 0; k < K; ++k) Ws[t * K + k] = T(0);
        for (int64_t d = 0; d < D; ++d) Xs[t * D + d] = T(0);
        if (!valid) continue;
        const int64_t oy = p / g.Wo, ox = p - oy * g.Wo;
        const T* xp = x + n * sN + oy * g.sh * sH + ox * g.sw * g.C;
        T ls[KMAX];
        row_log_scores<KMAX, T>(xp, sH, g.kh, kwc, prm.data() + gi * D * KMAX * 2, c.data() + gi * KMAX, K, ls);
        int32_t ks = 0;
        row_epilogue<KMAX, T>(ls, K, is_mc, G, sep_n, tmp.data(), 1, half, resp + r * K, score[r], lse[r], ks);
        kstar[r] = ks;
        for (int64_t k = 0; k < K; ++k) Ws[t * K + k] = is_mc ? (k == ks ? T(1) : T(0)) : resp[r * K + k];
        for (int64_t d = 0; d < D; ++d) Xs[t * D + d] = xp[(d / kwc) * sH + d % kwc];
      }
      T* out = partials.data() + b * K * E;  // block index b = chunk * Gc + gi, as the CUDA kernels write it
      for (int64_t k = 0; k < K; ++k) {
        T a = T(0);
        for (int64_t t = 0; t < ROWS; ++t) a += Ws[t * K + k];
        out[k * E] = a;
        for (int64_t d = 0; d < D; ++d) {
          const T m = prm[((gi * D + d) * KMAX + k) * 2];
          T a1 = T(0), a2 = T(0);
          for (int64_t t = 0; t < ROWS; ++t) {
            const T w = Ws[t * K + k];
            if (w != T(0)) {
              const T diff = Xs[t * D + d] - m;
              a1 = math_fma(w, diff, a1);
              a2 = math_fma(w * diff, diff, a2);
            }
          }
          out[k * E + 1 + d] = a1, out[k * E + 1 + D + d] = a2;
        }
      }
    }
  });
  const int64_t nb = g.independent ? g.nchunks : g.nblocks;
  for (int64_t i = 0; i < g.Gc * K * E; ++i) {
    const int64_t gi = i / (K * E), ke = i - gi * K * E;
    double s = 0.0;
    for (int64_t b = 0; b < nb; ++b) s += double(partials[(b * g.Gc + gi) * K * E + ke]);
    stats[i] = s;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> step_partials_cpu(
    const at::Tensor& x_, const at::Tensor& mu_, const at::Tensor& sigma_, const at::Tensor& log_pi_,
    at::IntArrayRef kernel, at::IntArrayRef stride, c10::string_view loss, const c10::optional<at::Tensor>& smoothing) {
  const StepGeo g = step_geo(x_, mu_, kernel, stride);
  TORCH_CHECK(loss == "mc" || loss == "loglik", "loss: expected 'mc' or 'loglik'");
  const bool is_mc = loss == "mc";
  auto x = x_.contiguous(), mu = mu_.contiguous(), sigma = sigma_.contiguous(), log_pi = log_pi_.contiguous();
  at::Tensor G;  // the factors (2, n, n) as they are (the separable smoothing), or the dense (K, K) G
  int64_t sep_n = 0;
  if (is_mc && smoothing.has_value()) {
    G = smoothing->to(x.scalar_type()).contiguous();
    if (G.dim() == 3) {
      sep_n = G.size(-1);
      TORCH_CHECK(G.size(0) == 2 && G.size(1) == sep_n && sep_n * sep_n == g.K, "smoothing: expected factors (2, n, "
                  "n) with n * n = K = ", g.K, ", got ", G.sizes());
    }
  }
  auto opts = x.options();
  auto resp = new_output({g.N, g.Ho, g.Wo, g.K}, opts), score = new_output({g.N, g.Ho, g.Wo}, opts);
  auto lse = new_output({g.N, g.Ho, g.Wo}, opts), kstar = new_output({g.N, g.Ho, g.Wo}, opts.dtype(at::kInt));
  auto stats = new_output({g.Gc, g.K, 1 + 2 * g.D}, opts.dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cgmm_step_partials_cpu", [&] {
    using T = scalar_t;
    auto run = [&](auto kmax) {
      partials_impl<decltype(kmax)::value, T>(g, x.data_ptr<T>(), mu.data_ptr<T>(), sigma.data_ptr<T>(),
                                             log_pi.data_ptr<T>(), is_mc, G.defined() ? G.data_ptr<T>() : nullptr,
                                             sep_n, resp.data_ptr<T>(), score.data_ptr<T>(), lse.data_ptr<T>(),
                                             kstar.data_ptr<int32_t>(), stats.data_ptr<double>());
    };
    if (g.K <= 32) run(std::integral_constant<int, 32>{});
    else if (g.K <= 64) run(std::integral_constant<int, 64>{});
    else run(std::integral_constant<int, 128>{});
  });
  return {resp, score, lse, kstar, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> step_finalize_cpu(
    const at::Tensor& stats_, const at::Tensor& mu_, const at::Tensor& sigma_, const at::Tensor& pi_,
    const at::Tensor& log_pi_, const c10::optional<at::Tensor>& smoothing, double scale, const at::Tensor& steps_,
    double sigma_min, double sigma_max, bool pi_global) {
  auto mu = mu_.contiguous(), sigma = sigma_.contiguous(), pi = pi_.contiguous(), log_pi = log_pi_.contiguous();
  auto stats = stats_.to(at::kDouble).contiguous();
  const int64_t K = mu.size(-2), D = mu.size(-1), Gc = mu.dim() == 3 ? mu.size(0) : 1;
  TORCH_CHECK(stats.numel() == Gc * K * (1 + 2 * D), "stats: expected (", Gc, ", ", K, ", ", 1 + 2 * D, ")");
  at::Tensor G;
  if (smoothing.has_value()) {
    G = smoothing->dim() == 3 ? at::kron((*smoothing)[0], (*smoothing)[1]) : *smoothing;
    G = G.to(mu.scalar_type()).contiguous();
  }
  auto new_mu = new_output(mu.sizes(), mu.options()), new_sigma = new_output(sigma.sizes(), sigma.options());
  auto new_pi = new_output(pi.sizes(), pi.options()), maxima = new_output({2}, mu.options());
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "cgmm_step_finalize_cpu", [&] {
    using T = scalar_t;
    auto steps = steps_.to(mu.scalar_type()).contiguous();
    const T* st = steps.data_ptr<T>();
    std::vector<double> glp(Gc * K);
    const T *m = mu.data_ptr<T>(), *s = sigma.data_ptr<T>(), *Gp = G.defined() ? G.data_ptr<T>() : nullptr;
    T *nm = new_mu.data_ptr<T>(), *ns = new_sigma.data_ptr<T>();
    at::parallel_for(0, Gc * K, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t gi = i / K, k = i - gi * K;
        step_component<T>(stats.data_ptr<double>() + gi * K * (1 + 2 * D), m + gi * K * D, s + gi * K * D, Gp, K, D,
                          k, scale, st[0], st[1], T(sigma_min), T(sigma_max), nm + i * D, ns + i * D, glp.data() + i);
      }
    });
    const bool global = pi_global || mu.dim() == 2;
    const T *pl = pi.data_ptr<T>(), *lp = log_pi.data_ptr<T>();
    T* np = new_pi.data_ptr<T>();
    for (int64_t gi = 0; gi < (global ? 1 : Gc); ++gi) {
      const int64_t base = global ? 0 : gi * K, count = global ? Gc * K : K;
      double total = 0.0;
      for (int64_t j = 0; j < count; ++j) total += glp[base + j];
      for (int64_t j = base; j < base + count; ++j)
        np[j] = math_fma(T(glp[j] - std::exp(double(lp[j])) * total), st[2], pl[j]);
    }
    maxima.data_ptr<T>()[0] = new_mu.abs().max().item<T>();
    maxima.data_ptr<T>()[1] = new_pi.abs().max().item<T>();
  });
  return {new_mu, new_sigma, new_pi, maxima};
}

}  // namespace

TORCH_LIBRARY_IMPL(dcgmm, CPU, m) {
  m.impl("cgmm_step_partials_cpp", &step_partials_cpu);
  m.impl("cgmm_step_finalize_cpp", &step_finalize_cpu);
}

}  // namespace dcgmm
