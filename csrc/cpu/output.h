// Outputs of the C++ CPU kernels. Tests set DCGMM_POISON=1: outputs are then filled with NaN (-1 for integer
// tensors such as kstar) before a kernel writes them, so a test can check that every element was written.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdlib>

namespace dcgmm {

inline bool poison() {
  const char* v = std::getenv("DCGMM_POISON");
  return v != nullptr && v[0] == '1';
}

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  auto t = at::empty(sizes, opts);
  if (poison()) {
    if (at::isFloatingType(opts.dtype().toScalarType()))
      t.fill_(NAN);
    else
      t.fill_(-1);
  }
  return t;
}

}  // namespace dcgmm
