"""Datasets as float images in [0, 1], NHWC.

The package ships a real, class-balanced subset of Fashion-MNIST (5,000 train + 1,000 test images, MIT
licence in ``_shipped/LICENSE-fashion-mnist.txt``), so examples and tests run without a download.
"""
from __future__ import annotations

import gzip
import os
import zlib
from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch

from .validation import check_images

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
    class_names: Optional[Tuple[str, ...]] = None  # when the source says (Fashion-MNIST, image folders, torchvision)


def to_images(x, *, name: str = "x", keep_uint8: bool = False) -> torch.Tensor:
    """Images (N, H, W) or (N, H, W, C), uint8 in [0, 255] or float in [0, 1] -> float32 (N, H, W, C) in [0, 1].

    uint8 is divided by 255 as the original does (no mean/std normalisation); with ``keep_uint8`` it is returned
    as uint8 (N, H, W, C), for training that scales each batch inside its step (a quarter of the memory, and a
    data set that fits stays on the device). Float input must be finite and is taken as already scaled.

    Raises:
        ValueError: wrong rank, NaN/Inf, or float values outside [0, 1].
    """
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.dim() == 3:
        t = t[..., None]
    if t.dim() != 4:
        raise ValueError(f"{name}: expected images (N, H, W) or (N, H, W, C), got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        return t if keep_uint8 else t.to(torch.float32) / 255.0
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected uint8 or floating images, got {t.dtype}")
    check_images(name, t)
    return t.to(torch.float32)


LAYOUTS = ("auto", "NHWC", "NCHW")


def resolve_layout(shape, input_shape, layout: str = "auto", name: str = "x") -> str:
    """Which layout a batch of ``shape`` is in, for a model taking (H, W, C) = ``input_shape`` images: "NHWC" or
    "NCHW" ("auto": the one whose reading fits; (N, H, W) is NHWC with one channel).

    Raises:
        ValueError: an unknown layout; "auto" when both readings fit (H = W = C) or neither does; a given
            layout that does not fit.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    H, W, C = input_shape
    shape = tuple(shape)
    if len(shape) == 3:
        return "NHWC"  # (N, H, W): grey images, no channel axis to place
    nhwc, nchw = shape[1:] == (H, W, C), shape[1:] == (C, H, W)
    if layout == "auto":
        if nhwc and nchw:  # H = W = C: the shape cannot tell
            raise ValueError(f"{name}: images of shape {shape} read as both NHWC and NCHW for input (H, W, C) = "
                             f"{tuple(input_shape)}; pass layout='NHWC' or layout='NCHW'")
        if nhwc:
            return "NHWC"
        if nchw:
            return "NCHW"
        raise ValueError(f"{name}: expected images (N, {H}, {W}, {C}) (NHWC) or (N, {C}, {H}, {W}) (NCHW), got "
                         f"{shape}")
    if (layout == "NHWC" and not nhwc) or (layout == "NCHW" and not nchw):
        want = f"(N, {H}, {W}, {C})" if layout == "NHWC" else f"(N, {C}, {H}, {W})"
        raise ValueError(f"{name}: layout={layout!r} expects images {want}, got {shape}")
    return layout


def to_nhwc(x, input_shape, layout: str = "auto", name: str = "x") -> torch.Tensor:
    """Images in NHWC (a channels-last view of NCHW input; nothing is copied or scaled here)."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.dim() not in (3, 4):
        raise ValueError(f"{name}: expected images (N, H, W), (N, H, W, C) or (N, C, H, W), got shape "
                         f"{tuple(t.shape)}")
    return t.permute(0, 2, 3, 1) if resolve_layout(t.shape, input_shape, layout, name) == "NCHW" else t


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
        class_names=FASHION_MNIST_CLASSES,
    )


# ---------------------------------------------------------------------------------------------------- errors
class DataError(ValueError):
    """A data file that cannot be used; the message names the file and what is wrong."""


def _labels(y, path: str, n_images: int, n_classes: Optional[int], name: str) -> torch.Tensor:
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"{path}: {name} must be 1-D labels, got shape {y.shape}")
    if y.shape[0] != n_images:
        raise DataError(f"{path}: {name} has {y.shape[0]} labels for {n_images} images (shape mismatch)")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: {name} must be integer labels, got {y.dtype}")
    hi = n_classes if n_classes is not None else 256
    if y.size and (int(y.min()) < 0 or int(y.max()) >= hi):
        raise DataError(f"{path}: {name} labels out of range [0, {hi}): min {int(y.min())}, max {int(y.max())}")
    return torch.as_tensor(y.astype(np.int64))


def _images(x, path: str, name: str) -> torch.Tensor:
    try:
        return to_images(x, name=f"{path}: {name}")
    except (ValueError, TypeError) as e:
        raise DataError(str(e)) from None


def _dataset(path, x_train, y_train, x_test, y_test, n_classes=None) -> Dataset:
    xt, xs = _images(x_train, path, "x_train"), _images(x_test, path, "x_test")
    for name, t in (("x_train", xt), ("x_test", xs)):
        if t.shape[0] == 0:
            raise DataError(f"{path}: {name} holds no images (an empty split)")
    if xt.shape[1:] != xs.shape[1:]:
        raise DataError(f"{path}: x_train images {tuple(xt.shape[1:])} and x_test images {tuple(xs.shape[1:])} differ")
    yt = _labels(y_train, path, xt.shape[0], n_classes, "y_train")
    ys = _labels(y_test, path, xs.shape[0], n_classes, "y_test")
    k = n_classes if n_classes is not None else int(max(yt.max(), ys.max())) + 1
    return Dataset(xt, yt, xs, ys, n_classes=k)


# ---------------------------------------------------------------------------------------------------- npz
def load_npz(path: str, *, test_fraction: Optional[float] = None, n_classes: Optional[int] = None) -> Dataset:
    """An .npz with x_train / y_train / x_test / y_test (Keras' layout, and the shipped file), or x / y split
    into train and test by ``test_fraction`` (a seeded random split, ``split_indices``).

    Raises:
        DataError: naming the file: missing, unreadable or truncated, missing keys, shape mismatch, labels out
            of range, NaN / Inf or out-of-range float images.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # zipfile.BadZipFile, EOFError, ValueError, ... all mean the same to the user
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    if {"x_train", "y_train", "x_test", "y_test"} <= set(arrays):
        return _dataset(path, arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], n_classes)
    if {"x", "y"} <= set(arrays):
        train, test = _xy_split(path, arrays, test_fraction)
        x, y = arrays["x"], arrays["y"]
        return _dataset(path, x[train], y[train], x[test], y[test], n_classes)
    raise DataError(f"{path}: expected keys x_train, y_train, x_test, y_test (or x, y), got {sorted(arrays)}")


#: the seed of the x / y train-test split (fixed: the same file gives the same split everywhere)
SPLIT_SEED = 0


def _xy_split(path: str, arrays, test_fraction: Optional[float]) -> Tuple[np.ndarray, np.ndarray]:
    """(train, test) indices of a file's x / y (``split_indices``), after its checks."""
    if test_fraction is None or not 0 < test_fraction < 1:
        raise DataError(f"{path}: holds x / y; give a test_fraction in (0, 1) to split it, got {test_fraction}")
    n = len(arrays["x"])
    if len(arrays["y"]) != n:
        raise DataError(f"{path}: y has {len(arrays['y'])} labels for {n} images (shape mismatch)")
    return split_indices(n, test_fraction)


def split_indices(n: int, test_fraction: float) -> Tuple[np.ndarray, np.ndarray]:
    """(train, test) indices of a seeded random split of n images, each in file order: round(n * test_fraction)
    (at least 1) test images drawn at random (a class-sorted file still gets every class in both)."""
    n_test = max(1, int(round(n * test_fraction)))
    if n_test >= n:
        raise DataError(f"test_fraction: {test_fraction} leaves no training images of {n}")
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


# ---------------------------------------------------------------------------------------------------- IDX
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _open(path: str, mode: str):
    """Open plain or gzip (by the gzip magic bytes on read, by the .gz suffix on write)."""
    if "r" in mode:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
        return gzip.open(path, mode) if gz else open(path, mode)
    return gzip.open(path, mode) if path.endswith(".gz") else open(path, mode)


def read_idx(path: str) -> np.ndarray:
    """Read an MNIST-format IDX file (plain or gzip), as MNIST, Fashion-MNIST and EMNIST ship them.

    Raises:
        DataError: naming the file: missing, wrong magic number, truncated, trailing bytes.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    try:
        with _open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: a gzip file whose stream is corrupt
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path}: wrong magic number {raw[:4].hex() or '(empty)'}: not an IDX file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header < need:
        raise DataError(f"{path}: truncated: {len(raw) - header} data bytes for shape {shape} ({need} needed)")
    if len(raw) - header > need:
        raise DataError(f"{path}: {len(raw) - header - need} unexpected trailing bytes after shape {shape}")
    values = np.frombuffer(raw, dtype=dtype, count=need // dtype.itemsize, offset=header).reshape(shape)
    return values.astype(dtype.newbyteorder("="))  # native byte order, a copy


_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
              np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}


def write_idx(path: str, array) -> None:
    """Write an array as an IDX file (gzip when ``path`` ends in .gz), big-endian as the format says."""
    a = np.asarray(array)
    code = _IDX_CODES.get(a.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"array: IDX stores uint8, int8, int16, int32, float32 or float64, got {a.dtype}")
    with _open(path, "wb") as f:
        f.write(bytes([0, 0, code, a.ndim]))
        for n in a.shape:
            f.write(int(n).to_bytes(4, "big"))
        f.write(a.astype(_IDX_TYPES[code]).tobytes())


def _find(directory: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise DataError(f"{os.path.join(directory, stem)}(.gz): no such file")


def load_idx(directory: str, *, n_classes: Optional[int] = None) -> Dataset:
    """The four MNIST-format files in ``directory`` (train-images-idx3-ubyte, train-labels-idx1-ubyte,
    t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each plain or .gz)."""
    parts = {k: read_idx(_find(directory, stem)) for k, stem in (
        ("x_train", "train-images-idx3-ubyte"), ("y_train", "train-labels-idx1-ubyte"),
        ("x_test", "t10k-images-idx3-ubyte"), ("y_test", "t10k-labels-idx1-ubyte"))}
    return _dataset(directory, parts["x_train"], parts["y_train"], parts["x_test"], parts["y_test"], n_classes)


# ---------------------------------------------------------------------------------------------------- any
def _torchvision_split(cls, name: str, root: str, train: bool):
    """One split of a torchvision dataset, whichever constructor it has (``train=`` or SVHN's ``split=``)."""
    try:
        try:
            return cls(root, train=train, download=False)
        except TypeError:  # SVHN (and others) take split="train" / "test"
            return cls(root, split="train" if train else "test", download=False)
    except (RuntimeError, OSError) as e:  # torchvision raises RuntimeError("Dataset not found ...")
        raise DataError(f"torchvision:{name}: not found under {root!r} ({e}); download it first, e.g. "
                        f"torchvision.datasets.{name}({root!r}, download=True)") from None


def _torchvision_arrays(ds, name: str):
    """(images (N, H, W[, C]) uint8, labels (N,)) of a torchvision dataset: .data / .targets, or SVHN's .labels
    with channels-first (N, C, H, W) data."""
    x = np.asarray(ds.data)
    y = np.asarray(getattr(ds, "targets", None) if hasattr(ds, "targets") else getattr(ds, "labels", None))
    if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):  # channels-first (SVHN)
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    if y.ndim != 1:
        raise DataError(f"torchvision:{name}: expected .targets or .labels as (N,) class labels, got {y.shape}")
    return x, y


def load_torchvision(name: str, root: str) -> Dataset:
    """A torchvision dataset already downloaded under ``root`` (e.g. "MNIST", "FashionMNIST", "SVHN",
    "CIFAR10"); channels-first data are made NHWC."""
    try:
        import torchvision.datasets as tvd
    except ImportError:
        raise DataError(f"torchvision:{name}: torchvision is not installed (pip install torchvision)") from None
    cls = getattr(tvd, name, None)
    if cls is None:
        raise DataError(f"torchvision:{name}: no such torchvision dataset")
    train, test = (_torchvision_split(cls, name, root, t) for t in (True, False))
    (xt, yt), (xs, ys) = _torchvision_arrays(train, name), _torchvision_arrays(test, name)
    names = getattr(train, "classes", None)
    ds = _dataset(f"torchvision:{name}", xt, yt, xs, ys)
    return ds._replace(class_names=tuple(map(str, names))) if names and len(names) == ds.n_classes else ds


def load_dataset(spec: str = "shipped", *, test_fraction: Optional[float] = None,
                 memory_budget: Optional[int] = None, image_shape: Optional[Tuple[int, int, int]] = None,
                 skip_broken: bool = False) -> Dataset:
    """``"shipped"`` (default), a path to an .npz, a directory of IDX files, of .npy files (x_train.npy,
    y_train.npy, x_test.npy, y_test.npy), or of images in class folders (ROOT/train/CLASS/* and ROOT/test/CLASS/*,
    or ROOT/CLASS/* split by ``test_fraction``; resized to ``image_shape``, default (28, 28, 1)), or
    ``torchvision:NAME[:ROOT]``.

    Data whose arrays take more than ``memory_budget`` bytes (an uncompressed .npz, .npy files) are not loaded:
    x_train and x_test are then ``sources.ArrayImages`` over memory-mapped files, to stream through a DataLoader.
    """
    if spec in ("shipped", "fashion_mnist_5k", ""):
        return load_shipped()
    if spec.startswith("torchvision:"):
        _, name, *root = spec.split(":", 2)
        return load_torchvision(name, root[0] if root else "data")
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, "x_train.npy")):
            return load_npy_dir(spec, memory_budget=memory_budget)
        if any(os.path.isdir(os.path.join(spec, d)) for d in os.listdir(spec)):
            return load_image_folders(spec, image_shape or (28, 28, 1), test_fraction=test_fraction,
                                      skip_broken=skip_broken)
        return load_idx(spec)
    if spec.endswith(".npz") or os.path.isfile(spec):
        if memory_budget is not None and spec.endswith(".npz") and os.path.isfile(spec):
            from .sources import npz_array_bytes
            try:
                big = npz_array_bytes(spec) > memory_budget
            except Exception:  # not a zip: load_npz names the problem
                big = False
            if big:
                return _fashion_names(spec, _streamed_npz(spec, test_fraction, memory_budget))
        ds = load_npz(spec, test_fraction=test_fraction)
        return _fashion_names(spec, ds)
    raise DataError(f"{spec}: no such file or directory (expected 'shipped', an .npz, an IDX, .npy or image "
                    f"folder directory, or torchvision:NAME)")


def _fashion_names(spec: str, ds: Dataset) -> Dataset:
    """A file named like Fashion-MNIST with its 10 classes gets their names (the class grid's row labels)."""
    if "fashion" in os.path.basename(spec).lower() and ds.n_classes == 10 and ds.class_names is None:
        return ds._replace(class_names=FASHION_MNIST_CLASSES)
    return ds


# ---------------------------------------------------------------------------------------------------- streamed
def _check_streamed_images(path: str, key: str, x: np.ndarray) -> None:
    """Shape and dtype only: the values of a streamed file are checked batch by batch as training reads them."""
    if x.ndim not in (3, 4) or (x.dtype != np.uint8 and x.dtype.kind != "f"):
        raise DataError(f"{path}: {key} must be uint8 or float images (N, H, W[, C]), got {x.dtype} {x.shape}")
    if x.shape[0] == 0:
        raise DataError(f"{path}: {key} holds no images (an empty split)")


def _streamed(path, arrays, train: Optional[np.ndarray] = None, test: Optional[np.ndarray] = None) -> Dataset:
    """x_train / y_train / x_test / y_test arrays (x memory-mapped) as a Dataset of ``sources.ArrayImages``;
    ``train`` / ``test``: the rows of x_train / x_test to take (one x / y split), None: all."""
    from .sources import ArrayImages

    parts = []
    for split, index in (("train", train), ("test", test)):
        x, y = arrays[f"x_{split}"], np.asarray(arrays[f"y_{split}"])
        _check_streamed_images(path, f"x_{split}", x)
        n = len(x) if index is None else len(index)
        labels = _labels(y if index is None else y[index], path, n, None, f"y_{split}")
        parts.append((ArrayImages(x, labels.numpy(), name=f"{path}: x_{split}", index=index), labels))
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise DataError(f"{path}: x_train images {arrays['x_train'].shape[1:]} and x_test images "
                        f"{arrays['x_test'].shape[1:]} differ")
    k = int(max(parts[0][1].max(), parts[1][1].max())) + 1
    return Dataset(*parts[0], *parts[1], n_classes=k)


def _streamed_npz(path: str, test_fraction: Optional[float], budget: int) -> Dataset:
    from .sources import npz_is_compressed, open_npz

    if npz_is_compressed(path):
        raise DataError(f"{path}: its arrays take more than the memory budget ({budget / 2**20:.1f} MiB) and it is "
                        f"compressed, so it cannot be memory-mapped; write an uncompressed copy with: dcgmm convert "
                        f"{path} UNCOMPRESSED.npz")
    arrays = open_npz(path)
    if {"x_train", "y_train", "x_test", "y_test"} <= set(arrays):
        return _streamed(path, arrays)
    if {"x", "y"} <= set(arrays):
        train, test = _xy_split(path, arrays, test_fraction)
        x, y = arrays["x"], arrays["y"]
        return _streamed(path, {"x_train": x, "y_train": y, "x_test": x, "y_test": y}, train, test)
    raise DataError(f"{path}: expected keys x_train, y_train, x_test, y_test (or x, y), got {sorted(arrays)}")


def load_npy_dir(directory: str, *, memory_budget: Optional[int] = None) -> Dataset:
    """x_train.npy, y_train.npy, x_test.npy, y_test.npy in ``directory``: memory-mapped, loaded when they fit
    ``memory_budget`` (None: always loaded)."""
    from .sources import open_npy

    arrays = {k: open_npy(os.path.join(directory, f"{k}.npy")) for k in ("x_train", "y_train", "x_test", "y_test")}
    if memory_budget is not None and sum(a.nbytes for a in arrays.values()) > memory_budget:
        return _streamed(directory, arrays)
    return _dataset(directory, *(np.asarray(arrays[k]) for k in ("x_train", "y_train", "x_test", "y_test")))


def load_image_folders(root: str, image_shape: Tuple[int, int, int], *, test_fraction: Optional[float] = None,
                       skip_broken: bool = False) -> Dataset:
    """Images in class folders (``sources.read_image_folder``): ROOT/train and ROOT/test, or ROOT alone split by
    ``test_fraction``; resized and cropped to image_shape (H, W, C), C = 1 (grey) or 3 (RGB)."""
    from .sources import read_image_folder

    H, W, C = image_shape
    if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "test")):
        xt, yt, classes = read_image_folder(os.path.join(root, "train"), (H, W), C, skip_broken=skip_broken)
        xs, ys, test_classes = read_image_folder(os.path.join(root, "test"), (H, W), C, skip_broken=skip_broken)
        if test_classes != classes:
            raise DataError(f"{root}: train classes {classes} and test classes {test_classes} differ")
        return _dataset(root, xt, yt, xs, ys, len(classes))._replace(class_names=tuple(classes))
    if test_fraction is None or not 0 < test_fraction < 1:
        raise DataError(f"{root}: an image folder without train/ and test/ needs a test_fraction in (0, 1) to "
                        f"split it, got {test_fraction}")
    x, y, classes = read_image_folder(root, (H, W), C, skip_broken=skip_broken)
    train, test = split_indices(len(x), test_fraction)
    return _dataset(root, x[train], y[train], x[test], y[test], len(classes))._replace(class_names=tuple(classes))
