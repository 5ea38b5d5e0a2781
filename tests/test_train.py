"""dcgmm_fast.train: SingleExp against the original's recorded vectors, the update rule against design.md's
closed forms, compiled vs eager steps, determinism, torch optimizers, waits."""
import json
import math
import os

import numpy as np
import pytest
import torch

from dcgmm_fast import backends, geometry, ops, presets
from dcgmm_fast.layers import ConvGMM
from dcgmm_fast.model import DCGMM
from dcgmm_fast.train import SingleExp, Trainer, gmm_step

from conftest import assert_close

VECTORS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "singleexp_vectors.json")


# ------------------------------------------------------------------------------------------------ SingleExp
@pytest.mark.skipif(not os.path.exists(VECTORS), reason="shared/data/singleexp_vectors.json not present")
def test_singleexp_reproduces_the_original_vectors():
    cases = json.load(open(VECTORS))["cases"]
    assert cases
    for name, c in cases.items():
        ctrl = SingleExp(c["eps0"], c["epsInf"], c["somSigma0"], c["somSigmaInf"], c["W"], c["gamma"], c["delta"])
        reductions = []
        for t, loss in enumerate(c["losses"]):
            if ctrl.step(loss):
                reductions.append(t)
            for got, want, what in ((ctrl.eps, c["eps_after_step"][t], "eps"),
                                    (ctrl.som_sigma, c["som_sigma_after_step"][t], "som_sigma")):
                assert abs(got - want) <= 1e-6 * abs(want), f"{name} step {t}: {what} {got} != {want}"
        assert reductions == c["reduction_steps"], name


def test_singleexp_schedule_by_hand():
    # window 4: checks after steps 2, 6, 10, ... (it % W == W - 1); events 0 and 1 set the baselines
    ctrl = SingleExp(0.05, 0.01, 2.0, 0.01, window=4, gamma=0.5, delta=0.05)
    losses = [0, 1, 2, 99, 10, 11, 12, 99, 13, 13, 13]  # window means (first W-1): 1, 11, 13
    fired = [t for t, loss in enumerate(losses) if ctrl.step(loss)]
    # r at step 10 = (13 - 11) / (11 - 1) = 0.2 >= delta: no reduction
    assert fired == [] and ctrl.eps == pytest.approx(0.05) and ctrl.som_sigma == 2.0
    for loss in [99, 13.1, 13.1, 13.1]:  # window mean 13.1: r = 0.1 / 12 < delta -> reduce
        ctrl.step(loss)
    assert ctrl.som_sigma == 1.0 and ctrl.eps == pytest.approx(0.025)


def test_singleexp_floors_and_flat_losses():
    ctrl = SingleExp(0.011, 0.01, 0.02, 0.01, window=2, gamma=0.9)
    for _ in range(200):
        ctrl.step(-5.0)  # flat: last == first -> 0/0 -> nan -> no change (numpy semantics), never an error
    assert ctrl.som_sigma == pytest.approx(0.02) and ctrl.eps == pytest.approx(0.011)
    ctrl = SingleExp(0.011, 0.01, 0.02, 0.01, window=2, gamma=0.9)
    for t in range(400):
        ctrl.step(-5.0 + (1 - 0.5 ** (t / 4)))  # converging: many reductions, floored
    assert ctrl.som_sigma == pytest.approx(0.01) and ctrl.eps == pytest.approx(0.01)


# ------------------------------------------------------------------------------------------------ update rule
def hand_update(layer, x):
    """design.md's closed forms for J = mean score (g_score = 1/M), then the original rule and clipping."""
    out = ops.cgmm(x, layer.mu, layer.sigma, layer.log_pi(), kernel=layer.kernel, stride=layer.stride,
                   loss=layer.loss, smoothing=None if layer.smoothing_is_identity else layer.smoothing)
    N = x.shape[0]
    P, K = layer.P, layer.n_components
    M = N * P
    xp = ops.patches(x, layer.kernel, layer.stride).reshape(N, P, -1)  # (N, P, D)
    if layer.loss == "mc":
        identity = torch.eye(K, dtype=x.dtype)
        G = identity if layer.smoothing_is_identity else geometry.smoothing_dense(layer.smoothing)
        Wt = G[out.kstar.reshape(N, P).long()] / M
    else:
        Wt = out.resp.reshape(N, P, K) / M
    mu, sigma = layer.mu.detach(), layer.sigma.detach()
    if layer.mode == "shared":
        mu, sigma = mu[None], sigma[None]
    w = Wt.sum(0)  # (P, K)
    A1 = torch.einsum("npk,npd->pkd", Wt, xp)
    A2 = torch.einsum("npk,npd->pkd", Wt, xp * xp)
    d_log_pi = w
    d_mu = sigma**2 * (A1 - w[..., None] * mu)
    d_sigma = w[..., None] / sigma - sigma * (A2 - 2 * mu * A1 + w[..., None] * mu**2)
    if layer.mode == "shared":
        d_log_pi, d_mu, d_sigma = d_log_pi.sum(0), d_mu.sum(0), d_sigma.sum(0)
    logits = layer.pi_logits.detach()
    if layer.mode == "independent" and layer.pi_norm == "global":
        soft = torch.softmax(logits.reshape(-1), 0).reshape(logits.shape)
        d_logits = d_log_pi - soft * d_log_pi.sum()
    else:
        soft = torch.softmax(logits, -1)
        d_logits = d_log_pi - soft * d_log_pi.sum(-1, keepdim=True)
    scale = float(layer.eps) * (P if layer.mode == "independent" else 1)
    new_mu = layer.mu.detach() + layer.lambda_mu * scale * d_mu
    new_sigma = (layer.sigma.detach() + layer.lambda_sigma * scale * d_sigma).clamp(layer.sigma_min, math.sqrt(20))
    new_logits = logits + layer.lambda_pi * scale * d_logits
    return new_mu, new_sigma, new_logits


@pytest.mark.parametrize(
    "mode,pi_norm,loss,som",
    [("shared", "position", "mc", 1.1), ("shared", "position", "mc", 0.01), ("independent", "global", "mc", 1.1),
     ("independent", "position", "loglik", 1.1), ("shared", "position", "loglik", 1.1)],
)
def test_one_step_equals_hand_written_update(mode, pi_norm, loss, som, fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed)
    layer = ConvGMM((9, 8, 2), 3, 2, 9, mode=mode, pi_norm=pi_norm, loss=loss, som_sigma0=som, eps0=0.05,
                    lambda_pi=0.3, lambda_sigma=0.7, mu_init=0.5, dtype=torch.float64, generator=g)
    with torch.no_grad():  # start away from the uniform / clip-ceiling init so every term matters
        layer.pi_logits.normal_(generator=g)
        layer.sigma.mul_(0.6 + 0.5 * torch.rand(layer.sigma.shape, generator=g, dtype=torch.float64))
    x = torch.rand(4, 9, 8, 2, generator=g, dtype=torch.float64)
    want = hand_update(layer, x)
    resp, score = gmm_step(layer, x)
    assert resp.shape == (4, 4, 3, 9) and score.dim() == 0
    for name, got, exp in zip(("mu", "sigma", "pi_logits"), (layer.mu, layer.sigma, layer.pi_logits), want):
        assert_close(got, exp, 1e-12, name)
    assert bool((layer.sigma == math.sqrt(20)).any()), "the clip ceiling should have been hit"


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["shared", "independent"])
def test_fused_update_equals_the_aten_ops(dtype, mode, isa, fresh_seed, monkeypatch):
    """The one-pass C++ update (cpp layers, eager; each instruction-set build this CPU has) gives ATen's addcmul_ /
    clamp_ bits and the guard's maxima, with the clip floor and ceiling hit and a NaN propagated; the ATen path
    returns no maxima."""
    from dcgmm_fast.guard import _abs_max
    from dcgmm_fast.train import update_

    if backends.problem("cpp") is not None:
        pytest.skip(backends.problem("cpp"))
    from dcgmm_fast.backends.cpp import cpu_isa

    monkeypatch.setenv("DCGMM_CPU_ISA", isa)
    if cpu_isa() != isa:
        pytest.skip(f"this CPU runs {cpu_isa()} at best")
    g = torch.Generator().manual_seed(fresh_seed)
    layers = [ConvGMM((20, 20, 3), 3, 1, 16, mode=mode, eps0=0.05, lambda_pi=0.3, lambda_sigma=0.7, dtype=dtype,
                      generator=g, backend=b) for b in ("cpp", "reference")]
    layers[1].load_state_dict(layers[0].state_dict())
    grads = [torch.randn(p.shape, generator=g, dtype=dtype) * 50 for p in (layers[0].mu, layers[0].sigma,
                                                                              layers[0].pi_logits)]
    grads[1].view(-1)[:2] = torch.tensor([1e6, -1e6], dtype=dtype)  # the clip floor and ceiling, whatever the seed
    maxima = [update_(layer, *grads) for layer in layers]
    assert maxima[1] is None and maxima[0].shape == (2,)
    for name in ("mu", "sigma", "pi_logits"):
        assert torch.equal(getattr(layers[0], name), getattr(layers[1], name)), name
    sig = layers[0].sigma
    assert bool((sig == layers[0].sigma_min).any()) and bool((sig == layers[0].sigma_max).any())
    assert torch.equal(maxima[0], torch.stack([_abs_max(layers[1].mu), _abs_max(layers[1].pi_logits)]))
    grads[0].view(-1)[grads[0].numel() // 2] = float("nan")
    maxima = [update_(layer, *grads) for layer in layers]
    assert bool(maxima[0][0].isnan()) and not bool(maxima[0][1].isnan())
    assert torch.equal(layers[0].mu.isnan(), layers[1].mu.isnan())


# ------------------------------------------------------------------------------------------------ device annealing
def test_device_annealing_equals_the_host_controller(fresh_seed):
    """anneal_ (tensor ops on the layer's buffers) takes SingleExp's decisions at the same steps, bit for bit."""
    from dcgmm_fast.anneal import anneal_
    from dcgmm_fast.geometry import smoothing_factors

    g = torch.Generator().manual_seed(fresh_seed)
    layer = ConvGMM((6, 6, 1), 3, 1, 9, window=4, gamma=0.7, delta=0.5, eps0=0.05, eps_inf=0.011, som_sigma0=2.0,
                    som_sigma_inf=0.05)
    ctrl = SingleExp.for_layer(layer)
    events = 0
    for t in range(240):  # a converging, noisy loss: plenty of windows with r inside and outside the band
        score = torch.tensor(-1.0 / (t + 1) + 0.02 * float(torch.randn((), generator=g)), dtype=torch.float32)
        reduced = bool(anneal_(layer, score))
        want = ctrl.step(float(score))
        assert reduced == want, t
        events += want
        assert float(layer.eps) == ctrl.eps and float(layer.som_sigma) == ctrl.som_sigma, t
        assert layer.anneal_state.tolist() == ctrl.counters(), t
    assert events >= 5 and ctrl.som_sigma == np.float32(0.05), (events, ctrl.som_sigma)  # reached the floor
    assert torch.equal(layer.smoothing, smoothing_factors(9, ctrl.som_sigma))


# ------------------------------------------------------------------------------------------------ compile
def _small_stack(seed, backend):
    anneal = dict(window=3, delta=10.0, gamma=0.8)  # a wide band: an annealing event at nearly every check
    specs = (presets.GMM(3, 1, 9, som_sigma0=1.0, eps0=0.05, **anneal), presets.Pool(),
             presets.GMM(2, 1, 4, mode="independent", pi_norm="global", wait=0.3, **anneal),
             presets.Classifier("gmm2", 0.05))
    return DCGMM(specs, input_shape=(10, 10, 1), seed=seed, backend=backend)


def _train(model, compile, x, y):
    model.fit(x, y, epochs=8, batch_size=8, seed=1, compile=compile)  # 40 steps, gmm2 waits for 12
    return model


@pytest.mark.parametrize("compile,backend", [("aot_eager", "cpp"), (True, "cpp")])
def test_compiled_multilayer_step_equals_eager(compile, backend):
    """The whole captured step (both GMM layers, the classifier, annealing on the device, guard, history) gives
    the eager parameters after 40 steps with annealing events: bit-identical when the captured graph runs the
    eager kernels (aot_eager), within 1e-6 relative under inductor (its generated code may contract a * b + c)."""
    if backends.problem(backend) is not None:
        pytest.skip(backends.problem(backend))
    g = torch.Generator().manual_seed(5)
    x = (torch.rand(40, 10, 10, 1, generator=g) * 255).to(torch.uint8)  # stays uint8, scaled in the step
    y = torch.randint(0, 10, (40,), generator=g)
    eager = _train(_small_stack(3, backend), False, x, y)
    compiled = _train(_small_stack(3, backend), compile, x, y)
    fresh = _small_stack(3, backend)
    for (name, a), (_, b) in zip(eager.state_dict().items(), compiled.state_dict().items()):
        if compile == "aot_eager" or name.endswith(("eps", "som_sigma")):  # the annealing took the same steps
            assert torch.equal(a, b), name
        elif name.endswith("anneal_state"):
            assert torch.equal(a[[0, 4]], b[[0, 4]]), name  # steps and events; the window means to rounding
            assert float((a - b).abs().max()) <= 1e-6 * float(a.abs().max()), name
        else:
            assert float((a - b).abs().max()) <= 1e-6 * float(a.abs().max()), name
    for name in ("layers.0.anneal_state", "layers.2.anneal_state"):
        events = int(eager.state_dict()[name][4])
        assert events >= 3, (name, events)
    assert float(eager.layers[2].eps) < float(fresh.layers[2].eps)  # annealed, and identically in both
    assert not torch.equal(eager.layers[2].mu, fresh.layers[2].mu)  # gmm2 trained after its wait


# ------------------------------------------------------------------------------------------------ determinism
def test_same_seed_gives_bit_identical_parameters(shipped):
    x, y = shipped.x_train[:400], shipped.y_train[:400]
    a, b, c = DCGMM("demo", seed=7), DCGMM("demo", seed=7), DCGMM("demo", seed=8)
    for m in (a, b):
        m.fit(x, y, epochs=1, seed=3)
    c.fit(x, y, epochs=1, seed=3)
    for (name, p), (_, q), (_, r) in zip(a.state_dict().items(), b.state_dict().items(), c.state_dict().items()):
        assert torch.equal(p, q), name
    assert not torch.equal(a.state_dict()["layers.0.mu"], c.state_dict()["layers.0.mu"])


# ------------------------------------------------------------------------------------------------ optimizers
def test_adam_trains_the_demo_preset(shipped):
    x, y = shipped.x_train[:2000], shipped.y_train[:2000]
    model = DCGMM("demo", seed=0)
    before = {k: v.mean().item() for k, v in model.log_prob(shipped.x_test[:300]).items()}
    model.fit(x, y, epochs=1, seed=0, optimizer="adam", lr=0.01)
    after = {k: v.mean().item() for k, v in model.log_prob(shipped.x_test[:300]).items()}
    for name in before:
        assert after[name] > before[name], (name, before[name], after[name])
    for layer in model.gmm_layers().values():  # clipped to [sigma_min, sqrt(20)] (bounds rounded to float32)
        ceiling = torch.tensor(math.sqrt(20), dtype=torch.float32)
        floor = torch.tensor(layer.sigma_min, dtype=torch.float32)
        assert bool((layer.sigma <= ceiling).all()) and bool((layer.sigma >= floor).all())


def test_optimizer_lr_follows_lambdas_and_eps():
    layers = [ConvGMM((6, 6, 1), 2, 1, 4, eps0=0.02, lambda_mu=1.0, lambda_sigma=0.5, lambda_pi=0.0)]
    t = Trainer(layers, ["gmm1"], optimizer="sgd", lr=0.1)
    layers[0].set_annealing(0.01, 1.0)
    t._set_learning_rates()
    assert [g["lr"] for g in t.optimizer.param_groups] == pytest.approx([0.05, 0.025, 0.0])


# ------------------------------------------------------------------------------------------------ waits
def test_waiting_layer_does_not_move(shipped):
    model = DCGMM("demo", seed=0)  # gmm2 waits 10% of training
    gmm2 = model["gmm2"]
    start = [p.detach().clone() for p in gmm2.parameters()]
    moved_at = []

    def watch(step, total, history):
        if not moved_at and any(not torch.equal(p, s) for p, s in zip(gmm2.parameters(), start)):
            moved_at.append(step)

    model.fit(shipped.x_train[:2000], shipped.y_train[:2000], epochs=1, seed=0, callback=watch)
    # 20 steps: step t (0-based) learns once t / 21 >= 0.1, i.e. from t = 3 (the 4th step) on
    assert moved_at == [4]
    assert float(model["gmm2"].anneal_state[0]) == 20 - 3  # controller fed only while learning


def test_training_is_bit_identical_for_one_and_two_threads(shipped):
    """The GMM layers' parameters and annealing state (fed by a fixed-order mean score) do not depend on the thread
    count; the classifier's (two BLAS products per step, in their fastest operand order) agree to rounding."""
    from dcgmm_fast.model import DCGMM
    from dcgmm_fast.train import fixed_order_mean

    big = torch.randn(67600, dtype=torch.float32)
    threads = torch.get_num_threads()
    states, means = [], []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            means.append(fixed_order_mean(big))
            model = DCGMM("demo", seed=0)
            model.fit(shipped.x_train[:1000], shipped.y_train[:1000], epochs=2, seed=0)
            states.append(model.state_dict())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(means[0], means[1])
    assert abs(float(means[0]) - float(big.double().mean())) <= 1e-7 * abs(float(big.double().mean()))
    for key in states[0]:
        # the classifier: BLAS products, whose blocking follows the thread count
        if key.startswith(f"layers.{model.names.index('classifier')}."):
            torch.testing.assert_close(states[0][key], states[1][key], rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(states[0][key], states[1][key]), key


# ------------------------------------------------------------------------------------------------ history
def test_history_keeps_device_rows_until_read():
    """A step appends one tensor; the lists fill at the first read (one transfer), in step order."""
    from dcgmm_fast.train import History

    h = History()
    h.record(["gmm1", "gmm2"], torch.tensor([1.0, 0.5, 2.0, 0.25, 3.0, 0.75], dtype=torch.float64), True)
    h.record(["gmm1", "gmm2"], torch.tensor([1.5, 0.5, 2.5, 0.25, 2.0, 1.0], dtype=torch.float64), True)
    assert len(h._pending) == 2 and h._score == {}  # nothing read back yet
    assert h.score == {"gmm1": [1.0, 1.5], "gmm2": [2.0, 2.5]} and h._pending == []
    assert h.som_sigma == {"gmm1": [0.5, 0.5], "gmm2": [0.25, 0.25]}
    assert h.classifier_loss == [3.0, 2.0] and h.classifier_accuracy == [0.75, 1.0]
    h.record(["gmm1", "gmm2"], torch.tensor([9.0, 0.1, 8.0, 0.2], dtype=torch.float64), False)  # no labels
    assert h.score["gmm1"] == [1.0, 1.5, 9.0] and h.classifier_loss == [3.0, 2.0]
