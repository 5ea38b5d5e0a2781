"""Data sources: memory-mapped .npy / .npz streamed through a DataLoader, image folders, layouts, the schedule."""
import json
import os
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dcgmm_fast import data
from dcgmm_fast.data import DataError
from dcgmm_fast.model import DCGMM
from dcgmm_fast.schedule import Schedule
from dcgmm_fast.sources import ArrayImages, convert_npz, open_npz, read_image_folder


@pytest.fixture(scope="module")
def shipped_uint8():
    with np.load(data.SHIPPED_FASHION_MNIST) as f:
        return {k: f[k] for k in f.files}


# ------------------------------------------------------------------------------------------------ schedule
def test_schedule_is_the_in_memory_order_and_shares_it():
    s = Schedule(1000, 50, seed=3)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(s.order(0), torch.randperm(1000, generator=g)[:1000].view(20, 50))
    assert torch.equal(s.order(5), s.order(0)) and len(s) == 20
    r = Schedule(1000, 50, seed=3, reshuffle=True)
    assert torch.equal(r.order(0), s.order(0)) and not torch.equal(r.order(1), r.order(0))
    halves = [Schedule(1000, 50, seed=3, rank=k, world_size=2).order(0) for k in (0, 1)]
    assert torch.equal(torch.cat(halves, 1), s.order(0))
    s.set_epoch(0, first_step=18)
    assert list(iter(s)) == s.order(0)[18:].tolist()
    with pytest.raises(ValueError, match="batch_size: the global batch of 50 images does not split evenly"):
        Schedule(1000, 50, seed=0, rank=0, world_size=3)
    with pytest.raises(ValueError, match="batch_size: 2000 is larger"):
        Schedule(1000, 2000, seed=0)


# ------------------------------------------------------------------------------------------------ layouts
def test_fit_on_a_dataloader_of_nchw_uint8_equals_fit_on_the_nhwc_tensor(shipped_uint8):
    """The DataLoader takes the in-memory schedule (Schedule as its batch sampler): the same parameters, bit for
    bit, and the same annealing state."""
    x = torch.from_numpy(shipped_uint8["x_train"][:1000])[..., None]
    y = torch.from_numpy(shipped_uint8["y_train"][:1000].astype(np.int64))
    a = DCGMM("demo", seed=0)
    a.fit(x, y, epochs=2, batch_size=50, seed=3)
    loader = DataLoader(TensorDataset(x.permute(0, 3, 1, 2).contiguous(), y), batch_sampler=Schedule(1000, 50, 3))
    b = DCGMM("demo", seed=0)
    b.fit(loader, epochs=2)
    for (k, u), (_, v) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(u, v), k


def test_layouts_of_the_model_methods():
    m = DCGMM([data_gmm()], (6, 6, 3), seed=0)
    g = torch.Generator().manual_seed(0)
    nhwc = torch.rand(4, 6, 6, 3, generator=g)
    nchw = nhwc.permute(0, 3, 1, 2).contiguous()
    want = m.log_prob(nhwc)["gmm1"]
    assert torch.equal(m.log_prob(nchw)["gmm1"], want)
    assert torch.equal(m.log_prob(nchw, layout="NCHW")["gmm1"], want)
    out = m.inpaint(nchw, torch.ones(6, 6, dtype=torch.bool), generator=g)
    assert out.shape == nchw.shape and torch.equal(out, nchw)  # every pixel known: x itself, in x's layout
    with pytest.raises(ValueError, match="layout='NHWC' expects images"):
        m.log_prob(nchw, layout="NHWC")
    with pytest.raises(ValueError, match="layout: expected one of"):
        m.log_prob(nhwc, layout="CHW")
    cube = DCGMM([data_gmm(kernel=2)], (3, 3, 3), seed=0)
    with pytest.raises(ValueError, match="read as both NHWC and NCHW"):
        cube.log_prob(torch.rand(2, 3, 3, 3, generator=g))
    assert cube.log_prob(torch.rand(2, 3, 3, 3, generator=g), layout="NCHW")["gmm1"].shape == (2,)
    with pytest.raises(ValueError, match=r"expected images \(N, 6, 6, 3\) \(NHWC\) or \(N, 3, 6, 6\) \(NCHW\)"):
        m.log_prob(torch.rand(2, 5, 6, 3))


def data_gmm(kernel=3):
    from dcgmm_fast.presets import GMM

    return GMM(kernel=kernel, stride=1, n_components=4)


# ------------------------------------------------------------------------------------------------ .npz / .npy
def test_open_npz_maps_stored_members_and_refuses_compressed(tmp_path, shipped_uint8):
    np.savez(tmp_path / "s.npz", **shipped_uint8)
    np.savez_compressed(tmp_path / "c.npz", **shipped_uint8)
    arrays = open_npz(str(tmp_path / "s.npz"))
    assert isinstance(arrays["x_train"], np.memmap)
    for k, v in shipped_uint8.items():
        assert np.array_equal(arrays[k], v)
    with pytest.raises(DataError, match="c.npz: member .* is compressed .* dcgmm convert"):
        open_npz(str(tmp_path / "c.npz"))
    convert_npz(str(tmp_path / "c.npz"), str(tmp_path / "u.npz"))
    with zipfile.ZipFile(tmp_path / "u.npz") as z:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
    assert all(np.array_equal(open_npz(str(tmp_path / "u.npz"))[k], v) for k, v in shipped_uint8.items())
    with pytest.raises(DataError, match="more than the memory budget .* compressed, .* dcgmm convert"):
        data.load_dataset(str(tmp_path / "c.npz"), memory_budget=1000)


def test_a_streamed_npz_trains_like_the_loaded_one(tmp_path, shipped_uint8):
    np.savez(tmp_path / "s.npz", **shipped_uint8)
    streamed = data.load_dataset(str(tmp_path / "s.npz"), memory_budget=1000)
    loaded = data.load_dataset(str(tmp_path / "s.npz"))
    assert isinstance(streamed.x_train, ArrayImages) and streamed.x_train.shape == (5000, 28, 28, 1)
    a, b = DCGMM("demo", seed=0), DCGMM("demo", seed=0)  # a new order every epoch: 22 steps over 3 epochs
    a.fit(loaded.x_train, loaded.y_train, epochs=2.2, batch_size=500, seed=1, reshuffle=True)
    b.fit(streamed.x_train.loader(Schedule(5000, 500, 1, reshuffle=True)), epochs=2.2)
    assert int(a.steps_done) == int(b.steps_done) == 22
    for (k, u), (_, v) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(u, v), k


def test_x_y_split_is_seeded_random(tmp_path):
    x = np.arange(200, dtype=np.uint8).repeat(4).reshape(200, 2, 2)
    y = np.repeat(np.arange(10), 20)  # class-sorted: the last fraction would hold classes 8 and 9 only
    np.savez(tmp_path / "xy.npz", x=x, y=y)
    ds = data.load_npz(str(tmp_path / "xy.npz"), test_fraction=0.2)
    again = data.load_npz(str(tmp_path / "xy.npz"), test_fraction=0.2)
    assert ds.x_test.shape[0] == 40 and ds.x_train.shape[0] == 160 and torch.equal(ds.y_test, again.y_test)
    assert len(set(ds.y_test.tolist())) >= 8
    assert sorted(ds.y_test.tolist() + ds.y_train.tolist()) == sorted(y.tolist())


def _write_npy_dir(d, shipped, copies):
    """x_train.npy of ``copies`` x the shipped images, written in chunks (never held whole)."""
    os.makedirs(d, exist_ok=True)
    x = shipped["x_train"]
    mm = np.lib.format.open_memmap(os.path.join(d, "x_train.npy"), mode="w+", dtype=np.uint8,
                                   shape=(copies * len(x),) + x.shape[1:])
    for c in range(copies):
        mm[c * len(x):(c + 1) * len(x)] = x
    mm.flush()
    del mm
    np.save(os.path.join(d, "y_train.npy"), np.tile(shipped["y_train"], copies))
    np.save(os.path.join(d, "x_test.npy"), shipped["x_test"])
    np.save(os.path.join(d, "y_test.npy"), shipped["y_test"])
    return copies * x.nbytes


RSS_SCRIPT = """
import json, resource, sys
from dcgmm_fast.cli import main
import torch
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "before_kib": before, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def test_training_streams_a_file_larger_than_the_budget(tmp_path, shipped_uint8):
    """A 600 MiB memory-mapped x_train with a 64 MiB budget: 20 steps and the evaluation of `dcgmm train` raise
    the process's peak RSS by far less than the file (loading it would add 600 MiB as uint8, 2.4 GiB as float)."""
    size = _write_npy_dir(tmp_path / "big", shipped_uint8, 160)  # 800,000 images, 627 MB
    res = subprocess.run([sys.executable, "-c", RSS_SCRIPT, "train", "--preset", "demo", "--data", "big",
                          "--memory-budget", "64", "--stop-after", str(20 / 8000), "--out", "o"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="2"))
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["rc"] == 0, res.stderr[-3000:]
    grown = (report["peak_kib"] - report["before_kib"]) * 1024
    assert grown < 250 * 2**20 < size / 2, f"peak RSS grew by {grown / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB file"
    metrics = json.load(open(tmp_path / "o" / "train_metrics.json"))
    assert metrics["epochs"][-1]["steps_done"] == 20


# ------------------------------------------------------------------------------------------------ folders
def _png(path, size, mode, value):
    from PIL import Image

    Image.new(mode, size, value).save(path)


def test_image_folder_reads_mixed_sizes_and_modes(tmp_path):
    for k, cls in enumerate(("cat", "dog")):
        os.makedirs(tmp_path / "root" / cls)
        _png(tmp_path / "root" / cls / "a.png", (40, 30), "RGB", (200, 10 * k, 0))
        _png(tmp_path / "root" / cls / "b.png", (28, 28), "L", 100 + k)
        _png(tmp_path / "root" / cls / "c.png", (10, 50), "RGBA", (0, 0, 255, 128))
        _png(tmp_path / "root" / cls / "d.jpg", (33, 29), "RGB", (50, 50, 50))
        (tmp_path / "root" / cls / "notes.txt").write_text("not an image, not read")
    x, y, classes = read_image_folder(str(tmp_path / "root"), (28, 28), 1)
    assert x.shape == (8, 28, 28, 1) and x.dtype == np.uint8 and classes == ["cat", "dog"]
    assert y.tolist() == [0] * 4 + [1] * 4 and int(x[1, 5, 5, 0]) == 100 and int(x[5, 5, 5, 0]) == 101
    rgb, _, _ = read_image_folder(str(tmp_path / "root"), (16, 16), 3)
    assert rgb.shape == (8, 16, 16, 3) and tuple(rgb[0, 8, 8]) == (200, 0, 0)
    assert abs(int(rgb[3, 8, 8, 0]) - 50) <= 2  # the JPEG, within its compression error
    ds = data.load_dataset(str(tmp_path / "root"), test_fraction=0.25, image_shape=(28, 28, 1))
    assert ds.x_train.shape == (6, 28, 28, 1) and ds.x_test.shape[0] == 2 and ds.n_classes == 2
    (tmp_path / "root" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="broken.png: not a readable image"):
        read_image_folder(str(tmp_path / "root"), (28, 28), 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x, _, _ = read_image_folder(str(tmp_path / "root"), (28, 28), 1, skip_broken=True)
    assert x.shape[0] == 8 and any("broken.png" in str(w.message) for w in caught)
    with pytest.raises(DataError, match="no class sub-folders"):
        read_image_folder(str(tmp_path / "root" / "cat"), (28, 28), 1)
