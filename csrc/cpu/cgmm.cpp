// Fused C++ CPU kernels of the cGMM op and its helpers (design.md "The cGMM op", "Helper ops").
//
// cgmm_fwd_cpu: blocks of one register of patch rows of one GMM (16, 8 or 4), gathered straight from the NHWC input
//   (implicit im2col, never the patch matrix) into the vector lanes, two blocks per task sharing each parameter
//   load; log scores by the direct form, the smoothing (separable factors or a dense G), max / argmax, softmax and
//   logsumexp all on the block in registers and L1, written once into resp, score, lse and kstar: one parallel
//   region per forward (shared layers with D, K >= 64 take the log scores from GEMMs first).
// cgmm_bwd_cpu: the parameter gradients as centred sums over fixed blocks of rows (float sums per block added in
//   block order to double totals: deterministic and independent of the thread count). The mc loss with no
//   gradient on resp (a training step) sums each row into its winner alone and multiplies by G^T once; otherwise
//   the backward weights W of each row are computed from the saved resp and kstar where they are used and a
//   register-tiled micro-kernel sums them. The x gradient is folded back to pixels one image per task (no races).
// cgmm_fwd_grads_cpu: a training step's forward and parameter gradients in one pass (the winner sums taken from each
//   forward task's rows while they are in cache), bit for bit cgmm_fwd_cpu then cgmm_bwd_cpu.
// patch_average_cpu, sample_components_cpu: the sampling helpers.
// Includes ATen and torch/library.h only (torch/extension.h costs ~23 s per file).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../cgmm_math.h"
#include "isa.h"
#include "output.h"
#include "update_range.h"

namespace dcgmm {
namespace {

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

// Calls f(src, o, len) for the (at most kh) contiguous input segments that hold entries [d0, d0 + dn) of patch row
// (n, p) of the NHWC input, d in (ky, kx, c) order: src[0 .. len) are entries d0 + o .. d0 + o + len - 1.
template <typename T, typename F>
inline __attribute__((always_inline)) void for_each_segment(const T* x, const Geometry& g, int64_t n, int64_t p,
                                                            int64_t d0, int64_t dn, F&& f) {
  const int64_t oy = p / g.Wo, ox = p % g.Wo, seg = g.kw * g.C;
  const T* base = x + ((n * g.H + oy * g.sh) * g.W + ox * g.sw) * g.C;
  int64_t ky = d0 / seg, i = d0 - ky * seg;  // one division per row; then segment by segment
  for (int64_t d = d0, end = d0 + dn; d < end; ++ky, i = 0) {
    const int64_t len = std::min(seg - i, end - d);
    f(base + ky * g.W * g.C + i, d - d0, len);
    d += len;
  }
}

// Entries [d0, d0 + dn) of patch row (n, p) into the row buffer dst[d - d0] (the forward's rows-in-lanes blocks
// gather their own: forward_block_impl).
template <typename T>
inline __attribute__((always_inline)) void gather_range(const T* x, const Geometry& g, int64_t n, int64_t p,
                                                        int64_t d0, int64_t dn, T* dst) {
  for_each_segment(x, g, n, p, d0, dn, [&](const T* src, int64_t o, int64_t len) {
    T* out = dst + o;
    if (len > 8)  // long segments: one library copy (short ones, 3x3 one-channel: a loop is cheaper)
      std::memcpy(out, src, len * sizeof(T));
    else
      for (int64_t l = 0; l < len; ++l) out[l] = src[l];
  });
}


// Rows of GMM gi, in the order every kernel walks them: all rows (shared) or n = 0..N-1 at position gi (independent).
inline int64_t rows_per_gmm(const Geometry& g) { return g.independent ? g.N : g.M; }
inline int64_t row_of(const Geometry& g, int64_t gi, int64_t j) { return g.independent ? j * g.P + gi : j; }

// ---------------------------------------------------------------------------------------------------- forward
// Rows in the vector lanes: a block of L patch rows of one GMM (L = RB / 4: 16 with AVX-512, 8 with AVX2, 4 on the
// baseline, one register of floats; isa.h) is gathered transposed, xt (D, L), and every step of the forward works on
// all L rows at once with no horizontal sums and no padding of D or K:
//   log scores  lt[k] = c[k] - 1/2 sum_d (sigma[k, d] (xt[d] - mu[k, d]))^2   (sum over d in order, per lane)
//   smoothing   sm = G lt (separable factors: Gy L Gx^T on the sqrt(K) x sqrt(K) grid, or a dense G)
//   max/argmax of the ranked values, softmax and logsumexp of lt (a vectorised exp)
// then scattered into resp, score, lse, kstar. One parallel region per forward; the parameters are read in their
// (G, K, D) layout (no per-call copies). Each lane's arithmetic is the same for every L and thread count.
// The vector types are GCC vector extensions.
constexpr int64_t block_rows(int register_bytes) { return register_bytes / 4; }

template <int L>
struct RowInts {
  typedef int32_t type __attribute__((vector_size(L * sizeof(int32_t))));
};
// The vector helpers below are always inlined into the per-instruction-set kernels: the ABI note about passing
// 64-byte vectors by value does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

// exp of L floats: Cephes' expf (range reduction by ln 2 in two parts, degree-6 polynomial, exponent by integer
// add), within 2 ulp of expf; exp(x) = 0 below -87 (true value < 1.7e-38), +inf above 88.37, NaN stays NaN.
template <int L>
inline __attribute__((always_inline)) typename RowVec<float, L>::type vexp_f(typename RowVec<float, L>::type x) {
  using VF = typename RowVec<float, L>::type;
  using VI = typename RowInts<L>::type;
  const VF zero = {}, lo = zero - 87.0f, hi = zero + 88.3762626647949f, magic = zero + 12582912.0f;
  VF xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const VF t = xc * 1.44269504088896341f + magic;  // round(x log2 e) in the low mantissa bits
  const VF n = t - magic;
  const VI ni = (VI)t - (VI)magic;
  VF r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  VF p = zero + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const VF y = p * (r * r) + r + 1.0f;
  VF res = (VF)((VI)y + (ni << 23));
  res = x < lo ? zero : res;
  res = x > hi ? zero + std::numeric_limits<float>::infinity() : res;
  return x != x ? x : res;
}
// log of L floats in [1e-30, 3e38] (Cephes' logf: frexp by integer ops, degree-8 polynomial on [sqrt(1/2) - 1,
// sqrt(2) - 1], ln 2 in two parts), within 2 ulp of logf. A lane outside that range (0, denormal, inf, NaN) sends
// all L to std::log.
template <int L>
inline __attribute__((always_inline)) typename RowVec<float, L>::type vlog_f(typename RowVec<float, L>::type x) {
  using VF = typename RowVec<float, L>::type;
  using VI = typename RowInts<L>::type;
  const VF zero = {};
  bool plain = true;
  for (int64_t i = 0; i < L; ++i) plain &= (x[i] >= 1e-30f) & (x[i] <= 3e38f);
  if (!plain) {
    for (int64_t i = 0; i < L; ++i) x[i] = std::log(x[i]);
    return x;
  }
  const VI bits = (VI)x;
  VI e = ((bits >> 23) & 0xff) - 126;                       // x = m 2^e, m in [0.5, 1)
  VF m = (VF)((bits & 0x807fffff) | 0x3f000000);
  const auto small = m < 0.707106781186547524f;             // m < sqrt(1/2): m -> 2m, e -> e - 1
  e = small ? e - 1 : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const VF ef = __builtin_convertvector(e, VF);
  const VF z = m * m;
  VF y = zero + 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + ef * -2.12194440e-4f;
  y = y - 0.5f * z;
  return m + y + ef * 0.693359375f;
}
template <typename T, int L>  // float64 (the tests' path): the library's exp and log per lane
inline __attribute__((always_inline)) typename RowVec<T, L>::type vexp(typename RowVec<T, L>::type x) {
  if constexpr (std::is_same<T, float>::value) {
    return vexp_f<L>(x);
  } else {
    for (int64_t i = 0; i < L; ++i) x[i] = std::exp(x[i]);
    return x;
  }
}
template <typename T, int L>
inline __attribute__((always_inline)) typename RowVec<T, L>::type vlog(typename RowVec<T, L>::type x) {
  if constexpr (std::is_same<T, float>::value) {
    return vlog_f<L>(x);
  } else {
    for (int64_t i = 0; i < L; ++i) x[i] = std::log(x[i]);
    return x;
  }
}


// lt (NR, K, L) = log scores of NR blocks' rows xt (NR, D, L) against the GMM's (K, D) parameters, KB components
// at once: one load of xt[r][d] feeds KB components and one broadcast of mu[k, d], sigma[k, d] feeds NR blocks
// (register tile NR x KB; preset D's second layer, 80 KB of parameters per GMM, streams them from L2 once per NR
// blocks: its forward 6.7 -> 4.5 ms with NR = 2 on AVX2). Each lane sums over d in order: the same bits for any NR.
template <typename T, int L, int NR>
inline __attribute__((always_inline)) void block_scores_impl(const T* __restrict__ xt, int64_t D,
                                                             const T* __restrict__ mu, const T* __restrict__ sig,
                                                             const T* __restrict__ c, int64_t K, T* __restrict__ lt) {
  using V = typename RowVec<T, L>::type;
  constexpr int KB = 4;
  int64_t k = 0;
  for (; k + KB <= K; k += KB) {
    V acc[NR][KB];
    for (int r = 0; r < NR; ++r)
      for (int j = 0; j < KB; ++j) acc[r][j] = V{} * T(0);
    const T* m = mu + k * D;
    const T* s = sig + k * D;
    for (int64_t d = 0; d < D; ++d) {
      V xv[NR];
      for (int r = 0; r < NR; ++r) xv[r] = load_rv<T, L>(xt + (r * D + d) * L);
      for (int j = 0; j < KB; ++j) {
        const T mj = m[j * D + d], sj = s[j * D + d];
        for (int r = 0; r < NR; ++r) {
          const V t = (xv[r] - mj) * sj;
          acc[r][j] += t * t;
        }
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int j = 0; j < KB; ++j) store_rv<T, L>(lt + (r * K + k + j) * L, c[k + j] - T(0.5) * acc[r][j]);
  }
  for (; k < K; ++k) {
    V acc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = V{} * T(0);
    for (int64_t d = 0; d < D; ++d) {
      const T mk = mu[k * D + d], sk = sig[k * D + d];
      for (int r = 0; r < NR; ++r) {
        const V t = (load_rv<T, L>(xt + (r * D + d) * L) - mk) * sk;
        acc[r] += t * t;
      }
    }
    for (int r = 0; r < NR; ++r) store_rv<T, L>(lt + (r * K + k) * L, c[k] - T(0.5) * acc[r]);
  }
}

// The separable smoothing: the K = n * n log scores of a lane as an n x n grid L (k = ky * n + kx) give
// out = Gy L Gx^T, 2 K n multiply-adds instead of K^2. Both passes are "row of the output += weight * row of the
// input": for each output row a, the n accumulators of its columns c stay in registers and each loaded input row
// feeds all n of them (n independent chains, not one chain of n dependent multiply-adds per entry). The sums run
// over b in order from 0 in both forms below: the same bits.
template <typename T, int N, int L>
inline __attribute__((always_inline)) void smooth_pass_n(const T* __restrict__ in, const T* __restrict__ w,
                                                         bool w_by_row, T* __restrict__ out) {
  using V = typename RowVec<T, L>::type;
  for (int a = 0; a < N; ++a) {
    V acc[N];
    for (int c = 0; c < N; ++c) acc[c] = V{} * T(0);
    for (int b = 0; b < N; ++b) {
      if (w_by_row) {  // tmp[a, c] = sum_b Gx[c, b] L[a, b]: input entry (a, b) into every column c
        const V l = load_rv<T, L>(in + (a * N + b) * L);
        for (int c = 0; c < N; ++c) acc[c] += w[c * N + b] * l;
      } else {  // out[a, c] = sum_b Gy[a, b] tmp[b, c]: input row b into every column c
        const T wab = w[a * N + b];
        for (int c = 0; c < N; ++c) acc[c] += wab * load_rv<T, L>(in + (b * N + c) * L);
      }
    }
    for (int c = 0; c < N; ++c) store_rv<T, L>(out + (a * N + c) * L, acc[c]);
  }
}

template <typename T, int N, int L>
inline __attribute__((always_inline)) void smooth_factored_n(const T* __restrict__ lt, const T* __restrict__ gy,
                                                             const T* __restrict__ gx, T* __restrict__ tmp,
                                                             T* __restrict__ out) {
  smooth_pass_n<T, N, L>(lt, gx, true, tmp);
  smooth_pass_n<T, N, L>(tmp, gy, false, out);
}

template <typename T, int L>
inline __attribute__((always_inline)) void smooth_factored_impl(const T* __restrict__ lt, const T* __restrict__ gy,
                                                                const T* __restrict__ gx, int64_t n,
                                                                T* __restrict__ tmp, T* __restrict__ out) {
  using V = typename RowVec<T, L>::type;
  switch (n) {  // the grids of the presets (K = 16 .. 144) with their accumulators in registers
    case 3: return smooth_factored_n<T, 3, L>(lt, gy, gx, tmp, out);
    case 4: return smooth_factored_n<T, 4, L>(lt, gy, gx, tmp, out);
    case 5: return smooth_factored_n<T, 5, L>(lt, gy, gx, tmp, out);
    case 6: return smooth_factored_n<T, 6, L>(lt, gy, gx, tmp, out);
    case 7: return smooth_factored_n<T, 7, L>(lt, gy, gx, tmp, out);
    case 8: return smooth_factored_n<T, 8, L>(lt, gy, gx, tmp, out);
    case 10: return smooth_factored_n<T, 10, L>(lt, gy, gx, tmp, out);
    case 11: return smooth_factored_n<T, 11, L>(lt, gy, gx, tmp, out);
    case 12: return smooth_factored_n<T, 12, L>(lt, gy, gx, tmp, out);
    default: break;
  }
  for (int64_t a = 0; a < n; ++a)  // tmp[a, c] = sum_b Gx[c, b] L[a, b]
    for (int64_t c = 0; c < n; ++c) {
      V acc = V{} * T(0);
      for (int64_t b = 0; b < n; ++b) acc += gx[c * n + b] * load_rv<T, L>(lt + (a * n + b) * L);
      store_rv<T, L>(tmp + (a * n + c) * L, acc);
    }
  for (int64_t a = 0; a < n; ++a)  // out[a, c] = sum_b Gy[a, b] tmp[b, c]
    for (int64_t c = 0; c < n; ++c) {
      V acc = V{} * T(0);
      for (int64_t b = 0; b < n; ++b) acc += gy[a * n + b] * load_rv<T, L>(tmp + (b * n + c) * L);
      store_rv<T, L>(out + (a * n + c) * L, acc);
    }
}

template <typename T, int L>
inline __attribute__((always_inline)) void smooth_dense_impl(const T* __restrict__ lt, const T* __restrict__ G,
                                                             int64_t K, T* __restrict__ out) {
  using V = typename RowVec<T, L>::type;
  constexpr int AB = 8;  // outputs per pass: independent chains, one load of lt[b] feeds AB of them
  int64_t a = 0;
  for (; a + AB <= K; a += AB) {
    V acc[AB];
    for (int j = 0; j < AB; ++j) acc[j] = V{} * T(0);
    for (int64_t b = 0; b < K; ++b) {
      const V l = load_rv<T, L>(lt + b * L);
      for (int j = 0; j < AB; ++j) acc[j] += G[(a + j) * K + b] * l;
    }
    for (int j = 0; j < AB; ++j) store_rv<T, L>(out + (a + j) * L, acc[j]);
  }
  for (; a < K; ++a) {
    V acc = V{} * T(0);
    for (int64_t b = 0; b < K; ++b) acc += G[a * K + b] * load_rv<T, L>(lt + b * L);
    store_rv<T, L>(out + a * L, acc);
  }
}

// v[j][i] -> v[i][j] for an L x L block in registers: log2(L) stages, each swapping the off-diagonal H x H blocks
// of every 2H x 2H block by two-input shuffles with constant masks (L = 8: 24 shuffles for 64 values; GCC's own
// vectorisation of the strided copy it replaces took ~20% of preset D's first-layer forward on AVX2).
template <typename T, int L>
struct ShuffleMask {
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> E;
  typedef E type __attribute__((vector_size(L * sizeof(E))));
  // lanes of concat(a, b): first output (j & H) == 0 ? a[j] : b[j - H]; second (j & H) == 0 ? a[j + H] : b[j]
  template <int H, int... J>
  static inline __attribute__((always_inline)) void masks(std::integer_sequence<int, J...>, type& lo, type& hi) {
    lo = type{E((J & H) == 0 ? J : L + J - H)...};
    hi = type{E((J & H) == 0 ? J + H : L + J)...};
  }
};

template <typename T, int L, int H>
inline __attribute__((always_inline)) void transpose_stage(typename RowVec<T, L>::type (&v)[L]) {
  typename ShuffleMask<T, L>::type lo, hi;
  ShuffleMask<T, L>::template masks<H>(std::make_integer_sequence<int, L>{}, lo, hi);
  for (int r = 0; r < L; ++r)
    if ((r & H) == 0) {
      const auto a = v[r], b = v[r + H];
      v[r] = __builtin_shuffle(a, b, lo);
      v[r + H] = __builtin_shuffle(a, b, hi);
    }
  if constexpr (H > 1) transpose_stage<T, L, H / 2>(v);
}

template <typename T, int L>
inline __attribute__((always_inline)) void transpose_rv(typename RowVec<T, L>::type (&v)[L]) {
  transpose_stage<T, L, L / 2>(v);
}

// Per lane: first maximum and its index of ranked (K, L); softmax of lt in place and its logsumexp.
template <typename T, int L>
inline __attribute__((always_inline)) void block_finish_impl(T* __restrict__ lt, const T* ranked, int64_t K,
                                                             T* __restrict__ lse, T* __restrict__ best,
                                                             T* __restrict__ kbest) {
  using V = typename RowVec<T, L>::type;
  V bv = load_rv<T, L>(ranked), kv = V{} * T(0), mx = load_rv<T, L>(lt);
  for (int64_t k = 1; k < K; ++k) {
    const V r = load_rv<T, L>(ranked + k * L), l = load_rv<T, L>(lt + k * L);
    const auto gt = r > bv;  // first maximum: ties (and NaN) keep the lowest index
    bv = gt ? r : bv;
    kv = gt ? V{} + T(k) : kv;
    mx = l > mx ? l : mx;
  }
  V sum = V{} * T(0);
  for (int64_t k = 0; k < K; ++k) {
    const V e = vexp<T, L>(load_rv<T, L>(lt + k * L) - mx);
    store_rv<T, L>(lt + k * L, e);
    sum += e;
  }
  const V inv = T(1) / sum;
  for (int64_t k = 0; k < K; ++k) store_rv<T, L>(lt + k * L, load_rv<T, L>(lt + k * L) * inv);
  store_rv<T, L>(lse, mx + vlog<T, L>(sum));
  store_rv<T, L>(best, bv);
  store_rv<T, L>(kbest, kv);
}


// Where the forward's inputs and outputs are: ls (M, K) precomputed log scores (the GEMM form) or null; G a dense
// (K, K) smoothing, or factors (2, n, n) when n > 0, or null.
template <typename T>
struct ForwardArgs {
  const T *x, *mu, *sig, *log_pi, *ls, *G;
  int64_t n;
  bool is_mc;
  T *resp, *score, *lse;
  int32_t* kstar;
};

// c[k] = log_pi[k] + sum_d log sigma[k, d] of one GMM, in double, with one log per component: the product of the
// sigmas kept as mantissa M in [0.5, 1) and binary exponent E (frexp after every chunk of 32 entries, whose plain
// product stays inside [1e-300, 1e300] unless a sigma is extreme; such a chunk folds its entries one by one), then
// log M + E ln 2. Closer to the exact sum than float logs (each fold rounds once, relative 1e-16), and KB components
// at a time so that their product chains overlap (one chain of D dependent multiplies per component and a log per
// 32 entries were ~0.9 ms of CPU per preset D step, perf on one thread; what remains is mostly the step's first
// reads of the sigmas). A sigma of 0, inf or NaN still gives -inf, inf or NaN.
constexpr int64_t LOG_CHUNK = 32;

struct LogProduct {
  double m = 1.0;
  int64_t e = 0;
  inline void fold(double p) {
    int pe = 0, me = 0;
    m = std::frexp(m * std::frexp(p, &pe), &me);
    e += int64_t(pe) + me;
  }
  inline double log() const { return std::log(m) + double(e) * M_LN2; }
};

template <typename T, int KB>
inline void gmm_constants_kb(const T* log_pi, const T* sig, int64_t D, T* c) {
  LogProduct lp[KB];
  for (int64_t d0 = 0; d0 < D; d0 += LOG_CHUNK) {
    const int64_t d1 = std::min(D, d0 + LOG_CHUNK);
    double p[KB];
    for (int j = 0; j < KB; ++j) p[j] = 1.0;
    for (int64_t d = d0; d < d1; ++d)
      for (int j = 0; j < KB; ++j) p[j] *= double(sig[j * D + d]);
    for (int j = 0; j < KB; ++j) {
      if (p[j] > 1e-300 && p[j] < 1e300) {
        lp[j].fold(p[j]);
      } else {
        for (int64_t d = d0; d < d1; ++d) lp[j].fold(double(sig[j * D + d]));
      }
    }
  }
  for (int j = 0; j < KB; ++j) c[j] = T(double(log_pi[j]) + lp[j].log());
}

template <typename T>
void gmm_constants(const T* log_pi, const T* sig, int64_t K, int64_t D, T* c) {
  constexpr int KB = 4;
  int64_t k = 0;
  for (; k + KB <= K; k += KB) gmm_constants_kb<T, KB>(log_pi + k, sig + k * D, D, c + k);
  for (; k < K; ++k) gmm_constants_kb<T, 1>(log_pi + k, sig + k * D, D, c + k);
}

// Blocks per forward task: their log scores share every parameter load (block_scores_impl).
constexpr int FWD_NR = 2;

// The (at most L) rows of one block, from their patch origins base[0 .. nvalid), transposed into xt (D, L); an
// invalid lane is zero. A full block takes L entries of its L rows at a time through an in-register transpose (L
// vector loads and stores instead of L * L strided scalar copies: preset D's second layer gathers 400 entries per
// row); a segment's last seg % L entries too (the loads read past them, into the input's next pixels, where that
// stays inside the input x_end: preset D's first layer, 3-entry segments, spent 15% of its forward on their scalar
// copies); the rest entry by entry.
template <typename T, int L>
inline __attribute__((always_inline)) void gather_block(const Geometry& g, const T* const* base, int64_t nvalid,
                                                        const T* x_end, T* __restrict__ xt) {
  const int64_t seg = g.kw * g.C, line = g.W * g.C;
  const int64_t vec_end = nvalid == L ? seg - seg % L : 0;
  bool tail_vec = nvalid == L && vec_end < seg;
  for (int i = 0; i < L && tail_vec; ++i) tail_vec = base[i] + (g.kh - 1) * line + vec_end + L <= x_end;
  for (int64_t ky = 0; ky < g.kh; ++ky) {
    T* dst = xt + ky * seg * L;
    for (int64_t l0 = 0; l0 < vec_end; l0 += L) {
      typename RowVec<T, L>::type v[L];
      for (int i = 0; i < L; ++i) v[i] = load_rv<T, L>(base[i] + ky * line + l0);
      transpose_rv<T, L>(v);
      for (int j = 0; j < L; ++j) store_rv<T, L>(dst + (l0 + j) * L, v[j]);
    }
    if (tail_vec) {
      typename RowVec<T, L>::type v[L];
      for (int i = 0; i < L; ++i) v[i] = load_rv<T, L>(base[i] + ky * line + vec_end);
      transpose_rv<T, L>(v);
      for (int64_t j = 0; j < seg - vec_end; ++j) store_rv<T, L>(dst + (vec_end + j) * L, v[j]);
      continue;
    }
    for (int64_t i = 0; i < L; ++i)
      for (int64_t l = vec_end; l < seg; ++l) dst[l * L + i] = i < nvalid ? base[i][ky * line + l] : T(0);
  }
}

// One block's log scores lt (K, L) (rows j0 .. j0 + nvalid - 1 of GMM gi) to its outputs: smoothing, max/argmax,
// softmax and logsumexp, scattered into resp, score, lse and kstar. tmp, sm (K, L) scratch.
template <typename T, int L>
inline __attribute__((always_inline)) void finish_block(const Geometry& g, const ForwardArgs<T>& a, int64_t gi,
                                                        int64_t j0, int64_t nvalid, T* lt, T* tmp, T* sm) {
  const int64_t K = g.K;
  const T* ranked = lt;
  if (a.is_mc && a.G != nullptr) {
    if (a.n > 0)
      smooth_factored_impl<T, L>(lt, a.G, a.G + a.n * a.n, a.n, tmp, sm);
    else
      smooth_dense_impl<T, L>(lt, a.G, K, sm);
    ranked = sm;
  }
  T lse[L], best[L], kb[L];
  block_finish_impl<T, L>(lt, ranked, K, lse, best, kb);
  const T cst = T(0.5 * double(g.D) * std::log(2.0 * M_PI));
  T* out0 = a.resp + row_of(g, gi, j0) * K;
  const int64_t out_step = (g.independent ? g.P : 1) * K;  // resp rows of consecutive lanes
  int64_t k0 = 0;
  for (; k0 + L <= K; k0 += L) {  // L components of L rows at a time: one in-register transpose, L vector stores
    typename RowVec<T, L>::type v[L];
    for (int j = 0; j < L; ++j) v[j] = load_rv<T, L>(lt + (k0 + j) * L);
    transpose_rv<T, L>(v);
    for (int64_t i = 0; i < nvalid; ++i) store_rv<T, L>(out0 + i * out_step + k0, v[i]);
  }
  for (int64_t i = 0; i < nvalid; ++i) {
    const int64_t r = row_of(g, gi, j0 + i);
    T* out = a.resp + r * K;
    for (int64_t k = k0; k < K; ++k) out[k] = lt[k * L + i];
    a.lse[r] = lse[i];
    a.kstar[r] = int32_t(kb[i]);
    a.score[r] = (a.is_mc ? best[i] : lse[i]) - cst;
  }
}

// One task: rows j0 .. j0 + nvalid - 1 (nvalid <= FWD_NR * L) of GMM gi as up to FWD_NR blocks of L rows, from the
// image (gathered transposed into xt) or from ls; the blocks' log scores together, then each block's outputs.
// Compiled per instruction set as a whole (the helpers above are inlined into it), so the gathers and scatters are
// vectorised too. Buffers: xt (FWD_NR, D, L), lt (FWD_NR, K, L), tmp, sm (K, L) with L = block_rows(RB).
template <typename T, int RB>
inline __attribute__((always_inline)) void forward_block_impl(const Geometry& g, const ForwardArgs<T>& a,
                                                              int64_t gi, int64_t j0, int64_t nvalid, const T* c,
                                                              T* xt, T* lt, T* tmp, T* sm) {
  constexpr int L = int(block_rows(RB));
  const int64_t K = g.K, D = g.D, nblocks = (nvalid + L - 1) / L;
  if (a.ls == nullptr) {
    // the rows straight into the lanes of xt, walking (image, oy, ox) from the task's first row: no division per
    // row (a 64-bit division per row cost ~15% of preset D's first-layer forward)
    int64_t n = g.independent ? j0 : j0 / g.P, p = g.independent ? gi : j0 % g.P;
    int64_t oy = p / g.Wo, ox = p - oy * g.Wo;
    const int64_t img = g.H * g.W * g.C;
    const T* base[FWD_NR * L];  // the patch origin of each valid row
    for (int64_t i = 0; i < nvalid; ++i) {
      base[i] = a.x + n * img + (oy * g.sh * g.W + ox * g.sw) * g.C;
      if (g.independent) {
        ++n;
      } else if (++ox == g.Wo) {
        ox = 0;
        if (++oy == g.Ho) oy = 0, ++n;
      }
    }
    const T* x_end = a.x + g.N * img;
    for (int64_t r = 0; r < nblocks; ++r)
      gather_block<T, L>(g, base + r * L, std::min<int64_t>(L, nvalid - r * L), x_end, xt + r * D * L);
    const T *mu = a.mu + gi * K * D, *sig = a.sig + gi * K * D;
    if (nblocks == FWD_NR)
      block_scores_impl<T, L, FWD_NR>(xt, D, mu, sig, c, K, lt);
    else
      for (int64_t r = 0; r < nblocks; ++r)
        block_scores_impl<T, L, 1>(xt + r * D * L, D, mu, sig, c, K, lt + r * K * L);
  } else {
    for (int64_t i = 0; i < nblocks * L; ++i) {
      const T* src = a.ls + row_of(g, gi, j0 + std::min(i, nvalid - 1)) * K;
      for (int64_t k = 0; k < K; ++k) lt[(i / L * K + k) * L + i % L] = src[k];
    }
  }
  for (int64_t r = 0; r < nblocks; ++r)
    finish_block<T, L>(g, a, gi, j0 + r * L, std::min<int64_t>(L, nvalid - r * L), lt + r * K * L, tmp, sm);
}
DCGMM_ISA_VARIANTS(forward_block, forward_block_impl)

// The whole forward: tasks of FWD_NR blocks of L rows (L per instruction set: block_rows) of one GMM, one parallel
// region. Independent layers walk tiles of PT consecutive positions, each tile task by task with its positions
// inner: consecutive tasks then write neighbouring rows of resp (positions p, p + 1 of the same images: whole cache
// lines) and read overlapping patches, where GMM-major order wrote 100-byte rows 67 KB apart (preset D's first
// layer). A tile's constants c are computed by the thread that meets it first. A tile's parameters stay within
// 64 KB (preset D's second layer, 80 KB per GMM, keeps GMM-major order, which keeps a GMM's parameters hot).
constexpr int64_t PT = 16;
constexpr int64_t TILE_PARAM_BYTES = 64 * 1024;

// GMMs per tile of the forward's walk (forward_blocks): consecutive positions whose parameters fit in 64 KB
inline int64_t tile_gmms(const Geometry& g, int64_t bytes_per_value) {
  const int64_t gmm_bytes = 2 * g.K * g.D * bytes_per_value;
  return g.G > 1 ? std::max<int64_t>(1, std::min(PT, TILE_PARAM_BYTES / gmm_bytes)) : 1;
}

template <typename T>
void forward_blocks(const Geometry& g, const ForwardArgs<T>& a) {
  const Isa isa = cpu_isa();
  const int64_t L = block_rows(register_bytes(isa));  // the rows per block of the build that runs
  const int64_t TR = FWD_NR * L;                       // rows per task
  const int64_t rows = rows_per_gmm(g), blocks = (rows + TR - 1) / TR, K = g.K, D = g.D;
  const int64_t pt = tile_gmms(g, sizeof(T)), per_tile = pt * blocks;
  at::parallel_for(0, g.G * blocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> xt(a.ls ? 0 : FWD_NR * D * L), lt(FWD_NR * K * L), tmp(K * L), sm(K * L), c(pt * K);
    int64_t c_of = -1;  // the tile whose constants c holds
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t tile = t / per_tile, g0 = tile * pt, tn = std::min(pt, g.G - g0), w = t - tile * per_tile;
      const int64_t gi = g0 + w % tn, j0 = (w / tn) * TR, nvalid = std::min<int64_t>(TR, rows - j0);
      if (a.ls == nullptr && c_of != tile) {
        for (int64_t q = 0; q < tn; ++q)
          gmm_constants(a.log_pi + (g0 + q) * K, a.sig + (g0 + q) * K * D, K, D, c.data() + q * K);
        c_of = tile;
      }
      forward_block<T>(isa, g, a, gi, j0, nvalid, c.data() + (gi - g0) * K, xt.data(), lt.data(), tmp.data(),
                       sm.data());
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
            gather_range(xp, g, r / g.P, r % g.P, 0, g.D, row);
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

// A forward call's checked inputs (contiguous), its smoothing as the forward takes it (G: factors or dense), its
// outputs and, in the GEMM form, the log scores ls: what cgmm_fwd_cpu and cgmm_fwd_grads_cpu share.
struct ForwardCall {
  Geometry g;
  bool is_mc, gemm;
  at::Tensor x, mu, sigma, log_pi, G, resp, score, lse, kstar, ls;

  ForwardCall(const at::Tensor& x_, const at::Tensor& mu_, const at::Tensor& sigma_, const at::Tensor& log_pi_,
              at::IntArrayRef kernel, at::IntArrayRef stride, c10::string_view loss,
              const std::optional<at::Tensor>& smoothing) {
    check_params(x_, mu_, sigma_, log_pi_);
    g = make_geometry(x_, mu_, kernel, stride);
    TORCH_CHECK(loss == "mc" || loss == "loglik", "loss: expected 'mc' or 'loglik', got ", loss);
    is_mc = loss == "mc";
    TORCH_CHECK(!(smoothing.has_value() && !is_mc), "smoothing: must be None for loss 'loglik'");
    x = x_.contiguous(), mu = mu_.contiguous(), sigma = sigma_.contiguous(), log_pi = log_pi_.contiguous();
    if (smoothing.has_value()) G = checked_smoothing(*smoothing, g.K, x.scalar_type());
    const auto opts = x.options();
    resp = new_output({g.N, g.Ho, g.Wo, g.K}, opts);
    score = new_output({g.N, g.Ho, g.Wo}, opts);
    lse = new_output({g.N, g.Ho, g.Wo}, opts);
    kstar = new_output({g.N, g.Ho, g.Wo}, opts.dtype(at::kInt));
    gemm = !g.independent && g.D >= GEMM_MIN_D && g.K >= GEMM_MIN_K && gemm_form_enabled();
    if (gemm) {
      ls = at::empty({g.M, g.K}, opts);
      log_scores_gemm(g, x, mu, sigma, log_pi, ls);
    }
  }

  template <typename T>
  ForwardArgs<T> args() const {
    return {x.data_ptr<T>(), mu.data_ptr<T>(), sigma.data_ptr<T>(), log_pi.data_ptr<T>(),
            gemm ? ls.data_ptr<T>() : nullptr, G.defined() ? G.data_ptr<T>() : nullptr,
            G.defined() && G.dim() == 3 ? G.size(1) : 0, is_mc, resp.data_ptr<T>(), score.data_ptr<T>(),
            lse.data_ptr<T>(), kstar.data_ptr<int32_t>()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cgmm_fwd_cpu(
    const at::Tensor& x, const at::Tensor& mu, const at::Tensor& sigma, const at::Tensor& log_pi,
    at::IntArrayRef kernel, at::IntArrayRef stride, c10::string_view loss, const std::optional<at::Tensor>& smoothing) {
  const ForwardCall f(x, mu, sigma, log_pi, kernel, stride, loss, smoothing);
  AT_DISPATCH_FLOATING_TYPES(f.x.scalar_type(), "cgmm_fwd_cpu",
                             [&] { forward_blocks<scalar_t>(f.g, f.args<scalar_t>()); });
  return {f.resp, f.score, f.lse, f.kstar};
}

// ---------------------------------------------------------------------------------------------------- backward
// Where the backward weights W (cgmm_math.h backward_weights_row) come from: computed row by row where they are
// used, by the task that uses them (no (M, K) buffer and no parallel region of their own).
template <typename T>
struct WeightSource {
  const T *resp, *g_resp, *g_score, *G;
  T g_score_all;  // g_score of every row when g_score is null (a mean's backward: one value; 0 when absent)
  const int32_t* kstar;
  bool is_mc;
  int64_t K;
  inline __attribute__((always_inline)) void row(int64_t r, T* W) const {
    backward_weights_row(resp + r * K, g_resp ? g_resp + r * K : nullptr, g_score ? g_score[r] : g_score_all, is_mc,
                         G, int64_t(kstar[r]), K, W);
  }
};

// Parameter gradients. With t = x - mu[k] the gradients are
//   d log_pi = w,  d mu = sigma^2 sum_r W (x - mu),  d sigma = w / sigma - sigma sum_r W (x - mu)^2,  w = sum_r W.
// The sums are accumulated centred on the GMM's own mean of means, ctr[d] = mean_k mu[k, d]:
//   w[k] = sum_r W[r, k],  A1c[k, d] = sum_r W[r, k] xc[r, d],  A2c[k, d] = sum_r W[r, k] xc[r, d]^2,  xc = x - ctr
// (xc and xc^2 computed once per row and shared by every component: 2 multiply-adds per (row, component, entry),
// half the direct form's 4), then re-centred per component in double: with mc = mu - ctr,
//   sum W (x - mu) = A1c - w mc,   sum W (x - mu)^2 = A2c - 2 mc A1c + w mc^2.
// Centring on ctr, not on 0, keeps the cancellation of that last line small (|mc| is the spread of the means,
// not their distance to 0: the trained-regime tests hold it to the float32 rule). Tasks are (GMM, chunk of
// PG_CHUNK rows, range of PG_DRANGE patch entries): each gathers its rows' entries block by block (PG_ROWS rows)
// and runs a register-tiled micro-kernel (PG_KB components x one vector of entries, the rows streamed); a
// block's float sums are added to double totals in block order, chunks in chunk order. The order of every
// addition is fixed by these constants, never by the thread count. One parallel region (two when a GMM has more
// than PG_CHUNK rows), no BLAS inside. The mc loss with no gradient on resp takes the winner sums (pw_block) in the
// same tasks.
constexpr int64_t PG_ROWS = 128;
constexpr int64_t PG_DRANGE = 128;
constexpr int64_t PG_CHUNK = 8192;
constexpr int PG_KB = 4;

// For the PG_KB components j of the tile and one vector of patch entries: the block's float sums
// a1[j, :] = sum_i wb[i, j] xc[i, :] and a2[j, :] = sum_i wb[i, j] xc[i, :]^2 (xc = xb - ctr) added to the double
// totals A1, A2 of the first kn components; rows whose PG_KB weights are all zero are skipped (one-hot W).
template <typename T, int RB>
inline __attribute__((always_inline)) void pg_tile_impl(const T* __restrict__ xb, int64_t ldx, int64_t nb,
                                                        const T* __restrict__ wb, int64_t ldw,
                                                        const T* __restrict__ ctr, int kn, double* __restrict__ A1,
                                                        double* __restrict__ A2) {
  constexpr int VL = RB / int(sizeof(T)), L = Lanes<T>::value;
  using V = typename RowVec<T, VL>::type;  // one register
  for (int h = 0; h < L; h += VL) {  // the 64-byte group of entries in register-wide parts: the same sums per lane
    V acc1[PG_KB], acc2[PG_KB];
    const V cv = load_rv<T, VL>(ctr + h);
    for (int j = 0; j < PG_KB; ++j) acc1[j] = V{} * T(0), acc2[j] = V{} * T(0);
    for (int64_t i = 0; i < nb; ++i) {
      const T* w = wb + i * ldw;
      bool any = false;
      for (int j = 0; j < PG_KB; ++j) any |= w[j] != T(0);
      if (!any) continue;
      const V xc = load_rv<T, VL>(xb + i * ldx + h) - cv;
      const V x2 = xc * xc;
      for (int j = 0; j < PG_KB; ++j) {
        acc1[j] += w[j] * xc;
        acc2[j] += w[j] * x2;
      }
    }
    for (int j = 0; j < kn; ++j) {  // the block's float sums into the double totals (stride ldx per component)
      T t1[VL], t2[VL];
      __builtin_memcpy(t1, &acc1[j], sizeof(V));
      __builtin_memcpy(t2, &acc2[j], sizeof(V));
      for (int l = 0; l < VL; ++l) A1[j * ldx + h + l] += double(t1[l]), A2[j * ldx + h + l] += double(t2[l]);
    }
  }
}
DCGMM_ISA_VARIANTS(pg_tile, pg_tile_impl)

// d_mu, d_sigma of K components over dn entries (row stride D) from the centred totals (row stride ldx), in double.
template <typename T, int RB>  // RB: unused (auto-vectorised loops)
inline __attribute__((always_inline)) void pg_finish_impl(int64_t K, int64_t dn, int64_t D, int64_t ldx,
                                                          const T* __restrict__ mu, const T* __restrict__ sigma,
                                                          const T* __restrict__ ctr, const double* __restrict__ A1,
                                                          const double* __restrict__ A2, const double* __restrict__ wt,
                                                          T* __restrict__ d_mu, T* __restrict__ d_sigma, int64_t ldg) {
  for (int64_t k = 0; k < K; ++k) {
    const double w = wt[k];
    for (int64_t d = 0; d < dn; ++d) {
      const double s = sigma[k * D + d], mc = double(mu[k * D + d]) - double(ctr[d]);
      const double a1 = A1[k * ldx + d], a2 = A2[k * ldx + d];
      d_mu[k * ldg + d] = T(s * s * (a1 - w * mc));
      d_sigma[k * ldg + d] = T(w / s - s * (a2 - 2.0 * mc * a1 + w * mc * mc));
    }
  }
}
DCGMM_ISA_VARIANTS(pg_finish, pg_finish_impl)

// A block's rows (entries [d0, d0 + dn), zero-padded to ldx) into xb, their weights W into wb (stride ldw) and
// the weights' float sums over the block into ws.
template <typename T, int RB>  // RB: unused (auto-vectorised loops)
inline __attribute__((always_inline)) void pg_gather_impl(const Geometry& g, const T* x, const WeightSource<T>& W,
                                                          int64_t gi, int64_t j0, int64_t nb, int64_t d0, int64_t dn,
                                                          int64_t ldx, int64_t ldw, T* xb, T* wb, T* ws) {
  const int64_t K = g.K;
  for (int64_t k = 0; k < K; ++k) ws[k] = T(0);
  for (int64_t i = 0; i < nb; ++i) {
    const int64_t r = row_of(g, gi, j0 + i);
    T* xr = xb + i * ldx;
    gather_range(x, g, r / g.P, r % g.P, d0, dn, xr);
    for (int64_t d = dn; d < ldx; ++d) xr[d] = T(0);
    T* w = wb + i * ldw;
    W.row(r, w);
    for (int64_t k = 0; k < K; ++k) ws[k] += w[k];
  }
}
DCGMM_ISA_VARIANTS(pg_gather, pg_gather_impl)

// The mc loss with no gradient on resp (every training step): a row's weights are one row of G, scaled,
// W[r, :] = g_r G[kstar_r, :] (one-hot without a smoothing), so the sums over rows factor through the winners:
//   b0[j] = sum_{r: kstar_r = j} g_r,  B1[j, d] = sum_{r: kstar_r = j} g_r xc[r, d],  B2[j, d] = same of g_r xc^2,
//   w = G^T b0,  A1c = G^T B1,  A2c = G^T B2.
// A row is added to its winner alone (2 multiply-adds per (row, entry), not 2 K), then one product by G^T per task
// in double: separable with the factors (2 n K per entry), else over the task's winners only (a dense G). The
// tasks, blocks and orders are the general path's: float sums per block of PG_ROWS rows, added to double totals.

// One row's entries src[0 .. len), centred on ctr and scaled by gr, into its winner's float sums: a1 += gr xc,
// a2 += gr xc^2. Every winner sum's row takes this code (pw_row_add, pw_rows): the same bits on every path.
template <typename T>
inline __attribute__((always_inline)) void pw_add(const T* __restrict__ src, const T* __restrict__ ctr, T gr,
                                                  int64_t len, T* __restrict__ a1, T* __restrict__ a2) {
  for (int64_t d = 0; d < len; ++d) {
    const T xc = src[d] - ctr[d], gx = gr * xc;
    a1[d] += gx;
    a2[d] += gx * xc;
  }
}

// Short segments (3x3 one-channel patches) are gathered into a padded row buffer and added in one pass over it
// (pw_add over ldx entries); the fused forward fills that buffer from its transposed block instead (pw_rows).
inline bool pw_short_segments(const Geometry& g) { return g.kw * g.C < 16; }

// Row (n, p)'s entries [d0, d0 + dn) added, scaled by gr and centred on ctr, to its winner's float sums a1, a2
// (ldx entries: a gathered short row is added zero-padded, xr[dn .. ldx) zero). Inlined into pw_block and the fused
// forward (pw_rows).
template <typename T>
inline __attribute__((always_inline)) void pw_row_add(const Geometry& g, const T* __restrict__ x, int64_t n, int64_t p,
                                                      int64_t d0, int64_t dn, int64_t ldx, const T* __restrict__ ctr,
                                                      T gr, T* __restrict__ xr, T* __restrict__ a1,
                                                      T* __restrict__ a2) {
  if (!pw_short_segments(g)) {  // long segments: straight from the input, segment by segment
    for_each_segment(x, g, n, p, d0, dn, [&](const T* __restrict__ src, int64_t o, int64_t len) {
      pw_add(src, ctr + o, gr, len, a1 + o, a2 + o);
    });
  } else {
    gather_range(x, g, n, p, d0, dn, xr);
    pw_add(xr, ctr, gr, ldx, a1, a2);
  }
}

// A block's float sums f1, f2 (K, ldx) of its winners (hit) and their weights bs added to the double totals B1, B2
// (first dn entries of each row) and b0; used marks the rows of the totals that hold sums.
template <typename T>
inline __attribute__((always_inline)) void pw_flush(int64_t K, int64_t dn, int64_t ldx, const T* __restrict__ f1,
                                                    const T* __restrict__ f2, const uint8_t* __restrict__ hit,
                                                    const double* __restrict__ bs, uint8_t* __restrict__ used,
                                                    double* __restrict__ b0, double* __restrict__ B1,
                                                    double* __restrict__ B2) {
  for (int64_t j = 0; j < K; ++j) {
    if (!hit[j]) continue;
    if (!used[j]) {  // the task's first rows of winner j
      used[j] = 1, b0[j] = 0.0;
      std::fill(B1 + j * ldx, B1 + (j + 1) * ldx, 0.0), std::fill(B2 + j * ldx, B2 + (j + 1) * ldx, 0.0);
    }
    b0[j] += bs[j];
    for (int64_t d = 0; d < dn; ++d) B1[j * ldx + d] += double(f1[j * ldx + d]);
    for (int64_t d = 0; d < dn; ++d) B2[j * ldx + d] += double(f2[j * ldx + d]);
  }
}

// One block of rows into its winners' float sums f1, f2 (K, ldx); hit[j] marks the winners of the block; the
// block's sums are then added to the double totals B1, B2 and b0.
template <typename T, int RB>  // RB: unused (auto-vectorised loops)
inline __attribute__((always_inline)) void pw_block_impl(const Geometry& g, const T* __restrict__ x,
                                                         const WeightSource<T>& W, int64_t gi, int64_t j0, int64_t nb,
                                                         int64_t d0, int64_t dn, int64_t ldx,
                                                         const T* __restrict__ ctr, T* __restrict__ xr,
                                                         T* __restrict__ f1, T* __restrict__ f2,
                                                         uint8_t* __restrict__ hit, double* __restrict__ bs,
                                                         uint8_t* __restrict__ used, double* __restrict__ b0,
                                                         double* __restrict__ B1, double* __restrict__ B2) {
  const int64_t K = g.K;
  for (int64_t j = 0; j < K; ++j) hit[j] = 0;
  for (int64_t d = dn; d < ldx; ++d) xr[d] = T(0);
  for (int64_t i = 0; i < nb; ++i) {
    const int64_t r = row_of(g, gi, j0 + i);
    const T gr = W.g_score != nullptr ? W.g_score[r] : W.g_score_all;
    if (gr == T(0)) continue;
    const int64_t j = W.kstar[r];
    if (!hit[j]) {
      hit[j] = 1, bs[j] = 0.0;
      std::fill(f1 + j * ldx, f1 + (j + 1) * ldx, T(0)), std::fill(f2 + j * ldx, f2 + (j + 1) * ldx, T(0));
    }
    pw_row_add(g, x, r / g.P, r % g.P, d0, dn, ldx, ctr, gr, xr, f1 + j * ldx, f2 + j * ldx);
    bs[j] += double(gr);
  }
  pw_flush(K, dn, ldx, f1, f2, hit, bs, used, b0, B1, B2);
}
DCGMM_ISA_VARIANTS(pw_block, pw_block_impl)

// The smoothing as the backward reads it: dense (K, K) G and, when the layer passed them, its factors (Gy, Gx) of
// side n (G = kron(Gy, Gx)); both null: identity.
template <typename T>
struct Smoothing {
  const T *dense, *gy, *gx;
  int64_t n;
};

// out[:] = sum_t w[t] src[t][:] over nt terms (rows of length len, a multiple of 8 or 1), written once. Each entry
// is one chain over t in order, except in the last group of fewer than 32 entries, which sums even and odd terms
// in two chains: groups of 32 / 8 entries whatever the register width RB (the same bits in every build).
template <int RB>
inline __attribute__((always_inline)) void pw_rows_sum(int64_t nt, const double* w, const double* const* src,
                                                        int64_t len, double* __restrict__ out) {
  constexpr int VL = RB / 8;  // doubles per register
  using V = typename RowVec<double, VL>::type;
  if (len % 8 != 0) {
    for (int64_t d = 0; d < len; ++d) {
      double acc = 0.0;
      for (int64_t t = 0; t < nt; ++t) acc += w[t] * src[t][d];
      out[d] = acc;
    }
    return;
  }
  constexpr int U = 32 / VL;  // independent accumulators: the sums over t are a dependency chain per vector
  int64_t d = 0;
  for (; d + 32 <= len; d += 32) {
    V acc[U];
    for (int u = 0; u < U; ++u) acc[u] = V{} * 0.0;
    for (int64_t t = 0; t < nt; ++t) {
      const double wt = w[t];
      for (int u = 0; u < U; ++u) acc[u] += wt * load_rv<double, VL>(src[t] + d + u * VL);
    }
    for (int u = 0; u < U; ++u) store_rv<double, VL>(out + d + u * VL, acc[u]);
  }
  for (; d < len; d += 8) {  // short rows (a 16-entry patch: 2 groups): even and odd terms in two chains
    constexpr int H = 8 / VL;
    V even[H], odd[H];
    for (int u = 0; u < H; ++u) even[u] = V{} * 0.0, odd[u] = V{} * 0.0;
    int64_t t = 0;
    for (; t + 2 <= nt; t += 2)
      for (int u = 0; u < H; ++u) {
        even[u] += w[t] * load_rv<double, VL>(src[t] + d + u * VL);
        odd[u] += w[t + 1] * load_rv<double, VL>(src[t + 1] + d + u * VL);
      }
    if (t < nt)
      for (int u = 0; u < H; ++u) even[u] += w[t] * load_rv<double, VL>(src[t] + d + u * VL);
    for (int u = 0; u < H; ++u) store_rv<double, VL>(out + d + u * VL, even[u] + odd[u]);
  }
}

// A (K, len) = G^T B (K, len) in double (rows at stride ld), where only B's rows j with used[j] are defined (the
// others are zero):
// B itself without G; separable with the factors, A[(ky, kx)] = sum_jy Gy[jy, ky] sum_jx Gx[jx, kx] B[(jy, jx)],
// when that takes fewer operations than the dense product over the used rows. tmp: (K, len) scratch.
template <typename T, int RB>
inline __attribute__((always_inline)) void pw_combine_impl(const Smoothing<T>& G, int64_t K, int64_t len,
                                                           int64_t ld, const uint8_t* __restrict__ used,
                                                           const double* __restrict__ B, double* __restrict__ tmp,
                                                           double* __restrict__ A) {
  std::vector<double> w(K);
  std::vector<const double*> src(K);
  std::vector<int64_t> js;
  for (int64_t j = 0; j < K; ++j)
    if (used[j]) js.push_back(j);
  const int64_t nused = int64_t(js.size());
  if (G.dense == nullptr) {  // identity: the used rows, zeros elsewhere
    for (int64_t k = 0; k < K; ++k)
      if (used[k])
        std::copy(B + k * ld, B + k * ld + len, A + k * ld);
      else
        std::fill(A + k * ld, A + k * ld + len, 0.0);
    return;
  }
  if (G.gy != nullptr && 2 * G.n < nused) {
    const int64_t n = G.n;
    std::vector<uint8_t> row_used(n, 0);
    std::vector<int64_t> jx_of(n);
    for (int64_t jy = 0; jy < n; ++jy) {  // tmp[(jy, kx)] = sum_jx Gx[jx, kx] B[(jy, jx)]
      int64_t nt = 0;
      for (int64_t jx = 0; jx < n; ++jx)
        if (used[jy * n + jx]) src[nt] = B + (jy * n + jx) * ld, jx_of[nt++] = jx;
      row_used[jy] = nt > 0;
      for (int64_t kx = 0; kx < n && nt > 0; ++kx) {
        for (int64_t t = 0; t < nt; ++t) w[t] = double(G.gx[jx_of[t] * n + kx]);
        pw_rows_sum<RB>(nt, w.data(), src.data(), len, tmp + (jy * n + kx) * ld);
      }
    }
    for (int64_t ky = 0; ky < n; ++ky)  // A[(ky, kx)] = sum_jy Gy[jy, ky] tmp[(jy, kx)]
      for (int64_t kx = 0; kx < n; ++kx) {
        int64_t nt = 0;
        for (int64_t jy = 0; jy < n; ++jy)
          if (row_used[jy]) src[nt] = tmp + (jy * n + kx) * ld, w[nt++] = double(G.gy[jy * n + ky]);
        pw_rows_sum<RB>(nt, w.data(), src.data(), len, A + (ky * n + kx) * ld);
      }
    return;
  }
  for (int64_t t = 0; t < nused; ++t) src[t] = B + js[t] * ld;
  for (int64_t k = 0; k < K; ++k) {  // dense, over the used rows
    for (int64_t t = 0; t < nused; ++t) w[t] = double(G.dense[js[t] * K + k]);
    pw_rows_sum<RB>(nused, w.data(), src.data(), len, A + k * ld);
  }
}
DCGMM_ISA_VARIANTS(pw_combine, pw_combine_impl)

// What param_grads and the fused forward (forward_param_grads) share: the tasks (GMM, chunk of PG_CHUNK rows, range
// of PG_DRANGE entries), each task's centre, the end of a task (its totals to the gradients, or kept for the
// chunks' reduction) and that reduction, in chunk order.
template <typename T>
struct GradPlan {
  const Geometry& g;
  const T *mu, *sigma;
  const Smoothing<T>& S;
  T *d_mu, *d_sigma, *d_log_pi;
  Isa isa;
  int64_t K, D, rows, chunks, dranges, ldx, tile;
  bool winners;
  std::vector<double> part1, part2, partw;  // with several chunks: every task's totals
  // the update rule applied where a task's gradients are written (set_update): mu += s_mu d_mu, sigma =
  // clamp(sigma + s_sigma d_sigma, lo, hi), as gmm_update_cpp; mu_max: max |mu| after it per (GMM, range)
  T *mu_w = nullptr, *sigma_w = nullptr, s_mu = T(0), s_sigma = T(0), lo = T(0), hi = T(0);
  std::vector<T> mu_max;

  GradPlan(const Geometry& g_, const T* mu_, const T* sigma_, const WeightSource<T>& W, const Smoothing<T>& S_,
           T* d_mu_, T* d_sigma_, T* d_log_pi_)
      : g(g_), mu(mu_), sigma(sigma_), S(S_), d_mu(d_mu_), d_sigma(d_sigma_), d_log_pi(d_log_pi_), isa(cpu_isa()) {
    K = g.K, D = g.D, rows = rows_per_gmm(g);
    chunks = (rows + PG_CHUNK - 1) / PG_CHUNK, dranges = (D + PG_DRANGE - 1) / PG_DRANGE;
    ldx = round_up(std::min(D, PG_DRANGE), PAD_LANES);  // one task's (K, ldx) totals
    tile = K * ldx;
    // every row's W is a scaled row of G (see pw_block): the winner sums, where the product by G^T (~2 n or K rows
    // of double work per component and entry, with its bookkeeping) costs less than the K weights per row of the
    // general path. Measured (2 cores, batch 100): preset D's layers 5.3 -> 1.8 ms (K = 25, D = 9) and 6.3 -> 3.6
    // ms (D = 400); classifier-B's first layer (K = 121, n = 11, 100 rows per GMM) 2.1-2.7 ms general, 2.6-2.8
    // winners.
    const int64_t combine_rows = S.dense == nullptr ? 0 : (S.gy != nullptr ? 2 * S.n : K);
    winners = W.is_mc && W.g_resp == nullptr && std::min(rows, PG_CHUNK) > 5 * combine_rows;
    if (chunks > 1) {
      part1.resize(g.G * chunks * dranges * tile), part2.resize(part1.size());
      partw.resize(g.G * chunks * dranges * K);
    }
  }
  int64_t dn_of(int64_t dr) const { return std::min(PG_DRANGE, D - dr * PG_DRANGE); }

  void set_update(T* mu_, T* sigma_, T s_mu_, T s_sigma_, T lo_, T hi_) {
    mu_w = mu_, sigma_w = sigma_, s_mu = s_mu_, s_sigma = s_sigma_, lo = lo_, hi = hi_;
    mu_max.assign(g.G * dranges, T(0));
  }

  // ctr (ldx) = GMM gi's mean of means over entries [d0, d0 + dn), in double, zero-padded
  void centre(int64_t gi, int64_t d0, int64_t dn, T* ctr) const {
    double acc[PG_DRANGE] = {};  // k outer, entries inner: the same order of additions per entry, vectorised
    for (int64_t k = 0; k < K; ++k) {
      const T* m = mu + (gi * K + k) * D + d0;
      for (int64_t d = 0; d < dn; ++d) acc[d] += double(m[d]);
    }
    std::fill(ctr, ctr + ldx, T(0));
    for (int64_t d = 0; d < dn; ++d) ctr[d] = T(acc[d] / double(K));
  }

  // d_mu, d_sigma (and d_log_pi on the first range) of GMM gi's entries [d0, d0 + dn) from its centred totals;
  // ctr as the tasks rounded it
  void finish(int64_t gi, int64_t d0, int64_t dn, const T* ctr, const double* A1, const double* A2,
              const double* wt) {
    if (d0 == 0)
      for (int64_t k = 0; k < K; ++k) d_log_pi[gi * K + k] = T(wt[k]);
    const int64_t off = gi * K * D + d0;
    // without gradient outputs (an update that discards them) the range's gradients go to a per-thread scratch
    // (K, dn): the same values, never written to memory (8 MB a step for preset D's second layer)
    thread_local std::vector<T> scratch;
    if (d_mu == nullptr) scratch.resize(2 * K * dn);
    T* gm = d_mu != nullptr ? d_mu + off : scratch.data();
    T* gs = d_mu != nullptr ? d_sigma + off : scratch.data() + K * dn;
    const int64_t ldg = d_mu != nullptr ? D : dn;
    pg_finish<T>(isa, K, dn, D, ldx, mu + off, sigma + off, ctr, A1, A2, wt, gm, gs, ldg);
    if (mu_w == nullptr) return;
    // the entries' last reads (this range of this GMM) are done: update them while their gradients are in cache
    T m = T(0);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t o = off + k * D;
      m = abs_max(m, update_range<T>(isa, mu_w + o, gm + k * ldg, s_mu, dn, false, lo, hi));
      update_range<T>(isa, sigma_w + o, gs + k * ldg, s_sigma, dn, true, lo, hi);
    }
    mu_max[gi * dranges + d0 / PG_DRANGE] = m;
  }

  // task (gi, chunk c, range dr) has its totals A1, A2 (K, ldx), wt (K): the gradients now (one chunk) or later
  void task_done(int64_t gi, int64_t c, int64_t dr, const T* ctr, const double* A1, const double* A2,
                 const double* wt) {
    if (chunks == 1) {
      finish(gi, dr * PG_DRANGE, dn_of(dr), ctr, A1, A2, wt);
      return;
    }
    const int64_t slot = (gi * chunks + c) * dranges + dr;
    std::copy(A1, A1 + tile, part1.begin() + slot * tile);
    std::copy(A2, A2 + tile, part2.begin() + slot * tile);
    std::copy(wt, wt + K, partw.begin() + slot * K);
  }

  // the winner totals B1, B2 (K, ldx), b0 (K) of a task through G^T into A1, A2, wt, then task_done; tmp (K, ldx)
  void winners_done(int64_t gi, int64_t c, int64_t dr, const T* ctr, const uint8_t* used, const double* B1,
                    const double* B2, const double* b0, double* tmp, double* A1, double* A2, double* wt) {
    const int64_t len = round_up(dn_of(dr), Lanes<double>::value);  // the columns that hold entries
    pw_combine<T>(isa, S, K, len, ldx, used, B1, tmp, A1);
    pw_combine<T>(isa, S, K, len, ldx, used, B2, tmp, A2);
    pw_combine<T>(isa, S, K, int64_t(1), int64_t(1), used, b0, tmp, wt);
    task_done(gi, c, dr, ctr, A1, A2, wt);
  }

  // several chunks: each (GMM, range)'s totals summed in chunk order, then its gradients
  void reduce_chunks() {
    if (chunks == 1) return;
    at::parallel_for(0, g.G * dranges, 1, [&](int64_t t0, int64_t t1) {
      std::vector<double> A1(tile), A2(tile), wt(K);
      std::vector<T> ctr(ldx);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t gi = t / dranges, dr = t % dranges, d0 = dr * PG_DRANGE;
        std::fill(A1.begin(), A1.end(), 0.0), std::fill(A2.begin(), A2.end(), 0.0);
        std::fill(wt.begin(), wt.end(), 0.0);
        for (int64_t c = 0; c < chunks; ++c) {  // chunk order
          const int64_t slot = (gi * chunks + c) * dranges + dr;
          for (int64_t i = 0; i < tile; ++i) A1[i] += part1[slot * tile + i], A2[i] += part2[slot * tile + i];
          for (int64_t k = 0; k < K; ++k) wt[k] += partw[slot * K + k];
        }
        centre(gi, d0, dn_of(dr), ctr.data());
        finish(gi, d0, dn_of(dr), ctr.data(), A1.data(), A2.data(), wt.data());
      }
    });
  }
};

// The parameter gradients the plan names (its outputs, and its update rule when set) of the rows of x weighted by W.
template <typename T>
void param_grads(const Geometry& g, const T* x, const WeightSource<T>& W, GradPlan<T>& plan) {
  constexpr int64_t L = Lanes<T>::value;
  const Isa isa = plan.isa;
  const bool winners = plan.winners;
  const int64_t K = g.K, rows = plan.rows, ldw = round_up(K, PG_KB), chunks = plan.chunks;
  const int64_t dranges = plan.dranges, ldx = plan.ldx, tile = plan.tile;
  at::parallel_for(0, g.G * chunks * dranges, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> xb(winners ? ldx : PG_ROWS * ldx), wb(winners ? 0 : PG_ROWS * ldw, T(0)), ctr(ldx), ws(K);
    std::vector<T> f1(winners ? tile : 0), f2(f1.size());  // winners: a block's float sums
    std::vector<double> B1(f1.size()), B2(f1.size()), b0(winners ? K : 0), bs(b0.size()), tmp(f1.size());
    std::vector<uint8_t> hit(K), used(K);
    std::vector<double> A1(tile), A2(tile), wt(K);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t gi = t / (chunks * dranges), c = (t / dranges) % chunks, dr = t % dranges;
      const int64_t d0 = dr * PG_DRANGE, dn = plan.dn_of(dr);
      const int64_t j_begin = c * PG_CHUNK, j_end = std::min(rows, j_begin + PG_CHUNK);
      plan.centre(gi, d0, dn, ctr.data());
      if (winners) {
        std::fill(used.begin(), used.end(), uint8_t(0));
        for (int64_t j0 = j_begin; j0 < j_end; j0 += PG_ROWS)
          pw_block<T>(isa, g, x, W, gi, j0, std::min(PG_ROWS, j_end - j0), d0, dn, ldx, ctr.data(), xb.data(),
                      f1.data(), f2.data(), hit.data(), bs.data(), used.data(), b0.data(), B1.data(), B2.data());
        plan.winners_done(gi, c, dr, ctr.data(), used.data(), B1.data(), B2.data(), b0.data(), tmp.data(),
                          A1.data(), A2.data(), wt.data());
        continue;
      }
      std::fill(A1.begin(), A1.end(), 0.0), std::fill(A2.begin(), A2.end(), 0.0);
      std::fill(wt.begin(), wt.end(), 0.0);
      for (int64_t j0 = j_begin; j0 < j_end; j0 += PG_ROWS) {
        const int64_t nb = std::min(PG_ROWS, j_end - j0);
        pg_gather<T>(isa, g, x, W, gi, j0, nb, d0, dn, ldx, ldw, xb.data(), wb.data(), ws.data());
        for (int64_t k = 0; k < K; ++k) wt[k] += double(ws[k]);
        for (int64_t kb = 0; kb < K; kb += PG_KB)
          for (int64_t dv = 0; dv < ldx; dv += L) {
            pg_tile<T>(isa, xb.data() + dv, ldx, nb, wb.data() + kb, ldw, ctr.data() + dv,
                       int(std::min<int64_t>(PG_KB, K - kb)), A1.data() + kb * ldx + dv, A2.data() + kb * ldx + dv);
          }
      }
      plan.task_done(gi, c, dr, ctr.data(), A1.data(), A2.data(), wt.data());
    }
  });
  plan.reduce_chunks();
}

// dpatch[d] += sum_k W[k] sigma^2[k, d] (mu[k, d] - x[d]) over the components with W[k] != 0, in the direct form:
// the expanded W S mu - x (W S) cancels by factors of 10-50 once mu sits on the data and sigma near its ceiling.
template <typename T, int RB>  // RB: unused (auto-vectorised loops)
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
DCGMM_ISA_VARIANTS(dx_row, dx_row_impl)

// dx: per image, every patch's dpatch = sum_k W[k] sigma^2 (mu - x) folded onto its pixels (one task per image).
template <typename T>
void x_grad(const Geometry& g, const T* x, const T* mu_p, const T* s2_p, const WeightSource<T>& W, T* dx) {
  const int64_t K = g.K, D_pad = g.D_pad, seg = g.kw * g.C;
  const Isa isa = cpu_isa();
  at::parallel_for(0, g.N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<T> xb(D_pad, T(0)), b1(D_pad), wr(K);
    for (int64_t n = n0; n < n1; ++n) {
      T* img = dx + n * g.H * g.W * g.C;
      std::fill(img, img + g.H * g.W * g.C, T(0));
      for (int64_t p = 0; p < g.P; ++p) {
        const int64_t r = n * g.P + p, gi = g.independent ? p : 0;
        std::fill(b1.begin(), b1.end(), T(0));
        gather_range(x, g, n, p, 0, g.D, xb.data());
        W.row(r, wr.data());
        dx_row<T>(isa, wr.data(), K, s2_p + gi * K * D_pad, mu_p + gi * K * D_pad, xb.data(), b1.data(), D_pad);
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
    const at::Tensor& lse, const at::Tensor& kstar_, bool need_x_grad, bool need_param_grads) {
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
  double g_score_all = 0.0;
  if (g_score_.has_value() && g_score_->defined()) {
    TORCH_CHECK(g_score_->numel() == g.M, "g_score: expected (N, H', W'), got ", g_score_->sizes());
    const auto st = g_score_->strides();
    if (g.M > 0 && std::all_of(st.begin(), st.end(), [](int64_t v) { return v == 0; }))
      g_score_all = g_score_->reshape(-1)[0].item<double>();  // one value expanded (a mean's backward): no copy
    else
      g_score = g_score_->contiguous().to(x.scalar_type());
  }
  // the backward reads rows G[kstar, :] of the dense matrix: kron(Gy, Gx) of a factored smoothing (K^2, once)
  at::Tensor Gf;  // the factors, when the layer passed them (the winner sums use them)
  if (smoothing.has_value() && smoothing->defined()) {
    Gf = checked_smoothing(*smoothing, g.K, x.scalar_type());
    G = dense_smoothing(Gf);
    if (Gf.dim() != 3) Gf = at::Tensor();
  }
  // parameter gradients only when asked (sharpening differentiates x alone): empty tensors otherwise
  auto empty = [&] { return at::empty({0}, mu.options()); };  // distinct tensors: outputs must not alias
  auto d_mu = need_param_grads ? new_output(mu.sizes(), mu.options()) : empty();
  auto d_sigma = need_param_grads ? new_output(sigma.sizes(), sigma.options()) : empty();
  auto d_log_pi = need_param_grads ? new_output(log_pi_.sizes(), log_pi_.options()) : empty();
  auto dx = need_x_grad ? new_output(x.sizes(), x.options()) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cgmm_bwd_cpu", [&] {
    using T = scalar_t;
    const WeightSource<T> W{resp.data_ptr<T>(), g_resp.defined() ? g_resp.data_ptr<T>() : nullptr,
                            g_score.defined() ? g_score.data_ptr<T>() : nullptr,
                            G.defined() ? G.data_ptr<T>() : nullptr, T(g_score_all), kstar.data_ptr<int32_t>(),
                            is_mc, g.K};
    const Smoothing<T> S{G.defined() ? G.data_ptr<T>() : nullptr, Gf.defined() ? Gf.data_ptr<T>() : nullptr,
                         Gf.defined() ? Gf.data_ptr<T>() + Gf.size(1) * Gf.size(2) : nullptr,
                         Gf.defined() ? Gf.size(1) : 0};
    if (need_param_grads) {
      GradPlan<T> plan(g, mu.data_ptr<T>(), sigma.data_ptr<T>(), W, S, d_mu.data_ptr<T>(), d_sigma.data_ptr<T>(),
                       d_log_pi.data_ptr<T>());
      param_grads<T>(g, x.data_ptr<T>(), W, plan);
    }
    if (need_x_grad) {
      const T* m = mu.data_ptr<T>();
      const T* s = sigma.data_ptr<T>();
      auto mu_p = padded<T>(m, g.G * g.K, g.D, g.D_pad, [&](int64_t i) { return m[i]; });
      auto s2 = padded<T>(s, g.G * g.K, g.D, g.D_pad, [&](int64_t i) { return s[i] * s[i]; });
      x_grad<T>(g, x.data_ptr<T>(), mu_p.data(), s2.data(), W, dx.data_ptr<T>());
    }
  });
  return {dx, d_mu, d_sigma, d_log_pi};
}

// ------------------------------------------------------------------------------------- forward + gradients
// A training step's forward and the parameter gradients of g_score * sum(score) (the mean score's: g_score = 1 / M)
// in one pass, where the backward takes the winner sums (GradPlan::winners, not the GEMM form): each forward task's
// rows, just gathered and still in cache, go into their winners' sums right after the task (pw_rows), where the
// backward reads them from memory again (preset D's second layer: 100 rows of 400 entries per GMM out of a 1.7 MB
// input). Every sum has the backward's tasks, blocks and order (one thread walks each (tile of GMMs, chunk) unit,
// each GMM's rows in order, float sums per block of PG_ROWS rows, the same inlined row code): the same bits as
// cgmm_fwd_cpp then cgmm_bwd_cpp, which tests/test_fwd_grads.py checks.

// A forward task's rows j0 .. j0 + nvalid - 1 of GMM gi into their winners' float sums f1, f2 (dranges, K, ldx);
// hit, bs as in pw_block; ctr (dranges, ldx). Long segments are read from the input x. Short-segment rows
// (pw_short_segments) come from xt, the task's rows as the forward gathered them (blocks of (D, L):
// forward_block_impl): L entries of the L rows of a block at a time through an in-register transpose into rows
// (L, ldx), then each row as pw_row_add adds a gathered one. The same values in the same order (each winner's rows
// in row order, range by range): the same bits. Preset D's first layer (9 entries in 3 segments per row): its
// per-row gather, with two divisions, and the scalar stores it read back as vectors (a store-to-load forwarding
// stall) were most of this function.
template <typename T, int RB>
inline __attribute__((always_inline)) void pw_rows_impl(const Geometry& g, const T* __restrict__ x,
                                                        const T* __restrict__ xt, T gr, int64_t gi, int64_t j0,
                                                        int64_t nvalid, const int32_t* __restrict__ kstar,
                                                        int64_t dranges, int64_t ldx, const T* __restrict__ ctr,
                                                        T* __restrict__ rows, T* __restrict__ f1, T* __restrict__ f2,
                                                        uint8_t* __restrict__ hit, double* __restrict__ bs) {
  constexpr int L = int(block_rows(RB));
  using V = typename RowVec<T, L>::type;
  const int64_t K = g.K, D = g.D;
  if (gr == T(0)) return;
  auto first_hit = [&](int64_t j) {  // winner j's first row in this block of PG_ROWS rows: its sums start at zero
    hit[j] = 1, bs[j] = 0.0;
    for (int64_t dr = 0; dr < dranges; ++dr) {
      T* a1 = f1 + (dr * K + j) * ldx;
      T* a2 = f2 + (dr * K + j) * ldx;
      std::fill(a1, a1 + ldx, T(0)), std::fill(a2, a2 + ldx, T(0));
    }
  };
  if (!pw_short_segments(g)) {
    for (int64_t i = 0; i < nvalid; ++i) {
      const int64_t r = row_of(g, gi, j0 + i), j = kstar[r];
      if (!hit[j]) first_hit(j);
      for (int64_t dr = 0; dr < dranges; ++dr) {
        const int64_t d0 = dr * PG_DRANGE;
        pw_row_add(g, x, r / g.P, r % g.P, d0, std::min(PG_DRANGE, D - d0), ldx, ctr + dr * ldx, gr,
                   static_cast<T*>(nullptr), f1 + (dr * K + j) * ldx, f2 + (dr * K + j) * ldx);  // no row buffer
      }
      bs[j] += double(gr);
    }
    return;
  }
  for (int64_t b = 0; b * L < nvalid; ++b) {
    const int64_t nb = std::min<int64_t>(L, nvalid - b * L);
    int64_t win[L];
    for (int64_t i = 0; i < nb; ++i) {
      const int64_t j = win[i] = kstar[row_of(g, gi, j0 + b * L + i)];
      if (!hit[j]) first_hit(j);
      bs[j] += double(gr);
    }
    const T* xb = xt + b * D * L;
    for (int64_t dr = 0; dr < dranges; ++dr) {
      const int64_t d0 = dr * PG_DRANGE, dn = std::min(PG_DRANGE, D - d0);
      for (int64_t c = 0; c < ldx; c += L) {  // entries d0 + c .. d0 + c + L - 1 of the block's rows, zero past dn
        V v[L];
        for (int t = 0; t < L; ++t) v[t] = c + t < dn ? load_rv<T, L>(xb + (d0 + c + t) * L) : V{} * T(0);
        transpose_rv<T, L>(v);
        for (int i = 0; i < L; ++i) store_rv<T, L>(rows + i * ldx + c, v[i]);
      }
      for (int64_t i = 0; i < nb; ++i)
        pw_add(rows + i * ldx, ctr + dr * ldx, gr, ldx, f1 + (dr * K + win[i]) * ldx, f2 + (dr * K + win[i]) * ldx);
    }
  }
}
DCGMM_ISA_VARIANTS(pw_rows, pw_rows_impl)

// The units of forward_param_grads, each one thread's: (tile of GMMs, chunk of rows). Few units (a shared layer with
// few rows: one) would leave threads idle, and the two passes are taken instead.
template <typename T>
int64_t fused_units(const Geometry& g, const GradPlan<T>& plan) {
  const int64_t pt = tile_gmms(g, sizeof(T));
  return (g.G + pt - 1) / pt * plan.chunks;
}

template <typename T>
void forward_param_grads(const Geometry& g, const ForwardArgs<T>& a, T gr, GradPlan<T>& plan) {
  const Isa isa = plan.isa;
  const int64_t L = block_rows(register_bytes(isa)), TR = FWD_NR * L;  // TR divides PG_ROWS: blocks end with tasks
  const int64_t K = g.K, D = g.D, rows = plan.rows, chunks = plan.chunks, dranges = plan.dranges, ldx = plan.ldx;
  const int64_t tile = plan.tile, per_gmm = dranges * tile;  // one GMM's sums, all ranges
  const int64_t pt = tile_gmms(g, sizeof(T));
  at::parallel_for(0, fused_units(g, plan), 1, [&](int64_t u0, int64_t u1) {
    std::vector<T> xt(FWD_NR * D * L), lt(FWD_NR * K * L), tmp(K * L), sm(K * L), c(pt * K);
    std::vector<T> ctr(pt * dranges * ldx), xrows(L * ldx), f1(pt * per_gmm), f2(f1.size());
    std::vector<double> B1(f1.size()), B2(f1.size()), b0(pt * dranges * K), bs(pt * K), tmpd(tile), A1(tile),
        A2(tile), wt(K);
    std::vector<uint8_t> hit(pt * K), used(pt * dranges * K);
    for (int64_t u = u0; u < u1; ++u) {  // unit: the GMMs g0 .. g0 + tn - 1, rows jb .. je - 1 of each
      const int64_t g0 = (u / chunks) * pt, cu = u % chunks, tn = std::min(pt, g.G - g0);
      const int64_t jb = cu * PG_CHUNK, je = std::min(rows, jb + PG_CHUNK);
      for (int64_t q = 0; q < tn; ++q) {
        gmm_constants(a.log_pi + (g0 + q) * K, a.sig + (g0 + q) * K * D, K, D, c.data() + q * K);
        for (int64_t dr = 0; dr < dranges; ++dr)
          plan.centre(g0 + q, dr * PG_DRANGE, plan.dn_of(dr), ctr.data() + (q * dranges + dr) * ldx);
      }
      std::fill(hit.begin(), hit.end(), uint8_t(0)), std::fill(used.begin(), used.end(), uint8_t(0));
      for (int64_t j0 = jb; j0 < je; j0 += TR) {
        const int64_t nvalid = std::min(TR, je - j0);
        const bool block_end = (j0 + TR - jb) % PG_ROWS == 0 || j0 + TR >= je;
        for (int64_t q = 0; q < tn; ++q) {
          const int64_t gi = g0 + q;
          forward_block<T>(isa, g, a, gi, j0, nvalid, c.data() + q * K, xt.data(), lt.data(), tmp.data(), sm.data());
          pw_rows<T>(isa, g, a.x, xt.data(), gr, gi, j0, nvalid, a.kstar, dranges, ldx, ctr.data() + q * dranges * ldx,
                     xrows.data(), f1.data() + q * per_gmm, f2.data() + q * per_gmm, hit.data() + q * K,
                     bs.data() + q * K);
          if (!block_end) continue;
          for (int64_t dr = 0; dr < dranges; ++dr) {
            const int64_t o = q * per_gmm + dr * tile, ou = (q * dranges + dr) * K;
            pw_flush(K, plan.dn_of(dr), ldx, f1.data() + o, f2.data() + o, hit.data() + q * K, bs.data() + q * K,
                     used.data() + ou, b0.data() + ou, B1.data() + o, B2.data() + o);
          }
          std::fill(hit.begin() + q * K, hit.begin() + (q + 1) * K, uint8_t(0));
        }
      }
      for (int64_t q = 0; q < tn; ++q)
        for (int64_t dr = 0; dr < dranges; ++dr) {
          const int64_t o = q * per_gmm + dr * tile, ou = (q * dranges + dr) * K;
          plan.winners_done(g0 + q, cu, dr, ctr.data() + (q * dranges + dr) * ldx, used.data() + ou, B1.data() + o,
                            B2.data() + o, b0.data() + ou, tmpd.data(), A1.data(), A2.data(), wt.data());
        }
    }
  });
  plan.reduce_chunks();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
cgmm_fwd_grads_cpu(const at::Tensor& x_, at::Tensor& mu_, at::Tensor& sigma_, const at::Tensor& log_pi_,
                   at::IntArrayRef kernel, at::IntArrayRef stride, c10::string_view loss,
                   const std::optional<at::Tensor>& smoothing, double g_score, const std::optional<at::Tensor>& s_mu,
                   const std::optional<at::Tensor>& s_sigma, double sigma_min, double sigma_max, bool grads_out) {
  const bool update = s_mu.has_value() || s_sigma.has_value();
  TORCH_CHECK(grads_out || update, "grads_out: False needs the step sizes s_mu, s_sigma (the gradients' one use)");
  if (update) {
    TORCH_CHECK(s_mu.has_value() && s_sigma.has_value() && s_mu->numel() == 1 && s_sigma->numel() == 1,
                "s_mu, s_sigma: expected one step size each (or neither)");
    TORCH_CHECK(mu_.is_contiguous() && sigma_.is_contiguous(), "mu, sigma: updated in place, expected contiguous");
    TORCH_CHECK(sigma_min <= sigma_max, "sigma_min: expected at most sigma_max, got ", sigma_min, " > ", sigma_max);
  }
  TORCH_CHECK(std::isfinite(g_score), "g_score: expected a finite number, got ", g_score);
  const ForwardCall f(x_, mu_, sigma_, log_pi_, kernel, stride, loss, smoothing);
  const Geometry& g = f.g;
  const at::Tensor &mu = f.mu, &sigma = f.sigma, &resp = f.resp, &kstar = f.kstar;
  at::Tensor Gd, Gf;  // the smoothing dense, and its factors when the layer passed them
  if (f.G.defined()) {
    Gd = dense_smoothing(f.G);
    if (f.G.dim() == 3) Gf = f.G;
  }
  auto d_mu = grads_out ? new_output(mu.sizes(), mu.options()) : at::empty({0}, mu.options());
  auto d_sigma = grads_out ? new_output(sigma.sizes(), sigma.options()) : at::empty({0}, sigma.options());
  auto d_log_pi = new_output(f.log_pi.sizes(), f.log_pi.options());
  at::Tensor mu_max = at::empty({0}, mu.options());
  AT_DISPATCH_FLOATING_TYPES(f.x.scalar_type(), "cgmm_fwd_grads_cpu", [&] {
    using T = scalar_t;
    const ForwardArgs<T> args = f.args<T>();
    const WeightSource<T> W{resp.data_ptr<T>(), nullptr, nullptr, Gd.defined() ? Gd.data_ptr<T>() : nullptr,
                            T(g_score), kstar.data_ptr<int32_t>(), f.is_mc, g.K};
    const Smoothing<T> S{Gd.defined() ? Gd.data_ptr<T>() : nullptr, Gf.defined() ? Gf.data_ptr<T>() : nullptr,
                         Gf.defined() ? Gf.data_ptr<T>() + Gf.size(1) * Gf.size(2) : nullptr,
                         Gf.defined() ? Gf.size(1) : 0};
    T *dm = grads_out ? d_mu.data_ptr<T>() : nullptr, *ds = grads_out ? d_sigma.data_ptr<T>() : nullptr;
    T* dl = d_log_pi.data_ptr<T>();
    GradPlan<T> plan(g, mu.data_ptr<T>(), sigma.data_ptr<T>(), W, S, dm, ds, dl);
    if (update)  // s_mu, s_sigma: CPU scalars in the parameters' dtype, read as gmm_update_cpp reads them
      plan.set_update(mu.data_ptr<T>(), sigma.data_ptr<T>(), s_mu->item<T>(), s_sigma->item<T>(), T(sigma_min),
                      T(sigma_max));
    if (plan.winners && !f.gemm && fused_units(g, plan) >= 4 * at::get_num_threads()) {
      forward_param_grads<T>(g, args, T(g_score), plan);
    } else {  // the two passes
      forward_blocks<T>(g, args);
      param_grads<T>(g, f.x.data_ptr<T>(), W, plan);
    }
    if (update) {
      T m = T(0);
      for (T v : plan.mu_max) m = abs_max(m, v);
      mu_max = at::full({}, m, mu.options());
    }
  });
  return {f.resp, f.score, f.lse, f.kstar, d_mu, d_sigma, d_log_pi, mu_max};
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
  m.impl("cgmm_fwd_grads_cpp", &cgmm_fwd_grads_cpu);
  m.impl("patch_average_cpp", &patch_average_cpu);
  m.impl("sample_components_cpp", &sample_components_cpu);
}

}  // namespace dcgmm
