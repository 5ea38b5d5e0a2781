"""The ``cpp`` backend: fused C++ CPU kernels (``csrc/``), loaded from the extension ``dcgmm_fast._C``.

The schemas are in ``csrc/ops.cpp`` (the one ``TORCH_LIBRARY(dcgmm)``), the kernels in ``csrc/cpu/cgmm.cpp``;
fakes and autograd come from ``fused.register_fused_ops``. float32 and float64; CPU tensors.
"""
from __future__ import annotations

from typing import Optional

import torch

from .fused import FusedOps, register_fused_ops

_OPS = FusedOps("cpp")
cgmm, patch_average, sample_components = _OPS.cgmm, _OPS.patch_average, _OPS.sample_components
#: the CUDA backend's fused training step with its arithmetic on CPU (csrc/cpu/step.cpp): tests, not training speed
step_partials, step_finalize = _OPS.step_partials, _OPS.step_finalize


def cpu_isa() -> str:
    """The instruction set the C++ kernels run with now: "avx512", "avx2" or "baseline" (x86-64 without AVX2, or
    another CPU): the best this CPU has, capped by ``DCGMM_CPU_ISA`` (read at every call; ``csrc/cpu/isa.h``)."""
    from .. import _C  # noqa: F401

    return torch.ops.dcgmm.cpu_isa_cpp()


def problem() -> Optional[str]:
    """Loads ``dcgmm_fast._C`` (which registers ``torch.ops.dcgmm.*_cpp``) and wires fakes and autograd."""
    try:
        from .. import _C  # noqa: F401
    except ImportError as e:
        return (
            "backend 'cpp' is not built: the C++ extension dcgmm_fast._C was not found "
            f"({e}). Build it from a source checkout with a C++ compiler: `pip install --no-build-isolation -e .`"
        )
    if not hasattr(torch.ops.dcgmm, "cgmm_fwd_cpp"):
        return "backend 'cpp' is not built: dcgmm_fast._C does not register dcgmm::cgmm_fwd_cpp; rebuild it"
    if not hasattr(torch.ops.dcgmm, "cgmm_step_partials_cpp"):
        return "backend 'cpp' is out of date: dcgmm_fast._C lacks dcgmm::cgmm_step_partials_cpp; rebuild it"
    register_fused_ops("cpp", step=True)
    if hasattr(torch.ops.dcgmm, "cgmm_fwd_grads_cpp"):
        torch.library.register_fake("dcgmm::cgmm_fwd_grads_cpp")(_fwd_grads_fake)
    if hasattr(torch.ops.dcgmm, "fixed_order_sums_cpp"):
        torch.library.register_fake("dcgmm::fixed_order_sums_cpp")(_fixed_order_sums_fake)
    if hasattr(torch.ops.dcgmm, "classifier_step_cpp"):
        torch.library.register_fake("dcgmm::classifier_step_cpp")(_classifier_step_fake)
    return None


def _classifier_step_fake(weight, bias, features, y, lr):
    """``dcgmm::classifier_step_cpp`` (``train.classifier_step``): weight, bias in place; (loss (), accuracy ()
    float32)."""
    return weight.new_empty(()), weight.new_empty((), dtype=torch.float32)


def _fixed_order_sums_fake(rows):
    """``dcgmm::fixed_order_sums_cpp``: (R, M) -> (R,) float64 (``train.fixed_order_row_sums``)."""
    return rows.new_empty(rows.shape[:1], dtype=torch.float64)


def _fwd_grads_fake(x, mu, sigma, log_pi, kernel, stride, loss, smoothing, g_score, s_mu=None, s_sigma=None,
                    sigma_min=0.0, sigma_max=0.0, grads_out=True):
    """``dcgmm::cgmm_fwd_grads_cpp`` (the eager training step's one pass, ``train._gmm_step_one_pass``): the
    forward's outputs, d_mu, d_sigma (empty with grads_out=False), d_log_pi and max |mu| after the update (empty
    without one)."""
    from .fused import cgmm_fwd_fake

    mu_max = mu.new_empty(()) if s_mu is not None else mu.new_empty(0)
    d_mu, d_sigma = (torch.empty_like(mu), torch.empty_like(sigma)) if grads_out else (mu.new_empty(0),) * 2
    return (*cgmm_fwd_fake(x, mu, sigma, log_pi, kernel, stride, loss, smoothing), d_mu, d_sigma,
            torch.empty_like(log_pi), mu_max)
