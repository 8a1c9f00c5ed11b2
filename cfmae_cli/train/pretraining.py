"""CFMAE pre-training as a task of the engine: data → masks → model → losses; reconstruction grids."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from cfmae_cli import modalities as table
from cfmae_cli.config import Config
from cfmae_cli.data.dataset import collate, MultiGranularDataset, Skipped
from cfmae_cli.data.device_augment import DeviceAugment, take_skipped
from cfmae_cli.data.layout import SampleTable, is_packed, list_samples, read_packed_manifest
from cfmae_cli.data.packed import PackedDataset
from cfmae_cli.data.raw import raw_reader, RawFolder, RawPacked
from cfmae_cli.data.transforms import inputs_on_device
from cfmae_cli.errors import CfmaeError
from cfmae_cli.masking import MaskGenerator, Masks, schedule
from cfmae_cli.model import CFMAE
from cfmae_cli.model.align import Teacher
from cfmae_cli.model.weights import load_weights, read_weights
from cfmae_cli.seeding import mix_seed
from cfmae_cli.train import distributed
from cfmae_cli.train.engine import run_task
from cfmae_cli.train.monitor import KnnMonitor, monitor_samples, MonitorSplit
from cfmae_cli.train.optim import build_optimizer
from cfmae_cli.train.setup import (build_dataset, dataset_root, describe_tokens, monitor_root, resolve_device,
                                   set_threads)
from cfmae_cli.train.task import Plan, Progress, StepContext, Task
from cfmae_cli.viz.recon import class_legend, reconstruction_panels, save_grid

log = logging.getLogger(__name__)


def pretrain(cfg: Config, *, out: str | Path | None = None, name: str = "run", resume: str | Path | None = None,
             init: str | Path | None = None, on_progress: Callable[[Progress], None] | None = None
             ) -> dict[str, Any]:
    """Pre-train into a new run folder (``out`` or ``runs/pretrain/<name>[-k]``), or continue the run of
    the checkpoint ``resume`` exactly; ``init`` starts a new run from a checkpoint's weights only."""
    prepare = (lambda task: task.load_weights(init)) if init is not None else None
    summary = run_task(cfg, lambda info: PretrainTask(cfg, info), resolve_device(cfg), command="pretrain", out=out,
                       name=name, resume=resume, prepare=prepare, on_progress=on_progress)
    return summary


def pretraining_samples(cfg: Config, root: Path, labelled: Path | None, quiet: bool = False
                        ) -> tuple[SampleTable | None, MonitorSplit | None]:
    """The samples of ``root`` (None for packed data) and the k-NN monitor's choice (:func:`monitor_samples`:
    the samples left to pre-train on, the bank, the val set, the classes; None when the monitor is off)."""
    samples, classes = (None, []) if is_packed(root) else list_samples(root, maps=table.maps_of(cfg.data.modalities))
    return samples, monitor_samples(cfg, labelled, samples, classes, quiet)


def pretraining_images(cfg: Config) -> int:
    """The images a run of ``cfg`` pre-trains on: its data less the share the k-NN monitor holds out."""
    root = dataset_root(cfg)
    samples, picked = pretraining_samples(cfg, root, monitor_root(cfg), quiet=True)
    if picked and picked[0] is not None:
        return len(picked[0])
    return len(samples) if samples is not None else int(read_packed_manifest(root)["images"])


class PretrainTask(Task):
    command = "pretrain"
    model: CFMAE
    dataset: MultiGranularDataset | PackedDataset | RawFolder | RawPacked

    def __init__(self, cfg: Config, info: distributed.DistInfo):
        self.cfg, self.info, self.device = cfg, info, info.device
        set_threads(cfg, info.world)  # train.threads, or the cores' share left beside the data workers
        self.root = Path(distributed.broadcast(str(dataset_root(cfg)) if info.is_main else None, info))
        labelled = distributed.broadcast(monitor_root(cfg) if info.is_main else None, info)
        samples, picked = pretraining_samples(cfg, self.root, labelled)
        self.dataset, manifest = build_dataset(cfg, self.root, samples=picked[0] if picked else samples)
        self.plot_dataset = self.dataset  # the figures decode their few images on the CPU
        self.augment: DeviceAugment | None = None
        if cfg.data.decode == "gpu":  # workers read bytes; the device decodes, crops and flips
            self.dataset = raw_reader(self.dataset)
            self.augment = DeviceAugment(cfg.data.img_size, cfg.model.map_stride, cfg.model.num_instance_ids,
                                         table.maps_of(cfg.data.modalities))
        self.monitor: KnnMonitor | None = None
        if picked:
            _, bank, val, classes = picked
            self.monitor = KnnMonitor(cfg, bank, val, classes, info)
        self.semantic_classes = list(manifest["semantic_classes"])
        self.bf16 = info.bf16  # decided once, by the engine (train.precision)
        self.teacher = None
        if cfg.model.align.enabled:  # before the seed: building it draws random numbers

            self.teacher = Teacher(cfg.model.align, self.device, self.bf16, cfg.data.mean, cfg.data.std)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        self.model = CFMAE.from_config(cfg, len(self.semantic_classes),
                                       align_dim=self.teacher.dim if self.teacher is not None else None
                                       ).to(self.device)
        self.masks = MaskGenerator(cfg.masking, cfg.data.modalities, self.model.grid, len(self.semantic_classes),
                                   cfg.model.num_instance_ids)
        self.modalities = list(cfg.data.modalities)
        self.names = ["loss"] + [f"loss_{m}" for m in self.modalities] + (["loss_align"] if self.teacher else [])

    def take_skipped(self) -> list[Skipped]:
        """Samples whose JPEG failed to decode on the device (``data.decode: gpu``) since the last call: what
        an engine adds to its ledger of bad files after a forward (the loader's are in ``batch['skipped']``)."""
        return take_skipped(self.augment) if self.augment is not None else []

    def build_optimizer(self, lr: float, device: torch.device) -> torch.optim.AdamW:
        return build_optimizer(self.model, self.cfg.optim, lr, device)

    def curriculum_weights(self, progress: float) -> tuple[float, float]:
        return schedule(progress, self.cfg.masking.order, self.cfg.masking.breakpoints)

    def step_values(self, ctx: StepContext) -> dict[str, float]:
        alpha_i, alpha_s = self.curriculum_weights(ctx.progress)
        return {"alpha_i": alpha_i, "alpha_s": alpha_s}

    def inputs_and_masks(self, batch: dict[str, Tensor], alphas: tuple[float, float], seed: int
                         ) -> tuple[dict[str, Tensor], Masks]:
        """The model's inputs (images as float, on the device) and the masks (Eq. 11) of a batch at the
        curriculum's (α_I, α_S); the masking strategies read their guide maps as the table of modalities says.
        A raw batch (``data.decode: gpu``) is decoded and cropped here first, on the device."""
        if self.augment is not None and "data" in batch:
            batch = self.augment(batch, self.device)
        inputs = inputs_on_device(batch, self.modalities, self.cfg.data.mean, self.cfg.data.std,
                                  self.cfg.model.image_targets)
        n = inputs[self.modalities[0]].shape[0]
        with torch.no_grad():
            masks = self.masks(*alphas, n, self.device, seed=seed, **table.guide_maps(inputs, self.modalities))
        return inputs, masks

    def forward(self, net: nn.Module, batch: dict[str, Tensor], ctx: StepContext) -> tuple[Tensor, Tensor]:
        inputs, masks = self.inputs_and_masks(batch, self.curriculum_weights(ctx.progress), ctx.seed)
        if self.teacher is not None:
            inputs["teacher"] = self.teacher(inputs[table.embedding_modality()], self.model.grid)
        out = net(inputs, masks.mask, masks.ids_keep)
        values = [out["loss"]] + [out["losses"][m] for m in self.modalities] + \
            ([out["align"]] if self.teacher is not None else [])
        return out["loss"], torch.stack([v.detach() for v in values])

    def describe(self, plan: Plan) -> list[str]:
        monitor = [self.monitor.describe()] if self.monitor is not None else []
        align = [self.teacher.describe()] if self.teacher is not None else []
        return [f"data {self.root}: {len(self.semantic_classes)} semantic classes"] + describe_tokens(self.cfg) + \
            align + monitor

    def monitor_values(self, done: int) -> dict[str, float] | None:
        """The k-NN monitor after ``done`` epochs, when one is due (epoch 0, every ``every``, the last)."""
        m, epochs = self.cfg.train.monitor, self.cfg.train.epochs
        if self.monitor is None or not (done == 0 or done % m.every == 0 or done == epochs):
            return None
        return self.monitor(self.model.encoder)

    def monitor_line(self, record: dict[str, Any]) -> str:
        return (f"k-NN top-1 {record['knn_top1_avg']:.1f} % (token {record['knn_top1_token']:.1f} %, "
                f"{record['monitor_seconds']:.1f} s) ")

    def summary_line(self, summary: dict[str, Any]) -> str:
        return f"α_I {summary['alpha_i']:.2f} α_S {summary['alpha_s']:.2f} "

    def state_dict(self) -> dict[str, Any]:
        return {"task": "pretrain", "semantic_classes": self.semantic_classes}

    def after_epoch(self, done: int, summary: dict[str, Any], run_dir: Path) -> list[tuple[str, Path]]:
        if done % self.cfg.train.plot_every == 0 or done == self.cfg.train.epochs:
            path = self.plot_reconstructions(done, summary["alpha_i"], summary["alpha_s"], run_dir)
            return [("plots/reconstruction", path)] if path is not None else []
        return []

    def load_weights(self, path: str | Path) -> None:
        """``--init``: weights only, from our checkpoints, MAE / MultiMAE / timm ViT files or folders written by
        ``cfmae export`` (converted), local or on the hub (``hf-hub:owner/name``); tensors load by name and must
        have this model's shapes (a position table of another grid is resized bicubically); names that are not in
        the model are ignored and logged (an unknown layout is refused). What the file lacks — the decoder and the
        map adapters of an encoder-only file (an export, MAE's encoder) — keeps its fresh random initialisation,
        and the log names those parts. Optimizer, step and schedule start fresh."""

        w = read_weights(path)
        done = load_weights(self.model, w.state, w.source, fix="weights of another architecture: --init needs a "
                            "checkpoint of this model's size (set the preset's model section to the file's)")
        if not any(k.startswith("encoder.") for k in done.loaded):
            raise CfmaeError(f"{w.source}: holds no encoder tensors of this model; --init needs ViT encoder weights")
        log.info("initialised from %s (%d tensors; %d missing, %d unused)", w.source, len(done.loaded),
                 len(done.missing), len(done.unused))
        fresh = sorted({".".join(k.split(".")[:2]) if k.startswith("adapters.") else k.split(".")[0]
                        for k in done.missing})
        if fresh:
            log.info("%s has no weights for %s: %s from random weights", w.source, ", ".join(fresh),
                     "they start" if len(fresh) > 1 else "it starts")

    def plot_reconstructions(self, epoch: int, alpha_i: float, alpha_s: float, run_dir: Path) -> Path | None:
        """The fixed first images of the dataset (centred square, no augmentation), masked with a fixed seed; rows
        named after their files where the dataset knows them."""
        fixed = self.plot_dataset.with_transform(train=False)
        kept = [(i, x) for i, x in ((i, fixed[i]) for i in range(min(len(fixed), 4 * self.cfg.train.plot_samples)))
                if not isinstance(x, Skipped)][: self.cfg.train.plot_samples]
        if not kept:
            return None
        items = [x for _, x in kept]
        files = getattr(fixed, "samples", None)
        samples = [Path(files[i].rgb).stem[-20:] for i, _ in kept] if files else None
        batch = {m: v.to(self.device) for m, v in collate(items).items() if m in self.modalities}
        batch, masks = self.inputs_and_masks(batch, (alpha_i, alpha_s), mix_seed(self.cfg.train.seed, 2 ** 20))
        mask = masks.mask
        self.model.eval()
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            pred = self.model(batch, mask, masks.ids_keep)["pred"]
        self.model.train()
        panels = reconstruction_panels(batch, mask, pred, self.modalities, self.model.classes, self.model.patches,
                                       self.model.targets, self.cfg.data.mean, self.cfg.data.std,
                                       self.semantic_classes)
        legend = class_legend(batch, mask, pred, self.modalities, self.semantic_classes)
        return save_grid(panels, run_dir / "plots" / f"recon-epoch-{epoch:04d}.png",
                         f"epoch {epoch}   α_I {alpha_i:.2f}   α_S {alpha_s:.2f}", legend,
                         command="pretrain", samples=samples)
