"""Run folders (docs/design.md §2): ``runs/<command>/<name>[-k]/`` with config.yaml, metrics.jsonl, log.txt, …"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from cfmae_cli.checkpoints import checkpoint_path
from cfmae_cli.errors import CfmaeError
from cfmae_cli.train import distributed
from cfmae_cli.formats import atomic_write_text, name_target
from cfmae_cli.ownership import (FolderLock, foreign_files, LOCK_NAME, locked, missing_folders, remove_empty,
                                 remove_files)
from cfmae_cli.procs import started_at
from cfmae_cli.train.trackers import Trackers

log = logging.getLogger(__name__)


class RunFolder:
    """The folder of a run, for its whole life: a new one (rank 0 claims it, every rank learns its path) or the
    folder of the checkpoint ``resume``; rank 0 holds the folder's lock (:mod:`cfmae_cli.ownership`) until the
    run ends, so that no other cfmae process writes it meanwhile; ``log.txt`` receives the log while it is open;
    a new run refused on bad input before training (:meth:`refused_leaves_nothing`) leaves no folder behind. A
    worker that torchrun restarted (``--max-restarts``) continues its own job's run in ``out`` from its last
    checkpoint (:func:`restarted_run`)."""

    def __init__(self, command: str, name: str, out: str | Path | None, resume: str | Path | None,
                 info: distributed.DistInfo):
        self.info, self.new, self.command = info, resume is None, command
        self.checkpoint = None if resume is None else checkpoint_path(resume)
        self.claim: Claim | None = None
        self.said: str | None = None  # a line for log.txt once it is open
        if self.checkpoint is not None:
            self.path = self.checkpoint.parent.parent
            if info.is_main:
                self.claim = Claim(self.path, FolderLock(self.path, "--resume").acquire(), created=False)
        else:
            restarts = os.environ.get(MAX_RESTARTS_ENV, "0")
            if out is None and restarts.isdigit() and int(restarts) > 0:  # every rank: the same answer, no wait
                raise CfmaeError(f"torchrun --max-restarts {restarts} without --out: each restart would start a new "
                                 f"run in a new folder, from epoch 0. Give the run its folder (--out RUN), which "
                                 f"a restart of the same job resumes from its last checkpoint.")
            made: tuple[str, str | None] | None = None
            if info.is_main:
                own = restarted_run(out)
                if own is not None:  # torchrun --max-restarts: this job's own run, from its last checkpoint
                    self.claim = Claim(own, FolderLock(own, "--out").acquire(), created=False)
                    self.said = (f"torchrun restart {os.environ.get(RESTART_ENV)} of job {elastic_job()}: --out "
                                 f"{own} holds the run its earlier attempt wrote; resuming it from its last "
                                 f"checkpoint")
                    log.info("%s", self.said)
                    made = (str(own), str(checkpoint_path(own)))
                else:
                    self.claim = claim_run_dir(command, name, out)
                    mark_job(self.claim.path)
                    made = (str(self.claim.path), None)
            path, resumed = distributed.broadcast(made, info)
            self.path = Path(path)
            if resumed is not None:
                self.checkpoint, self.new = Path(resumed), False
        self.handler: logging.Handler | None = None

    def __enter__(self) -> "RunFolder":
        self.handler = attach_log_file(self.path) if self.info.is_main else None
        if self.handler is not None and self.said:
            self.handler.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, self.said, (), None))
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach_log()
        if self.claim is not None:
            self.claim.release()

    def detach_log(self) -> None:
        if self.handler is not None:
            logging.getLogger("cfmae_cli").removeHandler(self.handler)
            self.handler.close()
            self.handler = None

    @contextlib.contextmanager
    def refused_leaves_nothing(self) -> Iterator[None]:
        """Inside: the run is set up; any failure there (bad input, a missing file, an interrupt) removes what a
        new run wrote into its folder (and the folder, if the run made it) and goes on."""
        try:
            yield
        except BaseException:
            if self.info.is_main and self.new and self.claim is not None:
                self.detach_log()
                self.claim.undo(self.command)
                self.claim = None
            raise


# What each command writes into its run folder (:func:`cfmae_cli.ownership.matches` patterns): a folder that
# a run left unfinished is cleared of these, and only of these, when the same command is given it again.
_TEMPORARY = (".*tmp*", "*/.*tmp*")  # atomic writes' temporary files (cfmae_cli.formats.atomic_write)
TRAINING_FILES = ("config.yaml", "metrics.jsonl", "metrics-*.csv", "log.txt", "run.json", "trackers.json",
                  "bad_files.txt", "events.out.tfevents.*", "plots", "plots/*.png", "checkpoints",
                  "checkpoints/*.pt", "checkpoints/diverged", "checkpoints/diverged/*.pt", "mlruns/", "wandb/",
                  "eval-*.json", ".cfmae-*", *_TEMPORARY)  # (eval-*.json: cfmae finetune --eval-only's)
RUN_FILES = {"pretrain": TRAINING_FILES, "finetune": TRAINING_FILES,
             "eval-robustness": ("log.txt", "results.json", "results.csv", "bad_files.txt", ".cfmae-*", *_TEMPORARY)}
TRAINING = ("pretrain", "finetune")


def has_checkpoint(path: Path) -> bool:
    """Whether the run folder ``path`` holds a checkpoint to continue from (``checkpoints/*.pt``)."""
    return any((path / "checkpoints").glob("*.pt"))


UNFINISHED = ".cfmae-unfinished"  # in a new run folder until its run is safe: a first checkpoint, or results
NO_CHECKPOINT_YET = ".cfmae-no-checkpoint-yet"  # the mark of an unfinished training run of earlier cfmae (read)


def mark_started(path: Path, command: str) -> None:
    """Mark the run folder ``path`` as unfinished by ``command``: if the run stops before it is safe (a first
    checkpoint; the results), the same command with the same ``--out`` may start again (:func:`claim_run_dir`
    clears the folder of the run's files)."""
    atomic_write_text(path / UNFINISHED, json.dumps({"command": command, "note": "this run has not finished "
                                                     "(no checkpoint or results yet): the same command with "
                                                     "--out here starts it again"}) + "\n")


def mark_finished(path: Path) -> None:
    """The run in ``path`` is safe (its first checkpoint, or its results, is written)."""
    (path / UNFINISHED).unlink(missing_ok=True)
    (path / NO_CHECKPOINT_YET).unlink(missing_ok=True)


def unfinished_by(path: Path) -> str | None:
    """The command whose run in ``path`` stopped before it was safe, or None."""
    if (path / NO_CHECKPOINT_YET).is_file():
        return "pretrain or finetune"
    try:
        return str(json.loads((path / UNFINISHED).read_text(encoding="utf-8"))["command"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


MAX_RESTARTS_ENV = "TORCHELASTIC_MAX_RESTARTS"  # set by torchrun in its workers: its --max-restarts
RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"  # set by torchrun in its workers: 0, then 1, 2, … after a restart
JOB_MARK = ".cfmae-job"  # in a run folder that a worker of torchrun made: which job, and when


def elastic_job() -> str | None:
    """The torchrun job of this worker, the same in each of its restarts (None outside torchrun): its run id
    (``--rdzv-id``; a fresh one with ``--standalone``), with SLURM's job id where there is one (``--rdzv-id``
    defaults to ``none``)."""
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    if run is None:
        return None
    slurm = os.environ.get("SLURM_JOB_ID")
    return run + (f" (SLURM job {slurm})" if slurm else "")


def mark_job(path: Path) -> None:
    """Record in the new run folder ``path`` the torchrun job that made it (nothing outside torchrun)."""
    job = elastic_job()
    if job is not None:
        atomic_write_text(path / JOB_MARK, json.dumps({"job": job, "at": time.time()}) + "\n")


def restarted_run(out: str | Path | None) -> Path | None:
    """``out`` when this worker is a restart of a torchrun job (``TORCHELASTIC_RESTART_COUNT`` > 0) and the run in
    ``out`` is the one this job's earlier attempt wrote (the job's mark, written after this worker's launcher
    started) and has a checkpoint; else None (a new run, or a refusal, as on a first attempt)."""
    if out is None or int(os.environ.get(RESTART_ENV, "0") or 0) <= 0:
        return None
    path = Path(out)
    try:
        mark = json.loads((path / JOB_MARK).read_text(encoding="utf-8"))
        job, at = mark["job"], float(mark["at"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    launcher = started_at(os.getppid())  # torchrun's agent, which restarts its workers
    if job != elastic_job() or (launcher is not None and at < launcher - 1):
        return None
    return path if (path / "checkpoints" / "last.pt").is_file() else None


class Claim:
    """A run folder this process has claimed: it holds the folder's lock; ``created``: the folder is new (and
    ``parents``: the folders above it that were made for it, e.g. ``runs/pretrain``)."""

    def __init__(self, path: Path, lock: FolderLock, created: bool, parents: tuple[Path, ...] = ()):
        self.path, self.lock, self.created, self.parents = path, lock, created, parents

    def release(self) -> None:
        self.lock.release()

    def undo(self, command: str) -> None:
        """Remove what the run wrote (its files, :data:`RUN_FILES`), and the folder if the run made it; then let go
        of the lock."""
        remove_files(self.path, RUN_FILES[command], keep=())
        self.lock.release()
        if self.created:
            remove_empty(self.path, *self.parents)


def claim_run_dir(command: str, name: str, out: str | Path | None = None, base: str | Path = "runs") -> Claim:
    """Create and lock the run folder of a new run of ``command``, marked unfinished (:func:`mark_started`):
    ``out`` if given, else the first free ``base/command/name``, ``name-2``, ``name-3``, … An ``out`` that holds
    files is taken only when a run of the same command stopped there before it was safe and nothing else is in it
    (its files are removed); otherwise it is refused, with nothing changed."""
    if out is None:
        root = Path(base) / command
        made = missing_folders(root)
        root.mkdir(parents=True, exist_ok=True)
        k = 1
        while True:
            path = root / (name if k == 1 else f"{name}-{k}")
            try:
                path.mkdir()
                break
            except FileExistsError:
                k += 1
        claim = Claim(path, FolderLock(path, "--out").acquire(), created=True, parents=made)
        mark_started(path, command)
        return claim
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CfmaeError(f"--out {path}: a file, not a folder; give a new folder for the run.")
    made = missing_folders(path)
    created = bool(made)
    path.mkdir(parents=True, exist_ok=True)
    had_lock = (path / LOCK_NAME).exists()
    lock = FolderLock(path, "--out")
    try:
        lock.acquire()
        _take(command, path)
        mark_started(path, command)
    except BaseException:
        lock.release(remove=not had_lock)  # a lock file that was there (a crashed run's) stays
        remove_empty(*made)
        raise
    return Claim(path, lock, created, made[1:])


def _take(command: str, path: Path) -> None:
    """Check that ``path`` (locked) may take a new run of ``command``, clearing what an unfinished run of the
    same command left; refuse anything else."""
    if not [p for p in path.iterdir() if p.name != LOCK_NAME]:
        return
    training = command in TRAINING
    if training and has_checkpoint(path):
        raise CfmaeError(f"--out {path}: holds a run; continue it with `cfmae {command} --resume {path}`, or "
                         f"choose another --out.")
    by = unfinished_by(path)
    if by is None:
        if training and (path / "config.yaml").is_file():
            raise CfmaeError(f"--out {path}: holds a run without a checkpoint to continue from (set aside after "
                             f"a divergence, or deleted); choose another --out, or delete the folder.")
        if (path / "results.json").is_file():
            raise CfmaeError(f"--out {path}: holds the results of a finished run; choose another --out.")
        raise CfmaeError(f"--out {path}: the folder exists and holds other files; choose a new or empty folder.")
    if command not in by.split(" or "):
        raise CfmaeError(f"--out {path}: holds an unfinished run of `cfmae {by}`; rerun that command there, or "
                         f"choose another --out.")
    foreign = foreign_files(path, RUN_FILES[command])
    if foreign:
        shown = ", ".join(foreign[:5]) + (f", … ({len(foreign)} in all)" if len(foreign) > 5 else "")
        raise CfmaeError(f"--out {path}: a run of cfmae {command} stopped there before it finished, but the folder "
                         f"also holds files that cfmae did not write ({shown}); nothing was removed. Move them "
                         f"away, or choose another --out.")
    log.info("--out %s: the run there stopped before it finished; its files are replaced", path)
    remove_files(path, RUN_FILES[command])


@contextlib.contextmanager
def claimed_run_dir(command: str, name: str, out: str | Path | None = None) -> Iterator[Path]:
    """A new run folder (:func:`claim_run_dir`), held inside the block: for a launcher whose workers write it."""
    claim = claim_run_dir(command, name, out)
    try:
        yield claim.path
    finally:
        claim.release()


@contextlib.contextmanager
def held(folder: Path, what: str = "--resume") -> Iterator[Path]:
    """The lock of an existing run folder, held inside the block."""
    with locked(folder, what):
        yield folder


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` (flushed: readable while training) and gives the
    numeric fields to the loggers of ``train.loggers`` (:mod:`cfmae_cli.train.trackers`: TensorBoard scalars
    ``<type>/<field>`` beside it, CSV, W&B, MLflow); :meth:`image` gives them a figure.

    ``resume_step``: the run continues after that optimizer step; records written after it by an
    interrupted process are dropped from the JSONL file, and TensorBoard and the CSV files drop them too.
    """

    def __init__(self, path: str | Path, loggers: Sequence[str] = ("tensorboard",),
                 config: dict[str, Any] | None = None, resume_step: int | None = None):

        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._fh = self.path.open("a")
        self.trackers: Any = Trackers(list(loggers), self.path.parent, config or {}, resume_step)

    def write(self, record: dict[str, Any]) -> None:
        try:
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()
        except OSError as exc:  # a full disk: name the file (a write error names none by itself)
            raise name_target(exc, self.path) from None
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
