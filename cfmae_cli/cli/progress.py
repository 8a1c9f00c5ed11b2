"""Progress display for training: a rich bar on a terminal, plain lines otherwise."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cfmae_cli.train.engine import Progress as EngineProgress


def _summary(values: dict[str, Any], monitor: dict[str, Any] | None = None) -> str:
    if not values:
        return ""
    losses = " ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in values.items() if k.startswith("loss_"))
    extra = "".join(f"{label} {values[key]:.2f} " for key, label in (("alpha_i", "α_I"), ("alpha_s", "α_S"))
                    if key in values)
    losses = f" [{losses}]" if losses else ""
    knn = f"k-NN {monitor['knn_top1_avg']:.1f}% (ep {monitor['epoch']}) " if monitor and "knn_top1_avg" in monitor \
        else ""
    return f"loss {values['loss']:.4f}{losses} {extra}{knn}lr {values['lr']:.2e} {values['img_per_s']:.0f} img/s"


class TrainingView:
    """Use as ``with TrainingView(console) as view: pretrain(cfg, run, view.update)``."""

    def __init__(self, console: Console, interactive: bool):
        self.console = console
        self.interactive = interactive
        self.progress: Progress | None = None
        self.task = None
        self._last_step_logged = -1

    def __enter__(self) -> "TrainingView":
        if self.interactive:
            columns = (TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[info]}", markup=False), TimeElapsedColumn(), TextColumn("ETA"),
                       TimeRemainingColumn())
            self.progress = Progress(*columns, console=self.console, transient=False)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def update(self, state: EngineProgress) -> None:
        total = state.epochs * state.batches
        done = (state.epoch - 1) * state.batches + state.batch
        if self.progress is not None:
            if self.task is None:
                self.task = self.progress.add_task("train", total=total, epoch="", info="")
            self.progress.update(self.task, completed=done, epoch=f"{state.epoch}/{state.epochs}",
                                 info=_summary(state.values, state.monitor))
        elif state.values and state.values.get("step") != self._last_step_logged:
            self._last_step_logged = state.values.get("step")
            self.console.print(f"epoch {state.epoch}/{state.epochs} step {state.step} "
                               f"({100 * done / total:.0f}%) {_summary(state.values, state.monitor)}",
                               highlight=False, markup=False, soft_wrap=True)
