"""What files look like on disk, below every other layer: the format constants, the one way files are
published (written to a temporary file beside the target, then renamed over it: never half-written), and the
one way a folder is listed (links followed; a link that loops named, not a traceback)."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable

from cfmae_cli import __version__
from cfmae_cli.errors import CfmaeError

log = logging.getLogger(__name__)

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once, at import (os.umask is process-wide and not thread-safe)
FILE_MODE = 0o666 & ~_UMASK  # temporary files are 0600; what we publish gets the usual mode
UNLABELLED = 255  # the id of an unlabelled map pixel (instance and semantic maps)
MANIFEST_NAME = "cfmae-dataset.json"
DATASET_FORMAT_VERSION = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


NAME_MAX = 255  # bytes in one file name (ext4, XFS, Btrfs, tmpfs, NFS; a name of a file system's encoding)


def fit_name(name: str, room: int) -> str:
    """``name`` if it takes at most ``room`` bytes (its bytes on disk, ``os.fsencode``), else its start cut at a
    character, followed by ``~`` and 8 hex digits of a hash of the whole name (two long names that share their
    start stay apart). Temporary names are built from it so that they fit :data:`NAME_MAX` for every name that
    does."""
    raw = os.fsencode(name)
    if len(raw) <= room:
        return name
    mark = "~" + hashlib.sha1(raw).hexdigest()[:8]
    cut = name
    while len(os.fsencode(cut)) > room - len(mark):
        cut = cut[:-1]
    return cut + mark


def temporary_name(name: str, tag: str) -> str:
    """The hidden name ``.NAME.TAG`` under which a file or folder ``name`` is written before it is renamed into
    place; NAME shortened by :func:`fit_name` so that the whole stays within :data:`NAME_MAX` bytes."""
    return f".{fit_name(name, NAME_MAX - 2 - len(os.fsencode(tag)))}.{tag}"


def atomic_write(path: str | Path, write: Callable[[IO[Any]], object], binary: bool = False,
                 durable: bool = False) -> Path:
    """Publish ``path``: ``write(fh)`` fills a temporary file in the same folder, which then replaces ``path``
    (with the usual file mode). ``durable``: fsync the file before and the folder after the rename (a power
    loss keeps the old file or the new one). On any error the temporary file is removed and ``path`` is
    untouched; the error propagates, an :class:`OSError` naming ``path`` (a write error of a full disk names no
    file by itself, and the temporary name would mean nothing to the user)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, prefix = "", f".{fit_name(path.name, NAME_MAX - 14)}."  # mkstemp adds 8 characters, then ".tmp"
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            write(fh)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            tried = exc.filename if not tmp and isinstance(exc.filename, str) and \
                Path(exc.filename).name.startswith(prefix) else ""  # mkstemp's name for the file it could not make
            name_target(exc, path, tmp, tried)
        raise
    if durable:
        fsync_path(path.parent)
    return path


def name_target(exc: OSError, path: str | Path, *stand_ins: str | Path) -> OSError:
    """Make ``exc`` name ``path`` when it names no file, or only one of ``stand_ins`` (a temporary file that is
    gone by the time the user reads the message); returns ``exc``."""
    named = {os.fsdecode(s) for s in stand_ins if s}
    if exc.filename is None or (isinstance(exc.filename, (str, bytes)) and os.fsdecode(exc.filename) in named):
        exc.filename, exc.filename2 = str(path), None
    elif isinstance(exc.filename2, (str, bytes)) and os.fsdecode(exc.filename2) in named:
        exc.filename2 = None
    return exc


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda fh: fh.write(text))


def fsync_path(path: str | Path) -> None:
    """Flush a file or folder to the disk (after a rename: a power loss then keeps whole files); best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
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
    ``"tool"``), with the command that made it (:func:`png_stamp`, :func:`json_stamp`), so that a later run of the
    same command knows it may replace that file."""
    return f"cfmae {__version__}"


COMMAND_KEY = "cfmae-command"  # the PNG text chunk that names the command that wrote the file


def png_stamp(command: str | None) -> dict[str, str]:
    """PNG text chunks of a figure that ``command`` wrote (``Software`` and :data:`COMMAND_KEY`)."""
    return {"Software": software(), **({COMMAND_KEY: command} if command else {})}


def json_stamp(command: str) -> dict[str, str]:
    """The first keys of a JSON report that ``command`` wrote (``"tool"``, ``"command"``)."""
    return {"tool": software(), "command": command}


def stamped_by(path: Path) -> str | None:
    """The command that wrote the PNG or JSON file ``path`` (its stamp: :func:`png_stamp`, :func:`json_stamp`);
    ``""`` for a file cfmae stamped without a command (earlier versions, or run records); None for any other
    file."""
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
        if head == b"\x89PNG\r\n\x1a\n":
            from PIL import Image  # heavy: keeps cfmae --help fast

            with Image.open(path) as im:
                if str(im.info.get("Software", "")).startswith("cfmae"):
                    return str(im.info.get(COMMAND_KEY, ""))
                return None
        if head.lstrip()[:1] == b"{":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and str(data.get("tool", "")).startswith("cfmae"):
                return str(data.get("command", "")) if isinstance(data.get("command"), str) else ""
    except (OSError, ValueError, SyntaxError):
        return None
    return None


def written_by_cfmae(path: Path) -> bool:
    """True for a PNG or JSON file that carries cfmae's stamp (:func:`stamped_by`)."""
    return stamped_by(path) is not None


def check_output(path: str | Path, inputs: tuple[Path, ...] | list[Path] = (), what: str = "--out", *,
                 command: str, beside: Path | None = None) -> Path:
    """``path`` if ``command`` may write it: not one of the command's ``inputs``, not a folder, and either new or
    a file that the same command wrote before (:func:`stamped_by`). Anything else, a file of another command
    included, is refused with a :class:`CfmaeError`, before any work is done, so that no file of the user's (or
    another command's record) is ever replaced. ``beside``: ``path`` is written next to this ``--out`` (the JSON of
    a figure), and the message says so."""
    path = Path(path)
    named = f"{what} {path}" if beside is None else f"{what} {beside}: {path} (written beside it)"
    for source in inputs:
        try:
            same = path.exists() and Path(source).exists() and os.path.samefile(path, source)
        except OSError:
            same = False
        if same:
            raise CfmaeError(f"{named}: that is an input of this command ({source}); it would be replaced. "
                             f"Choose another {what}.")
    if path.is_dir():
        raise CfmaeError(f"{named}: a folder; give a file name (e.g. {path / 'out.png'}).")
    if path.exists() or path.is_symlink():
        by = stamped_by(path) if path.is_file() else None
        if by is None:
            raise CfmaeError(f"{named}: the file exists and was not written by cfmae; it is not replaced. "
                             f"Choose another {what}, or move the file away.")
        if by != command:
            maker = f"`cfmae {by}`" if by else "cfmae (a run's record, or an earlier version)"
            raise CfmaeError(f"{named}: the file was written by {maker}, not by `cfmae {command}`; it is not "
                             f"replaced. Choose another {what}, or move the file away.")
    return path
