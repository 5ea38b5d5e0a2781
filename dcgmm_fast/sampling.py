"""Top-down sampling, sharpening, variants and in-painting on a stack of layers (spec 3.1-3.4).

Works on layers (ConvGMM / MaxPool / LinearClassifier) and names; never imports the model. Sampling runs from a
start layer down to the image: a ConvGMM draws one component per position from its top-down prior
(``ops.sample_components``) and back-projects the patch samples onto its input grid (``ops.patch_average``),
which is the prior of the layer below; a MaxPool un-pools (nearest-neighbour upsampling, cropped); optional
sharpening ascends a GMM's score of its back-projected sample (the overlap of patches reconciled by gradient).
Every random draw comes from the given torch.Generator.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Union

import torch

from . import ops
from .layers import ConvGMM, LinearClassifier, MaxPool


@dataclass(frozen=True)
class Sharpening:
    """Gradient ascent on a GMM's score of its own back-projected sample X (spec 3.3), ``iterations`` times:
    X += rate * dJ/dX with, per image n, J_n = mean over positions of score(X_n) - reconstruction_weight *
    mean over pixels of (X_n - X0_n)^2, and J = sum_n J_n.

    Per image, unlike the original (one mean over all N x P positions of the sampling batch): a sample does not
    depend on how many are drawn with it. The original's rate r with its sampling batch of 100 is r / 100 here
    (sharpening-D's 6 is 0.06). The defaults are the paper's 300 iterations and the rate that gave the best
    class-conditional samples of preset D under the pixel judge (docs/results.md).
    """

    rate: float = 0.1
    iterations: int = 300
    reconstruction_weight: float = 0.1


def unpool(topdown: torch.Tensor, pool: MaxPool) -> torch.Tensor:
    """Nearest-neighbour un-pooling: input pixel (y, x) gets topdown[y // ky, x // kx], cropped to the input size.

    Args:
        topdown: (N, H', W', C) at the pool's output.
    Returns:
        (N, H, W, C) at the pool's input.
    """
    ky, kx = pool.kernel
    H, W, _ = pool.in_shape
    up = topdown.repeat_interleave(ky, dim=1).repeat_interleave(kx, dim=2)
    return up[:, :H, :W, :]


def sharpen(layer: ConvGMM, x0: torch.Tensor, spec: Sharpening, history: Optional[list] = None) -> torch.Tensor:
    """Sharpen a back-projected sample x0 (N, H, W, C) at the input of ``layer`` (spec 3.3).

    Args:
        history: if a list, the mean score of each iteration's X is appended (before its update).
    Returns:
        (N, H, W, C), detached.
    """
    x0 = x0.detach()
    x = x0.clone()
    n = x0.shape[0]
    for _ in range(spec.iterations):
        x.requires_grad_(True)
        with torch.enable_grad():
            score = layer.cgmm(x, check=False, frozen=True).score.mean()  # d/dx only
            objective = n * (score - spec.reconstruction_weight * (x - x0).square().mean())  # sum of per-image J
            (grad,) = torch.autograd.grad(objective, x)
        if history is not None:
            history.append(float(score.detach()))
        x = (x + spec.rate * grad).detach()
    return x


def sample_down(
    layers: Sequence,
    names: Sequence[str],
    start: str,
    topdown: torch.Tensor,
    *,
    generator: Optional[torch.Generator] = None,
    top_s: Optional[Union[int, Dict[str, int]]] = None,
    divisor: Optional[Union[float, Dict[str, float]]] = None,
    sharpening: Union[None, bool, Sharpening, Dict[str, Sharpening]] = None,
    stop: Optional[str] = None,
) -> torch.Tensor:
    """Sample from layer ``start`` down to the input (or to layer ``stop``), given that layer's top-down prior.

    Args:
        topdown: prior at ``start``'s output: (N, H', W', K) for a GMM (unnormalised weights over components),
            (N, H', W', C) for a pool.
        top_s, divisor: one value for every GMM or a dict by layer name (default: each layer's own).
        sharpening: None: each GMM's own default (``sharpen_iterations``, ``sharpen_rate``; the presets'); False:
            none; a Sharpening for every GMM; or a dict by layer name (GMMs not named are not sharpened).
        stop: a layer below ``start``: return the sample at that layer's output (the prior it would get).
    Returns:
        (N, H, W, C) sample in the input space (or at ``stop``'s output), not clipped.
    """
    i = list(names).index(start)
    j = 0 if stop is None else list(names).index(stop) + 1
    if j > i:
        raise ValueError(f"stop: expected a layer below {start!r}, got {stop!r}")
    h = topdown
    uncovered = None  # (H, W) bool at h's grid: positions no upper patch covers (no top-down signal)
    for layer, name in zip(reversed(layers[j: i + 1]), reversed(names[j: i + 1])):
        if isinstance(layer, ConvGMM):
            if uncovered is not None and bool(uncovered.any()):
                h = with_own_prior(layer, h, uncovered)
            h = _sample_gmm(layer, name, h, generator, top_s, divisor, sharpening)
            uncovered = ~covered(layer)
        elif isinstance(layer, MaxPool):
            h = unpool(h, layer)
            if uncovered is not None:
                uncovered = unpool(uncovered[None, :, :, None], layer)[0, :, :, 0]
        else:
            raise TypeError(f"start: cannot sample through {type(layer).__name__} {name!r}")
    return h


def covered(layer: ConvGMM) -> torch.Tensor:
    """(H, W) bool at the layer's input: the positions at least one of its patches covers."""
    H, W, _ = layer.in_shape
    (kh, kw), (sh, sw) = layer.kernel, layer.stride
    Ho, Wo, _ = layer.out_shape
    rows = torch.zeros(H, dtype=torch.bool)
    cols = torch.zeros(W, dtype=torch.bool)
    for oy in range(Ho):
        rows[oy * sh:oy * sh + kh] = True
    for ox in range(Wo):
        cols[ox * sw:ox * sw + kw] = True
    return (rows[:, None] & cols[None, :]).to(layer.mu.device)


def with_own_prior(layer: ConvGMM, topdown: torch.Tensor, uncovered: torch.Tensor) -> torch.Tensor:
    """topdown (N, H', W', K) at the layer's output with softmax(pi) (the layer's own prior, per position in
    independent mode) where ``uncovered`` (H', W'): no upper patch back-projects there, so the layer is sampled
    from its prior instead of left at zero (design.md, sample_components; the original leaves those pixels 0)."""
    Ho, Wo, K = layer.out_shape
    pi = layer.log_pi().detach().exp().to(topdown.dtype)
    pi = pi.reshape(Ho, Wo, K) if pi.dim() == 2 else pi.expand(Ho, Wo, K)
    if layer.mode == "independent" and layer.pi_norm == "global":
        pi = pi / pi.sum(-1, keepdim=True)  # globally normalised: each position's weights as a distribution
    return torch.where(uncovered[None, :, :, None], pi[None], topdown)


def _pick(value, name, default):
    if isinstance(value, dict):
        return value.get(name, default)
    return default if value is None else value


def _sample_gmm(layer: ConvGMM, name, topdown, generator, top_s, divisor, sharpening) -> torch.Tensor:
    N, Ho, Wo, K = topdown.shape
    if (Ho, Wo, K) != layer.out_shape:
        raise ValueError(f"topdown: expected (N, {Ho}, {Wo}, {K}) == (N, *{layer.out_shape}) for layer {name!r}")
    mu, sigma = layer.mu.detach(), layer.sigma.detach()
    u = torch.rand(N, Ho, Wo, generator=generator, dtype=mu.dtype).to(mu.device)
    eps = torch.randn(N, Ho, Wo, layer.D, generator=generator, dtype=mu.dtype).to(mu.device)
    patches = ops.sample_components(
        topdown.to(mu.dtype), mu, sigma, top_s=int(_pick(top_s, name, layer.top_s)),
        divisor=float(_pick(divisor, name, layer.divisor)), u=u, eps=eps, sigma_ceiling=layer.sigma_max,
        backend=layer.backend,
    )
    H, W, _ = layer.in_shape
    x0 = ops.patch_average(patches, (H, W), layer.kernel, layer.stride, backend=layer.backend)
    spec = layer_sharpening(layer, name, sharpening)
    return sharpen(layer, x0, spec) if spec is not None and spec.iterations > 0 else x0


def layer_sharpening(layer: ConvGMM, name: str, sharpening) -> Optional[Sharpening]:
    """The Sharpening a GMM's samples get: see ``sample_down``'s ``sharpening``."""
    if sharpening is None:
        if layer.sharpen_iterations == 0:
            return None
        return Sharpening(rate=layer.sharpen_rate, iterations=layer.sharpen_iterations)
    if sharpening is False:
        return None
    if isinstance(sharpening, dict):
        return sharpening.get(name)
    if isinstance(sharpening, Sharpening):
        return sharpening
    raise TypeError(f"sharpening: expected None, False, a Sharpening or a dict of them, got {sharpening!r}")


def classifier_topdown(clf: LinearClassifier, classes: torch.Tensor, confidence: float = 0.95) -> torch.Tensor:
    """Top-down prior at the classifier's input for target classes (spec 3.2).

    T = confidence at the class and (1 - confidence) / (C - 1) elsewhere; X = (log T - b) W^T minus its row
    minimum (so X >= 0), shaped as the layer the classifier reads.

    Args:
        classes: (N,) int64.
    Returns:
        (N, *clf.in_shape).
    """
    C = clf.out_shape[0]
    T = torch.full((classes.shape[0], C), (1 - confidence) / (C - 1), dtype=clf.weight.dtype,
                   device=clf.weight.device)
    T.scatter_(1, classes.to(T.device)[:, None], confidence)
    X = (T.log() - clf.bias.detach()) @ clf.weight.detach().T
    X = X - X.min(dim=1, keepdim=True).values
    return X.reshape(classes.shape[0], *clf.in_shape)


def guided_prior(own: torch.Tensor, class_prior: torch.Tensor, guidance: float) -> torch.Tensor:
    """Class-conditional prior at the classifier's input: the model's own top-down sample ``own`` (N, H, W, C)
    weighted by exp(guidance * (X - max X)), X = ``class_prior`` (N, H, W, C) from ``classifier_topdown`` (its
    maximum over a sample's positions and channels taken out, so the weights lie in (0, 1]). guidance 0 gives the
    unconditional sample; large guidance the classifier's most wanted entries alone. Returns (N, H, W, C)."""
    g = check_guidance(guidance)
    peak = class_prior.amax(dim=tuple(range(1, class_prior.dim())), keepdim=True)
    return own * torch.exp(g * (class_prior - peak))


def check_guidance(guidance) -> float:
    """``guidance`` as a float, or a ValueError naming it (finite and >= 0)."""
    try:
        g = float(guidance)
    except (TypeError, ValueError):
        g = float("nan")
    if not (0 <= g < float("inf")):
        raise ValueError(f"guidance: expected a finite value >= 0 or None, got {guidance!r}")
    return g
