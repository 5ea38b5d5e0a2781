"""The fused training step (issue 23): ``ops.cgmm_step_partials`` / ``cgmm_step_finalize`` on every backend that
has them (cpp on CPU: the CUDA kernels' arithmetic through csrc/cpu/step.cpp and cgmm_math.h; cuda on a GPU)
against the float64 reference, under design.md's rules, on random and trained-regime inputs; the reference step
against autograd; and the trainer's fused step against its autograd step.
"""
import pytest
import torch

from dcgmm_fast import geometry, ops, presets, reference
from dcgmm_fast.model import DCGMM

from conftest import make_inputs, rel_err
from test_backends import TRAINED, _trained_inputs


def _backends():
    out = ["cpp"] if "cpp" in ops.available_backends() else []
    if torch.cuda.is_available() and "cuda" in ops.available_backends():
        out.append("cuda@cuda")
    return out


STEP_BACKENDS = _backends()


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setenv("DCGMM_POISON", "1")


def _split(param):
    name, _, device = param.partition("@")
    return name, device or "cpu"


SHAPES = [  # (N, H, W, C, kernel, stride, K, independent, loss, som_sigma)
    (3, 8, 8, 1, 3, 1, 25, False, "mc", 1.3),
    (5, 9, 7, 2, 3, 2, 16, True, "mc", 0.9),
    (4, 6, 6, 1, 2, 2, 9, True, "loglik", None),
    (2, 6, 6, 3, 3, 1, 100, False, "mc", None),   # K = 100: the 128-register variant
    (130, 5, 5, 1, 3, 1, 4, True, "mc", 1.0),     # 130 images: three 64-image blocks per position
    (2, 7, 6, 1, 1, 1, 7, False, "loglik", None),  # D = 1, K odd
    (3, 6, 6, 2, (3, 2), (2, 1), 49, False, "mc", 2.0),
    (2, 5, 5, 1, 2, 1, 1, False, "loglik", None),  # K = 1
]
IDS = [f"N{s[0]}-{s[1]}x{s[2]}x{s[3]}-k{s[4]}-K{s[6]}-{'I' if s[7] else 'S'}-{s[8]}" for s in SHAPES]


def _case(shape, seed):
    N, H, W, C, kernel, stride, K, indep, loss, som = shape
    x, mu, sigma, log_pi = make_inputs(N, H, W, C, kernel, stride, K, indep, seed=seed)
    G = None if som is None else geometry.smoothing_factors(K, som, dtype=torch.float64)
    return [x, mu, sigma, log_pi], G, dict(kernel=kernel, stride=stride, loss=loss)


def _to(ts, dtype, device):
    return [None if t is None else t.to(device=device, dtype=dtype) for t in ts]


def _check_partials(backend, device, inputs64, G64, kw, dtype):
    """The op's outputs and statistics against the float64 reference given the backend's own winners."""
    out, stats = ops.cgmm_step_partials(*_to(inputs64, dtype, device), smoothing=_to([G64], dtype, device)[0],
                                        backend=backend, **kw)
    assert not torch.isnan(stats).any() and stats.dtype == torch.float64
    out, stats = [t.cpu() for t in out], stats.cpu()
    kstar = out[3]
    ref_out, ref_stats = reference.cgmm_step_partials(*inputs64, smoothing=G64, kstar=kstar, **kw)
    if dtype == torch.float64:
        for name, a, b in zip(("resp", "score", "lse"), out[:3], ref_out[:3]):
            assert rel_err(a, b) < 1e-10, name
        assert rel_err(stats, ref_stats) < 1e-10
        assert torch.equal(kstar, reference.cgmm(*inputs64, smoothing=G64, **kw).kstar)
        return
    # float32: 4x the float32 reference's own error + 1e-6 (design.md), stats given the same winners
    ref32_out, ref32_stats = reference.cgmm_step_partials(*_to(inputs64, torch.float32, "cpu"),
                                                          smoothing=_to([G64], torch.float32, "cpu")[0],
                                                          kstar=kstar, **kw)
    for name, a, b, c in zip(("resp", "score", "lse"), out[:3], ref_out[:3], ref32_out[:3]):
        assert rel_err(a, b) <= 4 * rel_err(c, b) + 1e-6, name
    assert rel_err(stats, ref_stats) <= 4 * rel_err(ref32_stats, ref_stats) + 1e-6
    # winners: equal to the float64 argmax where the float64 top-2 margin is clear
    free = reference.cgmm(*inputs64, smoothing=G64, **kw)
    assert _clear_rows_agree(kstar, free.kstar, inputs64, G64, kw)


def _clear_rows_agree(kstar, kstar64, inputs64, G64, kw):
    x, mu, sigma, log_pi = inputs64
    N = x.shape[0]
    K = mu.shape[-2]
    p = geometry.patches(x, kw["kernel"], kw["stride"]).reshape(N, -1, mu.shape[-1])
    m = mu if mu.dim() == 3 else mu[None]
    s = sigma if sigma.dim() == 3 else sigma[None]
    lp = log_pi if log_pi.dim() == 2 else log_pi[None]
    ls = lp[None] + s.log().sum(-1)[None] - 0.5 * ((s[None] * (p[:, :, None, :] - m[None])) ** 2).sum(-1)
    if kw["loss"] == "mc" and G64 is not None:
        ls = ls @ geometry.smoothing_dense(G64).T
    top = ls.topk(min(2, K), -1).values
    margin = top[..., 0] - top[..., -1] if K > 1 else torch.full_like(top[..., 0], 1e9)
    clear = margin.reshape(kstar.shape) > 1e-3 * (1 + top[..., 0].abs().reshape(kstar.shape))
    return bool((kstar[clear] == kstar64[clear]).all())


@pytest.mark.parametrize("backend", STEP_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_step_partials_random(backend, shape, fresh_seed):
    backend, device = _split(backend)
    inputs64, G64, kw = _case(shape, fresh_seed)
    if device == "cpu":
        _check_partials(backend, device, inputs64, G64, kw, torch.float64)
    _check_partials(backend, device, inputs64, G64, kw, torch.float32)


@pytest.mark.parametrize("backend", STEP_BACKENDS)
@pytest.mark.parametrize("case", [c for c in TRAINED if c[4] <= 128], ids=lambda c: c[0])
def test_step_partials_trained_regime(backend, case, shipped, fresh_seed):
    """mu on the data, sigma near its ceiling: the statistics are centred on each component's mean, so nothing
    cancels (the expanded sum_x^2 - 2 mu sum_x + mu^2 c would, in float32)."""
    backend, device = _split(backend)
    inputs64, G64, kw = _trained_inputs(case, shipped, fresh_seed)
    _check_partials(backend, device, inputs64, G64, kw, torch.float32)


def _finalize_args(inputs64, G64, kw, scale_rows, pi_global, seed):
    x, mu, sigma, log_pi = inputs64
    g = torch.Generator().manual_seed(seed)
    pi = torch.randn(log_pi.shape, generator=g, dtype=torch.float64)
    log_pi = (torch.log_softmax(pi.reshape(-1), 0).reshape(pi.shape) if pi_global
              else torch.log_softmax(pi, -1))
    _, stats = reference.cgmm_step_partials(x, mu, sigma, log_pi, smoothing=G64, **kw)
    steps = torch.tensor([0.7, 0.3, 0.5], dtype=torch.float64)
    return stats, mu, sigma, pi, log_pi, dict(smoothing=G64 if kw["loss"] == "mc" else None, scale=1.0 / scale_rows,
                                              steps=steps, sigma_min=0.05, sigma_max=4.0, pi_global=pi_global)


@pytest.mark.parametrize("backend", STEP_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_step_finalize(backend, shape, fresh_seed):
    """New parameters against the float64 reference (float64 1e-10; float32 the 4x rule), the clip applied, the
    inputs unchanged, the maxima those of the new parameters."""
    backend, device = _split(backend)
    inputs64, G64, kw = _case(shape, fresh_seed)
    pi_global = shape[7]  # independent layers: the presets' global normaliser
    stats, mu, sigma, pi, log_pi, fkw = _finalize_args(inputs64, G64, kw, shape[0] * 4, pi_global, fresh_seed)
    ref = reference.cgmm_step_finalize(stats, mu, sigma, pi, log_pi, **fkw)
    assert float(ref[1].min()) >= 0.05 and float(ref[1].max()) <= 4.0
    dtypes = [torch.float32] if device != "cpu" else [torch.float64, torch.float32]
    for dtype in dtypes:
        args = _to([mu, sigma, pi, log_pi], dtype, device)
        before = [a.clone() for a in args]
        kw_d = dict(fkw, steps=fkw["steps"].to(device=device, dtype=dtype),
                    smoothing=None if fkw["smoothing"] is None else fkw["smoothing"].to(device=device, dtype=dtype))
        got = [t.cpu() for t in ops.cgmm_step_finalize(stats.to(device), *args, backend=backend, **kw_d)]
        assert all(torch.equal(a, b) for a, b in zip(args, before)), "an input was changed"
        assert torch.equal(got[3], torch.stack([got[0].abs().max(), got[2].abs().max()]))
        if dtype == torch.float64:
            for a, b in zip(got, ref):
                assert rel_err(a, b) < 1e-10
        else:
            ref32 = reference.cgmm_step_finalize(stats, *_to([mu, sigma, pi, log_pi], dtype, "cpu"),
                                                 **dict(kw_d, steps=kw_d["steps"].cpu(),
                                                        smoothing=None if kw_d["smoothing"] is None
                                                        else kw_d["smoothing"].cpu()))
            for a, b, c in zip(got, ref, ref32):
                assert rel_err(a, b) <= 4 * rel_err(c, b) + 1e-6


@pytest.mark.parametrize("shape", SHAPES[:4], ids=IDS[:4])
def test_reference_step_equals_autograd(shape, fresh_seed):
    """The step statistics and the finalize's update are the mean score's gradients: equal (float64, 1e-10) to
    autograd through the reference op followed by the original update rule."""
    inputs64, G64, kw = _case(shape, fresh_seed)
    x, mu, sigma, _ = inputs64
    pi = torch.randn(inputs64[3].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(fresh_seed))
    leaves = [mu.clone().requires_grad_(), sigma.clone().requires_grad_(), pi.clone().requires_grad_()]
    log_pi = torch.log_softmax(leaves[2], -1)
    G = G64 if kw["loss"] == "mc" else None
    out = reference.cgmm(x, leaves[0], leaves[1], log_pi, smoothing=G, **kw)
    g_mu, g_sigma, g_pi = torch.autograd.grad(out.score.mean(), leaves)
    steps = torch.tensor([0.7, 0.3, 0.5], dtype=torch.float64)
    expect = [mu + steps[0] * g_mu, (sigma + steps[1] * g_sigma).clamp(0.05, 4.0), pi + steps[2] * g_pi]
    _, stats = reference.cgmm_step_partials(x, mu, sigma, log_pi.detach(), smoothing=G, **kw)
    got = reference.cgmm_step_finalize(stats, mu, sigma, pi, log_pi.detach(), smoothing=G,
                                       scale=1.0 / out.score.numel(), steps=steps, sigma_min=0.05, sigma_max=4.0)
    for a, b, o in zip(got[:3], expect, (mu, sigma, pi)):
        assert rel_err(a - o, b - o) < 1e-10


def test_step_ops_check_arguments():
    x, mu, sigma, log_pi = make_inputs(2, 6, 6, 1, 3, 1, 9)
    _, stats = ops.cgmm_step_partials(x, mu, sigma, log_pi, kernel=3, stride=1, backend="reference")
    steps = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="stats"):
        ops.cgmm_step_finalize(stats[:, :4], mu, sigma, log_pi, log_pi, smoothing=None, scale=1.0, steps=steps,
                               sigma_min=0.1, sigma_max=2.0)
    with pytest.raises(ValueError, match="steps"):
        ops.cgmm_step_finalize(stats, mu, sigma, log_pi, log_pi, smoothing=None, scale=1.0, steps=steps[:2],
                               sigma_min=0.1, sigma_max=2.0)
    with pytest.raises(ValueError, match="sigma_min"):
        ops.cgmm_step_finalize(stats, mu, sigma, log_pi, log_pi, smoothing=None, scale=1.0, steps=steps,
                               sigma_min=0.0, sigma_max=2.0)
    if "triton" in ops.available_backends():
        with pytest.raises(ops.BackendNotAvailable, match="fused training step"):
            ops.cgmm_step_partials(x.float(), mu.float(), sigma.float(), log_pi.float(), kernel=3, stride=1,
                                   backend="triton")


# ------------------------------------------------------------------------------------------- the trainer
STACK = [presets.GMM(3, 1, 25, window=5, tied_init=True), presets.Pool(),
         presets.GMM(4, 2, 16, wait=0.1, window=5, mode="independent", loss="loglik"),
         presets.Classifier("pool1", 0.1)]


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_trainer_fused_step_equals_autograd_step(backend, shipped):
    """20 steps of a stack (a shared mc layer that anneals, an independent loglik layer, the classifier) trained
    by the fused step ops and by autograd: the same parameters and annealing state (float64, 1e-10)."""
    if backend not in ops.available_backends():
        pytest.skip(f"{backend} is not built")
    states = []
    for fused in (False, True):
        model = DCGMM(STACK, seed=0, dtype=torch.float64, backend=backend)
        model.fit(shipped.x_train[:1000], shipped.y_train[:1000], epochs=2, batch_size=100, seed=0,
                  fused_step=fused, verbose=False)
        states.append(model.state_dict())
    a, b = states
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            assert rel_err(b[k], a[k]) < 1e-10, k
        else:
            assert torch.equal(a[k], b[k]), k
    assert float(a["layers.0.som_sigma"]) < 0.25 * (2 * 25) ** 0.5, "no annealing event: the test lost its point"


def test_fused_step_choice():
    """None: only layers that run on the cuda backend; True: the layer's backend when it has the step, else the
    reference; False: never."""
    from dcgmm_fast import train
    from dcgmm_fast.layers import ConvGMM

    cpu = torch.device("cpu")
    layer = ConvGMM((8, 8, 1), 3, 1, 9, backend="cpp" if "cpp" in ops.available_backends() else "reference")
    assert train.fused_step(layer, cpu, None) is None
    assert train.fused_step(layer, cpu, False) is None
    assert train.fused_step(layer, cpu, True) == layer.backend
    if "triton" in ops.available_backends():
        layer.backend = "triton"
        assert train.fused_step(layer, cpu, True) == "reference"
