"""The ``triton`` backend: fused Triton kernels (``triton_kernels/``, installed as ``dcgmm_fast.triton_kernels``)
as Python custom ops ``dcgmm::{cgmm_fwd,cgmm_bwd,patch_average,sample_components}_triton`` for CUDA tensors and,
under ``TRITON_INTERPRET=1`` (set before the first import of triton), CPU tensors. float32 only.

Kernel generations: ``DCGMM_TRITON_KERNELS=v1`` selects the first forward kernel (component tiles with an
online logsumexp, raw scores parked in resp; ``triton_kernels/cgmm_v1.py``); the default is the one-pass forward
of ``triton_kernels/cgmm.py``. The backward is the same for both. ``DCGMM_TRITON_PRECISION`` picks the products'
precision per call (see ``_precision``). A factored smoothing (2, n, n) is expanded to the dense kron(Gy, Gx) for the
kernels (K^2 per row on the GPU, where the smoothing is a small part of the work).
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch

from ..geometry import smoothing_dense
from . import BackendNotAvailable
from .fused import FusedOps, register_fused_ops


def problem() -> Optional[str]:
    """Imports triton and the kernels, then defines and wires the custom ops (once)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return (
            "backend 'triton' needs the triton package: CUDA builds of torch bring it; on CPU install "
            "`pip install triton==3.7.1` and set TRITON_INTERPRET=1 before dcgmm_fast is first imported"
        )
    try:
        from ..triton_kernels import cgmm as _tk  # noqa: F401
    except ImportError as e:
        return f"backend 'triton' failed to import dcgmm_fast.triton_kernels.cgmm ({e}); use backend='reference'"
    _define_ops()
    register_fused_ops("triton")
    return None


def _precision() -> str:
    """``DCGMM_TRITON_PRECISION``: "ieee" (default) or "tf32x3" (split-TF32 tensor-core products for the large-D
    GEMMs; off by default until the GPU check has measured its error against design.md's rule). Read per call."""
    return os.environ.get("DCGMM_TRITON_PRECISION", "ieee")


def _dense(smoothing: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if smoothing is None else smoothing_dense(smoothing).contiguous()


def _define_ops() -> None:
    from ..triton_kernels import cgmm as tk

    devices = ("cpu", "cuda")

    @torch.library.custom_op("dcgmm::cgmm_fwd_triton", mutates_args=(), device_types=devices)
    def cgmm_fwd_triton(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, log_pi: torch.Tensor,
                        kernel: List[int], stride: List[int], loss: str, smoothing: Optional[torch.Tensor]
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if os.environ.get("DCGMM_TRITON_KERNELS") == "v1":
            from ..triton_kernels.cgmm_v1 import cgmm_fwd_v1

            return cgmm_fwd_v1(x, mu, sigma, log_pi, tuple(kernel), tuple(stride), loss, _dense(smoothing))
        return tk.cgmm_fwd(x, mu, sigma, log_pi, tuple(kernel), tuple(stride), loss, _dense(smoothing),
                           precision=_precision())

    @torch.library.custom_op("dcgmm::cgmm_bwd_triton", mutates_args=(), device_types=devices)
    def cgmm_bwd_triton(g_resp: Optional[torch.Tensor], g_score: Optional[torch.Tensor], x: torch.Tensor,
                        mu: torch.Tensor, sigma: torch.Tensor, log_pi: torch.Tensor, kernel: List[int],
                        stride: List[int], loss: str, smoothing: Optional[torch.Tensor], resp: torch.Tensor,
                        lse: torch.Tensor, kstar: torch.Tensor, need_x_grad: bool, need_param_grads: bool = True
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return tk.cgmm_bwd(g_resp, g_score, x, mu, sigma, log_pi, tuple(kernel), tuple(stride), loss,
                           _dense(smoothing), resp, lse, kstar, need_x_grad, precision=_precision(),
                           need_param_grads=need_param_grads)

    @torch.library.custom_op("dcgmm::patch_average_triton", mutates_args=(), device_types=devices)
    def patch_average_triton(v: torch.Tensor, image_hw: List[int], kernel: List[int], stride: List[int]
                             ) -> torch.Tensor:
        return tk.fold(v, tuple(image_hw), tuple(kernel), tuple(stride), average=True)

    @torch.library.custom_op("dcgmm::sample_components_triton", mutates_args=(), device_types=devices)
    def sample_components_triton(topdown: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, top_s: int,
                                 divisor: float, u: torch.Tensor, eps: torch.Tensor, sigma_ceiling: float
                                 ) -> torch.Tensor:
        return tk.sample_components(topdown, mu, sigma, top_s, divisor, u, eps, sigma_ceiling)


def _check(t: torch.Tensor, name: str) -> None:
    """The Triton kernels compute in float32; CPU tensors need the interpreter."""
    if t.dtype != torch.float32:
        raise TypeError(f"{name}: the triton backend computes in float32, got {t.dtype}; use backend='cpp' or "
                        "'reference' for float64")
    if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendNotAvailable("backend 'triton' runs CPU tensors only under TRITON_INTERPRET=1, set before "
                                  "dcgmm_fast is first imported; use backend='cpp' on CPU")


class _TritonOps(FusedOps):
    def cgmm(self, x, mu, sigma, log_pi, **kw):
        _check(x, "x")
        return super().cgmm(x, mu, sigma, log_pi, **kw)

    def patch_average(self, v, image_hw, kernel, stride):
        _check(v, "v")
        return super().patch_average(v, image_hw, kernel, stride)

    def sample_components(self, topdown, mu, sigma, **kw):
        _check(mu, "mu")
        return super().sample_components(topdown, mu, sigma, **kw)


_OPS = _TritonOps("triton")
cgmm, patch_average, sample_components = _OPS.cgmm, _OPS.patch_average, _OPS.sample_components
