"""How a run was made: ``RUN/run.json`` (one entry per start, a resume adds one) with the command line, the
versions, the package's git commit, the host, the devices, the world size and the resolved data with the
digest of its manifest; and the outcome (done / stopped / failed, with the reason) as the last line of
``log.txt`` and in the entry."""

from __future__ import annotations

import contextlib
import datetime
import logging
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from cfmae_cli import __version__
from cfmae_cli.formats import atomic_write_text, MANIFEST_NAME, software
from cfmae_cli.train.divergence import TrainingDiverged
from cfmae_cli.train.faults import Preempted

log = logging.getLogger(__name__)

RUN_JSON = "run.json"
PACKED_MANIFEST = "cfmae-packed.json"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except (ImportError, AttributeError):
        return None


def git_commit(folder: Path = Path(__file__).resolve().parent) -> dict[str, Any] | None:
    """The commit of the git checkout that holds the package (and whether it has uncommitted changes); None
    for an installed wheel or without git."""
    try:
        run = lambda *a: subprocess.run(["git", "-C", str(folder), *a], capture_output=True, text=True,  # noqa: E731
                                        timeout=10)
        head = run("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = run("status", "--porcelain", "--untracked-files=no")
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def data_digest(root: Path | None) -> dict[str, Any]:
    """The data folder and the sha256 of its manifest (the dataset layout's, or a packed folder's)."""
    if root is None:
        return {"root": None}
    root = Path(root).resolve()
    for name in (MANIFEST_NAME, PACKED_MANIFEST):
        if (root / name).is_file():
            return {"root": str(root), "manifest": name,
                    "manifest_sha256": hashlib.sha256((root / name).read_bytes()).hexdigest()}
    return {"root": str(root), "manifest": None}


def devices(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return [f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"]


def command_line() -> list[str]:
    """The command line the user typed (``CFMAE_COMMAND_LINE``, set by the command line and inherited by the
    worker processes it launches), else this process's own."""
    try:
        return list(json.loads(os.environ["CFMAE_COMMAND_LINE"]))
    except (KeyError, ValueError, TypeError):
        return ["cfmae", *sys.argv[1:]]


def session(command: str, device: torch.device, world: int, data_root: Path | None, resumed: bool,
            bf16: bool) -> dict[str, Any]:
    """The entry of this start of the run."""
    return {"started": _now(), "command": command, "argv": command_line(), "resumed": resumed,
            "versions": {"cfmae": __version__, "python": platform.python_version(), "torch": torch.__version__,
                         "torchvision": _version("torchvision"), "timm": _version("timm"),
                         "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()
                         if torch.backends.cudnn.is_available() else None},
            "git": git_commit(), "host": socket.gethostname(), "platform": platform.platform(),
            "devices": devices(device), "world_size": world, "bf16": bf16, "data": data_digest(data_root),
            "outcome": "running"}


def record_start(run_dir: Path, entry: dict[str, Any]) -> None:
    """Append ``entry`` to ``run.json``'s sessions."""
    _write_sessions(run_dir / RUN_JSON, [*read_sessions(run_dir / RUN_JSON), entry])


def record_outcome(run_dir: Path, outcome: str, reason: str = "") -> None:
    """Set the last session's outcome (``done``, ``stopped``, ``failed``) and its reason."""
    sessions = read_sessions(run_dir / RUN_JSON)
    if sessions:
        sessions[-1].update(outcome=outcome, reason=reason, ended=_now())
        _write_sessions(run_dir / RUN_JSON, sessions)


def _write_sessions(path: Path, sessions: list[dict[str, Any]]) -> None:
    atomic_write_text(path, json.dumps({"tool": software(), "sessions": sessions}, indent=2) + "\n")


def read_sessions(path: Path) -> list[dict[str, Any]]:
    try:
        return list(json.loads(path.read_text())["sessions"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


@contextlib.contextmanager
def outcome(run_dir: Path, main: bool) -> Iterator[Callable[[str], None]]:
    """Around the training of a run: its outcome as the last line of ``log.txt`` and in ``run.json`` (rank 0).
    The block calls the function it is given with the reason of a run that finished; an exception leaving the
    block is recorded as ``stopped`` (a signal) or ``failed``, and raised on."""
    def done(reason: str) -> None:
        if main:
            log.info("done: %s", reason)
            record_outcome(run_dir, "done", reason)

    try:
        yield done
    except Preempted as exc:
        if main:
            log.info("stopped: %s", exc)
            record_outcome(run_dir, "stopped", str(exc))
        raise
    except BaseException as exc:
        if main:
            reason = str(exc) if isinstance(exc, TrainingDiverged) else f"{type(exc).__name__}: {exc}"
            log.error("failed: %s", reason)
            record_outcome(run_dir, "failed", reason)
        raise
