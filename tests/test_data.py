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
