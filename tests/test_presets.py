"""dcgmm_fast.presets: every row of design.md's table builds with the table's shapes, readers and settings."""
import pytest

from dcgmm_fast import presets
from dcgmm_fast.layers import LinearClassifier
from dcgmm_fast.model import DCGMM

# design.md's presets table, restated here as the expectation: layer output shapes, modes, reads, lr
TABLE = {
    "A": ([(1, 1, 49), (10,)], "S", "gmm1", 0.01),
    "B": ([(11, 11, 49), (1, 1, 49), (10,)], "IS", "gmm2", 0.01),
    "B-class": ([(13, 13, 121), (1, 1, 16), (10,)], "IS", "gmm1", 0.05),
    "C": ([(21, 21, 49), (11, 11, 49), (1, 1, 49), (10,)], "IS", "pool1", 0.05),
    "D": ([(26, 26, 25), (13, 13, 25), (10, 10, 25), (5, 5, 25), (1, 1, 25), (10,)], "III", "pool1", 0.05),
    "E": ([(26, 26, 25), (12, 12, 25), (1, 1, 49), (10,)], "IIS", "gmm3", 0.01),
    "F": ([(26, 26, 25), (12, 12, 25), (5, 5, 25), (1, 1, 49), (10,)], "SSSS", "gmm4", 0.01),
    "G": ([(26, 26, 25), (13, 13, 25), (11, 11, 25), (6, 6, 25), (4, 4, 25), (2, 2, 25), (1, 1, 25), (10,)],
          "SSSS", "gmm2", 0.05),
    "svhn": ([(5, 5, 64), (1, 1, 100), (10,)], "IS", "gmm2", 0.01),
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_preset_builds_with_the_tables_shapes(name):
    shapes, modes, reads, lr = TABLE[name]
    model = DCGMM(name, seed=0)
    assert model.input_shape == ((32, 32, 3) if name == "svhn" else (28, 28, 1))
    assert [layer.out_shape for layer in model.layers] == [tuple(s) for s in shapes]
    gmms = list(model.gmm_layers().values())
    assert "".join("I" if g.mode == "independent" else "S" for g in gmms) == modes
    for g in gmms:  # presets run the original's global pi normalisation in independent mode
        assert g.pi_norm == ("global" if g.mode == "independent" else "position")
        assert g.eps0 == 0.011 and g.eps_inf == 0.01 and g.window == 100 and g.som_sigma_inf == 0.01
    clf = model.classifier
    assert isinstance(clf, LinearClassifier) and clf.reads == reads and clf.lr == lr
    assert clf.in_shape == model[reads].out_shape
    assert presets.PRESETS[name].out_shapes == tuple(tuple(s) for s in shapes)


def test_preset_specific_settings():
    a = DCGMM("A")["gmm1"]
    assert (a.lambda_pi, a.lambda_sigma, a.lambda_mu) == (0.5, 0.5, 1.0)
    for name in ("F", "G"):
        assert all(g.lambda_pi == 0.0 for g in DCGMM(name).gmm_layers().values())
    assert [g.wait for g in DCGMM("F").gmm_layers().values()] == [0.0, 0.1, 0.2, 0.3]
    assert [g.wait for g in DCGMM("D").gmm_layers().values()] == [0.0, 0.1, 0.2]
    assert [g.top_s for g in DCGMM("D").gmm_layers().values()] == [2, 2, 3]
    assert DCGMM("E")["gmm1"].som_sigma0 == pytest.approx(0.25 * (2 * 25) ** 0.5)
    assert {n: presets.PRESETS[n].epochs for n in TABLE} == {
        "A": 80, "B": 80, "B-class": 15, "C": 15, "D": 20, "E": 80, "F": 3, "G": 30, "svhn": 120}


def test_demo_preset_anneals_fast():
    demo = DCGMM("demo")
    assert all(g.window == 5 for g in demo.gmm_layers().values())
    assert [layer.out_shape for layer in demo.layers] == list(presets.PRESETS["demo"].out_shapes)


def test_custom_stack_from_specs():
    specs = [presets.GMM(5, 5, 4, mode="independent"), presets.Pool(2, 1), presets.GMM(2, 1, 9),
             presets.Classifier()]
    model = DCGMM(specs, input_shape=(20, 20, 1), n_classes=3)
    assert model.names == ["gmm1", "pool1", "gmm2", "classifier"]
    assert [m.out_shape for m in model.layers] == [(4, 4, 4), (3, 3, 4), (2, 2, 9), (3,)]
    assert model.classifier.reads == "gmm2" and model["gmm1"].pi_norm == "position"


@pytest.mark.parametrize(
    "specs,match",
    [([presets.Classifier(), presets.GMM(3, 1, 4)], "last"),
     ([presets.GMM(3, 1, 4), presets.Classifier("pool9")], "reads"),
     ([presets.GMM(30, 1, 4)], "kernel"),
     ([presets.GMM(3, 1, 5)], "n_components"),
     (["gmm"], "specs")],
)
def test_bad_stacks_raise(specs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        DCGMM(specs, input_shape=(28, 28, 1))


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset"):
        DCGMM("Z")


# ------------------------------------------------------------------------------------------------ stack files
def _stack_file(tmp_path, config):
    import json

    path = tmp_path / "stack.json"
    path.write_text(json.dumps(config))
    return str(path)


GOOD_STACK = {"input_shape": [28, 28, 1], "n_classes": 10, "layers": [
    {"kind": "GMM", "kernel": 3, "stride": 1, "n_components": 16, "mode": "independent", "window": 5},
    {"kind": "Pool", "kernel": [2, 2]}, {"kind": "Classifier", "reads": "pool1", "lr": 0.05}]}


@pytest.mark.parametrize("change, match", [
    (lambda c: c["layers"][0].pop("kernel"), r"layers\[0\].kernel: missing"),
    (lambda c: c["layers"][0].update(kernal=3), r"layers\[0\].kernal: unknown field of GMM"),
    (lambda c: c["layers"][1].update(kind="Conv"), r"layers\[1\].kind: expected one of"),
    (lambda c: c["layers"][0].update(stride=[1, 0]), r"layers\[0\].stride: expected a positive int"),
    (lambda c: c["layers"][0].update(n_components=2.5), r"layers\[0\].n_components: expected a positive int"),
    (lambda c: c["layers"][0].update(n_components=15), r"layers\[0\]: n_components: loss 'mc' needs a perfect"),
    (lambda c: c["layers"][0].update(mode=3), r"layers\[0\].mode: expected a string"),
    (lambda c: c["layers"][0].update(tied_init=1), r"layers\[0\].tied_init: expected true or false"),
    (lambda c: c["layers"][0].update(sharpen_iterations=-1), r"layers\[0\]: sharpen_iterations: expected an int >= 0"),
    (lambda c: c["layers"][0].update(eps0=None), r"layers\[0\].eps0: expected a value, got null"),
    (lambda c: c["layers"][2].update(reads="gmm9"), r"layers\[2\]: stack: the classifier reads 'gmm9'"),
    (lambda c: c.update(input_shape=[28, 28]), r"input_shape: expected \[H, W, C\]"),
    (lambda c: c.update(layers=[]), r"layers: expected a non-empty list"),
    (lambda c: c.update(epochs=3), r"epochs: unknown field"),
])
def test_stack_files_name_the_bad_field(tmp_path, change, match):
    import copy

    from dcgmm_fast.checkpoint import load_stack

    config = copy.deepcopy(GOOD_STACK)
    change(config)
    with pytest.raises(ValueError, match=r"stack.json: " + match):
        load_stack(_stack_file(tmp_path, config))


def test_stack_file_trains_through_the_cli(tmp_path, monkeypatch):
    """`dcgmm train --stack stack.json`: the checkpoint holds that architecture (and loads without the file)."""
    from dcgmm_fast import cli
    from dcgmm_fast.checkpoint import load_checkpoint, load_stack

    path = _stack_file(tmp_path, GOOD_STACK)
    assert load_stack(path)["layers"][0]["n_components"] == 16
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--stack", path, "--epochs", "0.04", "--out", "o"]) == 0
    model, plan = load_checkpoint("o/checkpoint.pt")
    assert [type(s).__name__ for s in model.specs] == ["GMM", "Pool", "Classifier"] and plan["preset"] is None
    assert model["gmm1"].mode == "independent" and model["gmm1"].n_components == 16 and int(model.steps_done) == 2
    assert cli.main(["train", "--stack", path, "--preset", "demo", "--out", "o"]) == 2
