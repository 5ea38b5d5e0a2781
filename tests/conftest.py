"""Shared builders for the tests.

TRITON_INTERPRET must be set before any Triton kernel module is imported, so it is set here, first.
"""
import math
import os
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from dcgmm_fast.geometry import out_hw  # noqa: E402


def make_inputs(
    N=2, H=7, W=6, C=2, kernel=3, stride=1, K=9, independent=False, dtype=torch.float64, seed=0,
    requires_grad=False, spread=1.0,
):
    """Random cGMM inputs (x, mu, sigma, log_pi) whose components overlap the data, never zeros.

    x ~ U(0, 1) like images; mu near the data; sigma in [0.5, 3] * spread; log_pi normalised.
    """
    g = torch.Generator().manual_seed(seed)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    Ho, Wo = out_hw((H, W), kernel, stride)
    D = kh * kw * C
    lead = (Ho * Wo, K) if independent else (K,)
    x = torch.rand(N, H, W, C, generator=g, dtype=dtype)
    mu = torch.rand(*lead, D, generator=g, dtype=dtype)
    sigma = (0.5 + 2.5 * torch.rand(*lead, D, generator=g, dtype=dtype)) * spread / math.sqrt(D) * 3
    log_pi = torch.log_softmax(torch.randn(*lead, generator=g, dtype=dtype), dim=-1)
    out = [x, mu, sigma, log_pi]
    if requires_grad:
        out = [t.clone().requires_grad_(True) for t in out]
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (design.md's per-tensor error), 0 for two empty or all-zero tensors."""
    a, b = a.detach().double(), b.detach().double()
    den = b.abs().max().item() if b.numel() else 0.0
    num = (a - b).abs().max().item() if b.numel() else 0.0
    return num / den if den > 0 else num


def assert_close(actual, expected, rtol, name=""):
    """Relative (per tensor) comparison that reports the worst index and the mismatch count."""
    err = rel_err(actual, expected)
    if not err <= rtol:
        diff = (actual.detach().double() - expected.detach().double()).abs()
        scale = expected.detach().double().abs().max().clamp_min(1e-300)
        bad = diff > rtol * scale
        first = tuple(int(i) for i in bad.nonzero()[0]) if bad.any() else ()
        raise AssertionError(
            f"{name}: relative error {err:.3e} > {rtol:.1e}; {int(bad.sum())} of {diff.numel()} elements differ, "
            f"first at {first}: got {actual.detach()[first].item() if first else '?'}, "
            f"expected {expected.detach()[first].item() if first else '?'}"
        )


@pytest.fixture
def fresh_seed(request):
    """A seed derived from the test id, so every test draws its own inputs reproducibly."""
    return zlib.crc32(request.node.nodeid.encode()) % (2**31)


@pytest.fixture(scope="session")
def shipped():
    """The shipped Fashion-MNIST subset (5,000 train + 1,000 test images, float NHWC in [0, 1])."""
    from dcgmm_fast import data

    return data.load_shipped()


ISAS = ["baseline", "avx2", "avx512"]  # the C++ kernels' builds (csrc/cpu/isa.h), lowest first


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Runs the test with DCGMM_CPU_ISA set to each build of the C++ kernels this CPU has (the others skip)."""
    from dcgmm_fast import backends

    if backends.problem("cpp") is not None:
        pytest.skip("backend 'cpp' is not built")
    from dcgmm_fast.backends.cpp import cpu_isa

    monkeypatch.delenv("DCGMM_CPU_ISA", raising=False)
    best = cpu_isa()
    if ISAS.index(request.param) > ISAS.index(best):
        pytest.skip(f"this CPU runs {best} at best")
    monkeypatch.setenv("DCGMM_CPU_ISA", request.param)
    assert cpu_isa() == request.param
    return request.param
