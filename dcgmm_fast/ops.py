"""Public dcgmm ops: argument checks, backend choice, one call per op.

    cgmm(x, mu, sigma, log_pi, *, kernel, stride, loss="mc", smoothing=None, backend="auto") -> CGMMOut
    patches(x, kernel, stride) -> (N, H', W', D)
    patch_average(v, image_hw, kernel, stride, *, backend="auto") -> (N, H, W, C)
    sample_components(topdown, mu, sigma, *, top_s, divisor, u, eps, sigma_ceiling, backend="auto")
    smoothing_matrix(K, som_sigma) -> (K, K)

Backends (design.md "Backends"): "reference" (pure PyTorch, always there), "cpp" (C++ CPU kernels,
``dcgmm_fast._C``), "triton" (Triton kernels, CUDA, or CPU under TRITON_INTERPRET=1), "cuda" (hand-written CUDA).
"auto" honours the ``DCGMM_BACKEND`` environment variable, else picks the fastest backend that is built for
the tensors' device, and never one that is not built. The choice is made per call, never at import time.

Checks that only read shapes run on every call (skipped while torch.compile traces); checks that read tensor
data (sigma <= 0, NaN/Inf) run for CPU tensors only, since on a GPU they would force a device sync.
"""
from __future__ import annotations

import functools
import math
import os
from typing import List, Literal, Optional, Tuple

import torch

from . import reference
from .reference import CGMMOut, IntPair, out_hw, pair, smoothing_matrix

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
]

Loss = Literal["mc", "loglik"]
"""``"mc"``: smoothed max-component score (the paper's loss); ``"loglik"``: exact per-patch log-likelihood."""

Backend = Literal["auto", "reference", "cpp", "triton", "cuda"]
"""``"auto"``: DCGMM_BACKEND if set, else the fastest built backend for the device; ``"reference"``: pure
PyTorch (the oracle); ``"cpp"``: fused C++ CPU kernels; ``"triton"``: fused Triton kernels (CUDA, or CPU under
TRITON_INTERPRET=1); ``"cuda"``: hand-written CUDA kernels."""

BACKENDS = ("reference", "cpp", "triton", "cuda")
#: "auto" tries these in order per device type and takes the first that is built.
_AUTO_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}
_FLOATS = (torch.float32, torch.float64)


class BackendNotAvailable(RuntimeError):
    """A backend was asked for by name but is not built or cannot run here; the message says how to get it."""


# ----------------------------------------------------------------------------------------------------------
# backend registry


@functools.lru_cache(maxsize=None)
def _cpp_problem() -> Optional[str]:
    try:
        from . import _C  # noqa: F401  (loading the library registers torch.ops.dcgmm.*_cpp)
    except ImportError as e:
        return (
            "backend 'cpp' is not built: the C++ extension dcgmm_fast._C was not found "
            f"({e}). Build it from a source checkout with a C++ compiler: `pip install --no-build-isolation -e .`"
        )
    if not hasattr(torch.ops.dcgmm, "cgmm_fwd_cpp"):
        return "backend 'cpp' is not built: dcgmm_fast._C does not register dcgmm::cgmm_fwd_cpp; rebuild it"
    _register_cpp()
    return None


@functools.lru_cache(maxsize=None)
def _triton_problem() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return (
            "backend 'triton' needs the triton package: CUDA builds of torch bring it; on CPU install "
            "`pip install triton==3.7.1` and set TRITON_INTERPRET=1 before dcgmm_fast is first imported"
        )
    try:
        from .triton_kernels import cgmm as _tk  # noqa: F401
    except ImportError as e:
        return f"backend 'triton' failed to import dcgmm_fast.triton_kernels.cgmm ({e}); use backend='reference'"
    _register_triton()
    return None


def _cuda_problem() -> Optional[str]:
    return (
        "backend 'cuda' is not built: the CUDA library (csrc/cuda, loaded through ctypes) is not part of this "
        "version; use backend='triton' or 'reference'"
    )


# ----------------------------------------------------------------------------------------------------------
# cpp backend: fake (meta) functions and autograd of the C++ ops (schemas in csrc/ops.cpp)


def _cgmm_fwd_fake(x, mu, sigma, log_pi, kernel, stride, loss, smoothing):
    Ho, Wo = out_hw(x.shape[1:3], kernel, stride)
    N, K = x.shape[0], mu.shape[-2]
    return (x.new_empty(N, Ho, Wo, K), x.new_empty(N, Ho, Wo), x.new_empty(N, Ho, Wo),
            x.new_empty(N, Ho, Wo, dtype=torch.int32))


def _cgmm_bwd_fake(g_resp, g_score, x, mu, sigma, log_pi, kernel, stride, loss, smoothing, resp, lse, kstar,
                   need_x_grad):
    dx = torch.empty_like(x) if need_x_grad else x.new_empty(0)
    return dx, torch.empty_like(mu), torch.empty_like(sigma), torch.empty_like(log_pi)


def _cgmm_setup_context(ctx, inputs, output):
    x, mu, sigma, log_pi, kernel, stride, loss, smoothing = inputs
    resp, _score, lse, kstar = output
    ctx.save_for_backward(x, mu, sigma, log_pi, smoothing, resp, lse, kstar)
    ctx.kernel, ctx.stride, ctx.loss = kernel, stride, loss


def _make_cgmm_backward(bwd_op):
    """Autograd of a forward op: one call of its backward op. lse and kstar carry no gradient (design.md),
    nor does the smoothing matrix (a constant of the loss)."""

    def backward(ctx, g_resp, g_score, _g_lse, _g_kstar):
        x, mu, sigma, log_pi, smoothing, resp, lse, kstar = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0]
        dx, d_mu, d_sigma, d_log_pi = bwd_op(g_resp, g_score, x, mu, sigma, log_pi, ctx.kernel, ctx.stride,
                                             ctx.loss, smoothing, resp, lse, kstar, need_x)
        return (dx if need_x else None), d_mu, d_sigma, d_log_pi, None, None, None, None

    return backward


def _patch_average_fake(v, image_hw, kernel, stride):
    C = v.shape[3] // (kernel[0] * kernel[1])
    return v.new_empty(v.shape[0], image_hw[0], image_hw[1], C)


def _patch_average_setup_context(ctx, inputs, output):
    _v, ctx.image_hw, ctx.kernel, ctx.stride = inputs


def _patch_average_backward(ctx, g):
    # d average / d v: each patch entry receives its pixel's gradient divided by the pixel's cover count
    C = g.shape[3]
    count = reference.cover_count((ctx.image_hw[0], ctx.image_hw[1], C), ctx.kernel, ctx.stride, g.device)
    scaled = torch.where(count > 0, g / count.clamp_min(1).to(g.dtype), torch.zeros((), dtype=g.dtype, device=g.device))
    return reference.patches(scaled, ctx.kernel, ctx.stride), None, None, None


def _sample_components_fake(topdown, mu, sigma, top_s, divisor, u, eps, sigma_ceiling):
    return mu.new_empty(*topdown.shape[:3], mu.shape[-1])


def _register_cpp() -> None:
    """Fakes and autograd of the C++ ops, once, right after dcgmm_fast._C is loaded."""
    lib = torch.ops.dcgmm
    torch.library.register_fake("dcgmm::cgmm_fwd_cpp")(_cgmm_fwd_fake)
    torch.library.register_fake("dcgmm::cgmm_bwd_cpp")(_cgmm_bwd_fake)
    torch.library.register_fake("dcgmm::patch_average_cpp")(_patch_average_fake)
    torch.library.register_fake("dcgmm::sample_components_cpp")(_sample_components_fake)
    torch.library.register_autograd(
        "dcgmm::cgmm_fwd_cpp", _make_cgmm_backward(lib.cgmm_bwd_cpp), setup_context=_cgmm_setup_context
    )
    torch.library.register_autograd(
        "dcgmm::patch_average_cpp", _patch_average_backward, setup_context=_patch_average_setup_context
    )


def _register_triton() -> None:
    """The Triton ops as torch custom ops (CPU tensors under TRITON_INTERPRET=1, and CUDA tensors), once."""
    from .triton_kernels import cgmm as tk

    devices = ("cpu", "cuda")

    @torch.library.custom_op("dcgmm::cgmm_fwd_triton", mutates_args=(), device_types=devices)
    def cgmm_fwd_triton(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, log_pi: torch.Tensor,
                        kernel: List[int], stride: List[int], loss: str, smoothing: Optional[torch.Tensor]
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return tk.cgmm_fwd(x, mu, sigma, log_pi, tuple(kernel), tuple(stride), loss, smoothing)

    @torch.library.custom_op("dcgmm::cgmm_bwd_triton", mutates_args=(), device_types=devices)
    def cgmm_bwd_triton(g_resp: Optional[torch.Tensor], g_score: Optional[torch.Tensor], x: torch.Tensor,
                        mu: torch.Tensor, sigma: torch.Tensor, log_pi: torch.Tensor, kernel: List[int],
                        stride: List[int], loss: str, smoothing: Optional[torch.Tensor], resp: torch.Tensor,
                        lse: torch.Tensor, kstar: torch.Tensor, need_x_grad: bool
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return tk.cgmm_bwd(g_resp, g_score, x, mu, sigma, log_pi, tuple(kernel), tuple(stride), loss, smoothing,
                           resp, lse, kstar, need_x_grad)

    @torch.library.custom_op("dcgmm::patch_average_triton", mutates_args=(), device_types=devices)
    def patch_average_triton(v: torch.Tensor, image_hw: List[int], kernel: List[int], stride: List[int]
                             ) -> torch.Tensor:
        return tk.fold(v, tuple(image_hw), tuple(kernel), tuple(stride), average=True)

    @torch.library.custom_op("dcgmm::sample_components_triton", mutates_args=(), device_types=devices)
    def sample_components_triton(topdown: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, top_s: int,
                                 divisor: float, u: torch.Tensor, eps: torch.Tensor, sigma_ceiling: float
                                 ) -> torch.Tensor:
        return tk.sample_components(topdown, mu, sigma, top_s, divisor, u, eps, sigma_ceiling)

    cgmm_fwd_triton.register_fake(_cgmm_fwd_fake)
    cgmm_bwd_triton.register_fake(_cgmm_bwd_fake)
    patch_average_triton.register_fake(_patch_average_fake)
    sample_components_triton.register_fake(_sample_components_fake)
    cgmm_fwd_triton.register_autograd(_make_cgmm_backward(cgmm_bwd_triton), setup_context=_cgmm_setup_context)
    patch_average_triton.register_autograd(_patch_average_backward, setup_context=_patch_average_setup_context)


class _FusedBackend:
    """The ops on one fused backend's registered ops, torch.ops.dcgmm.<op>_<suffix>; ``check`` vets the inputs."""

    def __init__(self, suffix: str, check=None):
        self.suffix, self.check = suffix, check or (lambda t, name: None)

    def _op(self, name: str):
        return getattr(torch.ops.dcgmm, f"{name}_{self.suffix}")

    def cgmm(self, x, mu, sigma, log_pi, *, kernel, stride, loss, smoothing):
        self.check(x, "x")
        return CGMMOut(*self._op("cgmm_fwd")(x, mu, sigma, log_pi, list(kernel), list(stride), loss, smoothing))

    def patch_average(self, v, image_hw, kernel, stride):
        self.check(v, "v")
        return self._op("patch_average")(v, list(image_hw), list(kernel), list(stride))

    def sample_components(self, topdown, mu, sigma, *, top_s, divisor, u, eps, sigma_ceiling):
        self.check(mu, "mu")
        return self._op("sample_components")(topdown, mu, sigma, int(top_s), float(divisor), u, eps,
                                             float(sigma_ceiling))


def _triton_check(t: torch.Tensor, name: str) -> None:
    """The Triton kernels compute in float32; CPU tensors need the interpreter."""
    if t.dtype != torch.float32:
        raise TypeError(f"{name}: the triton backend computes in float32, got {t.dtype}; use backend='cpp' or "
                        "'reference' for float64")
    if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendNotAvailable("backend 'triton' runs CPU tensors only under TRITON_INTERPRET=1, set before "
                                  "dcgmm_fast is first imported; use backend='cpp' on CPU")


_CPP = _FusedBackend("cpp")
_TRITON = _FusedBackend("triton", _triton_check)


_PROBLEM = {"reference": lambda: None, "cpp": _cpp_problem, "triton": _triton_problem, "cuda": _cuda_problem}


@torch.compiler.assume_constant_result
def _problem(name: str) -> Optional[str]:
    """Why backend ``name`` cannot run here (None if it can). Cached per backend; under torch.compile it runs at
    trace time and its result is a constant (loading a library must not be traced)."""
    return _PROBLEM[name]()


def available_backends() -> Tuple[str, ...]:
    """Names of the backends that are built and importable here (device permitting)."""
    return tuple(name for name in BACKENDS if _problem(name) is None)


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for a call: validates the name, applies DCGMM_BACKEND and "auto".

    Raises:
        ValueError: unknown name (argument ``backend`` or variable ``DCGMM_BACKEND``).
        BackendNotAvailable: a named backend that is not built.
    """
    source = "backend"
    if backend == "auto":
        env = os.environ.get("DCGMM_BACKEND", "").strip()
        if env and env != "auto":
            backend, source = env, "DCGMM_BACKEND"
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"{source}: expected one of {('auto',) + BACKENDS}, got {backend!r}")
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ("reference",)):
            if _problem(name) is None:
                return name
        return "reference"
    problem = _problem(backend)
    if problem is not None:
        raise BackendNotAvailable(problem)
    return backend


def _impl(backend: str):
    """The module that implements the ops for a resolved backend."""
    if backend == "reference":
        return reference
    if backend == "cpp":
        return _CPP
    if backend == "triton":
        return _TRITON
    raise BackendNotAvailable(_problem(backend) or f"backend {backend!r} has no implementation of this op")


# ----------------------------------------------------------------------------------------------------------
# argument checks


def _skip_checks() -> bool:
    return torch.compiler.is_compiling()


def _check_tensor(name: str, t, ndim: Optional[Tuple[int, ...]] = None, shape_doc: str = "") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() not in ndim:
        raise ValueError(f"{name}: expected {shape_doc}, got shape {tuple(t.shape)}")


def _check_float(name: str, t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> None:
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name}: expected float32 or float64, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (the dtype of x), got {t.dtype}")


def _check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (the device of x), got {t.device}")


def _check_finite(name: str, t: torch.Tensor, allow_neg_inf: bool = False) -> None:
    """Data checks, CPU tensors only (a GPU check would sync the device)."""
    if t.device.type != "cpu":
        return
    bad = torch.isnan(t) | (t == math.inf) if allow_neg_inf else ~torch.isfinite(t)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: expected finite values, got {t[first].item()} at index {first}")


def _is_int(v) -> bool:
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def _pair_arg(name: str, v) -> Tuple[int, int]:
    if _is_int(v):
        p = (v, v)
    elif isinstance(v, (tuple, list, torch.Size)) and len(v) == 2 and all(_is_int(i) for i in v):
        p = (v[0], v[1])
    else:
        raise TypeError(f"{name}: expected an int or a pair of ints, got {v!r}")
    if min(p) < 1:
        raise ValueError(f"{name}: expected positive ints, got {v!r}")
    return p


def _check_window(x: torch.Tensor, kernel, stride) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    k, s = _pair_arg("kernel", kernel), _pair_arg("stride", stride)
    H, W = x.shape[1], x.shape[2]
    if k[0] > H or k[1] > W:
        raise ValueError(f"kernel: {k} is larger than the input's (H, W) = {(H, W)} (x is NHWC: (N, H, W, C))")
    return k, s


def _check_params(x: torch.Tensor, mu, sigma, log_pi, kernel, stride) -> Tuple[int, int]:
    """Shapes, dtypes and devices of the GMM parameters against x; returns (K, D)."""
    N, H, W, C = x.shape
    kh, kw = kernel
    D = kh * kw * C
    Ho, Wo = out_hw((H, W), kernel, stride)
    P = Ho * Wo
    _check_tensor("mu", mu, (2, 3), f"(K, D) or (P, K, D) with D={D}")
    _check_float("mu", mu, x.dtype)
    _check_device("mu", mu, x.device)
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
    _check_tensor("sigma", sigma)
    _check_float("sigma", sigma, x.dtype)
    _check_device("sigma", sigma, x.device)
    if sigma.shape != mu.shape:
        raise ValueError(f"sigma: expected the shape of mu {tuple(mu.shape)}, got {tuple(sigma.shape)}")
    _check_tensor("log_pi", log_pi)
    _check_float("log_pi", log_pi, x.dtype)
    _check_device("log_pi", log_pi, x.device)
    if log_pi.shape != mu.shape[:-1]:
        raise ValueError(f"log_pi: expected shape {tuple(mu.shape[:-1])}, got {tuple(log_pi.shape)}")
    _check_finite("x", x)
    _check_finite("mu", mu)
    _check_finite("sigma", sigma)
    if sigma.device.type == "cpu" and bool((sigma <= 0).any()):
        raise ValueError(f"sigma: expected inverse standard deviations > 0, got min {sigma.min().item()}")
    _check_finite("log_pi", log_pi, allow_neg_inf=True)
    return K, D


def _check_smoothing(smoothing, loss: str, K: int, x: torch.Tensor) -> None:
    if smoothing is None:
        return
    if loss == "loglik":
        raise ValueError("smoothing: must be None for loss 'loglik' (smoothing belongs to the 'mc' loss)")
    _check_tensor("smoothing", smoothing, (2,), f"a (K, K) = ({K}, {K}) matrix")
    if tuple(smoothing.shape) != (K, K):
        raise ValueError(f"smoothing: expected shape ({K}, {K}), got {tuple(smoothing.shape)}")
    _check_float("smoothing", smoothing, x.dtype)
    _check_device("smoothing", smoothing, x.device)
    if smoothing.device.type == "cpu":
        _check_finite("smoothing", smoothing)
        rows = smoothing.sum(1)
        if bool(((rows - 1).abs() > 1e-4).any()) or bool((smoothing < 0).any()):
            raise ValueError("smoothing: expected non-negative rows that sum to 1 (see smoothing_matrix)")


def _check_x(x) -> None:
    _check_tensor("x", x, (4,), "(N, H, W, C) NHWC images")
    _check_float("x", x)
    if min(x.shape) < 1:
        raise ValueError(f"x: expected non-empty (N, H, W, C), got shape {tuple(x.shape)}")


# ----------------------------------------------------------------------------------------------------------
# public ops


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
        smoothing: (K, K) matrix G for "mc" with rows summing to 1 (``smoothing_matrix``); None = identity.
        backend: see ``Backend``.
    Returns:
        CGMMOut(resp (N,H',W',K), score (N,H',W') higher is better, lse (N,H',W'), kstar (N,H',W') int32,
        ties -> lowest index).
    """
    if not _skip_checks():
        _check_x(x)
        kernel, stride = _check_window(x, kernel, stride)
        K, _ = _check_params(x, mu, sigma, log_pi, kernel, stride)
        if loss not in ("mc", "loglik"):
            raise ValueError(f"loss: expected 'mc' or 'loglik', got {loss!r}")
        if loss == "mc" and math.isqrt(K) ** 2 != K:
            raise ValueError(f"mu: loss 'mc' puts components on a sqrt(K) x sqrt(K) grid; K={K} is not a square")
        _check_smoothing(smoothing, loss, K, x)
    kernel, stride = pair(kernel), pair(stride)
    impl = _impl(resolve_backend(backend, x.device))
    return impl.cgmm(x, mu, sigma, log_pi, kernel=kernel, stride=stride, loss=loss, smoothing=smoothing)


def patches(x: torch.Tensor, kernel: IntPair, stride: IntPair) -> torch.Tensor:
    """im2col in (ky, kx, c) order: (N, H, W, C) -> (N, H', W', kh*kw*C). Reference only (tests, debugging)."""
    if not _skip_checks():
        _check_tensor("x", x, (4,), "(N, H, W, C) NHWC images")
        _check_window(x, kernel, stride)
    return reference.patches(x, pair(kernel), pair(stride))


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
    if not _skip_checks():
        _check_tensor("v", v, (4,), "(N, H', W', D) patch values")
        _check_float("v", v)
        k, s = _pair_arg("kernel", kernel), _pair_arg("stride", stride)
        H, W = _pair_arg("image_hw", image_hw)
        if k[0] > H or k[1] > W:
            raise ValueError(f"kernel: {k} is larger than image_hw {(H, W)}")
        if v.shape[3] % (k[0] * k[1]):
            raise ValueError(f"v: D = {v.shape[3]} is not a multiple of kh*kw = {k[0] * k[1]}")
        if tuple(v.shape[1:3]) != out_hw((H, W), k, s):
            raise ValueError(
                f"v: expected (H', W') = {out_hw((H, W), k, s)} for image_hw {(H, W)}, kernel {k}, stride {s}; "
                f"got {tuple(v.shape[1:3])}"
            )
    impl = _impl(resolve_backend(backend, v.device))
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
    if not _skip_checks():
        _check_tensor("topdown", topdown, (4,), "(N, H', W', K)")
        _check_float("topdown", topdown)
        _check_tensor("mu", mu, (2, 3), "(K, D) or (P, K, D)")
        _check_float("mu", mu)
        N, Ho, Wo, K = topdown.shape
        if mu.shape[-2] != K:
            raise ValueError(f"mu: expected K = {K} components (topdown's last dim), got {tuple(mu.shape)}")
        if mu.dim() == 3 and mu.shape[0] != Ho * Wo:
            raise ValueError(f"mu: independent mode needs P = {Ho * Wo} GMMs, got {tuple(mu.shape)}")
        _check_tensor("sigma", sigma)
        if sigma.shape != mu.shape or sigma.dtype != mu.dtype:
            raise ValueError(f"sigma: expected shape {tuple(mu.shape)} and dtype {mu.dtype}, got "
                             f"{tuple(sigma.shape)} {sigma.dtype}")
        _check_tensor("u", u)
        if tuple(u.shape) != (N, Ho, Wo):
            raise ValueError(f"u: expected shape {(N, Ho, Wo)}, got {tuple(u.shape)}")
        _check_tensor("eps", eps)
        if tuple(eps.shape) != (N, Ho, Wo, mu.shape[-1]):
            raise ValueError(f"eps: expected shape {(N, Ho, Wo, mu.shape[-1])}, got {tuple(eps.shape)}")
        for name, t in (("topdown", topdown), ("mu", mu), ("sigma", sigma), ("u", u), ("eps", eps)):
            _check_device(name, t, mu.device)
        if not isinstance(top_s, int):
            raise TypeError(f"top_s: expected an int, got {type(top_s).__name__}")
        if not (divisor > 0 and math.isfinite(divisor)):
            raise ValueError(f"divisor: expected a finite value > 0, got {divisor}")
        if not sigma_ceiling > 0:
            raise ValueError(f"sigma_ceiling: expected > 0, got {sigma_ceiling}")
        _check_finite("topdown", topdown)
        if sigma.device.type == "cpu" and bool((sigma <= 0).any()):
            raise ValueError(f"sigma: expected inverse standard deviations > 0, got min {sigma.min().item()}")
        if u.device.type == "cpu" and bool(((u < 0) | (u >= 1)).any()):
            raise ValueError("u: expected uniforms in [0, 1)")
    impl = _impl(resolve_backend(backend, mu.device))
    return impl.sample_components(
        topdown, mu, sigma, top_s=top_s, divisor=divisor, u=u, eps=eps, sigma_ceiling=sigma_ceiling
    )
