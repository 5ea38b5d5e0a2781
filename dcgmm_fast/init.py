"""Initialisation of GMM means from data (issue 24), as scikit-learn's ``init_params="random_from_data"`` /
``"k-means++"`` and pycave offer; the original draws them from U(-0.1, 0.1) ("uniform", the default).

Bottom-up over the stack: each layer with ``init != "uniform"`` takes its means from patches of its own input,
the images passed up through the (already initialised) layers below:
  "data"      K patches drawn at random (in independent mode, K images at each position; a tied layer draws one
              set from all positions for every position)
  "kmeans++"  k-means++ seeding over the same candidates (each next mean drawn with probability proportional to
              its squared distance from the nearest one chosen), vectorised over positions
sigma and pi keep their initial values (sqrt(sigma_upper_bound), uniform).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .geometry import patches
from .layers import ConvGMM, MaxPool

#: images used for the initialisation
POOL_IMAGES = 1000
#: candidate patches of a shared layer
POOL_PATCHES = 20000


def _choose(cand: torch.Tensor, K: int, method: str, g: torch.Generator) -> torch.Tensor:
    """cand (B, n, D) candidates for B GMMs -> (B, K, D) means by ``method``."""
    B, n, D = cand.shape
    if method == "data":
        idx = torch.stack([torch.randperm(n, generator=g)[:K] if n >= K else torch.randint(0, n, (K,), generator=g)
                           for _ in range(B)])
        return torch.gather(cand, 1, idx[..., None].expand(B, K, D))
    # k-means++ seeding
    c = cand.double()
    first = torch.randint(0, n, (B,), generator=g)
    chosen = [c[torch.arange(B), first]]
    d2 = ((c - chosen[0][:, None]) ** 2).sum(-1)
    for _ in range(1, K):
        w = d2.clamp_min(0)
        w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))  # all candidates equal: uniform
        nxt = torch.multinomial(w, 1, generator=g)[:, 0]
        chosen.append(c[torch.arange(B), nxt])
        d2 = torch.minimum(d2, ((c - chosen[-1][:, None]) ** 2).sum(-1))
    return torch.stack(chosen, 1).to(cand.dtype)


@torch.no_grad()
def init_layer(layer: ConvGMM, h: torch.Tensor, method: str, g: torch.Generator) -> None:
    """Set layer.mu from the patches of its input h (N, H, W, C) by ``method`` ("data" or "kmeans++")."""
    p = patches(h.to(layer.mu.dtype), layer.kernel, layer.stride)  # (N, H', W', D)
    N = p.shape[0]
    flat = p.reshape(N, -1, layer.D)                                 # (N, P, D)
    K = layer.n_components
    if layer.mode == "shared" or layer.tied_init:
        rows = flat.reshape(-1, layer.D).cpu()
        if rows.shape[0] > POOL_PATCHES:
            rows = rows[torch.randperm(rows.shape[0], generator=g)[:POOL_PATCHES]]
        means = _choose(rows[None], K, method, g)[0]
        if layer.mode == "independent":
            means = means.expand(layer.P, K, layer.D)
    else:
        means = _choose(flat.transpose(0, 1).cpu(), K, method, g)    # (P, K, D)
    layer.mu.copy_(means.to(layer.mu.device, layer.mu.dtype))


@torch.no_grad()
def init_from_data(layers: Sequence, x: torch.Tensor, *, seed: Optional[int] = None) -> None:
    """Initialise, bottom-up, every ConvGMM of ``layers`` whose ``init`` is not "uniform" from images x
    (N, H, W, C) float in [0, 1] (at most the first ``POOL_IMAGES``)."""
    g = torch.Generator().manual_seed(0 if seed is None else int(seed))
    todo = [i for i, layer in enumerate(layers) if isinstance(layer, ConvGMM) and layer.init != "uniform"]
    if not todo:
        return
    h = x[:POOL_IMAGES]
    for i, layer in enumerate(layers[:todo[-1] + 1]):
        if isinstance(layer, ConvGMM):
            if layer.init != "uniform":
                init_layer(layer, h, layer.init, g)
            h = layer.cgmm(h, check=False).resp
        elif isinstance(layer, MaxPool):
            h = layer(h)
