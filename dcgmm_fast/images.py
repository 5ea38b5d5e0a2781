"""Image grids as PNG files, written atomically (Pillow when installed, else ``png``'s standard-library writer;
the row labels' text needs Pillow and is left out, with a warning, without it)."""
from __future__ import annotations

from typing import Optional, Sequence

import warnings

import numpy as np
import torch

from .atomic import atomic_open
from .png import save_png


def grid(images: torch.Tensor, n_cols: int, pad: int = 2, scale: int = 2) -> np.ndarray:
    """(N, H, W, C) in [0, 1] -> one uint8 (rows * (H + pad) + pad, cols * (W + pad) + pad, C) picture, each
    image enlarged ``scale`` times, padding white."""
    x = images.detach().float().clamp(0, 1).cpu()
    N, H, W, C = x.shape
    x = x.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    H, W = H * scale, W * scale
    rows = (N + n_cols - 1) // n_cols
    out = np.full((rows * (H + pad) + pad, n_cols * (W + pad) + pad, C), 255, dtype=np.uint8)
    for i in range(N):
        r, c = divmod(i, n_cols)
        y0, x0 = pad + r * (H + pad), pad + c * (W + pad)
        out[y0:y0 + H, x0:x0 + W] = (x[i].numpy() * 255).round().astype(np.uint8)
    return out


#: width in pixels of the label column of a grid with row labels
LABEL_WIDTH = 96


def label_rows(picture: np.ndarray, labels: Sequence[str], row_height: int, pad: int) -> np.ndarray:
    """A white column of LABEL_WIDTH pixels left of ``picture`` with one text label per row (Pillow's default
    font), vertically centred on the row."""
    from PIL import Image, ImageDraw

    H, _, C = picture.shape
    column = Image.new("L", (LABEL_WIDTH, H), 255)
    draw = ImageDraw.Draw(column)
    for r, text in enumerate(labels):
        y = pad + r * (row_height + pad) + row_height // 2 - 6
        draw.text((4, max(0, y)), str(text)[:16], fill=0)
    strip = np.asarray(column, dtype=np.uint8)[..., None].repeat(C, axis=2)
    return np.concatenate([strip, picture], axis=1)


def save_grid(path: str, images: torch.Tensor, n_cols: int, pad: int = 2, scale: int = 2,
              row_labels: Optional[Sequence[str]] = None) -> Optional[tuple]:
    """Write ``grid(images)`` as a PNG (with a label column when ``row_labels``, one per row); returns its
    (width, height)."""
    picture = grid(images, n_cols, pad, scale)
    if row_labels is not None:
        try:
            picture = label_rows(picture, row_labels, images.shape[1] * scale, pad)
        except ImportError:
            warnings.warn(f"{path}: row labels need Pillow (pip install pillow); written without them")
    with atomic_open(path, "wb") as f:
        save_png(f, picture)
    return picture.shape[1], picture.shape[0]
