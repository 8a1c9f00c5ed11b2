"""Image classification as a task of the engine: the paper's Table 8 recipe, a linear probe, or multi-granular
input (the † setting).

Mixup / cutmix from timm's ``Mixup`` (its parameters), ``cutmix_bbox_and_lam`` and ``mixup_target``; the
loss is timm's ``SoftTargetCrossEntropy``. Every epoch ends with an evaluation on val/; ``best.pt`` follows
the best top-1.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.data.mixup import Mixup, cutmix_bbox_and_lam, mixup_target
from timm.loss import SoftTargetCrossEntropy
from torch import Tensor, nn

from cfmae_cli import modalities as table
from cfmae_cli.data.dataset import MultiGranularDataset
from cfmae_cli.data.transforms import inputs_on_device
from cfmae_cli.errors import DataError
from cfmae_cli.eval.classifier import ViTClassifier, load_encoder_weights
from cfmae_cli.eval.config import AugConfig, FinetuneConfig
from cfmae_cli.eval.data import ImageListDataset, build_datasets
from cfmae_cli.eval.evaluate import evaluate, shard_loader
from cfmae_cli.eval.task import FinetuneTask
from cfmae_cli.seeding import seeded
from cfmae_cli.train import distributed
from cfmae_cli.train.task import Plan, StepContext


class Mixer:
    """Mixup / CutMix of a batch with soft targets (label smoothing included), drawn from ``seed``.

    With maps as input (multi-granular fine-tuning) a CutMix box is pasted into the maps too (at their
    stride), and under mixup each map comes whole from the image with the larger weight.
    """

    def __init__(self, aug: AugConfig, num_classes: int, map_stride: int):
        self.num_classes, self.smoothing, self.stride = num_classes, aug.label_smoothing, map_stride
        self.mixup = Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mix_prob,
                           switch_prob=aug.switch_prob, mode="batch", label_smoothing=aug.label_smoothing,
                           num_classes=num_classes) if aug.mixup > 0 or aug.cutmix > 0 else None

    def __call__(self, inputs: dict[str, Tensor], labels: Tensor, seed: int) -> tuple[dict[str, Tensor], Tensor]:
        lam, box = 1.0, None
        if self.mixup is not None:
            with seeded(seed):
                lam, use_cutmix = self.mixup._params_per_batch()
                if use_cutmix and lam != 1.0:
                    box, lam = cutmix_bbox_and_lam(inputs["rgb"].shape, lam, ratio_minmax=self.mixup.cutmix_minmax,
                                                   correct_lam=self.mixup.correct_lam)
        if lam != 1.0 or box is not None:
            inputs = {name: self.mix(name, x, lam, box) for name, x in inputs.items()}
        return inputs, mixup_target(labels, self.num_classes, lam, self.smoothing)

    def mix(self, name: str, x: Tensor, lam: float, box: tuple[int, int, int, int] | None) -> Tensor:
        other, spec = x.flip(0), table.get(name)
        if box is not None:
            s = self.stride if spec.at_map_stride else 1
            yl, yh, xl, xh = (v // s for v in box)
            x = x.clone()
            x[..., yl:yh, xl:xh] = other[..., yl:yh, xl:xh]
            return x
        if spec.kind == "image":
            return x * lam + other * (1.0 - lam)
        return x if lam >= 0.5 else other  # a blend of two id maps means nothing


class ClassificationTask(FinetuneTask):
    """Fine-tuning or linear probing of an image classifier; val top-1 / top-5 every epoch."""

    best_metric, best_also = "top1", ("top5",)
    dataset: ImageListDataset | MultiGranularDataset
    val_dataset: ImageListDataset | MultiGranularDataset

    def __init__(self, cfg: FinetuneConfig, info: distributed.DistInfo, state: dict[str, Tensor] | None,
                 source: str):
        arch = self.setup(cfg, info, source)
        data = build_datasets(cfg, arch, self.root)
        self.dataset, self.val_dataset, self.classes = data["train"], data["val"], data["classes"]
        c_sem = data["num_semantic_classes"]
        for name in (m for m in cfg.data.modalities if table.get(m).classes == "manifest"):
            key = f"adapters.{name}.embed.weight"
            had = state[key].shape[0] - 1 if state is not None and key in state else c_sem
            if had != c_sem:
                raise DataError(f"{self.root}: its manifest has {c_sem} semantic classes, the checkpoint was "
                                f"pre-trained with {had} ({name} maps); fine-tune on data labelled with the same "
                                f"classes.")
        self.modalities = list(cfg.data.modalities)
        torch.manual_seed(cfg.train.seed)  # the same initial head on every rank
        self.model = ViTClassifier(arch, cfg.data.img_size, len(self.classes), self.modalities, c_sem,
                                   cfg.model.global_pool, cfg.model.drop_path, cfg.mode == "linear",
                                   cfg.model.head_init_std, cfg.model.train_pos_embed,
                                   grad_checkpointing=cfg.model.grad_checkpointing)
        if state is not None:
            load_encoder_weights(self.model, state, source)
        self.model.to(self.device)
        self.mixer = Mixer(cfg.aug, len(self.classes), arch.map_stride)
        self.criterion = SoftTargetCrossEntropy()
        self.names = ["loss"]
        self.bf16 = info.bf16  # decided once, by the engine (train.precision)
        self.val_loader = shard_loader(self.val_dataset, cfg.train.batch_size, cfg.data.num_workers, info)

    def inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return inputs_on_device(batch, self.modalities, self.cfg.data.mean, self.cfg.data.std)

    def forward(self, net: nn.Module, batch: dict[str, Tensor], ctx: StepContext) -> tuple[Tensor, Tensor]:
        inputs, target = self.mixer(self.inputs(batch), batch["label"], ctx.seed)
        loss = self.criterion(net(inputs).float(), target)
        return loss, loss.detach().reshape(1)

    def end_epoch(self, done: int, summary: dict[str, Any]) -> dict[str, Any]:
        metrics, skipped = evaluate(self.model, self.val_loader, self.info, self.bf16, self.inputs)
        bad = sum(distributed.gather(len(skipped), self.info))
        if metrics["val_images"] == 0:
            raise DataError(f"{self.root}: no image of the val split could be read.")
        return {**metrics, "val_skipped": bad, **self.track_best(metrics, done)}

    def summary_line(self, summary: dict[str, Any]) -> str:
        return (f"val top-1 {summary['top1']:.2f} top-5 {summary['top5']:.2f} (best {summary['best_top1']:.2f} "
                f"at epoch {summary['best_epoch']}) ")

    def describe(self, plan: Plan) -> list[str]:
        cfg, arch = self.cfg, self.arch
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return [f"data {self.root}: {len(self.classes)} classes; {len(self.dataset)} train / "
                f"{len(self.val_dataset)} val images; input {' + '.join(self.modalities)}",
                f"model: ViT patch {arch.patch_size}, dim {arch.embed_dim}, depth {arch.depth}, {arch.num_heads} "
                f"heads; {cfg.model.global_pool} pooling; {cfg.mode} ({trainable:,} trainable parameters); "
                f"initial weights: {self.source}",
                f"{self.recipe()}, mixup {cfg.aug.mixup}, cutmix {cfg.aug.cutmix}, label smoothing "
                f"{cfg.aug.label_smoothing}, "
                + (f"RandAugment {cfg.aug.auto_augment}, random erasing {cfg.aug.reprob}"
                   if not table.maps_of(self.modalities)
                   else "joint crop + flip of image and maps (no RandAugment, no erasing)")]
