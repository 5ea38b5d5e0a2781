"""Data sources larger than memory, and image folders.

- ``open_npy`` / ``open_npz``: arrays memory-mapped from .npy files and from the stored (uncompressed) members of
  an .npz, never read whole; a compressed member cannot be mapped (``convert_npz`` writes an uncompressed copy).
- ``ArrayImages``: a map-style Dataset over such arrays that reads a whole batch in one indexing
  (``__getitems__``), for a ``DataLoader`` with a ``schedule.Schedule`` as its batch sampler (``loader``).
- ``read_image_folder``: PNG / JPEG files in one sub-folder per class (torchvision's ImageFolder layout), resized
  and cropped to the model's input, grey or RGB.
"""
from __future__ import annotations

import os
import shutil
import warnings
import zipfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .data import DataError


# ---------------------------------------------------------------------------------------------------- mapping
def open_npy(path: str) -> np.ndarray:
    """A .npy file memory-mapped read-only (np.memmap: pages are read as batches touch them)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # ValueError (bad header), OSError, ...
        raise DataError(f"{path}: not a readable .npy file ({type(e).__name__}: {e})") from None


def _member_offset(f, info: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes start: after its local header (whose extra field may differ from the
    central directory's)."""
    f.seek(info.header_offset)
    local = f.read(30)
    if local[:4] != b"PK\x03\x04":
        raise ValueError(f"member {info.filename}: bad local header")
    name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
    return info.header_offset + 30 + name_len + extra_len


def open_npz(path: str) -> Dict[str, np.ndarray]:
    """The arrays of an .npz whose members are stored uncompressed (``np.savez``), each memory-mapped read-only.

    Raises:
        DataError: naming the file: missing, not a zip, a member not an .npy, or a compressed member (with the
            ``dcgmm convert`` command that writes an uncompressed copy).
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    out = {}
    try:
        with zipfile.ZipFile(path) as z, open(path, "rb") as f:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                if info.compress_type != zipfile.ZIP_STORED:
                    raise DataError(f"{path}: member {info.filename} is compressed and cannot be memory-mapped; "
                                    f"write an uncompressed copy with: dcgmm convert {path} UNCOMPRESSED.npz")
                start = _member_offset(f, info)
                f.seek(start)
                version = np.lib.format.read_magic(f)
                shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                         else np.lib.format.read_array_header_2_0(f))
                if dtype.hasobject:
                    raise DataError(f"{path}: member {info.filename} holds Python objects")
                out[info.filename[:-4]] = np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape,
                                                    order="F" if fortran else "C")
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    return out


def npz_is_compressed(path: str) -> bool:
    with zipfile.ZipFile(path) as z:
        return any(i.compress_type != zipfile.ZIP_STORED for i in z.infolist())


def npz_array_bytes(path: str) -> int:
    """The uncompressed size of an .npz's members (what loading it whole takes)."""
    with zipfile.ZipFile(path) as z:
        return sum(i.file_size for i in z.infolist())


def convert_npz(src: str, dst: str) -> None:
    """Copy an .npz with every member stored uncompressed (streamed member by member: no array is held whole),
    so that ``open_npz`` can map it. Written to a temporary name and renamed: a kill leaves no partial dst."""
    if not os.path.isfile(src):
        raise DataError(f"{src}: no such file")
    tmp = f"{dst}.tmp-{os.getpid()}"
    try:
        with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED,
                                                          allowZip64=True) as zout:
            for info in zin.infolist():
                with zin.open(info) as r, zout.open(info.filename, "w", force_zip64=True) as w:
                    shutil.copyfileobj(r, w, 1 << 24)
        os.replace(tmp, dst)
    except zipfile.BadZipFile as e:
        raise DataError(f"{src}: not a readable .npz file ({e})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------------------------------------------- datasets
class ArrayImages(Dataset):
    """Images x (M, H, W[, C]) uint8 or float in [0, 1] in an array-like (np.memmap, ndarray), the rows ``index``
    of it (default all), and their labels y (N,) (optional): ``dataset[indices]`` reads one batch, rows in the
    given order, as (x (n, H, W, C) tensor, y (n,) int64), or (x,) without labels."""

    def __init__(self, x, y=None, name: str = "x", index: Optional[np.ndarray] = None):
        self.x, self.name = x, name
        self.index = None if index is None else np.asarray(index, dtype=np.int64)
        n = len(x) if self.index is None else len(self.index)
        if y is not None and len(y) != n:
            raise DataError(f"{name}: {n} images but {len(y)} labels")
        self.y = None if y is None else np.asarray(y)
        self._fd = None

    def __len__(self) -> int:
        return len(self.x) if self.index is None else len(self.index)

    def subset(self, keep: np.ndarray) -> "ArrayImages":
        """The images where ``keep`` (N,) bool is True, over the same file (nothing is read)."""
        rows = np.arange(len(self)) if self.index is None else self.index
        return ArrayImages(self.x, None if self.y is None else self.y[keep], name=self.name, index=rows[keep])

    @property
    def shape(self) -> Tuple[int, ...]:
        """(N, H, W, C)."""
        rest = tuple(self.x.shape[1:])
        return (len(self),) + (rest if len(rest) == 3 else rest + (1,))

    def __getitems__(self, indices: Sequence[int]):
        idx = np.asarray(indices, dtype=np.int64)
        rows = idx if self.index is None else self.index[idx]
        order = np.argsort(rows, kind="stable")  # read the file forwards, then put the rows in batch order
        xb = np.empty((len(rows),) + tuple(self.x.shape[1:]), dtype=self.x.dtype)
        xb[order] = self._read_sorted(rows[order])
        x = torch.from_numpy(xb)
        if x.dim() == 3:
            x = x[..., None]
        if x.dtype != torch.uint8 and (not bool(torch.isfinite(x).all()) or float(x.min()) < 0
                                       or float(x.max()) > 1):
            raise DataError(f"{self.name}: float images must be finite and in [0, 1] (a batch of rows "
                            f"{rows.min()}..{rows.max()} is not)")
        if self.y is None:
            return (x,)
        return x, torch.as_tensor(self.y[idx].astype(np.int64))

    def _read_sorted(self, rows: np.ndarray) -> np.ndarray:
        """Rows (ascending) of x. A memory-mapped file is read by position (pread, runs of consecutive rows in one
        call), not through its mapping: Linux maps whole large folios of the page cache into a process that
        touches a mapping, so 2,000 random rows of a 627 MB file raised the RSS by 590 MiB (kernel 6.18) as if
        the file were loaded; reads leave the RSS at the batch."""
        x = self.x
        if not (isinstance(x, np.memmap) and x.flags.c_contiguous and getattr(x, "filename", None)):
            return x[rows]
        out = np.empty((len(rows),) + tuple(x.shape[1:]), dtype=x.dtype)
        row_bytes = x.dtype.itemsize * int(np.prod(x.shape[1:], dtype=np.int64))
        if self._fd is None:
            self._fd = os.open(x.filename, os.O_RDONLY)
        view = memoryview(out).cast("B")
        i = 0
        while i < len(rows):
            j = i
            while j + 1 < len(rows) and rows[j + 1] == rows[j] + 1:
                j += 1
            want = (j - i + 1) * row_bytes
            got = os.preadv(self._fd, [view[i * row_bytes:i * row_bytes + want]], x.offset + int(rows[i]) * row_bytes)
            if got != want:
                raise DataError(f"{x.filename}: truncated: rows {rows[i]}..{rows[j]} of {self.name} are not all there")
            i = j + 1
        return out

    def __getstate__(self):  # a DataLoader worker opens its own file descriptor
        return {**self.__dict__, "_fd": None}

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def batches(self, batch_size: int):
        """The images in order, (x, y) or (x,) batches of ``batch_size`` (evaluation)."""
        for s in range(0, len(self), batch_size):
            yield self.__getitems__(range(s, min(len(self), s + batch_size)))

    def __getitem__(self, i: int):
        return self.__getitems__([i])

    def loader(self, batch_sampler, pin_memory: bool = False) -> DataLoader:
        """A DataLoader reading one batch per ``batch_sampler`` item in this process (0 workers: the data are
        memory-mapped, and training processes own the cores)."""
        return DataLoader(self, batch_sampler=batch_sampler, collate_fn=_identity, num_workers=0,
                          pin_memory=pin_memory)


def _identity(batch):
    return batch


# ---------------------------------------------------------------------------------------------------- folders
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def read_image_folder(root: str, size: Tuple[int, int], channels: int, *, skip_broken: bool = False
                      ) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """Images under ``root/CLASS/*`` (one sub-folder per class, classes in sorted order, as torchvision's
    ImageFolder) -> (x (N, H, W, C) uint8, y (N,) int64, class names). Each image is converted to grey
    (channels 1) or RGB (3), resized so its shorter side fits and centre-cropped to (H, W) = ``size``.

    Raises:
        DataError: naming the folder or file: no class folders, no images, a file that is not a readable image
            (``skip_broken``: skipped with a warning naming it instead).
    """
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise DataError(f"{root}: reading image folders needs Pillow (pip install pillow)") from None
    if not os.path.isdir(root):
        raise DataError(f"{root}: no such directory")
    if channels not in (1, 3):
        raise ValueError(f"channels: expected 1 (grey) or 3 (RGB), got {channels}")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise DataError(f"{root}: no class sub-folders (expected ROOT/CLASS/IMAGE files)")
    H, W = size
    xs, ys = [], []
    for k, cls in enumerate(classes):
        folder = os.path.join(root, cls)
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if not os.path.isfile(path) or not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            try:
                with Image.open(path) as im:
                    im = im.convert("L" if channels == 1 else "RGB")
                    scale = max(H / im.height, W / im.width)
                    new = (max(W, round(im.width * scale)), max(H, round(im.height * scale)))
                    im = im.resize(new, Image.BILINEAR)
                    left, top = (new[0] - W) // 2, (new[1] - H) // 2
                    a = np.asarray(im.crop((left, top, left + W, top + H)), dtype=np.uint8)
            except (UnidentifiedImageError, OSError, ValueError) as e:
                if not skip_broken:
                    raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e}); remove it or skip "
                                    "broken files") from None
                warnings.warn(f"{path}: not a readable image, skipped ({type(e).__name__})")
                continue
            xs.append(a.reshape(H, W, channels))
            ys.append(k)
    if not xs:
        raise DataError(f"{root}: no images in its class folders ({', '.join(classes)})")
    return np.stack(xs), np.asarray(ys, dtype=np.int64), classes
