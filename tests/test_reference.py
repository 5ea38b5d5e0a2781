"""The reference backend, proved without trusting it: independent oracles (torch.distributions, explicit
loops) for the forward, design.md's closed-form gradients (implemented here, separately) for the backward."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from dcgmm_fast import geometry, ops, reference
from dcgmm_fast.geometry import out_hw

from conftest import assert_close, make_inputs

LOG2PI = math.log(2 * math.pi)


# ------------------------------------------------------------------------------------------------ helpers
def patches_loop(x, kernel, stride):
    """im2col by an explicit triple loop over (ky, kx, c), c fastest."""
    N, H, W, C = x.shape
    (kh, kw), (sh, sw) = geometry.pair(kernel), geometry.pair(stride)
    Ho, Wo = out_hw((H, W), kernel, stride)
    out = torch.empty(N, Ho, Wo, kh * kw * C, dtype=x.dtype)
    for oy in range(Ho):
        for ox in range(Wo):
            d = 0
            for ky in range(kh):
                for kx in range(kw):
                    for c in range(C):
                        out[:, oy, ox, d] = x[:, oy * sh + ky, ox * sw + kx, c]
                        d += 1
    return out


def fold_loop(dpatch, image_shape, kernel, stride):
    """Sum patch-entry gradients (N, H', W', D) onto the pixels they were read from, one tap at a time."""
    N, H, W, C = image_shape
    (kh, kw), (sh, sw) = geometry.pair(kernel), geometry.pair(stride)
    Ho, Wo = dpatch.shape[1:3]
    taps = dpatch.reshape(N, Ho, Wo, kh, kw, C)
    dx = torch.zeros(N, H, W, C, dtype=dpatch.dtype)
    for ky in range(kh):
        for kx in range(kw):
            dx[:, ky : ky + sh * (Ho - 1) + 1 : sh, kx : kx + sw * (Wo - 1) + 1 : sw, :] += taps[:, :, :, ky, kx, :]
    return dx


def rows_and_params(x, mu, sigma, log_pi, kernel, stride):
    """Patch rows (N, P, D) and parameters broadcast per position: (P or 1, K, D), (P or 1, K)."""
    xp = patches_loop(x.detach(), kernel, stride)
    N = x.shape[0]
    xp = xp.reshape(N, -1, xp.shape[-1])
    if mu.dim() == 2:
        return xp, mu.detach()[None], sigma.detach()[None], log_pi.detach()[None]
    return xp, mu.detach(), sigma.detach(), log_pi.detach()


def component_log_probs(xp, mu, sigma, log_pi):
    """log(pi_k N(x; mu_k, 1/sigma_k)) per row and component, by torch.distributions: (N, P, K)."""
    comp = Independent(Normal(mu, 1.0 / sigma), 1)  # batch (P|1, K), event (D,)
    return comp.log_prob(xp[:, :, None, :]) + log_pi


CASES = [  # (H, W, C, kernel, stride, K, independent)
    (7, 6, 2, 3, 1, 9, False),
    (7, 6, 2, 3, 1, 9, True),
    (9, 8, 1, (3, 2), (2, 3), 4, False),
    (9, 8, 1, (3, 2), (2, 3), 25, True),
    (5, 5, 3, 5, 1, 16, False),  # H' = W' = 1
    (6, 7, 1, 2, 2, 1, True),  # K = 1
]


# ------------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("case", CASES)
def test_loglik_score_equals_mixture_same_family(case, fresh_seed):
    H, W, C, kernel, stride, K, indep = case
    x, mu, sigma, log_pi = make_inputs(3, H, W, C, kernel, stride, K, indep, seed=fresh_seed)
    out = reference.cgmm(x, mu, sigma, log_pi, kernel=kernel, stride=stride, loss="loglik")
    xp, mu_p, sigma_p, log_pi_p = rows_and_params(x, mu, sigma, log_pi, kernel, stride)
    gmm = MixtureSameFamily(Categorical(logits=log_pi_p), Independent(Normal(mu_p, 1.0 / sigma_p), 1))
    expected = gmm.log_prob(xp[:, :, :]).reshape(out.score.shape)  # (N, P) per patch
    assert_close(out.score, expected, 1e-10, "score")
    lp = component_log_probs(xp, mu_p, sigma_p, log_pi_p)
    assert_close(out.resp, torch.softmax(lp, -1).reshape(out.resp.shape), 1e-10, "resp")
    D = mu.shape[-1]
    assert_close(out.lse, torch.logsumexp(lp, -1).reshape(out.lse.shape) + 0.5 * D * LOG2PI, 1e-10, "lse")
    assert torch.equal(out.kstar, lp.argmax(-1).to(torch.int32).reshape(out.kstar.shape))


@pytest.mark.parametrize("case", [c for c in CASES if math.isqrt(c[5]) ** 2 == c[5]])
@pytest.mark.parametrize("explicit_identity", [False, True])
def test_mc_identity_is_best_single_component(case, explicit_identity, fresh_seed):
    H, W, C, kernel, stride, K, indep = case
    x, mu, sigma, log_pi = make_inputs(2, H, W, C, kernel, stride, K, indep, seed=fresh_seed)
    G = torch.eye(K, dtype=x.dtype) if explicit_identity else None
    out = reference.cgmm(x, mu, sigma, log_pi, kernel=kernel, stride=stride, loss="mc", smoothing=G)
    lp = component_log_probs(*rows_and_params(x, mu, sigma, log_pi, kernel, stride))
    assert_close(out.score, lp.max(-1).values.reshape(out.score.shape), 1e-10, "score")
    assert torch.equal(out.kstar, lp.argmax(-1).to(torch.int32).reshape(out.kstar.shape))


@pytest.mark.parametrize("case", [c for c in CASES if math.isqrt(c[5]) ** 2 == c[5] and c[5] > 1])
def test_mc_smoothed_score_equals_loop_over_k(case, fresh_seed):
    H, W, C, kernel, stride, K, indep = case
    x, mu, sigma, log_pi = make_inputs(2, H, W, C, kernel, stride, K, indep, seed=fresh_seed)
    G = geometry.smoothing_matrix(K, 0.9, dtype=x.dtype)
    out = reference.cgmm(x, mu, sigma, log_pi, kernel=kernel, stride=stride, loss="mc", smoothing=G)
    D = mu.shape[-1]
    lp = component_log_probs(*rows_and_params(x, mu, sigma, log_pi, kernel, stride)) + 0.5 * D * LOG2PI
    best = torch.full(lp.shape[:2], -math.inf, dtype=x.dtype)
    arg = torch.zeros(lp.shape[:2], dtype=torch.long)
    for k in range(K):
        s_k = sum(G[k, j] * lp[..., j] for j in range(K))
        arg = torch.where(s_k > best, torch.full_like(arg, k), arg)
        best = torch.maximum(best, s_k)
    assert_close(out.score, (best - 0.5 * D * LOG2PI).reshape(out.score.shape), 1e-10, "score")
    assert torch.equal(out.kstar, arg.to(torch.int32).reshape(out.kstar.shape))


def test_forced_kstar_reads_that_component(fresh_seed):
    x, mu, sigma, log_pi = make_inputs(2, 6, 6, 1, 2, 2, 9, seed=fresh_seed)
    G = geometry.smoothing_matrix(9, 0.7, dtype=x.dtype)
    free = reference.cgmm(x, mu, sigma, log_pi, kernel=2, stride=2, smoothing=G)
    forced = torch.randint(0, 9, free.kstar.shape, generator=torch.Generator().manual_seed(fresh_seed))
    out = reference.cgmm(x, mu, sigma, log_pi, kernel=2, stride=2, smoothing=G, kstar=forced)
    D = mu.shape[-1]
    lp = component_log_probs(*rows_and_params(x, mu, sigma, log_pi, 2, 2)) + 0.5 * D * LOG2PI
    smoothed = lp @ G.T
    expected = smoothed.gather(-1, forced.reshape(2, -1, 1).long())[..., 0] - 0.5 * D * LOG2PI
    assert_close(out.score, expected.reshape(out.score.shape), 1e-10, "score")
    assert torch.equal(out.kstar, forced.to(torch.int32))
    assert torch.all(out.score <= free.score + 1e-12)  # the free winner is the max


def test_argmax_ties_go_to_lowest_index():
    K, D = 4, 2
    x = torch.zeros(1, 1, 1, D, dtype=torch.float64)
    mu = torch.zeros(K, D, dtype=torch.float64)  # four identical components
    sigma = torch.ones(K, D, dtype=torch.float64)
    log_pi = torch.full((K,), -math.log(K), dtype=torch.float64)
    for loss in ("mc", "loglik"):
        assert reference.cgmm(x, mu, sigma, log_pi, kernel=1, stride=1, loss=loss).kstar.item() == 0


def test_float32_close_to_float64(fresh_seed):
    x, mu, sigma, log_pi = make_inputs(2, 8, 8, 1, 3, 1, 16, seed=fresh_seed)
    G = geometry.smoothing_matrix(16, 1.5, dtype=torch.float64)
    o64 = reference.cgmm(x, mu, sigma, log_pi, kernel=3, stride=1, smoothing=G)
    o32 = reference.cgmm(*(t.float() for t in (x, mu, sigma, log_pi)), kernel=3, stride=1, smoothing=G.float())
    for name in ("resp", "score", "lse"):
        assert getattr(o32, name).dtype == torch.float32
        assert_close(getattr(o32, name), getattr(o64, name), 1e-5, name)


def test_chunking_does_not_change_results(monkeypatch, fresh_seed):
    x, mu, sigma, log_pi = make_inputs(3, 7, 7, 2, 2, 1, 9, True, seed=fresh_seed, requires_grad=True)
    G = geometry.smoothing_matrix(9, 1.0, dtype=x.dtype)

    def run():
        out = reference.cgmm(x, mu, sigma, log_pi, kernel=2, stride=1, smoothing=G)
        grads = torch.autograd.grad(out.score.sum() + out.resp[..., 0].sum(), (x, mu, sigma, log_pi))
        return list(out) + list(grads)

    whole = run()
    monkeypatch.setattr(reference, "CHUNK_BYTES", 1)  # one row per chunk
    for a, b in zip(run(), whole):
        assert_close(a, b, 1e-13)


# ------------------------------------------------------------------------------------------------ backward
def closed_form_grads(x, mu, sigma, log_pi, kernel, stride, loss, G, kstar, g_resp, g_score):
    """design.md's closed forms: W, then d log_pi = w, d mu, d sigma, and dx folded back onto pixels."""
    N = x.shape[0]
    xp, mu_p, sigma_p, log_pi_p = rows_and_params(x, mu, sigma, log_pi, kernel, stride)  # (N, P, D), (P|1, K, D)
    lp = component_log_probs(xp, mu_p, sigma_p, log_pi_p)  # (N, P, K)
    resp = torch.softmax(lp, -1)
    K = lp.shape[-1]
    P = xp.shape[1]
    g_resp = g_resp.reshape(N, P, K)
    g_score = g_score.reshape(N, P, 1)
    if loss == "mc":
        Gm = torch.eye(K, dtype=x.dtype) if G is None else G
        first = g_score * Gm[kstar.reshape(N, P).long()]  # (N, P, K) row kstar of G
    else:
        first = g_score * resp
    Wt = first + resp * (g_resp - (g_resp * resp).sum(-1, keepdim=True))  # (N, P, K)
    w = Wt.sum(0)  # (P, K)
    A1 = torch.einsum("npk,npd->pkd", Wt, xp)
    A2 = torch.einsum("npk,npd->pkd", Wt, xp * xp)
    s2 = sigma_p * sigma_p
    d_log_pi = w
    d_mu = s2 * (A1 - w[..., None] * mu_p)
    d_sigma = w[..., None] / sigma_p - sigma_p * (A2 - 2 * mu_p * A1 + w[..., None] * mu_p * mu_p)
    if mu.dim() == 2:  # shared: sum over positions
        d_log_pi, d_mu, d_sigma = d_log_pi.sum(0), d_mu.sum(0), d_sigma.sum(0)
    # dx[r, d] = sum_k W[r, k] sigma[k, d]^2 (mu[k, d] - x[r, d])
    dpatch = torch.einsum("npk,pkd->npd", Wt, s2 * mu_p) - xp * torch.einsum("npk,pkd->npd", Wt, s2)
    Ho, Wo = out_hw(x.shape[1:3], kernel, stride)
    dx = fold_loop(dpatch.reshape(N, Ho, Wo, -1), x.shape, kernel, stride)
    return dx, d_mu, d_sigma, d_log_pi


GRAD_CASES = [  # (H, W, C, kernel, stride, K, independent, loss, som_sigma)
    (7, 6, 2, 3, 1, 9, False, "mc", None),
    (7, 6, 2, 3, 1, 9, False, "mc", 1.2),
    (7, 6, 2, 3, 1, 9, True, "mc", 0.8),
    (9, 8, 1, (3, 2), (2, 3), 25, True, "mc", None),
    (9, 8, 1, (3, 2), (2, 3), 7, False, "loglik", None),  # odd, non-square K
    (9, 9, 1, 3, 2, 5, True, "loglik", None),
    (5, 5, 3, 5, 1, 16, False, "mc", 1.0),
]


@pytest.mark.parametrize("case", GRAD_CASES)
@pytest.mark.parametrize("upstream", ["both", "score_only", "resp_only"])
def test_autograd_matches_closed_form(case, upstream, fresh_seed):
    H, W, C, kernel, stride, K, indep, loss, som = case
    x, mu, sigma, log_pi = make_inputs(3, H, W, C, kernel, stride, K, indep, seed=fresh_seed, requires_grad=True)
    G = None if som is None else geometry.smoothing_matrix(K, som, dtype=x.dtype)
    out = reference.cgmm(x, mu, sigma, log_pi, kernel=kernel, stride=stride, loss=loss, smoothing=G)
    g = torch.Generator().manual_seed(fresh_seed + 1)
    g_resp = torch.randn(out.resp.shape, generator=g, dtype=x.dtype) * (upstream != "score_only")
    g_score = torch.randn(out.score.shape, generator=g, dtype=x.dtype) * (upstream != "resp_only")
    objective = (out.resp * g_resp).sum() + (out.score * g_score).sum()
    got = torch.autograd.grad(objective, (x, mu, sigma, log_pi))
    want = closed_form_grads(x, mu, sigma, log_pi, kernel, stride, loss, G, out.kstar, g_resp, g_score)
    for name, a, b in zip(("dx", "d_mu", "d_sigma", "d_log_pi"), got, want):
        assert a.shape == b.shape, name
        assert_close(a, b, 1e-8, name)


@pytest.mark.parametrize(
    "independent,loss,som", [(False, "mc", 1.0), (True, "mc", None), (False, "loglik", None), (True, "loglik", None)]
)
def test_gradcheck_tiny(independent, loss, som):
    # x (1,3,3,1), kernel (1,2) stride 2 -> P = 2, D = 2, K = 4: at most 49 inputs in all
    x, mu, sigma, log_pi = make_inputs(1, 3, 3, 1, (1, 2), 2, 4, independent, seed=3, requires_grad=True)
    G = None if som is None else geometry.smoothing_matrix(4, som, dtype=torch.float64)

    def f(x, mu, sigma, log_pi):
        out = reference.cgmm(x, mu, sigma, log_pi, kernel=(1, 2), stride=2, loss=loss, smoothing=G)
        return out.resp, out.score

    assert torch.autograd.gradcheck(f, (x, mu, sigma, log_pi), eps=1e-6, atol=1e-7, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ smoothing
@pytest.mark.parametrize("K,som", [(1, 0.5), (4, 1.414), (9, 2.0), (16, 0.7), (25, 1.768), (49, 2.475)])
def test_smoothing_matrix_rows_and_symmetry(K, som):
    G = geometry.smoothing_matrix(K, som, dtype=torch.float64)
    assert G.shape == (K, K)
    assert_close(G.sum(1), torch.ones(K, dtype=torch.float64), 1e-14, "row sums")
    assert torch.allclose(G, G.T, rtol=0, atol=1e-15)
    assert torch.all(G > 0) and torch.all(G.diagonal() >= G.max(1).values)


def test_smoothing_torus_offsets():
    assert geometry.smoothing_offsets(5).tolist() == [0, 1, 2, -2, -1]
    assert geometry.smoothing_offsets(4).tolist() == [0, 1, -2, -1]
    assert geometry.smoothing_offsets(3).tolist() == [0, 1, -1]
    assert geometry.smoothing_offsets(1).tolist() == [0]


@pytest.mark.parametrize("n", [3, 4, 5, 7])
def test_smoothing_matrix_is_torus_gaussian(n):
    K, som = n * n, 1.3
    G = geometry.smoothing_matrix(K, som, dtype=torch.float64)
    t = lambda d: ((d + n // 2) % n) - n // 2  # noqa: E731
    for k in range(K):
        d2 = torch.tensor(
            [t(j % n - k % n) ** 2 + t(j // n - k // n) ** 2 for j in range(K)], dtype=torch.float64
        )
        row = torch.exp(-d2 / (2 * som**2))
        assert_close(G[k], row / row.sum(), 1e-14, f"row {k}")
    # the ring wraps: on a 5-grid component 0's neighbours at offsets +-1 and +-2 are the same distance apart
    if n == 5:
        assert G[0, 1] == G[0, 4] and G[0, 2] == G[0, 3]


@pytest.mark.parametrize("K", [4, 9, 25, 100])
def test_smoothing_matrix_identity_at_floor(K):
    assert torch.equal(geometry.smoothing_matrix(K, 0.01, dtype=torch.float64), torch.eye(K, dtype=torch.float64))
    assert torch.equal(geometry.smoothing_matrix(K, 0.01), torch.eye(K))


def test_smoothing_matrix_rejects_bad_arguments():
    with pytest.raises(ValueError, match="K"):
        geometry.smoothing_matrix(10, 1.0)
    with pytest.raises(ValueError, match="som_sigma"):
        geometry.smoothing_matrix(9, 0.0)


# ------------------------------------------------------------------------------------------------ patches
@pytest.mark.parametrize(
    "shape,kernel,stride",
    [((2, 7, 6, 3), 3, 1), ((1, 9, 8, 1), (3, 2), (2, 3)), ((3, 5, 5, 2), 5, 1), ((1, 4, 4, 1), 1, 1)],
)
def test_patches_equals_triple_loop(shape, kernel, stride, fresh_seed):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(fresh_seed), dtype=torch.float64)
    assert torch.equal(ops.patches(x, kernel, stride), patches_loop(x, kernel, stride))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape,kernel,stride", [((2, 7, 7, 2), 3, 1), ((2, 12, 12, 3), 4, 2), ((1, 6, 9, 1), (2, 3), (2, 3))]
)
def test_patch_average_inverts_patches(shape, kernel, stride, dtype, fresh_seed):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(fresh_seed), dtype=dtype)
    back = ops.patch_average(ops.patches(x, kernel, stride), shape[1:3], kernel, stride)
    assert back.dtype == dtype
    if dtype == torch.float32:  # float64 accumulation, one rounding: exact for any cover count
        assert torch.equal(back, x)
    else:
        assert torch.allclose(back, x, rtol=4 * torch.finfo(dtype).eps, atol=0)


def test_patch_average_exact_for_power_of_two_counts(fresh_seed):
    # kernel 2 stride 1 on 5x5: counts 1 (corners), 2 (edges), 4 (interior)
    x = torch.rand(2, 5, 5, 1, generator=torch.Generator().manual_seed(fresh_seed), dtype=torch.float64)
    assert torch.equal(ops.patch_average(ops.patches(x, 2, 1), (5, 5), 2, 1), x)


def test_patch_average_uncovered_pixels_are_zero(fresh_seed):
    # 7x7 with kernel 2 stride 2: row 6 and column 6 are covered by no patch
    x = torch.rand(1, 7, 7, 2, generator=torch.Generator().manual_seed(fresh_seed), dtype=torch.float64) + 0.5
    back = ops.patch_average(ops.patches(x, 2, 2), (7, 7), 2, 2)
    assert torch.equal(back[:, :6, :6], x[:, :6, :6])
    assert torch.all(back[:, 6, :] == 0) and torch.all(back[:, :, 6] == 0)


def test_patch_average_averages_overlaps():
    v = torch.zeros(1, 1, 2, 2, dtype=torch.float64)  # two 1x2 patches on a 1x3 image, stride 1
    v[0, 0, 0] = torch.tensor([1.0, 3.0])
    v[0, 0, 1] = torch.tensor([5.0, 7.0])
    out = ops.patch_average(v, (1, 3), (1, 2), 1)
    assert out.reshape(-1).tolist() == [1.0, 4.0, 7.0]


# ------------------------------------------------------------------------------------------------ sampling
def _sample(topdown, mu, sigma, top_s=1, divisor=2.0, seed=0, ceiling=10.0, u=None):
    g = torch.Generator().manual_seed(seed)
    N, Ho, Wo, _ = topdown.shape
    u = torch.rand(N, Ho, Wo, generator=g, dtype=mu.dtype) if u is None else u
    eps = torch.randn(N, Ho, Wo, mu.shape[-1], generator=g, dtype=mu.dtype)
    out = ops.sample_components(
        topdown, mu, sigma, top_s=top_s, divisor=divisor, u=u, eps=eps, sigma_ceiling=ceiling
    )
    return out, u, eps


@pytest.mark.parametrize("independent", [False, True])
def test_sample_top1_is_argmax_mean_plus_noise(independent, fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed)
    N, Ho, Wo, K, D = 3, 4, 5, 9, 6
    lead = (Ho * Wo, K) if independent else (K,)
    mu = torch.randn(*lead, D, generator=g, dtype=torch.float64)
    sigma = 1 + torch.rand(*lead, D, generator=g, dtype=torch.float64)
    topdown = torch.rand(N, Ho, Wo, K, generator=g, dtype=torch.float64)
    out, u, eps = _sample(topdown, mu, sigma, top_s=1, divisor=3.0, seed=fresh_seed)
    k = topdown.argmax(-1)
    if independent:
        p = torch.arange(Ho * Wo).reshape(1, Ho, Wo).expand(N, Ho, Wo)
        mu_k, sigma_k = mu[p, k], sigma[p, k]
    else:
        mu_k, sigma_k = mu[k], sigma[k]
    assert_close(out, mu_k + eps / (sigma_k * 3.0), 1e-14, "sample")
    again, _, _ = _sample(topdown, mu, sigma, top_s=1, divisor=3.0, seed=fresh_seed)
    assert torch.equal(out, again)  # same u and eps, same output


def test_sample_ties_are_kept():
    K, D = 4, 1
    mu = torch.arange(K, dtype=torch.float64)[:, None] * 10
    sigma = torch.ones(K, D, dtype=torch.float64)
    topdown = torch.tensor([0.1, 0.5, 0.5, 0.2], dtype=torch.float64).expand(1, 1, 2, K)
    u = torch.tensor([[[0.25, 0.75]]], dtype=torch.float64)  # equal weights: lower half -> 1, upper -> 2
    out, _, _ = _sample(topdown, mu, sigma, top_s=1, divisor=1e12, u=u)
    assert out[0, 0, :, 0].round().tolist() == [10.0, 20.0]


def test_sample_noise_free_dims_at_ceiling(fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed)
    K, D, ceiling = 4, 8, math.sqrt(20)
    mu = torch.randn(K, D, generator=g, dtype=torch.float64)
    sigma = torch.full((K, D), 2.0, dtype=torch.float64)
    sigma[:, ::2] = ceiling  # even dims sit at the clip ceiling
    topdown = torch.rand(5, 3, 3, K, generator=g, dtype=torch.float64)
    out, _, eps = _sample(topdown, mu, sigma, top_s=1, divisor=1.0, seed=fresh_seed, ceiling=ceiling)
    mu_k = mu[topdown.argmax(-1)]
    assert torch.equal(out[..., ::2], mu_k[..., ::2])  # noise-free
    assert torch.equal(out[..., 1::2], mu_k[..., 1::2] + eps[..., 1::2] / 2.0)  # noisy, std 1/sigma


def test_sample_empirical_moments_and_frequencies(fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed)
    K, D, divisor, n = 4, 3, 2.0, 40000
    mu = torch.randn(K, D, generator=g, dtype=torch.float64)
    sigma = 0.5 + torch.rand(K, D, generator=g, dtype=torch.float64)
    # top_s = 1 on a fixed prior: every draw from component 2
    topdown = torch.tensor([0.1, 0.2, 0.9, 0.3], dtype=torch.float64).expand(n, 1, 1, K).contiguous()
    out, _, _ = _sample(topdown, mu, sigma, top_s=1, divisor=divisor, seed=fresh_seed)
    flat = out.reshape(n, D)
    std = 1 / (sigma[2] * divisor)
    assert torch.all((flat.mean(0) - mu[2]).abs() < 5 * std / math.sqrt(n))
    assert torch.all((flat.std(0) / std - 1).abs() < 0.03)
    # top_s = 0 keeps all: component frequencies follow topdown / sum(topdown)
    out_all, _, _ = _sample(topdown, mu, sigma, top_s=0, divisor=1e9, seed=fresh_seed + 1)
    picks = (out_all.reshape(n, 1, D) - mu[None]).abs().sum(-1).argmin(-1)
    freq = torch.bincount(picks, minlength=K).double() / n
    p = topdown[0, 0, 0] / topdown[0, 0, 0].sum()
    assert torch.all((freq - p).abs() < 5 * torch.sqrt(p * (1 - p) / n))


def test_sample_dead_positions_are_zero(fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed)
    K, D = 9, 4
    mu = torch.randn(K, D, generator=g, dtype=torch.float64) + 3
    sigma = torch.ones(K, D, dtype=torch.float64)
    topdown = torch.rand(2, 2, 2, K, generator=g, dtype=torch.float64)
    topdown[0, 0, 0] = 0.0
    topdown[1, 1, 1] = -topdown[1, 1, 1]
    out, _, _ = _sample(topdown, mu, sigma, top_s=3, seed=fresh_seed)
    assert torch.all(out[0, 0, 0] == 0) and torch.all(out[1, 1, 1] == 0)
    alive = torch.ones(2, 2, 2, dtype=torch.bool)
    alive[0, 0, 0] = alive[1, 1, 1] = False
    assert torch.all(out[alive].abs().sum(-1) > 0)


# ------------------------------------------------------------------------------------------------ memory
def test_peak_memory_of_chunked_forward_backward():
    """(rows, K, D) = (14400, 100, 400) float32 would be 2.3 GB unchunked; fwd + bwd must grow RSS < 1 GB."""
    code = textwrap.dedent(
        """
        import resource, torch
        from dcgmm_fast import geometry, reference
        torch.manual_seed(0)
        x = torch.rand(100, 26, 26, 25, requires_grad=True)
        K, D = 100, 400
        mu = torch.rand(K, D, requires_grad=True)
        sigma = (1 + torch.rand(K, D)).requires_grad_(True)
        log_pi = torch.log_softmax(torch.zeros(K), 0).requires_grad_(True)
        G = geometry.smoothing_matrix(K, 3.5)
        assert 14400 * K * D * 4 > 2 * 2**30
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = reference.cgmm(x, mu, sigma, log_pi, kernel=4, stride=2, loss="mc", smoothing=G)
        (out.score.mean() + out.resp[..., 0].mean()).backward()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert torch.isfinite(mu.grad).all() and torch.isfinite(x.grad).all()
        print((peak - base) * 1024)
        """
    )
    env = dict(os.environ, OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    growth = int(res.stdout.strip().splitlines()[-1])
    assert growth < 2**30, f"peak RSS grew by {growth / 2**20:.0f} MiB"
