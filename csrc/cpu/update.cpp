// The original update rule of one GMM layer as one pass over its parameters (design.md "Training"):
//   mu += s_mu g_mu,  sigma = clamp(sigma + s_sigma g_sigma, sigma_min, sigma_max),  log_pi += s_pi g_pi
// each a single-rounding multiply-add, as ATen's addcmul_ computes it (the eager and captured steps agree bit for
// bit), with the step guard's max |mu| and max |log_pi| after the update taken in the same pass (NaN propagates).
// One parallel region in place of the four elementwise ops and two reductions it replaces (each of which starts
// its own: a wake-up of the sleeping OpenMP workers under the PASSIVE wait policy).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../cgmm_math.h"
#include "isa.h"
#include "update_range.h"

namespace dcgmm {
namespace {

constexpr int64_t UPDATE_CHUNK = 1 << 15;


void check_pair(const char* name, const at::Tensor& p, const at::Tensor& g) {
  TORCH_CHECK(p.device().is_cpu() && p.is_contiguous(), name, ": expected a contiguous CPU tensor");
  TORCH_CHECK(g.sizes() == p.sizes() && g.scalar_type() == p.scalar_type(), "g_", name, ": expected the shape and ",
              "dtype of ", name, " ", p.sizes(), " ", p.scalar_type(), ", got ", g.sizes(), " ", g.scalar_type());
}

at::Tensor gmm_update_cpu(at::Tensor& mu, at::Tensor& sigma, at::Tensor& log_pi, const at::Tensor& g_mu_,
                          const at::Tensor& g_sigma_, const at::Tensor& g_pi_, const at::Tensor& s_mu,
                          const at::Tensor& s_sigma, const at::Tensor& s_pi, double sigma_min, double sigma_max) {
  check_pair("mu", mu, g_mu_), check_pair("sigma", sigma, g_sigma_), check_pair("log_pi", log_pi, g_pi_);
  TORCH_CHECK(sigma.sizes() == mu.sizes(), "sigma: expected the shape of mu");
  TORCH_CHECK(mu.scalar_type() == at::kFloat || mu.scalar_type() == at::kDouble, "mu: expected float32 or float64");
  for (const auto* s : {&s_mu, &s_sigma, &s_pi})
    TORCH_CHECK(s->numel() == 1, "step sizes: expected one value each, got ", s->sizes());
  auto g_mu = g_mu_.contiguous(), g_sigma = g_sigma_.contiguous(), g_pi = g_pi_.contiguous();
  auto out = at::empty({2}, mu.options());
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "gmm_update_cpu", [&] {
    using T = scalar_t;
    const T sm = s_mu.item<T>(), ss = s_sigma.item<T>(), sp = s_pi.item<T>();  // CPU scalars: no sync
    const T lo = T(sigma_min), hi = T(sigma_max);
    T *m = mu.data_ptr<T>(), *sg = sigma.data_ptr<T>(), *lp = log_pi.data_ptr<T>();
    const T *gm = g_mu.data_ptr<T>(), *gs = g_sigma.data_ptr<T>(), *gp = g_pi.data_ptr<T>();
    const int64_t n = mu.numel(), chunks = (n + UPDATE_CHUNK - 1) / UPDATE_CHUNK;
    std::vector<T> part(chunks, T(0));
    const Isa isa = cpu_isa();
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t i0 = c * UPDATE_CHUNK, len = std::min(UPDATE_CHUNK, n - i0);
        part[c] = update_range<T>(isa, m + i0, gm + i0, sm, len, false, lo, hi);
        update_range<T>(isa, sg + i0, gs + i0, ss, len, true, lo, hi);
      }
    });
    T mu_max = T(0);
    for (T v : part) mu_max = abs_max(mu_max, v);
    const T pi_max = update_range<T>(isa, lp, gp, sp, log_pi.numel(), false, lo, hi);
    out.data_ptr<T>()[0] = mu_max;
    out.data_ptr<T>()[1] = pi_max;
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dcgmm, CPU, m) { m.impl("gmm_update_cpp", &gmm_update_cpu); }

}  // namespace dcgmm
