"""Run folders (DESIGN §2): ``runs/<command>/<name>[-k]/`` with config.yaml, metrics.jsonl, log.txt, …"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Iterator

from cfmae_cli.checkpoints import checkpoint_path
from cfmae_cli.errors import CfmaeError
from cfmae_cli.train import distributed
from cfmae_cli.formats import atomic_write_text

log = logging.getLogger(__name__)


class RunFolder:
    """The folder of a run, for its whole life: a new one (rank 0 makes it, every rank learns its path) or the
    folder of the checkpoint ``resume``; ``log.txt`` receives the log while it is open; a new run refused on bad
    input before training (:meth:`refused_leaves_nothing`) leaves no folder behind."""

    def __init__(self, command: str, name: str, out: str | Path | None, resume: str | Path | None,
                 info: distributed.DistInfo):
        self.info, self.new = info, resume is None
        self.checkpoint = None if resume is None else checkpoint_path(resume)
        if self.checkpoint is not None:
            self.path = self.checkpoint.parent.parent
        else:
            made = None
            if info.is_main:
                made = str(new_run_dir(command, name, out))
                mark_started(Path(made))
            self.path = Path(distributed.broadcast(made, info))
        self.handler: logging.Handler | None = None

    def __enter__(self) -> "RunFolder":
        self.handler = attach_log_file(self.path) if self.info.is_main else None
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach_log()

    def detach_log(self) -> None:
        if self.handler is not None:
            logging.getLogger("cfmae_cli").removeHandler(self.handler)
            self.handler.close()
            self.handler = None

    @contextlib.contextmanager
    def refused_leaves_nothing(self) -> Iterator[None]:
        """Inside: the run is set up; any failure there (bad input, a missing file, an interrupt) removes a new
        run's folder and goes on."""
        try:
            yield
        except BaseException:
            if self.info.is_main and self.new:
                self.detach_log()
                _empty(self.path)
                self.path.rmdir()
            raise


def _empty(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()


def has_checkpoint(path: Path) -> bool:
    """Whether the run folder ``path`` holds a checkpoint to continue from (``checkpoints/*.pt``)."""
    return any((path / "checkpoints").glob("*.pt"))


NO_CHECKPOINT_YET = ".cfmae-no-checkpoint-yet"  # in a new run folder until its first checkpoint is written


def mark_started(path: Path) -> None:
    """Mark the new run folder ``path`` as holding no checkpoint yet: if the run fails before one, the same
    ``--out`` may start again (:func:`new_run_dir` empties it)."""
    (path / NO_CHECKPOINT_YET).write_text("this run has written no checkpoint yet; `--out` here starts it again\n")


def mark_checkpointed(path: Path) -> None:
    (path / NO_CHECKPOINT_YET).unlink(missing_ok=True)


def new_run_dir(command: str, name: str, out: str | Path | None = None, base: str | Path = "runs") -> Path:
    """Create the run folder: ``out`` if given (it must not hold a run already), else the first free
    ``base/command/name``, ``name-2``, ``name-3``, …"""
    if out is not None:
        path = Path(out)
        if path.exists() and not path.is_dir():
            raise CfmaeError(f"--out {path}: a file, not a folder; give a new folder for the run.")
        if path.is_dir() and any(path.iterdir()):
            training = command in ("pretrain", "finetune")
            if training and (path / NO_CHECKPOINT_YET).is_file() and not has_checkpoint(path):
                log.info("--out %s: the run there stopped before its first checkpoint; its files are replaced", path)
                _empty(path)
            elif training and has_checkpoint(path):
                raise CfmaeError(f"--out {path}: holds a run; continue it with `cfmae {command} --resume {path}`, or "
                                 f"choose another --out.")
            elif training and (path / "config.yaml").is_file():
                raise CfmaeError(f"--out {path}: holds a run without a checkpoint to continue from (set aside after "
                                 f"a divergence, or deleted); choose another --out, or delete the folder.")
            else:
                raise CfmaeError(f"--out {path}: the folder exists and holds other files; choose a new or empty "
                                 f"folder.")
        path.mkdir(parents=True, exist_ok=True)
        return path
    root = Path(base) / command
    root.mkdir(parents=True, exist_ok=True)
    k = 1
    while True:
        path = root / (name if k == 1 else f"{name}-{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            k += 1


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` (flushed: readable while training) and gives the
    numeric fields to the loggers of ``train.loggers`` (:mod:`cfmae_cli.train.trackers`: TensorBoard scalars
    ``<type>/<field>`` beside it, CSV, W&B, MLflow); :meth:`image` gives them a figure.

    ``resume_step``: the run continues after that optimizer step; records written after it by an
    interrupted process are dropped from the JSONL file, and TensorBoard and the CSV files drop them too.
    """

    def __init__(self, path: str | Path, loggers: list[str] | tuple[str, ...] = ("tensorboard",),
                 config: dict[str, Any] | None = None, resume_step: int | None = None):
        from cfmae_cli.train.trackers import Trackers

        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._fh = self.path.open("a")
        self.trackers: Any = Trackers(list(loggers), self.path.parent, config or {}, resume_step)

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self.trackers is not None:
            self.trackers.scalars(record)

    def image(self, tag: str, path: Path, step: int) -> None:
        if self.trackers is not None:
            self.trackers.image(tag, path, step)

    def close(self, failed: bool = False) -> None:
        self._fh.close()
        if self.trackers is not None:
            self.trackers.close(failed)
            self.trackers = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open() as fh:
        return [json.loads(line) for line in fh if line.strip()]


def attach_log_file(run_dir: Path) -> logging.Handler:
    """Copy the ``cfmae_cli`` log records into ``run_dir/log.txt``; returns the handler to remove later."""
    handler = logging.FileHandler(run_dir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("cfmae_cli")
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    return handler
