"""A minimal PNG writer from the standard library (zlib, struct), for machines without Pillow (a GPU box where only
``pip install --no-deps`` works): 8-bit grey or RGB, no interlace, filter 0 per row. Pillow reads what it writes."""
from __future__ import annotations

import struct
import zlib
from typing import BinaryIO

import numpy as np


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 (H, W), (H, W, 1) grey or (H, W, 3) RGB -> the bytes of a PNG file."""
    a = np.asarray(pixels)
    if a.dtype != np.uint8:
        raise TypeError(f"pixels: expected uint8, got {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        colour = 0
    elif a.ndim == 3 and a.shape[2] == 3:
        colour = 2
    else:
        raise ValueError(f"pixels: expected (H, W), (H, W, 1) or (H, W, 3), got {a.shape}")
    H, W = a.shape[:2]
    if H < 1 or W < 1:
        raise ValueError(f"pixels: expected a non-empty picture, got {a.shape}")
    rows = np.ascontiguousarray(a).reshape(H, -1)
    raw = np.concatenate([np.zeros((H, 1), np.uint8), rows], axis=1).tobytes()  # filter type 0 on every row
    header = struct.pack(">IIBBBBB", W, H, 8, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 6))
            + _chunk(b"IEND", b""))


def write_png(f: BinaryIO, pixels: np.ndarray) -> None:
    """Write ``encode_png(pixels)`` to the open binary file f."""
    f.write(encode_png(pixels))


def save_png(f: BinaryIO, pixels: np.ndarray) -> None:
    """Pillow when it is installed, else this module's writer: the same pixels either way."""
    try:
        from PIL import Image
    except ImportError:
        write_png(f, pixels)
        return
    a = np.asarray(pixels)
    a = a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a
    Image.fromarray(a, mode="L" if a.ndim == 2 else "RGB").save(f, format="PNG")
