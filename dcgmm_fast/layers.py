"""torch.nn layers of a DCGMM stack: ``ConvGMM``, ``MaxPool``, ``LinearClassifier``.

Layers own parameters and hyper-parameters and call ``dcgmm_fast.ops``, never a kernel. How they are trained
(update rule, annealing, waits) lives in ``train.py``. All layers work on NHWC tensors and are built for a
known input shape (H, W, C), so every parameter has its final shape at construction.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops, validation
from .geometry import out_hw, pair, smoothing_factors
from .types import Backend, CGMMOut, Loss, Mode, PiNorm, Shape3


#: the ways ``DCGMM.fit`` can initialise a layer's means (``ConvGMM(init=)``)
INITS = ("uniform", "data", "kmeans++")


class ConvGMM(nn.Module):
    """Convolutional GMM layer: every (kernel, stride) patch scored by a diagonal GMM with K components.

    Output: responsibilities (N, H', W', K). The layer's own training objective is ``score`` (higher is
    better), averaged over batch and positions.

    Parameters:
        mu: (K, D) shared or (P, K, D) independent; init U(-mu_init, mu_init).
        sigma: like mu, inverse standard deviations; init sqrt(sigma_upper_bound), kept in
            [sigma_min, sqrt(sigma_upper_bound)] by ``clip_``.
        pi_logits: (K,) or (P, K) mixing-weight logits; init constant (uniform weights).
    Buffers (saved and restored with the state dict):
        eps: () float32 current learning rate of the original update rule (annealed by SingleExp).
        som_sigma: () float32 current smoothing width of the "mc" loss (annealed by SingleExp).
        anneal_state: (5,) float64 SingleExp's counters (iteration, window mean, first and last window means,
            events), so training resumes exactly.
    Not saved (derived from som_sigma): smoothing (2, n, n) separable factors (Gy, Gx) of the mc loss's G,
        n = sqrt(K) (``ops.smoothing_factors``).

    Args:
        in_shape: (H, W, C) of the input.
        kernel, stride: int or (h, w); D = kh * kw * C, (H', W') the valid-convolution grid, P = H' * W'.
        n_components: K (a perfect square for loss "mc": components sit on a sqrt(K) x sqrt(K) torus).
        mode, loss, pi_norm: see ``Mode``, ``ops.Loss``, ``PiNorm``.
        eps0, eps_inf, som_sigma0 (default 0.25 * sqrt(2K)), som_sigma_inf, gamma, delta, window
            (default int(1 / eps_inf)): SingleExp annealing (spec 1.8).
        lambda_mu, lambda_sigma, lambda_pi: per-parameter learning-rate factors (spec 1.7).
        wait: fraction of training before the layer starts learning.
        sigma_upper_bound: sigma is clipped to sqrt(sigma_upper_bound) (std >= 1 / sqrt(20) by default).
        sigma_min: positive floor of sigma (the original clips only above).
        top_s, divisor: sampling defaults (spec 3.1).
        tied_init: independent mode: every position starts from the same random means (the original draws each
            position's independently). Component k then ends up meaning nearly the same at neighbouring positions,
            which max-pooling across positions and top-down sampling through a pool rely on (docs/results.md).
        sharpen_iterations, sharpen_rate: the default sharpening of this layer's back-projected samples (spec 3.3,
            ``sampling.Sharpening``; 0 iterations: none).
        init: how ``DCGMM.fit`` initialises the means before the first step: "uniform" (the original's
            U(-mu_init, mu_init), kept from construction), "data" (patches of the layer's input drawn from the first
            training images) or "kmeans++" (k-means++ seeding over those patches); per position in independent
            mode unless ``tied_init`` (``init.init_from_data``).
        backend: ops backend for this layer.
        generator: torch.Generator for the initialisation (None: torch's global RNG).
    """

    def __init__(
        self,
        in_shape: Shape3,
        kernel,
        stride,
        n_components: int,
        *,
        mode: Mode = "shared",
        loss: Loss = "mc",
        pi_norm: PiNorm = "position",
        mu_init: float = 0.1,
        sigma_upper_bound: float = 20.0,
        sigma_min: float = 1e-2,
        eps0: float = 0.011,
        eps_inf: float = 0.01,
        som_sigma0: Optional[float] = None,
        som_sigma_inf: float = 0.01,
        gamma: float = 0.9,
        delta: float = 0.05,
        window: Optional[int] = None,
        lambda_mu: float = 1.0,
        lambda_sigma: float = 0.1,
        lambda_pi: float = 0.2,
        wait: float = 0.0,
        top_s: int = 3,
        divisor: float = 20.0,
        sharpen_iterations: int = 0,
        sharpen_rate: float = 0.1,
        tied_init: bool = False,
        init: str = "uniform",
        backend: Backend = "auto",
        dtype: torch.dtype = torch.float32,
        generator: Optional[torch.Generator] = None,
    ):
        super().__init__()
        H, W, C = _check_shape3("in_shape", in_shape)
        self.kernel, self.stride = pair(kernel), pair(stride)
        if min(self.kernel + self.stride) < 1:
            raise ValueError(f"kernel, stride: expected positive ints, got {kernel}, {stride}")
        if self.kernel[0] > H or self.kernel[1] > W:
            raise ValueError(f"kernel: {self.kernel} is larger than the input (H, W) = {(H, W)}")
        K = int(n_components)
        if K < 1:
            raise ValueError(f"n_components: expected >= 1, got {n_components}")
        if mode not in ("shared", "independent"):
            raise ValueError(f"mode: expected 'shared' or 'independent', got {mode!r}")
        if loss not in ("mc", "loglik"):
            raise ValueError(f"loss: expected 'mc' or 'loglik', got {loss!r}")
        if loss == "mc" and math.isqrt(K) ** 2 != K:
            raise ValueError(f"n_components: loss 'mc' needs a perfect square (sqrt(K) x sqrt(K) grid), got {K}")
        if pi_norm not in ("position", "global"):
            raise ValueError(f"pi_norm: expected 'position' or 'global', got {pi_norm!r}")
        if init not in INITS:
            raise ValueError(f"init: expected one of {INITS}, got {init!r}")
        if not 0.0 <= wait <= 1.0:
            raise ValueError(f"wait: expected a fraction in [0, 1], got {wait}")
        if not 0 < sigma_min < math.sqrt(sigma_upper_bound):
            raise ValueError(f"sigma_min: expected 0 < sigma_min < sqrt(sigma_upper_bound), got {sigma_min}")
        if not (0 < eps_inf <= eps0):
            raise ValueError(f"eps0, eps_inf: expected 0 < eps_inf <= eps0, got {eps0}, {eps_inf}")
        _check_range("mu_init", mu_init, 0.0, 1e3)  # beyond it float32 scores overflow: only a mistake
        _check_range("eps0", eps0, 0.0, 1e3, low_open=True)
        for name, lam in (("lambda_mu", lambda_mu), ("lambda_sigma", lambda_sigma), ("lambda_pi", lambda_pi)):
            _check_range(name, lam, 0.0, 1e6)
        som_sigma0 = 0.25 * math.sqrt(2 * K) if som_sigma0 is None else float(som_sigma0)
        if not (0 < som_sigma_inf <= som_sigma0):
            raise ValueError(f"som_sigma0, som_sigma_inf: expected 0 < inf <= 0, got {som_sigma0}, {som_sigma_inf}")
        if not (0 < gamma < 1):
            raise ValueError(f"gamma: expected 0 < gamma < 1, got {gamma}")
        window = int(1.0 / eps_inf) if window is None else int(window)
        if isinstance(sharpen_iterations, bool) or int(sharpen_iterations) != sharpen_iterations \
                or sharpen_iterations < 0:
            raise ValueError(f"sharpen_iterations: expected an int >= 0, got {sharpen_iterations!r}")
        _check_range("sharpen_rate", sharpen_rate, 0.0, 1e6, low_open=True)
        if window < 2:
            raise ValueError(f"window: expected >= 2 steps, got {window}")

        self.in_shape: Shape3 = (H, W, C)
        Ho, Wo = out_hw((H, W), self.kernel, self.stride)
        self.out_shape: Shape3 = (Ho, Wo, K)
        self.n_components, self.D, self.P = K, self.kernel[0] * self.kernel[1] * C, Ho * Wo
        self.mode, self.loss, self.pi_norm = mode, loss, pi_norm
        self.sigma_upper_bound, self.sigma_min = float(sigma_upper_bound), float(sigma_min)
        self.eps0, self.eps_inf = float(eps0), float(eps_inf)
        self.som_sigma0, self.som_sigma_inf = som_sigma0, float(som_sigma_inf)
        self.gamma, self.delta, self.window = float(gamma), float(delta), window
        self.lambda_mu, self.lambda_sigma, self.lambda_pi = float(lambda_mu), float(lambda_sigma), float(lambda_pi)
        self.wait, self.top_s, self.divisor, self.backend = float(wait), int(top_s), float(divisor), backend
        self.sharpen_iterations, self.sharpen_rate = int(sharpen_iterations), float(sharpen_rate)
        self.tied_init = bool(tied_init)
        self.init = init
        #: in independent mode the original multiplies the update by P (undoes the mean over positions)
        self.loss_mult = float(self.P) if mode == "independent" else 1.0

        lead = (self.P, K) if mode == "independent" else (K,)
        draw = (K,) if tied_init else lead
        mu = ((torch.rand(*draw, self.D, generator=generator, dtype=dtype) * 2 - 1) * mu_init).expand(*lead, self.D)
        mu = mu.contiguous()
        self.mu = nn.Parameter(mu)
        self.sigma = nn.Parameter(torch.full((*lead, self.D), math.sqrt(sigma_upper_bound), dtype=dtype))
        self.pi_logits = nn.Parameter(torch.full(lead, 1.0 / K, dtype=dtype))
        self.register_buffer("eps", torch.tensor(eps0, dtype=torch.float32))
        self.register_buffer("som_sigma", torch.tensor(som_sigma0, dtype=torch.float32))
        self.register_buffer("anneal_state", torch.zeros(5, dtype=torch.float64))
        n = math.isqrt(K)
        self.register_buffer("smoothing", torch.eye(n, dtype=dtype).expand(2, n, n).clone(), persistent=False)
        self.smoothing_is_identity = True
        self.refresh_smoothing()
        self.register_load_state_dict_post_hook(lambda module, _keys: module._after_load())

    # ---------------------------------------------------------------------------------------------- state
    @property
    def sigma_max(self) -> float:
        """Upper clip of sigma, sqrt(sigma_upper_bound); also the sampling's noise-free ceiling."""
        return math.sqrt(self.sigma_upper_bound)

    def refresh_smoothing(self) -> None:
        """Recompute G's factors from ``som_sigma`` (call after changing it; outside any compiled region)."""
        if self.loss != "mc":
            return
        factors = smoothing_factors(self.n_components, float(self.som_sigma), dtype=self.smoothing.dtype)
        self.smoothing.copy_(factors.to(self.smoothing.device))
        self.refresh_identity()

    def refresh_identity(self) -> None:
        """Set ``smoothing_is_identity`` from the current factors (one host read). A Python flag, not a tensor
        test inside forward: the identity takes the kernels' plain-max path (the same result, no smoothing)."""
        if self.loss != "mc":
            return
        n = self.smoothing.shape[-1]
        eye = torch.eye(n, dtype=self.smoothing.dtype, device=self.smoothing.device)
        self.smoothing_is_identity = bool(torch.equal(self.smoothing, eye.expand(2, n, n)))

    def check_parameters(self, name: str = "ConvGMM") -> None:
        """Finite parameters, sigma > 0: done when the layer is loaded (``name`` goes into the message)."""
        validation.check_parameters(name, self.mu, self.sigma, self.pi_logits)

    def _after_load(self) -> None:
        self.check_parameters()
        self.refresh_smoothing()

    def set_annealing(self, eps: float, som_sigma: float) -> None:
        """Set the learning rate and smoothing width (float32 as the original keeps them); refresh G."""
        self.eps.fill_(eps)
        changed = float(self.som_sigma) != float(torch.tensor(som_sigma, dtype=torch.float32))
        self.som_sigma.fill_(som_sigma)
        if changed:
            self.refresh_smoothing()

    @torch.no_grad()
    def clip_(self) -> None:
        """Clip sigma to [sigma_min, sqrt(sigma_upper_bound)] in place."""
        self.sigma.clamp_(self.sigma_min, self.sigma_max)

    # ------------------------------------------------------------------------------ parameters, usual forms
    @property
    def stddev(self) -> torch.Tensor:
        """Standard deviations 1 / sigma, like mu: (K, D) or (P, K, D) (a detached copy)."""
        return 1.0 / self.sigma.detach()

    @property
    def variance(self) -> torch.Tensor:
        """Diagonal covariances 1 / sigma^2, like mu (a detached copy); scikit-learn's ``covariances_``
        (covariance_type="diag")."""
        return 1.0 / self.sigma.detach() ** 2

    @property
    def weights(self) -> torch.Tensor:
        """Mixing weights exp(log_pi) (K,) or (P, K), normalised by ``pi_norm``; scikit-learn's ``weights_``."""
        return self.log_pi().detach().exp()

    # ---------------------------------------------------------------------------------------------- forward
    def log_pi(self) -> torch.Tensor:
        """Normalised log mixing weights (K,) or (P, K), by ``pi_norm``."""
        if self.mode == "independent" and self.pi_norm == "global":
            return torch.log_softmax(self.pi_logits.reshape(-1), 0).reshape(self.pi_logits.shape)
        return torch.log_softmax(self.pi_logits, -1)

    def log_pi_backward(self, log_pi: torch.Tensor, d_log_pi: torch.Tensor) -> torch.Tensor:
        """The gradient on pi_logits (its shape) of sum(d_log_pi * log_pi), log_pi = ``log_pi()`` (detached): the
        log_softmax backward kernel autograd runs (the same bits), without the autograd engine."""
        if self.mode == "independent" and self.pi_norm == "global":
            g = torch._log_softmax_backward_data(d_log_pi.reshape(-1), log_pi.reshape(-1), 0, log_pi.dtype)
            return g.reshape(self.pi_logits.shape)
        return torch._log_softmax_backward_data(d_log_pi, log_pi, -1, log_pi.dtype)

    def op_smoothing(self, loss: Optional[Loss] = None) -> Optional[torch.Tensor]:
        """The smoothing argument of this layer's op for ``loss`` (default its own): the factors (2, n, n), or None
        for loglik and for an identity smoothing (the kernels' plain-max path)."""
        loss = self.loss if loss is None else loss
        return None if loss == "loglik" or self.smoothing_is_identity else self.smoothing

    def cgmm(self, x: torch.Tensor, loss: Optional[Loss] = None, *, check: bool = True,
             frozen: bool = False) -> CGMMOut:
        """The full op output for x (N, H, W, C): resp, score, lse, kstar.

        Args:
            loss: None for the layer's own loss (with the current smoothing), or "loglik" / "mc" to evaluate.
            check: every argument check of ``ops.cgmm`` (a user's call); training, sampling and the model pass
                False (their data was checked once, at the boundary, and the shapes are the layer's own).
            frozen: the parameters as constants (detached): a backward then computes the x gradient only
                (sharpening), not the parameter gradients nobody reads.
        """
        loss = self.loss if loss is None else loss
        G = self.op_smoothing(loss)
        op = ops.cgmm if check else ops._cgmm_unchecked
        mu, sigma, log_pi = self.mu, self.sigma, self.log_pi()
        if frozen:
            mu, sigma, log_pi = mu.detach(), sigma.detach(), log_pi.detach()
        return op(x, mu, sigma, log_pi, kernel=self.kernel, stride=self.stride, loss=loss, smoothing=G,
                  backend=self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) -> responsibilities (N, H', W', K)."""
        return self.cgmm(x).resp

    def extra_repr(self) -> str:
        return (f"in_shape={self.in_shape}, out_shape={self.out_shape}, kernel={self.kernel}, stride={self.stride}, "
                f"K={self.n_components}, mode={self.mode}, loss={self.loss}, pi_norm={self.pi_norm}, wait={self.wait}")


class MaxPool(nn.Module):
    """Max-pooling over (kernel, stride) windows on NHWC, ceil mode, only in-range entries (design.md).

    Output (N, H', W', C) with H' = ceil((H - k) / s) + 1.
    """

    def __init__(self, in_shape: Shape3, kernel=2, stride=2):
        super().__init__()
        H, W, C = _check_shape3("in_shape", in_shape)
        self.kernel, self.stride = pair(kernel), pair(stride)
        if min(self.kernel + self.stride) < 1 or self.kernel[0] > H or self.kernel[1] > W:
            raise ValueError(f"kernel: expected positive and at most the input (H, W) = {(H, W)}, got {kernel}")
        Ho = -(-(H - self.kernel[0]) // self.stride[0]) + 1
        Wo = -(-(W - self.kernel[1]) // self.stride[1]) + 1
        self.in_shape: Shape3 = (H, W, C)
        self.out_shape: Shape3 = (Ho, Wo, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) -> (N, H', W', C)."""
        (kh, kw), (H, W) = self.kernel, x.shape[1:3]
        if self.kernel == self.stride and H % kh == 0 and W % kw == 0 and x.is_contiguous():
            return self._tiled_max(x)
        y = F.max_pool2d(x.permute(0, 3, 1, 2), self.kernel, self.stride, ceil_mode=True)
        return y.permute(0, 2, 3, 1)

    def _tiled_max(self, x: torch.Tensor) -> torch.Tensor:
        """Windows that tile the image (kernel = stride, dividing H and W): elementwise maxima of strided views,
        which read NHWC in order (ATen's channels-last pooling also writes int64 indices: 0.77 -> 0.28 ms on
        preset D's first pooling, (100, 26, 26, 25), 2 CPU threads). NaN propagates as in max_pool2d."""
        (kh, kw), (N, H, W, C) = self.kernel, x.shape
        v = x.view(N, H // kh, kh, W // kw, kw * C)
        rows = v[:, :, 0]
        for i in range(1, kh):
            rows = torch.maximum(rows, v[:, :, i])  # (N, H', W', kw * C)
        out = rows[..., :C]
        for j in range(1, kw):
            out = torch.maximum(out, rows[..., j * C:(j + 1) * C])
        return out

    def extra_repr(self) -> str:
        return f"in_shape={self.in_shape}, out_shape={self.out_shape}, kernel={self.kernel}, stride={self.stride}"


class LinearClassifier(nn.Module):
    """Linear read-out (spec 2.3): logits = flatten(x) @ weight + bias, trained by SGD on softmax cross-entropy.

    Parameters:
        weight: (F, n_classes), init truncated normal with std 1 / sqrt(F) (cut at 2 std, as TF's).
        bias: (n_classes,), init 0.

    Args:
        in_shape: shape of the layer it reads, (H, W, C); F = H * W * C.
        reads: name of that layer (e.g. "pool1"); the stack resolves it.
        lr: SGD learning rate.
    """

    def __init__(
        self,
        in_shape: Shape3,
        n_classes: int,
        *,
        reads: str,
        lr: float = 0.01,
        dtype: torch.dtype = torch.float32,
        generator: Optional[torch.Generator] = None,
    ):
        super().__init__()
        H, W, C = _check_shape3("in_shape", in_shape)
        if n_classes < 2:
            raise ValueError(f"n_classes: expected >= 2, got {n_classes}")
        _check_range("lr", lr, 0.0, 1e6, low_open=True)
        self.in_shape: Shape3 = (H, W, C)
        self.out_shape = (int(n_classes),)
        self.reads, self.lr = reads, float(lr)
        n_in = H * W * C
        std = 1.0 / math.sqrt(n_in)
        weight = torch.empty(n_in, n_classes, dtype=dtype)
        nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std, generator=generator)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(n_classes, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) -> logits (N, n_classes)."""
        # (weight^T features^T)^T: the same product, in the operand order BLAS runs fastest for a narrow weight
        # (F, 10) (classifier-B's F = 20449: 2.1 -> 1.4 ms at batch 100 on 2 cores)
        return (self.weight.t() @ x.reshape(x.shape[0], -1).t()).t() + self.bias

    def extra_repr(self) -> str:
        return f"in_shape={self.in_shape}, n_classes={self.out_shape[0]}, reads={self.reads!r}, lr={self.lr}"


def _check_shape3(name: str, shape) -> Shape3:
    try:
        H, W, C = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected (H, W, C), got {shape!r}") from None
    if min(H, W, C) < 1:
        raise ValueError(f"{name}: expected positive (H, W, C), got {shape!r}")
    return (H, W, C)


def _check_range(name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    """A hyper-parameter that can only be a mistake outside [low, high] (or (low, high])."""
    v = float(value)
    ok = math.isfinite(v) and (v > low if low_open else v >= low) and v <= high
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name}: expected a value in {interval}, got {value}")
