"""CPU throughput of the cGMM op: reference eager, torch.compile of the plain broadcast math, and the C++ kernels.

    python -m pytest bench/test_cpu_ops.py            # writes bench/results/cpu_ops.md

The paper's layer shapes at batch 100. Forward, and forward + parameter backward (what training runs), for loss
"mc" with a dense smoothing G (som_sigma0) and "loglik"; "mc" with smoothing None is reported apart (its
backward is one-hot). Every row is compared with the reference timed in the same run.
"""
import math

import pytest
import torch

from dcgmm_fast import geometry, ops, reference

SHAPES = {  # name: (input (N, H, W, C), kernel, stride, K, independent)
    "3x3s1 K25 28x28x1": ((100, 28, 28, 1), 3, 1, 25, False),
    "8x8s1 indep K49 28x28x1": ((100, 28, 28, 1), 8, 1, 49, True),
    "4x4s2 D400 K25 26x26x25": ((100, 26, 26, 25), 4, 2, 25, False),
    "4x4s2 D400 K100 26x26x25": ((100, 26, 26, 25), 4, 2, 100, False),
    "12x12 D3600 K49 12x12x25": ((100, 12, 12, 25), 12, 1, 49, False),
}
LOSSES = {"mc": "dense", "loglik": None, "mc-nosmooth": None}


def plain_broadcast(x, mu, sigma, log_pi, kernel, stride, loss, G):
    """What a PyTorch user would write: im2col + the (rows, K, D) broadcast, no chunking (for torch.compile)."""
    xp = reference.patches(x, kernel, stride)  # (N, H', W', D)
    N, Ho, Wo, D = xp.shape
    xp = xp.reshape(N, Ho * Wo, 1, D)
    ls = log_pi + sigma.log().sum(-1) - 0.5 * ((sigma * (xp - mu)) ** 2).sum(-1)  # (N, P, K)
    resp = torch.softmax(ls, -1)
    const = 0.5 * D * math.log(2 * math.pi)
    if loss == "loglik":
        score = torch.logsumexp(ls, -1) - const
    else:
        sm = ls if G is None else ls @ G.T
        score = sm.max(-1).values - const
    return resp, score


def _inputs(shape, dtype=torch.float32):
    (N, H, W, C), kernel, stride, K, indep = shape
    g = torch.Generator().manual_seed(0)
    Ho, Wo = geometry.out_hw((H, W), kernel, stride)
    D = kernel * kernel * C
    lead = (Ho * Wo, K) if indep else (K,)
    x = torch.rand(N, H, W, C, generator=g, dtype=dtype)
    mu = torch.rand(*lead, D, generator=g, dtype=dtype).requires_grad_()
    sigma = (1 + torch.rand(*lead, D, generator=g, dtype=dtype)).requires_grad_()
    log_pi = torch.log_softmax(torch.zeros(*lead, dtype=dtype), -1).requires_grad_()
    return x, mu, sigma, log_pi, N * Ho * Wo, K, D


def _flops(M, K, D, mode, loss, dense):
    fwd = 4 * M * K * D + (2 * M * K * K if dense else 0)
    if mode == "forward":
        return fwd
    bwd = 2 * M * D if (loss == "mc" and not dense) else 4 * M * K * D
    return fwd + bwd


def make_run(provider, x, params, kernel, stride, loss, G, mode):
    """A zero-argument callable: the op's forward (no grad) or forward + parameter backward.

    provider: "compiled" (torch.compile of ``plain_broadcast``) or an ops backend name.
    """
    mu, sigma, log_pi = params
    if provider == "compiled":
        fn = torch.compile(plain_broadcast, dynamic=False)

        def forward():
            return fn(x, mu, sigma, log_pi, kernel, stride, loss, G)
    else:
        def forward():
            out = ops.cgmm(x, mu, sigma, log_pi, kernel=kernel, stride=stride, loss=loss, smoothing=G,
                           backend=provider)
            return out.resp, out.score

    def run():
        if mode == "forward":
            with torch.no_grad():
                return forward()
        resp, score = forward()
        return torch.autograd.grad(score.mean() + 1e-3 * resp[..., 0].mean(), params)

    return run


@pytest.mark.parametrize("mode", ["forward", "fwd+bwd"])
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("provider", ["reference", "compiled", "cpp"])
def test_cgmm_cpu(benchmark, record, provider, shape_name, loss, mode):
    if provider == "cpp" and "cpp" not in ops.available_backends():
        pytest.skip("cpp backend not built")
    shape = SHAPES[shape_name]
    x, mu, sigma, log_pi, M, K, D = _inputs(shape)
    kernel, stride = shape[1], shape[2]
    dense = LOSSES[loss] == "dense"
    base_loss = "loglik" if loss == "loglik" else "mc"
    G = ops.smoothing_matrix(K, 0.25 * math.sqrt(2 * K)) if dense else None
    run = make_run(provider, x, (mu, sigma, log_pi), kernel, stride, base_loss, G, mode)
    run()  # warm-up (and compilation)
    slow = provider == "reference" or (provider == "compiled" and mode == "fwd+bwd")
    benchmark.pedantic(run, rounds=3 if slow else 10, iterations=1, warmup_rounds=0 if slow else 1)
    record("cpu_ops", shape=shape_name, loss=loss, mode=mode, provider=provider,
           seconds=benchmark.stats.stats.median, flops=_flops(M, K, D, mode, base_loss, dense))
