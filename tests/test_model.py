"""dcgmm_fast.model: the DCGMM stack end to end on the shipped Fashion-MNIST subset."""
import numpy as np
import pytest
import torch

from dcgmm_fast import presets
from dcgmm_fast.model import DCGMM


@pytest.fixture(scope="module")
def demo_one_epoch(shipped):
    """The demo preset before and after one epoch on the 5,000 shipped training images (about 10 s)."""
    model = DCGMM("demo", seed=0)
    before = {k: v.mean().item() for k, v in model.log_prob(shipped.x_test, loss="loglik").items()}
    history = model.fit(shipped.x_train, shipped.y_train, epochs=1, seed=0).history_
    after = {k: v.mean().item() for k, v in model.log_prob(shipped.x_test, loss="loglik").items()}
    return model, before, after, history


def test_demo_epoch_raises_every_layers_test_loglik(demo_one_epoch):
    model, before, after, _ = demo_one_epoch
    assert set(before) == {"gmm1", "gmm2", "gmm3"}
    for name in before:
        assert after[name] > before[name], (name, before[name], after[name])


def test_demo_epoch_anneals_and_classifies(demo_one_epoch, shipped):
    model, _, _, history = demo_one_epoch
    assert history.steps == 50 and int(model.steps_done) == 50
    lowered = [n for n, g in model.gmm_layers().items() if float(g.som_sigma) < g.som_sigma0 * (1 - 1e-6)]
    assert lowered, {n: float(g.som_sigma) for n, g in model.gmm_layers().items()}
    accuracy = (model.classify(shipped.x_test) == shipped.y_test).float().mean().item()
    assert accuracy >= 0.4, accuracy  # chance is 0.1


def test_forward_gives_every_layers_output(shipped):
    model = DCGMM("demo", seed=0)
    out = model(shipped.x_test[:3])
    assert list(out) == ["gmm1", "pool1", "gmm2", "pool2", "gmm3", "classifier"]
    assert out["gmm1"].shape == (3, 26, 26, 25) and out["pool1"].shape == (3, 13, 13, 25)
    assert out["gmm2"].shape == (3, 10, 10, 25) and out["pool2"].shape == (3, 5, 5, 25)
    assert out["gmm3"].shape == (3, 1, 1, 25) and out["classifier"].shape == (3, 10)
    assert torch.allclose(out["gmm1"].sum(-1), torch.ones(3, 26, 26))


def test_log_prob_is_mean_score_per_image(shipped):
    model = DCGMM("demo", seed=0)
    x = shipped.x_test[:7]
    lp = model.log_prob(x, loss="loglik", batch_size=3)
    out1 = model["gmm1"].cgmm(x, loss="loglik")
    assert torch.allclose(lp["gmm1"], out1.score.mean(dim=(1, 2)))
    h = model["pool1"](out1.resp)
    assert torch.allclose(lp["gmm2"], model["gmm2"].cgmm(h, loss="loglik").score.mean(dim=(1, 2)))
    mc = model.log_prob(x, loss=None)["gmm1"]
    assert torch.all(mc <= lp["gmm1"] + 1e-5)  # a smoothed max-component score never beats the mixture


def test_evaluate_is_log_prob_and_classify_in_one_pass(shipped):
    model = DCGMM("demo", seed=0)
    model.fit(shipped.x_train[:400], shipped.y_train[:400], epochs=1, batch_size=50, seed=0)
    x = shipped.x_test[:23]
    scores, preds = model.evaluate(x, batch_size=10)
    lp = model.log_prob(x, batch_size=10)
    assert scores.keys() == lp.keys() and all(torch.equal(scores[k], lp[k]) for k in lp)
    assert torch.equal(preds, model.classify(x, batch_size=10))
    assert DCGMM([presets.GMM(3, 1, 4)], input_shape=(6, 6, 1)).evaluate(torch.rand(2, 6, 6, 1))[1] is None


def test_query_batches_keep_cpu_outputs_small_and_do_not_change_results(shipped):
    """The batched queries' default CPU batch keeps the largest layer output within CPU_BATCH_BYTES (preset D:
    26 x 26 x 25 float32 responsibilities, 67.6 KB an image -> 248 images; float64 -> 124); any batch gives the same
    bits (each image's forward is its own); a batch_size that is not a positive integer is refused by name."""
    from dcgmm_fast.model import CPU_BATCH_BYTES

    model = DCGMM("D", seed=0)
    x = shipped.x_test[:30]
    assert model._batch_size(x, None) == CPU_BATCH_BYTES // (26 * 26 * 25 * 4) == 248
    assert model._batch_size(x.double(), None) == 124 and model._batch_size(x, 7) == 7
    scores, preds = model.evaluate(x)
    scores7, preds7 = model.evaluate(x, batch_size=7)
    assert torch.equal(preds, preds7)
    for name in scores:
        assert torch.equal(scores[name], scores7[name]), name
    comps, comps7 = model.predict_components(x), model.predict_components(x, batch_size=7)
    assert all(torch.equal(comps[k], comps7[k]) for k in comps)
    # the classifier's logits are a BLAS product, whose rounding depends on the rows per call: equal to float32
    # rounding, not bit for bit
    torch.testing.assert_close(model.predict_proba(x), model.predict_proba(x, batch_size=7), rtol=2e-6, atol=1e-7)
    assert torch.equal(model.classify(x), model.classify(x, batch_size=7))
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(ValueError, match="batch_size: expected a positive integer"):
            model.classify(x, batch_size=bad)


def test_images_in_any_common_form(shipped):
    model = DCGMM("demo", seed=0)
    u8 = (shipped.x_test[:4, ..., 0] * 255).round().to(torch.uint8)
    a = model.log_prob(u8.numpy())["gmm1"]  # uint8 (N, H, W) numpy
    b = model.log_prob(u8[..., None].float() / 255)["gmm1"]  # float (N, H, W, C)
    assert torch.allclose(a, b)
    with pytest.raises(ValueError, match="x"):
        model.log_prob(torch.rand(2, 32, 32, 1))
    with pytest.raises(ValueError, match="NaN"):
        model.log_prob(torch.full((2, 28, 28), float("nan")))
    with pytest.raises(ValueError, match="y"):
        model.fit(u8, np.array([0, 1, 2, 10]), epochs=1, batch_size=2)


def test_classify_needs_a_classifier():
    model = DCGMM([presets.GMM(3, 1, 4)], input_shape=(6, 6, 1))
    with pytest.raises(ValueError, match="classifier"):
        model.classify(torch.rand(2, 6, 6, 1))
    model.fit(torch.rand(20, 6, 6, 1), epochs=1, batch_size=10, seed=0)  # no labels, no classifier: fine


def test_odd_arguments_are_refused_or_handled(shipped):
    from dcgmm_fast.model import DCGMM

    model = DCGMM("demo", seed=0)
    with pytest.raises(ValueError, match="classes"):
        model.sample(2, classes=[2.9])  # not truncated to class 2
    with pytest.raises(ValueError, match="n:"):
        model.sample(0)
    with pytest.raises(ValueError, match="guidance"):
        model.sample(2, guidance=-1.0)  # named even where no class is asked for
    with pytest.raises(ValueError, match="batch_size: expected a positive integer"):
        model.fit(shipped.x_train[:200], shipped.y_train[:200], epochs=1, batch_size=-1)
    assert model.classify(shipped.x_test[:0]).shape == (0,)
    assert all(v.shape == (0,) for v in model.log_prob(shipped.x_test[:0]).values())


def test_fit_shows_progress_unless_silenced(shipped, capsys):
    pytest.importorskip("tqdm")
    model = DCGMM([presets.GMM(3, 1, 4)], input_shape=(28, 28, 1), seed=0)
    model.fit(shipped.x_train[:40], epochs=1, batch_size=10, seed=0)
    err = capsys.readouterr().err
    assert "fit stack" in err and "4/4" in err
    model.fit(shipped.x_train[:40], epochs=1, batch_size=10, seed=0, verbose=False)
    assert capsys.readouterr().err == ""
