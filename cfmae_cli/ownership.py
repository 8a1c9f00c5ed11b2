"""Who may write a folder, and what in it is cfmae's.

A command that writes a run folder, a dataset, a pack or an export holds an exclusive lock on it for its
whole life: ``fcntl.flock`` on a lock file (:data:`LOCK_NAME` in the folder, or one beside it). The kernel
releases the lock when the process ends, however it ends, so a crash or ``kill -9`` never leaves a stale
lock; the file stays (it is cfmae's, like the folder's other files) and says who held it last. A second
writer is refused with one line that names the holder's PID and command line.

Processes started by the holder to do its work (the workers of ``--gpus N`` / ``--procs P``) do not lock
again: the holder lists the folders it holds in :data:`HELD_ENV`, which they inherit.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fnmatch
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from cfmae_cli.errors import CfmaeError

log = logging.getLogger(__name__)

LOCK_NAME = ".cfmae-lock"
HELD_ENV = "CFMAE_HELD_FOLDERS"  # JSON [[pid, folder], …]: the folders held, for the holder's own workers

try:  # Windows has no flock: there the folders are not locked
    import fcntl
except ImportError:  # pragma: no cover - not a Linux or macOS machine
    fcntl = None  # type: ignore[assignment]  # (Windows: no fcntl; the locks say so)


def _key(folder: Path) -> str:
    return os.path.realpath(folder)


def _held_by_ancestor(folder: Path) -> bool:
    """Whether a process above this one (the launcher of this worker) holds ``folder`` (:data:`HELD_ENV`)."""
    holders = {pid for pid, path in _held() if path == _key(folder)}
    return bool(holders & set(_ancestors()))


def _held() -> list[tuple[int, str]]:
    try:
        return [(int(pid), str(path)) for pid, path in json.loads(os.environ.get(HELD_ENV, "[]"))]
    except (ValueError, TypeError):
        return []


def _set_held(entries: list[tuple[int, str]]) -> None:
    if entries:
        os.environ[HELD_ENV] = json.dumps(entries)
    else:
        os.environ.pop(HELD_ENV, None)


def _ancestors() -> list[int]:
    """This process's parent, its parent, … (from /proc; just the parent where /proc is missing)."""
    chain, pid = [], os.getppid()
    for _ in range(16):
        if pid <= 1:
            break
        chain.append(pid)
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
                pid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return chain


def _describe(holder: dict[str, object]) -> str:
    pid, host = holder.get("pid"), holder.get("host")
    where = "" if host in (None, socket.gethostname()) else f" on {host}"
    since = f", since {holder['since']}" if holder.get("since") else ""
    line = str(holder.get("command") or "")
    command = f" ({line[:117] + '…' if len(line) > 118 else line})" if line else ""
    return f"PID {pid}{where}{command}{since}"


class FolderLock:
    """The exclusive lock of one folder, held from :meth:`acquire` until :meth:`release` (or the process's end).
    ``lock_file``: where the lock lives (default ``folder/.cfmae-lock``); ``what``: how the user named the
    folder in the command (``--out``, ``--resume``, ``DATA``), for the message."""

    def __init__(self, folder: str | Path, what: str = "--out", lock_file: str | Path | None = None):
        self.folder = Path(folder)
        self.what = what
        self.path = Path(lock_file) if lock_file is not None else self.folder / LOCK_NAME
        self.fd: int | None = None
        self.inherited = False

    def acquire(self) -> "FolderLock":
        """Take the lock, or raise :class:`CfmaeError` naming the process that holds it. The folder of the lock
        file must exist."""
        if fcntl is None or self.fd is not None:
            return self
        if _held_by_ancestor(self.folder):
            self.inherited = True
            return self
        for _ in range(100):  # the file can be replaced between open and flock: lock the file that is there
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, str(self.path)) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)  # no locks on this file system (some network mounts): go on unlocked
                    log.warning("%s: cannot be locked (%s); two cfmae processes writing %s at once are not "
                                "prevented there", self.path, exc.strerror or exc, self.folder)
                    return self
                holder = _read_holder(fd)
                os.close(fd)
                raise CfmaeError(f"{self.what} {self.folder}: in use by another cfmae process: {_describe(holder)}. "
                                 f"Wait for it to end (or stop it), or choose another {self.what}.") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                self._record()
                _set_held([*_held(), (os.getpid(), _key(self.folder))])
                return self
            os.close(fd)
        raise CfmaeError(f"{self.path}: the lock file keeps being replaced; is another program removing it?")

    def _record(self) -> None:
        argv = " ".join(["cfmae", *sys.argv[1:]]) if sys.argv else "cfmae"
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": argv[:500],
                  "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        data = (json.dumps(holder) + "\n").encode()
        assert self.fd is not None
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, data, 0)
        except OSError:  # a full disk: the lock holds all the same, the message just names no holder
            pass

    def release(self, remove: bool = True) -> None:
        """Let go of the lock, removing the lock file first (``remove``; a process that opened it meanwhile finds
        it gone when it gets the lock, and makes a new one: :meth:`acquire`)."""
        if self.fd is None:
            return
        if remove:
            try:
                self.path.unlink(missing_ok=True)
            except OSError:  # a read-only folder by now: the file stays, the lock goes with the descriptor
                pass
        _set_held([e for e in _held() if e != (os.getpid(), _key(self.folder))])
        os.close(self.fd)  # closing the only descriptor of the lock releases it
        self.fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> dict[str, object]:
    """What the holder wrote into the lock file (it writes it just after it took the lock: wait for it briefly)."""
    for _ in range(20):
        try:
            text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            holder = json.loads(text) if text.strip() else None
        except (OSError, ValueError):
            holder = None
        if isinstance(holder, dict):
            return holder
        time.sleep(0.025)
    return {"pid": "unknown"}


@contextlib.contextmanager
def locked(folder: str | Path, what: str = "--out", lock_file: str | Path | None = None) -> Iterator[FolderLock]:
    """Hold the lock of ``folder`` inside the block (:class:`FolderLock`)."""
    lock = FolderLock(folder, what, lock_file).acquire()
    try:
        yield lock
    finally:
        lock.release()


@contextlib.contextmanager
def writing(folder: str | Path, what: str = "--out") -> Iterator[FolderLock]:
    """Hold the lock of the output folder ``folder`` inside the block, making the folder if it is missing. When
    the block fails (a refusal), the folder is left as it was found: the folders made here and still empty are
    removed again."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CfmaeError(f"{what} {folder}: a file, not a folder; choose a new or empty folder.")
    made = missing_folders(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with locked(folder, what) as lock:
            yield lock
    except BaseException:
        remove_empty(*made)
        raise


def remove_empty(*folders: Path) -> None:
    """Remove each of ``folders`` (innermost first) while it is empty; one that holds something stays, and so do
    the folders above it."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # something else is (or appeared) in it
            return


def missing_folders(path: Path) -> tuple[Path, ...]:
    """``path`` and the folders above it that do not exist yet, innermost first."""
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    return tuple(missing)


def matches(relative: str, patterns: tuple[str, ...]) -> bool:
    """Whether the path ``relative`` (to a folder, with ``/``) is one of ``patterns``: a pattern ending in ``/``
    covers a folder and everything in it; others are ``fnmatch`` patterns of the whole path."""
    for pattern in patterns:
        if pattern.endswith("/"):
            if relative == pattern[:-1] or relative.startswith(pattern):
                return True
        elif fnmatch.fnmatchcase(relative, pattern):
            return True
    return False


def foreign_files(folder: Path, patterns: tuple[str, ...]) -> list[str]:
    """The paths in ``folder`` (relative, with ``/``, sorted) that none of ``patterns`` covers: what cfmae did
    not write. Links count as files (never followed); an empty folder that no pattern names counts too."""
    foreign = []
    for dirpath, dirnames, filenames in os.walk(folder):
        rel = os.path.relpath(dirpath, folder)
        rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        if rel and not dirnames and not filenames and not matches(rel[:-1], patterns):
            foreign.append(rel)
        descend = []
        for name in dirnames:
            if os.path.islink(os.path.join(dirpath, name)):
                filenames.append(name)
            elif not any(p == rel + name + "/" for p in patterns):  # a folder wholly cfmae's is not looked into
                descend.append(name)
        dirnames[:] = descend
        foreign += [rel + name for name in filenames if not matches(rel + name, patterns)]
    return sorted(foreign)


def remove_files(folder: Path, patterns: tuple[str, ...], keep: tuple[str, ...] = (LOCK_NAME,)) -> None:
    """Remove what ``patterns`` cover in ``folder`` (files, and folders left empty), except ``keep``; the folder
    itself stays."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        rel = path.relative_to(folder).as_posix()
        if rel in keep or not matches(rel, patterns):
            continue
        if path.is_dir() and not path.is_symlink():
            if not any(path.iterdir()):
                path.rmdir()
        else:
            path.unlink(missing_ok=True)
