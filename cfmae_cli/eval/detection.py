"""Detection and instance segmentation transfer (the paper's Table 2): torchvision's Mask R-CNN on the ViT
encoder with ViTDet's simple feature pyramid, box and mask AP (pycocotools) every epoch — a task of the engine.

Backbone: the encoder's last block (before the final norm, as in ViTDet) as a (B, D, S/p, S/p) map → strides
p/4, p/2, p, 2p (transposed convolutions, identity, max-pool), each to 256 channels by a 1x1 and a 3x3
convolution with LayerNorm, and a 4p level for the RPN. The encoder's position table has the grid of
``data.img_size`` (the pre-trained one resized to it), so every batch is padded to img_size x img_size
(ViTDet pads to 1024); images are resized by Mask R-CNN's own transform first (``data.min_size`` short side,
at most ``data.max_size``). ``model.window_size`` > 0: ViTDet's windowed attention (windows of that many
patches in every block but 2, 5, 8, 11 of 12; :class:`~cfmae_cli.model.encoder.WindowedAttention`), without
ViTDet's relative position bias; 0: global attention in every block.

Metrics (:func:`~cfmae_cli.eval.coco.coco_ap`): AP, AP50, AP75, APs, APm, APl of boxes (``_box``) and masks
(``_mask``) every epoch.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from timm.layers import LayerNorm2d
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from cfmae_cli.config import EncoderArch
from cfmae_cli.data.layout import read_manifest
from cfmae_cli.data.maps import resample_map
from cfmae_cli.data.splits import find_splits
from cfmae_cli.errors import ConfigError, DataError
from cfmae_cli.eval.classifier import load_encoder_weights
from cfmae_cli.eval.coco import CocoDetection, coco_ap, coco_from_layout, coco_results, collate_detection, read_coco
from cfmae_cli.eval.config import FinetuneConfig
from cfmae_cli.eval.evaluate import shard_loader
from cfmae_cli.eval.task import FinetuneTask
from cfmae_cli.model.encoder import build_encoder, global_blocks
from cfmae_cli.train import distributed
from cfmae_cli.train.task import Plan, StepContext

LOSSES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


class ViTDetBackbone(nn.Module):
    """(B, 3, S, S) → OrderedDict of 256-channel maps '0'..'3' at strides p/4 … 2p and 'pool' at 4p."""

    def __init__(self, arch: EncoderArch, img_size: int, drop_path: float = 0.0, channels: int = 256,
                 train_pos_embed: bool = True, window_size: int = 0, grad_checkpointing: bool = False):
        super().__init__()
        d = arch.embed_dim
        self.img_size = img_size
        self.encoder = build_encoder(arch, img_size, drop_path, final_norm=False,  # ViTDet: the last block as is
                                     window_size=window_size, grad_checkpointing=grad_checkpointing)
        self.encoder.pos_embed.requires_grad_(train_pos_embed)
        self.scales = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(d, d // 2, 2, 2), LayerNorm2d(d // 2), nn.GELU(),
                          nn.ConvTranspose2d(d // 2, d // 4, 2, 2)),
            nn.ConvTranspose2d(d, d // 2, 2, 2), nn.Identity(), nn.MaxPool2d(2)])
        self.outputs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, channels, 1, bias=False), LayerNorm2d(channels),
                          nn.Conv2d(channels, channels, 3, padding=1, bias=False), LayerNorm2d(channels))
            for c in (d // 4, d // 2, d, d))
        self.out_channels = channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        top = self.encoder.block_features(x, [len(self.encoder.blocks) - 1])[0]
        feats = OrderedDict((str(i), out(scale(top))) for i, (scale, out) in enumerate(zip(self.scales, self.outputs)))
        feats["pool"] = nn.functional.max_pool2d(feats["3"], 1, 2)
        return feats


class FixedSizeTransform(GeneralizedRCNNTransform):
    """Mask R-CNN's resize and normalisation, with every batch padded to ``size`` x ``size`` (the encoder's
    fixed grid) instead of to the largest image, and the instance masks resized with centre-aligned nearest
    neighbour (torchvision's ``F.interpolate(mode='nearest')`` would shift them against the image)."""

    def __init__(self, size: int, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.size = size

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None
               ) -> tuple[Tensor, dict[str, Tensor] | None]:
        masks = None if target is None else target.pop("masks", None)
        image, target = super().resize(image, target)
        if masks is not None and target is not None:
            target["masks"] = resample_map(masks, (image.shape[-2], image.shape[-1]))
        return image, target

    def batch_images(self, images: list[Tensor], size_divisible: int = 32) -> Tensor:
        batch = images[0].new_zeros(len(images), 3, self.size, self.size)
        for img, pad in zip(images, batch):
            if img.shape[-2] > self.size or img.shape[-1] > self.size:
                raise ValueError(f"an image of {tuple(img.shape[-2:])} after resizing exceeds data.img_size "
                                 f"{self.size}; lower data.max_size")
            pad[:, : img.shape[-2], : img.shape[-1]].copy_(img)
        return batch


class ViTMaskRCNN(MaskRCNN):
    """torchvision's Mask R-CNN with :class:`ViTDetBackbone`; layer-wise decay over the encoder's blocks."""

    def __init__(self, arch: EncoderArch, cfg: FinetuneConfig, num_classes: int):
        d = cfg.data
        c = cfg.model.fpn_channels
        backbone = ViTDetBackbone(arch, d.img_size, cfg.model.drop_path, c, cfg.model.train_pos_embed,
                                  cfg.model.window_size, cfg.model.grad_checkpointing)
        anchors = AnchorGenerator(tuple((s,) for s in cfg.model.anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
        train_n, test_n = cfg.model.rpn_proposals
        super().__init__(backbone, None, rpn_anchor_generator=anchors,
                         box_predictor=FastRCNNPredictor(1024, num_classes + 1),  # after the default 1024-d box head
                         mask_head=MaskRCNNHeads(c, [c] * 4, 1), mask_predictor=MaskRCNNPredictor(c, c, num_classes + 1),
                         box_batch_size_per_image=cfg.model.rois_per_image,
                         box_detections_per_img=cfg.model.detections_per_image,
                         rpn_batch_size_per_image=max(cfg.model.rois_per_image // 2, 32),
                         rpn_pre_nms_top_n_train=train_n, rpn_post_nms_top_n_train=train_n,
                         rpn_pre_nms_top_n_test=test_n, rpn_post_nms_top_n_test=test_n)
        self.transform = FixedSizeTransform(d.img_size, tuple(d.min_size), d.max_size, list(d.mean), list(d.std))

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^backbone\.encoder\.(?:cls_token|pos_embed|patch_embed)",
                "blocks": [(r"^backbone\.encoder\.blocks\.(\d+)", None)]}

    def no_weight_decay(self) -> set[str]:
        return {"backbone.encoder.cls_token", "backbone.encoder.pos_embed"}


def attention_line(window_size: int, depth: int, grid: int) -> str:
    """What the encoder's attention is, for the log."""
    windowed = [i for i in range(depth) if i not in global_blocks(depth)] if window_size else []
    if not windowed:
        return f"attention: global in all {depth} blocks ({grid} x {grid} patches)"
    side = -(-grid // window_size)
    return (f"attention: windows of {window_size} x {window_size} patches ({side} x {side} windows over the "
            f"{grid} x {grid} grid{', zero-padded' if grid % window_size else ''}) in blocks {windowed}, global in "
            f"{global_blocks(depth)}")


def detection_data(cfg: FinetuneConfig, root: Path) -> dict[str, Any]:
    """COCO's layout (annotations/instances_{train,val}2017.json, {train,val}2017/) or the dataset layout
    (instance maps → objects, their semantic class → category)."""
    ann = root / "annotations"
    if (ann / "instances_train2017.json").is_file():
        train = read_coco(ann / "instances_train2017.json", root / "train2017")
        val = read_coco(ann / "instances_val2017.json", root / "val2017")
    else:
        train_s, val_s, _, meta = find_splits(root, cfg.data.val_fraction, ["instance", "semantic"])
        classes = list(read_manifest(meta)["semantic_classes"])
        train = coco_from_layout(train_s, classes, cfg.data.min_instance_area)
        val = coco_from_layout(val_s, classes, cfg.data.min_instance_area)
    if not train["categories"]:
        raise DataError(f"{root}: no categories in the annotations.")
    missing = [im["file_name"] for im in train["images"] + val["images"] if not Path(im["file_name"]).is_file()]
    if missing:
        raise DataError(f"{root}: {len(missing)} annotated image(s) not found (e.g. {missing[0]}).")
    train_set = CocoDetection(train, True, cfg.aug.hflip, cfg.train.seed)
    if len(train_set) == 0:
        raise DataError(f"{root}: none of the {train_set.without_annotations} training images has a usable "
                        f"annotation (not a crowd region, a box of at least a pixel, a known category; on the "
                        f"dataset layout, objects of at least data.min_instance_area = {cfg.data.min_instance_area} "
                        f"of the image).")
    return {"train": train_set, "val": CocoDetection(val, False), "val_coco": val,
            "categories": [c["id"] for c in train["categories"]]}


class DetectionTask(FinetuneTask):
    """Mask R-CNN fine-tuning; optimizer (layer-wise decay) and checkpoints are every fine-tuning task's, best.pt
    follows the box AP; the summed loss and each of Mask R-CNN's five terms are logged."""

    best_metric = "AP_box"
    collate = staticmethod(collate_detection)
    dataset: CocoDetection
    val_dataset: CocoDetection

    def __init__(self, cfg: FinetuneConfig, info: distributed.DistInfo, state: dict[str, Tensor] | None,
                 source: str):
        arch = self.setup(cfg, info, source)
        grid = cfg.data.img_size // arch.patch_size
        if cfg.model.window_size >= grid:
            raise ConfigError(f"model.window_size: {cfg.model.window_size} is not smaller than the {grid} x {grid} "
                              f"patch grid of data.img_size {cfg.data.img_size} (patch {arch.patch_size}); set 0 for "
                              f"global attention")
        data = detection_data(cfg, self.root)
        self.dataset, self.val_dataset = data["train"], data["val"]
        self.val_coco, self.category_ids = data["val_coco"], data["categories"]
        self.classes = [str(c) for c in self.category_ids]
        torch.manual_seed(cfg.train.seed)
        model = ViTMaskRCNN(arch, cfg, len(self.category_ids))
        if state is not None:
            load_encoder_weights(model.backbone, state, source)
        self.model = model.to(self.device)
        self.names = ["loss", *LOSSES]
        self.bf16 = info.bf16  # decided once, by the engine (train.precision)
        self.val_loader = shard_loader(self.val_dataset, cfg.train.batch_size, cfg.data.num_workers, info,
                                       collate_detection)

    def images(self, batch: dict[str, Any]) -> list[Tensor]:
        return [img.to(self.device, non_blocking=True).float() / 255 for img in batch["images"]]

    def forward(self, net: nn.Module, batch: dict[str, Any], ctx: StepContext) -> tuple[Tensor, Tensor]:
        targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in batch["targets"]]
        losses = net(self.images(batch), targets)
        terms = torch.stack([losses[k].float() for k in LOSSES])
        total = terms.sum()
        return total, torch.cat([total.detach().reshape(1), terms.detach()])

    @torch.no_grad()
    def end_epoch(self, done: int, summary: dict[str, Any]) -> dict[str, Any]:
        self.model.eval()
        records = []
        for batch in self.val_loader:
            if batch["size"] == 0:
                continue
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                outputs = self.model(self.images(batch))
            ids = [int(t["image_id"]) for t in batch["targets"]]
            records += coco_results(outputs, ids, self.category_ids)
        self.model.train()
        everything = [r for part in distributed.gather(records, self.info) for r in part]
        metrics = coco_ap(self.val_coco, everything) if self.info.is_main else None
        metrics = distributed.broadcast(metrics, self.info)
        best = self.track_best(metrics, done)
        problems = {f"annotations_{k}": v for k, v in self.dataset.problems.items() if v}
        return {**metrics, **best, **problems}

    def summary_line(self, summary: dict[str, Any]) -> str:
        def aps(kind: str) -> str:
            return "/".join("-" if summary[f"{k}_{kind}"] is None else f"{summary[f'{k}_{kind}']:.1f}"
                            for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"))

        return (f"val AP/AP50/AP75/APs/APm/APl box {aps('box')} mask {aps('mask')} (best box AP "
                f"{summary['best_AP_box']:.2f} at epoch {summary['best_epoch']}) ")

    def describe(self, plan: Plan) -> list[str]:
        arch, d = self.arch, self.cfg.data
        return [f"data {self.root}: {len(self.category_ids)} categories; {len(self.dataset)} train / "
                f"{len(self.val_dataset)} val images; short side {d.min_size} (max {d.max_size}), padded to "
                f"{d.img_size}",
                f"training targets: {self.dataset.crowd} crowd annotation(s) left out, "
                f"{self.dataset.without_annotations} train image(s) without a usable annotation skipped",
                f"model: Mask R-CNN on ViT patch {arch.patch_size}, dim {arch.embed_dim}, depth {arch.depth} with a "
                f"simple pyramid; anchors {self.cfg.model.anchor_sizes}; initial weights: {self.source}",
                attention_line(self.cfg.model.window_size, arch.depth, self.cfg.data.img_size // arch.patch_size),
                self.recipe()]

