"""The training engine shared by every command that trains: pre-training and fine-tuning.

The engine owns what does not depend on the task: the run folder, the process group, the data order
(``sampler.py``), DDP, gradient accumulation, the lr schedule (per-group ``lr_scale`` for layer-wise decay),
bf16 autocast, signals and preemption, checkpoints and exact resume, bad files, non-finite guards, metrics and
progress. A :class:`Task` supplies the dataset, the model, the parameter groups and the loss of one batch, and
may evaluate at the end of each epoch. Every rank runs the same loop on its chunk of each global batch; DDP
averages gradients; rank 0 alone writes files and reports progress.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from cfmae_cli.checkpoints import (checkpoint_path, load_checkpoint, prune_checkpoints, rng_state, save_checkpoint,
                                   set_rng_state)
from cfmae_cli.config import dump_config
from cfmae_cli.data.dataset import Skipped, collate
from cfmae_cli.errors import CfmaeError, DataError
from cfmae_cli.seeding import mix_seed
from cfmae_cli.train import distributed
from cfmae_cli.train.faults import Preempted, StopRequest, ignore_stop_signals
from cfmae_cli.train.optim import lr_at
from cfmae_cli.train.plots import plot_losses
from cfmae_cli.train.rundir import MetricsWriter, attach_log_file, new_run_dir, read_metrics
from cfmae_cli.train.sampler import ChunkedSampler, chunk_id
from cfmae_cli.train.setup import describe_schedule, make_plan

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


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

    def extra_checkpoints(self, summary: dict[str, Any]) -> list[str]:
        """Names of further files (beside last.pt) that should hold this epoch's checkpoint, e.g. best.pt."""
        return []

    def after_epoch(self, done: int, summary: dict[str, Any], run_dir: Path) -> None:
        """Rank 0 only, after the checkpoint: plots and the like."""

    def state_dict(self) -> dict[str, Any]:
        """Task state for the checkpoint (top-level keys besides the engine's)."""
        return {}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        pass

    def summary_line(self, summary: dict[str, Any]) -> str:
        return ""


ENGINE_KEYS = ("model", "optimizer", "scaler", "epoch", "next_step", "step", "partial", "rng", "config",
               "world_size", "metrics", "skipped")


def run_task(cfg: Any, make_task: Callable[[distributed.DistInfo], Task], device: torch.device, *, command: str,
             out: str | Path | None = None, name: str = "run", resume: str | Path | None = None,
             prepare: Callable[[Task], None] | None = None, on_progress: Callable[[Progress], None] | None = None
             ) -> dict[str, Any]:
    """Train ``make_task(info)`` into a new run folder (``out`` or ``runs/<command>/<name>[-k]``), or continue
    the run of the checkpoint ``resume`` exactly. ``prepare(task)`` runs before training (e.g. ``--init``).

    In a process group (torchrun), every rank calls this; rank 0 creates the folder and writes the files.
    """
    info = distributed.init(device)
    try:
        if resume is not None:
            ckpt_file = checkpoint_path(resume)
            run_dir = ckpt_file.parent.parent
        else:
            ckpt_file = None
            run_dir = Path(distributed.broadcast(str(new_run_dir(command, name, out)) if info.is_main else None,
                                                 info))
        handler = attach_log_file(run_dir) if info.is_main else None
        try:
            try:
                engine = Engine(cfg, make_task(info), run_dir, info, on_progress or (lambda p: None))
                if ckpt_file is not None:
                    engine.restore(load_checkpoint(ckpt_file))
                elif prepare is not None:
                    prepare(engine.task)
            except CfmaeError:
                if info.is_main and resume is None:  # refused before training: leave nothing behind
                    _remove_run_dir(run_dir, handler)
                    handler = None
                raise
            return engine.fit()
        finally:
            if handler is not None:
                logging.getLogger("cfmae_cli").removeHandler(handler)
                handler.close()
    finally:
        distributed.shutdown()


def _remove_run_dir(run_dir: Path, handler: logging.Handler | None) -> None:
    """A run refused on bad input before training leaves no folder behind."""
    if handler is not None:
        logging.getLogger("cfmae_cli").removeHandler(handler)
        handler.close()
    for path in sorted(run_dir.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    run_dir.rmdir()


class Engine:
    def __init__(self, cfg: Any, task: Task, run_dir: Path, info: distributed.DistInfo,
                 on_progress: Callable[[Progress], None]):
        self.cfg, self.task, self.run_dir, self.info, self.on_progress = cfg, task, run_dir, info, on_progress
        self.device = info.device
        self.dataset = task.dataset
        self.plan = make_plan(cfg, len(self.dataset), info.world)
        self.accum = self.plan["accumulation_steps"]
        self.micro_per_epoch = self.plan["steps_per_epoch"] * self.accum
        if self.plan["steps_per_epoch"] == 0:
            raise DataError(f"{getattr(task, 'root', 'the data')}: {len(self.dataset)} training images are fewer than one optimizer step needs "
                            f"(batch {cfg.train.batch_size} x {info.world} process(es) x {self.accum} accumulation "
                            f"steps); lower train.batch_size or optim.effective_batch")
        self.sampler = ChunkedSampler(len(self.dataset), cfg.train.batch_size, info.world, info.rank, self.accum,
                                      cfg.train.seed)
        workers = cfg.data.num_workers
        self.loader = DataLoader(self.dataset, batch_size=cfg.train.batch_size, sampler=self.sampler,
                                 num_workers=workers, collate_fn=getattr(task, "collate", collate),
                                 pin_memory=self.device.type == "cuda",
                                 persistent_workers=workers > 0, worker_init_fn=ignore_stop_signals,
                                 generator=torch.Generator().manual_seed(cfg.train.seed))
        # (its own generator: starting an epoch's iterator must not draw from the global RNG, whose state a
        # checkpoint restores exactly — drop path draws from it)
        self.model = task.model
        trainable = any(p.requires_grad for p in self.model.parameters())
        self.ddp = info.distributed and trainable
        self.net = DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda"
                                           else None) if self.ddp else self.model
        if cfg.train.compile:  # the forward and loss as one graph (docs/performance.md); weights stay self.model's
            self.net = torch.compile(self.net)
        self.optimizer = task.build_optimizer(self.plan["lr"], self.device)
        self.bf16 = self.device.type == "cuda" and cfg.train.precision in ("auto", "bf16")
        self.names = list(task.names)
        self.step = self.epoch = self.start_micro = 0
        self.partial: dict[str, Any] | None = None
        self.skipped: dict[str, Skipped] = {}  # by path: a file that stays broken counts once
        _seed_rank(cfg.train.seed, info.rank)

    # -- state ---------------------------------------------------------------------------------------------
    def save(self, epoch_done: int, next_step: int, partial: dict[str, Any] | None, summary: dict,
             periodic: bool, also: tuple[str, ...] | list[str] = ()) -> None:
        """Rank 0 writes ``last.pt`` (``epoch-NNNN.pt`` pruned to ``train.keep_last``, and ``also``); all wait.

        The position is (completed epochs, optimizer steps done in the next one): with the same effective
        batch it means the same images whatever the number of processes. RNG states are kept per rank.
        """
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            raise TrainingDiverged(f"non-finite weights after step {self.step} (an inf/NaN gradient in the last "
                                   f"step); nothing was saved, {self.run_dir / 'checkpoints' / 'last.pt'} is the "
                                   f"last good checkpoint. Try gradient clipping (--set optim.clip_grad=1.0) or a "
                                   f"lower lr.")
        rng = distributed.gather(rng_state(), self.info)
        if self.info.is_main:
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "scaler": {},
                     "epoch": epoch_done, "next_step": next_step, "step": self.step, "partial": partial,
                     "rng": rng, "config": self.cfg.model_dump(mode="json"), "world_size": self.info.world,
                     "metrics": summary, "skipped": [[s.path, s.reason] for s in self.skipped.values()],
                     **self.task.state_dict()}
            folder = self.run_dir / "checkpoints"
            save_checkpoint(folder / "last.pt", state)
            for extra in also:
                save_checkpoint(folder / extra, state)
            if periodic:
                save_checkpoint(folder / f"epoch-{epoch_done:04d}.pt", state)
                prune_checkpoints(folder, self.cfg.train.keep_last)
        if self.info.distributed:
            dist.barrier()

    def restore(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.task.load_state_dict(ckpt)
        self.step, self.epoch = ckpt["step"], ckpt["epoch"]
        self.start_micro = ckpt["next_step"] * self.accum
        self.partial = ckpt.get("partial")
        self.skipped = {path: Skipped(path, reason) for path, reason in ckpt.get("skipped", [])}
        if len(ckpt["rng"]) == self.info.world:
            set_rng_state(ckpt["rng"][self.info.rank])
        else:
            log.warning("resumed on %d process(es) from a run on %d: RNG states re-seeded per rank (data order and "
                        "masks do not depend on them)", self.info.world, len(ckpt["rng"]))
        log.info("resumed from step %d (epoch %d, step %d of the epoch)", self.step, self.epoch + 1,
                 ckpt["next_step"])

    # -- loop ----------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg, main = self.cfg, self.info.is_main
        if main:
            (self.run_dir / "config.yaml").write_text(dump_config(self.cfg))
            log.info("%s: %d training images; %s%s", self.task.command, len(self.dataset), self.device,
                     " (bf16)" if self.bf16 else "")
            for line in describe_schedule(self.plan, cfg) + self.task.describe(self.plan):
                log.info("%s", line)
        resumed = self.step > 0 or self.epoch > 0
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl", resume_step=self.step if resumed else None) \
            if main else None
        self.progress = Progress(epochs=cfg.train.epochs, batches=self.micro_per_epoch, step=self.step)
        summary: dict[str, Any] = {}
        try:
            with StopRequest() as stop:
                for epoch in range(self.epoch, cfg.train.epochs):
                    summary = self.run_epoch(epoch, stop)
                    self.start_micro, self.partial = 0, None
        finally:
            if self.metrics is not None:
                self.metrics.close()
            self.write_skipped()
        epochs = [r for r in read_metrics(self.run_dir / "metrics.jsonl") if r["type"] == "epoch"] if main else []
        return {"run_dir": str(self.run_dir), "epochs": cfg.train.epochs, "steps": self.step,
                "first_epoch_loss": epochs[0]["loss"] if epochs else math.nan,
                "last_epoch_loss": epochs[-1]["loss"] if epochs else math.nan,
                "last_epoch": epochs[-1] if epochs else {},
                "img_per_s": summary.get("img_per_s", math.nan), "skipped_files": len(self.skipped),
                "data": str(getattr(self.task, "root", ""))}

    def context(self, epoch: int, micro: int) -> StepContext:
        a = micro % self.accum
        step_in_epoch = micro // self.accum
        return StepContext(epoch, step_in_epoch,
                           (epoch + step_in_epoch / self.plan["steps_per_epoch"]) / self.cfg.train.epochs,
                           mix_seed(self.cfg.train.seed, epoch, step_in_epoch,
                                    chunk_id(a, self.info.world, self.info.rank)))

    def run_epoch(self, epoch: int, stop: StopRequest) -> dict[str, Any]:
        cfg, info, accum = self.cfg, self.info, self.accum
        self.net.train()
        self.sampler.set_epoch(epoch, self.start_micro)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # gpu_mem_gib is the peak of this epoch
        k = len(self.names)
        part = self.partial or {"sums": [0.0] * k, "batches": 0, "images": 0, "seconds": 0.0}
        epoch_sum = torch.tensor(part["sums"], device=self.device) * part["batches"]
        epoch_batches, epoch_images = part["batches"], part["images"]
        window_sum = torch.zeros(k, device=self.device)
        window_batches = window_images = 0
        window_start = time.perf_counter()
        start = window_start - part["seconds"]  # the epoch's time includes what ran before a stop
        lr, last_inputs, ctx = 0.0, None, self.context(epoch, self.start_micro)
        for j, batch in enumerate(self.loader):
            micro = self.start_micro + j
            a = micro % accum
            ctx = self.context(epoch, micro)
            if a == 0:
                lr = lr_at(self.step, self.plan["total_steps"], self.plan["warmup_steps"], self.plan["lr"],
                           cfg.optim.min_lr, getattr(cfg.optim, "schedule", "cosine"),
                           tuple(m / cfg.train.epochs for m in getattr(cfg.optim, "milestones", ())))
                for group in self.optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
            if batch["skipped"]:
                self.skipped.update((s.path, s) for s in batch["skipped"])
                if not info.distributed:
                    self.check_bad()  # with several ranks: decided together at the end of the step
            weight = 1.0
            if batch["size"] == 0:  # a wholly unreadable batch: repeat the last one with weight 0 (keeps DDP in step)
                if last_inputs is None:
                    raise DataError(f"every image of a batch in {getattr(self.task, 'root', 'the data')} is "
                                    f"unreadable; see bad_files.txt")
                inputs, weight = last_inputs, 0.0
            else:
                inputs = {m: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                          for m, v in batch.items() if m not in ("skipped", "size")}
                last_inputs = inputs
            sync = contextlib.nullcontext() if a == accum - 1 or not self.ddp else self.net.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    loss, values = self.task.forward(self.net, inputs, ctx)
                (loss * (weight / accum)).backward()
            if weight:
                epoch_sum += values
                window_sum += values
                epoch_batches, window_batches = epoch_batches + 1, window_batches + 1
                epoch_images, window_images = epoch_images + batch["size"], window_images + batch["size"]
            if a == accum - 1:
                if cfg.optim.clip_grad:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.clip_grad)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                last = micro == self.micro_per_epoch - 1
                if self.step % cfg.train.log_every == 0 or last:
                    now = time.perf_counter()
                    avg = distributed.all_reduce_mean(window_sum / max(window_batches, 1), info).tolist()
                    self.check_finite(avg)
                    rate = window_images / max(now - window_start, 1e-9)
                    self.log_record({"type": "step", "epoch": epoch + 1,
                                     "epoch_float": epoch + (micro + 1) / self.micro_per_epoch, "step": self.step,
                                     **dict(zip(self.names, avg)), "lr": lr, **self.task.step_values(ctx),
                                     "img_per_s": rate * info.world, "img_per_s_per_device": rate})
                    window_sum.zero_()
                    window_batches = window_images = 0
                    window_start = now
                if info.distributed and distributed.any_rank(len(self.skipped) > self.bad_limit, info):
                    self.merge_skipped()
                    self.check_bad()  # every rank raises the same error
                if not last and distributed.any_rank(stop.signum is not None, info):
                    sums = (epoch_sum / max(epoch_batches, 1)).tolist()
                    self.check_finite(distributed.all_reduce_mean(torch.tensor(sums, device=self.device),
                                                                  info).tolist())  # never save NaN weights
                    partial = {"sums": sums, "batches": epoch_batches, "images": epoch_images,
                               "seconds": time.perf_counter() - start}
                    self.save(epoch, (micro + 1) // accum, partial, {}, periodic=False)
                    raise Preempted(stop.signum or 15, self.step, str(self.run_dir / "checkpoints" / "last.pt"))
            if info.is_main:
                self.progress.epoch, self.progress.batch, self.progress.step = epoch + 1, micro + 1, self.step
                self.progress.images += batch["size"] * info.world
                self.on_progress(self.progress)
        return self.end_epoch(epoch, epoch_sum / max(epoch_batches, 1), epoch_images, time.perf_counter() - start,
                              lr, ctx)

    def end_epoch(self, epoch: int, mean: Tensor, images: int, seconds: float, lr: float,
                  ctx: StepContext) -> dict[str, Any]:
        avg = distributed.all_reduce_mean(mean, self.info).tolist()
        self.check_finite(avg)
        self.merge_skipped()
        self.check_bad()
        rate = images / max(seconds, 1e-9)
        done = epoch + 1
        summary = {"type": "epoch", "epoch": done, "step": self.step, **dict(zip(self.names, avg)),
                   **self.task.step_values(ctx), "lr": lr, "img_per_s": rate * self.info.world,
                   "img_per_s_per_device": rate, "seconds": seconds, "skipped_files": len(self.skipped)}
        if self.device.type == "cuda":
            summary["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        summary.update(self.task.end_epoch(done, summary))
        self.net.train()
        self.log_record(summary)
        if self.info.is_main:
            parts = ", ".join(f"{k.removeprefix('loss_')} {v:.4f}" for k, v in zip(self.names[1:], avg[1:]))
            log.info("epoch %d/%d  loss %.4f  %s %s lr %.3g  %.1f img/s (%.1f per device)%s",
                     done, self.cfg.train.epochs, avg[0], f"({parts}) " if parts else "",
                     self.task.summary_line(summary), lr, summary["img_per_s"], rate,
                     f"  peak GPU memory {summary['gpu_mem_gib']:.2f} GiB" if "gpu_mem_gib" in summary else "")
        self.save(done, 0, None, summary, periodic=done % self.cfg.train.save_every == 0,
                  also=self.task.extra_checkpoints(summary))
        if self.info.is_main:
            plot_losses(read_metrics(self.run_dir / "metrics.jsonl"), self.run_dir / "plots" / "loss.png")
            self.task.after_epoch(done, summary, self.run_dir)
        return summary

    # -- helpers ---------------------------------------------------------------------------------------------
    def log_record(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(record)
            if record["type"] == "step":
                self.progress.values = record

    @property
    def bad_limit(self) -> float:
        return self.cfg.data.max_bad_fraction * len(self.dataset)

    def merge_skipped(self) -> None:
        """Bad files seen by any rank, once each, on every rank (a collective: all ranks call it)."""
        for part in distributed.gather(self.skipped, self.info):
            self.skipped.update(part)

    def check_bad(self) -> None:
        limit = self.bad_limit
        if len(self.skipped) > limit:
            self.write_skipped()
            shown = "\n  ".join(f"{s.path}: {s.reason}" for s in list(self.skipped.values())[:5])
            raise DataError(f"{len(self.skipped)} of {len(self.dataset)} images could not be used, more than "
                            f"data.max_bad_fraction allows ({limit:.0f}):\n  {shown}\n"
                            f"Full list: {self.run_dir / 'bad_files.txt'}")

    def write_skipped(self) -> None:
        if self.skipped and self.info.is_main:
            (self.run_dir / "bad_files.txt").write_text("".join(f"{s.path}\t{s.reason}\n"
                                                                for s in self.skipped.values()))

    def check_finite(self, values: list[float]) -> None:
        if all(math.isfinite(v) for v in values):
            return
        parts = ", ".join(f"{k} {v}" for k, v in zip(self.names, values))
        raise TrainingDiverged(f"non-finite loss at step {self.step} ({parts}). The last good checkpoint "
                               f"{self.run_dir / 'checkpoints' / 'last.pt'} is intact. Try a lower lr "
                               f"(--set optim.base_lr=...), gradient clipping (--set optim.clip_grad=1.0) or fp32 "
                               f"(--set train.precision=fp32).")


def _seed_rank(seed: int, rank: int) -> None:
    """Per-rank seeds for anything not seeded by what it draws (the data and masks are)."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2 ** 32)
    torch.manual_seed(seed + rank)
