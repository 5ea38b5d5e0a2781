"""The eager training step's one pass, ``dcgmm::cgmm_fwd_grads_cpp`` (``train._gmm_grads_one_pass``): the forward's
outputs and the parameter gradients of the mean score, bit for bit those of ``cgmm_fwd_cpp`` and its autograd
backward (which test_backends and test_cpu_isa hold to the reference). Through the fused pass (the winner sums taken
in the forward's tasks: independent layers, a shared layer of several row chunks) and the two passes it falls back
to (loglik, the GEMM form, a shared layer with few rows); every instruction-set build this CPU runs, float32 and
float64, random and trained-regime inputs, 1 and 2 threads; outputs NaN-poisoned. Then the Trainer: parameters after
steps of the one pass equal those of the autograd step.
"""
import pytest
import torch

from dcgmm_fast import backends, geometry, train
from dcgmm_fast.model import DCGMM
from dcgmm_fast.train import History, Trainer, mean_grad

from test_backends import _inputs

pytestmark = pytest.mark.skipif(backends.problem("cpp") is not None, reason="backend 'cpp' is not built")

NAMES = ("resp", "score", "lse", "kstar", "d_mu", "d_sigma", "d_log_pi")

CASES = [  # (N, H, W, C, kernel, stride, K, independent, loss, som_sigma); the path with 1 or 2 threads
    (60, 28, 28, 1, 3, 1, 25, True, "mc", 1.5),  # preset D's first layer (fused: 43 tiles of 16 GMMs)
    (60, 13, 13, 25, 4, 1, 25, True, "mc", 2.0),  # its second, D = 400 in 4 ranges, 3 x 16 + 12 rows (fused)
    (20, 13, 13, 25, 4, 1, 25, True, "mc", None),  # no smoothing (fused)
    (50, 16, 16, 2, 3, 1, 9, True, "mc", 0.8),  # the dense G (fused)
    (100, 28, 28, 1, 3, 1, 9, False, "mc", 1.0),  # shared, 67,600 rows in 9 chunks (fused)
    (3, 12, 12, 2, 3, 1, 16, False, "mc", 1.0),  # shared, one chunk (two passes)
    (4, 10, 10, 3, 3, 1, 25, True, "loglik", None),  # general sums (two passes)
    (2, 10, 10, 4, 4, 2, 64, False, "mc", 2.0),  # the GEMM form (two passes)
    (40, 13, 13, 25, 4, 1, 25, True, "mc", 2.0),  # 40 rows per GMM: the winner sums cost more (two passes)
]
FUSED = [True, True, True, True, True, False, False, False, False]
IDS = ["D1", "D2", "D2-identity", "dense-K9", "shared-chunks", "shared-few", "loglik", "gemm", "D2-N40"]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setenv("DCGMM_POISON", "1")


def _smoothing(K, som, dtype, dense=False):
    """The factors (2, n, n) the layers pass, or the dense (K, K) G; None without a smoothing."""
    if som is None:
        return None
    return (geometry.smoothing_matrix if dense else geometry.smoothing_factors)(K, som, dtype=dtype)


def _check_same(x, mu, sigma, log_pi, kernel, stride, loss, G):
    """cgmm_fwd_grads_cpp against cgmm_fwd_cpp + autograd of the mean score, every output bit for bit."""
    k, s = list(geometry.pair(kernel)), list(geometry.pair(stride))
    leaves = [t.detach().requires_grad_(True) for t in (mu, sigma, log_pi)]
    out = torch.ops.dcgmm.cgmm_fwd_cpp(x.detach(), *leaves, k, s, loss, G)
    g = mean_grad(out[1])
    grads = torch.autograd.grad(out[1], leaves, grad_outputs=g)
    one = torch.ops.dcgmm.cgmm_fwd_grads_cpp(x.detach(), *(t.detach() for t in leaves), k, s, loss, G,
                                             float(g.reshape(-1)[0]))
    assert one[7].numel() == 0  # no update asked
    for name, a, b in zip(NAMES, [*out, *grads], one):
        assert b.shape == a.shape and b.dtype == a.dtype, name
        assert not (b.isnan().any() if b.is_floating_point() else False), f"{name}: NaN (an entry left unwritten)"
        assert torch.equal(a, b), f"{name}: differs from the op and its autograd"


def _takes_one_pass(shape, dense, dtype, threads):
    """Whether cgmm_fwd_grads_cpp takes the fused pass (csrc/cpu/cgmm.cpp: GradPlan::winners, not the GEMM form,
    fused_units >= 4 threads), restated to check that the cases above cover both paths."""
    N, H, W, C, kernel, stride, K, indep, loss, som = shape
    (kh, kw), (Ho, Wo), D = geometry.pair(kernel), geometry.out_hw((H, W), kernel, stride), 0
    D = kh * kw * C
    G, rows = (Ho * Wo, N) if indep else (1, N * Ho * Wo)
    combine = 0 if som is None else (K if dense else 2 * int(K ** 0.5))
    gemm = not indep and D >= 64 and K >= 64
    per_tile = max(1, min(16, 64 * 1024 // (2 * K * D * dtype.itemsize))) if G > 1 else 1
    units = -(-G // per_tile) * -(-rows // 8192)
    return loss == "mc" and min(rows, 8192) > 5 * combine and not gemm and units >= 4 * threads


@pytest.mark.parametrize("threads", [1, 2])
def test_cases_cover_both_paths(threads):
    for shape, fused in zip(CASES, FUSED):
        for dtype in (torch.float32, torch.float64):
            assert _takes_one_pass(shape, shape is CASES[3], dtype, threads) == fused, shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", CASES, ids=IDS)
def test_one_pass_equals_forward_and_autograd(isa, shape, dtype, fresh_seed):
    (x, mu, sigma, log_pi), _, kw = _inputs(shape, dtype, fresh_seed, requires_grad=False)
    G = _smoothing(shape[6], shape[9], dtype, dense=shape is CASES[3])
    _check_same(x, mu, sigma, log_pi, kw["kernel"], kw["stride"], kw["loss"], G)


def _trained(source, K, som, shipped, seed):
    """Preset D's first (images, 3x3) or second layer (sharp responsibility maps, 4x4 over 25 channels) as training
    leaves it, 60 images (enough rows per GMM for the winner sums): mu on data patches at their own position plus
    small noise, sigma in [0.95, 1] times its sqrt(20) ceiling (test_backends._trained_inputs)."""
    g = torch.Generator().manual_seed(seed)
    if source == "images":
        x, kernel = shipped.x_test[torch.randperm(shipped.x_test.shape[0], generator=g)[:60]], 3
    else:
        x, kernel = torch.softmax(8.0 * torch.randn(60, 13, 13, 25, generator=g), -1), 4
    p = geometry.patches(x.flip(0), kernel, 1)  # (N, H', W', D)
    N, Ho, Wo, D = p.shape
    flat = p.reshape(N, Ho * Wo, D)
    mu = flat[torch.randint(0, N, (Ho * Wo, K), generator=g), torch.arange(Ho * Wo)[:, None]]
    mu = mu + 0.01 * torch.randn(mu.shape, generator=g)
    sigma = 20.0 ** 0.5 * (0.95 + 0.05 * torch.rand(mu.shape, generator=g))
    log_pi = torch.log_softmax(0.3 * torch.randn(mu.shape[:-1], generator=g), -1)
    return x, mu, sigma, log_pi, kernel, _smoothing(K, som, torch.float32)


@pytest.mark.parametrize("source,som", [("images", 1.2), ("resp", 2.0), ("resp", None)])
def test_one_pass_in_the_trained_regime(source, som, shipped, fresh_seed):
    x, mu, sigma, log_pi, kernel, G = _trained(source, 25, som, shipped, fresh_seed)
    _check_same(x, mu, sigma, log_pi, kernel, 1, "mc", G)


@pytest.mark.parametrize("threads", [1, 2])
def test_one_pass_independent_of_the_thread_count(threads, fresh_seed):
    shape = CASES[1]
    (x, mu, sigma, log_pi), _, kw = _inputs(shape, torch.float32, fresh_seed, requires_grad=False)
    G = _smoothing(shape[6], shape[9], torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        _check_same(x, mu, sigma, log_pi, kw["kernel"], kw["stride"], kw["loss"], G)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("shape", [CASES[i] for i in (0, 1, 4, 5, 6)], ids=[IDS[i] for i in (0, 1, 4, 5, 6)])
def test_update_in_the_pass_equals_gmm_update(isa, shape, fresh_seed):
    """With step sizes the op updates mu and sigma in place as gmm_update_cpp does from its gradients (sigma
    clamped at both bounds here), and returns max |mu| after it; its other outputs stay those of the plain call."""
    (x, mu, sigma, log_pi), _, kw = _inputs(shape, torch.float32, fresh_seed, requires_grad=False)
    G = _smoothing(shape[6], shape[9], torch.float32)
    k, s = list(geometry.pair(kw["kernel"])), list(geometry.pair(kw["stride"]))
    g = 1.0 / (shape[0] * 7.0)
    s_mu, s_sigma = torch.tensor(0.37), torch.tensor(-2.3)
    plain = torch.ops.dcgmm.cgmm_fwd_grads_cpp(x, mu.clone(), sigma.clone(), log_pi, k, s, kw["loss"], G, g)
    lo, hi = (float(q) for q in (sigma + s_sigma * plain[5]).quantile(torch.tensor([0.25, 0.75])))  # both clamps
    mu1, sigma1 = mu.clone(), sigma.clone()
    out = torch.ops.dcgmm.cgmm_fwd_grads_cpp(x, mu1, sigma1, log_pi, k, s, kw["loss"], G, g, s_mu, s_sigma, lo, hi)
    for name, a, b in zip(NAMES, plain[:7], out[:7]):
        assert torch.equal(a, b), name
    mu2, sigma2, pi2 = mu.clone(), sigma.clone(), log_pi.clone()
    maxima = torch.ops.dcgmm.gmm_update_cpp(mu2, sigma2, pi2, plain[4], plain[5], torch.zeros_like(pi2), s_mu,
                                            s_sigma, torch.tensor(0.0), lo, hi)
    assert torch.equal(mu1, mu2) and torch.equal(sigma1, sigma2)
    assert (sigma1 == torch.tensor(lo)).any() and (sigma1 == torch.tensor(hi)).any()
    assert out[7].shape == () and torch.equal(out[7], maxima[0])
    # grads_out=False (the training step's call): the same update from gradients that never leave the pass
    mu3, sigma3 = mu.clone(), sigma.clone()
    lean = torch.ops.dcgmm.cgmm_fwd_grads_cpp(x, mu3, sigma3, log_pi, k, s, kw["loss"], G, g, s_mu, s_sigma, lo, hi,
                                              False)
    assert torch.equal(mu3, mu1) and torch.equal(sigma3, sigma1) and torch.equal(lean[7], out[7])
    assert lean[4].numel() == 0 and lean[5].numel() == 0
    for name, a, b in zip(NAMES[:4] + NAMES[6:], (*out[:4], out[6]), (*lean[:4], lean[6])):
        assert torch.equal(a, b), name
    with pytest.raises(RuntimeError, match="grads_out: False needs the step sizes"):
        torch.ops.dcgmm.cgmm_fwd_grads_cpp(x, mu.clone(), sigma.clone(), log_pi, k, s, kw["loss"], G, g, None, None,
                                           0.0, 0.0, False)


@pytest.mark.parametrize("preset", ["D", "B-class"])
def test_gmm_step_one_pass_equals_autograd_step(preset, shipped, monkeypatch):
    """train._gmm_step of each GMM layer (forward, gradients, update rule): resp, mean score, the step guard's
    maxima and the parameters by the one pass equal those by the op's autograd and gmm_update_cpp."""
    def run(one_pass):
        monkeypatch.setattr(train, "_one_pass_grads", original if one_pass else (lambda layer: False))
        model = DCGMM(preset, seed=5, backend="cpp")
        h, results = shipped.x_train[:60], []
        for layer in model.layers:
            if isinstance(layer, train.ConvGMM):
                layer.set_annealing(0.05, 0.8)  # a large step: changes every parameter visibly
                resp, score, maxima = train._gmm_step(layer, h)
                results += [resp, score, maxima, *(p.detach().clone() for p in layer.parameters())]
                h = resp
            elif isinstance(layer, train.MaxPool):
                h = layer(h)
        return results

    original = train._one_pass_grads
    one, ref = run(True), run(False)
    assert len(one) == len(ref)
    for i, (a, b) in enumerate(zip(one, ref)):
        assert a is not None and torch.equal(a, b), i


def test_bad_g_score_is_named():
    (x, mu, sigma, log_pi), _, kw = _inputs(CASES[2], torch.float32, 0, requires_grad=False)
    with pytest.raises(RuntimeError, match="g_score: expected a finite number"):
        torch.ops.dcgmm.cgmm_fwd_grads_cpp(x, mu, sigma, log_pi, [4, 4], [1, 1], "mc", None, float("inf"))
    with pytest.raises(RuntimeError, match="s_mu, s_sigma: expected one step size each"):
        torch.ops.dcgmm.cgmm_fwd_grads_cpp(x, mu, sigma, log_pi, [4, 4], [1, 1], "mc", None, 0.1, torch.ones(1))


@pytest.mark.parametrize("preset", ["D", "B-class"])
def test_trainer_one_pass_equals_autograd_step(preset, shipped, monkeypatch):
    """The eager Trainer's parameters, annealing state and history after steps of every layer by the one pass equal
    those by the op's autograd (the compiled step's path)."""
    def run():
        model = DCGMM(preset, seed=3, backend="cpp")
        trainer, history = Trainer(list(model.layers), list(model.names)), History()
        for i in range(6):
            trainer.train_step(shipped.x_train[i * 50:(i + 1) * 50], shipped.y_train[i * 50:(i + 1) * 50], 0.5,
                               history)
        history.flush()
        return model.state_dict(), history.score

    assert any(train._one_pass_grads(layer) for layer in DCGMM(preset, seed=3, backend="cpp").layers
               if isinstance(layer, train.ConvGMM))
    one_state, one_scores = run()
    monkeypatch.setattr(train, "_one_pass_grads", lambda layer: False)
    ref_state, ref_scores = run()
    assert one_state.keys() == ref_state.keys()
    for key in ref_state:
        assert torch.equal(one_state[key], ref_state[key]), key
    assert one_scores == ref_scores
