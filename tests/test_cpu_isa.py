"""The C++ kernels' per-instruction-set builds (csrc/cpu/isa.h): every build this CPU can run against the reference.

Each hot kernel is compiled for AVX-512, AVX2 + FMA and baseline x86-64 with its own register width (the forward's
blocks hold 16, 8 or 4 rows); ``DCGMM_CPU_ISA`` runs a lower build on this machine, so the AVX2 and baseline code
is tested on an AVX-512 CI machine too. float64 to 1e-10 and design.md's float32 rule, forward and every gradient,
through the general sums and the winner sums of the backward, on random inputs and in the trained regime (mu on the
data, sigma near its ceiling); outputs NaN-poisoned.
"""
import pytest
import torch

from dcgmm_fast import backends, geometry, ops, reference

from conftest import ISAS, assert_close
from test_backends import (MC, SHAPES, TRAINED_UPSTREAM, _check_float32_rule, _check_trained_regime, _grads,
                           _inputs, _upstream)

pytestmark = pytest.mark.skipif(backends.problem("cpp") is not None, reason="backend 'cpp' is not built")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setenv("DCGMM_POISON", "1")


def test_cpu_isa_is_capped_by_the_cpu(monkeypatch):
    from dcgmm_fast.backends.cpp import cpu_isa

    monkeypatch.delenv("DCGMM_CPU_ISA", raising=False)
    best = cpu_isa()
    assert best in ISAS
    for want in ISAS:
        monkeypatch.setenv("DCGMM_CPU_ISA", want)
        assert cpu_isa() == ISAS[min(ISAS.index(want), ISAS.index(best))]


def test_unknown_cpu_isa_is_named(monkeypatch):
    monkeypatch.setenv("DCGMM_CPU_ISA", "sse9")
    inputs, G, kw = _inputs(SHAPES[0], torch.float32, 0)
    with pytest.raises(RuntimeError, match="DCGMM_CPU_ISA: expected avx512, avx2 or baseline, got 'sse9'"):
        ops.cgmm(*inputs, smoothing=G, backend="cpp", **kw)


# shared and independent, dense and separable smoothing, loglik, the GEMM form, the winner sums; full row blocks
# (every build) of patches wider than a block (D = 400 in 4 segments of 100 entries; stride 3, 3 segments of 12)
# for the forward's transposing gather, with a partial block after them
CASES = [SHAPES[0], SHAPES[1], (20, 13, 13, 25, 4, 2, 25, True, "mc", 1.5), SHAPES[6], SHAPES[7], SHAPES[9],
         MC[-1][0]]
CASE_IDS = ["shared-K9-dense", "indep-K25", "indep-D400-N20", "loglik-28x28", "shared-s3", "gemm-K64",
            "winners-N24"]


def _smoothing(shape, G):
    """The layers' separable factors where the shape has a square K and a smoothing, else the dense G or None."""
    K, som = shape[6], shape[9]
    if G is None or int(K ** 0.5) ** 2 != K:
        return G
    return geometry.smoothing_factors(K, som, dtype=G.dtype)


@pytest.mark.parametrize("shape", CASES, ids=CASE_IDS)
def test_float64_matches_reference(isa, shape, fresh_seed):
    inputs, G, kw = _inputs(shape, torch.float64, fresh_seed)
    for upstream in ("both", "mean"):  # the general sums; the winner sums (mc)
        ref = reference.cgmm(*inputs, smoothing=G, **kw)
        out = ops.cgmm(*inputs, smoothing=_smoothing(shape, G), backend="cpp", **kw)
        for name in ("resp", "score", "lse"):
            assert_close(getattr(out, name), getattr(ref, name), 1e-10, f"{name} ({isa})")
        assert torch.equal(out.kstar, ref.kstar)
        g_resp, g_score = _upstream(ref, fresh_seed + 1, upstream)
        for name, a, b in zip(("dx", "d_mu", "d_sigma", "d_log_pi"), _grads(out, inputs, g_resp, g_score),
                              _grads(ref, inputs, g_resp, g_score)):
            assert not torch.isnan(a).any(), name
            assert_close(a, b, 1e-10, f"{name} ({isa}, {upstream})")


@pytest.mark.parametrize("shape", CASES, ids=CASE_IDS)
def test_float32_within_design_rule(isa, shape, fresh_seed):
    inputs64, G64, kw = _inputs(shape, torch.float64, fresh_seed)
    inputs32, G32, _ = _inputs(shape, torch.float32, fresh_seed)
    for upstream in ("both", "mean"):
        _check_float32_rule("cpp", "cpu", inputs64, inputs32, G64, _smoothing(shape, G32), kw, fresh_seed, upstream)


@pytest.mark.parametrize("case,upstream", TRAINED_UPSTREAM, ids=[f"{c[0]}-{u}" for c, u in TRAINED_UPSTREAM])
def test_trained_regime_float32_within_design_rule(isa, case, upstream, shipped, fresh_seed):
    """test_backends' trained-regime cases (where expanded sums cancel) with each build."""
    _check_trained_regime("cpp", "cpu", case, upstream, shipped, fresh_seed)
