"""The ``reference`` backend: the pure-PyTorch oracle (``dcgmm_fast.reference``) behind the backend interface."""
from __future__ import annotations

from typing import Optional

from .. import reference as _oracle


def problem() -> Optional[str]:
    """Always available."""
    return None


def cgmm(x, mu, sigma, log_pi, *, kernel, stride, loss, smoothing):
    return _oracle.cgmm(x, mu, sigma, log_pi, kernel=kernel, stride=stride, loss=loss, smoothing=smoothing)


def patch_average(v, image_hw, kernel, stride):
    return _oracle.patch_average(v, image_hw, kernel, stride)


def sample_components(topdown, mu, sigma, *, top_s, divisor, u, eps, sigma_ceiling):
    return _oracle.sample_components(topdown, mu, sigma, top_s=top_s, divisor=divisor, u=u, eps=eps,
                                     sigma_ceiling=sigma_ceiling)


def step_partials(x, mu, sigma, log_pi, *, kernel, stride, loss, smoothing):
    return _oracle.cgmm_step_partials(x, mu, sigma, log_pi, kernel=kernel, stride=stride, loss=loss,
                                      smoothing=smoothing)


def step_finalize(stats, mu, sigma, pi_logits, log_pi, *, smoothing, scale, steps, sigma_min, sigma_max, pi_global):
    return _oracle.cgmm_step_finalize(stats, mu, sigma, pi_logits, log_pi, smoothing=smoothing, scale=scale,
                                      steps=steps, sigma_min=sigma_min, sigma_max=sigma_max, pi_global=pi_global)
