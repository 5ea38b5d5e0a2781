"""Atomic file writes: nothing the package writes is ever left half-written.

Every file (checkpoints, metrics, logs, PNGs) is written to a temporary file in the target's folder, flushed,
fsynced and renamed over the target (``os.replace`` is atomic on POSIX and Windows within one file system), so a
kill at any moment leaves either the previous complete file or the new complete one, never a truncated one.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from typing import IO, Iterable, Iterator

#: temporaries are ".<target name>.<random><_SUFFIX>" beside the target
_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on success fsync it and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is untouched.
    ``DCGMM_TEST_SLOW_WRITES=SECONDS`` (tests only) sleeps between writing and renaming, so a test can kill a
    process inside the window deterministically.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        slow = float(os.environ.get("DCGMM_TEST_SLOW_WRITES", "0") or 0)
        if slow > 0:
            time.sleep(slow)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def write_json(path: str, obj, **kw) -> None:
    """``json.dump`` of ``obj`` to ``path``, atomically."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, **kw)


def write_text(path: str, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def remove_stale_temporaries(folder: str, targets: Iterable[str]) -> None:
    """Delete the temporaries that a killed ``atomic_open`` left in ``folder`` for files whose names start with
    one of ``targets`` (e.g. "checkpoint" covers checkpoint.pt and checkpoint_step0000050.pt)."""
    prefixes = tuple(f".{t}" for t in targets)
    for name in os.listdir(folder):
        if name.startswith(prefixes) and name.endswith(_SUFFIX):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))
