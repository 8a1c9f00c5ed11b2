"""The pre-training config's schema: strict Pydantic models of its sections (data, model, masking, optim, train),
the fields that fine-tuning shares (:class:`ImageDataConfig`, :class:`RunConfig`, :class:`EncoderArch`), and
the numbers that follow from a config (:func:`derived`).

The defaults below are the paper's ViT-B pre-training setting (Table 7, docs/design.md §4) and live here only.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from cfmae_cli import modalities as table
from cfmae_cli.config_sizes import (MAX_DEPTH, MAX_MLP_RATIO, MAX_PATCH, MAX_PIXELS, MAX_WIDTH, encoder_parameters,
                                    grid_problem, memory_problem, pretrain_parameters)
from cfmae_cli.errors import ConfigError


def _known_modality(name: str) -> str:
    if name not in table.TABLE:
        raise ValueError(f"unknown modality {name!r} (known: {', '.join(table.names())})")
    return name


Modality = Annotated[str, AfterValidator(_known_modality)]  # a name of the table of modalities
Strategy = Literal["semantic", "instance", "random"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ImageDataConfig(_Strict):
    """What every command that reads images shares (pre-training's and fine-tuning's ``data`` sections)."""

    root: Optional[str] = Field(None, description="dataset folder (docs/dataset-format.md); null = the built-in demo data")
    img_size: int = Field(224, ge=8, le=MAX_PIXELS, description="training resolution (square)")
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    num_workers: int = Field(8, ge=0, description="DataLoader worker processes")
    max_bad_fraction: float = Field(0.01, ge=0, le=1,
                                    description="stop when more than this share of the images is unreadable")
    demo_crops_per_photo: int = Field(48, ge=1, description="built-in demo data: random crops per photograph")
    demo_size: int = Field(128, ge=16, description="built-in demo data: side of each crop in pixels")


class DataConfig(ImageDataConfig):
    modalities: list[Modality] = Field(["rgb", "instance", "semantic"], min_length=1,
                                       description="input modalities; ablations use a subset")
    crop_scale: tuple[float, float] = Field((0.2, 1.0), description="random-resized-crop area range")
    crop_ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="random-resized-crop aspect range")
    hflip: float = Field(0.5, ge=0, le=1, description="horizontal flip probability")
    decode: Literal["cpu", "gpu"] = Field(
        "cpu", description="pre-training: cpu = the loader workers decode, crop and flip; gpu = the workers read "
        "the JPEG bytes and the id maps and draw the crop (the same draws), and the training device decodes and "
        "crops the batch (the GPU, or the CPU when training on it; docs/performance.md#gpu-side-data-path)")

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        check_inputs(self.modalities)
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError("data.crop_scale: need 0 < low <= high <= 1")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError("data.crop_ratio: need 0 < low <= high")
        return self


def check_inputs(modalities: list[str], key: str = "data.modalities") -> None:
    """Each modality once, and the one of the encoder's patch embedding among them."""
    if len(set(modalities)) != len(modalities):
        raise ValueError(f"{key}: each modality at most once")
    first = table.embedding_modality()
    if first not in modalities:
        raise ValueError(f"{key}: must include {first} (the encoder's patch embedding reads it; the paper's "
                         f"ablations are RGB, R+S, R+I, R+I+S)")


class DecoderConfig(_Strict):
    dim: int = Field(256, ge=8, le=MAX_WIDTH, description="decoder width")
    num_heads: int = Field(8, ge=1, le=MAX_WIDTH)
    self_blocks: int = Field(2, ge=0, le=MAX_DEPTH,
                             description="self-attention blocks after the cross-attention layer")
    mlp_ratio: float = Field(4.0, gt=0, le=MAX_MLP_RATIO)
    kind: Literal["cfmae", "multimae"] = Field(
        "cfmae", description="cfmae: the task blocks of §3.2 over H (cascaded or parallel); multimae: MultiMAE's "
        "output adapters (per task its own projection, mask token and embeddings; its queries cross-attend to the "
        "visible tokens and the global token only, no mask tokens in the context; parallel)")
    cascade: bool = Field(True, description="cascaded (F^{k-1} fed forward) or parallel (the ablation)")
    cross_attention: bool = Field(True, description="false = the 'w/o CA' ablation (self-attention on Q+F)")
    global_token: bool = Field(True, description="the encoder's final global token is in every task's context "
                               "(as MAE's decoder keeps its class token and MultiMAE's adapters attend to it), so "
                               "pre-training trains it; false = the decoder reads the patch tokens only (runs "
                               "made before this key)")
    order: list[Modality] = Field(["semantic", "instance", "rgb"], description="task order of the cascade")

    @model_validator(mode="after")
    def _check(self) -> "DecoderConfig":
        if self.dim % self.num_heads:
            raise ValueError(f"model.decoder.dim: {self.dim} is not divisible by num_heads={self.num_heads}")
        if self.kind == "multimae" and self.cascade:
            raise ValueError("model.decoder.kind: MultiMAE's output adapters run in parallel; set "
                             "model.decoder.cascade=false with kind=multimae")
        if len(set(self.order)) != len(self.order):
            raise ValueError("model.decoder.order: each modality at most once")
        return self


class AlignConfig(_Strict):
    """Feature alignment to a frozen teacher (the paper's future work, docs/modalities.md#feature-alignment)."""

    enabled: bool = Field(False, description="align a projection of the model's features with a frozen teacher's")
    teacher: Optional[str] = Field(None, description="a timm model name (with weights), a folder written by "
                                   "`cfmae export` (config.json + model.safetensors), or hf-hub:owner/name[@rev]")
    weights: Optional[str] = Field(None, description="the teacher's weights file (with a timm name): a local "
                                   "file or hf-hub:owner/name[@rev]")
    img_size: Optional[int] = Field(None, ge=8, description="teacher input side; null = its pretrained_cfg's")
    stage: Literal["decoder", "encoder"] = Field("decoder", description="the first decoder stage's features or "
                                                 "the encoder's")
    loss: Literal["cosine", "smooth_l1"] = Field("cosine", description="1 - cos, or smooth L1 to the teacher's "
                                                 "per-patch normalised features")
    patches: Literal["all", "masked"] = Field("all", description="patches the loss is taken on: all, or those "
                                              "whose RGB is masked (decoder stage only)")
    weight: float = Field(1.0, ge=0, description="lambda_F, the weight of the alignment loss in the total")
    hidden: Optional[int] = Field(None, ge=1, description="hidden width of the projection; null = the teacher's")

    @model_validator(mode="after")
    def _check(self) -> "AlignConfig":
        if self.enabled and not self.teacher:
            raise ValueError("model.align.teacher: alignment needs a teacher (a timm name with model.align.weights, "
                             "or an exported folder)")
        if self.stage == "encoder" and self.patches == "masked":
            raise ValueError("model.align.patches: masked patches have no encoder features (the encoder sees the "
                             "visible tokens); use patches=all with stage=encoder, or stage=decoder")
        return self


class EncoderArch(_Strict):
    """The encoder's architecture, declared once: a pre-training config's model section holds these fields (flat,
    as :class:`ModelConfig` inherits them) and a fine-tuning config's ``model.encoder`` is one."""

    #: the fields that are arguments of timm's ``VisionTransformer`` (:meth:`timm_kwargs`); the rest shape the maps
    TIMM_FIELDS: ClassVar[tuple[str, ...]] = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")

    patch_size: int = Field(16, ge=1, le=MAX_PATCH)
    map_stride: int = Field(4, ge=1, description="maps are consumed at image_size / map_stride")
    embed_dim: int = Field(768, ge=8, le=MAX_WIDTH)
    depth: int = Field(12, ge=1, le=MAX_DEPTH)
    num_heads: int = Field(12, ge=1, le=MAX_WIDTH)
    mlp_ratio: float = Field(4.0, gt=0, le=MAX_MLP_RATIO)
    map_embed_dim: int = Field(64, ge=1, le=MAX_WIDTH, description="per-pixel class embedding width of the map "
                               "adapters")
    num_instance_ids: int = Field(16, ge=2, le=255, description="K: background + K-1 largest instances")

    @model_validator(mode="after")
    def _check(self) -> "EncoderArch":
        problem = memory_problem(encoder_parameters(self.embed_dim, self.depth, self.mlp_ratio, self.patch_size))
        if problem:
            raise ValueError(f"the encoder (embed_dim {self.embed_dim}, depth {self.depth}, mlp_ratio "
                             f"{self.mlp_ratio}) {problem}")
        return self

    @classmethod
    def of(cls, model: "EncoderArch") -> "EncoderArch":
        """The architecture alone, e.g. of a :class:`ModelConfig` (without its decoder and loss fields)."""
        return cls(**{k: getattr(model, k) for k in cls.model_fields})

    def timm_kwargs(self, img_size: int, **extra: Any) -> dict[str, Any]:
        """The arguments of timm's ``VisionTransformer`` for this shape at ``img_size`` (``model_args`` of an
        export, the shape of :class:`~cfmae_cli.model.encoder.ViTEncoder`), then ``extra``."""
        return {"img_size": img_size, **{k: getattr(self, k) for k in self.TIMM_FIELDS}, **extra}


class ModelConfig(EncoderArch):
    """Pre-training's model: the encoder's architecture (its fields, inherited, come first in the section),
    the decoder, the losses and the alignment."""

    drop_path: float = Field(0.0, ge=0, lt=1)
    grad_checkpointing: bool = Field(False, description="recompute each encoder and decoder block's activations in "
                                     "the backward pass instead of keeping them: less memory, ~22 % more FLOPs, "
                                     "the same gradients (cfmae bench --what memory)")
    norm_pix_loss: bool = Field(True, description="RGB loss on per-patch normalised pixels (MAE)")
    loss_weights: dict[Modality, float] = Field({"semantic": 1.0, "instance": 1.0, "rgb": 1.0},
                                                description="lambda_S, lambda_I, lambda_R")
    image_targets: Annotated[dict[Modality, table.Target], AfterValidator(table.checked_image_targets)] = Field(
        {}, description="per image modality, its target and input: standardise (MultiMAE's truncated per-image "
        "standardisation, input and target) | patch_norm (MAE's per-patch normalised target, under norm_pix_loss) | "
        "raw; a modality not named keeps its default (depth: standardise, rgb: patch_norm)")
    decoder: DecoderConfig = DecoderConfig()
    align: AlignConfig = AlignConfig()

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":  # replaces EncoderArch's _check: Config checks the whole model's memory
        if self.embed_dim % 4:
            raise ValueError(f"model.embed_dim: {self.embed_dim} must be divisible by 4 (2-D sin-cos positions)")
        if self.decoder.dim % 4:
            raise ValueError(f"model.decoder.dim: {self.decoder.dim} must be divisible by 4 (2-D sin-cos positions)")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"model.embed_dim: {self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.patch_size % self.map_stride:
            raise ValueError(f"model.patch_size: {self.patch_size} is not divisible by map_stride={self.map_stride}")
        if any(w < 0 for w in self.loss_weights.values()):
            raise ValueError("model.loss_weights: weights must be >= 0")
        return self


class MaskingConfig(_Strict):
    num_visible: int = Field(98, ge=1, description="visible tokens over all modalities (588/6 for ViT-B)")
    dirichlet_alpha: float = Field(1.0, gt=0, description="concentration of the per-modality budget draw")
    alpha_obj: float = Field(0.75, ge=0, le=1, description="share of masked patches put on objects (Eq. 8)")
    min_instance_area: float = Field(0.005, ge=0, le=1, description="instance selected if area share >= this")
    instance_top_k: Optional[int] = Field(None, ge=1, description="keep only the k largest instances")
    semantic_class_weights: Optional[list[float]] = Field(
        None, description="w_c of Eq. 10 per semantic class (+1 for 'unlabelled'); null = all 1")
    order: list[Strategy] = Field(["semantic", "instance", "random"], min_length=1,
                                  description="phases of the curriculum; one entry = a constant strategy")
    breakpoints: list[float] = Field([0.25, 0.40, 0.60, 0.75],
                                     description="progress points: end of phase 1, start of phase 2, …")
    mix: Literal["quota", "score"] = Field(
        "quota", description="Eq. 11: 'quota' blends the strategies by integer quotas of the masked patches; "
                             "'score' is the literal top-n of the weighted binary masks (it switches, not blends)")

    @model_validator(mode="after")
    def _check(self) -> "MaskingConfig":
        if len(set(self.order)) != len(self.order):
            raise ValueError("masking.order: each strategy at most once")
        need = 2 * (len(self.order) - 1)
        if len(self.breakpoints) != need:
            raise ValueError(f"masking.breakpoints: {len(self.order)} phases need {need} breakpoints "
                             f"(end of a phase, start of the next), got {len(self.breakpoints)}")
        if any(b < a for a, b in zip(self.breakpoints, self.breakpoints[1:])) or \
                any(not 0 <= b <= 1 for b in self.breakpoints):
            raise ValueError("masking.breakpoints: must be non-decreasing values in [0, 1]")
        if self.semantic_class_weights is not None and any(w < 0 for w in self.semantic_class_weights):
            raise ValueError("masking.semantic_class_weights: weights must be >= 0")
        return self


LrSchedule = Literal["cosine", "linear", "step"]  # the lr's decay after the warmup


class OptimBase(_Strict):
    """The optimizer's fields that pre-training and fine-tuning share (fine-tuning's ``FtOptimConfig`` extends it
    with its own defaults); the defaults here are pre-training's."""

    base_lr: float = Field(1e-4, gt=0, description="lr = base_lr * effective_batch / 256")
    lr: Optional[float] = Field(None, gt=0, description="absolute lr; overrides the scaling rule")
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = Field(40, ge=0)
    min_lr: float = Field(0.0, ge=0)
    effective_batch: int = Field(2048, ge=1, description="per-device batch x devices x accumulation steps")
    clip_grad: Optional[float] = Field(None, gt=0, description="max gradient norm; null = no clipping")

    def lr_decay(self) -> tuple[LrSchedule, tuple[float, ...]]:
        """The lr's decay after the warmup and its milestones in epochs: cosine without milestones for
        pre-training, whose config has no keys for them; fine-tuning's ``optim.schedule`` and ``optim.milestones``."""
        return "cosine", ()


class OptimConfig(OptimBase):
    """Pre-training's optimizer: AdamW, the lr decayed by a cosine after the warmup."""


class RunConfig(_Strict):
    """How a training run is carried out; shared by pre-training (``TrainConfig``) and fine-tuning."""

    epochs: int = Field(400, ge=1)
    batch_size: int = Field(256, ge=1, description="per-device batch")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 on GPU, fp32 on CPU")
    save_every: int = Field(20, ge=1, description="keep a checkpoint every N epochs (plus last.pt)")
    keep_last: int = Field(5, ge=0, description="periodic checkpoints kept (older ones are deleted); 0 = none")
    log_every: int = Field(20, ge=1, description="optimizer steps between metrics lines")
    threads: Optional[int] = Field(None, ge=1, description="CPU threads for torch per process; null = the cores "
                                   "this process may use, shared among the local processes, minus data.num_workers "
                                   "(at least 1)")
    compile: bool = Field(False, description="torch.compile the model's forward and loss (one graph, no break); "
                          "masks and the optimizer stay eager")
    loggers: list[Literal["tensorboard", "csv", "wandb", "mlflow"]] = Field(
        ["tensorboard"], description="where the scalars and figures go besides metrics.jsonl: tensorboard, csv "
        "(metrics-<type>.csv), wandb, mlflow (pip install 'cfmae[wandb]' / 'cfmae[mlflow]'; docs/monitoring.md)")


class MonitorConfig(_Strict):
    """The k-NN monitor of pre-training (docs/monitoring.md)."""

    enabled: Optional[bool] = Field(None, description="null = on when there are labels: monitor.data, two or "
                                    "more class folders in the data, or the built-in demo data")
    every: int = Field(10, ge=1, description="epochs between measurements (and after the last; epoch 0 always)")
    data: Optional[str] = Field(None, description="labelled ImageFolder with train/ and val/ (e.g. ImageNet's); "
                                "null = the pre-training data's class folders, with val_fraction held out (the "
                                "built-in demo data: close-ups of its photographs, docs/monitoring.md)")
    val_fraction: float = Field(0.01, gt=0, lt=1, description="share of each class held out of pre-training as "
                                "the monitor's val set (by a hash of the file name)")
    train_images: int = Field(20000, ge=1, description="most labelled train images in the k-NN bank")
    val_images: int = Field(10000, ge=1, description="most val images scored")
    k: int = Field(20, ge=1, description="neighbours (DINO's 20)")
    temperature: float = Field(0.07, gt=0, description="weight exp(similarity / T) (DINO's 0.07)")
    batch_size: int = Field(256, ge=1, description="images per forward when embedding")


class TrainConfig(RunConfig):
    plot_every: int = Field(20, ge=1, description="epochs between reconstruction grids in plots/")
    plot_samples: int = Field(2, ge=1, le=16, description="images of the fixed batch shown in the grids")
    monitor: MonitorConfig = MonitorConfig()


class Config(_Strict):
    """The pre-training config (``cfmae pretrain``)."""

    TASK: ClassVar[str] = "pretrain"
    # keys added since runs were first written, with the value that reproduces a run that predates them
    LEGACY_DEFAULTS: ClassVar[dict[str, Any]] = {"masking.mix": "score", "train.monitor.enabled": False,
                                                 "model.grad_checkpointing": False, "model.decoder.kind": "cfmae",
                                                 "model.align": AlignConfig().model_dump(mode="json"),
                                                 "model.decoder.global_token": False,
                                                 "model.image_targets": {"depth": "patch_norm"}}
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    masking: MaskingConfig = MaskingConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _check(self) -> "Config":
        size, patch = self.data.img_size, self.model.patch_size
        if size % patch:
            raise ValueError(f"data.img_size: {size} is not divisible by model.patch_size={patch}")
        if (problem := grid_problem(size, patch)) is not None:
            raise ValueError(f"data.img_size: {size} / model.patch_size {patch} {problem}")
        if (problem := memory_problem(pretrain_parameters(self.model.model_dump(mode="json"), size,
                                                          list(self.data.modalities)))) is not None:
            raise ValueError(f"model: the model (model.embed_dim {self.model.embed_dim}, model.depth "
                             f"{self.model.depth}, model.decoder.dim {self.model.decoder.dim}) {problem}")
        n = (size // patch) ** 2
        if self.masking.num_visible > n:
            raise ValueError(f"masking.num_visible: {self.masking.num_visible} exceeds the {n} tokens of one "
                             f"modality (img_size {size} / patch {patch}); at most {n}")
        total = n * len(self.data.modalities)
        if self.masking.num_visible >= total:
            raise ValueError(f"masking.num_visible: {self.masking.num_visible} leaves nothing masked out of "
                             f"{total} tokens")
        missing = [m for m in self.data.modalities if m not in self.model.decoder.order]
        if missing:
            raise ValueError(f"model.decoder.order: {self.model.decoder.order} has no place for "
                             f"{', '.join(missing)} of data.modalities; list every input modality")
        if self.model.align.enabled and table.embedding_modality() not in self.data.modalities:
            raise ValueError("model.align: the teacher reads RGB, which is not in data.modalities")
        return self

    @property
    def tokens_per_modality(self) -> int:
        return (self.data.img_size // self.model.patch_size) ** 2


def batch_plan(optim: OptimBase, train: RunConfig, world_size: int = 1) -> dict[str, Any]:
    """Devices, accumulation steps, effective batch and actual lr (lr = base_lr x effective_batch / 256, unless
    ``optim.lr`` is set) for any config with these ``optim`` and ``train`` fields (pre-training, fine-tuning)."""
    per_step = train.batch_size * world_size
    if optim.effective_batch % per_step:
        raise ConfigError(f"optim.effective_batch: {optim.effective_batch} is not a multiple of "
                          f"train.batch_size x devices = {train.batch_size} x {world_size} = {per_step}; "
                          f"change one of them")
    return {"devices": world_size, "accumulation_steps": optim.effective_batch // per_step,
            "effective_batch": optim.effective_batch,
            "lr": optim.lr if optim.lr is not None else optim.base_lr * optim.effective_batch / 256}


def derived(cfg: Config, world_size: int = 1) -> dict[str, Any]:
    """Numbers that follow from the config: tokens, accumulation steps, actual lr (printed at start)."""
    n = cfg.tokens_per_modality
    total = n * len(cfg.data.modalities)
    return {
        "tokens_per_modality": n,
        "tokens_total": total,
        "num_visible": cfg.masking.num_visible,
        "num_masked": total - cfg.masking.num_visible,
        "mask_ratio": (total - cfg.masking.num_visible) / total,
        "map_size": cfg.data.img_size // cfg.model.map_stride,
        **batch_plan(cfg.optim, cfg.train, world_size),
        "modalities": list(cfg.data.modalities),
        "decoder_order": [m for m in cfg.model.decoder.order if m in cfg.data.modalities],
        "decoder": decoder_summary(cfg),
    }


def decoder_summary(cfg: Config) -> str:
    """The decoder in words: its kind, its task order, and whether the global token is in its context."""
    dec = cfg.model.decoder
    order = [m for m in dec.order if m in cfg.data.modalities]
    if dec.kind == "multimae":
        what = f"MultiMAE's output adapters, in parallel: {', '.join(order)}"
    else:
        what = f"{'cascaded' if dec.cascade else 'parallel'} {' → '.join(order)}"
        what += "" if dec.cross_attention else ", without cross-attention"
    return what + ("; global token in the context" if dec.global_token else "; patch tokens only")
