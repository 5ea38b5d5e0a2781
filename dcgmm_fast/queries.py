"""Queries with unknown pixels on the bottom GMM layer: the marginal (observed-dims) log-likelihood of each patch and
its most probable completion (issue 24; what tractable models such as PyJuice or EinsumNetworks offer).

A diagonal GMM marginalises exactly by dropping the unknown dimensions: for patch row r with observed entries O_r,
    ls[r, k] = log_pi[k] + sum_{d in O_r} (log sigma[k, d] - 1/2 sigma[k, d]^2 (x[r, d] - mu[k, d])^2)
    score[r] = logsumexp_k ls[r, k] - |O_r| / 2 log(2 pi),     resp[r] = softmax_k ls[r]
A patch with no observed entry scores 0 (log sum_k pi_k) and its responsibilities are the prior pi. Computed in
float64 through the centred expansion (plain PyTorch, chunked over images); not a training path.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from . import ops
from .geometry import patches
from .layers import ConvGMM

#: images per chunk of the float64 sums (N * P * K values each)
_CHUNK = 64


def patch_mask(mask: torch.Tensor, layer: ConvGMM) -> torch.Tensor:
    """(N, H, W, C) bool pixel mask -> (N, H', W', D) float64: 1 where a patch entry is observed."""
    return patches(mask.to(torch.float64), layer.kernel, layer.stride)


def marginal_log_scores(layer: ConvGMM, x: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(log scores (N, H', W', K) float64 over the observed entries, observed entries per patch (N, H', W'))."""
    mu, sigma = layer.mu.detach().double(), layer.sigma.detach().double()
    log_pi = layer.log_pi().detach().double()
    shared = mu.dim() == 2
    s2 = sigma * sigma
    lin, quad = s2 * mu, s2                                          # sum m (s2 x^2 - 2 s2 mu x + s2 mu^2) / 2
    const = (s2 * mu * mu)                                           # (.., K, D)
    log_s = sigma.log()
    outs, counts = [], []
    for start in range(0, x.shape[0], _CHUNK):
        xp = patches(x[start:start + _CHUNK].double(), layer.kernel, layer.stride)  # (n, H', W', D)
        mp = patch_mask(mask[start:start + _CHUNK], layer)
        n, Ho, Wo, D = xp.shape
        xp, mp = xp.reshape(n, Ho * Wo, D), mp.reshape(n, Ho * Wo, D)
        eq = "npd,kd->npk" if shared else "npd,pkd->npk"
        mx, mxx = mp * xp, mp * xp * xp
        dist = (torch.einsum(eq, mxx, quad) - 2.0 * torch.einsum(eq, mx, lin) + torch.einsum(eq, mp, const))
        ls = torch.einsum(eq, mp, log_s) - 0.5 * dist + (log_pi if shared else log_pi[None])
        outs.append(ls.reshape(n, Ho, Wo, -1))
        counts.append(mp.sum(-1).reshape(n, Ho, Wo))
    return torch.cat(outs), torch.cat(counts)


def marginal_cgmm(layer: ConvGMM, x: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The bottom layer on partly observed images: (resp (N, H', W', K) in x's dtype, marginal loglik score per
    patch (N, H', W') float64). x: (N, H, W, C) images (the unknown pixels' values are ignored); mask: (N, H, W, C)
    bool, True = observed."""
    ls, count = marginal_log_scores(layer, x, mask)
    lse = torch.logsumexp(ls, -1)
    return torch.softmax(ls, -1).to(x.dtype), lse - 0.5 * math.log(2 * math.pi) * count


def mpe_completion(layer: ConvGMM, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Most probable completion by the bottom layer: per patch the component with the highest log score given its
    observed entries, its mean as the patch, averaged over the patches covering each pixel (``patch_average``);
    observed pixels kept as they are (an unknown pixel no patch covers becomes 0). Deterministic (ties -> lowest
    index). (N, H, W, C) in x's dtype."""
    ls, _ = marginal_log_scores(layer, x, mask)
    k = ls.argmax(-1)                                                # (N, H', W')
    mu = layer.mu.detach()
    if mu.dim() == 2:
        v = mu[k]                                                    # (N, H', W', D)
    else:
        P = mu.shape[0]
        pos = torch.arange(P, device=k.device).reshape(1, *k.shape[1:]).expand_as(k)
        v = mu[pos, k]
    filled = ops.patch_average(v.to(x.dtype), tuple(x.shape[1:3]), layer.kernel, layer.stride)
    return torch.where(mask, x, filled.clamp(0.0, 1.0))
