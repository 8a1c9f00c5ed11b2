"""What the training commands (``pretrain``, ``finetune``) share on the command line: their words on the
console, the live progress line, and the exit codes of a run's ends. The work itself is
:mod:`cfmae_cli.api.training`'s."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import typer
from rich.markup import escape

from cfmae_cli.api.common import AUTO, Report, WorkersFailed
from cfmae_cli.cli.common import Printed, console, is_terminal

if TYPE_CHECKING:
    from cfmae_cli.train.engine import Progress

# (torch is imported only once the API function runs: its checks of the data and weights come first)


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class ConsoleReport(Printed):
    """The API's words printed as they are; in-process training under the live progress line (rank 0)."""

    @contextlib.contextmanager
    def progress(self) -> Iterator[Callable[["Progress"], None] | None]:
        from cfmae_cli.cli.progress import TrainingView  # heavy: imports the engine (torch)

        with TrainingView(console, interactive=is_terminal() and is_main()) as view:
            yield view.update


def run_training(command: str, call: Callable[[Report], dict[str, Any]], done: Callable[[dict[str, Any]], str],
                 resume: str | None) -> None:
    """Run ``call`` (an API function bound to the command's options) and print its end: the summary line and
    the run folder; a divergence exits 1, a stop by a signal 128 + its number (with how to continue), a failed
    worker with its code."""
    try:
        summary = call(ConsoleReport())
    except WorkersFailed as exc:
        raise typer.Exit(exc.code) from None
    except Exception as exc:
        if "cfmae_cli.train.engine" not in sys.modules:  # refused before the run began: torch is not imported
            raise
        from cfmae_cli.train.engine import TrainingDiverged
        from cfmae_cli.train.faults import Preempted

        if isinstance(exc, TrainingDiverged):
            console.print(f"[bold red]stopped:[/] {escape(str(exc))}", markup=True, highlight=False)
            raise typer.Exit(1) from None
        if isinstance(exc, Preempted):
            if is_main():
                again = ("the same command (--resume auto)" if resume == AUTO else
                         f"cfmae {command} --resume {Path(exc.checkpoint).parent.parent}")
                console.print(f"{exc}. Continue with: {again}", highlight=False)
            raise typer.Exit(128 + exc.signum) from None
        raise
    if not is_main() or summary.get("complete"):
        return
    if "steps" in summary:  # trained here (not a launch)
        console.print(done(summary), highlight=False)
    from cfmae_cli.train import distributed

    if "steps" not in summary or not distributed.launched_by_parent():  # a launching process prints it itself
        console.print(f"Run folder: {summary['run_dir']}", highlight=False)
