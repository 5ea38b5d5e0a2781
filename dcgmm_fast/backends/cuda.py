"""The ``cuda`` backend: hand-written CUDA kernels (``csrc/cuda/``), a torch-free library ``libdcgmm_cuda.so``
with a C ABI (``csrc/cuda/dcgmm_cuda.h``) loaded through ctypes at the first launch.

The custom ops ``dcgmm::cgmm_fwd_cuda``, ``cgmm_bwd_cuda`` and the fused training step
``dcgmm::cgmm_step_partials_cuda`` / ``cgmm_step_finalize_cuda`` (device type cuda) are defined when this module is
imported, with their fakes and the forward's autograd, whether or not the library or a GPU is there (so schema and
fake-tensor checks run on CPU). Each call passes ``data_ptr()``s, int64 sizes and
``torch.cuda.current_stream().cuda_stream`` under a device guard, with a workspace from torch's allocator (the
library never allocates, so CUDA graphs capture it). float32 only; at most 128 components. The sampling helpers
are Triton's (or the reference's): light gathers where hand-written CUDA buys nothing (gpu_review.md).

The library is built by ``pip install -e .`` when nvcc is found (``tools/cuda_build.py build`` by hand);
``DCGMM_CUDA_LIB`` names another copy. ``DCGMM_CUDA_FORWARD=wgmma`` sends shared-mode forwards on sm_90 to the
warpgroup-MMA kernel (``csrc/cuda/cgmm_wgmma.cu``, reachable only by name until the GPU check has verified it).
"""
from __future__ import annotations

import ctypes
import os
from typing import List, Optional, Tuple

import torch

from ..geometry import out_hw, smoothing_dense
from . import BackendNotAvailable
from .fused import FusedOps, register_fused_ops

LIBRARY = "libdcgmm_cuda.so"
#: workspace kinds (csrc/cuda/dcgmm_cuda.h)
WS_FORWARD, WS_BACKWARD, WS_STEP_PARTIALS, WS_STEP_FINALIZE = 0, 1, 2, 3
ABI_VERSION = 2
MAX_COMPONENTS = 128


class Shape(ctypes.Structure):
    """``dcgmm_shape`` of dcgmm_cuda.h."""

    _fields_ = [(name, ctypes.c_int64) for name in
                ("N", "H", "W", "C", "stride_n", "stride_h", "kh", "kw", "sh", "sw", "K", "independent")]


def library_path() -> str:
    """Where the library is looked for: ``DCGMM_CUDA_LIB``, else next to the package's modules."""
    env = os.environ.get("DCGMM_CUDA_LIB")
    if env:
        return env
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), LIBRARY)


_LIB: Optional[ctypes.CDLL] = None
_P, _I, _I64, _D, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_double, ctypes.c_float
_SIGNATURES = {  # argument and result types of csrc/cuda/dcgmm_cuda.h (a test checks them against the header)
    "dcgmm_cuda_abi_version": ([], _I),
    "dcgmm_cuda_device_count": ([ctypes.POINTER(ctypes.c_int)], _I),
    "dcgmm_cuda_error_string": ([_I], ctypes.c_char_p),
    "dcgmm_cuda_last_message": ([], ctypes.c_char_p),
    "dcgmm_cuda_workspace_bytes": ([_P, _I], _I64),
    # shape, x, mu, sigma, log_pi, is_mc, smoothing, smoothing_n, resp, score, lse, kstar, workspace, bytes, stream
    "dcgmm_cgmm_fwd": ([_P] * 5 + [_I, _P, _I] + [_P] * 4 + [_P, _I64, _P], _I),
    "dcgmm_cgmm_fwd_wgmma": ([_P] * 5 + [_I, _P, _I] + [_P] * 4 + [_P, _I64, _P], _I),
    # shape, g_resp, g_score, g_score_scalar, x, mu, sigma, log_pi, is_mc, smoothing, smoothing_n, resp, kstar,
    # need_x_grad, need_param_grads, dx, d_mu, d_sigma, d_log_pi, workspace, bytes, stream
    "dcgmm_cgmm_bwd": ([_P, _P, _P, _I] + [_P] * 4 + [_I, _P, _I, _P, _P, _I, _I] + [_P] * 4 + [_P, _I64, _P], _I),
    # shape, x, mu, sigma, log_pi, is_mc, smoothing, smoothing_n, resp, score, lse, kstar, stats, workspace, ...
    "dcgmm_cgmm_step_partials": ([_P] * 5 + [_I, _P, _I] + [_P] * 5 + [_P, _I64, _P], _I),
    # shape, stats, mu, sigma, pi_logits, log_pi, smoothing, scale, steps, sigma_min, sigma_max, pi_global, new_mu,
    # new_sigma, new_pi_logits, maxima, workspace, bytes, stream
    "dcgmm_cgmm_step_finalize": ([_P] * 7 + [_D, _P, _F, _F, _I] + [_P] * 4 + [_P, _I64, _P], _I),
}


def _load() -> ctypes.CDLL:
    """The library (loaded once). Raises BackendNotAvailable saying how to get it."""
    global _LIB
    if _LIB is not None:
        return _LIB
    path = library_path()
    if not os.path.exists(path):
        raise BackendNotAvailable(
            f"backend 'cuda' is not built: {path} was not found. It is built by `pip install --no-build-isolation "
            "-e .` when nvcc is on PATH (or run `python tools/cuda_build.py build`); use backend='triton' meanwhile")
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        raise BackendNotAvailable(f"backend 'cuda': {path} does not load ({e}); rebuild it with "
                                  "`python tools/cuda_build.py build`") from None
    for name, (args, res) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    if lib.dcgmm_cuda_abi_version() != ABI_VERSION:
        raise BackendNotAvailable(f"backend 'cuda': {path} has ABI {lib.dcgmm_cuda_abi_version()}, this package "
                                  f"needs {ABI_VERSION}; rebuild it with `python tools/cuda_build.py build`")
    _LIB = lib
    return lib


def device_problem() -> Optional[str]:
    """Loads the library and asks the CUDA driver for a device: None, or why the kernels cannot run here
    (library missing, "no CUDA device" with the driver's words, or a CPU build of torch)."""
    try:
        lib = _load()
    except BackendNotAvailable as e:
        return str(e)
    count = ctypes.c_int(0)
    err = lib.dcgmm_cuda_device_count(ctypes.byref(count))
    if err != 0 or count.value == 0:
        why = lib.dcgmm_cuda_error_string(err).decode() if err else "the driver reports 0 devices"
        return f"backend 'cuda': no CUDA device ({why}); use backend='cpp' or 'reference' on CPU"
    if not torch.cuda.is_available():
        return (f"backend 'cuda': this torch ({torch.__version__}) has no CUDA; install a CUDA build of torch to pass "
                "it CUDA tensors")
    return None


def problem() -> Optional[str]:
    return device_problem()


# ---------------------------------------------------------------------------------------------- calls
def _check(t: torch.Tensor, name: str) -> None:
    if t.device.type != "cuda":
        raise ValueError(f"{name}: the cuda backend takes CUDA tensors, got one on {t.device}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name}: the cuda backend computes in float32, got {t.dtype}; use backend='reference' "
                        "for float64")


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _poison() -> bool:
    return os.environ.get("DCGMM_POISON") == "1"


def _new(*shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """An output; under DCGMM_POISON=1 filled with NaN (-1 for integers) so that an unwritten element shows."""
    t = torch.empty(*shape, dtype=dtype or like.dtype, device=like.device)
    if _poison():
        t.fill_(-1 if not t.dtype.is_floating_point else float("nan"))
    return t


def _shape(x: torch.Tensor, mu: torch.Tensor, kernel, stride) -> Tuple[Shape, torch.Tensor]:
    """The ABI's shape and an x it can read (entries and pixels contiguous; image and row strides free)."""
    if x.stride(3) != 1 or x.stride(2) != x.shape[3]:
        x = x.contiguous()
    N, H, W, C = x.shape
    K = mu.shape[-2]
    if K > MAX_COMPONENTS:
        raise BackendNotAvailable(f"backend 'cuda' takes at most {MAX_COMPONENTS} components, got K = {K}; use "
                                  "backend='triton'")
    return Shape(N, H, W, C, x.stride(0), x.stride(1), kernel[0], kernel[1], stride[0], stride[1], K,
                 int(mu.dim() == 3)), x


def _call(name: str, lib: ctypes.CDLL, *args) -> None:
    err = getattr(lib, name)(*args)
    if err != 0:
        msg = lib.dcgmm_cuda_error_string(err).decode()
        raise RuntimeError(f"{name}: {msg} (cudaError {err})")


def _workspace(lib: ctypes.CDLL, shape: Shape, kind: int, device) -> torch.Tensor:
    n = lib.dcgmm_cuda_workspace_bytes(ctypes.byref(shape), kind)
    if n < 0:
        raise ValueError(f"dcgmm cuda: the library refuses the shape ({lib.dcgmm_cuda_error_string(1).decode()})")
    return torch.empty(max(int(n), 1), dtype=torch.uint8, device=device)


def _smoothing(smoothing: Optional[torch.Tensor], loss: str) -> Tuple[Optional[torch.Tensor], int]:
    """The kernels' smoothing argument: (the factors (2, n, n), n) as the layers pass them (separable: 2 K n per row),
    (the dense (K, K) G, 0), or (None, 0) for the identity and for loglik."""
    if smoothing is None or loss != "mc":
        return None, 0
    G = smoothing.to(torch.float32).contiguous()
    return G, (int(G.shape[-1]) if G.dim() == 3 else 0)


def _stream(device) -> ctypes.c_void_p:
    return ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)


def _use_wgmma(mu: torch.Tensor, x: torch.Tensor) -> bool:
    return (os.environ.get("DCGMM_CUDA_FORWARD") == "wgmma" and mu.dim() == 2
            and torch.cuda.get_device_capability(x.device)[0] == 9)


def _forward_call(x, mu, sigma, log_pi, kernel, stride):
    """What a forward-shaped op starts with: checks, the library, the ABI shape, contiguous inputs and the poisoned
    outputs resp (N, H', W', K), score, lse (N, H', W'), kstar int32 (allocated on x's device)."""
    for name, t in (("x", x), ("mu", mu), ("sigma", sigma), ("log_pi", log_pi)):
        _check(t, name)
    lib = _load()
    shape, x = _shape(x, mu, kernel, stride)
    Ho, Wo = out_hw(x.shape[1:3], kernel, stride)
    N, K = x.shape[0], mu.shape[-2]
    with torch.cuda.device(x.device):
        outs = (_new(N, Ho, Wo, K, like=x), _new(N, Ho, Wo, like=x), _new(N, Ho, Wo, like=x),
                _new(N, Ho, Wo, like=x, dtype=torch.int32))
    return lib, shape, x, mu.contiguous(), sigma.contiguous(), log_pi.contiguous(), outs


@torch.library.custom_op("dcgmm::cgmm_fwd_cuda", mutates_args=(), device_types="cuda")
def cgmm_fwd_cuda(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, log_pi: torch.Tensor, kernel: List[int],
                  stride: List[int], loss: str, smoothing: Optional[torch.Tensor]
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    lib, shape, x, mu, sigma, log_pi, (resp, score, lse, kstar) = _forward_call(x, mu, sigma, log_pi, kernel, stride)
    with torch.cuda.device(x.device):
        G, n = _smoothing(smoothing, loss)
        entry = "dcgmm_cgmm_fwd_wgmma" if _use_wgmma(mu, x) else "dcgmm_cgmm_fwd"
        ws = _workspace(lib, shape, WS_FORWARD, x.device)
        _call(entry, lib, ctypes.byref(shape), _ptr(x), _ptr(mu), _ptr(sigma), _ptr(log_pi), int(loss == "mc"),
              _ptr(G), n, _ptr(resp), _ptr(score), _ptr(lse), _ptr(kstar), _ptr(ws), ws.numel(), _stream(x.device))
    return resp, score, lse, kstar


@torch.library.custom_op("dcgmm::cgmm_bwd_cuda", mutates_args=(), device_types="cuda")
def cgmm_bwd_cuda(g_resp: Optional[torch.Tensor], g_score: Optional[torch.Tensor], x: torch.Tensor, mu: torch.Tensor,
                  sigma: torch.Tensor, log_pi: torch.Tensor, kernel: List[int], stride: List[int], loss: str,
                  smoothing: Optional[torch.Tensor], resp: torch.Tensor, lse: torch.Tensor, kstar: torch.Tensor,
                  need_x_grad: bool, need_param_grads: bool = True
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    lib = _load()
    shape, x = _shape(x, mu, kernel, stride)
    mu, sigma, log_pi = mu.contiguous(), sigma.contiguous(), log_pi.contiguous()
    resp, kstar = resp.contiguous(), kstar.contiguous()
    scalar = 0
    if g_score is not None:
        if g_score.numel() > 0 and all(s == 0 for s in g_score.stride()):
            g_score, scalar = g_score.as_strided((1,), (1,)), 1  # one value expanded (a mean's gradient): no copy
        else:
            g_score = g_score.contiguous()
    if g_resp is not None:
        g_resp = g_resp.contiguous()
    with torch.cuda.device(x.device):
        dx = _new(*x.shape, like=x) if need_x_grad else x.new_empty(0)
        if need_param_grads:
            d_mu, d_sigma, d_log_pi = _new(*mu.shape, like=mu), _new(*sigma.shape, like=mu), _new(*log_pi.shape,
                                                                                                   like=mu)
        else:
            d_mu = d_sigma = d_log_pi = mu.new_empty(0)
        ws = _workspace(lib, shape, WS_BACKWARD, x.device)
        G, n = _smoothing(smoothing, loss)
        _call("dcgmm_cgmm_bwd", lib, ctypes.byref(shape), _ptr(g_resp), _ptr(g_score), scalar, _ptr(x), _ptr(mu),
              _ptr(sigma), _ptr(log_pi), int(loss == "mc"), _ptr(G), n, _ptr(resp), _ptr(kstar),
              int(need_x_grad), int(need_param_grads), _ptr(dx if need_x_grad else None),
              _ptr(d_mu if need_param_grads else None), _ptr(d_sigma if need_param_grads else None),
              _ptr(d_log_pi if need_param_grads else None), _ptr(ws), ws.numel(), _stream(x.device))
    return dx, d_mu, d_sigma, d_log_pi


@torch.library.custom_op("dcgmm::cgmm_step_partials_cuda", mutates_args=(), device_types="cuda")
def cgmm_step_partials_cuda(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, log_pi: torch.Tensor,
                            kernel: List[int], stride: List[int], loss: str, smoothing: Optional[torch.Tensor]
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    lib, shape, x, mu, sigma, log_pi, (resp, score, lse, kstar) = _forward_call(x, mu, sigma, log_pi, kernel, stride)
    K, D = mu.shape[-2], mu.shape[-1]
    Gc = mu.shape[0] if mu.dim() == 3 else 1
    with torch.cuda.device(x.device):
        stats = _new(Gc, K, 1 + 2 * D, like=x, dtype=torch.float64)
        ws = _workspace(lib, shape, WS_STEP_PARTIALS, x.device)
        G, n = _smoothing(smoothing, loss)
        _call("dcgmm_cgmm_step_partials", lib, ctypes.byref(shape), _ptr(x), _ptr(mu), _ptr(sigma), _ptr(log_pi),
              int(loss == "mc"), _ptr(G), n, _ptr(resp), _ptr(score), _ptr(lse), _ptr(kstar),
              _ptr(stats), _ptr(ws), ws.numel(), _stream(x.device))
    return resp, score, lse, kstar, stats


@torch.library.custom_op("dcgmm::cgmm_step_finalize_cuda", mutates_args=(), device_types="cuda")
def cgmm_step_finalize_cuda(stats: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, pi_logits: torch.Tensor,
                            log_pi: torch.Tensor, smoothing: Optional[torch.Tensor], scale: float,
                            steps: torch.Tensor, sigma_min: float, sigma_max: float, pi_global: bool
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    for name, t in (("mu", mu), ("sigma", sigma), ("pi_logits", pi_logits), ("log_pi", log_pi)):
        _check(t, name)
    lib = _load()
    K, D = mu.shape[-2], mu.shape[-1]
    Gc = mu.shape[0] if mu.dim() == 3 else 1
    # the ABI's geometry of Gc GMMs of dimension D: a Gc x 1 "image" of D channels, 1x1 windows
    shape = Shape(1, Gc, 1, D, Gc * D, D, 1, 1, 1, 1, K, int(mu.dim() == 3))
    mu, sigma, pi_logits, log_pi = mu.contiguous(), sigma.contiguous(), pi_logits.contiguous(), log_pi.contiguous()
    stats = stats.to(torch.float64).contiguous()
    steps = steps.to(device=mu.device, dtype=torch.float32).contiguous()
    with torch.cuda.device(mu.device):
        new_mu, new_sigma, new_pi = _new(*mu.shape, like=mu), _new(*sigma.shape, like=mu), _new(*pi_logits.shape,
                                                                                                 like=mu)
        maxima = _new(2, like=mu)
        G = None if smoothing is None else smoothing_dense(smoothing).to(torch.float32).contiguous()
        ws = _workspace(lib, shape, WS_STEP_FINALIZE, mu.device)
        _call("dcgmm_cgmm_step_finalize", lib, ctypes.byref(shape), _ptr(stats), _ptr(mu), _ptr(sigma),
              _ptr(pi_logits), _ptr(log_pi), _ptr(G), float(scale), _ptr(steps), float(sigma_min), float(sigma_max),
              int(pi_global), _ptr(new_mu), _ptr(new_sigma), _ptr(new_pi), _ptr(maxima), _ptr(ws), ws.numel(),
              _stream(mu.device))
    return new_mu, new_sigma, new_pi, maxima


register_fused_ops("cuda", helpers=False, step=True)


class _CudaOps(FusedOps):
    """cgmm and the fused step from the library; the sampling helpers from triton (else the reference)."""

    @staticmethod
    def _helpers():
        from . import problem as backend_problem, module

        return module("triton" if backend_problem("triton") is None else "reference")

    def patch_average(self, v, image_hw, kernel, stride):
        return self._helpers().patch_average(v, image_hw, kernel, stride)

    def sample_components(self, topdown, mu, sigma, **kw):
        return self._helpers().sample_components(topdown, mu, sigma, **kw)


_OPS = _CudaOps("cuda")
cgmm, patch_average, sample_components = _OPS.cgmm, _OPS.patch_average, _OPS.sample_components
step_partials, step_finalize = _OPS.step_partials, _OPS.step_finalize
