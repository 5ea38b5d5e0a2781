"""Argument checks of the public ops, and the data checks done once at the boundary (design.md "The cGMM op").

Shape, dtype and device checks raise ``ValueError`` / ``TypeError`` naming the argument and are skipped while
torch.compile traces. Checks that read tensor data (NaN/Inf, sigma <= 0) run for CPU tensors only in the ops
(on a GPU they would force a device sync). Training, sampling and the model call ``ops._cgmm_unchecked``
instead and check their data once: a data set when ``fit`` starts, parameters when created or loaded
(``check_images``, ``check_parameters``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .geometry import out_hw

_FLOATS = (torch.float32, torch.float64)


def skip_checks() -> bool:
    return torch.compiler.is_compiling()


def check_tensor(name: str, t, ndim: Optional[Tuple[int, ...]] = None, shape_doc: str = "") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() not in ndim:
        raise ValueError(f"{name}: expected {shape_doc}, got shape {tuple(t.shape)}")


def check_float(name: str, t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> None:
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name}: expected float32 or float64, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (the dtype of x), got {t.dtype}")


def check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (the device of x), got {t.device}")


def check_finite(name: str, t: torch.Tensor, allow_neg_inf: bool = False) -> None:
    """Data checks, CPU tensors only (a GPU check would sync the device)."""
    if t.device.type != "cpu":
        return
    bad = torch.isnan(t) | (t == math.inf) if allow_neg_inf else ~torch.isfinite(t)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: expected finite values, got {t[first].item()} at index {first}")


def is_int(v) -> bool:
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def pair_arg(name: str, v) -> Tuple[int, int]:
    if is_int(v):
        p = (v, v)
    elif isinstance(v, (tuple, list, torch.Size)) and len(v) == 2 and all(is_int(i) for i in v):
        p = (v[0], v[1])
    else:
        raise TypeError(f"{name}: expected an int or a pair of ints, got {v!r}")
    if min(p) < 1:
        raise ValueError(f"{name}: expected positive ints, got {v!r}")
    return p


def check_window(x: torch.Tensor, kernel, stride) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    k, s = pair_arg("kernel", kernel), pair_arg("stride", stride)
    H, W = x.shape[1], x.shape[2]
    if k[0] > H or k[1] > W:
        raise ValueError(f"kernel: {k} is larger than the input's (H, W) = {(H, W)} (x is NHWC: (N, H, W, C))")
    return k, s


def check_params(x: torch.Tensor, mu, sigma, log_pi, kernel, stride) -> Tuple[int, int]:
    """Shapes, dtypes and devices of the GMM parameters against x; returns (K, D)."""
    N, H, W, C = x.shape
    kh, kw = kernel
    D = kh * kw * C
    Ho, Wo = out_hw((H, W), kernel, stride)
    P = Ho * Wo
    check_tensor("mu", mu, (2, 3), f"(K, D) or (P, K, D) with D={D}")
    check_float("mu", mu, x.dtype)
    check_device("mu", mu, x.device)
    if mu.shape[-1] != D:
        raise ValueError(
            f"mu: expected (K, D) or (P, K, D) with D = kh*kw*C = {kh}*{kw}*{C} = {D}, got {tuple(mu.shape)}"
        )
    if mu.dim() == 3 and mu.shape[0] != P:
        raise ValueError(
            f"mu: independent mode needs P = H'*W' = {Ho}*{Wo} = {P} GMMs, got {tuple(mu.shape)}"
        )
    K = mu.shape[-2]
    if K < 1:
        raise ValueError(f"mu: expected K >= 1 components, got {tuple(mu.shape)}")
    check_tensor("sigma", sigma)
    check_float("sigma", sigma, x.dtype)
    check_device("sigma", sigma, x.device)
    if sigma.shape != mu.shape:
        raise ValueError(f"sigma: expected the shape of mu {tuple(mu.shape)}, got {tuple(sigma.shape)}")
    check_tensor("log_pi", log_pi)
    check_float("log_pi", log_pi, x.dtype)
    check_device("log_pi", log_pi, x.device)
    if log_pi.shape != mu.shape[:-1]:
        raise ValueError(f"log_pi: expected shape {tuple(mu.shape[:-1])}, got {tuple(log_pi.shape)}")
    check_finite("x", x)
    check_finite("mu", mu)
    check_finite("sigma", sigma)
    if sigma.device.type == "cpu" and bool((sigma <= 0).any()):
        raise ValueError(f"sigma: expected inverse standard deviations > 0, got min {sigma.min().item()}")
    check_finite("log_pi", log_pi, allow_neg_inf=True)
    if log_pi.device.type == "cpu" and bool((log_pi == -math.inf).all(-1).any()):
        raise ValueError("log_pi: every mixing weight of a GMM is 0 (all -inf): the mixture has no component")
    check_magnitudes(x, mu, sigma, D)
    return K, D


def check_magnitudes(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, D: int) -> None:
    """CPU data check: sum_d sigma^2 (x - mu)^2 must stay finite in x's dtype (1e30-sized inputs overflow it
    to inf and the op would return NaN without a word)."""
    if x.device.type != "cpu" or x.numel() == 0:
        return
    x, mu, sigma = x.detach(), mu.detach(), sigma.detach()  # a check: no autograd, no warning about it
    spread = float(x.abs().max()) + float(mu.abs().max())
    worst = (float(sigma.max()) * spread) ** 2 * D
    if not worst < torch.finfo(x.dtype).max / 16:
        raise ValueError(f"x, mu, sigma: sigma^2 (x - mu)^2 summed over D = {D} would overflow {x.dtype} "
                         f"(max |x| + max |mu| = {spread:.3g}, max sigma = {float(sigma.max()):.3g}); rescale the "
                         "inputs or parameters")


def check_smoothing(smoothing, loss: str, K: int, x: torch.Tensor) -> None:
    """None, a dense (K, K) G or its separable factors (2, n, n) with n * n = K; rows non-negative, summing to 1."""
    if smoothing is None:
        return
    if loss == "loglik":
        raise ValueError("smoothing: must be None for loss 'loglik' (smoothing belongs to the 'mc' loss)")
    n = math.isqrt(K)
    doc = f"a (K, K) = ({K}, {K}) matrix or its factors (2, n, n) = (2, {n}, {n})"
    check_tensor("smoothing", smoothing, (2, 3), doc)
    if tuple(smoothing.shape) not in ((K, K), (2, n, n)):
        raise ValueError(f"smoothing: expected {doc}, got {tuple(smoothing.shape)}")
    check_float("smoothing", smoothing, x.dtype)
    check_device("smoothing", smoothing, x.device)
    if smoothing.device.type == "cpu":
        check_finite("smoothing", smoothing)
        rows = smoothing.sum(-1)
        if bool(((rows - 1).abs() > 1e-4).any()) or bool((smoothing < 0).any()):
            raise ValueError("smoothing: expected non-negative rows that sum to 1 (see smoothing_matrix, "
                             "smoothing_factors)")


def check_x(x) -> None:
    check_tensor("x", x, (4,), "(N, H, W, C) NHWC images")
    check_float("x", x)
    if min(x.shape) < 1:
        raise ValueError(f"x: expected non-empty (N, H, W, C), got shape {tuple(x.shape)}")




def check_images(name: str, x: torch.Tensor) -> None:
    """A data set or batch of images, once at the boundary: finite values in [0, 1] (any device; one sync)."""
    if x.numel() == 0:
        return
    lo, hi = torch.aminmax(x.detach())
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = ~torch.isfinite(x)
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: images contain NaN or Inf: {x[first].item()} at index {first}")
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{name}: expected images scaled to [0, 1] (uint8 / 255), got values in [{lo:.4g}, {hi:.4g}]")


def check_parameters(layer_name: str, mu: torch.Tensor, sigma: torch.Tensor, pi_logits: torch.Tensor) -> None:
    """GMM parameters when created or loaded: finite, sigma > 0 (any device; one sync per tensor)."""
    for pname, t in (("mu", mu), ("sigma", sigma), ("pi_logits", pi_logits)):
        if not bool(torch.isfinite(t).all()):
            bad = ~torch.isfinite(t.detach())
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{layer_name}.{pname}: expected finite values, got {t[first].item()} at index {first}")
    if bool((sigma <= 0).any()):
        raise ValueError(f"{layer_name}.sigma: expected inverse standard deviations > 0, got min {sigma.min().item()}")


def check_cgmm(x, mu, sigma, log_pi, kernel, stride, loss, smoothing) -> None:
    """Every check of ``ops.cgmm`` (design.md), data scans on CPU tensors."""
    check_x(x)
    kernel, stride = check_window(x, kernel, stride)
    K, _ = check_params(x, mu, sigma, log_pi, kernel, stride)
    if loss not in ("mc", "loglik"):
        raise ValueError(f"loss: expected 'mc' or 'loglik', got {loss!r}")
    if loss == "mc" and math.isqrt(K) ** 2 != K:
        raise ValueError(f"mu: loss 'mc' puts components on a sqrt(K) x sqrt(K) grid; K={K} is not a square")
    check_smoothing(smoothing, loss, K, x)


def check_patch_average(v, image_hw, kernel, stride) -> None:
    """Every check of ``ops.patch_average``."""
    check_tensor("v", v, (4,), "(N, H', W', D) patch values")
    check_float("v", v)
    k, s = pair_arg("kernel", kernel), pair_arg("stride", stride)
    H, W = pair_arg("image_hw", image_hw)
    if k[0] > H or k[1] > W:
        raise ValueError(f"kernel: {k} is larger than image_hw {(H, W)}")
    if v.shape[3] % (k[0] * k[1]):
        raise ValueError(f"v: D = {v.shape[3]} is not a multiple of kh*kw = {k[0] * k[1]}")
    if tuple(v.shape[1:3]) != out_hw((H, W), k, s):
        raise ValueError(
            f"v: expected (H', W') = {out_hw((H, W), k, s)} for image_hw {(H, W)}, kernel {k}, stride {s}; "
            f"got {tuple(v.shape[1:3])}"
        )
    check_finite("v", v)


def check_sample_components(topdown, mu, sigma, top_s, divisor, u, eps, sigma_ceiling) -> None:
    """Every check of ``ops.sample_components``."""
    check_tensor("topdown", topdown, (4,), "(N, H', W', K)")
    check_float("topdown", topdown)
    check_tensor("mu", mu, (2, 3), "(K, D) or (P, K, D)")
    check_float("mu", mu)
    N, Ho, Wo, K = topdown.shape
    if mu.shape[-2] != K:
        raise ValueError(f"mu: expected K = {K} components (topdown's last dim), got {tuple(mu.shape)}")
    if mu.dim() == 3 and mu.shape[0] != Ho * Wo:
        raise ValueError(f"mu: independent mode needs P = {Ho * Wo} GMMs, got {tuple(mu.shape)}")
    check_tensor("sigma", sigma)
    if sigma.shape != mu.shape or sigma.dtype != mu.dtype:
        raise ValueError(f"sigma: expected shape {tuple(mu.shape)} and dtype {mu.dtype}, got "
                         f"{tuple(sigma.shape)} {sigma.dtype}")
    check_tensor("u", u)
    if tuple(u.shape) != (N, Ho, Wo):
        raise ValueError(f"u: expected shape {(N, Ho, Wo)}, got {tuple(u.shape)}")
    check_tensor("eps", eps)
    if tuple(eps.shape) != (N, Ho, Wo, mu.shape[-1]):
        raise ValueError(f"eps: expected shape {(N, Ho, Wo, mu.shape[-1])}, got {tuple(eps.shape)}")
    for name, t in (("topdown", topdown), ("mu", mu), ("sigma", sigma), ("u", u), ("eps", eps)):
        check_device(name, t, mu.device)
    if not isinstance(top_s, int):
        raise TypeError(f"top_s: expected an int, got {type(top_s).__name__}")
    if not (divisor > 0 and math.isfinite(divisor)):
        raise ValueError(f"divisor: expected a finite value > 0, got {divisor}")
    if not sigma_ceiling > 0:
        raise ValueError(f"sigma_ceiling: expected > 0, got {sigma_ceiling}")
    check_finite("topdown", topdown)
    check_finite("mu", mu)
    check_finite("sigma", sigma)
    check_finite("eps", eps)
    if sigma.device.type == "cpu" and bool((sigma <= 0).any()):
        raise ValueError(f"sigma: expected inverse standard deviations > 0, got min {sigma.min().item()}")
    if u.device.type == "cpu" and not bool(((u >= 0) & (u < 1)).all()):  # also catches NaN
        raise ValueError("u: expected uniforms in [0, 1) (no NaN)")
