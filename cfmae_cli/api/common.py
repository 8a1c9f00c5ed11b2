"""What the API's functions share: their argument types, how they speak (:class:`Report`), the exception of a
failed launch, and the ``--set`` list that the shortcut options add to."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional, Sequence

from cfmae_cli.errors import CfmaeError
from cfmae_cli.formats import need_folder

if TYPE_CHECKING:
    from cfmae_cli.train.engine import Progress

log = logging.getLogger("cfmae_cli.api")

PathLike = str | Path  # a file or folder, as text or a Path
Overrides = Mapping[str, Any] | Sequence[str]
AUTO = "auto"  # resume="auto" / --resume auto: resume the run in the run folder if it is this run, else start it


class Report:
    """Where a command's words go. :meth:`say`: a line for the user (a note, a plan, the end of a run);
    :meth:`progress`: around training in this process, yields the callable fed each
    :class:`~cfmae_cli.train.engine.Progress` (or None). The library's default logs the lines (logger
    ``cfmae_cli.api``, INFO) and shows no progress; the command line prints both."""

    def say(self, text: str) -> None:
        log.info("%s", text)

    @contextlib.contextmanager
    def progress(self) -> Iterator[Callable[["Progress"], None] | None]:
        yield None


class WorkersFailed(Exception):
    """A worker process of a multi-process launch failed (its own message is already printed); ``code`` is the
    exit code to pass on."""

    def __init__(self, code: int):
        self.code = code
        super().__init__(f"a worker process failed (exit code {code})")


def as_set_items(overrides: Overrides | None) -> list[str]:
    """``--set`` items from a mapping (``{"optim.base_lr": 1.5e-4}``, values as YAML reads JSON) or a list of
    ``KEY=VALUE`` strings."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    if isinstance(overrides, str):
        raise CfmaeError(f"overrides {overrides!r}: give a mapping of keys to values or a list of KEY=VALUE items.")
    return list(overrides)


def world_of(gpus: Optional[int], procs: int) -> int:
    """The number of processes of a run: ``gpus`` GPUs, ``procs`` CPU processes with ``gpus`` 0, else one."""
    return gpus if gpus else (procs if gpus == 0 else 1)


def run_overrides(set_: Sequence[str], data: Optional[PathLike], epochs: Optional[int], seed: Optional[int],
                  gpus: Optional[int], procs: int, resume: Optional[PathLike], out: Optional[PathLike]) -> list[str]:
    """The ``--set`` list with the shortcut options added; refuses combinations that make no sense."""
    overrides = list(set_)
    if data is not None:
        need_folder(Path(data), "--data")
        overrides.append(f"data.root={Path(data).resolve()}")
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    if seed is not None:
        overrides.append(f"train.seed={seed}")
    if gpus is not None:
        overrides.append(f"train.device={'cuda' if gpus > 0 else 'cpu'}")
    if procs > 1 and gpus != 0:
        raise CfmaeError(f"--procs {procs}: CPU processes need --gpus 0 (with GPUs, --gpus N starts one process "
                         f"per GPU).")
    if resume is not None and str(resume) != AUTO and out is not None:
        raise CfmaeError("--resume continues a run in its own folder; it takes no --out (--resume auto does: it "
                         "starts or resumes the run in --out).")
    return overrides


def launch_command(args: list[str], optional: dict[str, Any], world: int) -> None:
    """Run ``cfmae ARGS`` (plus each ``optional`` flag that is not None) as ``world`` local worker processes;
    :class:`WorkersFailed` with the code of the first that failed."""
    from cfmae_cli.train import distributed

    for flag, value in optional.items():
        if value is not None:
            args = [*args, flag, str(value)]
    code = distributed.launch(args, world)
    if code:
        raise WorkersFailed(code)


def as_patch(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` items as one nested dict of the keys they set (to merge into a stored config)."""
    from cfmae_cli.config import deep_merge, parse_override

    patch: dict[str, Any] = {}
    for item in items:
        keys, value = parse_override(item)
        entry: Any = value
        for key in reversed(keys):
            entry = {key: entry}
        patch = deep_merge(patch, entry)
    return patch
