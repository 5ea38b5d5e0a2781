"""The step guard (divergence caught on the device, reported at log intervals) and validation at the boundary."""
import math

import pytest
import torch

from dcgmm_fast import presets
from dcgmm_fast.guard import DivergenceError, StepGuard
from dcgmm_fast.layers import ConvGMM
from dcgmm_fast.model import DCGMM


def _model(gmm=None, clf_lr=0.05):
    specs = [presets.GMM(3, 1, 9, **(gmm or {})), presets.Pool(), presets.Classifier("pool1", lr=clf_lr)]
    return DCGMM(specs, input_shape=(12, 12, 1), n_classes=3, seed=0)


def _data(n=60):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 12, 12, 1, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("gmm,clf_lr,layer,what", [
    (dict(eps0=1e3, eps_inf=1e3, window=10, lambda_mu=1e3), 0.05, "gmm1", "mu"),  # the original rule runs away
    (dict(lambda_pi=1e6, eps0=0.1), 0.05, "gmm1", "pi_logits"),
    (None, 1e6, "classifier", "loss"),
])
def test_divergence_names_the_layer_step_and_quantity(gmm, clf_lr, layer, what):
    model = _model(gmm, clf_lr)
    x, y = _data()
    with pytest.raises(DivergenceError, match=rf"^{layer}: training diverged at step \d+: .*{what}") as info:
        model.fit(x, y, epochs=3, batch_size=20, seed=0)
    assert "step" in str(info.value)


def test_a_healthy_run_passes_the_guard_and_reads_it_only_at_intervals(monkeypatch):
    calls = []
    original = StepGuard.check
    monkeypatch.setattr(StepGuard, "check", lambda self: calls.append(int(self.step)) or original(self))
    model = _model()
    x, y = _data(100)
    model.fit(x, y, epochs=12, batch_size=10, seed=0)  # 120 steps
    assert calls == [50, 100, 120]  # every check_every (50) steps and at the end, never per step


def test_guard_records_the_first_bad_step_only():
    guard = StepGuard(["gmm1", "classifier"], torch.device("cpu"), classifier=True)
    mu, pi = torch.zeros(3, 4), torch.zeros(3)
    for step in range(5):
        guard.set_step(step)
        score = torch.tensor(float("nan") if step >= 2 else -1.0)
        guard.record_gmm(0, score, mu, pi)
        guard.record_classifier(1, torch.tensor(2e3 if step >= 3 else 1.0))
    with pytest.raises(DivergenceError, match="gmm1: training diverged at step 2: mean score is not finite"):
        guard.check()
    assert guard.first_step.tolist() == [2, 3]


def test_fit_checks_the_data_once_with_a_clear_error():
    model = _model()
    x, y = _data()
    x[3, 2, 2, 0] = math.nan
    from dcgmm_fast.train import Trainer

    with pytest.raises(ValueError, match="x: images contain NaN or Inf"):
        Trainer(model.layers, model.names).fit(x, y, epochs=1, batch_size=20)


def test_user_calls_keep_every_check_and_loading_checks_parameters():
    layer = ConvGMM((8, 8, 1), 3, 1, 9)
    x = torch.rand(2, 8, 8, 1)
    x[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="x: expected finite"):
        layer(x)  # a user's forward: the full checks of ops.cgmm
    state = layer.state_dict()
    state["mu"] = state["mu"].clone()
    state["mu"][0, 0] = math.inf
    with pytest.raises(ValueError, match="mu: expected finite"):
        ConvGMM((8, 8, 1), 3, 1, 9).load_state_dict(state)


@pytest.mark.parametrize("field,value", [("mu_init", 1e20), ("lambda_pi", 1e30), ("lambda_mu", -1.0),
                                         ("eps0", float("nan")), ("eps0", 1e6)])
def test_hyper_parameters_that_can_only_be_mistakes_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        _model({field: value} if field != "eps0" else {field: value, "eps_inf": 1e-3})


def test_classifier_learning_rate_range():
    with pytest.raises(ValueError, match="lr"):
        _model(clf_lr=1e30)


@pytest.mark.parametrize("with_maxima", [False, True])
def test_host_record_equals_the_tensor_record(with_maxima):
    """The CPU eager Trainer's host checks (``record_*_host``) write the record the tensor ops write: the first bad
    step per layer, which check fired first and its value (float32 inputs; NaN, inf and both limits)."""
    names = ["gmm1", "gmm2", "classifier"]
    guards = [StepGuard(names, torch.device("cpu"), classifier=True) for _ in range(2)]
    steps = [  # per step: (score, max |mu|, max |pi|) of gmm1 and gmm2, the classifier's loss
        ((-1.0, 1.0, 2.0), (-3.0, 9e3, 1.0), 1.0),
        ((-2.0, 2e4, 3.0), (float("nan"), 1.0, 2e4), 5.0),
        ((float("inf"), 3e4, 1e5), (-1.0, 1.0, 1.0), 2e3),
        ((float("nan"), 1.0, 1.0), (-1.0, 5e4, 1.0), float("nan")),
    ]
    for step, (a, b, loss) in enumerate(steps):
        for host, guard in enumerate(guards):
            guard.set_step(step)
            for i, (score, mu_max, pi_max) in enumerate((a, b)):
                mu = torch.tensor([[0.5, -mu_max]])
                pi = torch.tensor([pi_max, 0.0])
                maxima = torch.tensor([mu_max, pi_max]) if with_maxima else None
                score_t = torch.tensor(score, dtype=torch.float32)
                if host:
                    guard.record_gmm_host(i, float(score_t), mu, pi, maxima)
                else:
                    guard.record_gmm(i, score_t, mu, pi, maxima)
            loss_t = torch.tensor(loss, dtype=torch.float32)
            guard.record_classifier_host(2, float(loss_t)) if host else guard.record_classifier(2, loss_t)
    assert guards[0].first_step.tolist() == [1, 1, 2]
    for name in ("first_step", "quantity", "value"):
        torch.testing.assert_close(getattr(guards[1], name), getattr(guards[0], name), rtol=0, atol=0,
                                   equal_nan=True, msg=name)
