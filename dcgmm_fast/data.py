"""Datasets as float images in [0, 1], NHWC.

The package ships a real, class-balanced subset of Fashion-MNIST (5,000 train + 1,000 test images, MIT
licence in ``_shipped/LICENSE-fashion-mnist.txt``), so examples and tests run without a download.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import numpy as np
import torch

SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_shipped")
SHIPPED_FASHION_MNIST = os.path.join(SHIPPED_DIR, "fashion_mnist_5k.npz")

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


class Dataset(NamedTuple):
    """Train and test splits. x_*: (N, H, W, C) float32 in [0, 1]; y_*: (N,) int64 labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int


def to_images(x, *, name: str = "x") -> torch.Tensor:
    """Images (N, H, W) or (N, H, W, C), uint8 in [0, 255] or float in [0, 1] -> float32 (N, H, W, C) in [0, 1].

    uint8 is divided by 255 as the original does (no mean/std normalisation). Float input must be finite
    and is taken as already scaled.

    Raises:
        ValueError: wrong rank, NaN/Inf, or float values outside [0, 1].
    """
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.dim() == 3:
        t = t[..., None]
    if t.dim() != 4:
        raise ValueError(f"{name}: expected images (N, H, W) or (N, H, W, C), got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        return t.to(torch.float32) / 255.0
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected uint8 or floating images, got {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: images contain NaN or Inf")
    if t.numel() and (float(t.min()) < 0.0 or float(t.max()) > 1.0):
        raise ValueError(f"{name}: float images must lie in [0, 1], got [{float(t.min())}, {float(t.max())}]")
    return t.to(torch.float32)


def load_shipped(path: Optional[str] = None) -> Dataset:
    """The Fashion-MNIST subset shipped with the package (or an .npz with the same keys at ``path``).

    Returns:
        Dataset with x_train (5000, 28, 28, 1), y_train (5000,), x_test (1000, 28, 28, 1), y_test (1000,).
    """
    path = SHIPPED_FASHION_MNIST if path is None else path
    with np.load(path) as f:
        arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    return Dataset(
        to_images(arrays["x_train"], name="x_train"),
        torch.as_tensor(arrays["y_train"].astype(np.int64)),
        to_images(arrays["x_test"], name="x_test"),
        torch.as_tensor(arrays["y_test"].astype(np.int64)),
        n_classes=10,
    )
