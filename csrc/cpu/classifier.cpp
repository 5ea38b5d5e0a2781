// One SGD step of the linear classifier on softmax cross-entropy (``train.classifier_step`` on CPU):
//   logits = features @ weight + bias,  g = (softmax(logits) - onehot(y)) / N,
//   weight -= lr features^T g,  bias -= lr sum_n g,
// returning the batch's mean loss and accuracy. Two parallel regions (the logits by blocks of images, the update by
// chunks of features); the weight is read once into a copy padded to whole vectors of classes and updated in place.
// The ~14 ATen ops and two BLAS products it replaces took preset D's step 0.8-0.9 ms (4225 features, 2 threads);
// this op 0.33 ms.
// Orders: a logit sums its features in order (classes in the vector lanes), a weight's gradient sums the images in
// order (features in the lanes): the same bits for any thread count; the instruction sets differ only where one
// has fused multiply-adds and the other not.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "isa.h"
#include "output.h"

namespace dcgmm {
namespace {

constexpr int IMG_BLOCK = 4;  // images per logits task: each loaded weight row feeds 4 images
constexpr int64_t LOGIT_FEATURES = 256;  // features per chunk of the logits: 256 weight rows of 2 vectors, 16 KB
constexpr int64_t UPDATE_FEATURES = 512;  // features per update task: its gradient (C, 512) stays in L1

// logits rows [n0, n1) of x (N, F) against the weight padded to cp classes wp (F, cp) (cp a multiple of L), NV
// vectors of classes at a time: features in chunks of LOGIT_FEATURES (their weight rows stay in L1 for every block
// of 4 images), each logit's sum carried across the chunks in out, in feature order.
template <typename T, int L, int NV>
inline __attribute__((always_inline)) void logits_classes(const T* x, const T* wp, int64_t F, int64_t cp, int64_t c0,
                                                          int64_t n0, int64_t n1, T* out) {
  using V = typename RowVec<T, L>::type;
  for (int64_t fc = 0; fc < F; fc += LOGIT_FEATURES) {
    const int64_t fe = std::min(F, fc + LOGIT_FEATURES);
    for (int64_t n = n0; n < n1; n += IMG_BLOCK) {
      const int ni = int(std::min<int64_t>(IMG_BLOCK, n1 - n));
      V acc[IMG_BLOCK][NV];
      for (int i = 0; i < IMG_BLOCK; ++i)
        for (int j = 0; j < NV; ++j)
          acc[i][j] = fc == 0 ? V{} * T(0) : load_rv<T, L>(out + (n + std::min(i, ni - 1)) * cp + c0 + j * L);
      const T* xr[IMG_BLOCK];
      for (int i = 0; i < IMG_BLOCK; ++i) xr[i] = x + (n + std::min(i, ni - 1)) * F;
      for (int64_t f = fc; f < fe; ++f) {
        V w[NV];
        for (int j = 0; j < NV; ++j) w[j] = load_rv<T, L>(wp + f * cp + c0 + j * L);
        for (int i = 0; i < IMG_BLOCK; ++i) {
          const T xv = xr[i][f];
          for (int j = 0; j < NV; ++j) acc[i][j] += xv * w[j];
        }
      }
      for (int i = 0; i < ni; ++i)
        for (int j = 0; j < NV; ++j) store_rv<T, L>(out + (n + i) * cp + c0 + j * L, acc[i][j]);
    }
  }
}

template <typename T, int RB>
inline __attribute__((always_inline)) void logits_rows_impl(const T* x, const T* wp, int64_t F, int64_t cp,
                                                            int64_t n0, int64_t n1, T* out) {
  constexpr int L = RB / int(sizeof(T));
  int64_t c0 = 0;
  for (; c0 + 2 * L <= cp; c0 += 2 * L) logits_classes<T, L, 2>(x, wp, F, cp, c0, n0, n1, out);
  if (c0 < cp) logits_classes<T, L, 1>(x, wp, F, cp, c0, n0, n1, out);
}
DCGMM_ISA_VARIANTS(logits_rows, logits_rows_impl)

// features [f0, f1) (f1 - f0 a multiple of L): weight[f, c] -= lr sum_n x[n, f] g[n, c]. The images stream row by
// row (contiguous x[n, f0:f1]) into the chunk's gradient dt (C, f1 - f0), 4 images per load and store of a
// gradient vector; each lane sums its images in order.
template <typename T, int RB>
inline __attribute__((always_inline)) void update_features_impl(const T* x, const T* g, int64_t N, int64_t F,
                                                                int64_t C, T lr, int64_t f0, int64_t f1, T* dt,
                                                                T* w) {
  constexpr int L = RB / int(sizeof(T));
  using V = typename RowVec<T, L>::type;
  const int64_t len = f1 - f0;
  for (int64_t e = 0; e < C * len; ++e) dt[e] = T(0);
  for (int64_t n = 0; n < N; n += IMG_BLOCK) {
    const int ni = int(std::min<int64_t>(IMG_BLOCK, N - n));
    for (int64_t f = 0; f < len; f += L) {
      V xv[IMG_BLOCK];
      for (int i = 0; i < IMG_BLOCK; ++i) xv[i] = i < ni ? load_rv<T, L>(x + (n + i) * F + f0 + f) : V{} * T(0);
      for (int64_t c = 0; c < C; ++c) {
        V acc = load_rv<T, L>(dt + c * len + f);
        for (int i = 0; i < IMG_BLOCK; ++i)
          if (i < ni) acc += g[(n + i) * C + c] * xv[i];
        store_rv<T, L>(dt + c * len + f, acc);
      }
    }
  }
  for (int64_t f = 0; f < len; ++f)
    for (int64_t c = 0; c < C; ++c) w[(f0 + f) * C + c] -= lr * dt[c * len + f];
}
DCGMM_ISA_VARIANTS(update_features, update_features_impl)

std::tuple<at::Tensor, at::Tensor> classifier_step_cpu(at::Tensor& weight, at::Tensor& bias,
                                                       const at::Tensor& features_, const at::Tensor& y_, double lr) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.device().is_cpu(),
              "weight: expected a contiguous (F, C) CPU tensor, got ", weight.sizes());
  const int64_t F = weight.size(0), C = weight.size(1);
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble,
              "weight: expected float32 or float64, got ", weight.scalar_type());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == C && bias.is_contiguous() &&
                  bias.scalar_type() == weight.scalar_type(),
              "bias: expected a contiguous (", C, ",) tensor of the weight's dtype, got ", bias.sizes(), " ",
              bias.scalar_type());
  TORCH_CHECK(features_.dim() == 2 && features_.size(1) == F && features_.scalar_type() == weight.scalar_type(),
              "features: expected (N, ", F, ") of the weight's dtype, got ", features_.sizes(), " ",
              features_.scalar_type());
  const int64_t N = features_.size(0);
  TORCH_CHECK(N >= 1, "features: expected at least one image");
  TORCH_CHECK(y_.dim() == 1 && y_.size(0) == N && y_.scalar_type() == at::kLong,
              "y: expected (", N, ",) int64 labels, got ", y_.sizes(), " ", y_.scalar_type());
  const auto x = features_.contiguous();
  const auto y = y_.contiguous();
  const int64_t* yl = y.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n)
    TORCH_CHECK(yl[n] >= 0 && yl[n] < C, "y: label ", yl[n], " of image ", n, " is outside [0, ", C, ")");
  auto loss = new_output({}, weight.options());
  auto accuracy = new_output({}, weight.options().dtype(at::kFloat));
  const Isa isa = cpu_isa();
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "classifier_step_cpu", [&] {
    using T = scalar_t;
    const int64_t L = register_bytes(isa) / int64_t(sizeof(T));
    const int64_t cp = (C + L - 1) / L * L;
    T* w = weight.data_ptr<T>();
    T* b = bias.data_ptr<T>();
    const T* xp = x.data_ptr<T>();
    // the weight with its classes padded to cp (zeros): whole vectors per row
    std::vector<T> wp(F * cp, T(0));
    for (int64_t f = 0; f < F; ++f) std::copy(w + f * C, w + (f + 1) * C, wp.data() + f * cp);
    std::vector<T> logits(N * cp);
    const int64_t blocks = (N + IMG_BLOCK - 1) / IMG_BLOCK;
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      logits_rows<T>(isa, xp, wp.data(), F, cp, b0 * IMG_BLOCK, std::min(N, b1 * IMG_BLOCK), logits.data());
    });
    // softmax cross-entropy per image: g = (softmax - onehot) / N; loss and accuracy summed in image order
    std::vector<T> g(N * C);
    double loss_sum = 0.0;
    int64_t correct = 0;
    for (int64_t n = 0; n < N; ++n) {
      T* l = logits.data() + n * cp;
      for (int64_t c = 0; c < C; ++c) l[c] += b[c];
      T m = l[0];
      int64_t arg = 0;
      for (int64_t c = 1; c < C; ++c)
        if (l[c] > m || (l[c] != l[c] && m == m)) m = l[c], arg = c;  // the first maximum; NaN counts as one
      T s = T(0);
      for (int64_t c = 0; c < C; ++c) s += std::exp(l[c] - m);
      const T lse = m + std::log(s);
      for (int64_t c = 0; c < C; ++c) g[n * C + c] = (std::exp(l[c] - lse) - T(c == yl[n])) / T(N);
      loss_sum += double(lse - l[yl[n]]);
      correct += arg == yl[n];
    }
    loss.fill_(T(loss_sum / double(N)));
    accuracy.fill_(float(correct) / float(N));
    const T step = T(lr);
    const int64_t fv = F / L * L;  // features in whole vectors, in chunks of UPDATE_FEATURES; the rest below
    const int64_t chunk = std::max<int64_t>(L, UPDATE_FEATURES / L * L), chunks = (fv + chunk - 1) / chunk;
    at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
      std::vector<T> dt(C * chunk);
      for (int64_t k = k0; k < k1; ++k)
        update_features<T>(isa, xp, g.data(), N, F, C, step, k * chunk, std::min(fv, (k + 1) * chunk), dt.data(), w);
    });
    for (int64_t f = fv; f < F; ++f)
      for (int64_t c = 0; c < C; ++c) {
        T s = T(0);
        for (int64_t n = 0; n < N; ++n) s += xp[n * F + f] * g[n * C + c];
        w[f * C + c] -= step * s;
      }
    for (int64_t c = 0; c < C; ++c) {
      T s = T(0);
      for (int64_t n = 0; n < N; ++n) s += g[n * C + c];
      b[c] -= step * s;
    }
  });
  return std::make_tuple(loss, accuracy);
}

}  // namespace

TORCH_LIBRARY_IMPL(dcgmm, CPU, m) { m.impl("classifier_step_cpp", &classifier_step_cpu); }

}  // namespace dcgmm
