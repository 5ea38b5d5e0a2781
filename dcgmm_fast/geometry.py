"""Patch geometry and the mc loss's smoothing matrix: plain functions every floor may import (a leaf module).

Conventions (design.md): NHWC images; a patch vector has length D = kh*kw*C in (ky, kx, c) order, c fastest;
H' = (H - kh) // sh + 1 (no padding); positions flattened p = oy * W' + ox.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from .types import IntPair


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


def patch_average_grad(g: torch.Tensor, kernel: IntPair, stride: IntPair) -> torch.Tensor:
    """Gradient of ``patch_average`` with respect to its patch values: (N, H, W, C) -> (N, H', W', D).

    Each patch entry receives its pixel's gradient divided by the pixel's cover count (patch_average is linear).
    """
    N, H, W, C = g.shape
    count = cover_count((H, W, C), kernel, stride, g.device)
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    return patches(torch.where(count > 0, g / count.clamp_min(1).to(g.dtype), zero), kernel, stride)


def smoothing_offsets(n: int) -> torch.Tensor:
    """Signed torus offset t(delta) for delta = 0..n-1 on a ring of n: ``((delta + n//2) mod n) - n//2``.

    In [-n//2, n//2) for even n and [-(n-1)/2, (n-1)/2] for odd n (spec 1.5); n = 5 gives 0, 1, 2, -2, -1.
    """
    delta = torch.arange(n)
    return (delta + n // 2) % n - n // 2


def _grid_side(K: int) -> int:
    n = math.isqrt(K) if K >= 1 else 0
    if K < 1 or n * n != K:
        raise ValueError(f"K: expected a perfect square (components on a sqrt(K) x sqrt(K) grid), got {K}")
    return n


def _check_som_sigma(som_sigma: float) -> None:
    if not (som_sigma > 0 and math.isfinite(som_sigma)):
        raise ValueError(f"som_sigma: expected a finite value > 0, got {som_sigma}")


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
    n = _grid_side(K)
    _check_som_sigma(som_sigma)
    k = torch.arange(K)
    ky, kx = k // n, k % n
    dy = smoothing_offsets(n)[(ky[None, :] - ky[:, None]) % n].double()
    dx = smoothing_offsets(n)[(kx[None, :] - kx[:, None]) % n].double()
    logits = -(dy * dy + dx * dx) / (2.0 * float(som_sigma) ** 2)
    return torch.softmax(logits, dim=1).to(dtype=dtype, device=device)


def smoothing_factors(
    K: int, som_sigma: float, *, dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """The separable form of ``smoothing_matrix``: a stacked (2, n, n) pair (Gy, Gx), n = sqrt(K).

    The torus Gaussian factorises, exp(-(dy^2 + dx^2) / 2s^2) = exp(-dy^2 / 2s^2) exp(-dx^2 / 2s^2), and so
    does its row normaliser, so G = kron(Gy, Gx) with Gy = Gx the 1-D torus kernel on a ring of n, rows summing
    to 1. Smoothing a row of log scores then costs 2 K n instead of K^2 multiply-adds.

    Returns:
        (2, n, n) tensor of ``dtype`` (computed in float64, then cast); ``smoothing_dense`` of it equals
        ``smoothing_matrix(K, som_sigma)`` to float rounding.
    """
    _grid_side(K)
    _check_som_sigma(som_sigma)
    return smoothing_factors_of(K, torch.tensor(float(som_sigma), dtype=torch.float64), dtype=dtype).to(device=device)


def smoothing_factors_of(K: int, som_sigma: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``smoothing_factors`` of a () som_sigma tensor, on its device, by tensor ops only (no host read: usable
    inside a captured or compiled step; no check of som_sigma). Bit-identical to ``smoothing_factors`` on CPU."""
    n = _grid_side(K)
    i = torch.arange(n, device=som_sigma.device)
    d = smoothing_offsets(n).to(som_sigma.device)[(i[None, :] - i[:, None]) % n].double()
    s = som_sigma.double()
    g1 = torch.softmax(-(d * d) / (2.0 * (s * s)), dim=1)
    return torch.stack([g1, g1]).to(dtype=dtype)


def is_factored(smoothing) -> bool:
    """True for the separable (2, n, n) form of the smoothing, False for a dense (K, K) matrix or None."""
    return smoothing is not None and smoothing.dim() == 3


def smoothing_dense(smoothing: torch.Tensor) -> torch.Tensor:
    """A (K, K) matrix from either form: the dense G itself, or kron(Gy, Gx) of a (2, n, n) pair."""
    if is_factored(smoothing):
        return torch.kron(smoothing[0], smoothing[1])
    return smoothing
