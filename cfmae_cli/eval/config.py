"""The fine-tuning config (``cfmae finetune``): the paper's Table 8 recipe as defaults.

Presets for it carry ``task: finetune``; ``modes: {linear: {…}}`` in a preset holds what linear probing
changes (MAE's recipe: LARS, frozen encoder, no mixing), merged in by ``--mode linear``.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Optional

from pydantic import Field, model_validator

from cfmae_cli import modalities as table
from cfmae_cli.config import (EncoderArch, ImageDataConfig, LrSchedule, Modality, OptimBase, RunConfig, _Strict,
                              check_inputs)


class FtDataConfig(ImageDataConfig):
    root: Optional[str] = Field(None, description="folder with train/ and val/ (ImageFolder, or the dataset layout "
                                                  "for multi-granular input); null = the built-in demo data")
    img_size: int = Field(224, ge=8, description="fine-tuning resolution (square)")
    modalities: list[Modality] = Field(["rgb"], min_length=1,
                                       description="encoder inputs: [rgb], or [rgb, instance, semantic] (†)")
    val_fraction: Optional[float] = Field(None, gt=0, lt=1, description="a folder without train/ and val/: hold "
                                          "out this share of each class (chosen by a hash of the file name)")
    num_classes: Optional[int] = Field(None, ge=2, description="segmentation classes; null = the manifest's "
                                       "(ADE20K's layout: 150)")
    min_size: list[int] = Field([480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800], min_length=1,
                                description="detection: short sides drawn from in training (the last one at test)")
    max_size: int = Field(1333, ge=8, description="detection: the longest side after resizing")
    min_instance_area: float = Field(0.0, ge=0, lt=1, description="detection on the dataset layout: leave out "
                                     "instances smaller than this share of the image")
    crop_pct: float = Field(0.875, gt=0, le=1, description="evaluation: resize to img_size / crop_pct, centre crop")
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"

    @model_validator(mode="after")
    def _check(self) -> "FtDataConfig":
        check_inputs(self.modalities)
        return self


class AugConfig(_Strict):
    scale: tuple[float, float] = Field((0.08, 1.0), description="random-resized-crop area range")
    ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="random-resized-crop aspect range")
    hflip: float = Field(0.5, ge=0, le=1)
    auto_augment: Optional[str] = Field("rand-m9-mstd0.5-inc1", description="timm RandAugment string "
                                        "(RandAug(9, 0.5)); null = none; RGB-only input (not used with maps)")
    color_jitter: Optional[float] = Field(None, ge=0, description="colour jitter (ignored by timm when "
                                          "auto_augment is set)")
    reprob: float = Field(0.25, ge=0, le=1, description="random-erasing probability (RGB-only input)")
    mixup: float = Field(0.8, ge=0, description="mixup alpha; 0 = off")
    cutmix: float = Field(1.0, ge=0, description="cutmix alpha; 0 = off")
    mix_prob: float = Field(1.0, ge=0, le=1, description="probability of mixing a batch")
    switch_prob: float = Field(0.5, ge=0, le=1, description="probability of cutmix instead of mixup")
    label_smoothing: float = Field(0.1, ge=0, lt=1)


class FtModelConfig(_Strict):
    init: Optional[str] = Field(None, description="initial weights: a cfmae checkpoint or run folder, an MAE / "
                                "MultiMAE / timm file, or 'random'; null = the newest run under runs/pretrain")
    encoder: Optional[EncoderArch] = Field(None, description="null = the checkpoint's architecture (for "
                                           "--checkpoint random: the model section of the preset `arch`)")
    arch: str = Field("vitb-400e", description="pre-training preset whose architecture a random-init run uses")
    global_pool: Literal["avg", "token"] = Field("avg", description="avg = mean of the patch tokens and a norm "
                                                 "(MAE fine-tuning); token = the global token")
    drop_path: float = Field(0.1, ge=0, lt=1)
    grad_checkpointing: bool = Field(False, description="recompute each encoder block's activations in the backward "
                                     "pass instead of keeping them: less memory, more compute, the same gradients")
    train_pos_embed: bool = Field(True, description="train the position table (MAE), initialised from the "
                                  "checkpoint's and resized bicubically to the grid; false = keep it fixed")
    head_init_std: float = Field(2e-5, gt=0, description="std of the head's truncated-normal init")
    out_indices: list[int] = Field([3, 5, 7, 11], min_length=4, max_length=4,
                                   description="segmentation: the blocks whose tokens feed the pyramid")
    head_channels: int = Field(512, ge=8, description="segmentation: UperNet channels")
    anchor_sizes: list[int] = Field([32, 64, 128, 256, 512], min_length=5, max_length=5,
                                    description="detection: RPN anchor size per pyramid level")
    rois_per_image: int = Field(512, ge=8, description="detection: RoIs sampled per image for the box head")
    rpn_proposals: list[Annotated[int, Field(ge=1)]] = Field(
        [2000, 1000], min_length=2, max_length=2,
        description="detection: RPN proposals per image in training and at test (after NMS; also the "
                    "top-scoring anchors per level before it)")
    fpn_channels: int = Field(256, ge=8, description="detection: channels of the pyramid and the mask head")
    detections_per_image: int = Field(100, ge=1, description="detection: most detections kept per image")
    window_size: int = Field(0, ge=0, description="detection: ViTDet's windowed attention, windows of this many "
                             "patches a side in every block but the last of each quarter of the depth (2, 5, 8, 11 "
                             "of 12 stay global); 0 = global attention in every block")


class FtOptimConfig(OptimBase):
    """Fine-tuning's optimizer: the shared fields with Table 8's defaults, and its own (the optimizer's name, the
    lr schedule, layer decay, LARS's settings)."""

    base_lr: float = Field(1e-3, gt=0, description="lr = base_lr * effective_batch / 256")
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = Field(5, ge=0)
    min_lr: float = Field(1e-6, ge=0)
    name: Literal["adamw", "lars"] = Field("adamw", description="lars for linear probing (MAE's LARS: the trust "
                                           "ratio on every weight of two or more dimensions, at any weight decay)")
    schedule: LrSchedule = Field("cosine", description="decay after the warmup; step = x0.1 at each of "
                                 "optim.milestones")
    milestones: list[float] = Field([], description="step schedule: the lr drops 10x once this many epochs are "
                                    "done (MMDetection's step=[8, 11])")
    layer_decay: float = Field(0.7, gt=0, le=1, description="layer-wise lr decay (1 = none)")
    momentum: float = Field(0.9, ge=0, lt=1, description="LARS momentum")
    trust_coefficient: float = Field(0.001, gt=0, description="LARS: each weight's step is scaled to this share "
                                     "of its norm (MAE's 0.001); biases and norms take no trust ratio")

    def lr_decay(self) -> tuple[LrSchedule, tuple[float, ...]]:
        return self.schedule, tuple(self.milestones)


class SegConfig(_Strict):
    """Segmentation (``kind: segmentation``): mmsegmentation's ADE20K pipeline, auxiliary head and inference."""

    scale: Optional[tuple[int, int]] = Field(None, description="resize target (long-side cap, short side) of "
                                             "training (times a ratio of ratio_range) and evaluation, the aspect "
                                             "kept; null = (4 x img_size, img_size): mmseg's (2048, 512) at 512")
    ratio_range: tuple[float, float] = Field((0.5, 2.0), description="training: range of the resize ratio")
    cat_max_ratio: float = Field(0.75, gt=0, le=1, description="training crop: redraw (up to 10 times) a crop "
                                 "whose largest class covers this share of its labelled pixels; 1 = off")
    photometric: bool = Field(True, description="training: mmseg's photometric distortion (brightness, contrast, "
                              "saturation, hue, each with probability 0.5)")
    brightness_delta: float = Field(32, ge=0, description="photometric: brightness shift range, +-, of 255")
    contrast_range: tuple[float, float] = Field((0.5, 1.5), description="photometric: contrast factor range")
    saturation_range: tuple[float, float] = Field((0.5, 1.5), description="photometric: saturation factor range")
    hue_delta: int = Field(18, ge=0, le=90, description="photometric: hue shift range, +-, in OpenCV's units "
                           "(180 a turn)")
    aux_weight: float = Field(0.4, ge=0, description="loss weight of the auxiliary FCN head on the third pyramid "
                              "level (training only); 0 = no auxiliary head")
    aux_channels: int = Field(256, ge=8, description="channels of the auxiliary FCN head's 3x3 conv")
    inference: Literal["slide", "whole"] = Field("slide", description="evaluation: slide = img_size windows at "
                                                 "seg.stride over the resized image, logits averaged; whole = the "
                                                 "whole resized image at once (position table interpolated)")
    stride: Optional[int] = Field(None, ge=1, description="slide inference: window stride; null = 2/3 of "
                                  "img_size (341 at 512)")
    aug_test: bool = Field(False, description="evaluation: multi-scale + flip (seg.aug_ratios x {as is, "
                           "flipped}, class probabilities averaged) instead of one scale")
    aug_ratios: list[Annotated[float, Field(gt=0)]] = Field([0.5, 0.75, 1.0, 1.25, 1.5, 1.75], min_length=1,
                                                            description="aug_test: ratios of seg.scale")


class FtTrainConfig(RunConfig):
    epochs: int = Field(100, ge=1)
    save_every: int = Field(10, ge=1, description="keep a checkpoint every N epochs (plus last.pt, best.pt)")


class FinetuneConfig(_Strict):
    """The fine-tuning config (``cfmae finetune``)."""

    TASK: ClassVar[str] = "finetune"
    LEGACY_DEFAULTS: ClassVar[dict[str, Any]] = {"model.train_pos_embed": False, "seg.aux_weight": 0.0,
                                                 "model.grad_checkpointing": False}
    kind: Literal["classification", "segmentation", "detection"] = Field(
        "classification", description="what is trained: an image classifier, per-pixel classes, or Mask R-CNN")
    mode: Literal["full", "linear"] = Field("full", description="full fine-tuning, or a linear probe on the "
                                            "frozen encoder")
    data: FtDataConfig = FtDataConfig()
    model: FtModelConfig = FtModelConfig()
    aug: AugConfig = AugConfig()
    optim: FtOptimConfig = FtOptimConfig()
    train: FtTrainConfig = FtTrainConfig()
    seg: SegConfig = SegConfig()

    @model_validator(mode="after")
    def _check(self) -> "FinetuneConfig":
        enc = self.model.encoder
        image_only = self.data.modalities == [table.embedding_modality()]
        if self.kind == "detection" and (self.mode == "linear" or not image_only):
            raise ValueError("kind: detection fine-tunes the whole encoder on RGB (mode full, modalities [rgb])")
        if self.model.window_size and self.kind != "detection":
            raise ValueError(f"model.window_size: {self.model.window_size}: windowed attention is for kind: detection "
                             f"(0 = global attention)")
        if self.kind == "detection" and self.data.max_size > self.data.img_size:
            raise ValueError(f"data.max_size: {self.data.max_size} exceeds data.img_size {self.data.img_size}, the "
                             f"padded input of the encoder")
        if self.kind == "segmentation":
            if self.mode == "linear" or not image_only:
                raise ValueError("kind: segmentation fine-tunes the whole encoder on RGB (mode full, modalities [rgb])")
            if self.train.batch_size < 2:
                raise ValueError("train.batch_size: segmentation needs at least 2 images per device (BatchNorm)")
            if self.seg.stride is not None and self.seg.stride > self.data.img_size:
                raise ValueError(f"seg.stride: {self.seg.stride} exceeds the window, data.img_size "
                                 f"{self.data.img_size}; windows would leave pixels out")
            if enc is not None and max(self.model.out_indices) != enc.depth - 1:
                raise ValueError(f"model.out_indices: {self.model.out_indices} must end at the encoder's last block "
                                 f"({enc.depth - 1}; depth {enc.depth}), so that every block is trained")
        if enc is not None and self.data.img_size % enc.patch_size:
            raise ValueError(f"data.img_size: {self.data.img_size} is not divisible by the patch size "
                             f"{enc.patch_size}")
        return self
