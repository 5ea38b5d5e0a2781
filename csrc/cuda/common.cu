// The library's plumbing: version, device query, error messages, workspace sizes, the parameter packing kernel.
#include <cstdarg>
#include <cstdio>

#include "common.cuh"

namespace dcgmm {
namespace cuda {

char* message_buffer() {
  static thread_local char buffer[512] = {0};
  return buffer;
}

int fail(const char* fmt, long long a, long long b) {
  std::snprintf(message_buffer(), 512, fmt, a, b);
  return static_cast<int>(cudaErrorInvalidValue);
}

namespace {

__global__ void pack_kernel(Geo g, const float* __restrict__ mu, const float* __restrict__ sigma,
                            const float* __restrict__ log_pi, float* __restrict__ prm, float* __restrict__ c) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n_prm = g.Gc * g.D * g.kmax;
  if (i < n_prm) {  // prm[gi][d][k] = (mu[gi, k, d], sigma[gi, k, d])
    const int64_t k = i % g.kmax, d = (i / g.kmax) % g.D, gi = i / (g.kmax * g.D);
    const bool real = k < g.K;
    const int64_t src = (gi * g.K + k) * g.D + d;
    prm[2 * i] = real ? mu[src] : 0.f;
    prm[2 * i + 1] = real ? sigma[src] : 0.f;
  }
  if (i < g.Gc * g.kmax) {
    const int64_t k = i % g.kmax, gi = i / g.kmax;
    float v = 0.f;
    if (k < g.K) {
      const float* s = sigma + (gi * g.K + k) * g.D;
      double acc = 0.0;
      for (int64_t d = 0; d < g.D; ++d) acc += log(double(s[d]));
      v = float(double(log_pi[gi * g.K + k]) + acc);
    }
    c[i] = v;
  }
}

}  // namespace

int pack_params(const Geo& g, const float* mu, const float* sigma, const float* log_pi, float* prm, float* c,
                cudaStream_t stream) {
  const int64_t n = g.Gc * g.D * g.kmax;  // >= Gc * kmax
  const int threads = 256;
  pack_kernel<<<unsigned((n + threads - 1) / threads), threads, 0, stream>>>(g, mu, sigma, log_pi, prm, c);
  return launched();
}

}  // namespace cuda
}  // namespace dcgmm

using namespace dcgmm::cuda;

extern "C" {

int dcgmm_cuda_abi_version(void) { return 2; }

int dcgmm_cuda_device_count(int* count) {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (count != nullptr) *count = err == cudaSuccess ? n : 0;
  if (err != cudaSuccess) cudaGetLastError();  // clear the sticky-free error state of this thread
  return static_cast<int>(err);
}

const char* dcgmm_cuda_error_string(int err) {
  if (err == static_cast<int>(cudaErrorInvalidValue) && message_buffer()[0] != 0) return message_buffer();
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}

const char* dcgmm_cuda_last_message(void) { return message_buffer(); }

int64_t dcgmm_cuda_workspace_bytes(const dcgmm_shape* s, int op) {
  Geo g{};
  if (make_geo(s, g) != 0) return -1;
  return layout(g, op, nullptr).bytes;
}

}  // extern "C"
