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
#: "auto" tries these in order per device type and takes the first that is built. The hand-written "cuda" backend
#: is not in the order: "auto" takes it per layer shape from ``cuda_dispatch.json`` (``resolve_layer``).
AUTO_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("triton", "reference")}


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


def cpu_op(name: str):
    """``torch.ops.dcgmm.<name>`` when the C++ extension is built and registers it (a CPU helper such as
    ``fixed_order_sums_cpp``), else None: the caller takes its ATen form. The same answer for the whole process
    (the extension is loaded on the first call), so a result never depends on what ran first."""
    if problem("cpp") is not None:
        return None
    return getattr(torch.ops.dcgmm, name, None)


LayerKey = Tuple[int, int, int, int, int, int, int, int, str]


def layer_key(in_shape, kernel, stride, n_components: int, independent: bool) -> LayerKey:
    """(H, W, C, kh, kw, sh, sw, K, mode) of a layer or a cgmm call: the key of ``cuda_dispatch.json``."""
    H, W, C = (int(v) for v in in_shape)
    return (H, W, C, int(kernel[0]), int(kernel[1]), int(stride[0]), int(stride[1]), int(n_components),
            "independent" if independent else "shared")


@functools.lru_cache(maxsize=None)
def cuda_dispatch() -> frozenset:
    """The layer shapes the GPU check measured faster with the cuda backend (and verified correct): a set of
    ``layer_key`` tuples read once from ``cuda_dispatch.json`` (empty when the file has none)."""
    import json

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_dispatch.json")
    try:
        with open(path) as f:
            entries = json.load(f).get("entries", [])
    except (OSError, ValueError):
        return frozenset()
    return frozenset(tuple(e["layer"][:8]) + (str(e["layer"][8]),) for e in entries)


def resolve_layer(backend: str, device: torch.device, key: Optional[LayerKey]) -> str:
    """``resolve`` for one layer's call: on a CUDA device "auto" takes "cuda" for the shapes of
    ``cuda_dispatch.json`` (when it is built), else what ``resolve`` picks (triton)."""
    name = resolve(backend, device)
    if (key is not None and device.type == "cuda" and name != "cuda" and backend == "auto"
            and not os.environ.get("DCGMM_BACKEND", "").strip() and key in cuda_dispatch()
            and problem("cuda") is None):
        return "cuda"
    return name


def has_step(name: str) -> bool:
    """Whether backend ``name`` implements the fused training step (``step_partials`` / ``step_finalize``)."""
    return hasattr(module(name), "step_partials")


def get_step(backend: str, device: torch.device, key: Optional[LayerKey] = None) -> ModuleType:
    """The module that runs the fused training step for ``backend``: the resolved backend when it has the step,
    "reference" when "auto" resolved to one without it. Raises BackendNotAvailable for a named backend without it."""
    name = resolve_layer(backend, device, key)
    if has_step(name):
        return _MODULES[name]
    if backend == "auto":
        return module("reference")
    raise BackendNotAvailable(f"backend {name!r} has no fused training step (cgmm_step_partials / "
                              "cgmm_step_finalize); use backend='cuda', 'cpp' or 'reference'")


def get(backend: str, device: torch.device, key: Optional[LayerKey] = None) -> ModuleType:
    """The module that implements the ops for ``backend`` (resolved as ``resolve_layer`` does) on ``device``."""
    return _MODULES[resolve_layer(backend, device, key)]
