"""Pure-PyTorch reference of every dcgmm op: the oracle for tests and the baseline for benchmarks.

The cGMM op is computed the way a PyTorch user would write it: gather the patch rows of a chunk, broadcast the
(rows, K, D) difference to the means, reduce over D. Backward recomputes each chunk and differentiates that
plain math with autograd (a hand-rolled ``torch.utils.checkpoint``, see ``_ChunkedLogScore``), so the peak
memory is the outputs (O(N*P*K)) plus one chunk's working set (kept under ``CHUNK_BYTES``). Gradients are thus
independent of the closed forms in design.md that the fused backends implement; the tests check one against the
other.

Math (per row r = (n, p), design.md "The cGMM op"):
    log_score[r,k] = log_pi[k] + sum_d log sigma[k,d] - 1/2 sum_d sigma[k,d]^2 (x[r,d] - mu[k,d])^2
    resp = softmax_k(log_score)        lse = logsumexp_k(log_score)
    score = lse - D/2 log(2 pi)                                  (loss "loglik")
    score = max_k sum_j G[k,j] log_score[r,j] - D/2 log(2 pi)    (loss "mc", G = I when smoothing is None)
    kstar = argmax_k of the scores the max is taken over (ties -> lowest index)
No argument checks here: ``dcgmm_fast.ops`` validates before dispatching.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch

IntPair = Union[int, Sequence[int]]

#: Budget that sizes a chunk: rows * K * D * itemsize * _LIVE_RKD <= CHUNK_BYTES. The whole backward working
#: set measured ~210 MB peak RSS growth on (14400 rows, K=100, D=400) float32 (2026-11-25).
CHUNK_BYTES = 64 * 2**20
#: Live (rows, K, D)-sized tensors per chunk in the recomputed backward (diff, scaled diff, square, grads,
#: gathered parameters in independent mode), a conservative count used to size chunks.
_LIVE_RKD = 8


class CGMMOut(NamedTuple):
    """Outputs of the cGMM op.

    resp:  (N, H', W', K) posterior responsibilities softmax_k(log_score), the layer's output.
    score: (N, H', W') per-patch score, higher is better (log-likelihood, or smoothed max-component).
    lse:   (N, H', W') logsumexp_k(log_score), saved for backward.
    kstar: (N, H', W') int32 winning component of the max (ties -> lowest index).
    """

    resp: torch.Tensor
    score: torch.Tensor
    lse: torch.Tensor
    kstar: torch.Tensor


def pair(v: IntPair) -> Tuple[int, int]:
    """``3 -> (3, 3)``, ``(3, 2) -> (3, 2)``."""
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


def out_hw(hw: Tuple[int, int], kernel: IntPair, stride: IntPair) -> Tuple[int, int]:
    """Output grid (H', W') of a valid (unpadded) convolution: H' = (H - kh) // sh + 1."""
    (kh, kw), (sh, sw) = pair(kernel), pair(stride)
    return ((hw[0] - kh) // sh + 1, (hw[1] - kw) // sw + 1)


def patch_offsets(
    image_shape: Tuple[int, int, int], kernel: IntPair, stride: IntPair, device=None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flat offsets into one NHWC image: pixel of (position p, patch entry d) = pos[p] + tap[d].

    Args:
        image_shape: (H, W, C).
    Returns:
        pos: (P,) int64, offset of each patch's top-left pixel, p = oy * W' + ox.
        tap: (D,) int64, offset of each patch entry, d in (ky, kx, c) order, c fastest.
    """
    H, W, C = image_shape
    (kh, kw), (sh, sw) = pair(kernel), pair(stride)
    Ho, Wo = out_hw((H, W), kernel, stride)
    oy = torch.arange(Ho, device=device) * sh
    ox = torch.arange(Wo, device=device) * sw
    pos = ((oy[:, None] * W + ox[None, :]) * C).reshape(-1)
    ky, kx, c = torch.arange(kh, device=device), torch.arange(kw, device=device), torch.arange(C, device=device)
    tap = ((ky[:, None, None] * W + kx[None, :, None]) * C + c[None, None, :]).reshape(-1)
    return pos, tap


def patches(x: torch.Tensor, kernel: IntPair, stride: IntPair) -> torch.Tensor:
    """im2col: every patch of x as a vector in (ky, kx, c) order.

    Args:
        x: (N, H, W, C).
    Returns:
        (N, H', W', D) with D = kh * kw * C.
    """
    N, H, W, C = x.shape
    Ho, Wo = out_hw((H, W), kernel, stride)
    pos, tap = patch_offsets((H, W, C), kernel, stride, x.device)
    return x.reshape(N, H * W * C)[:, pos[:, None] + tap[None, :]].reshape(N, Ho, Wo, -1)


def cover_count(image_shape: Tuple[int, int, int], kernel: IntPair, stride: IntPair, device=None) -> torch.Tensor:
    """Number of patches covering each pixel, (H, W, C) int64."""
    pos, tap = patch_offsets(image_shape, kernel, stride, device)
    index = (pos[:, None] + tap[None, :]).reshape(-1)
    count = torch.zeros(math.prod(image_shape), dtype=torch.int64, device=device)
    return count.index_add(0, index, torch.ones_like(index)).reshape(image_shape)


def patch_average(v: torch.Tensor, image_hw: Tuple[int, int], kernel: IntPair, stride: IntPair) -> torch.Tensor:
    """Inverse of ``patches`` for sampling: scatter-add patch values to their pixels, divide by cover counts.

    Sums are accumulated in float64 (float32 inputs then round once, so ``patch_average(patches(x)) == x``
    exactly for float32; float64 is within a few ulp). Pixels covered by no patch are 0.

    Args:
        v: (N, H', W', D), D = kh * kw * C.
        image_hw: (H, W) of the image the patches came from.
    Returns:
        (N, H, W, C), same dtype as v; differentiable in v.
    """
    N, Ho, Wo, D = v.shape
    kh, kw = pair(kernel)
    C = D // (kh * kw)
    H, W = image_hw
    pos, tap = patch_offsets((H, W, C), kernel, stride, v.device)
    index = (pos[:, None] + tap[None, :]).reshape(-1)  # (P*D,) pixel of each patch entry
    acc = torch.float64
    total = torch.zeros(N, H * W * C, dtype=acc, device=v.device)
    total = total.index_add(1, index, v.reshape(N, -1).to(acc))
    count = cover_count((H, W, C), kernel, stride, v.device).reshape(-1).to(acc)
    avg = torch.where(count > 0, total / count.clamp_min(1), torch.zeros((), dtype=acc, device=v.device))
    return avg.to(v.dtype).reshape(N, H, W, C)


def smoothing_offsets(n: int) -> torch.Tensor:
    """Signed torus offset t(delta) for delta = 0..n-1 on a ring of n: ``((delta + n//2) mod n) - n//2``.

    In [-n//2, n//2) for even n and [-(n-1)/2, (n-1)/2] for odd n (spec 1.5); n = 5 gives 0, 1, 2, -2, -1.
    """
    delta = torch.arange(n)
    return (delta + n // 2) % n - n // 2


def smoothing_matrix(
    K: int, som_sigma: float, *, dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """Torus-Gaussian smoothing G of the mc loss (spec 1.5), components row-major on a sqrt(K) grid.

    G[k, j] = exp(-d2(k, j) / (2 som_sigma^2)) / sum_j' exp(-d2(k, j') / (2 som_sigma^2)), d2 the squared
    torus distance. Rows sum to 1, G is symmetric, and it is exactly the identity at som_sigma = 0.01.

    Args:
        K: number of components, a perfect square.
        som_sigma: width > 0 (in grid units).
    Returns:
        (K, K) tensor of ``dtype`` (computed in float64, then cast).
    """
    n = math.isqrt(K)
    if K < 1 or n * n != K:
        raise ValueError(f"K: expected a perfect square (components on a sqrt(K) x sqrt(K) grid), got {K}")
    if not (som_sigma > 0 and math.isfinite(som_sigma)):
        raise ValueError(f"som_sigma: expected a finite value > 0, got {som_sigma}")
    k = torch.arange(K)
    ky, kx = k // n, k % n
    dy = smoothing_offsets(n)[(ky[None, :] - ky[:, None]) % n].double()
    dx = smoothing_offsets(n)[(kx[None, :] - kx[:, None]) % n].double()
    logits = -(dy * dy + dx * dx) / (2.0 * float(som_sigma) ** 2)
    return torch.softmax(logits, dim=1).to(dtype=dtype, device=device)


def _rows_per_chunk(K: int, D: int, itemsize: int) -> int:
    return max(1, CHUNK_BYTES // (_LIVE_RKD * K * D * itemsize))


def _chunk_log_scores(
    x_flat: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    log_pi: torch.Tensor,
    rows: torch.Tensor,
    pos: torch.Tensor,
    tap: torch.Tensor,
    P: int,
    image_numel: int,
) -> torch.Tensor:
    """log_score of a chunk of rows, by the broadcast (rows, K, D) difference.

    Args:
        x_flat: (N*H*W*C,) the input, flattened.
        mu, sigma: (K, D) or (P, K, D).  log_pi: (K,) or (P, K).
        rows: (R,) int64 flat row indices r = n * P + p.
    Returns:
        (R, K) log_score.
    """
    n, p = rows // P, rows % P
    xr = x_flat[(n * image_numel + pos[p])[:, None] + tap[None, :]]  # (R, D) implicit im2col by gather
    if mu.dim() == 3:  # independent mode: one GMM per position
        mu, sigma, log_pi = mu[p], sigma[p], log_pi[p]  # (R, K, D), (R, K, D), (R, K)
    diff = xr[..., None, :] - mu  # (R, K, D)
    quad = (sigma * diff).square().sum(-1)  # (R, K)
    return log_pi + sigma.log().sum(-1) - 0.5 * quad


class _ChunkedLogScore(torch.autograd.Function):
    """log_score (M, K) computed chunk by chunk; backward recomputes each chunk and runs autograd on it.

    This is ``torch.utils.checkpoint`` per chunk, written out so that nothing of a chunk survives its
    iteration: gradients accumulate into buffers allocated once, in chunk order (deterministic). With one
    checkpoint per chunk, each chunk's autograd bookkeeping stayed alive between the chunks' large
    temporaries and fragmented glibc's heap: 1.86 GB peak RSS growth instead of 0.21 GB on the memory test's
    shape (measured 2026-11-25). First-order gradients only (no double backward).
    """

    @staticmethod
    def forward(ctx, x_flat, mu, sigma, log_pi, geometry):
        pos, tap, P, image_numel, step = geometry
        M = x_flat.numel() // image_numel * P
        out = x_flat.new_empty(M, mu.shape[-2])
        for r0 in range(0, M, step):
            rows = torch.arange(r0, min(r0 + step, M), device=x_flat.device)
            out[r0 : r0 + rows.numel()] = _chunk_log_scores(x_flat, mu, sigma, log_pi, rows, pos, tap, P, image_numel)
        ctx.save_for_backward(x_flat, mu, sigma, log_pi)
        ctx.geometry = geometry
        return out

    @staticmethod
    def backward(ctx, g_log_score):
        x_flat, mu, sigma, log_pi = ctx.saved_tensors
        pos, tap, P, image_numel, step = ctx.geometry
        inputs = (x_flat, mu, sigma, log_pi)
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[:4]) if need]
        grads = [torch.zeros_like(inputs[i]) if i in wanted else None for i in range(4)]
        M = g_log_score.shape[0]
        for r0 in range(0, M, step):
            rows = torch.arange(r0, min(r0 + step, M), device=x_flat.device)
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_(i in wanted) for i, t in enumerate(inputs)]
                chunk = _chunk_log_scores(*leaves, rows, pos, tap, P, image_numel)
                parts = torch.autograd.grad(chunk, [leaves[i] for i in wanted], g_log_score[r0 : r0 + rows.numel()])
            for i, part in zip(wanted, parts):
                grads[i] += part
        return (*grads, None)


def cgmm(
    x: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    log_pi: torch.Tensor,
    *,
    kernel: IntPair,
    stride: IntPair,
    loss: str = "mc",
    smoothing: Optional[torch.Tensor] = None,
    kstar: Optional[torch.Tensor] = None,
) -> CGMMOut:
    """Reference cGMM layer (see module docstring for the math).

    Args:
        x: (N, H, W, C) images or feature maps, NHWC.
        mu: (K, D) shared or (P, K, D) independent means; D = kh * kw * C, P = H' * W'.
        sigma: like mu, inverse standard deviations (> 0).
        log_pi: (K,) or (P, K) normalised log mixing weights.
        kernel, stride: int or (h, w).
        loss: "mc" (smoothed max-component) or "loglik" (log-likelihood).
        smoothing: (K, K) G for "mc" (rows sum to 1), None for the identity.
        kstar: optional (N, H', W') forced winners for "mc" (tests: the reference's gradients given a kernel's
            own winners); the score then reads the smoothed log score at kstar. Ignored for "loglik".
    Returns:
        CGMMOut(resp (N,H',W',K), score (N,H',W'), lse (N,H',W'), kstar (N,H',W') int32).
    """
    N, H, W, C = x.shape
    Ho, Wo = out_hw((H, W), kernel, stride)
    K, D = mu.shape[-2], mu.shape[-1]
    pos, tap = patch_offsets((H, W, C), kernel, stride, x.device)
    geometry = (pos, tap, Ho * Wo, H * W * C, _rows_per_chunk(K, D, x.element_size()))
    log_score = _ChunkedLogScore.apply(x.reshape(-1), mu, sigma, log_pi, geometry)  # (M, K)
    M = log_score.shape[0]

    const = 0.5 * D * math.log(2.0 * math.pi)
    lse = torch.logsumexp(log_score, dim=1)
    resp = torch.softmax(log_score, dim=1)
    if loss == "loglik":
        score = lse - const
        winner = log_score.detach().argmax(dim=1)
    else:
        smoothed = log_score if smoothing is None else log_score @ smoothing.transpose(0, 1)
        winner = smoothed.detach().argmax(dim=1) if kstar is None else kstar.reshape(M).long()
        score = smoothed.gather(1, winner[:, None])[:, 0] - const
    return CGMMOut(
        resp.reshape(N, Ho, Wo, K),
        score.reshape(N, Ho, Wo),
        lse.reshape(N, Ho, Wo),
        winner.to(torch.int32).reshape(N, Ho, Wo),
    )


def sample_components(
    topdown: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    *,
    top_s: int,
    divisor: float,
    u: torch.Tensor,
    eps: torch.Tensor,
    sigma_ceiling: float,
) -> torch.Tensor:
    """Draw one component per position from a top-down prior and return its (noisy) mean (spec 3.1).

    Per position: a = clip(topdown, 1e-6, 11000); keep the entries >= the top_s-th largest (ties kept; top_s
    <= 0 or >= K keeps all); k = inverse CDF of a / sum(a) at u (zero-weight entries are never drawn);
    return mu[k] + eps * m[k] / (sigma[k] * divisor) with m[k, d] = 0 where sigma[k, d] >= sigma_ceiling
    (noise-free dims), and 0 where topdown sums to <= 0.

    Args:
        topdown: (N, H', W', K) unnormalised prior over components.
        mu, sigma: (K, D) shared or (P, K, D) independent, P = H' * W'.
        u: (N, H', W') uniforms in [0, 1).  eps: (N, H', W', D) standard normals.
    Returns:
        (N, H', W', D) samples, dtype of mu.
    """
    N, Ho, Wo, K = topdown.shape
    a = topdown.clamp(1e-6, 11000.0)
    if 0 < top_s < K:
        kth = torch.topk(a, top_s, dim=-1).values[..., -1:]  # (N, H', W', 1) the top_s-th largest
        a = torch.where(a >= kth, a, torch.zeros_like(a))
    csum = a.cumsum(-1)
    cdf = csum / csum[..., -1:]  # last entry exactly 1
    k = torch.searchsorted(cdf.contiguous(), u.to(cdf.dtype)[..., None].contiguous(), right=True)[..., 0]
    k = k.clamp_max(K - 1)  # (N, H', W') first k with cdf[k] > u
    if mu.dim() == 3:
        p = torch.arange(Ho * Wo, device=mu.device).reshape(1, Ho, Wo).expand(N, Ho, Wo)
        mu_k, sigma_k = mu[p, k], sigma[p, k]  # (N, H', W', D)
    else:
        mu_k, sigma_k = mu[k], sigma[k]
    noisy = (sigma_k < sigma_ceiling).to(mu.dtype)
    out = mu_k + eps.to(mu.dtype) * noisy / (sigma_k * divisor)
    alive = (topdown.sum(-1) > 0)[..., None]
    return torch.where(alive, out, torch.zeros_like(out))
