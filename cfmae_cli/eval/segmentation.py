"""Semantic segmentation transfer (the paper's Table 3): the ViT encoder with a simple feature pyramid and an
UperNet head, trained per pixel, evaluated by mIoU every epoch — as a task of the training engine.

Pyramid (MAE / BEiT practice): the patch tokens of four blocks (``model.out_indices``) as (B, D, H/p, W/p)
maps, brought to strides p/4, p/2, p and 2p by two transposed convolutions, one, none and a max-pool.
UperNet: pyramid pooling (scales 1, 2, 3, 6) on the coarsest level, FPN top-down fusion, a 3x3 fusion of all
levels, a 1x1 classifier; logits are upsampled to the input size. Loss: cross-entropy, ignore index 255.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from cfmae_cli.config import EncoderArch
from cfmae_cli.data.dataset import MultiGranularDataset
from cfmae_cli.data.layout import read_manifest, Sample
from cfmae_cli.data.splits import find_splits
from cfmae_cli.data.transforms import JointTransform, normalize_on_device
from cfmae_cli.errors import DataError
from cfmae_cli.eval.classifier import load_encoder_weights
from cfmae_cli.eval.config import FinetuneConfig
from cfmae_cli.eval.evaluate import shard_loader
from cfmae_cli.eval.task import FinetuneTask
from cfmae_cli.formats import UNLABELLED
from cfmae_cli.model.encoder import build_encoder
from cfmae_cli.model.layers import init_weights
from cfmae_cli.train import distributed
from cfmae_cli.train.engine import StepContext

ADE20K_CLASSES = 150
log = logging.getLogger(__name__)


def conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))


class SimplePyramid(nn.Module):
    """Four (B, D, h, w) maps at the patch stride → strides ÷4, ÷2, x1, x2 of it, D channels each."""

    def __init__(self, dim: int):
        super().__init__()
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(),
                                 nn.ConvTranspose2d(dim, dim, 2, 2))
        self.up2 = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.down2 = nn.MaxPool2d(2)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        return [self.up4(feats[0]), self.up2(feats[1]), feats[2], self.down2(feats[3])]


class UperHead(nn.Module):
    """UperNet over four levels of ``dim`` channels (finest first) → (B, classes, h0, w0) at the finest level."""

    def __init__(self, dim: int, channels: int, num_classes: int, pool_scales: tuple[int, ...] = (1, 2, 3, 6)):
        super().__init__()
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(dim, channels, 1))
                                 for s in pool_scales)
        self.bottleneck = conv_bn_relu(dim + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(conv_bn_relu(dim, channels, 1) for _ in range(3))
        self.fpn = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in range(3))
        self.fuse = conv_bn_relu(4 * channels, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    @staticmethod
    def _up(x: Tensor, like: Tensor) -> Tensor:
        return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, feats: list[Tensor]) -> Tensor:
        top = feats[3]
        psp = self.bottleneck(torch.cat([top] + [self._up(pool(top), top) for pool in self.ppm], dim=1))
        levels = [lat(f) for lat, f in zip(self.lateral, feats[:3])] + [psp]
        for i in range(3, 0, -1):  # top-down
            levels[i - 1] = levels[i - 1] + self._up(levels[i], levels[i - 1])
        outs = [conv(x) for conv, x in zip(self.fpn, levels[:3])] + [levels[3]]
        fused = self.fuse(torch.cat([outs[0]] + [self._up(o, outs[0]) for o in outs[1:]], dim=1))
        return self.classifier(self.dropout(fused))


class ViTSegmenter(nn.Module):
    """batch {rgb (B, 3, S, S)} → logits (B, classes, S, S)."""

    def __init__(self, arch: EncoderArch, img_size: int, num_classes: int, out_indices: list[int],
                 channels: int = 512, drop_path: float = 0.0, train_pos_embed: bool = True):
        super().__init__()
        self.encoder = build_encoder(arch, img_size, drop_path, final_norm=False)  # the pyramid reads blocks
        self.out_indices = list(out_indices)
        self.pyramid = SimplePyramid(arch.embed_dim)
        self.head = UperHead(arch.embed_dim, channels, num_classes)
        init_weights(self)
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        self.encoder.pos_embed.requires_grad_(train_pos_embed)

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer-wise decay as for classification: stem 0, block i at i+1, pyramid and head last."""
        return {"stem": r"^encoder\.(?:cls_token|pos_embed|patch_embed)", "blocks": [(r"^encoder\.blocks\.(\d+)", None)]}

    def no_weight_decay(self) -> set[str]:
        return {"encoder.cls_token", "encoder.pos_embed"}

    def features(self, x: Tensor) -> list[Tensor]:
        """The patch tokens after the blocks of ``out_indices``, each (B, D, S/p, S/p)."""
        return self.encoder.block_maps(x, self.out_indices)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        x = batch["rgb"]
        logits = self.head(self.pyramid(self.features(x)))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def confusion(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """(C, C) counts, rows = true class, columns = predicted; pixels labelled 255 are left out."""
    valid = target != UNLABELLED
    index = target[valid] * num_classes + pred[valid]
    return torch.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_metrics(conf: Tensor) -> dict[str, Any]:
    """mIoU (mean over the classes that occur in the labels or the predictions), pixel accuracy and mean class
    accuracy, in %, from a confusion matrix."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
    per_class = torch.where(conf.sum(1) > 0, tp / conf.sum(1).clamp(min=1), torch.full_like(tp, math.nan))
    return {"mIoU": 100 * float(iou.nanmean()), "pixel_acc": 100 * float(tp.sum() / conf.sum().clamp(min=1)),
            "mAcc": 100 * float(per_class.nanmean()), "iou": [100 * float(v) for v in iou]}


def segmentation_datasets(cfg: FinetuneConfig, root: Path) -> dict[str, Any]:
    """train / val datasets of semantic maps: ADE20K's layout (images/ and annotations/ with training/ and
    validation/; 0 = 'other' is ignored and k becomes k-1), or the dataset layout's semantic maps."""
    d, aug = cfg.data, cfg.aug
    if (root / "images" / "training").is_dir() and (root / "annotations" / "training").is_dir():
        splits = []
        for split in ("training", "validation"):
            images = sorted((root / "images" / split).glob("*.jpg"))
            pairs = [(p, root / "annotations" / split / f"{p.stem}.png") for p in images]
            missing = [str(a) for _, a in pairs if not a.is_file()]
            if missing or not pairs:
                raise DataError(f"{root}: ADE20K layout, but {len(missing) or 'no'} annotation(s) missing in "
                                f"annotations/{split} (e.g. {missing[0] if missing else 'no images in images/' + split}).")
            splits.append([Sample(p, {"semantic": a}, 0) for p, a in pairs])
        train, val, classes, reduce = splits[0], splits[1], d.num_classes or ADE20K_CLASSES, True
    else:
        train, val, _, meta = find_splits(root, d.val_fraction, ["semantic"])
        classes, reduce = d.num_classes or int(read_manifest(meta)["num_semantic_classes"]), False

    def joint(training: bool) -> JointTransform:
        return JointTransform(d.img_size, 1, 2, aug.scale, aug.ratio, aug.hflip, d.mean, d.std, train=training,
                              normalize=False, whole=not training)

    return {"train": MultiGranularDataset(train, joint(True), ["semantic"], classes, cfg.train.seed, reduce),
            "val": MultiGranularDataset(val, joint(False), ["semantic"], classes, cfg.train.seed, reduce),
            "num_classes": classes}


class SegmentationTask(FinetuneTask):
    """Fine-tuning for semantic segmentation; the optimizer (layer-wise decay), checkpoints and best.pt
    bookkeeping are the classification task's."""

    def __init__(self, cfg: FinetuneConfig, info: distributed.DistInfo, state: dict[str, Tensor] | None,
                 source: str):
        arch = self.setup(cfg, info, source)
        data = segmentation_datasets(cfg, self.root)
        self.dataset, self.val_dataset, self.num_classes = data["train"], data["val"], data["num_classes"]
        self.classes = [str(i) for i in range(self.num_classes)]
        self.modalities = ["rgb"]
        torch.manual_seed(cfg.train.seed)
        model = ViTSegmenter(arch, cfg.data.img_size, self.num_classes, cfg.model.out_indices,
                             cfg.model.head_channels, cfg.model.drop_path, cfg.model.train_pos_embed)
        if state is not None:
            load_encoder_weights(model, state, source)
        if info.distributed and info.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(self.device)
        self.names = ["loss"]
        self.bf16 = info.bf16  # decided once, by the engine (train.precision)
        self.val_loader = shard_loader(self.val_dataset, cfg.train.batch_size, cfg.data.num_workers, info)
        self.best: dict[str, Any] = {"mIoU": -math.inf, "epoch": 0}
        self.improved = False
        self.noted_single = False

    def inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"rgb": normalize_on_device(batch["rgb"], self.cfg.data.mean, self.cfg.data.std)}

    def forward(self, net: nn.Module, batch: dict[str, Tensor], ctx: StepContext) -> tuple[Tensor, Tensor]:
        inputs, target = self.inputs(batch), batch["semantic"]
        if net.training and target.shape[0] == 1:
            inputs, target = self.doubled(inputs, target)
        logits = net(inputs)
        loss = F.cross_entropy(logits.float(), target, ignore_index=UNLABELLED)
        return loss, loss.detach().reshape(1)

    def doubled(self, inputs: dict[str, Tensor], target: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """A training batch of one image (the others of its batch were unreadable and skipped, or
        ``train.batch_size`` is 1) as the same image twice: BatchNorm in training needs more than one value per
        channel (the head's pooled 1x1 maps have one per image), and two copies give the one image's loss,
        gradient and batch statistics. Deterministic, so a resumed run stays identical."""
        if not self.noted_single:
            self.noted_single = True
            log.info("a training batch holds a single image (the rest of its batch was unreadable, or "
                     "train.batch_size is 1): it is passed twice, as BatchNorm needs two values per channel; the "
                     "loss and gradient are the single image's (said once)")
        return {k: torch.cat([v, v]) for k, v in inputs.items()}, torch.cat([target, target])

    @torch.no_grad()
    def end_epoch(self, done: int, summary: dict[str, Any]) -> dict[str, Any]:
        self.model.eval()
        conf = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long, device=self.device)
        for batch in self.val_loader:
            if batch["size"] == 0:
                continue
            batch = {k: v.to(self.device) for k, v in batch.items() if torch.is_tensor(v)}
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                pred = self.model(self.inputs(batch)).argmax(1)
            conf += confusion(pred, batch["semantic"], self.num_classes)
        if self.info.distributed:
            dist.all_reduce(conf)
        self.model.train()
        metrics = segmentation_metrics(conf)
        self.improved = metrics["mIoU"] > self.best["mIoU"]
        if self.improved:
            self.best = {"mIoU": metrics["mIoU"], "epoch": done}
        return {"mIoU": metrics["mIoU"], "pixel_acc": metrics["pixel_acc"], "mAcc": metrics["mAcc"],
                "best_mIoU": self.best["mIoU"], "best_epoch": self.best["epoch"]}

    def summary_line(self, summary: dict[str, Any]) -> str:
        return (f"val mIoU {summary['mIoU']:.2f} pixel acc {summary['pixel_acc']:.2f} (best {summary['best_mIoU']:.2f}"
                f" at epoch {summary['best_epoch']}) ")

    def describe(self, plan: dict[str, Any]) -> list[str]:
        arch = self.cfg.model.encoder
        return [f"data {self.root}: {self.num_classes} classes; {len(self.dataset)} train / {len(self.val_dataset)}"
                f" val images; segmentation at {self.cfg.data.img_size} px",
                f"model: ViT patch {arch.patch_size}, dim {arch.embed_dim}, depth {arch.depth}; pyramid of blocks "
                f"{self.cfg.model.out_indices}; UperNet {self.cfg.model.head_channels} channels; initial weights: "
                f"{self.source}",
                self.recipe()]
