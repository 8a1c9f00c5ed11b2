"""What a command trains, as the engine sees it: a :class:`Task` (dataset, model, optimizer, the loss of one
micro-batch, and optional hooks at the end of each epoch), the :class:`StepContext` of each micro-batch, and the
:class:`Progress` the engine reports to its caller (:mod:`cfmae_cli.train.engine` runs them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset


@dataclass
class Progress:
    """What the engine reports to the caller (rank 0 only); values are from the last log point."""

    epoch: int = 0
    epochs: int = 0
    batch: int = 0
    batches: int = 0
    step: int = 0
    images: int = 0
    values: dict[str, float] = field(default_factory=dict)
    monitor: dict[str, float] = field(default_factory=dict)  # the last k-NN monitor record


@dataclass(frozen=True)
class StepContext:
    """Where a micro-batch is: its epoch, the optimizer step within the epoch, training progress in [0, 1]
    (per step), and a seed unique to (run seed, epoch, step, chunk) — the same whatever the process count."""

    epoch: int
    step_in_epoch: int
    progress: float
    seed: int


class Task:
    """What a command trains. Subclasses set ``dataset``, ``model`` and ``names`` (the values a step returns,
    ``names[0] == 'loss'``) and implement :meth:`forward`; the other hooks are optional."""

    command = "train"
    dataset: Dataset
    model: nn.Module
    names: list[str]

    def build_optimizer(self, lr: float, device: torch.device) -> torch.optim.Optimizer:
        """The optimizer at peak ``lr``; a group's ``lr_scale`` (layer-wise decay) multiplies the schedule."""
        raise NotImplementedError

    def forward(self, net: nn.Module, batch: dict[str, Tensor], ctx: StepContext) -> tuple[Tensor, Tensor]:
        """One micro-batch → (loss to back-propagate, detached values of ``names`` (len(names),))."""
        raise NotImplementedError

    def step_values(self, ctx: StepContext) -> dict[str, float]:
        """Extra numbers for the metrics lines of this point of training (e.g. the masking schedule)."""
        return {}

    def describe(self, plan: dict[str, Any]) -> list[str]:
        return []

    def end_epoch(self, done: int, summary: dict[str, Any]) -> dict[str, Any]:
        """Called on every rank after each epoch (a collective point); returns numbers for the epoch record."""
        return {}

    def monitor_values(self, done: int) -> dict[str, float] | None:
        """Called on every rank before the first epoch of a new run (``done`` 0) and after each epoch: the
        numbers of a monitor that is due (a ``monitor`` record), or None."""
        return None

    def monitor_line(self, record: dict[str, Any]) -> str:
        """A monitor record for the epoch's log line (ending in a space)."""
        return ""

    def extra_checkpoints(self, summary: dict[str, Any]) -> list[str]:
        """Names of further files (beside last.pt) that should hold this epoch's checkpoint, e.g. best.pt."""
        return []

    def after_epoch(self, done: int, summary: dict[str, Any], run_dir: Path) -> list[tuple[str, Path]] | None:
        """Rank 0 only, after the checkpoint: plots and the like; returns the figures written, as (tag, PNG),
        for the loggers."""

    def state_dict(self) -> dict[str, Any]:
        """Task state for the checkpoint (top-level keys besides the engine's)."""
        return {}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        pass

    def summary_line(self, summary: dict[str, Any]) -> str:
        return ""
