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
import dataclasses
import logging
import math
import random
import sys
from pathlib import Path
from typing import Any, Callable, cast, Sized

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from cfmae_cli.checkpoints import (load_checkpoint, prune_checkpoints, rng_state, save_checkpoint,
                                   set_rng_state, state_bytes)
from cfmae_cli.config import dump_config
from cfmae_cli.errors import DataError
from cfmae_cli.formats import atomic_write_text
from cfmae_cli.seeding import mix_seed
from cfmae_cli.train import distributed, provenance
from cfmae_cli.train.divergence import LossWatch, TrainingDiverged, keep_last_good
from cfmae_cli.train.faults import Preempted, StopRequest, ignore_stop_signals, shut_down_workers
from cfmae_cli.train.ledger import BadFiles
from cfmae_cli.train.meters import Meters
from cfmae_cli.train.optim import lr_at
from cfmae_cli.train.plots import plot_losses
from cfmae_cli.train.rundir import mark_finished, MetricsWriter, read_metrics, RunFolder
from cfmae_cli.train.sampler import ChunkedSampler, chunk_id
from cfmae_cli.train.trackers import check_available
from cfmae_cli.train.task import Plan, Progress, StepContext, Task, TrainingConfig
from cfmae_cli.train.setup import (describe_schedule, fitting_batch, load_average, make_plan, slow_run_warning,
                                   usable_cores)

log = logging.getLogger(__name__)


def too_few_images(task: Task, images: int, cfg: TrainingConfig, world: int, accum: int) -> str:
    """The message for a task whose ``images`` training images make no optimizer step: the batch they need, and
    values of both keys that give an epoch several steps (and, where the data is a held-out split, its share)."""
    batch = fitting_batch(images, world, 4)  # at least 4 steps an epoch
    fix = (f"--set train.batch_size={batch} --set optim.effective_batch={batch * world}" if batch * world <= images
           else "more images")
    held = task.val_fraction
    share = (f"; data.val_fraction {held:g} holds {held:.0%} of each class out of training: a smaller share "
             f"(e.g. --set data.val_fraction=0.2) leaves more") if held else ""
    return (f"{task.root}: {images} training image(s) are fewer than one optimizer step needs (train.batch_size "
            f"{cfg.train.batch_size} x {world} process(es) x {accum} accumulation step(s) = optim.effective_batch "
            f"{cfg.train.batch_size * world * accum}); give {fix}{share}.")


ENGINE_KEYS = ("model", "optimizer", "scaler", "epoch", "next_step", "step", "partial", "rng", "config",
               "world_size", "metrics", "skipped")


def run_task(cfg: TrainingConfig, make_task: Callable[[distributed.DistInfo], Task], device: torch.device, *, command: str,
             out: str | Path | None = None, name: str = "run", resume: str | Path | None = None,
             prepare: Callable[[Task], None] | None = None, on_progress: Callable[[Progress], None] | None = None
             ) -> dict[str, Any]:
    """Train ``make_task(info)`` into a new run folder (``out`` or ``runs/<command>/<name>[-k]``), or continue
    the run of the checkpoint ``resume`` exactly. ``prepare(task)`` runs before training (e.g. ``--init``).

    In a process group (torchrun), every rank calls this; rank 0 creates the folder and writes the files. The
    bf16 decision is made here, once (``info.bf16``), for the engine and the task.
    """
    info = distributed.init(device)
    info = dataclasses.replace(info, bf16=distributed.precision_for(cfg.train.precision, info.device))  # (+TF32)
    try:
        with RunFolder(command, name, out, resume, info) as folder:
            with folder.refused_leaves_nothing():
                engine = Engine(cfg, make_task(info), folder.path, info, on_progress or (lambda p: None))
                if folder.checkpoint is not None:
                    engine.restore(load_checkpoint(folder.checkpoint))
                elif prepare is not None:
                    prepare(engine.task)
            if info.is_main:
                provenance.record_start(folder.path, provenance.session(
                    command, info.device, info.world, engine.task.root, folder.checkpoint is not None, info.bf16))
            with provenance.outcome(folder.path, info.is_main) as done:
                summary = engine.fit()
                done(f"{summary['epochs']} epochs, {summary['steps']} steps, last epoch loss "
                     f"{summary['last_epoch_loss']:.4f}")
            return summary
    finally:
        distributed.shutdown()


class Engine:
    def __init__(self, cfg: TrainingConfig, task: Task, run_dir: Path, info: distributed.DistInfo,
                 on_progress: Callable[[Progress], None]):
        self.cfg, self.task, self.run_dir, self.info, self.on_progress = cfg, task, run_dir, info, on_progress
        check_available(cfg.train.loggers)
        self.device = info.device
        self.dataset = task.dataset
        self.images = len(cast(Sized, self.dataset))  # (torch's Dataset declares no length; a task's has one)
        self.plan: Plan = make_plan(cfg, self.images, info.world)
        self.accum = self.plan.accumulation_steps
        self.micro_per_epoch = self.plan.steps_per_epoch * self.accum
        if self.plan.steps_per_epoch == 0:
            raise DataError(too_few_images(task, self.images, cfg, info.world, self.accum))
        self.sampler = ChunkedSampler(self.images, cfg.train.batch_size, info.world, info.rank, self.accum,
                                      cfg.train.seed)
        workers = cfg.data.num_workers
        self.loader = DataLoader(self.dataset, batch_size=cfg.train.batch_size, sampler=self.sampler,
                                 num_workers=workers, collate_fn=task.collate,
                                 pin_memory=self.device.type == "cuda",
                                 persistent_workers=workers > 0, worker_init_fn=ignore_stop_signals,
                                 generator=torch.Generator().manual_seed(cfg.train.seed))
        # (its own generator: starting an epoch's iterator must not draw from the global RNG, whose state a
        # checkpoint restores exactly — drop path draws from it)
        self.model = task.model
        trainable = any(p.requires_grad for p in self.model.parameters())
        self.ddp = DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda"
                                           else None) if info.distributed and trainable else None
        self.net: nn.Module = self.model if self.ddp is None else self.ddp
        if cfg.train.compile:  # the forward and loss as one graph (docs/performance.md); weights stay self.model's
            self.net = cast(nn.Module, torch.compile(self.net))
        self.optimizer = task.build_optimizer(self.plan.lr, self.device)
        self.names = list(task.names)
        self.step = self.epoch = self.start_micro = 0
        self.partial: dict[str, Any] | None = None
        self.bad = BadFiles(run_dir, self.images, cfg.data.max_bad_fraction, info,
                            str(task.root))
        _seed_rank(cfg.train.seed, info.rank)

    # -- state ---------------------------------------------------------------------------------------------
    def save(self, epoch_done: int, next_step: int, partial: dict[str, Any] | None, summary: dict,
             periodic: bool, also: tuple[str, ...] | list[str] = ()) -> None:
        """Rank 0 writes ``last.pt`` (``epoch-NNNN.pt`` pruned to ``train.keep_last``, and ``also``); all wait for
        it on the gloo group, with a timeout sized for the write (:func:`distributed.wait_for_main`).

        The position is (completed epochs, optimizer steps done in the next one): with the same effective
        batch it means the same images whatever the number of processes. RNG states are kept per rank.
        """
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            raise TrainingDiverged(f"non-finite weights after step {self.step} (an inf/NaN gradient in the last "
                                   f"step); nothing was saved. Try gradient clipping (--set optim.clip_grad=1.0) or "
                                   f"a lower lr.", self.step)
        rng = distributed.gather(rng_state(), self.info)
        if self.info.is_main:
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "scaler": {},
                     "epoch": epoch_done, "next_step": next_step, "step": self.step, "partial": partial,
                     "rng": rng, "config": self.cfg.model_dump(mode="json"), "world_size": self.info.world,
                     "metrics": summary, "skipped": self.bad.state(),
                     **self.task.state_dict()}
            folder = self.run_dir / "checkpoints"
            save_checkpoint(folder / "last.pt", state)
            mark_finished(self.run_dir)
            for extra in also:
                save_checkpoint(folder / extra, state)
            if periodic:
                save_checkpoint(folder / f"epoch-{epoch_done:04d}.pt", state)
                prune_checkpoints(folder, self.cfg.train.keep_last)
        distributed.wait_for_main(self.info, state_bytes(self.model.state_dict(), self.optimizer.state_dict()),
                                  1 + len(also) + periodic)

    def restore(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.task.load_state_dict(ckpt)
        self.step, self.epoch = ckpt["step"], ckpt["epoch"]
        self.start_micro = ckpt["next_step"] * self.accum
        self.partial = ckpt.get("partial")
        self.bad.restore(ckpt.get("skipped", []))
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
            atomic_write_text(self.run_dir / "config.yaml", dump_config(self.cfg))
            log.info("%s: %d training images; %s%s", self.task.command, self.images, self.device,
                     " (bf16)" if self.info.bf16 else "")
            for line in describe_schedule(self.plan, cfg) + self.task.describe(self.plan):
                log.info("%s", line)
            if 0 < self.plan.total_steps <= self.plan.warmup_steps:
                log.warning("optim.warmup_epochs %g is not shorter than train.epochs %d: the lr never leaves its "
                            "warmup (the last step reaches %.0f%% of the peak lr); lower optim.warmup_epochs",
                            cfg.optim.warmup_epochs, cfg.train.epochs,
                            100 * self.plan.total_steps / max(self.plan.warmup_steps, 1))
        resumed = self.step > 0 or self.epoch > 0
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl", cfg.train.loggers, cfg.model_dump(mode="json"),
                                     resume_step=self.step if resumed else None) if main else None
        self.progress = Progress(epochs=cfg.train.epochs, batches=self.micro_per_epoch, step=self.step)
        summary: dict[str, Any] = {}
        self.watch = LossWatch(self.device)
        try:
            if not resumed:
                self.monitor(0)
            with StopRequest() as stop:
                for epoch in range(self.epoch, cfg.train.epochs):
                    summary = self.run_epoch(epoch, stop)
                    self.start_micro, self.partial = 0, None
                    if epoch + 1 < cfg.train.epochs and distributed.any_rank(stop.signum is not None, self.info):
                        raise Preempted(stop.signum or 15, self.step, str(self.run_dir / "checkpoints" / "last.pt"))
        except TrainingDiverged as exc:
            first = self.watch.first_bad_step(self.info)  # every rank: a collective
            if not main:
                raise
            kept = keep_last_good(self.run_dir / "checkpoints", exc.step + 1 if first is None else first)
            raise TrainingDiverged(f"{exc} {kept}", exc.step, exc.loss) from None
        finally:
            if self.metrics is not None:
                error = sys.exc_info()[0]
                self.metrics.close(failed=error is not None and not issubclass(error, Preempted))
            self.bad.write()
            shut_down_workers(getattr(self.loader, "_iterator", None))  # persistent workers: with the run
        epochs = [r for r in read_metrics(self.run_dir / "metrics.jsonl") if r["type"] == "epoch"] if main else []
        return {"run_dir": str(self.run_dir), "epochs": cfg.train.epochs, "steps": self.step,
                "first_epoch_loss": epochs[0]["loss"] if epochs else math.nan,
                "last_epoch_loss": epochs[-1]["loss"] if epochs else math.nan,
                "last_epoch": epochs[-1] if epochs else {},
                "img_per_s": summary.get("img_per_s", math.nan), "skipped_files": len(self.bad),
                "data": str(self.task.root)}

    def context(self, epoch: int, micro: int) -> StepContext:
        a = micro % self.accum
        step_in_epoch = micro // self.accum
        return StepContext(epoch, step_in_epoch,
                           (epoch + step_in_epoch / self.plan.steps_per_epoch) / self.cfg.train.epochs,
                           mix_seed(self.cfg.train.seed, epoch, step_in_epoch,
                                    chunk_id(a, self.info.world, self.info.rank)))

    def run_epoch(self, epoch: int, stop: StopRequest) -> dict[str, Any]:
        """One epoch from ``start_micro``: accumulate, step, log, and stop with the other ranks on a signal."""
        info, accum = self.info, self.accum
        self.net.train()
        self.sampler.set_epoch(epoch, self.start_micro)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # gpu_mem_gib is the peak of this epoch
        meters = Meters(len(self.names), self.device, self.partial)
        lr, ctx = 0.0, self.context(epoch, self.start_micro)
        for j, batch in enumerate(self.loader):
            micro = self.start_micro + j
            ctx, steps = self.context(epoch, micro), micro % accum == accum - 1
            if micro % accum == 0:
                lr = self.set_lr()
            self.micro_batch(batch, ctx, steps, meters)
            if steps:
                last = micro == self.micro_per_epoch - 1
                if self.step % self.cfg.train.log_every == 0 or last:
                    self.log_step(epoch, micro, meters, lr, ctx)
                self.bad.check_all()
                if not last and distributed.any_rank(stop.signum is not None, info):
                    self.preempt(epoch, micro, meters, stop)
            if info.is_main:
                self.progress.epoch, self.progress.batch, self.progress.step = epoch + 1, micro + 1, self.step
                self.progress.images += batch["size"] * info.world
                self.on_progress(self.progress)
        return self.end_epoch(epoch, meters, lr, ctx)

    def micro_batch(self, batch: dict[str, Any], ctx: StepContext, steps: bool, meters: Meters) -> None:
        """One micro-batch: to the device, forward and backward (gradients synchronised by DDP at the last of a
        step's), the meters, and the optimizer step after the last. Nothing here waits for the device (no host
        sync: tests/test_host_sync.py), so the host runs ahead and queues the next step's work."""
        self.bad.add(batch["skipped"])
        inputs, weight = self.bad.inputs(batch, self.to_device)
        with contextlib.nullcontext() if steps or self.ddp is None else self.ddp.no_sync():
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.info.bf16):
                loss, values = self.task.forward(self.net, inputs, ctx)
            (loss * (weight / self.accum)).backward()
        self.bad.add(self.task.take_skipped())  # files that failed on the device (data.decode: gpu)
        if weight:
            meters.add(values, batch["size"])
            self.watch.add(values[0], self.step + 1)
        if steps:
            self.optimizer_step()

    def set_lr(self) -> float:
        """The scheduled lr of this optimizer step, scaled by each group's ``lr_scale`` (layer-wise decay)."""
        cfg = self.cfg
        schedule, milestones = cfg.optim.lr_decay()
        lr = lr_at(self.step, self.plan.total_steps, self.plan.warmup_steps, self.plan.lr, cfg.optim.min_lr,
                   schedule, tuple(m / cfg.train.epochs for m in milestones))
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def optimizer_step(self) -> None:
        if self.cfg.optim.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    def log_step(self, epoch: int, micro: int, meters: Meters, lr: float, ctx: StepContext) -> None:
        """The step record: the window's means over all ranks (checked finite), lr, img/s."""
        window, rate = meters.window()
        avg = distributed.all_reduce_mean(window, self.info).tolist()
        self.check_finite(avg)
        self.log_record({"type": "step", "epoch": epoch + 1, "epoch_float": epoch + (micro + 1) / self.micro_per_epoch,
                         "step": self.step, **dict(zip(self.names, avg)), "lr": lr, **self.task.step_values(ctx),
                         "img_per_s": rate * self.info.world, "img_per_s_per_device": rate})

    def preempt(self, epoch: int, micro: int, meters: Meters, stop: StopRequest) -> None:
        """A signal asked the run to stop: save where it is (never NaN weights) and leave."""
        self.check_finite(distributed.all_reduce_mean(meters.epoch_mean(), self.info).tolist())
        self.save(epoch, (micro + 1) // self.accum, meters.partial(), {}, periodic=False)
        raise Preempted(stop.signum or 15, self.step, str(self.run_dir / "checkpoints" / "last.pt"))

    def end_epoch(self, epoch: int, meters: Meters, lr: float, ctx: StepContext) -> dict[str, Any]:
        avg = distributed.all_reduce_mean(meters.epoch_mean(), self.info).tolist()
        self.check_finite(avg)
        self.bad.merge()
        self.bad.check()
        seconds = meters.seconds()
        rate = meters.epoch_images / max(seconds, 1e-9)
        done = epoch + 1
        summary = {"type": "epoch", "epoch": done, "step": self.step, **dict(zip(self.names, avg)),
                   **self.task.step_values(ctx), "lr": lr, "img_per_s": rate * self.info.world,
                   "img_per_s_per_device": rate, "seconds": seconds, "skipped_files": len(self.bad)}
        if self.device.type == "cuda":
            summary["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        summary.update(self.task.end_epoch(done, summary))
        self.net.train()
        self.log_record(summary)
        monitor = self.monitor(done)
        if self.info.is_main:
            parts = ", ".join(f"{k.removeprefix('loss_')} {v:.4f}" for k, v in zip(self.names[1:], avg[1:]))
            log.info("epoch %d/%d  loss %.4f  %s %s%slr %.3g  %.1f img/s (%.1f per device)%s",
                     done, self.cfg.train.epochs, avg[0], f"({parts}) " if parts else "",
                     self.task.summary_line(summary), self.task.monitor_line(monitor) if monitor else "", lr,
                     summary["img_per_s"], rate,
                     f"  peak GPU memory {summary['gpu_mem_gib']:.2f} GiB" if "gpu_mem_gib" in summary else "")
            if done == 1 and self.device.type == "cpu":  # once: say why a CPU run is slow, if it is
                warning = slow_run_warning(usable_cores(), load_average() or 0.0, self.plan.threads,
                                           self.plan.procs, self.plan.workers, summary["img_per_s"])
                if warning:
                    log.warning("%s", warning)
        self.save(done, 0, None, summary, periodic=done % self.cfg.train.save_every == 0,
                  also=self.task.extra_checkpoints(summary))
        if self.info.is_main:
            loss_png = plot_losses(read_metrics(self.run_dir / "metrics.jsonl"), self.run_dir / "plots" / "loss.png")
            figures = [("plots/loss", loss_png), *(self.task.after_epoch(done, summary, self.run_dir) or [])]
            assert self.metrics is not None  # rank 0's
            for tag, path in figures:
                self.metrics.image(tag, path, self.step)
        return summary

    # -- helpers ---------------------------------------------------------------------------------------------
    def monitor(self, done: int) -> dict[str, Any] | None:
        """The task's monitor after ``done`` epochs, when due: a ``monitor`` record (and the progress line's)."""
        values = self.task.monitor_values(done)
        if values is None:
            return None
        record = {"type": "monitor", "epoch": done, "step": self.step, **values}
        self.log_record(record)
        if self.info.is_main:
            self.progress.monitor = record
            if done == 0:
                log.info("before training: %s", self.task.monitor_line(record))
        return record

    def log_record(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(record)
            if record["type"] == "step":
                self.progress.values = record

    def check_finite(self, values: list[float]) -> None:
        if all(math.isfinite(v) for v in values):
            return
        parts = ", ".join(f"{k} {v}" for k, v in zip(self.names, values))
        raise TrainingDiverged(f"non-finite loss at step {self.step} ({parts}). Try a lower lr (--set "
                               f"optim.base_lr=...), gradient clipping (--set optim.clip_grad=1.0) or fp32 (--set "
                               f"train.precision=fp32).", self.step, values[0])


def _seed_rank(seed: int, rank: int) -> None:
    """Per-rank seeds for anything not seeded by what it draws (the data and masks are)."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2 ** 32)
    torch.manual_seed(seed + rank)
