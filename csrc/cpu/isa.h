// The instruction set of the CPU kernels' hot functions, chosen per call.
//
// Each hot function is an always-inline template IMPL<T, RB> on the register width RB in bytes (64: AVX-512,
// 32: AVX2 + FMA, 16: baseline x86-64 / any other CPU), so that its vector-extension types are one register wide:
// a 64-byte vector on an AVX2 machine is two registers, and the forward's 16-row blocks (4 accumulators of them)
// spilled to the stack there (preset D's second layer 29 ms per forward on a 2-core Zen 3, 9 ms with one-register
// vectors). DCGMM_ISA_VARIANTS(NAME, IMPL) compiles IMPL once per instruction set (GCC target attributes) and
// defines NAME<T>(isa, args...), which runs the build for isa; cpu_isa() is the best set this CPU has, capped by
// the environment variable DCGMM_CPU_ISA=avx512|avx2|baseline (read per call: tests run every build on one
// machine). The sums of each vector lane are the same in every build (rows or entries in lanes, never across).
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace dcgmm {

enum class Isa : int { baseline = 0, avx2 = 1, avx512 = 2 };

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define DCGMM_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define DCGMM_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
inline Isa best_cpu_isa() {
  static const Isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return Isa::avx512;
    if (__builtin_cpu_supports("x86-64-v3")) return Isa::avx2;
    return Isa::baseline;
  }();
  return best;
}
#else  // another compiler or CPU: the baseline build alone (its vectors are 16 bytes: SSE2, NEON)
#define DCGMM_TARGET_AVX512
#define DCGMM_TARGET_AVX2
inline Isa best_cpu_isa() { return Isa::baseline; }
#endif

// The name DCGMM_CPU_ISA and torch.ops.dcgmm.cpu_isa_cpp() use for each set.
inline const char* isa_name(Isa isa) {
  return isa == Isa::avx512 ? "avx512" : (isa == Isa::avx2 ? "avx2" : "baseline");
}

inline Isa cpu_isa() {
  const Isa best = best_cpu_isa();
  const char* v = std::getenv("DCGMM_CPU_ISA");
  if (v == nullptr || v[0] == '\0') return best;
  for (const Isa want : {Isa::avx512, Isa::avx2, Isa::baseline})
    if (std::strcmp(v, isa_name(want)) == 0) return int(want) < int(best) ? want : best;  // never above the CPU's
  TORCH_CHECK(false, "DCGMM_CPU_ISA: expected avx512, avx2 or baseline, got '", v, "'");
}

// L lanes of T (GCC vector extension), unaligned loads and stores.
template <typename T, int L>
struct RowVec {
  typedef T type __attribute__((vector_size(L * sizeof(T))));
};
template <typename T, int L>
inline __attribute__((always_inline)) typename RowVec<T, L>::type load_rv(const T* p) {
  typename RowVec<T, L>::type v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T, int L>
inline __attribute__((always_inline)) void store_rv(T* p, typename RowVec<T, L>::type v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

// The register width RB (bytes) each build's kernels are compiled with (DCGMM_ISA_VARIANTS below): what a caller
// sizes its buffers by.
inline int register_bytes(Isa isa) { return isa == Isa::avx512 ? 64 : (isa == Isa::avx2 ? 32 : 16); }

// NAME_avx512 / NAME_avx2 / NAME_baseline: IMPL<T, 64 / 32 / 16> compiled for that set; NAME<T>(isa, args...).
#define DCGMM_ISA_VARIANTS(NAME, IMPL)                                                   \
  template <typename T, typename... A>                                                   \
  DCGMM_TARGET_AVX512 auto NAME##_avx512(A... a) {                                       \
    return IMPL<T, 64>(a...);                                                            \
  }                                                                                      \
  template <typename T, typename... A>                                                   \
  DCGMM_TARGET_AVX2 auto NAME##_avx2(A... a) {                                           \
    return IMPL<T, 32>(a...);                                                            \
  }                                                                                      \
  template <typename T, typename... A>                                                   \
  auto NAME##_baseline(A... a) {                                                         \
    return IMPL<T, 16>(a...);                                                            \
  }                                                                                      \
  template <typename T, typename... A>                                                   \
  inline auto NAME(Isa isa, A... a) {                                                    \
    return isa == Isa::avx512 ? NAME##_avx512<T>(a...)                                   \
                              : (isa == Isa::avx2 ? NAME##_avx2<T>(a...) : NAME##_baseline<T>(a...)); \
  }

}  // namespace dcgmm
