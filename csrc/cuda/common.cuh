// Shared by the .cu files of libdcgmm_cuda.so: the geometry of a call, argument checks with a readable message,
// the workspace layout, the launch helpers. Each .cu file includes this and compiles on its own.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include <cstdio>

#include "dcgmm_cuda.h"

namespace dcgmm {
namespace cuda {

constexpr int ROWS = 64;         // threads (rows) per block of the row kernels; the fixed row blocks of every sum
constexpr int KMAX_LIMIT = 128;  // components per layer these kernels take
constexpr int DCHUNK = 64;       // patch entries per pass of the block reductions (bounds their shared memory)
constexpr int64_t ALIGN = 256;

// the reason for the last cudaErrorInvalidValue of this thread (dcgmm_cuda_last_message)
char* message_buffer();
int fail(const char* fmt, long long a = 0, long long b = 0);

struct Geo {
  int64_t N, H, W, C, sN, sH, kh, kw, sh, sw, K, Ho, Wo, P, M, D, Gc, kmax, nchunks, nblocks;
  bool independent;
};

inline int64_t kmax_for(int64_t K) { return K <= 32 ? 32 : (K <= 64 ? 64 : 128); }

// Fills g from s; returns 0 or cudaErrorInvalidValue with the message set.
inline int make_geo(const dcgmm_shape* s, Geo& g) {
  message_buffer()[0] = 0;
  if (s == nullptr) return fail("shape: NULL");
  g.N = s->N, g.H = s->H, g.W = s->W, g.C = s->C, g.sN = s->stride_n, g.sH = s->stride_h;
  g.kh = s->kh, g.kw = s->kw, g.sh = s->sh, g.sw = s->sw, g.K = s->K, g.independent = s->independent != 0;
  if (g.N < 1 || g.H < 1 || g.W < 1 || g.C < 1) return fail("x: expected positive sizes (N, H, W, C)");
  if (g.kh < 1 || g.kw < 1 || g.sh < 1 || g.sw < 1) return fail("kernel, stride: expected positive ints");
  if (g.kh > g.H || g.kw > g.W) return fail("kernel: larger than the input (%lld x %lld)", g.H, g.W);
  if (g.K < 1 || g.K > KMAX_LIMIT)
    return fail("K: the cuda backend takes 1 <= K <= 128 components, got %lld; use backend='triton'", g.K);
  g.Ho = (g.H - g.kh) / g.sh + 1, g.Wo = (g.W - g.kw) / g.sw + 1, g.P = g.Ho * g.Wo, g.M = g.N * g.P;
  g.D = g.kh * g.kw * g.C, g.Gc = g.independent ? g.P : 1, g.kmax = kmax_for(g.K);
  if (g.independent && g.P > 65535) return fail("independent mode: at most 65535 positions, got %lld", g.P);
  g.nchunks = (g.N + ROWS - 1) / ROWS;
  g.nblocks = g.independent ? g.nchunks * g.P : (g.M + ROWS - 1) / ROWS;  // row blocks, in the sums' order
  return 0;
}

// the warpgroup-MMA forward (cgmm_wgmma.cu): patch entries padded to a multiple of 16, components to an MMA width
constexpr int WG_BK = 32;
constexpr int64_t WG_MAX_DP = 4096;
inline int64_t wg_dp(int64_t D) { return (D + 15) / 16 * 16; }
inline int64_t wg_np(int64_t K) { return K <= 32 ? 32 : (K <= 64 ? 64 : (K <= 104 ? 104 : 128)); }

inline int64_t aligned(int64_t bytes) { return (bytes + ALIGN - 1) / ALIGN * ALIGN; }

// Workspace layout: [prm floats (Gc, D, kmax, 2)] [c floats (Gc, kmax)] [partials floats (nblocks, K, 1 + 2D)]
// [dx patches floats (M, D)] [g_log_pi doubles (Gc, K)]; each op uses a prefix of the parts it needs. A shared
// forward also reserves the warpgroup-MMA kernel's [B tiles (2 Dp / 32, hi/lo, Np x 32)] [ctr (Dp)] [c' (Np)].
struct Workspace {
  float *prm, *c, *partials, *dxp, *wg_b, *wg_ctr, *wg_c;
  double* glp;
  int64_t bytes;
};

inline Workspace layout(const Geo& g, int op, char* base) {
  Workspace w{};
  int64_t off = 0;
  auto take = [&](int64_t bytes) { char* p = base ? base + off : nullptr; off += aligned(bytes); return p; };
  if (op != DCGMM_WS_STEP_FINALIZE) {
    w.prm = reinterpret_cast<float*>(take(g.Gc * g.D * g.kmax * 2 * 4));
    w.c = reinterpret_cast<float*>(take(g.Gc * g.kmax * 4));
  }
  if (op == DCGMM_WS_FORWARD && !g.independent && wg_dp(g.D) <= WG_MAX_DP) {
    const int64_t dp = wg_dp(g.D), np = wg_np(g.K);
    w.wg_b = reinterpret_cast<float*>(take(2 * dp * 2 * np * 4));
    w.wg_ctr = reinterpret_cast<float*>(take(dp * 4));
    w.wg_c = reinterpret_cast<float*>(take(np * 4));
  }
  if (op == DCGMM_WS_BACKWARD || op == DCGMM_WS_STEP_PARTIALS)
    w.partials = reinterpret_cast<float*>(take(g.nblocks * g.K * (1 + 2 * g.D) * 4));
  if (op == DCGMM_WS_BACKWARD) w.dxp = reinterpret_cast<float*>(take(g.M * g.D * 4));
  if (op == DCGMM_WS_STEP_FINALIZE) w.glp = reinterpret_cast<double*>(take(g.Gc * g.K * 8));
  w.bytes = off;
  return w;
}

inline int check_workspace(const Geo& g, int op, void* ws, int64_t bytes, Workspace& w) {
  w = layout(g, op, static_cast<char*>(ws));
  if (bytes < w.bytes) return fail("workspace: %lld bytes given, %lld needed", bytes, w.bytes);
  if (ws == nullptr && w.bytes > 0) return fail("workspace: NULL");
  return 0;
}

inline int check_x(const Geo& g, const float* x) {
  if (x == nullptr) return fail("x: NULL");
  if (g.sH < g.W * g.C || g.sN < g.H * g.sH - (g.sH - g.W * g.C))
    return fail("x: pixel rows and images must not overlap (stride_h %lld, stride_n %lld)", g.sH, g.sN);
  return 0;
}

// the smoothing argument: dense (K, K) (n == 0) or factors (2, n, n) with n * n == K
inline int check_smoothing(const Geo& g, const float* G, int n) {
  if (G != nullptr && n != 0 && int64_t(n) * n != g.K)
    return fail("smoothing: factors (2, n, n) need n * n == K, got n = %lld, K = %lld", n, g.K);
  return 0;
}

// The checks every entry point of a cGMM op starts with: geometry, x's strides, the smoothing, the workspace.
inline int prologue(const dcgmm_shape* s, const float* x, const float* smoothing, int smoothing_n, int op,
                    void* workspace, int64_t workspace_bytes, Geo& g, Workspace& w) {
  int err = make_geo(s, g);
  if (err == 0) err = check_x(g, x);
  if (err == 0) err = check_smoothing(g, smoothing, smoothing_n);
  if (err == 0) err = check_workspace(g, op, workspace, workspace_bytes, w);
  return err;
}

inline int launched() { return static_cast<int>(cudaGetLastError()); }

// Packs the parameters for the row kernels (cgmm_math.h): prm[g][d][k] = (mu, sigma), zero for k >= K, and
// c[g][k] = log_pi + sum_d log sigma (summed in double).
int pack_params(const Geo& g, const float* mu, const float* sigma, const float* log_pi, float* prm, float* c,
                cudaStream_t stream);

}  // namespace cuda
}  // namespace dcgmm
