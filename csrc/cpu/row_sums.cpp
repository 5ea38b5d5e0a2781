// Fixed-order row sums in float64 (``train.fixed_order_row_sums`` on CPU): the training step's mean score, which the
// annealing controller takes threshold decisions on. Each row is summed in blocks of 256 entries (a last partial
// block alone), the block sums again in blocks of 256, level by level; a block's entries go into four float64
// accumulators by index mod 4, added as (s0 + s1) + (s2 + s3). A row's sum is the same bits for any thread count,
// instruction set and batch split (no other row takes part): the eager, compiled and data-parallel steps agree.
// One op, no parallel region: the ~15 small ATen ops it replaces cost ~0.3 ms a layer per step (preset D's 67,600
// scores sum in ~30 us here).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "output.h"

namespace dcgmm {
namespace {

constexpr int64_t SUM_BLOCK = 256;

template <typename T>
double block_sum(const T* p, int64_t n) {
  double s[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s[0] += double(p[i]);
    s[1] += double(p[i + 1]);
    s[2] += double(p[i + 2]);
    s[3] += double(p[i + 3]);
  }
  for (; i < n; ++i) s[i & 3] += double(p[i]);
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// one row of n entries; level: scratch for the block sums (ceil(n / 256) doubles)
template <typename T>
double row_sum(const T* p, int64_t n, std::vector<double>& level) {
  if (n <= SUM_BLOCK) return block_sum(p, n);
  int64_t m = (n + SUM_BLOCK - 1) / SUM_BLOCK;
  level.resize(m);
  for (int64_t b = 0; b < m; ++b) level[b] = block_sum(p + b * SUM_BLOCK, std::min(SUM_BLOCK, n - b * SUM_BLOCK));
  while (m > SUM_BLOCK) {  // in place: block b's sum goes to slot b, which its own block has already read
    const int64_t next = (m + SUM_BLOCK - 1) / SUM_BLOCK;
    for (int64_t b = 0; b < next; ++b)
      level[b] = block_sum(level.data() + b * SUM_BLOCK, std::min(SUM_BLOCK, m - b * SUM_BLOCK));
    m = next;
  }
  return block_sum(level.data(), m);
}

at::Tensor fixed_order_sums_cpu(const at::Tensor& rows_) {
  TORCH_CHECK(rows_.dim() == 2, "rows: expected (R, M), got ", rows_.sizes());
  TORCH_CHECK(rows_.scalar_type() == at::kFloat || rows_.scalar_type() == at::kDouble,
              "rows: expected float32 or float64, got ", rows_.scalar_type());
  const auto rows = rows_.contiguous();
  const int64_t R = rows.size(0), M = rows.size(1);
  auto out = new_output({R}, rows.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "fixed_order_sums_cpu", [&] {
    const scalar_t* p = rows.data_ptr<scalar_t>();
    std::vector<double> level;
    for (int64_t r = 0; r < R; ++r) o[r] = row_sum(p + r * M, M, level);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dcgmm, CPU, m) { m.impl("fixed_order_sums_cpp", &fixed_order_sums_cpu); }

}  // namespace dcgmm
