"""experiments/run.py and make_results.py: a miniature of every experiment (a few steps each, ~15 s in all) on the
shipped images, so the scripts keep working; the judge of sample quality (dcgmm_fast.quality)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from dcgmm_fast.quality import PixelJudge, nearest_distance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = ["classifier-B", "training-dynamics", "sampling", "class-conditional", "inpainting", "variants",
               "outliers", "flat-gmm", "tied-init", "sampling-C"]


def _run(*args, cwd):
    res = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiments")
    _run(os.path.join(ROOT, "experiments", "run.py"), "all", "--quick", "--data", "shipped", "--out", str(out / "r"),
         cwd=out)
    return out


def test_every_experiment_writes_metrics_and_figures(quick_results):
    for name in EXPERIMENTS:
        with open(quick_results / "r" / name / "metrics.json") as f:
            m = json.load(f)
        assert m["experiment"] == name and m["quick"] and m["seed"] == 0
        assert m["command"] == f"python experiments/run.py {name} --quick --data shipped --out {quick_results / 'r'}"
        assert m["machine"]["cpu_count"] >= 1 and m["wall_seconds"] >= 0
        for fig in m.get("figures", []):
            with open(quick_results / "r" / name / fig, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(quick_results / "r" / "class-conditional" / "metrics.json") as f:
        m = json.load(f)
    v = m["variants"]["guided-sharpened (default)"]
    assert 0 <= v["labelled_as_class"] <= 1 and len(v["per_class"]) == 10 and len(m["variants"]) == 4
    with open(quick_results / "r" / "outliers" / "metrics.json") as f:
        m = json.load(f)
    assert m["heldout_class"] == 0 and set(m) >= {"gmm1", "gmm2", "gmm3"}
    assert 0 <= m["gmm3"]["auroc"] <= 1


def test_an_experiment_is_reproducible_for_its_seed(quick_results):
    """The sampling experiment again (its model cached): the same numbers."""
    path = quick_results / "r" / "sampling" / "metrics.json"
    first = json.loads(path.read_text())
    _run(os.path.join(ROOT, "experiments", "run.py"), "sampling", "--quick", "--data", "shipped", "--out",
         str(quick_results / "r"), cwd=quick_results)
    again = json.loads(path.read_text())
    for key in ("plain_nearest_train_distance", "sharpened_nearest_train_distance", "plain_judge_labels"):
        assert first[key] == again[key]


def test_make_results_builds_the_page_from_the_metrics(quick_results):
    docs = quick_results / "docs"
    _run(os.path.join(ROOT, "experiments", "make_results.py"), "--results", str(quick_results / "r"), "--docs",
         str(docs), "--intro", "nowhere.md", cwd=quick_results)
    page = (docs / "results.md").read_text()
    for name in EXPERIMENTS:
        assert f"## {name}" in page
    figures = os.listdir(docs / "figures")
    assert "class-conditional_by_class_default.png" in figures
    for fig in figures:
        assert f"(figures/{fig})" in page
    m = json.loads((quick_results / "r" / "classifier-B" / "metrics.json").read_text())
    assert f"{100 * m['test_accuracy']:.1f}%" in page  # the numbers come from the metrics


def test_experiments_refuse_missing_data(tmp_path):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "run.py"), "sampling", "--data",
                          str(tmp_path / "none.npz")], capture_output=True, text=True)
    assert res.returncode == 2 and "--data" in res.stderr and "none.npz" in res.stderr


def test_pixel_judge_learns_separable_classes_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    centres = torch.rand(3, 1, 16, generator=g)
    x = (centres + 0.05 * torch.randn(3, 40, 16, generator=g)).reshape(120, 4, 4, 1)
    y = torch.arange(3).repeat_interleave(40)
    a = PixelJudge.fit(x, y, n_classes=3)
    b = PixelJudge.fit(x, y, n_classes=3)
    assert a.fraction_as(x, y) == 1.0 and torch.equal(a.weight, b.weight)
    assert a.fraction_as(x, (y + 1) % 3) == 0.0
    with pytest.raises(ValueError, match="y"):
        PixelJudge.fit(x, y[:5])


def test_nearest_distance_is_brute_force():
    g = torch.Generator().manual_seed(1)
    s, t = torch.rand(7, 5, 5, 1, generator=g), torch.rand(300, 5, 5, 1, generator=g)
    d = nearest_distance(s, t, chunk=64)
    brute = torch.stack([(t.reshape(300, -1) - v.reshape(1, -1)).norm(dim=1).min() for v in s])
    torch.testing.assert_close(d, brute)
    assert float(nearest_distance(t[:3], t).abs().max()) < 1e-3  # a copy of a training image is at distance ~0


def test_within_class_spread():
    from dcgmm_fast.quality import within_class_spread

    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [1.0, 1.0]])
    assert within_class_spread(x, torch.tensor([0, 0, 1, 1])) == pytest.approx(2.5)  # (5 + 0) / 2
