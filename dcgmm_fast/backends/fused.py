"""What every fused backend shares: the fakes and autograd of its torch.library ops, written once, and the calls
into ``torch.ops.dcgmm.<op>_<suffix>`` (design.md "Registration").

A fused backend X provides four ops, C++ (``csrc/ops.cpp``) or Python ``custom_op``s:
``dcgmm::cgmm_fwd_X`` / ``cgmm_bwd_X`` / ``patch_average_X`` / ``sample_components_X``; ``register_fused_ops(X)``
gives them fakes and autograd (the cGMM forward's backward is one call of ``cgmm_bwd_X``; lse, kstar and the
smoothing carry no gradient), and ``FusedOps(X)`` calls them. Output poisoning (``DCGMM_POISON=1``) is each
backend's own: the C++ kernels' ``new_output`` and ``triton_kernels.cgmm.new_output``.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..geometry import out_hw, patch_average_grad
from ..types import CGMMOut


# ---------------------------------------------------------------------------------------------- fakes
def cgmm_fwd_fake(x, mu, sigma, log_pi, kernel, stride, loss, smoothing):
    Ho, Wo = out_hw(x.shape[1:3], kernel, stride)
    N, K = x.shape[0], mu.shape[-2]
    return (x.new_empty(N, Ho, Wo, K), x.new_empty(N, Ho, Wo), x.new_empty(N, Ho, Wo),
            x.new_empty(N, Ho, Wo, dtype=torch.int32))


def cgmm_bwd_fake(g_resp, g_score, x, mu, sigma, log_pi, kernel, stride, loss, smoothing, resp, lse, kstar,
                  need_x_grad, need_param_grads=True):
    dx = torch.empty_like(x) if need_x_grad else x.new_empty(0)
    if not need_param_grads:
        return dx, mu.new_empty(0), mu.new_empty(0), mu.new_empty(0)
    return dx, torch.empty_like(mu), torch.empty_like(sigma), torch.empty_like(log_pi)


def patch_average_fake(v, image_hw, kernel, stride):
    C = v.shape[3] // (kernel[0] * kernel[1])
    return v.new_empty(v.shape[0], image_hw[0], image_hw[1], C)


def sample_components_fake(topdown, mu, sigma, top_s, divisor, u, eps, sigma_ceiling):
    return mu.new_empty(*topdown.shape[:3], mu.shape[-1])


def cgmm_step_partials_fake(x, mu, sigma, log_pi, kernel, stride, loss, smoothing):
    K, D = mu.shape[-2], mu.shape[-1]
    G = mu.shape[0] if mu.dim() == 3 else 1
    return (*cgmm_fwd_fake(x, mu, sigma, log_pi, kernel, stride, loss, smoothing),
            mu.new_empty(G, K, 1 + 2 * D, dtype=torch.float64))


def cgmm_step_finalize_fake(stats, mu, sigma, pi_logits, log_pi, smoothing, scale, steps, sigma_min, sigma_max,
                            pi_global):
    return torch.empty_like(mu), torch.empty_like(sigma), torch.empty_like(pi_logits), mu.new_empty(2)


# ---------------------------------------------------------------------------------------------- autograd
def _cgmm_setup_context(ctx, inputs, output):
    x, mu, sigma, log_pi, kernel, stride, loss, smoothing = inputs
    resp, _score, lse, kstar = output
    ctx.save_for_backward(x, mu, sigma, log_pi, smoothing, resp, lse, kstar)
    ctx.kernel, ctx.stride, ctx.loss = kernel, stride, loss
    # an unused output's gradient arrives as None, not as zeros: training differentiates the score only, and a
    # zero (M, K) g_resp costs a fill and a read of M * K floats (8 MB for classifier-B's first layer)
    ctx.set_materialize_grads(False)


def _make_cgmm_backward(bwd_op: Callable):
    """Autograd of a forward op: one call of its backward op. lse and kstar carry no gradient (design.md),
    nor does the smoothing matrix (a constant of the loss)."""

    def backward(ctx, g_resp, g_score, _g_lse, _g_kstar):
        x, mu, sigma, log_pi, smoothing, resp, lse, kstar = ctx.saved_tensors
        need_x, need_params = ctx.needs_input_grad[0], any(ctx.needs_input_grad[1:4])
        dx, d_mu, d_sigma, d_log_pi = bwd_op(g_resp, g_score, x, mu, sigma, log_pi, ctx.kernel, ctx.stride,
                                             ctx.loss, smoothing, resp, lse, kstar, need_x, need_params)
        if not need_params:  # e.g. sharpening: only x is differentiated
            d_mu = d_sigma = d_log_pi = None
        return (dx if need_x else None), d_mu, d_sigma, d_log_pi, None, None, None, None

    return backward


def _patch_average_setup_context(ctx, inputs, output):
    _v, ctx.image_hw, ctx.kernel, ctx.stride = inputs


def _patch_average_backward(ctx, g):
    return patch_average_grad(g, ctx.kernel, ctx.stride), None, None, None


def register_fused_ops(suffix: str, helpers: bool = True, step: bool = False) -> None:
    """Fakes and autograd of ``dcgmm::{cgmm_fwd,cgmm_bwd}_<suffix>`` (and with ``helpers`` of
    ``patch_average_<suffix>``, ``sample_components_<suffix>``; with ``step`` the fakes of the fused training step
    ``cgmm_step_partials_<suffix>``, ``cgmm_step_finalize_<suffix>``, which carry no autograd), once, after the ops
    are defined (a C++ library loaded, or Python custom ops created)."""
    name = lambda op: f"dcgmm::{op}_{suffix}"  # noqa: E731
    torch.library.register_fake(name("cgmm_fwd"))(cgmm_fwd_fake)
    torch.library.register_fake(name("cgmm_bwd"))(cgmm_bwd_fake)
    bwd = getattr(torch.ops.dcgmm, f"cgmm_bwd_{suffix}")
    torch.library.register_autograd(name("cgmm_fwd"), _make_cgmm_backward(bwd), setup_context=_cgmm_setup_context)
    if helpers:
        torch.library.register_fake(name("patch_average"))(patch_average_fake)
        torch.library.register_fake(name("sample_components"))(sample_components_fake)
        torch.library.register_autograd(name("patch_average"), _patch_average_backward,
                                        setup_context=_patch_average_setup_context)
    if step:
        torch.library.register_fake(name("cgmm_step_partials"))(cgmm_step_partials_fake)
        torch.library.register_fake(name("cgmm_step_finalize"))(cgmm_step_finalize_fake)


class FusedOps:
    """The backend interface over one fused backend's registered ops, ``torch.ops.dcgmm.<op>_<suffix>``."""

    def __init__(self, suffix: str):
        self.suffix = suffix

    def _op(self, name: str):
        return getattr(torch.ops.dcgmm, f"{name}_{self.suffix}")

    def cgmm(self, x, mu, sigma, log_pi, *, kernel, stride, loss, smoothing):
        return CGMMOut(*self._op("cgmm_fwd")(x, mu, sigma, log_pi, list(kernel), list(stride), loss, smoothing))

    def patch_average(self, v, image_hw, kernel, stride):
        return self._op("patch_average")(v, list(image_hw), list(kernel), list(stride))

    def sample_components(self, topdown, mu, sigma, *, top_s, divisor, u, eps, sigma_ceiling):
        return self._op("sample_components")(topdown, mu, sigma, int(top_s), float(divisor), u, eps,
                                             float(sigma_ceiling))

    def step_partials(self, x, mu, sigma, log_pi, *, kernel, stride, loss, smoothing):
        """(CGMMOut, stats) of ``dcgmm::cgmm_step_partials_<suffix>`` (see ``ops.cgmm_step_partials``)."""
        resp, score, lse, kstar, stats = self._op("cgmm_step_partials")(x, mu, sigma, log_pi, list(kernel),
                                                                        list(stride), loss, smoothing)
        return CGMMOut(resp, score, lse, kstar), stats

    def step_finalize(self, stats, mu, sigma, pi_logits, log_pi, *, smoothing, scale, steps, sigma_min, sigma_max,
                      pi_global):
        return self._op("cgmm_step_finalize")(stats, mu, sigma, pi_logits, log_pi, smoothing, float(scale), steps,
                                              float(sigma_min), float(sigma_max), bool(pi_global))
