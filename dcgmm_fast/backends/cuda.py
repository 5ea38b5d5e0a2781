"""The ``cuda`` backend: hand-written CUDA kernels (``csrc/cuda/``, a torch-free library loaded through ctypes).

Not part of this version: the registry entry exists so that "auto", ``--backend`` and the errors know the name,
and ``backend="cuda"`` says what to use instead. When the library lands, this module defines the Python custom
ops ``dcgmm::cgmm_fwd_cuda`` / ``cgmm_bwd_cuda`` (device type cuda) and calls ``fused.register_fused_ops``.
"""
from __future__ import annotations

from typing import Optional

from . import BackendNotAvailable


def problem() -> Optional[str]:
    return (
        "backend 'cuda' is not built: the CUDA library (csrc/cuda, loaded through ctypes) is not part of this "
        "version; use backend='triton' or 'reference'"
    )


def _missing(*_args, **_kwargs):
    raise BackendNotAvailable(problem())


cgmm = patch_average = sample_components = _missing
