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
No argument checks here: ``dcgmm_fast.ops`` validates before dispatching. Patch geometry and the smoothing
matrix live in ``dcgmm_fast.geometry``; this module is the oracle only.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .geometry import cover_count, out_hw, pair, patch_offsets, patches, smoothing_dense
from .types import CGMMOut, IntPair

__all__ = ["cgmm", "patch_average", "sample_components", "patches", "CGMMOut", "cgmm_step_partials",
           "cgmm_step_finalize"]

#: Budget that sizes a chunk: rows * K * D * itemsize * _LIVE_RKD <= CHUNK_BYTES. The whole backward working
#: set measured ~210 MB peak RSS growth on (14400 rows, K=100, D=400) float32 (2026-11-25).
CHUNK_BYTES = 64 * 2**20
#: Live (rows, K, D)-sized tensors per chunk in the recomputed backward (diff, scaled diff, square, grads,
#: gathered parameters in independent mode), a conservative count used to size chunks.
_LIVE_RKD = 8


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
    total = total.index_add(1, index, v.reshape(N, Ho * Wo * D).to(acc))  # N = 0 gives an empty image batch
    count = cover_count((H, W, C), kernel, stride, v.device).reshape(-1).to(acc)
    avg = torch.where(count > 0, total / count.clamp_min(1), torch.zeros((), dtype=acc, device=v.device))
    return avg.to(v.dtype).reshape(N, H, W, C)


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
        smoothing: for "mc", a (K, K) G (rows sum to 1) or its separable factors (2, n, n), applied as the
            dense kron(Gy, Gx); None for the identity.
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
        smoothed = log_score if smoothing is None else log_score @ smoothing_dense(smoothing).transpose(0, 1)
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


# ------------------------------------------------------------------------------------------ training step
def cgmm_step_partials(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, log_pi: torch.Tensor, *,
                       kernel: IntPair, stride: IntPair, loss: str = "mc", smoothing: Optional[torch.Tensor] = None,
                       kstar: Optional[torch.Tensor] = None) -> Tuple[CGMMOut, torch.Tensor]:
    """A training step's forward and its parameter statistics (the first of the two fused step ops, issue 23).

    Returns (the op's output, stats (G, K, 1 + 2D) float64) with G = P (independent) or 1 (shared) and, per GMM and
    component j, ``sum_r W[r,j]``, ``sum_r W[r,j] (x_r - mu_j)`` (D) and ``sum_r W[r,j] (x_r - mu_j)^2`` (D) over
    its rows, W the one-hot winner kstar for "mc" (the smoothing is applied by ``cgmm_step_finalize``) and resp
    for "loglik". Sums of statistics over data shards are the statistics of the whole batch. ``kstar``: forced
    winners (tests: the statistics given a kernel's own winners, as ``cgmm``).
    """
    kernel, stride = pair(kernel), pair(stride)
    with torch.no_grad():
        out = cgmm(x, mu, sigma, log_pi, kernel=kernel, stride=stride, loss=loss, smoothing=smoothing, kstar=kstar)
        N, K, D = x.shape[0], mu.shape[-2], mu.shape[-1]
        P = out.score[0].numel()
        pt = patches(x, kernel, stride).reshape(N, P, D).double()
        if loss == "mc":
            w = torch.nn.functional.one_hot(out.kstar.reshape(N, P).long(), K).double()
        else:
            w = out.resp.reshape(N, P, K).double()
        if mu.dim() == 2:  # shared: every row in one GMM
            pt, w = pt.reshape(1, N * P, D), w.reshape(1, N * P, K)
        else:
            pt, w = pt.transpose(0, 1), w.transpose(0, 1)  # (P, N, .)
        m = mu.double().reshape(-1, K, D)
        s0 = w.sum(1)                                       # (G, K)
        sx = torch.einsum("grk,grd->gkd", w, pt)
        sxx = torch.einsum("grk,grd->gkd", w, pt * pt)
        s1 = sx - s0[..., None] * m
        s2 = sxx - 2.0 * m * sx + s0[..., None] * m * m
        return out, torch.cat([s0[..., None], s1, s2], -1)


def cgmm_step_finalize(stats: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, pi_logits: torch.Tensor,
                       log_pi: torch.Tensor, *, smoothing: Optional[torch.Tensor], scale: float,
                       steps: torch.Tensor, sigma_min: float, sigma_max: float, pi_global: bool = False
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The original update rule from step statistics (``cgmm_step_partials``, possibly summed over ranks): the
    second fused step op. Returns new (mu, sigma clipped to [sigma_min, sigma_max], pi_logits) and the step guard's
    (max |mu|, max |pi_logits|) (2,); the inputs are not changed.

    With a smoothing G (mc), component k's row weight is G[kstar, k], so its sums mix the winners' statistics:
    A0 = sum_j G[j,k] c_j, A1 = sum_j G[j,k] (S1_j + c_j dl), A2 = sum_j G[j,k] (S2_j + 2 dl S1_j + c_j dl^2),
    dl = mu_j - mu_k. Gradients of the mean score (scale = 1 / rows): d mu = scale sigma^2 A1, d sigma =
    scale (A0 / sigma - sigma A2), d log_pi = scale A0, carried to pi_logits through the log-softmax (over each
    GMM's K logits, or all P*K with ``pi_global``); then theta += step * d theta (``steps`` = (s_mu, s_sigma, s_pi)).
    """
    K, D = mu.shape[-2], mu.shape[-1]
    st = stats.double().reshape(-1, K, 1 + 2 * D)
    s0, s1, s2 = st[..., 0], st[..., 1:1 + D], st[..., 1 + D:]
    m, sg = mu.double().reshape(-1, K, D), sigma.double().reshape(-1, K, D)
    if smoothing is not None:
        G = smoothing_dense(smoothing).double()
        dl = m[:, :, None, :] - m[:, None, :, :]            # (G, j, k, D): mu_j - mu_k
        a0 = torch.einsum("jk,gj->gk", G, s0)
        a1 = torch.einsum("jk,gjkd->gkd", G, s1[:, :, None, :] + s0[:, :, None, None] * dl)
        a2 = torch.einsum("jk,gjkd->gkd", G, s2[:, :, None, :] + 2.0 * dl * s1[:, :, None, :]
                          + s0[:, :, None, None] * dl * dl)
    else:
        a0, a1, a2 = s0, s1, s2
    g_log_pi = scale * a0
    g_mu = (scale * sg * sg * a1).to(mu.dtype).reshape(mu.shape)
    g_sigma = (scale * (a0[..., None] / sg - sg * a2)).to(mu.dtype).reshape(mu.shape)
    prob = log_pi.double().reshape(-1, K).exp()
    total = g_log_pi.sum() if pi_global or mu.dim() == 2 else g_log_pi.sum(-1, keepdim=True)
    g_pi = (g_log_pi - prob * total).to(mu.dtype).reshape(pi_logits.shape)
    steps = steps.to(mu.dtype)
    new_mu = torch.addcmul(mu, g_mu, steps[0])
    new_sigma = torch.addcmul(sigma, g_sigma, steps[1]).clamp(sigma_min, sigma_max)
    new_pi = torch.addcmul(pi_logits, g_pi, steps[2])
    maxima = torch.stack([new_mu.abs().max(), new_pi.abs().max()])
    return new_mu, new_sigma, new_pi, maxima
