"""What every command shares: logging set-up, error handling (exit 2 for bad input), the console."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from cfmae_cli.api.common import Report
from cfmae_cli.errors import CfmaeError

console = Console(soft_wrap=True, markup=False)  # text is printed as it is (file names, "[rgb]", "[default: …]")
err_console = Console(stderr=True, soft_wrap=True, markup=False)
STATE = {"verbose": False}


def setup(verbose: bool) -> None:
    STATE["verbose"] = verbose
    logger = logging.getLogger("cfmae_cli")
    worker = int(os.environ.get("RANK", "0")) > 0  # ranks > 0 of a distributed run only warn
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if worker else logging.INFO)
    if not any(getattr(h, "_cfmae_console", False) for h in logger.handlers):
        if sys.stderr.isatty():
            handler: logging.Handler = RichHandler(console=err_console, show_path=False, show_time=False,
                                                   markup=False)
            handler.setFormatter(logging.Formatter("%(message)s"))
        else:
            handler = _CurrentStderr()
            handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        handler._cfmae_console = True  # type: ignore[attr-defined]  # our mark on the handler
        logger.addHandler(handler)
    logger.propagate = False


@contextlib.contextmanager
def logs_to(live: Console) -> Iterator[None]:
    """While a live display (a progress line) is drawn through the console ``live``: print cfmae's log records
    through it too, so that each starts on its own line above the display. Through another console on the same
    terminal (``err_console``: stdout and stderr are one terminal) a record would land on the display's line,
    glued to it, and the next redraw would erase it. Handlers of a stderr that is not a terminal are left as
    they are: their records go to their file."""
    handlers = [h for h in logging.getLogger("cfmae_cli").handlers
                if isinstance(h, RichHandler) and getattr(h, "_cfmae_console", False)]
    before = [h.console for h in handlers]
    for handler in handlers:
        handler.console = live
    try:
        yield
    finally:
        for handler, console_ in zip(handlers, before):
            handler.console = console_


class SafeStream:
    """``sys.stdout`` or ``sys.stderr`` as cfmae writes to them: printing never stops the work. Characters the
    stream's encoding lacks are replaced (``PYTHONIOENCODING=ascii``, a C locale); once the stream is lost (a
    broken pipe: the reader of ``cfmae … | head -1`` went away; a closed descriptor; a terminal that hung up),
    its descriptor is pointed at ``os.devnull`` and what is written goes nowhere, while the command goes on and
    exits with its own code. Everything else is the wrapped stream's (``isatty``, ``encoding``, ``fileno`` …)."""

    def __init__(self, stream: Any):
        self._stream = stream
        self.lost = False

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except UnicodeEncodeError:
            encoding = getattr(self._stream, "encoding", None) or "ascii"
            return self._guarded(self._stream.write, text.encode(encoding, "replace").decode(encoding)) or len(text)
        except (OSError, ValueError):  # ValueError: a closed file
            self._lose()
            return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._guarded(self._stream.flush)

    def _guarded(self, call: Callable[..., Any], *args: Any) -> Any:
        try:
            return call(*args)
        except (OSError, ValueError):
            self._lose()
            return None

    def _lose(self) -> None:
        """From now on, write to ``os.devnull``; the descriptor too, so that the interpreter's last flush of the
        original stream at exit succeeds (a failed one would print a traceback and change the exit code)."""
        if self.lost:
            return
        self.lost = True
        try:
            fd = self._stream.fileno()
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)
        except (OSError, ValueError, AttributeError):
            pass
        self._stream = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - lives as long as the process

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def protect_streams() -> None:
    """Make ``sys.stdout`` and ``sys.stderr`` :class:`SafeStream` s (once; a missing one, as under ``>&-``,
    becomes ``os.devnull``), so that no print, progress line or log record can end a command."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, SafeStream):
            continue
        if stream is None:
            stream = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
        try:
            stream.reconfigure(errors="replace")
        except (AttributeError, ValueError, OSError):
            pass
        setattr(sys, name, SafeStream(stream))


class _CurrentStderr(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is at the time of the record."""

    @property
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


WRITABLE = "choose a writable place (--out, or CFMAE_CACHE for the cache)"
OS_FIXES = {
    errno.EACCES: f"check its permissions, or {WRITABLE}",
    errno.EPERM: f"check its permissions, or {WRITABLE}",
    errno.EROFS: f"the file system is read-only: {WRITABLE}",
    errno.EDQUOT: "free disk space within your quota, or choose another place",
    errno.EEXIST: "something of that name is in the way (a file where a folder is needed, or a folder where a "
                  "file is): move it away or choose another path",
    errno.EISDIR: "a folder where a file is needed: give a file name",
    errno.ENOENT: "not found: check the path (and that its folder exists)",
    errno.ENOTEMPTY: "the folder is not empty: move its files away or choose another folder",
    errno.ELOOP: "a symbolic link that loops (it leads back to itself): remove it or point it at a file",
    errno.EIO: "an input/output error of the disk or network file system: check the device (e.g. `dmesg`) and try "
               "again",
    errno.EMFILE: "too many open files: raise the limit (`ulimit -n`) or use fewer worker processes "
                  "(data.num_workers, --workers)",
    errno.ENFILE: "too many open files on this machine: close some programs or raise the limit",
    errno.EFBIG: "the file is too large for this file system: choose another place",
    errno.EBUSY: "in use by another process: try again when it is done",
    errno.ETXTBSY: "in use by another process: try again when it is done",
    errno.ESTALE: "a stale file handle of a network file system: remount it or try again",
    errno.ENOMEM: "out of memory: use smaller batches or fewer worker processes",
}


def os_error_line(exc: OSError) -> str:
    """One line for any :class:`OSError`: the path(s) it names (``filename`` → ``filename2``), the system's
    reason and what to do about it."""
    paths = [os.fsdecode(p) for p in (exc.filename, exc.filename2) if isinstance(p, (str, bytes))]
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno == errno.ENOSPC:
        fix = "free disk space" + (_disk_of(paths[0]) if paths else "")
    elif exc.errno == errno.ENAMETOOLONG and paths:
        fix = _too_long(paths)
    elif exc.errno == errno.ENOTDIR and paths:
        blocking = next((p for p in Path(paths[0]).parents if p.is_file()), None)
        fix = (f"{blocking} is a file, not a folder: give a path whose folders are folders" if blocking else
               "a part of the path is not a folder: check the path")
    else:
        fix = OS_FIXES.get(exc.errno or 0, "check the path and try again")
    if not paths:
        return f"{reason} ({type(exc).__name__}, no file named; `cfmae --verbose …` shows where); {fix}."
    return f"{' → '.join(paths)}: {reason}; {fix}."


def _disk_of(path: str) -> str:
    """`` on the disk mounted at M (N MiB free)`` for the disk that holds ``path`` (its nearest existing
    folder); empty when that cannot be told."""
    folder = Path(path).absolute()
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    mount = folder
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        return f" on the disk mounted at {mount} ({shutil.disk_usage(folder).free / 2**20:,.0f} MiB free)"
    except OSError:
        return ""


def _too_long(paths: list[str]) -> str:
    """What is too long in a path: one of its names (more than NAME_MAX bytes), or the whole path."""
    from cfmae_cli.formats import NAME_MAX

    names = [n for p in paths for n in os.fsencode(p).split(b"/")]
    longest = max(names, key=len)
    if len(longest) > NAME_MAX:
        name = os.fsdecode(longest)
        return (f"the name {name[:40]}… has {len(longest)} bytes, more than the {NAME_MAX} a file system allows: "
                f"choose a shorter name")
    size = max(len(os.fsencode(p)) for p in paths)
    return f"the path has {size} bytes, more than this system allows: choose a shorter path"


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn :class:`CfmaeError` into one clear message and exit code 2; other failures into exit 1 with a
    hint (``--verbose`` shows the traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except CfmaeError as exc:
            if STATE["verbose"]:
                raise
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:  # whatever the errno: a path of the user's machine, named, exit 2
            if STATE["verbose"]:
                raise
            err_console.print(f"[bold red]error:[/] {escape(os_error_line(exc))}", markup=True, highlight=False,
                              soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - the last line of defence of a command-line tool
            if STATE["verbose"]:
                raise
            err_console.print(f"[bold red]error:[/] {escape(f'{type(exc).__name__}: {exc}')}\n"
                              f"(rerun with `cfmae --verbose …` for the traceback)", markup=True, highlight=False,
                              soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def device_of(device: str | None, gpus: int | None) -> str | None:
    """The one device rule of the single-device commands: ``--gpus 0`` is the CPU, ``--gpus 1`` one GPU, and
    without ``--gpus`` the ``--device`` given."""
    return device if gpus is None else ("cuda" if gpus == 1 else "cpu")


def is_terminal() -> bool:
    return sys.stdout.isatty()


def launch_workers(args: list[str], optional: dict[str, Any], world: int) -> None:
    """Run ``cfmae ARGS`` (plus each ``optional`` flag that is not None) as ``world`` local worker processes;
    exit with their code when one fails."""
    from cfmae_cli.api.common import WorkersFailed, launch_command

    try:
        launch_command(args, optional, world)
    except WorkersFailed as exc:
        raise typer.Exit(exc.code) from None


class Printed(Report):
    """An API function's lines (:class:`cfmae_cli.api.Report`) printed on the console as they are."""

    def say(self, text: str) -> None:
        console.print(text, highlight=False)
