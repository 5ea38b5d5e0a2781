"""The dcgmm command as a user runs it (subprocesses in a temporary directory), checkpoints and resume."""
import json
import os
import subprocess
import sys

import pytest
import torch

from dcgmm_fast.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dcgmm_fast.model import DCGMM

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def dcgmm(*args, cwd):
    res = subprocess.run([sys.executable, "-m", "dcgmm_fast", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert res.returncode == 0, f"dcgmm {' '.join(args)} failed:\n{res.stderr[-3000:]}"
    return res


def png_size(path):
    raw = open(path, "rb").read(24)
    assert raw[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    dcgmm("train", "--preset", "demo", "--epochs", "1", "--out", "out", cwd=d)
    return d


def test_train_writes_checkpoints_and_metrics(trained_run):
    out = trained_run / "out"
    assert (out / "checkpoint.pt").exists() and (out / "checkpoint_epoch001.pt").exists()
    metrics = json.load(open(out / "train_metrics.json"))
    last = metrics["epochs"][-1]
    assert last["steps_done"] == 50 and set(last["test_layer_scores"]) == {"gmm1", "gmm2"}
    assert 0.0 <= last["test_accuracy"] <= 1.0 and metrics["plan"]["preset"] == "demo"


def test_sample_inpaint_eval_write_their_files(trained_run):
    d = trained_run
    res = dcgmm("sample", "--checkpoint", "out/checkpoint.pt", "--out", "out", "--n", "16", "--per-class", "4", cwd=d)
    sizes = json.loads(res.stdout.strip().splitlines()[-1])
    for name in ("samples.png", "samples_by_class.png"):
        assert png_size(d / "out" / name) == (sizes[name]["width"], sizes[name]["height"])
    # 4 columns of 28x28 images scaled 2x with 2 px padding: 4 * 58 + 2 = 234 wide
    assert png_size(d / "out" / "samples.png") == (234, 234)
    assert png_size(d / "out" / "samples_by_class.png") == (234, 10 * 58 + 2)
    dcgmm("inpaint", "--checkpoint", "out/checkpoint.pt", "--out", "out", "--n", "5", "--mask", "centre", cwd=d)
    assert png_size(d / "out" / "inpaint.png") == (5 * 58 + 2, 3 * 58 + 2)
    dcgmm("eval", "--checkpoint", "out/checkpoint.pt", "--out", "out", "--heldout-class", "0", cwd=d)
    metrics = json.load(open(d / "out" / "metrics.json"))
    assert {"test_accuracy", "layer_scores", "outlier_auroc"} <= set(metrics)
    assert set(metrics["layer_scores"]) == {"gmm1", "gmm2"} and 0 <= metrics["outlier_auroc"] <= 1


def test_help_for_every_command(tmp_path):
    for cmd in ([], ["train"], ["sample"], ["inpaint"], ["eval"]):
        res = dcgmm(*cmd, "--help", cwd=tmp_path)
        assert "usage: dcgmm" in res.stdout


def test_resume_gives_the_same_parameters(tmp_path):
    dcgmm("train", "--preset", "demo", "--epochs", "2", "--out", "full", cwd=tmp_path)
    dcgmm("train", "--preset", "demo", "--epochs", "2", "--stop-after", "1", "--out", "part", cwd=tmp_path)
    dcgmm("train", "--resume", "part/checkpoint.pt", "--out", "part", cwd=tmp_path)
    full, _ = load_checkpoint(str(tmp_path / "full" / "checkpoint.pt"))
    part, plan = load_checkpoint(str(tmp_path / "part" / "checkpoint.pt"))
    assert plan["epochs"] == 2 and int(part.steps_done) == 100
    for (name, a), (_, b) in zip(full.state_dict().items(), part.state_dict().items()):
        assert torch.equal(a, b), name
    assert len(json.load(open(tmp_path / "part" / "train_metrics.json"))["epochs"]) == 2


def test_bad_data_is_a_clear_error(tmp_path):
    res = subprocess.run([sys.executable, "-m", "dcgmm_fast", "train", "--data", "nowhere.npz", "--out", "o"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "nowhere.npz" in res.stderr and "Traceback" not in res.stderr


# ------------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_loads_with_weights_only(tmp_path):
    model = DCGMM("demo", seed=1)
    path = str(tmp_path / "c.pt")
    save_checkpoint(path, model, {"epochs": 3, "seed": 1})
    blob = torch.load(path, weights_only=True)
    assert blob["format"] == "dcgmm_fast-checkpoint-v1" and blob["train"]["epochs"] == 3
    loaded, plan = load_checkpoint(path)
    assert plan == {"epochs": 3, "seed": 1} and loaded.preset.name == "demo"
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_custom_stack_checkpoint_round_trip(tmp_path):
    from dcgmm_fast import presets

    model = DCGMM([presets.GMM((3, 2), 1, 4, mode="independent"), presets.Pool(), presets.Classifier()],
                  input_shape=(10, 9, 1), n_classes=3, seed=0)
    save_checkpoint(str(tmp_path / "c.pt"), model)
    loaded, _ = load_checkpoint(str(tmp_path / "c.pt"))
    assert loaded.specs == model.specs and loaded.input_shape == (10, 9, 1) and loaded.preset is None


def test_tampered_or_foreign_files_are_rejected(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(str(good), DCGMM("demo", seed=0))
    raw = good.read_bytes()
    cases = {
        "truncated.pt": raw[: len(raw) // 2],
        "garbage.pt": b"not a checkpoint at all" * 10,
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"format": "dcgmm_fast-checkpoint-v1", "x": Evil()}, tmp_path / "pickled-code.pt")
    for name in ("truncated.pt", "garbage.pt", "foreign.pt", "pickled-code.pt", "missing.pt"):
        with pytest.raises(CheckpointError, match=name):
            load_checkpoint(str(tmp_path / name))
