"""Semantic segmentation transfer (the paper's Table 3): the ViT encoder with a simple feature pyramid and an
UperNet head, trained per pixel, evaluated by mIoU every epoch — as a task of the training engine — by
mmsegmentation's ADE20K protocol.

The model (the pyramid, UperNet, the auxiliary FCN head): :mod:`cfmae_cli.eval.seg_model`. Loss: cross-entropy,
ignore index 255.

Training data: :mod:`cfmae_cli.eval.seg_data` (resize 0.5-2 x scale, crop with cat_max_ratio, flip, photometric
distortion, padding). Evaluation (:func:`predict`): each image resized so that it fits ``seg.scale`` with its
aspect kept (short side img_size), then slide (img_size windows at ``seg.stride``, logits averaged where they
overlap) or whole inference, optionally at several scales with flips; the logits are resized to the
annotation's own size before the argmax, and the confusion matrix is summed over all processes.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Sequence, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from cfmae_cli.data.dataset import MultiGranularDataset
from cfmae_cli.data.layout import read_manifest, Sample
from cfmae_cli.data.splits import find_splits
from cfmae_cli.data.transforms import normalise_on_device
from cfmae_cli.errors import DataError
from cfmae_cli.eval.classifier import load_encoder_weights
from cfmae_cli.eval.config import FinetuneConfig
from cfmae_cli.eval.seg_data import Photometric, SegEvalTransform, SegTrainTransform, rescale_size
from cfmae_cli.eval.seg_model import ViTSegmenter
from cfmae_cli.eval.evaluate import shard_loader
from cfmae_cli.eval.task import FinetuneTask
from cfmae_cli.formats import UNLABELLED
from cfmae_cli.train import distributed
from cfmae_cli.train.task import Plan, StepContext

ADE20K_CLASSES = 150
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inference:
    """How a validation image is predicted (``seg.*``): the resize target, the windows, the scales and flips."""

    scale: tuple[int, int]
    crop: int
    stride: int
    mode: str = "slide"
    ratios: tuple[float, ...] = (1.0,)
    flip: bool = False
    max_batch: int = 8

    @classmethod
    def of(cls, cfg: FinetuneConfig) -> "Inference":
        s, size = cfg.seg, cfg.data.img_size
        return cls(scale=seg_scale(cfg), crop=size, stride=s.stride or max(1, size * 2 // 3), mode=s.inference,
                   ratios=tuple(s.aug_ratios) if s.aug_test else (1.0,), flip=s.aug_test,
                   max_batch=max(1, cfg.train.batch_size))


def seg_scale(cfg: FinetuneConfig) -> tuple[int, int]:
    """``seg.scale``, or (4 x img_size, img_size): mmseg's (2048, 512) for 512 crops."""
    return cfg.seg.scale if cfg.seg.scale is not None else (4 * cfg.data.img_size, cfg.data.img_size)


def slide_logits(model: nn.Module, image: Tensor, crop: int, stride: int, max_batch: int = 8) -> Tensor:
    """mmseg's slide inference: (1, 3, H, W) → (1, C, H, W) logits, the mean over the ``crop`` windows at
    ``stride`` that cover each pixel (the last window of a row or column flush with the edge). A side shorter
    than ``crop`` is padded with 0 (the mean colour after normalisation) and the padding's logits dropped."""
    h, w = image.shape[-2:]
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    total: Tensor | None = None
    count = image.new_zeros(1, 1, h, w)
    for start in range(0, len(boxes), max_batch):
        chunk = boxes[start:start + max_batch]
        windows = torch.cat([F.pad(image[..., y1:y2, x1:x2], (0, crop - (x2 - x1), 0, crop - (y2 - y1)))
                             for y1, y2, x1, x2 in chunk])
        out = model({"rgb": windows}).float()
        if total is None:
            total = out.new_zeros(1, out.shape[1], h, w)
        for (y1, y2, x1, x2), logits in zip(chunk, out):
            total[0, :, y1:y2, x1:x2] += logits[:, :y2 - y1, :x2 - x1]
            count[..., y1:y2, x1:x2] += 1
    assert total is not None  # one window at least
    return total / count


def whole_logits(model: nn.Module, image: Tensor, patch: int) -> Tensor:
    """The whole (1, 3, H, W) image at once → (1, C, H, W); a side that is not a multiple of the patch is padded
    (0) to one and the padding's logits dropped."""
    h, w = image.shape[-2:]
    ph, pw = -h % patch, -w % patch
    out = model({"rgb": F.pad(image, (0, pw, 0, ph))}).float()
    return out[..., :h, :w]


def predict(model: nn.Module, image: Tensor, out_size: tuple[int, int], how: Inference, patch: int) -> Tensor:
    """Scores (1, C, *out_size) of a normalised (1, 3, H, W) image, mmseg's test pipeline: per ratio (and flip),
    the image resized to fit ratio x ``how.scale`` with its aspect kept (bilinear), slide or whole logits,
    flipped back, resized (bilinear) to ``out_size``, the annotation's size. One scale without flip: those
    logits; several or flips: the mean of their softmax probabilities (mmseg's aug_test)."""
    h, w = image.shape[-2:]
    several = len(how.ratios) > 1 or how.flip
    acc: Tensor | None = None
    n = 0
    for ratio in how.ratios:
        size = rescale_size(h, w, (int(how.scale[0] * ratio), int(how.scale[1] * ratio)))
        resized = F.interpolate(image, size=size, mode="bilinear", align_corners=False) \
            if size != (h, w) else image
        for flip in ((False, True) if how.flip else (False,)):
            x = resized.flip(-1) if flip else resized
            logits = slide_logits(model, x, how.crop, how.stride, how.max_batch) if how.mode == "slide" \
                else whole_logits(model, x, patch)
            logits = logits.flip(-1) if flip else logits
            logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
            scores = logits.softmax(1) if several else logits
            acc = scores if acc is None else acc + scores
            n += 1
    assert acc is not None
    return acc / n


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
        splits: list[Sequence[Sample]] = []
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

    s = cfg.seg
    photometric = Photometric(s.brightness_delta, s.contrast_range, s.saturation_range,
                              s.hue_delta) if s.photometric else None
    # 0 once normalised, as mmseg pads the normalised image
    pad = cast("tuple[int, int, int]", tuple(int(round(255 * m)) for m in d.mean))
    train_t = SegTrainTransform(d.img_size, seg_scale(cfg), s.ratio_range, s.cat_max_ratio, aug.hflip,
                                photometric, pad)
    # MultiGranularDataset takes any joint transform (its annotation names JointTransform alone)
    train_set = MultiGranularDataset(train, train_t, ["semantic"], classes,
                                     cfg.train.seed, reduce)
    val_set = MultiGranularDataset(val, SegEvalTransform(), ["semantic"], classes,
                                   cfg.train.seed, reduce)
    return {"train": train_set, "val": val_set,
            "num_classes": classes}


class SegmentationTask(FinetuneTask):
    """Fine-tuning for semantic segmentation; the optimizer (layer-wise decay) and checkpoints are every
    fine-tuning task's, best.pt follows the mIoU."""

    best_metric = "mIoU"
    dataset: MultiGranularDataset
    val_dataset: MultiGranularDataset

    def __init__(self, cfg: FinetuneConfig, info: distributed.DistInfo, state: dict[str, Tensor] | None,
                 source: str):
        arch = self.setup(cfg, info, source)
        data = segmentation_datasets(cfg, self.root)
        self.dataset, self.val_dataset, self.num_classes = data["train"], data["val"], data["num_classes"]
        self.classes = [str(i) for i in range(self.num_classes)]
        self.modalities = ["rgb"]
        torch.manual_seed(cfg.train.seed)
        self.aux_weight = cfg.seg.aux_weight
        model = ViTSegmenter(arch, cfg.data.img_size, self.num_classes, cfg.model.out_indices,
                             cfg.model.head_channels, cfg.model.drop_path, cfg.model.train_pos_embed,
                             aux_channels=cfg.seg.aux_channels if self.aux_weight > 0 else 0,
                             grad_checkpointing=cfg.model.grad_checkpointing)
        if state is not None:
            load_encoder_weights(model, state, source)
        if info.distributed and info.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(self.device)
        self.names = ["loss", "loss_seg", "loss_aux"] if self.aux_weight > 0 else ["loss"]
        self.bf16 = info.bf16  # decided once, by the engine (train.precision)
        # images of their own sizes: one a batch (this rank's share; the confusion matrix is summed over ranks)
        self.val_loader = shard_loader(self.val_dataset, 1, cfg.data.num_workers, info)
        self.how = Inference.of(cfg)
        self.noted_single = False

    def inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"rgb": normalise_on_device(batch["rgb"], self.cfg.data.mean, self.cfg.data.std)}

    def forward(self, net: nn.Module, batch: dict[str, Tensor], ctx: StepContext) -> tuple[Tensor, Tensor]:
        inputs, target = self.inputs(batch), batch["semantic"]
        if net.training and target.shape[0] == 1:
            inputs, target = self.doubled(inputs, target)
        out = net(inputs)
        logits, aux = out if isinstance(out, tuple) else (out, None)
        loss = F.cross_entropy(logits.float(), target, ignore_index=UNLABELLED)
        if aux is None:
            return loss, loss.detach().reshape(1)
        aux_loss = F.cross_entropy(aux.float(), target, ignore_index=UNLABELLED)
        total = loss + self.aux_weight * aux_loss
        return total, torch.stack([total, loss, aux_loss]).detach()

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
            target = batch["semantic"]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                scores = predict(self.model, self.inputs(batch)["rgb"], tuple(target.shape[-2:]), self.how,
                                 self.arch.patch_size)
            conf += confusion(scores.argmax(1), target, self.num_classes)
        if self.info.distributed:
            dist.all_reduce(conf)
        self.model.train()
        metrics = segmentation_metrics(conf)
        return {"mIoU": metrics["mIoU"], "pixel_acc": metrics["pixel_acc"], "mAcc": metrics["mAcc"],
                **self.track_best(metrics, done)}

    def summary_line(self, summary: dict[str, Any]) -> str:
        return (f"val mIoU {summary['mIoU']:.2f} pixel acc {summary['pixel_acc']:.2f} (best {summary['best_mIoU']:.2f}"
                f" at epoch {summary['best_epoch']}) ")

    def describe(self, plan: Plan) -> list[str]:
        arch, s, how = self.arch, self.cfg.seg, self.how
        aux = (f"auxiliary FCN head ({s.aux_channels} channels, loss weight {s.aux_weight:g})" if self.aux_weight > 0
               else "no auxiliary head")
        photo = "photometric distortion" if s.photometric else "no photometric distortion"
        crop = self.cfg.data.img_size
        inference = (f"slide windows {crop}x{crop} at stride {how.stride}" if how.mode == "slide" else "whole image")
        if how.flip or len(how.ratios) > 1:
            inference += f", ratios {list(how.ratios)} with flips, probabilities averaged"
        return [f"data {self.root}: {self.num_classes} classes; {len(self.dataset)} train / {len(self.val_dataset)}"
                f" val images; segmentation crops {crop} px",
                f"training: resize to {how.scale} x [{s.ratio_range[0]:g}, {s.ratio_range[1]:g}] (aspect kept), crop "
                f"{crop} (cat_max_ratio {s.cat_max_ratio:g}), flip {self.cfg.aug.hflip:g}, {photo}, pad 255",
                f"evaluation: resized to fit {how.scale} (aspect kept), {inference}; scored at the annotation's size",
                f"model: ViT patch {arch.patch_size}, dim {arch.embed_dim}, depth {arch.depth}; pyramid of blocks "
                f"{self.cfg.model.out_indices}; UperNet {self.cfg.model.head_channels} channels; {aux}; initial "
                f"weights: {self.source}",
                self.recipe()]
