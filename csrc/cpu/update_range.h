// The update rule's elementwise pass, shared by gmm_update_cpp (update.cpp) and the one-pass training step
// (cgmm.cpp cgmm_fwd_grads_cpp): p = fma(g, s, p) per entry, sigma clamped, and max |p| after it.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "isa.h"

namespace dcgmm {
namespace {

// max(m, |v|), NaN sticking: the result is NaN once any v is
template <typename T>
inline __attribute__((always_inline)) T abs_max(T m, T v) {
  const T a = std::abs(v);
  return (a != a || m != m) ? (m != m ? m : a) : (a > m ? a : m);
}

// p[i] = fma(g[i], s, p[i]) (clamped to [lo, hi] when clamp; NaN stays NaN), and max |p[i]| after the update (NaN
// when any is NaN). One register of entries at a time; each entry's fma and clamp are the same in every build and
// the maximum is exact in any order.
template <typename T, int RB>
inline __attribute__((always_inline)) T update_range_impl(T* __restrict__ p, const T* __restrict__ g, T s,
                                                          int64_t n, bool clamp, T lo, T hi) {
  constexpr int VL = RB / int(sizeof(T));
  using V = typename RowVec<T, VL>::type;
  V mv = V{} * T(0);
  auto nanv = mv != mv;  // lanes that met a NaN (all bits set), or-ed as integer masks: no lane extraction per step
  bool nan = false;
  int64_t i = 0;
  for (; i + VL <= n; i += VL) {
    const V gv = load_rv<T, VL>(g + i), pv = load_rv<T, VL>(p + i);
    V v;
    for (int l = 0; l < VL; ++l) v[l] = std::fma(gv[l], s, pv[l]);
    if (clamp) {  // comparisons with NaN are false: NaN passes through
      v = v < lo ? V{} + lo : v;
      v = v > hi ? V{} + hi : v;
    }
    store_rv<T, VL>(p + i, v);
    const V av = v < T(0) ? -v : v;
    mv = av > mv ? av : mv;
    nanv |= v != v;
  }
  for (int l = 0; l < VL; ++l) nan |= nanv[l] != 0;
  T m = T(0);
  for (int l = 0; l < VL; ++l) m = mv[l] > m ? mv[l] : m;
  for (; i < n; ++i) {
    T v = std::fma(g[i], s, p[i]);
    if (clamp) v = v < lo ? lo : (v > hi ? hi : v);
    p[i] = v;
    nan |= v != v;
    m = std::abs(v) > m ? std::abs(v) : m;
  }
  return nan ? std::numeric_limits<T>::quiet_NaN() : m;
}
DCGMM_ISA_VARIANTS(update_range, update_range_impl)

}  // namespace
}  // namespace dcgmm
