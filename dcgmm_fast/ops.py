"""Public dcgmm ops: check the arguments once, resolve the backend, call it.

    cgmm(x, mu, sigma, log_pi, *, kernel, stride, loss="mc", smoothing=None, backend="auto") -> CGMMOut
    patches(x, kernel, stride) -> (N, H', W', D)
    patch_average(v, image_hw, kernel, stride, *, backend="auto") -> (N, H, W, C)
    sample_components(topdown, mu, sigma, *, top_s, divisor, u, eps, sigma_ceiling, backend="auto")
    smoothing_matrix(K, som_sigma) -> (K, K);  smoothing_factors(K, som_sigma) -> (2, sqrt(K), sqrt(K))
    cgmm_step_partials(x, mu, sigma, log_pi, *, kernel, stride, loss, smoothing, backend) -> (CGMMOut, stats)
    cgmm_step_finalize(stats, mu, sigma, pi_logits, log_pi, *, smoothing, scale, steps, sigma_min, sigma_max,
                       pi_global, backend) -> (mu, sigma, pi_logits, maxima)

Backends live in ``dcgmm_fast.backends`` (the registry: "reference", "cpp", "triton", "cuda"); "auto" honours
the ``DCGMM_BACKEND`` environment variable, else picks the fastest backend that is built for the tensors' device,
and never one that is not built. The choice is made per call, never at import time.

Checks (``dcgmm_fast.validation``) that only read shapes run on every call (skipped while torch.compile
traces); checks that read tensor data (sigma <= 0, NaN/Inf) run for CPU tensors only. The package's own callers
(training, sampling, the model) use ``_cgmm_unchecked``, which skips the data scans: they check their data once
at the boundary (a data set when ``fit`` starts, parameters when created or loaded).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import backends, validation
from .backends import BackendNotAvailable
from .geometry import pair, patches as _patches, smoothing_factors, smoothing_matrix
from .types import Backend, CGMMOut, IntPair, Loss

__all__ = [
    "CGMMOut",
    "Backend",
    "Loss",
    "BackendNotAvailable",
    "available_backends",
    "resolve_backend",
    "cgmm",
    "patches",
    "patch_average",
    "sample_components",
    "smoothing_matrix",
    "smoothing_factors",
    "cgmm_step_partials",
    "cgmm_step_finalize",
]

#: every backend name (the registry's), for callers that list them
BACKENDS = backends.names()


def available_backends() -> Tuple[str, ...]:
    """Names of the backends that are built and importable here (device permitting)."""
    return backends.available()


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for a call: validates the name, applies DCGMM_BACKEND and "auto".

    Raises:
        ValueError: unknown name (argument ``backend`` or variable ``DCGMM_BACKEND``).
        BackendNotAvailable: a named backend that is not built.
    """
    return backends.resolve(backend, device)


def cgmm(
    x: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    log_pi: torch.Tensor,
    *,
    kernel: IntPair,
    stride: IntPair,
    loss: Loss = "mc",
    smoothing: Optional[torch.Tensor] = None,
    backend: Backend = "auto",
) -> CGMMOut:
    """Convolutional GMM: score every patch of x under one shared (or one per position) diagonal GMM.

    log_score[r,k] = log_pi[k] + sum_d log sigma[k,d] - 1/2 sum_d sigma[k,d]^2 (x[r,d] - mu[k,d])^2 per patch
    row r = (n, oy, ox), patch entries d in (ky, kx, c) order. Differentiable in x, mu, sigma, log_pi.

    Args:
        x: (N, H, W, C) float32/float64, NHWC.
        mu: (K, D) shared or (P, K, D) independent component means, D = kh*kw*C, P = H'*W'.
        sigma: like mu; inverse standard deviations (precision = sigma^2), > 0.
        log_pi: (K,) or (P, K) log mixing weights, already normalised by the caller.
        kernel, stride: int or (h, w); H' = (H - kh) // sh + 1, no padding.
        loss: "mc" (K must be a perfect square) or "loglik".
        smoothing: for "mc", a (K, K) matrix G with rows summing to 1 (``smoothing_matrix``) or its separable
            factors (2, n, n), G = kron(Gy, Gx), n = sqrt(K) (``smoothing_factors``; cheaper); None = identity.
        backend: see ``Backend``.
    Returns:
        CGMMOut(resp (N,H',W',K), score (N,H',W') higher is better, lse (N,H',W'), kstar (N,H',W') int32,
        ties -> lowest index).
    """
    if not validation.skip_checks():
        validation.check_cgmm(x, mu, sigma, log_pi, kernel, stride, loss, smoothing)
    return _cgmm_unchecked(x, mu, sigma, log_pi, kernel=kernel, stride=stride, loss=loss, smoothing=smoothing,
                           backend=backend)


def _cgmm_unchecked(x, mu, sigma, log_pi, *, kernel, stride, loss="mc", smoothing=None, backend="auto") -> CGMMOut:
    """``cgmm`` without the argument checks and data scans, for the package's own callers (layers in training,
    sampling, the model), whose shapes are fixed at construction and whose data was checked once."""
    kernel, stride = pair(kernel), pair(stride)
    key = _layer_key(x, mu, kernel, stride)
    impl = backends.get(backend, x.device, key)
    return impl.cgmm(x, mu, sigma, log_pi, kernel=kernel, stride=stride, loss=loss, smoothing=smoothing)


def _layer_key(x, mu, kernel, stride):
    """The dispatch key of a call on a CUDA device (None elsewhere: the table is only for CUDA)."""
    if x.device.type != "cuda":
        return None
    return backends.layer_key(x.shape[1:4], kernel, stride, mu.shape[-2], mu.dim() == 3)


def patches(x: torch.Tensor, kernel: IntPair, stride: IntPair) -> torch.Tensor:
    """im2col in (ky, kx, c) order: (N, H, W, C) -> (N, H', W', kh*kw*C). Plain PyTorch (tests, debugging)."""
    if not validation.skip_checks():
        validation.check_tensor("x", x, (4,), "(N, H, W, C) NHWC images")
        validation.check_window(x, kernel, stride)
    return _patches(x, pair(kernel), pair(stride))


def patch_average(
    v: torch.Tensor,
    image_hw: Tuple[int, int],
    kernel: IntPair,
    stride: IntPair,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Back-projection of patches to pixels for sampling: scatter-add, divide by the cover count (0 if none).

    Args:
        v: (N, H', W', D) patch values, D = kh*kw*C.
        image_hw: (H, W) of the target image; H' must equal (H - kh) // sh + 1 (likewise W').
    Returns:
        (N, H, W, C), differentiable in v. ``patch_average(patches(x)) == x`` where patches cover x.
    """
    if not validation.skip_checks():
        validation.check_patch_average(v, image_hw, kernel, stride)
    impl = backends.get(backend, v.device)
    return impl.patch_average(v, pair(image_hw), pair(kernel), pair(stride))


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
    backend: Backend = "auto",
) -> torch.Tensor:
    """Draw a component per position from a top-down prior; return its mean plus scaled noise (spec 3.1).

    Args:
        topdown: (N, H', W', K) unnormalised prior (e.g. the layer above's sample, or responsibilities).
        mu, sigma: (K, D) shared or (P, K, D) independent, P = H'*W'.
        top_s: keep the top_s largest entries per position (ties kept); <= 0 keeps all.
        divisor: noise std is 1 / (sigma * divisor); > 0.
        u: (N, H', W') uniforms in [0, 1) choosing the component by inverse CDF.
        eps: (N, H', W', D) standard normal noise.
        sigma_ceiling: dims with sigma >= this are noise-free (sigma clipped at its upper bound).
    Returns:
        (N, H', W', D); zero at positions whose topdown sums to <= 0.
    """
    if not validation.skip_checks():
        validation.check_sample_components(topdown, mu, sigma, top_s, divisor, u, eps, sigma_ceiling)
    impl = backends.get(backend, mu.device)
    return impl.sample_components(
        topdown, mu, sigma, top_s=top_s, divisor=divisor, u=u, eps=eps, sigma_ceiling=sigma_ceiling
    )


# ---------------------------------------------------------------------------------- the fused training step
def cgmm_step_partials(x, mu, sigma, log_pi, *, kernel: IntPair, stride: IntPair, loss: Loss = "mc",
                       smoothing: Optional[torch.Tensor] = None, backend: Backend = "auto"):
    """A layer's training step, first half: the forward and the statistics its update needs, in one fused op.

    Returns (CGMMOut, stats (G, K, 1 + 2D) float64), G = P (independent) or 1 (shared): per component j the sums
    over rows of W, W (x - mu_j) and W (x - mu_j)^2 with W the one-hot winner (mc) or resp (loglik)
    (``reference.cgmm_step_partials``). Statistics of data shards add up (data-parallel training all-reduces them
    between the two halves). Not differentiable (the step's gradients are in the statistics).
    Backends: "cuda" (fused kernels), "cpp" (the same arithmetic on CPU), "reference"; others raise
    ``BackendNotAvailable``. "auto" picks the layer's backend where it has the step, else "reference".
    """
    if not validation.skip_checks():
        validation.check_cgmm(x, mu, sigma, log_pi, kernel, stride, loss, smoothing)
    return _step_partials_unchecked(x, mu, sigma, log_pi, kernel=kernel, stride=stride, loss=loss,
                                    smoothing=smoothing, backend=backend)


def _step_partials_unchecked(x, mu, sigma, log_pi, *, kernel, stride, loss="mc", smoothing=None, backend="auto"):
    """``cgmm_step_partials`` without the checks and data scans (the trainer's call; see ``_cgmm_unchecked``)."""
    kernel, stride = pair(kernel), pair(stride)
    key = _layer_key(x, mu, kernel, stride)
    impl = backends.get_step(backend, x.device, key)
    return impl.step_partials(x, mu, sigma, log_pi, kernel=kernel, stride=stride, loss=loss, smoothing=smoothing)


def cgmm_step_finalize(stats, mu, sigma, pi_logits, log_pi, *, smoothing: Optional[torch.Tensor], scale: float,
                       steps: torch.Tensor, sigma_min: float, sigma_max: float, pi_global: bool = False,
                       backend: Backend = "auto"):
    """A layer's training step, second half: the original update rule from the statistics (``cgmm_step_partials``).

    Args:
        stats: (G, K, 1 + 2D) float64 statistics (summed over ranks when data-parallel).
        mu, sigma, pi_logits: the layer's parameters; log_pi: their normalised log weights (the forward's input).
        smoothing: the mc loss's G (dense or factors) the statistics were taken under, else None.
        scale: 1 / the number of rows the statistics sum over (the mean score's gradient).
        steps: (3,) step sizes (s_mu, s_sigma, s_pi) = lambda * eps * loss_mult, on the parameters' device.
        sigma_min, sigma_max: sigma's clip; pi_global: one softmax over all P*K logits (``pi_norm="global"``).
    Returns:
        new (mu, sigma, pi_logits) and (max |mu|, max |pi_logits|) (2,); the inputs are unchanged.
    """
    if not validation.skip_checks():
        K, D = mu.shape[-2], mu.shape[-1]
        G = mu.shape[0] if mu.dim() == 3 else 1
        if tuple(stats.shape) != (G, K, 1 + 2 * D):
            raise ValueError(f"stats: expected ({G}, {K}, {1 + 2 * D}) for mu {tuple(mu.shape)}, got "
                             f"{tuple(stats.shape)}")
        if tuple(steps.shape) != (3,):
            raise ValueError(f"steps: expected (3,) step sizes (mu, sigma, pi), got {tuple(steps.shape)}")
        if not 0 < sigma_min <= sigma_max:
            raise ValueError(f"sigma_min, sigma_max: expected 0 < sigma_min <= sigma_max, got {sigma_min}, "
                             f"{sigma_max}")
    impl = backends.get_step(backend, mu.device)
    return impl.step_finalize(stats, mu, sigma, pi_logits, log_pi, smoothing=smoothing, scale=float(scale),
                              steps=steps, sigma_min=float(sigma_min), sigma_max=float(sigma_max),
                              pi_global=bool(pi_global))
