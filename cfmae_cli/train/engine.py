"""The pre-training engine: data → masks → model → losses → optimizer → run folder (single process)."""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from cfmae_cli.config import Config, derived, dump_config
from cfmae_cli.data.dataset import MultiGranularDataset, Skipped, collate
from cfmae_cli.data.layout import list_samples, read_manifest
from cfmae_cli.data.transforms import JointTransform
from cfmae_cli.errors import DataError
from cfmae_cli.masking import MaskGenerator, schedule
from cfmae_cli.model import CFMAE
from cfmae_cli.train.checkpoint import rng_state, save_checkpoint
from cfmae_cli.train.optim import build_optimizer, lr_at
from cfmae_cli.train.plots import plot_losses
from cfmae_cli.train.rundir import MetricsWriter, attach_log_file, read_metrics

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


@dataclass
class Progress:
    """What the engine reports to the caller (the CLI draws it); values are from the last log point."""

    epoch: int = 0
    epochs: int = 0
    batch: int = 0
    batches: int = 0
    step: int = 0
    images: int = 0
    values: dict[str, float] = field(default_factory=dict)


def resolve_device(cfg: Config) -> torch.device:
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DataError("train.device: cuda was asked for but no GPU is visible; use --set train.device=cpu")
        return torch.device("cuda")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def dataset_root(cfg: Config) -> Path:
    """The configured data folder, or the built-in demo data (built and cached on first use)."""
    if cfg.data.root is not None:
        return Path(cfg.data.root)
    from cfmae_cli.data.demo import build_demo_dataset, default_demo_root

    root = build_demo_dataset(default_demo_root(), crops_per_photo=cfg.data.demo_crops_per_photo,
                              size=cfg.data.demo_size, seed=0)
    log.info("built-in demo data: %s", root)
    return Path(root)


def build_dataset(cfg: Config, root: Path, train: bool = True) -> tuple[MultiGranularDataset, dict[str, Any]]:
    """The dataset of ``root`` for this config, and its manifest (which gives C_sem)."""
    manifest = read_manifest(root)
    maps = [m for m in cfg.data.modalities if m != "rgb"]
    samples, _ = list_samples(root, maps=maps)
    d = cfg.data
    transform = JointTransform(d.img_size, cfg.model.map_stride, cfg.model.num_instance_ids, d.crop_scale,
                               d.crop_ratio, d.hflip, d.mean, d.std, train=train)
    return MultiGranularDataset(samples, transform, maps, manifest["num_semantic_classes"]), manifest


def pretrain(cfg: Config, run_dir: str | Path, on_progress: Callable[[Progress], None] | None = None
             ) -> dict[str, Any]:
    """Run CFMAE pre-training into ``run_dir`` (created by the caller). Returns a summary dict.

    Writes ``config.yaml``, ``log.txt``, ``metrics.jsonl``, ``checkpoints/last.pt`` (+ every
    ``train.save_every`` epochs), ``plots/loss.png`` and, when files were skipped, ``bad_files.txt``.
    """
    run_dir = Path(run_dir)
    handler = attach_log_file(run_dir)
    try:
        return _pretrain(cfg, run_dir, on_progress or (lambda p: None))
    finally:
        logging.getLogger("cfmae_cli").removeHandler(handler)
        handler.close()


def _pretrain(cfg: Config, run_dir: Path, on_progress: Callable[[Progress], None]) -> dict[str, Any]:
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg)
    info = derived(cfg, world_size=1)
    root = dataset_root(cfg)
    dataset, manifest = build_dataset(cfg, root)
    num_sem = manifest["num_semantic_classes"]
    accum = info["accumulation_steps"]
    per_epoch = (len(dataset) // cfg.train.batch_size) // accum  # optimizer steps per epoch
    if per_epoch == 0:
        raise DataError(f"{root}: {len(dataset)} images are fewer than one optimizer step needs "
                        f"(batch {cfg.train.batch_size} x {accum} accumulation steps); lower "
                        f"train.batch_size or optim.effective_batch")
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                        num_workers=cfg.data.num_workers, collate_fn=collate, pin_memory=device.type == "cuda",
                        persistent_workers=cfg.data.num_workers > 0,
                        generator=torch.Generator().manual_seed(cfg.train.seed))
    model = CFMAE(cfg, num_sem).to(device)
    optimizer = build_optimizer(model, cfg.optim, info["lr"], device)
    masks = MaskGenerator(cfg.masking, cfg.data.modalities, model.grid, num_sem, cfg.model.num_instance_ids)
    use_bf16 = device.type == "cuda" and cfg.train.precision in ("auto", "bf16")
    epochs, micro_per_epoch = cfg.train.epochs, per_epoch * accum
    total_steps, warmup = per_epoch * epochs, cfg.optim.warmup_epochs * per_epoch
    n_params = sum(p.numel() for p in model.encoder.parameters())
    log.info("data %s: %d images, %d semantic classes; device %s%s", root, len(dataset), num_sem, device,
             " (bf16)" if use_bf16 else "")
    log.info("encoder %.2fM parameters; tokens %d visible of %d; effective batch %d = %d x %d device(s) x %d "
             "accumulation; lr %.3g (base %.3g x %d / 256); %d steps (%d per epoch), warmup %d",
             n_params / 1e6, info["num_visible"], info["tokens_total"], info["effective_batch"],
             cfg.train.batch_size, 1, accum, info["lr"], cfg.optim.base_lr, info["effective_batch"],
             total_steps, per_epoch, int(warmup))
    metrics = MetricsWriter(run_dir / "metrics.jsonl")
    names = list(cfg.data.modalities)
    skipped: dict[str, Skipped] = {}  # by path: a file that stays broken counts once, not once per epoch
    bad_limit = cfg.data.max_bad_fraction * len(dataset)
    state = Progress(epochs=epochs, batches=micro_per_epoch)
    step, epoch_losses, summary = 0, [], {}
    lr, (alpha_i, alpha_s) = 0.0, schedule(0.0, cfg.masking.order, cfg.masking.breakpoints)
    try:
        for epoch in range(epochs):
            model.train()
            epoch_sum = torch.zeros(len(names) + 1, device=device)
            window_sum = torch.zeros(len(names) + 1, device=device)
            epoch_batches = window_batches = window_images = 0
            window_start = epoch_start = time.perf_counter()
            for i, batch in enumerate(loader):
                if i >= micro_per_epoch:
                    break
                progress = (epoch + i / micro_per_epoch) / epochs
                alpha_i, alpha_s = schedule(progress, cfg.masking.order, cfg.masking.breakpoints)
                if i % accum == 0:
                    lr = lr_at(step, total_steps, warmup, info["lr"], cfg.optim.min_lr)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                if batch["skipped"]:
                    skipped.update((s.path, s) for s in batch["skipped"])
                    _check_bad(list(skipped.values()), bad_limit, len(dataset), run_dir)
                if batch["size"] == 0:
                    continue
                inputs = {k: batch[k].to(device, non_blocking=True) for k in names}
                with torch.no_grad():
                    mask = masks(alpha_i, alpha_s, batch["size"], device, instance=inputs.get("instance"),
                                 semantic=inputs.get("semantic")).mask
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    out = model(inputs, mask)
                (out["loss"] / accum).backward()
                values = torch.stack([out["loss"].detach()] + [out["losses"][k].detach() for k in names])
                epoch_sum += values
                window_sum += values
                epoch_batches += 1
                window_batches += 1
                window_images += batch["size"]
                state.images += batch["size"]
                if i % accum == accum - 1:
                    if cfg.optim.clip_grad:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    if step % cfg.train.log_every == 0 or i == micro_per_epoch - 1:
                        now = time.perf_counter()
                        avg = (window_sum / window_batches).tolist()
                        _check_finite(avg, names, step, run_dir)
                        record = {"type": "step", "epoch": epoch + 1, "epoch_float": epoch + (i + 1) / micro_per_epoch,
                                  "step": step, "loss": avg[0], **{f"loss_{k}": v for k, v in zip(names, avg[1:])},
                                  "lr": lr, "alpha_i": alpha_i, "alpha_s": alpha_s,
                                  "img_per_s": window_images / max(now - window_start, 1e-9)}
                        metrics.write(record)
                        state.values = record
                        window_sum.zero_()
                        window_batches = window_images = 0
                        window_start = now
                state.epoch, state.batch, state.step = epoch + 1, i + 1, step
                on_progress(state)
            avg = (epoch_sum / max(epoch_batches, 1)).tolist()
            _check_finite(avg, names, step, run_dir)
            elapsed = time.perf_counter() - epoch_start
            summary = {"type": "epoch", "epoch": epoch + 1, "step": step, "loss": avg[0],
                       **{f"loss_{k}": v for k, v in zip(names, avg[1:])}, "alpha_i": alpha_i, "alpha_s": alpha_s,
                       "lr": lr, "img_per_s": epoch_batches * cfg.train.batch_size / max(elapsed, 1e-9),
                       "seconds": elapsed, "skipped_files": len(skipped)}
            metrics.write(summary)
            epoch_losses.append(avg[0])
            log.info("epoch %d/%d  loss %.4f  (%s)  α_I %.2f α_S %.2f  lr %.3g  %.1f img/s", epoch + 1, epochs,
                     avg[0], ", ".join(f"{k} {v:.4f}" for k, v in zip(names, avg[1:])), alpha_i, alpha_s, lr,
                     summary["img_per_s"])
            ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": {},
                    "epoch": epoch + 1, "step": step, "rng": rng_state(), "config": cfg.model_dump(mode="json"),
                    "semantic_classes": list(manifest["semantic_classes"]), "metrics": summary}
            save_checkpoint(run_dir / "checkpoints" / "last.pt", ckpt)
            if (epoch + 1) % cfg.train.save_every == 0:
                save_checkpoint(run_dir / "checkpoints" / f"epoch-{epoch + 1:04d}.pt", ckpt)
            plot_losses(read_metrics(run_dir / "metrics.jsonl"), run_dir / "plots" / "loss.png")
    finally:
        metrics.close()
        _write_skipped(list(skipped.values()), run_dir)
    return {"run_dir": str(run_dir), "epochs": epochs, "steps": step, "first_epoch_loss": epoch_losses[0],
            "last_epoch_loss": epoch_losses[-1], "img_per_s": summary.get("img_per_s"),
            "skipped_files": len(skipped), "data": str(root)}


def _check_bad(skipped: list[Skipped], limit: float, total: int, run_dir: Path) -> None:
    if len(skipped) > limit:
        _write_skipped(skipped, run_dir)
        shown = "\n  ".join(f"{s.path}: {s.reason}" for s in skipped[:5])
        raise DataError(f"{len(skipped)} of {total} images could not be used, more than data.max_bad_fraction "
                        f"allows ({limit:.0f}):\n  {shown}\nFull list: {run_dir / 'bad_files.txt'}")


def _write_skipped(skipped: list[Skipped], run_dir: Path) -> None:
    if skipped:
        (run_dir / "bad_files.txt").write_text("".join(f"{s.path}\t{s.reason}\n" for s in skipped))


def _check_finite(values: list[float], names: list[str], step: int, run_dir: Path) -> None:
    if all(math.isfinite(v) for v in values):
        return
    parts = ", ".join(f"{k} {v}" for k, v in zip(["total"] + names, values))
    raise TrainingDiverged(f"non-finite loss at step {step} ({parts}). The last good checkpoint "
                           f"{run_dir / 'checkpoints' / 'last.pt'} is intact. Try a lower lr "
                           f"(--set optim.base_lr=...), gradient clipping (--set optim.clip_grad=1.0) or fp32 "
                           f"(--set train.precision=fp32).")
