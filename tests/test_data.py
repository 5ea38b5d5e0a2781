"""dcgmm_fast.data: the shipped Fashion-MNIST subset and image conversion."""
import os

import numpy as np
import pytest
import torch

from dcgmm_fast import data

FULL = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "fashion_mnist.npz")


def test_shipped_subset_shapes_and_ranges():
    ds = data.load_shipped()
    assert ds.x_train.shape == (5000, 28, 28, 1) and ds.x_test.shape == (1000, 28, 28, 1)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert 0.0 <= float(ds.x_train.min()) and float(ds.x_train.max()) <= 1.0
    assert float(ds.x_train.std()) > 0.2  # real images, not blanks
    assert torch.bincount(ds.y_train).tolist() == [500] * 10
    assert torch.bincount(ds.y_test).tolist() == [100] * 10
    assert ds.n_classes == 10


def test_shipped_file_is_small_and_licensed():
    assert os.path.getsize(data.SHIPPED_FASHION_MNIST) <= 3 * 2**20
    notice = open(os.path.join(data.SHIPPED_DIR, "LICENSE-fashion-mnist.txt")).read()
    assert "MIT License" in notice and "Zalando" in notice


@pytest.mark.skipif(not os.path.exists(FULL), reason="full Fashion-MNIST not present")
def test_shipped_subset_is_real_fashion_mnist():
    with np.load(data.SHIPPED_FASHION_MNIST) as sub, np.load(FULL) as full:
        for split in ("train", "test"):
            idx = sub[f"{split}_index"]
            assert np.array_equal(sub[f"x_{split}"], full[f"x_{split}"][idx])
            assert np.array_equal(sub[f"y_{split}"], full[f"y_{split}"][idx])


def test_to_images_scales_and_adds_channel():
    u8 = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    t = data.to_images(u8)
    assert t.shape == (1, 2, 2, 1) and t.dtype == torch.float32
    assert t.reshape(-1).tolist() == pytest.approx([0.0, 1.0, 0.2, 0.4])


@pytest.mark.parametrize(
    "bad,exc",
    [
        (np.zeros((2, 3)), ValueError),
        (np.full((1, 2, 2), np.nan, dtype=np.float32), ValueError),
        (np.full((1, 2, 2), 2.0, dtype=np.float32), ValueError),
        (np.zeros((1, 2, 2), dtype=np.int32), TypeError),
    ],
)
def test_to_images_rejects_bad_input(bad, exc):
    with pytest.raises(exc, match="images"):
        data.to_images(bad, name="images")


# ------------------------------------------------------------------------------------------------ files
def _write_idx_set(directory, ds, gz):
    suffix = ".gz" if gz else ""
    u8 = lambda t: (t[..., 0] * 255).round().to(torch.uint8).numpy()  # noqa: E731
    data.write_idx(os.path.join(directory, "train-images-idx3-ubyte" + suffix), u8(ds.x_train))
    data.write_idx(os.path.join(directory, "train-labels-idx1-ubyte" + suffix), ds.y_train.numpy().astype(np.uint8))
    data.write_idx(os.path.join(directory, "t10k-images-idx3-ubyte" + suffix), u8(ds.x_test))
    data.write_idx(os.path.join(directory, "t10k-labels-idx1-ubyte" + suffix), ds.y_test.numpy().astype(np.uint8))


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, gz, dtype):
    a = (np.random.default_rng(0).random((4, 3, 5)) * 100).astype(dtype)
    path = str(tmp_path / ("a.idx" + (".gz" if gz else "")))
    data.write_idx(path, a)
    b = data.read_idx(path)
    assert b.dtype == np.dtype(dtype) and np.array_equal(a, b)
    if gz:
        assert open(path, "rb").read(2) == b"\x1f\x8b"


def test_npz_and_idx_copies_load_identically(tmp_path, shipped):
    small = shipped._replace(x_train=shipped.x_train[:50], y_train=shipped.y_train[:50],
                             x_test=shipped.x_test[:20], y_test=shipped.y_test[:20])
    for gz in (False, True):
        d = tmp_path / f"idx{gz}"
        d.mkdir()
        _write_idx_set(str(d), small, gz)
        idx = data.load_dataset(str(d))
        np.savez(tmp_path / "copy.npz", x_train=(small.x_train[..., 0] * 255).round().to(torch.uint8).numpy(),
                 y_train=small.y_train.numpy(), x_test=(small.x_test[..., 0] * 255).round().to(torch.uint8).numpy(),
                 y_test=small.y_test.numpy())
        npz = data.load_dataset(str(tmp_path / "copy.npz"))
        for a, b in zip(idx[:4], npz[:4]):
            assert torch.equal(a, b)
        assert torch.equal(idx.x_train, small.x_train)


def test_npz_x_y_split(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (10, 4, 4), dtype=np.uint8)
    y = np.arange(10) % 3
    np.savez(tmp_path / "xy.npz", x=x, y=y)
    ds = data.load_npz(str(tmp_path / "xy.npz"), test_fraction=0.3)
    assert ds.x_train.shape == (7, 4, 4, 1) and ds.x_test.shape == (3, 4, 4, 1) and ds.n_classes == 3
    with pytest.raises(data.DataError, match="xy.npz.*test_fraction"):
        data.load_npz(str(tmp_path / "xy.npz"))


def _bad_files(tmp_path):
    """(what, path) pairs of broken files, each must raise DataError naming the file."""
    out = []
    good = tmp_path / "good.idx"
    data.write_idx(str(good), np.zeros((3, 2, 2), dtype=np.uint8))
    raw = good.read_bytes()
    (tmp_path / "truncated.idx").write_bytes(raw[:-3])
    out.append(("truncated", str(tmp_path / "truncated.idx")))
    (tmp_path / "magic.idx").write_bytes(b"\x01\x02" + raw[2:])
    out.append(("magic", str(tmp_path / "magic.idx")))
    out.append(("no such file", str(tmp_path / "missing.idx")))
    return out


def test_bad_idx_files_name_the_file(tmp_path):
    for what, path in _bad_files(tmp_path):
        with pytest.raises(data.DataError, match=os.path.basename(path)) as info:
            data.read_idx(path)
        assert what.split()[0] in str(info.value)


@pytest.mark.parametrize(
    "arrays,what",
    [
        (dict(x_train=np.zeros((4, 3, 3), np.uint8), y_train=np.zeros(5, np.int64),
              x_test=np.zeros((2, 3, 3), np.uint8), y_test=np.zeros(2, np.int64)), "mismatch"),
        (dict(x_train=np.zeros((4, 3, 3), np.uint8), y_train=np.array([0, 1, -1, 2]),
              x_test=np.zeros((2, 3, 3), np.uint8), y_test=np.zeros(2, np.int64)), "out of range"),
        (dict(x_train=np.full((4, 3, 3), np.nan, np.float32), y_train=np.zeros(4, np.int64),
              x_test=np.zeros((2, 3, 3), np.float32), y_test=np.zeros(2, np.int64)), "NaN"),
        (dict(x_train=np.zeros((4, 3, 3), np.uint8)), "expected keys"),
    ],
)
def test_bad_npz_files_name_the_file(tmp_path, arrays, what):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(data.DataError, match="bad.npz") as info:
        data.load_npz(str(path))
    assert what in str(info.value)


def test_truncated_npz_and_idx_label_range(tmp_path):
    path = tmp_path / "cut.npz"
    np.savez(path, x_train=np.zeros((40, 8, 8), np.uint8), y_train=np.zeros(40, np.int64),
             x_test=np.zeros((2, 8, 8), np.uint8), y_test=np.zeros(2, np.int64))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(data.DataError, match="cut.npz"):
        data.load_npz(str(path))
    with pytest.raises(data.DataError, match="out of range"):
        data.load_npz(str(data.SHIPPED_FASHION_MNIST), n_classes=5)


def test_corrupt_gzip_stream_names_the_file(tmp_path):
    path = str(tmp_path / "train-images-idx3-ubyte.gz")
    data.write_idx(path, np.random.default_rng(0).integers(0, 255, (50, 28, 28), dtype=np.uint8))
    raw = bytearray(open(path, "rb").read())
    for i in range(40, min(len(raw) - 8, 400)):  # damage the deflate stream, keep the gzip header
        raw[i] ^= 0xA5
    open(path, "wb").write(bytes(raw))
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte.gz"):
        data.read_idx(path)


class _FakeTorchvision:
    """Stands in for torchvision.datasets (not installed here): MNIST-style (train=, .targets), SVHN-style
    (split=, .labels, channels-first) and a dataset that is not downloaded."""

    class MNIST:
        def __init__(self, root, train, download):
            n = 12 if train else 4
            self.data = np.random.default_rng(0).integers(0, 255, (n, 28, 28), dtype=np.uint8)
            self.targets = np.arange(n) % 10

    class SVHN:
        def __init__(self, root, split, download):
            n = 12 if split == "train" else 4
            self.data = np.random.default_rng(1).integers(0, 255, (n, 3, 32, 32), dtype=np.uint8)
            self.labels = np.arange(n) % 10

    class FashionMNIST:
        def __init__(self, root, train, download):
            raise RuntimeError("Dataset not found. You can use download=True to download it")


def test_torchvision_datasets_of_both_apis_and_a_missing_download(monkeypatch):
    import sys
    import types

    fake = types.ModuleType("torchvision")
    fake.datasets = _FakeTorchvision
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", _FakeTorchvision)
    mnist = data.load_dataset("torchvision:MNIST:/data")
    assert mnist.x_train.shape == (12, 28, 28, 1) and mnist.y_test.shape == (4,)
    svhn = data.load_dataset("torchvision:SVHN:/data")
    assert svhn.x_train.shape == (12, 32, 32, 3) and svhn.y_train.tolist() == list(np.arange(12) % 10)
    with pytest.raises(data.DataError, match="FashionMNIST: not found under '/data'.*download"):
        data.load_dataset("torchvision:FashionMNIST:/data")
