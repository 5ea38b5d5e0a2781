"""The conveniences users of scikit-learn, pycave and probabilistic-circuit libraries expect (issue 24): marginal
queries, MPE in-painting, component assignments, the scikit-learn calls, parameters in their usual forms, save /
load, and PNGs without Pillow."""
import io
import math
import sys

import numpy as np
import pytest
import torch

from dcgmm_fast import presets
from dcgmm_fast.model import DCGMM
from dcgmm_fast.png import encode_png

from conftest import rel_err

ONE_LAYER = [presets.GMM(4, 2, 9, mode="independent", loss="loglik")]
STACK = [presets.GMM(3, 1, 16), presets.Pool(), presets.GMM(4, 2, 9, wait=0.0), presets.Classifier("pool1", 0.1)]


@pytest.fixture(scope="module")
def trained(shipped):
    model = DCGMM(STACK, seed=0, dtype=torch.float64)
    return model.fit(shipped.x_train[:600], shipped.y_train[:600], epochs=1, seed=0, verbose=False)


def _random_mask(shape, seed, p=0.5):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < p


def test_fit_returns_the_model_and_keeps_the_history(trained):
    assert isinstance(trained, DCGMM)
    assert trained.history_.steps == 6 and len(trained.history_.score["gmm1"]) == 6


def test_marginal_log_prob_with_an_all_true_mask_equals_the_plain_one(trained, shipped):
    x = shipped.x_test[:20]
    plain = trained.log_prob(x)
    masked = trained.log_prob(x, mask=torch.ones(28, 28, dtype=torch.bool))
    for name in plain:
        assert torch.equal(plain[name], masked[name]), name


def test_marginal_log_prob_is_the_lower_dimensional_gmm(shipped, fresh_seed):
    """One independent layer, float64: each patch's score over its observed entries equals an explicit GMM of those
    entries alone (means and variances restricted to them), averaged over positions."""
    model = DCGMM(ONE_LAYER, seed=fresh_seed, dtype=torch.float64)
    layer = model.layers[0]
    with torch.no_grad():  # move the parameters off their initial values, onto the data's scale
        g = torch.Generator().manual_seed(fresh_seed)
        layer.mu.copy_(torch.rand(layer.mu.shape, generator=g, dtype=torch.float64))
        layer.sigma.mul_(0.3 + torch.rand(layer.sigma.shape, generator=g, dtype=torch.float64))
        layer.pi_logits.copy_(torch.randn(layer.pi_logits.shape, generator=g, dtype=torch.float64))
    x = shipped.x_test[:3].double()
    mask = _random_mask((3, 28, 28), fresh_seed, 0.6)
    mask[0, :, :14] = False  # whole patches unobserved in image 0
    got = model.log_prob(x, mask=mask)["gmm1"]
    from dcgmm_fast.geometry import patches

    xp = patches(x, 4, 2).reshape(3, -1, 16)
    mp = patches(mask[..., None].double(), 4, 2).reshape(3, -1, 16) > 0.5
    mu, var, w = layer.mu.detach(), layer.variance, layer.weights  # (P, K, D), (P, K, D), (P, K)
    expect = torch.zeros(3, dtype=torch.float64)
    for n in range(3):
        total = 0.0
        for p in range(xp.shape[1]):
            o = mp[n, p]
            if not bool(o.any()):
                continue  # log sum_k pi_k = 0
            dens = torch.distributions.Normal(mu[p][:, o], var[p][:, o].sqrt()).log_prob(xp[n, p, o]).sum(-1)
            total += float(torch.logsumexp(dens + w[p].log(), 0))
        expect[n] = total / xp.shape[1]
    assert rel_err(got, expect) < 1e-10


def test_marginal_upper_layers_score_the_bottom_posterior(trained, shipped):
    x = shipped.x_test[:8]
    mask = _random_mask((8, 28, 28), 1, 0.7)
    out = trained.log_prob(x, mask=mask)
    assert set(out) == {"gmm1", "gmm2"} and all(v.shape == (8,) and torch.isfinite(v).all() for v in out.values())
    fewer = trained.log_prob(x, mask=mask & _random_mask((8, 28, 28), 2, 0.5))["gmm1"]
    assert bool((fewer > out["gmm1"]).float().mean() > 0.5)  # fewer observed dims: higher marginal density


def test_mpe_inpainting_is_deterministic_and_keeps_known_pixels(trained, shipped):
    x = shipped.x_test[:6].double()
    mask = torch.ones(28, 28, dtype=torch.bool)
    mask[:, 14:] = False
    a = trained.inpaint(x, mask, mode="mpe")
    b = trained.inpaint(x, mask, mode="mpe")
    assert torch.equal(a, b)
    assert torch.equal(a[:, :, :14], x[:, :, :14])
    assert float(a[:, :, 14:].std()) > 0.01 and bool(((a >= 0) & (a <= 1)).all())
    with pytest.raises(ValueError, match="mode"):
        trained.inpaint(x, mask, mode="best")


def test_predict_components_are_the_argmax_of_the_responsibilities(trained, shipped):
    x = shipped.x_test[:5]
    comps = trained.predict_components(x)
    outs = trained.forward(x)
    for name in ("gmm1", "gmm2"):
        assert comps[name].dtype == torch.int64 and torch.equal(comps[name], outs[name].argmax(-1))


def test_scikit_learn_calls(trained, shipped):
    x = shipped.x_test[:30]
    proba = trained.predict_proba(x)
    assert proba.shape == (30, 10) and torch.allclose(proba.sum(1), torch.ones(30, dtype=proba.dtype))
    assert torch.equal(trained.predict(x), proba.argmax(1))
    s = trained.score_samples(x)
    assert s.shape == (30,) and torch.equal(s, trained.outlier_scores(x))
    assert math.isclose(trained.score(x), float(s.double().mean()))


def test_parameters_in_their_usual_forms(trained):
    layer = trained.layers[0]
    assert torch.allclose(layer.stddev, 1 / layer.sigma.detach())
    assert torch.allclose(layer.variance, layer.stddev ** 2)
    assert torch.allclose(layer.weights.sum(-1), torch.ones((), dtype=layer.weights.dtype))


def test_save_load_round_trip(trained, shipped, tmp_path):
    path = str(tmp_path / "m.pt")
    trained.save(path)
    back = DCGMM.load(path)
    a, b = trained.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(back.predict(shipped.x_test[:10]), trained.predict(shipped.x_test[:10]))
    from dcgmm_fast.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="nowhere.pt"):
        DCGMM.load(str(tmp_path / "nowhere.pt"))


@pytest.mark.parametrize("shape", [(7, 5), (6, 9, 1), (4, 3, 3)])
def test_png_writer_matches_pillow_pixel_for_pixel(shape):
    Image = pytest.importorskip("PIL.Image")
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    with Image.open(io.BytesIO(encode_png(pixels))) as img:
        back = np.asarray(img)
    assert np.array_equal(back, pixels.reshape(back.shape))
    with pytest.raises(TypeError, match="uint8"):
        encode_png(pixels.astype(np.float32))


def test_grids_are_written_without_pillow(tmp_path, monkeypatch):
    """A machine without Pillow: PNG grids still come out (labels left out with a warning)."""
    monkeypatch.setitem(sys.modules, "PIL", None)
    from dcgmm_fast.images import save_grid

    path = tmp_path / "g.png"
    with pytest.warns(UserWarning, match="pip install pillow"):
        size = save_grid(str(path), torch.rand(4, 5, 5, 1), 2, row_labels=["a", "b"])
    monkeypatch.delitem(sys.modules, "PIL")
    Image = pytest.importorskip("PIL.Image")
    with Image.open(path) as img:
        assert img.size == size


# ------------------------------------------------------------------------------------------ init from data
@pytest.mark.parametrize("mode", ["shared", "independent"])
@pytest.mark.parametrize("method", ["data", "kmeans++"])
def test_init_from_data_puts_the_means_on_input_patches(method, mode, shipped):
    """Before the first step every mean is one of the layer's input patches (per position in independent mode);
    k-means++ picks distinct ones; the upper layer's means are patches of the responsibilities below."""
    from dcgmm_fast import init
    from dcgmm_fast.geometry import patches

    stack = [presets.GMM(3, 1, 16, mode=mode, init=method), presets.Pool(),
             presets.GMM(4, 2, 9, init=method, loss="loglik")]
    model = DCGMM(stack, seed=0, dtype=torch.float64)
    x = shipped.x_train[:200].double()
    init.init_from_data(list(model.layers), x, seed=0)
    layer = model.layers[0]
    p = patches(x, 3, 1).reshape(200, -1, 9)
    mu = layer.mu.detach()
    def nearest(a, b):  # exact squared distance of each row of a to its nearest row of b
        return ((a[:, None, :] - b[None]) ** 2).sum(-1).min(1).values

    if mode == "shared":
        d = nearest(mu, p.reshape(-1, 9))
    else:
        d = torch.stack([nearest(mu[q], p[:, q]) for q in range(mu.shape[0])])
    assert float(d.max()) == 0.0
    if method == "kmeans++" and mode == "shared":
        assert torch.unique(mu, dim=0).shape[0] == 16
    with torch.no_grad():
        h = model.layers[1](model.layers[0].cgmm(x, check=False).resp)
    top = model.layers[2].mu.detach()
    assert float(nearest(top, patches(h, 4, 2).reshape(-1, top.shape[1])).max()) == 0.0


def test_fit_initialises_from_data_once(shipped):
    model = DCGMM([presets.GMM(3, 1, 16, init="data")], seed=0, dtype=torch.float64)
    before = model.layers[0].mu.detach().clone()
    model.fit(shipped.x_train[:200], epochs=1, batch_size=100, seed=0, verbose=False)
    assert float(before.abs().max()) <= 0.1 + 1e-12 and float(model.layers[0].mu.detach().abs().max()) > 0.5
    with pytest.raises(ValueError, match="init"):
        DCGMM([presets.GMM(3, 1, 16, init="zeros")])


# ------------------------------------------------------------------------------------------ configuration
def test_overrides_change_fields_and_name_bad_keys():
    p = presets.override("D", {"gmm2.n_components": 64, "gmm.sigma_min": 0.05, "epochs": 2.5,
                               "classifier.lr": 0.1})
    gmms = [s for s in p.layers if isinstance(s, presets.GMM)]
    assert gmms[1].n_components == 64 and all(g.sigma_min == 0.05 for g in gmms) and p.epochs == 2.5
    assert p.layers[-1].lr == 0.1 and presets.get_preset("D").layers[2].n_components == 25  # a copy
    model = DCGMM(p)
    assert model.layers[2].n_components == 64 and model.layers[0].sigma_min == 0.05
    for key, value, match in (("gmm7.n_components", 4, "no layer 'gmm7'"), ("gmm1.colour", 1, "no field"),
                              ("gmm1.n_components", "many", "expected an int"), ("nonsense", 1, "LAYER.FIELD")):
        with pytest.raises(ValueError, match=match):
            presets.override("D", {key: value})


def test_cli_set_lands_in_the_checkpoint(tmp_path):
    from dcgmm_fast import cli
    from dcgmm_fast.checkpoint import load_checkpoint

    out = tmp_path / "run"
    assert cli.main(["train", "--preset", "demo", "--set", "gmm1.n_components=16", "--set", "gmm.sigma_min=0.02",
                     "--epochs", "0.02", "--out", str(out), "--device", "auto"]) == 0
    model, _ = load_checkpoint(str(out / "checkpoint.pt"))
    assert model.layers[0].n_components == 16 and model.layers[2].sigma_min == 0.02
    assert cli.main(["train", "--preset", "demo", "--set", "gmm1.n_components", "--out", str(out)]) == 2
    assert cli.main(["train", "--resume", str(out / "checkpoint.pt"), "--set", "epochs=3"]) == 2


def test_callbacks_log_and_tensorboard(tmp_path, shipped):
    import json

    from dcgmm_fast import callbacks

    class Writer:
        def __init__(self):
            self.rows = []

        def add_scalar(self, tag, value, step):
            self.rows.append((tag, value, step))

    model = DCGMM(STACK, seed=0)
    writer = Writer()
    log = str(tmp_path / "train_log.jsonl")
    cb = callbacks.chain(callbacks.JsonlLog(log, model, every=2), None,
                         callbacks.TensorBoard(str(tmp_path), model, every=3, writer=writer))
    model.fit(shipped.x_train[:500], shipped.y_train[:500], epochs=1, seed=0, callback=cb, verbose=False)
    with open(log) as f:
        lines = [json.loads(line) for line in f]
    assert [e["step"] for e in lines] == [2, 4, 5]
    assert set(lines[0]) == {"step", "seconds", "score", "som_sigma", "eps", "classifier_loss", "classifier_accuracy"}
    assert set(lines[0]["score"]) == {"gmm1", "gmm2"}
    assert {t for t, _, s in writer.rows if s == 3} >= {"score/gmm1", "som_sigma/gmm2", "eps/gmm1", "classifier/loss"}
    if "tensorboard" not in sys.modules:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            with pytest.raises(ImportError, match="pip install tensorboard"):
                callbacks.TensorBoard(str(tmp_path), model)
