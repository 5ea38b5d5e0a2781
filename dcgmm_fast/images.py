"""Image grids as PNG files (Pillow, imported on use), written atomically."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .atomic import atomic_open


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


def save_grid(path: str, images: torch.Tensor, n_cols: int, pad: int = 2, scale: int = 2) -> Optional[tuple]:
    """Write ``grid(images)`` as a PNG; returns its (width, height)."""
    from PIL import Image

    picture = grid(images, n_cols, pad, scale)
    mode = "L" if picture.shape[2] == 1 else "RGB"
    with atomic_open(path, "wb") as f:
        Image.fromarray(picture[..., 0] if mode == "L" else picture, mode=mode).save(f, format="PNG")
    return picture.shape[1], picture.shape[0]
