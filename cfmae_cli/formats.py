"""What files look like on disk, below every other layer: the format constants, the one way files are
published (written to a temporary file beside the target, then renamed over it: never half-written), and the
one way a folder is listed (links followed; a link that loops named, not a traceback)."""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable

from cfmae_cli.errors import CfmaeError

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class Listing:
    """Names in a folder, sorted: regular files and folders, symbolic links followed."""

    files: list[str]
    dirs: list[str]

    @property
    def names(self) -> list[str]:
        """Every entry: the files, then the folders."""
        return [*self.files, *self.dirs]


def need_folder(path: str | Path, what: str = "") -> Path:
    """``path`` if it is a folder; else a :class:`CfmaeError` that says whether it is a file or missing
    (``what``: how the user named it, e.g. ``--data``)."""
    path = Path(path)
    named = f"{what} {path}" if what else str(path)
    if path.is_file():
        raise CfmaeError(f"{named}: a file, not a folder.")
    if not path.is_dir():
        raise CfmaeError(f"{named}: folder not found.")
    return path


def list_folder(folder: str | Path) -> Listing:
    """The files and folders in ``folder``. A folder that is not there, is a file or cannot be read, and an entry
    that is a link looping back on itself, stop with a :class:`CfmaeError` naming the path; a link to nothing is
    left out (with a warning)."""
    folder = Path(folder)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except FileNotFoundError:
        raise CfmaeError(f"{folder}: folder not found.") from None
    except NotADirectoryError:
        raise CfmaeError(f"{folder}: a file, not a folder.") from None
    except OSError as exc:
        raise CfmaeError(f"{folder}: the folder cannot be read ({exc.strerror or exc}).") from None
    files, dirs, dangling = [], [], []
    for entry in entries:
        try:
            if entry.is_dir():
                dirs.append(entry.name)
            elif entry.is_file():
                files.append(entry.name)
            elif entry.is_symlink():
                dangling.append(entry.name)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CfmaeError(f"{entry.path}: a symbolic link that loops (it leads back to itself); remove it or "
                                 f"point it at a file.") from None
            raise CfmaeError(f"{entry.path}: cannot be read ({exc.strerror or exc}).") from None
    if dangling:
        log.warning("%s: %d link(s) to nothing left out (e.g. %s)", folder, len(dangling), dangling[0])
    return Listing(files, dirs)


def software() -> str:
    """The stamp written into every file cfmae makes for a user to look at (PNG ``Software`` text, JSON
    ``"tool"``), so that a later run knows it may replace that file."""
    from cfmae_cli import __version__

    return f"cfmae {__version__}"


def written_by_cfmae(path: Path) -> bool:
    """True for a PNG or JSON file that carries cfmae's stamp (:func:`software`)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
        if head == b"\x89PNG\r\n\x1a\n":
            from PIL import Image

            with Image.open(path) as im:
                return str(im.info.get("Software", "")).startswith("cfmae")
        if head.lstrip()[:1] == b"{":
            import json

            data = json.loads(path.read_text(encoding="utf-8"))
            return isinstance(data, dict) and str(data.get("tool", "")).startswith("cfmae")
    except (OSError, ValueError, SyntaxError):
        return False
    return False


def check_output(path: str | Path, inputs: tuple[Path, ...] | list[Path] = (), what: str = "--out") -> Path:
    """``path`` if a command may write it: not one of the command's ``inputs``, not a folder, and either new or a
    file cfmae wrote before (stamped, :func:`written_by_cfmae`). Anything else is refused with a
    :class:`CfmaeError`, before any work is done, so that no file of the user's is ever replaced."""
    path = Path(path)
    for source in inputs:
        try:
            same = path.exists() and Path(source).exists() and os.path.samefile(path, source)
        except OSError:
            same = False
        if same:
            raise CfmaeError(f"{what} {path}: that is an input of this command ({source}); it would be replaced. "
                             f"Choose another {what}.")
    if path.is_dir():
        raise CfmaeError(f"{what} {path}: a folder; give a file name (e.g. {path / 'out.png'}).")
    if path.exists() and not written_by_cfmae(path):
        raise CfmaeError(f"{what} {path}: the file exists and was not written by cfmae; it is not replaced. Choose "
                         f"another {what}, or move the file away.")
    return path
