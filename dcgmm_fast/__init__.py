"""dcgmm_fast: Deep Convolutional Gaussian Mixture Models with fused CPU and GPU kernels.

Public ops live in ``dcgmm_fast.ops`` (``cgmm``, ``patches``, ``patch_average``, ``sample_components``,
``smoothing_matrix``); the pure-PyTorch oracle in ``dcgmm_fast.reference``; the shipped Fashion-MNIST subset
in ``dcgmm_fast.data``; the trainable stack in ``dcgmm_fast.model`` (``DCGMM``), its layers in
``dcgmm_fast.layers``, its training in ``dcgmm_fast.train`` and the paper's architectures in
``dcgmm_fast.presets``.

Imported before torch, it sets ``OMP_WAIT_POLICY=PASSIVE`` unless the user set one (``_openmp.py``: idle OpenMP
workers sleep instead of spinning, so a training step does not collapse when another process shares the cores).
"""
from . import _openmp  # noqa: F401  (first: before anything imports torch)
from . import data, ops, presets, reference
from .layers import ConvGMM, LinearClassifier, MaxPool
from .model import DCGMM
from .ops import CGMMOut, cgmm, patch_average, patches, sample_components, smoothing_matrix

__version__ = "0.1.0"

__all__ = [
    "CGMMOut",
    "ConvGMM",
    "DCGMM",
    "LinearClassifier",
    "MaxPool",
    "presets",
    "cgmm",
    "data",
    "ops",
    "patch_average",
    "patches",
    "reference",
    "sample_components",
    "smoothing_matrix",
]
