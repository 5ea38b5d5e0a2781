// The C ABI of libdcgmm_cuda.so: torch-free CUDA kernels of the cGMM op (design.md "Backends", issue 23).
//
// Every entry point takes raw device pointers, int64 sizes (a dcgmm_shape) and the cudaStream_t to launch on, and
// returns a cudaError_t as int (0 = success; cudaErrorInvalidValue = 1 for an argument this library refuses, with
// the reason in dcgmm_cuda_last_message()). Nothing here allocates: the caller passes a workspace of at least
// dcgmm_cuda_workspace_bytes(...) bytes (torch's caching allocator), so CUDA graphs capture the launches as they are.
// Tensors are float32 and contiguous, except x, whose image and row strides are free (entries and pixels contiguous:
// stride_c == 1, stride_w == C). Loaded by dcgmm_fast/backends/cuda.py through ctypes.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  int64_t N, H, W, C;              // input (N, H, W, C)
  int64_t stride_n, stride_h;      // x's strides (elements) of an image and of a pixel row
  int64_t kh, kw, sh, sw;          // window and stride
  int64_t K;                       // components (<= 128)
  int64_t independent;             // 1: mu (P, K, D); 0: mu (K, D)
} dcgmm_shape;

// which op a workspace is for
enum { DCGMM_WS_FORWARD = 0, DCGMM_WS_BACKWARD = 1, DCGMM_WS_STEP_PARTIALS = 2, DCGMM_WS_STEP_FINALIZE = 3 };

int dcgmm_cuda_abi_version(void);
// number of CUDA devices; a machine without a driver or GPU returns its cudaError_t (35, 100) and sets *count = 0
int dcgmm_cuda_device_count(int* count);
const char* dcgmm_cuda_error_string(int err);
// why the last call of this thread returned cudaErrorInvalidValue (empty if it did not)
const char* dcgmm_cuda_last_message(void);
int64_t dcgmm_cuda_workspace_bytes(const dcgmm_shape* s, int op);

// resp (N,H',W',K), score, lse (N,H',W'), kstar int32. smoothing (mc): NULL (identity), the dense (K, K) G
// (smoothing_n == 0) or the stacked separable factors (2, n, n) of G = kron(Gy, Gx) (smoothing_n == n, n * n == K:
// 2 K n operations per row instead of K^2).
int dcgmm_cgmm_fwd(const dcgmm_shape* s, const float* x, const float* mu, const float* sigma, const float* log_pi,
                   int is_mc, const float* smoothing, int smoothing_n, float* resp, float* score, float* lse,
                   int32_t* kstar, void* workspace, int64_t workspace_bytes, void* stream);

// The backward of design.md. g_resp (N,H',W',K) or NULL; g_score: per row (g_score_scalar == 0) or one value read
// from g_score[0] (g_score_scalar == 1, an expanded tensor), or NULL. dx (N,H,W,C) when need_x_grad; d_mu,
// d_sigma (as mu), d_log_pi (as log_pi) when need_param_grads.
int dcgmm_cgmm_bwd(const dcgmm_shape* s, const float* g_resp, const float* g_score, int g_score_scalar,
                   const float* x, const float* mu, const float* sigma, const float* log_pi, int is_mc,
                   const float* smoothing, int smoothing_n, const float* resp, const int32_t* kstar, int need_x_grad,
                   int need_param_grads, float* dx, float* d_mu, float* d_sigma, float* d_log_pi, void* workspace,
                   int64_t workspace_bytes, void* stream);

// A training step's forward and its parameter statistics (G_count, K, 1 + 2D) float64 (cgmm_math.h
// step_component): the forward's outputs as dcgmm_cgmm_fwd, and per component j the fixed-order sums over rows of
// W, W (x - mu_j), W (x - mu_j)^2 with W the one-hot winner (mc) or resp (loglik). G_count = P or 1.
int dcgmm_cgmm_step_partials(const dcgmm_shape* s, const float* x, const float* mu, const float* sigma,
                             const float* log_pi, int is_mc, const float* smoothing, int smoothing_n, float* resp,
                             float* score, float* lse, int32_t* kstar, double* stats, void* workspace,
                             int64_t workspace_bytes, void* stream);

// The original update rule from (possibly all-reduced) statistics: new mu, sigma (clipped to [sigma_min,
// sigma_max]), pi_logits; steps (3,) = (s_mu, s_sigma, s_pi) on the device; scale = 1 / rows; smoothing: the dense
// (K, K) G when the statistics are of an mc loss with smoothing, else NULL; pi_global: one softmax over all P*K logits.
// maxima (2,): max |new mu|, max |new pi_logits| (NaN if any is NaN).
int dcgmm_cgmm_step_finalize(const dcgmm_shape* s, const double* stats, const float* mu, const float* sigma,
                             const float* pi_logits, const float* log_pi, const float* smoothing, double scale,
                             const float* steps, float sigma_min, float sigma_max, int pi_global, float* new_mu,
                             float* new_sigma, float* new_pi_logits, float* maxima, void* workspace,
                             int64_t workspace_bytes, void* stream);

// sm_90a only: the forward of a shared layer by warpgroup MMA in split TF32 (3xTF32) on the centred GEMM form
// (cgmm_wgmma.cu). Returns cudaErrorNoKernelImageForDevice on other GPUs.
int dcgmm_cgmm_fwd_wgmma(const dcgmm_shape* s, const float* x, const float* mu, const float* sigma,
                         const float* log_pi, int is_mc, const float* smoothing, int smoothing_n, float* resp,
                         float* score, float* lse, int32_t* kstar, void* workspace, int64_t workspace_bytes,
                         void* stream);

#ifdef __cplusplus
}
#endif
