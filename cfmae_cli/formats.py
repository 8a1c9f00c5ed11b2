"""What files look like on disk, below every other layer: the format constants and the one way files are
published (written to a temporary file beside the target, then renamed over it: never half-written)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once, at import (os.umask is process-wide and not thread-safe)
FILE_MODE = 0o666 & ~_UMASK  # temporary files are 0600; what we publish gets the usual mode
UNLABELLED = 255  # the id of an unlabelled map pixel (instance and semantic maps)
MANIFEST_NAME = "cfmae-dataset.json"
DATASET_FORMAT_VERSION = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def atomic_write(path: str | Path, write: Callable[[IO[Any]], None], binary: bool = False,
                 durable: bool = False) -> Path:
    """Publish ``path``: ``write(fh)`` fills a temporary file in the same folder, which then replaces ``path``
    (with the usual file mode). ``durable``: fsync the file before and the folder after the rename (a power
    loss keeps the old file or the new one). On any error the temporary file is removed and ``path`` is
    untouched; the error propagates."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            write(fh)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda fh: fh.write(text))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
