"""The pre-training engine: data → masks → model → losses → optimizer → run folder, on 1..N processes.

Every rank runs the same loop on its chunk of each global batch (``sampler.py``); DDP averages gradients;
rank 0 alone writes files and reports progress. Checkpoints hold everything a resume needs: weights,
optimizer, step, position in the epoch (data order, schedule and masks are functions of them), RNG states.
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
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from cfmae_cli.config import Config, dump_config
from cfmae_cli.data.dataset import Skipped, collate
from cfmae_cli.errors import CfmaeError, DataError
from cfmae_cli.masking import MaskGenerator, schedule
from cfmae_cli.model import CFMAE
from cfmae_cli.seeding import mix_seed
from cfmae_cli.train import distributed
from cfmae_cli.train.checkpoint import (checkpoint_path, load_checkpoint, prune_checkpoints, rng_state,
                                        save_checkpoint, set_rng_state)
from cfmae_cli.train.faults import Preempted, StopRequest, ignore_stop_signals
from cfmae_cli.train.optim import build_optimizer, lr_at
from cfmae_cli.train.plots import plot_losses
from cfmae_cli.train.rundir import MetricsWriter, attach_log_file, new_run_dir, read_metrics
from cfmae_cli.train.sampler import ChunkedSampler, chunk_id
from cfmae_cli.train.setup import build_dataset, dataset_root, describe_plan, make_plan, resolve_device
from cfmae_cli.viz.recon import reconstruction_panels, save_grid

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


def pretrain(cfg: Config, *, out: str | Path | None = None, name: str = "run", resume: str | Path | None = None,
             init: str | Path | None = None, on_progress: Callable[[Progress], None] | None = None
             ) -> dict[str, Any]:
    """Pre-train into a new run folder (``out`` or ``runs/pretrain/<name>[-k]``), or continue the run of
    the checkpoint ``resume`` exactly; ``init`` starts a new run from a checkpoint's weights only.

    In a process group (torchrun), every rank calls this; rank 0 creates the folder and writes the files.
    """
    info = distributed.init(resolve_device(cfg))
    try:
        if resume is not None:
            ckpt_file = checkpoint_path(resume)
            run_dir = ckpt_file.parent.parent
        else:
            ckpt_file = None
            run_dir = Path(distributed.broadcast(str(new_run_dir("pretrain", name, out)) if info.is_main else None,
                                                 info))
        handler = attach_log_file(run_dir) if info.is_main else None
        try:
            try:
                trainer = Trainer(cfg, run_dir, info, on_progress or (lambda p: None))
                if ckpt_file is not None:
                    trainer.restore(load_checkpoint(ckpt_file))
                elif init is not None:
                    trainer.load_weights(init)
            except CfmaeError:
                if info.is_main and resume is None:  # refused before training: leave nothing behind
                    _remove_run_dir(run_dir, handler)
                    handler = None
                raise
            return trainer.fit()
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


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, info: distributed.DistInfo,
                 on_progress: Callable[[Progress], None]):
        self.cfg, self.run_dir, self.info, self.on_progress = cfg, run_dir, info, on_progress
        self.device = info.device
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.root = Path(distributed.broadcast(str(dataset_root(cfg)) if info.is_main else None, info))
        self.dataset, manifest = build_dataset(cfg, self.root)
        self.semantic_classes = list(manifest["semantic_classes"])
        self.plan = make_plan(cfg, len(self.dataset), info.world)
        self.accum = self.plan["accumulation_steps"]
        self.micro_per_epoch = self.plan["steps_per_epoch"] * self.accum
        if self.plan["steps_per_epoch"] == 0:
            raise DataError(f"{self.root}: {len(self.dataset)} images are fewer than one optimizer step needs "
                            f"(batch {cfg.train.batch_size} x {info.world} process(es) x {self.accum} accumulation "
                            f"steps); lower train.batch_size or optim.effective_batch")
        self.sampler = ChunkedSampler(len(self.dataset), cfg.train.batch_size, info.world, info.rank, self.accum,
                                      cfg.train.seed)
        workers = cfg.data.num_workers
        self.loader = DataLoader(self.dataset, batch_size=cfg.train.batch_size, sampler=self.sampler,
                                 num_workers=workers, collate_fn=collate, pin_memory=self.device.type == "cuda",
                                 persistent_workers=workers > 0, worker_init_fn=ignore_stop_signals)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        self.model = CFMAE(cfg, len(self.semantic_classes)).to(self.device)
        self.net = DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda"
                                           else None) if info.distributed else self.model
        self.optimizer = build_optimizer(self.model, cfg.optim, self.plan["lr"], self.device)
        self.masks = MaskGenerator(cfg.masking, cfg.data.modalities, self.model.grid, len(self.semantic_classes),
                                   cfg.model.num_instance_ids)
        self.bf16 = self.device.type == "cuda" and cfg.train.precision in ("auto", "bf16")
        self.names = list(cfg.data.modalities)
        self.step = self.epoch = self.start_micro = 0
        self.partial: dict[str, Any] | None = None
        self.skipped: dict[str, Skipped] = {}  # by path: a file that stays broken counts once
        _seed_rank(cfg.train.seed, info.rank)

    # -- state ---------------------------------------------------------------------------------------------
    def save(self, epoch_done: int, next_step: int, partial: dict[str, Any] | None, summary: dict,
             periodic: bool) -> None:
        """Rank 0 writes ``last.pt`` (and ``epoch-NNNN.pt``, pruned to ``train.keep_last``); all ranks wait.

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
                     "semantic_classes": self.semantic_classes, "metrics": summary,
                     "skipped": [[s.path, s.reason] for s in self.skipped.values()]}
            folder = self.run_dir / "checkpoints"
            save_checkpoint(folder / "last.pt", state)
            if periodic:
                save_checkpoint(folder / f"epoch-{epoch_done:04d}.pt", state)
                prune_checkpoints(folder, self.cfg.train.keep_last)
        if self.info.distributed:
            dist.barrier()

    def restore(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
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

    def load_weights(self, path: str | Path) -> None:
        """``--init``: weights only, from our checkpoints or MAE / MultiMAE / timm ViT files (converted); tensors
        load by name and must have this model's shapes; names that are not in the model are ignored and logged
        (an unknown layout is refused). Optimizer, step and schedule start fresh."""
        from cfmae_cli.model.convert import load_any, to_cfmae

        try:
            state = to_cfmae(load_any(Path(path))[0])  # ours, or MAE / MultiMAE / timm weights converted
        except CfmaeError as exc:
            raise CfmaeError(f"{path}: {exc}" if str(path) not in str(exc) else str(exc)) from None
        own = self.model.state_dict()
        if "encoder.pos_embed" in state and state["encoder.pos_embed"].shape != own["encoder.pos_embed"].shape:
            del state["encoder.pos_embed"]  # fixed sin-cos: this model's own table fits its size
            log.info("%s: position embedding of another size left out (ours is the fixed sin-cos table)", path)
        bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        if bad:
            raise CfmaeError(f"{path}: {len(bad)} tensor(s) do not match this model's shapes "
                             f"(e.g. {bad[0]}: {tuple(state[bad[0]].shape)} vs {tuple(own[bad[0]].shape)})")
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        log.info("initialised from %s (%d tensors; %d missing, %d unused)", path, len(state) - len(unexpected),
                 len(missing), len(unexpected))

    # -- loop ----------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg, main = self.cfg, self.info.is_main
        if main:
            (self.run_dir / "config.yaml").write_text(dump_config(self.cfg))
            log.info("data %s: %d images, %d semantic classes; %s%s", self.root, len(self.dataset),
                     len(self.semantic_classes), self.device, " (bf16)" if self.bf16 else "")
            for line in describe_plan(self.plan, cfg):
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
                "img_per_s": summary.get("img_per_s", math.nan), "skipped_files": len(self.skipped),
                "data": str(self.root)}

    def run_epoch(self, epoch: int, stop: StopRequest) -> dict[str, Any]:
        cfg, info, names, accum = self.cfg, self.info, self.names, self.accum
        self.net.train()
        self.sampler.set_epoch(epoch, self.start_micro)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # gpu_mem_gib is the peak of this epoch
        k = len(names) + 1
        part = self.partial or {"sums": [0.0] * k, "batches": 0, "images": 0, "seconds": 0.0}
        epoch_sum = torch.tensor(part["sums"], device=self.device) * part["batches"]
        epoch_batches, epoch_images = part["batches"], part["images"]
        window_sum = torch.zeros(k, device=self.device)
        window_batches = window_images = 0
        window_start = time.perf_counter()
        start = window_start - part["seconds"]  # the epoch's time includes what ran before a stop
        lr, last_inputs = 0.0, None
        for j, batch in enumerate(self.loader):
            micro = self.start_micro + j
            a = micro % accum
            progress = (epoch + (micro // accum) / self.plan["steps_per_epoch"]) / cfg.train.epochs  # per step
            alpha_i, alpha_s = schedule(progress, cfg.masking.order, cfg.masking.breakpoints)
            if a == 0:
                lr = lr_at(self.step, self.plan["total_steps"], self.plan["warmup_steps"], self.plan["lr"],
                           cfg.optim.min_lr)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
            if batch["skipped"]:
                self.skipped.update((s.path, s) for s in batch["skipped"])
                if not info.distributed:
                    self.check_bad()  # with several ranks: decided together at the end of the step
            weight = 1.0
            if batch["size"] == 0:  # a wholly unreadable batch: repeat the last one with weight 0 (keeps DDP in step)
                if last_inputs is None:
                    raise DataError(f"every image of a batch in {self.root} is unreadable; see bad_files.txt")
                inputs, weight = last_inputs, 0.0
            else:
                inputs = {m: batch[m].to(self.device, non_blocking=True) for m in names}
                last_inputs = inputs
            n = inputs["rgb"].shape[0] if "rgb" in inputs else next(iter(inputs.values())).shape[0]
            seed = mix_seed(cfg.train.seed, epoch, micro // accum, chunk_id(a, info.world, info.rank))
            with torch.no_grad():
                mask = self.masks(alpha_i, alpha_s, n, self.device, instance=inputs.get("instance"),
                                  semantic=inputs.get("semantic"), seed=seed).mask
            sync = contextlib.nullcontext() if a == accum - 1 or not info.distributed else self.net.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    out = self.net(inputs, mask)
                (out["loss"] * (weight / accum)).backward()
            if weight:
                values = torch.stack([out["loss"].detach()] + [out["losses"][m].detach() for m in names])
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
                                     **self.losses(avg), "lr": lr, "alpha_i": alpha_i, "alpha_s": alpha_s,
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
                              lr, alpha_i, alpha_s)

    def end_epoch(self, epoch: int, mean: torch.Tensor, images: int, seconds: float, lr: float, alpha_i: float,
                  alpha_s: float) -> dict[str, Any]:
        avg = distributed.all_reduce_mean(mean, self.info).tolist()
        self.check_finite(avg)
        self.merge_skipped()
        self.check_bad()
        rate = images / max(seconds, 1e-9)
        summary = {"type": "epoch", "epoch": epoch + 1, "step": self.step, **self.losses(avg), "alpha_i": alpha_i,
                   "alpha_s": alpha_s, "lr": lr, "img_per_s": rate * self.info.world, "img_per_s_per_device": rate,
                   "seconds": seconds, "skipped_files": len(self.skipped)}
        if self.device.type == "cuda":
            summary["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        self.log_record(summary)
        if self.info.is_main:
            log.info("epoch %d/%d  loss %.4f  (%s)  α_I %.2f α_S %.2f  lr %.3g  %.1f img/s (%.1f per device)%s",
                     epoch + 1, self.cfg.train.epochs, avg[0],
                     ", ".join(f"{k} {v:.4f}" for k, v in zip(self.names, avg[1:])), alpha_i, alpha_s, lr,
                     summary["img_per_s"], rate, f"  peak GPU memory {summary['gpu_mem_gib']:.2f} GiB"
                     if "gpu_mem_gib" in summary else "")
        done = epoch + 1
        self.save(done, 0, None, summary, periodic=done % self.cfg.train.save_every == 0)
        if self.info.is_main:
            plot_losses(read_metrics(self.run_dir / "metrics.jsonl"), self.run_dir / "plots" / "loss.png")
            if done % self.cfg.train.plot_every == 0 or done == self.cfg.train.epochs:
                self.plot_reconstructions(done, alpha_i, alpha_s)
        return summary

    # -- helpers ---------------------------------------------------------------------------------------------
    def losses(self, avg: list[float]) -> dict[str, float]:
        return {"loss": avg[0], **{f"loss_{k}": v for k, v in zip(self.names, avg[1:])}}

    def log_record(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(record)
            if record["type"] == "step":
                self.progress.values = record

    def plot_reconstructions(self, epoch: int, alpha_i: float, alpha_s: float) -> None:
        """The fixed first images of the dataset (centred square, no augmentation), masked with a fixed seed."""
        fixed = self.dataset.with_transform(train=False)
        items = [x for x in (fixed[i] for i in range(min(len(fixed), 4 * self.cfg.train.plot_samples)))
                 if not isinstance(x, Skipped)][: self.cfg.train.plot_samples]
        if not items:
            return
        batch = {m: v.to(self.device) for m, v in collate(items).items() if m in self.names}
        n = len(items)
        mask = self.masks(alpha_i, alpha_s, n, self.device, instance=batch.get("instance"),
                          semantic=batch.get("semantic"), seed=mix_seed(self.cfg.train.seed, 2 ** 20)).mask
        self.model.eval()
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            pred = self.model(batch, mask)["pred"]
        self.model.train()
        panels = reconstruction_panels(batch, mask, pred, self.names, self.model.classes, self.model.patch,
                                       self.cfg.model.norm_pix_loss, self.cfg.data.mean, self.cfg.data.std)
        save_grid(panels, self.run_dir / "plots" / f"recon-epoch-{epoch:04d}.png",
                  f"epoch {epoch}  alpha_I {alpha_i:.2f}  alpha_S {alpha_s:.2f}")

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
        parts = ", ".join(f"{k} {v}" for k, v in zip(["total"] + self.names, values))
        raise TrainingDiverged(f"non-finite loss at step {self.step} ({parts}). The last good checkpoint "
                               f"{self.run_dir / 'checkpoints' / 'last.pt'} is intact. Try a lower lr "
                               f"(--set optim.base_lr=...), gradient clipping (--set optim.clip_grad=1.0) or fp32 "
                               f"(--set train.precision=fp32).")


def _seed_rank(seed: int, rank: int) -> None:
    """Per-rank seeds for anything not seeded by what it draws (the data and masks are)."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2 ** 32)
    torch.manual_seed(seed + rank)
