"""The dcgmm command as a user runs it (subprocesses in a temporary directory), checkpoints and resume."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
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
    assert (out / "checkpoint.pt").exists() and (out / "checkpoint_step0000050.pt").exists()
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]  # atomic writes leave no temporaries
    log = [json.loads(line) for line in open(out / "train_log.jsonl")]
    assert [e["step"] for e in log] == [10, 20, 30, 40, 50]
    assert set(log[-1]["score"]) == {"gmm1", "gmm2", "gmm3"} and "classifier_accuracy" in log[-1]
    metrics = json.load(open(out / "train_metrics.json"))
    last = metrics["epochs"][-1]
    assert last["steps_done"] == 50 and set(last["test_layer_scores"]) == {"gmm1", "gmm2", "gmm3"}
    assert 0.0 <= last["test_accuracy"] <= 1.0 and metrics["plan"]["preset"] == "demo"


def test_sample_inpaint_eval_write_their_files(trained_run):
    d = trained_run
    res = dcgmm("sample", "--checkpoint", "out/checkpoint.pt", "--out", "out", "--n", "16", "--per-class", "4",
                "--sharpen", "gmm1=3:0.5,gmm2=2:0.1", "--top-s", "2", cwd=d)
    sizes = json.loads(res.stdout.strip().splitlines()[-1])
    for name in ("samples.png", "samples_by_class.png"):
        assert png_size(d / "out" / name) == (sizes[name]["width"], sizes[name]["height"])
    # 4 columns of 28x28 images scaled 2x with 2 px padding: 4 * 58 + 2 = 234 wide
    assert png_size(d / "out" / "samples.png") == (234, 234)
    assert png_size(d / "out" / "samples_by_class.png") == (96 + 234, 10 * 58 + 2)  # a column of class names
    from PIL import Image

    grid = np.asarray(Image.open(d / "out" / "samples_by_class.png"))
    assert grid[:, :96].min() < 128  # the names are drawn (dark text on white)
    plan = torch.load(d / "out" / "checkpoint.pt", weights_only=True)["train"]
    assert plan["class_names"][0] == "T-shirt/top" and len(plan["class_names"]) == 10
    dcgmm("inpaint", "--checkpoint", "out/checkpoint.pt", "--out", "out", "--n", "5", "--mask", "centre", cwd=d)
    assert png_size(d / "out" / "inpaint.png") == (5 * 58 + 2, 3 * 58 + 2)
    dcgmm("eval", "--checkpoint", "out/checkpoint.pt", "--out", "out", cwd=d)
    metrics = json.load(open(d / "out" / "metrics.json"))
    assert {"test_accuracy", "layer_scores"} <= set(metrics) and "outlier_auroc" not in metrics
    assert set(metrics["layer_scores"]) == {"gmm1", "gmm2", "gmm3"}


def test_outlier_experiment_trains_without_the_class_and_eval_refuses_a_trained_one(trained_run, capsys,
                                                                                      monkeypatch):
    """`dcgmm train --classes 1-9` then `dcgmm eval --heldout-class 0`: an AUROC of class 0 against the trained
    classes (and the original's 100-threshold AUC beside it); a model trained on class 0 gets an error instead."""
    from dcgmm_fast import cli

    monkeypatch.chdir(trained_run)
    assert cli.main(["eval", "--checkpoint", "out/checkpoint.pt", "--out", "out", "--heldout-class", "0"]) == 2
    assert "the model was trained on class 0 (every class)" in capsys.readouterr().err
    assert cli.main(["train", "--preset", "demo", "--epochs", "0.5", "--classes", "1-9", "--out", "no0"]) == 0
    capsys.readouterr()
    plan = torch.load("no0/checkpoint.pt", weights_only=True)["train"]
    assert plan["classes"] == list(range(1, 10))
    assert cli.main(["eval", "--checkpoint", "no0/checkpoint.pt", "--out", "no0", "--heldout-class", "0"]) == 0
    metrics = json.load(open("no0/metrics.json"))
    assert 0 <= metrics["outlier_auroc"] <= 1 and abs(metrics["outlier_auc_original"] - metrics["outlier_auroc"]) < 0.05
    assert "trained classes [1, 2, 3, 4, 5, 6, 7, 8, 9]" in metrics["outlier"]
    assert cli.main(["eval", "--checkpoint", "no0/checkpoint.pt", "--out", "no0", "--heldout-class", "3"]) == 2
    assert cli.main(["train", "--classes", "1-x", "--out", "bad"]) == 2
    assert "--classes: expected class ids" in capsys.readouterr().err
    assert cli.main(["sample", "--checkpoint", "no0/checkpoint.pt", "--out", "no0", "--sharpen", "gmm7=3:1"]) == 2
    assert "--sharpen: 'gmm7' is not a GMM layer" in capsys.readouterr().err
    assert cli.main(["sample", "--checkpoint", "no0/checkpoint.pt", "--out", "no0", "--guidance", "-2"]) == 2
    assert "--guidance: expected a number >= 0 or 'off'" in capsys.readouterr().err
    assert cli.main(["sample", "--checkpoint", "no0/checkpoint.pt", "--out", "no0", "--n", "2", "--per-class", "2",
                     "--sharpen", "off", "--guidance", "off"]) == 0


def test_show_writes_prototypes_and_curves(trained_run, capsys, monkeypatch):
    """`dcgmm show`: a prototype grid per GMM layer (the first layer's means as 3x3 patches, gmm2's components
    back-projected to 28x28 images) and the curves of train_log.jsonl."""
    from dcgmm_fast import cli
    from dcgmm_fast.checkpoint import load_checkpoint
    from dcgmm_fast.show import prototypes

    monkeypatch.chdir(trained_run)
    assert cli.main(["show", "--checkpoint", "out/checkpoint.pt", "--out", "shown"]) == 0
    sizes = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(sizes) == {"prototypes_gmm1.png", "prototypes_gmm2.png", "prototypes_gmm3.png", "curves.png"}
    for name, wh in sizes.items():
        assert png_size(trained_run / "shown" / name) == (wh["width"], wh["height"])
    model, _ = load_checkpoint("out/checkpoint.pt")
    p1, p2 = prototypes(model, "gmm1"), prototypes(model, "gmm2")
    centre = model["gmm1"].mu.detach()[676 // 2]  # independent mode: (P, K, D), the centre position's GMM
    assert p1.shape == (25, 3, 3, 1) and torch.allclose(p1, centre.reshape(25, 3, 3, 1).clamp(0, 1))
    assert p2.shape == (25, 28, 28, 1) and float(p2.std(0).mean()) > 0  # different components, different images
    assert cli.main(["show", "--checkpoint", "out/checkpoint.pt", "--out", "shown", "--log", "nowhere.jsonl"]) == 2


def test_help_for_every_command(tmp_path):
    for cmd in ([], ["train"], ["sample"], ["inpaint"], ["eval"], ["show"], ["convert"]):
        res = dcgmm(*cmd, "--help", cwd=tmp_path)
        assert "usage: dcgmm" in res.stdout


def _same_state(a, b):
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_resume_and_a_kill_during_the_saves(tmp_path):
    """Resume continues bit-identically, next to the checkpoint; a run killed while it writes its checkpoint
    (writes slowed by the test hook) leaves the previous checkpoint and metrics whole, and resumes exactly."""
    dcgmm("train", "--preset", "demo", "--epochs", "2", "--out", "full", cwd=tmp_path)
    full, _ = load_checkpoint(str(tmp_path / "full" / "checkpoint.pt"))
    # killed inside the write of checkpoint.pt at step 100 (its temporary file exists, the rename has not happened)
    env = dict(os.environ, OMP_NUM_THREADS="2", DCGMM_TEST_SLOW_WRITES="1")
    proc = subprocess.Popen([sys.executable, "-m", "dcgmm_fast", "train", "--preset", "demo", "--epochs", "2",
                             "--out", "killed"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    out = tmp_path / "killed"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        names = os.listdir(out) if out.exists() else []
        if "checkpoint_step0000100.pt" in names and any(n.startswith(".checkpoint.pt.") for n in names):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    model, plan = load_checkpoint(str(out / "checkpoint.pt"))  # the previous good copy
    assert int(model.steps_done) == 50
    assert [e["steps_done"] for e in json.load(open(out / "train_metrics.json"))["epochs"]] == [50]
    res = dcgmm("train", "--resume", "killed/checkpoint.pt", "--seed", "7", cwd=tmp_path)  # no --out
    assert "ignored: --seed 7" in res.stderr
    resumed, plan = load_checkpoint(str(out / "checkpoint.pt"))
    assert int(resumed.steps_done) == 100 and plan["seconds"] > 0
    _same_state(full, resumed)
    metrics = json.load(open(out / "train_metrics.json"))
    assert [e["steps_done"] for e in metrics["epochs"]] == [50, 100]
    steps = [json.loads(line)["step"] for line in open(out / "train_log.jsonl")]
    assert steps == list(range(10, 101, 10))
    assert not (tmp_path / "runs").exists()  # nothing went to the default folder
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]  # the killed write's temporary is cleaned up


def test_sigint_finishes_the_step_saves_and_says_how_to_resume(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "dcgmm_fast", "train", "--preset", "demo", "--epochs", "3",
                             "--out", "o"], cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (tmp_path / "o" / "checkpoint_step0000050.pt").exists():
        time.sleep(0.05)
    time.sleep(0.3)  # inside the second epoch
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "dcgmm train --resume" in err
    model, _ = load_checkpoint(str(tmp_path / "o" / "checkpoint.pt"))
    assert 50 < int(model.steps_done) < 150  # the partial epoch is saved
    steps = [json.loads(line)["step"] for line in open(tmp_path / "o" / "train_log.jsonl")]
    assert max(steps) <= int(model.steps_done)


@pytest.mark.parametrize("args,name", [
    (["--epochs", "0"], "--epochs"), (["--epochs", "-1"], "--epochs"), (["--batch-size", "-5"], "--batch-size"),
    (["--batch-size", "0"], "--batch-size"), (["--batch-size", "6000"], "--batch-size"),
    (["--stop-after", "0"], "--stop-after"), (["--epochs", "0.001"], "nothing to train"),
    (["--device", "cuda:7"], "--device"), (["--device", "warp"], "--device"), (["--out", "afile"], "--out"),
])
def test_train_that_cannot_train_exits_2_naming_the_argument(tmp_path, capsys, monkeypatch, args, name):
    from dcgmm_fast import cli

    (tmp_path / "afile").write_text("x")
    monkeypatch.chdir(tmp_path)
    if "--out" not in args:
        args = args + ["--out", "o"]
    assert cli.main(["train", "--preset", "demo", *args]) == 2
    err = capsys.readouterr().err
    assert name in err and "Traceback" not in err
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


def test_sample_and_inpaint_arguments(trained_run, capsys, tmp_path):
    from dcgmm_fast import cli

    ckpt = str(trained_run / "out" / "checkpoint.pt")
    assert cli.main(["sample", "--checkpoint", ckpt, "--n", "-1", "--out", str(tmp_path / "s")]) == 2
    assert "--n" in capsys.readouterr().err
    assert cli.main(["sample", "--checkpoint", ckpt, "--device", "cuda:7", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "--device" in err and "checkpoint" not in err.split("error:")[1][:40]
    # a new output folder is created, not a traceback
    assert cli.main(["inpaint", "--checkpoint", ckpt, "--n", "2", "--out", str(tmp_path / "new" / "dir")]) == 0
    assert (tmp_path / "new" / "dir" / "inpaint.png").exists()
    capsys.readouterr()
    assert cli.main(["inpaint", "--checkpoint", ckpt, "--n", "2", "--mode", "mpe", "--out", str(tmp_path / "m")]) == 0
    assert '"mode": "mpe"' in capsys.readouterr().out and (tmp_path / "m" / "inpaint.png").exists()


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


def test_broken_inputs_are_one_line_errors(tmp_path, capsys, monkeypatch):
    """Files that used to escape as tracebacks: an npz with an empty split, channels-first images, checkpoints
    without a training plan, with batch_size 0, with float16 parameters."""
    import numpy as np

    from dcgmm_fast import cli

    monkeypatch.chdir(tmp_path)
    z = lambda *s: np.zeros(s, np.uint8)  # noqa: E731
    np.savez("empty.npz", x_train=z(0, 28, 28), y_train=np.zeros(0, np.int64), x_test=z(5, 28, 28),
             y_test=np.zeros(5, np.int64))
    np.savez("nchw.npz", x_train=z(20, 1, 28, 28), y_train=np.zeros(20, np.int64), x_test=z(5, 1, 28, 28),
             y_test=np.zeros(5, np.int64))
    model = DCGMM("demo", seed=0)
    save_checkpoint("noplan.pt", model, {})
    save_checkpoint("bs0.pt", model, {"epochs": 1, "batch_size": 0, "seed": 0, "data": "shipped"})
    blob = torch.load("bs0.pt", weights_only=True)
    blob["config"]["dtype"] = "float16"
    torch.save(blob, "f16.pt")
    cases = [(["train", "--data", "empty.npz"], "empty.npz"), (["train", "--data", "nchw.npz"], "nchw.npz"),
             (["train", "--resume", "noplan.pt"], "noplan.pt"), (["train", "--resume", "bs0.pt"], "bs0.pt"),
             (["train", "--resume", "f16.pt"], "f16.pt"), (["sample", "--checkpoint", "f16.pt"], "f16.pt")]
    np.savez("zerod.npz", x_train=np.array(1.0), y_train=np.array(1), x_test=np.array(1.0), y_test=np.array(1))
    cases += [(["train", "--data", "zerod.npz"], "zerod.npz"), (["train", "--backend", "cuda"], "backend 'cuda'")]
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read per call: CPU tensors need the interpreter
    cases += [(["train", "--backend", "triton", "--epochs", "1"], "TRITON_INTERPRET=1")]
    for argv, name in cases:
        assert cli.main([*argv, "--out", "o"]) == 2, argv
        err = capsys.readouterr().err
        assert name in err and "error:" in err and "Traceback" not in err, (argv, err)
    with pytest.raises(ValueError, match="integer class labels"):  # 2.9 is not truncated to class 2
        model.fit(torch.rand(20, 28, 28), torch.full((20,), 2.9), epochs=1, batch_size=10)
