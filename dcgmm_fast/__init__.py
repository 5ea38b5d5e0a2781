"""dcgmm_fast: Deep Convolutional Gaussian Mixture Models with fused CPU and GPU kernels.

Public ops live in ``dcgmm_fast.ops`` (``cgmm``, ``patches``, ``patch_average``, ``sample_components``,
``smoothing_matrix``); the pure-PyTorch oracle in ``dcgmm_fast.reference``; the shipped Fashion-MNIST subset
in ``dcgmm_fast.data``.
"""
from . import data, ops, reference
from .ops import CGMMOut, cgmm, patch_average, patches, sample_components, smoothing_matrix

__version__ = "0.1.0"

__all__ = [
    "CGMMOut",
    "cgmm",
    "data",
    "ops",
    "patch_average",
    "patches",
    "reference",
    "sample_components",
    "smoothing_matrix",
]
