"""GPU throughput of the cGMM op: reference (chunked eager), torch.compile of the plain broadcast math, Triton.

    TRITON_INTERPRET=0 python -m pytest bench/test_gpu_ops.py      # writes bench/results/gpu_ops.md

The paper's layer shapes at batch 100 and 1000, forward and forward + parameter backward. Each row reports the
time, the achieved FLOP/s (design.md's count) and HBM bytes/s as fractions of the fp32 and bandwidth ceilings
measured in the same run (bench/roofline.py), and the speed-up over the reference and over torch.compile.
Providers that would not fit (the unchunked broadcast beyond 8 GB) are skipped, not estimated.
"""
import math

import pytest
import torch

from dcgmm_fast import ops

from roofline import gpu_ceilings
from test_cpu_ops import SHAPES, _flops, _inputs, make_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
META = {}


@pytest.fixture(scope="module", autouse=True)
def ceilings():
    if torch.cuda.is_available():
        META["gpu_ops"] = {"device": torch.cuda.get_device_name(), **gpu_ceilings()}
    return META


def _bytes(x, mu, M, K, mode):
    """Compulsory HBM traffic: input, parameters, outputs (resp, score, lse, kstar), resp again in backward."""
    out = M * K * 4 + 3 * M * 4
    traffic = x.numel() * 4 + 3 * mu.numel() * 4 + out
    return traffic if mode == "forward" else traffic + M * K * 4 + 3 * mu.numel() * 4


@pytest.mark.parametrize("batch", [100, 1000])
@pytest.mark.parametrize("mode", ["forward", "fwd+bwd"])
@pytest.mark.parametrize("loss", ["mc", "loglik"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("provider", ["reference", "compiled", "triton"])
def test_cgmm_gpu(benchmark, record, provider, shape_name, loss, mode, batch):
    import triton.testing

    (N, H, W, C), kernel, stride, K, indep = SHAPES[shape_name]
    shape = ((batch, H, W, C), kernel, stride, K, indep)
    x, mu, sigma, log_pi, M, K, D = (t.cuda() if isinstance(t, torch.Tensor) else t for t in _inputs(shape))
    mu, sigma, log_pi = (t.detach().requires_grad_() for t in (mu, sigma, log_pi))
    if provider == "compiled" and M * K * D * 4 * (1 if mode == "forward" else 3) > 8 * 2**30:
        pytest.skip("the unchunked broadcast would not fit")
    G = ops.smoothing_matrix(K, 0.25 * math.sqrt(2 * K)).cuda() if loss == "mc" else None
    run = make_run(provider, x, (mu, sigma, log_pi), kernel, stride, loss, G, mode)
    run()
    ms = triton.testing.do_bench(run, warmup=5, rep=50)
    benchmark.pedantic(run, rounds=3, iterations=1)
    meta = META["gpu_ops"]
    record("gpu_ops", shape=f"{shape_name} N={batch}", loss=loss, mode=mode, provider=provider, seconds=ms / 1e3,
           flops=_flops(M, K, D, mode, loss, loss == "mc"), bytes=_bytes(x, mu, M, K, mode),
           peak_flops=meta["fp32_flops"], peak_bytes=meta["hbm_bytes"], device=meta["device"])
