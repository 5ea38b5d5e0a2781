// The cGMM forward of a shared layer with many patch entries on Hopper (sm_90a): warpgroup MMA (wgmma) in split
// TF32 (3xTF32: a_lo b_hi + a_hi b_lo + a_hi b_hi, ~fp32 accuracy on the tensor cores) on the centred GEMM form
// (gpu_review.md "A faster design"):
//   ls[r, k] = c'[k] + sum_d xc[r, d] B[k, d] + sum_d xc[r, d]^2 S[k, d],   xc = x - ctr,  ctr[d] = mean_k mu[k, d],
//   B = sigma^2 (mu - ctr),  S = -sigma^2 / 2,  c'[k] = log_pi[k] + sum_d log sigma - 1/2 sum_d sigma^2 (mu - ctr)^2
// i.e. one GEMM of the rows [xc | xc^2] (M x 2Dp) with [B | S]^T (2Dp x Np), then cgmm_math.h's row_epilogue.
//
// One CTA takes 64 rows and two warpgroups. Warpgroup 0 (producer) builds each 64 x 32 tile of [xc | xc^2] in shared
// memory straight from the NHWC input (implicit im2col: an 8x8 stride-1 layer does not re-read each pixel from a
// 64x larger patch matrix), splits it into TF32 hi/lo and copies the prepared parameter tile; warpgroup 1 (consumer)
// issues 12 wgmma per tile into N/2 fp32 accumulators per thread. Three stages; producer and consumer hand stages
// over through named barriers (bar.arrive / bar.sync: FULL 1..3, EMPTY 4..6). Operands in the canonical K-major
// no-swizzle layout (8-row x 16-byte core matrices; SBO 128 bytes between rows of cores, LBO between k chunks).
// Reachable only by name (DCGMM_CUDA_FORWARD=wgmma) until the GPU check has verified it against float64.
#include <math_constants.h>

#include "cgmm_math.h"
#include "common.cuh"

namespace dcgmm {
namespace cuda {
namespace {

constexpr int BM = 64;        // rows per CTA: one m64 warpgroup MMA
constexpr int BK = WG_BK;     // GEMM-k entries per stage: 4 k8 steps
constexpr int STAGES = 3;
constexpr int THREADS = 256;  // producer warpgroup + consumer warpgroup

// float index of entry (row, kk) of an R x BK tile in core-matrix layout: cores (row / 8, kk / 4), k chunks outer
__host__ __device__ __forceinline__ int core_index(int row, int kk, int R) {
  return ((kk >> 2) * (R >> 3) + (row >> 3)) * 32 + (row & 7) * 4 + (kk & 3);
}

__device__ __forceinline__ float to_tf32(float v) {
  uint32_t u;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(u) : "f"(v));
  return __uint_as_float(u);
}

// ------------------------------------------------------------------------------------------ parameter prep
__global__ void prep_center_kernel(Geo g, int64_t dp, int64_t np, const float* __restrict__ mu,
                                   const float* __restrict__ sigma, const float* __restrict__ log_pi,
                                   float* __restrict__ ctr, float* __restrict__ cprime) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < dp) {
    double s = 0.0;
    if (i < g.D)
      for (int64_t k = 0; k < g.K; ++k) s += double(mu[k * g.D + i]);
    ctr[i] = i < g.D ? float(s / double(g.K)) : 0.f;
  }
  if (i < np) {  // c' from the float ctr the producer subtracts (recomputed here: no second launch)
    double acc = 0.0;
    if (i < g.K) {
      acc = double(log_pi[i]);
      for (int64_t d = 0; d < g.D; ++d) {
        double c = 0.0;
        for (int64_t k = 0; k < g.K; ++k) c += double(mu[k * g.D + d]);
        const double cd = double(float(c / double(g.K)));
        const double s = double(sigma[i * g.D + d]), m = double(mu[i * g.D + d]) - cd;
        acc += log(s) - 0.5 * s * s * m * m;
      }
    }
    cprime[i] = float(acc);
  }
}

// B tiles: tile t of [B | S] (Np x 32 entries of the GEMM k), TF32 hi then lo, each in core-matrix layout
__global__ void prep_b_kernel(Geo g, int64_t dp, int64_t np, const float* __restrict__ mu,
                              const float* __restrict__ sigma, const float* __restrict__ ctr, float* __restrict__ b) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, per_tile = np * BK;
  if (i >= 2 * dp * np) return;
  const int64_t t = i / per_tile, rem = i - t * per_tile, n = rem / BK, kk = rem - n * BK, q = t * BK + kk;
  float v = 0.f;
  if (n < g.K) {
    const bool sq = q >= dp;
    const int64_t d = sq ? q - dp : q;
    if (d < g.D) {
      const float s = sigma[n * g.D + d];
      v = sq ? -0.5f * s * s : s * s * (mu[n * g.D + d] - ctr[d]);
    }
  }
  const float hi = to_tf32(v), lo = to_tf32(v - hi);
  float* tile = b + t * 2 * per_tile;
  const int ci = core_index(int(n), int(kk), int(np));
  tile[ci] = hi;
  tile[per_tile + ci] = lo;
}

// ------------------------------------------------------------------------------------------ wgmma plumbing
// (compiled for the host and sm_90a only: other device passes build the kernel as a trap)
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DCGMM_WGMMA 1
constexpr int BAR_FULL = 1, BAR_EMPTY = 1 + STAGES, BAR_PRODUCERS = 14, BAR_CONSUMERS = 15;

__device__ __forceinline__ void named_sync(int id, int n) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(n) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int n) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(n) : "memory");
}

// shared-memory matrix descriptor, no swizzle: start, leading (k) and stride (m/n) byte offsets, each >> 4
__device__ __forceinline__ uint64_t smem_desc(const float* p, uint32_t lbo, uint32_t sbo) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t((lbo & 0x3FFFF) >> 4) << 16) |
         (uint64_t((sbo & 0x3FFFF) >> 4) << 32);
}

template <int N>
__device__ __forceinline__ void wgmma_tf32(float (&d)[N / 2], uint64_t a, uint64_t b);

template <>
__device__ __forceinline__ void wgmma_tf32<32>(float (&d)[16], uint64_t a, uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k8.f32.tf32.tf32 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, "
      "%13, %14, %15"
      "}, %16, %17, p, 1, 1;\n}\n"
      :
        "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "l"(a), "l"(b), "r"(1));
}

template <>
__device__ __forceinline__ void wgmma_tf32<64>(float (&d)[32], uint64_t a, uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, "
      "%13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, "
      "%26, %27, %28, %29, %30, %31"
      "}, %32, %33, p, 1, 1;\n}\n"
      :
        "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(a), "l"(b), "r"(1));
}

template <>
__device__ __forceinline__ void wgmma_tf32<104>(float (&d)[52], uint64_t a, uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %54, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n104k8.f32.tf32.tf32 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, "
      "%13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, "
      "%26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, "
      "%39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51"
      "}, %52, %53, p, 1, 1;\n}\n"
      :
        "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51])
      : "l"(a), "l"(b), "r"(1));
}

template <>
__device__ __forceinline__ void wgmma_tf32<128>(float (&d)[64], uint64_t a, uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k8.f32.tf32.tf32 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, "
      "%13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, "
      "%26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, "
      "%39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, "
      "%52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, p, 1, 1;\n}\n"
      :
        "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(a), "l"(b), "r"(1));
}

template <int R>
__device__ __forceinline__ void fence_registers(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
#endif  // DCGMM_WGMMA

// ------------------------------------------------------------------------------------------ the kernel
template <int N>
__global__ void __launch_bounds__(THREADS, 1)
    wgmma_forward_kernel(Geo g, int64_t dp, const float* __restrict__ x, const float* __restrict__ b,
                         const float* __restrict__ ctr, const float* __restrict__ cprime, int is_mc,
                         const float* __restrict__ G, int sep_n, float* resp, float* __restrict__ score,
                         float* __restrict__ lse, int32_t* __restrict__ kstar) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int A_F = BM * BK, B_F = N * BK, STAGE_F = 2 * A_F + 2 * B_F;
  constexpr int KMAX = N <= 32 ? 32 : (N <= 64 ? 64 : 128);
  extern __shared__ __align__(128) float smem[];
  float* tile = smem + STAGES * STAGE_F;                         // (BM, N) products for the epilogue
  int64_t* row_base = reinterpret_cast<int64_t*>(tile + BM * N);  // (BM,) first entry of each row's patch
  int64_t* d_off = row_base + BM;                                 // (dp,) offset of entry d within a patch
  const int tid = threadIdx.x, lt = tid & 127;
  const int64_t row0 = int64_t(blockIdx.x) * BM;
  const int T = int(2 * dp / BK);
  if (tid < 128) {  // ---------------- producer
    const int64_t kwc = g.kw * g.C;
    for (int m = lt; m < BM; m += 128) {
      const int64_t r = row0 + m, n = r / g.P, p = r - n * g.P, oy = p / g.Wo, ox = p - oy * g.Wo;
      row_base[m] = r < g.M ? n * g.sN + oy * g.sh * g.sH + ox * g.sw * g.C : -1;
    }
    for (int64_t d = lt; d < dp; d += 128) d_off[d] = d < g.D ? (d / kwc) * g.sH + d % kwc : -1;
    named_sync(BAR_PRODUCERS, 128);
    for (int t = 0; t < T; ++t) {
      const int s = t % STAGES;
      if (t >= STAGES) named_sync(BAR_EMPTY + s, THREADS);
      float* st = smem + s * STAGE_F;
      for (int i = lt; i < BM * BK; i += 128) {
        const int m = i / BK, kk = i % BK;
        const int64_t q = int64_t(t) * BK + kk;
        const bool sq = q >= dp;
        const int64_t d = sq ? q - dp : q;
        const int64_t base = row_base[m], off = d_off[d];
        float v = 0.f;
        if (base >= 0 && off >= 0) {
          v = x[base + off] - ctr[d];
          if (sq) v = v * v;
        }
        const float hi = to_tf32(v), lo = to_tf32(v - hi);
        const int ci = core_index(m, kk, BM);
        st[ci] = hi;
        st[A_F + ci] = lo;
      }
      const float4* src = reinterpret_cast<const float4*>(b + int64_t(t) * 2 * B_F);
      float4* dst = reinterpret_cast<float4*>(st + 2 * A_F);
      for (int i = lt; i < 2 * B_F / 4; i += 128) dst[i] = src[i];
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // generic writes -> visible to wgmma
      named_arrive(BAR_FULL + s, THREADS);
    }
  } else {  // ---------------- consumer
    float acc[N / 2];
#pragma unroll
    for (int i = 0; i < N / 2; ++i) acc[i] = 0.f;
    constexpr uint32_t LBO_A = (BM / 8) * 128, LBO_B = (N / 8) * 128, SBO = 128;
    for (int t = 0; t < T; ++t) {
      const int s = t % STAGES;
      named_sync(BAR_FULL + s, THREADS);
      const float* st = smem + s * STAGE_F;
      fence_registers(acc);
      asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
      for (int j = 0; j < BK / 8; ++j) {  // k8 step j: k chunks 2j, 2j + 1
        const uint64_t a_hi = smem_desc(st + 2 * j * (BM / 8) * 32, LBO_A, SBO);
        const uint64_t a_lo = smem_desc(st + A_F + 2 * j * (BM / 8) * 32, LBO_A, SBO);
        const uint64_t b_hi = smem_desc(st + 2 * A_F + 2 * j * (N / 8) * 32, LBO_B, SBO);
        const uint64_t b_lo = smem_desc(st + 2 * A_F + B_F + 2 * j * (N / 8) * 32, LBO_B, SBO);
        wgmma_tf32<N>(acc, a_lo, b_hi);  // small terms first
        wgmma_tf32<N>(acc, a_hi, b_lo);
        wgmma_tf32<N>(acc, a_hi, b_hi);
      }
      asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
      asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
      fence_registers(acc);
      if (t + STAGES < T) named_arrive(BAR_EMPTY + s, THREADS);
    }
    // accumulator fragment (m64nN f32): warp w rows 16w + lane/4 (+8), columns 8i + 2 (lane % 4) (+1)
    const int w = lt >> 5, l = lt & 31;
#pragma unroll
    for (int i = 0; i < N / 8; ++i) {
      const int rr = 16 * w + (l >> 2), cc = 8 * i + 2 * (l & 3);
      tile[rr * N + cc] = acc[4 * i];
      tile[rr * N + cc + 1] = acc[4 * i + 1];
      tile[(rr + 8) * N + cc] = acc[4 * i + 2];
      tile[(rr + 8) * N + cc + 1] = acc[4 * i + 3];
    }
    named_sync(BAR_CONSUMERS, 128);
    const int64_t r = row0 + lt;
    if (lt < BM && r < g.M) {
      float ls[KMAX];
#pragma unroll
      for (int k = 0; k < KMAX; ++k) ls[k] = k < g.K ? cprime[k] + tile[lt * N + k] : -CUDART_INF_F;
      float sc, l2;
      int32_t ks;
      // separable smoothing's scratch: stage 0's buffers (every stage consumed), column lt
      row_epilogue<KMAX>(ls, g.K, is_mc != 0, G, sep_n, smem + lt, BM, float(0.5 * double(g.D) * 1.8378770664093453),
                         resp + r * g.K, sc, l2, ks);
      score[r] = sc, lse[r] = l2, kstar[r] = ks;
    }
  }
#else
  __trap();  // built without sm_90a features: the host entry refuses such devices before launching
#endif
}

template <int N>
size_t smem_bytes(int64_t dp) {
  return size_t(STAGES) * (2 * BM * BK + 2 * N * BK) * 4 + size_t(BM) * N * 4 + size_t(BM + dp) * 8;
}

template <int N>
int launch(const Geo& g, int64_t dp, const float* x, const Workspace& w, int is_mc, const float* G, int sep_n,
           float* resp, float* score, float* lse, int32_t* kstar, cudaStream_t st) {
  const size_t smem = smem_bytes<N>(dp);
  cudaError_t err = cudaFuncSetAttribute(wgmma_forward_kernel<N>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         int(smem));
  if (err != cudaSuccess) return int(err);
  wgmma_forward_kernel<N><<<unsigned((g.M + BM - 1) / BM), THREADS, smem, st>>>(g, dp, x, w.wg_b, w.wg_ctr, w.wg_c,
                                                                                is_mc, G, sep_n, resp, score, lse,
                                                                                kstar);
  return launched();
}

}  // namespace
}  // namespace cuda
}  // namespace dcgmm

using namespace dcgmm::cuda;

extern "C" int dcgmm_cgmm_fwd_wgmma(const dcgmm_shape* s, const float* x, const float* mu, const float* sigma,
                                    const float* log_pi, int is_mc, const float* smoothing, int smoothing_n,
                                    float* resp, float* score, float* lse, int32_t* kstar, void* workspace,
                                    int64_t workspace_bytes, void* stream) {
  Geo g;
  Workspace w;
  int err = prologue(s, x, smoothing, smoothing_n, DCGMM_WS_FORWARD, workspace, workspace_bytes, g, w);
  if (err != 0) return err;
  if (g.independent) return fail("wgmma forward: shared mode only (mu (K, D))");
  const int64_t dp = wg_dp(g.D), np = wg_np(g.K);
  if (dp > WG_MAX_DP) return fail("wgmma forward: at most %lld patch entries, got %lld", WG_MAX_DP, g.D);
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
    return int(cudaGetLastError());
  if (major != 9) return int(cudaErrorNoKernelImageForDevice);  // sm_90a SASS only (no PTX fallback for wgmma)
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int64_t n1 = dp > np ? dp : np, n2 = 2 * dp * np;
  prep_center_kernel<<<unsigned((n1 + 127) / 128), 128, 0, st>>>(g, dp, np, mu, sigma, log_pi, w.wg_ctr, w.wg_c);
  prep_b_kernel<<<unsigned((n2 + 255) / 256), 256, 0, st>>>(g, dp, np, mu, sigma, w.wg_ctr, w.wg_b);
  if ((err = launched()) != 0) return err;
  const float* G = is_mc ? smoothing : nullptr;
  switch (np) {
    case 32: return launch<32>(g, dp, x, w, is_mc, G, smoothing_n, resp, score, lse, kstar, st);
    case 64: return launch<64>(g, dp, x, w, is_mc, G, smoothing_n, resp, score, lse, kstar, st);
    case 104: return launch<104>(g, dp, x, w, is_mc, G, smoothing_n, resp, score, lse, kstar, st);
    default: return launch<128>(g, dp, x, w, is_mc, G, smoothing_n, resp, score, lse, kstar, st);
  }
}
