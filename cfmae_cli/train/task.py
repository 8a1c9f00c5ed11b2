"""The contract between the engine (:mod:`cfmae_cli.train.engine`) and what it trains: the :class:`Task` (dataset,
model, optimizer, the loss of one micro-batch, hooks at the end of each epoch, the best validation number), the
:class:`TrainingConfig` sections the engine reads, the :class:`Plan` of a run, the :class:`StepContext` of each
micro-batch, and the :class:`Progress` the engine reports to its caller."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from cfmae_cli.config import ImageDataConfig, OptimBase, RunConfig
from cfmae_cli.data.dataset import Skipped, collate as collate_samples


class TrainingConfig(Protocol):
    """What the engine reads of a config: pre-training's :class:`~cfmae_cli.config.Config` and fine-tuning's
    :class:`~cfmae_cli.eval.config.FinetuneConfig` both are one."""

    @property
    def data(self) -> ImageDataConfig: ...

    @property
    def optim(self) -> OptimBase: ...

    @property
    def train(self) -> RunConfig: ...

    def model_dump(self, *, mode: str = "python") -> dict[str, Any]: ...


@dataclass(frozen=True)
class Plan:
    """The numbers a run follows, derived from its config, its images and its processes (printed at the start)."""

    devices: int  # processes in the group
    accumulation_steps: int  # micro-batches per optimizer step
    effective_batch: int  # images per optimizer step over all processes
    lr: float  # peak lr (base_lr x effective_batch / 256 unless optim.lr is set)
    images: int  # training images
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    threads: int  # torch intra-op threads per process
    workers: int  # DataLoader workers per process
    procs: int  # training processes on this machine


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
    monitor: dict[str, Any] = field(default_factory=dict)  # the last k-NN monitor record


@dataclass(frozen=True)
class StepContext:
    """Where a micro-batch is: its epoch, the optimizer step within the epoch, training progress in [0, 1]
    (per step), and a seed unique to (run seed, epoch, step, chunk) — the same whatever the process count."""

    epoch: int
    step_in_epoch: int
    progress: float
    seed: int


class Task:
    """What a command trains. Subclasses set ``dataset``, ``model``, ``names`` (the values a step returns,
    ``names[0] == 'loss'``) and ``root`` (the data folder, for messages and ``run.json``), and implement
    :meth:`build_optimizer` and :meth:`forward`; the other hooks have defaults.

    A task that validates names the number its ``best.pt`` follows in ``best_metric`` (higher is better) and
    passes each epoch's validation numbers through :meth:`track_best`; the base keeps the best epoch's numbers
    (``best``, also in the checkpoint) and asks for ``best.pt`` when an epoch improves on them."""

    command = "train"
    dataset: Dataset
    model: nn.Module
    names: list[str]
    root: Path
    #: a share of each class held out of training for validation (named in the too-few-images message), or None
    val_fraction: float | None = None
    #: the validation number that ``best.pt`` follows, and numbers kept beside it in ``best``; None: no best.pt
    best_metric: str | None = None
    best_also: tuple[str, ...] = ()
    best: dict[str, Any]
    improved = False

    def start_best(self) -> None:
        """No epoch validated yet (call once the task is built; a resumed run then loads its own)."""
        if self.best_metric is None:
            return
        self.best = {self.best_metric: -math.inf, **{k: -math.inf for k in self.best_also}, "epoch": 0}
        self.improved = False

    def track_best(self, metrics: dict[str, Any], done: int) -> dict[str, Any]:
        """Epoch ``done``'s validation ``metrics`` against the best so far: → ``best_<metric>`` and ``best_epoch``
        for the epoch record (``best.pt`` is written when this epoch is the new best)."""
        key = self.best_metric
        assert key is not None
        self.improved = metrics[key] > self.best[key]
        if self.improved:
            self.best = {key: metrics[key], **{k: metrics[k] for k in self.best_also}, "epoch": done}
        return {f"best_{key}": self.best[key], "best_epoch": self.best["epoch"]}

    #: a list of dataset items → a batch (with ``size`` and ``skipped``); a plain function, not a method, so that
    #: DataLoader workers started by spawn (macOS, Python ≥ 3.14) are not sent the whole task with its model
    collate = staticmethod(collate_samples)

    def build_optimizer(self, lr: float, device: torch.device) -> torch.optim.Optimizer:
        """The optimizer at peak ``lr``; a group's ``lr_scale`` (layer-wise decay) multiplies the schedule."""
        raise NotImplementedError

    def forward(self, net: nn.Module, batch: dict[str, Tensor], ctx: StepContext) -> tuple[Tensor, Tensor]:
        """One micro-batch → (loss to back-propagate, detached values of ``names`` (len(names),))."""
        raise NotImplementedError

    def take_skipped(self) -> list[Skipped]:
        """Samples dropped inside :meth:`forward` since the last call (a JPEG that failed to decode on the
        device), for the engine's ledger of bad files; the loader's own are in ``batch['skipped']``."""
        return []

    def step_values(self, ctx: StepContext) -> dict[str, float]:
        """Extra numbers for the metrics lines of this point of training (e.g. the masking schedule)."""
        return {}

    def describe(self, plan: Plan) -> list[str]:
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
        """Names of further files (beside last.pt) that should hold this epoch's checkpoint: ``best.pt`` when
        the epoch improved on the best."""
        return ["best.pt"] if self.best_metric is not None and self.improved else []

    def after_epoch(self, done: int, summary: dict[str, Any], run_dir: Path) -> list[tuple[str, Path]] | None:
        """Rank 0 only, after the checkpoint: plots and the like; returns the figures written, as (tag, PNG),
        for the loggers."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Task state for the checkpoint (top-level keys besides the engine's): ``best`` when validating."""
        return {"best": self.best} if self.best_metric is not None else {}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        if self.best_metric is not None:
            self.best = dict(ckpt.get("best", self.best))

    def summary_line(self, summary: dict[str, Any]) -> str:
        return ""
