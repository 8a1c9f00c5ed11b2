"""What every command shares: logging set-up, error handling (exit 2 for bad input), the console."""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys
from typing import Any, Callable

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

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
        handler._cfmae_console = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False


class _CurrentStderr(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is at the time of the record."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


USER_OS_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def os_error_line(exc: OSError) -> str:
    """One line for a file system refusal of the user's machine (no permission, read-only, full), naming the
    path and what to do."""
    path = exc.filename or "a file"
    fix = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free disk space (quota)",
           errno.EROFS: "choose a writable place (--out, or CFMAE_CACHE for the cache)"}.get(
        exc.errno, "check its permissions, or choose a writable place (--out, or CFMAE_CACHE for the cache)")
    return f"{path}: {exc.strerror or exc}; {fix}."


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
        except OSError as exc:
            if STATE["verbose"] or exc.errno not in USER_OS_ERRORS:
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
    from cfmae_cli.train import distributed

    for flag, value in optional.items():
        if value is not None:
            args = [*args, flag, str(value)]
    code = distributed.launch(args, world)
    if code:
        raise typer.Exit(code)
