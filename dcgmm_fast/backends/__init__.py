"""The backends of the dcgmm ops and their registry: the one place that knows every backend by name.

A backend is a module in this package with a ``problem()`` function (None when it can run here, else a message
that says how to get it; the first successful call loads the backend and registers its ops) and the op entry
points ``cgmm``, ``patch_average`` and ``sample_components`` (ops it lacks raise ``BackendNotAvailable``).
Adding a backend is one module plus one line in ``REGISTRY``; "auto"'s order per device type is ``AUTO_ORDER``.
``dcgmm_fast.types.Backend`` and the CLI's ``--backend`` choices are checked against ``names()`` by a test.

The choice is made per call (``resolve``), never at import time; backend modules import their heavy
dependencies (the C++ library, triton, the CUDA library) only in ``problem()``.
"""
from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Dict, Optional, Tuple

import torch


class BackendNotAvailable(RuntimeError):
    """A backend was asked for by name but is not built or cannot run here; the message says how to get it."""


@dataclass(frozen=True)
class BackendSpec:
    """A registry entry: the backend's module (relative to this package), devices and dtypes it computes in."""

    name: str
    module: str
    device_types: Tuple[str, ...]
    dtypes: Tuple[torch.dtype, ...]
    doc: str


_F32, _F64 = torch.float32, torch.float64
REGISTRY = {spec.name: spec for spec in (
    BackendSpec("reference", ".reference", ("cpu", "cuda"), (_F32, _F64), "pure PyTorch, the oracle"),
    BackendSpec("cpp", ".cpp", ("cpu",), (_F32, _F64), "fused C++ CPU kernels (dcgmm_fast._C)"),
    BackendSpec("triton", ".triton", ("cuda", "cpu"), (_F32,), "fused Triton kernels (CPU under TRITON_INTERPRET=1)"),
    BackendSpec("cuda", ".cuda", ("cuda",), (_F32,), "hand-written CUDA kernels (csrc/cuda, through ctypes)"),
)}
#: "auto" tries these in order per device type and takes the first that is built.
AUTO_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}


def names() -> Tuple[str, ...]:
    """Every backend's name, in registry order (without "auto")."""
    return tuple(REGISTRY)


_MODULES: Dict[str, ModuleType] = {}


def module(name: str) -> ModuleType:
    """The backend's module (imported on first use; importing it loads nothing heavy). Plain dict lookups once
    loaded, so that torch.compile traces through the dispatch (``resolve`` loads it first)."""
    if name not in _MODULES:
        _MODULES[name] = importlib.import_module(REGISTRY[name].module, __name__)
    return _MODULES[name]


@functools.lru_cache(maxsize=None)
def _problem_cached(name: str) -> Optional[str]:
    return module(name).problem()


@torch.compiler.assume_constant_result
def problem(name: str) -> Optional[str]:
    """Why backend ``name`` cannot run here (None if it can). Cached per backend; under torch.compile it runs at
    trace time and its result is a constant (loading a library must not be traced)."""
    return _problem_cached(name)


def available() -> Tuple[str, ...]:
    """Names of the backends that are built and importable here (device permitting)."""
    return tuple(name for name in REGISTRY if problem(name) is None)


def resolve(backend: str, device: torch.device) -> str:
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
    if backend != "auto" and backend not in REGISTRY:
        raise ValueError(f"{source}: expected one of {('auto',) + names()}, got {backend!r}")
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("reference",)):
            if problem(name) is None:
                return name
        return "reference"
    why = problem(backend)
    if why is not None:
        raise BackendNotAvailable(why)
    return backend


def get(backend: str, device: torch.device) -> ModuleType:
    """The module that implements the ops for ``backend`` (resolved as ``resolve`` does) on ``device``."""
    return _MODULES[resolve(backend, device)]
