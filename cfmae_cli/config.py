"""Configuration: strict Pydantic models of every section, presets, ``--set`` overrides, derived values.

The defaults below are the paper's ViT-B pre-training setting (Table 7, DESIGN §4) and live here only.
A preset (``cfmae_cli/presets/NAME.yaml``) overrides what changes; it may name a ``base`` preset to start
from. ``--set a.b=c`` overrides one key; the value is read as YAML (``[rgb,semantic]``, ``3e-4``, ``true``).
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from cfmae_cli import modalities as table
from cfmae_cli.checkpoints import checkpoint_path, peek_checkpoint, safetensors_shapes
from cfmae_cli.errors import ConfigError


def _known_modality(name: str) -> str:
    if name not in table.TABLE:
        raise ValueError(f"unknown modality {name!r} (known: {', '.join(table.names())})")
    return name


Modality = Annotated[str, AfterValidator(_known_modality)]  # a name of the table of modalities
Strategy = Literal["semantic", "instance", "random"]
PRESET_DIR = Path(__file__).parent / "presets"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The largest architecture cfmae builds, key by key: generous for every published ViT (ViT-22B: width 6144,
# depth 48; ViT-e: MLP ratio 8.6; SAM's ViT-H at 1024 px: a 64 x 64 patch grid), so that only a damaged or
# foreign config meets them. What stays within each bound but not together is caught by the memory check
# (:func:`memory_problem`). Both run before anything is built (:func:`check_config_sizes`).
MAX_WIDTH = 16384  # embed_dim, decoder.dim, map_embed_dim, heads, pyramid channels
MAX_DEPTH = 256  # encoder blocks, decoder self-attention blocks
MAX_MLP_RATIO = 64.0
MAX_PATCH = 256  # pixels per side of a patch
MAX_PIXELS = 16384  # img_size
MAX_GRID = 256  # patches per side of the input (65,536 tokens)
MAX_CLASSES = 1 << 20  # classes of a head
BYTES_PER_PARAMETER = 4  # float32: what a model is built in


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
    teacher: Optional[str] = Field(None, description="a timm model name (with weights) or a folder written by "
                                   "`cfmae export` (config.json + model.safetensors)")
    weights: Optional[str] = Field(None, description="the teacher's local weights file (with a timm name)")
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


class ModelConfig(_Strict):
    patch_size: int = Field(16, ge=1, le=MAX_PATCH)
    map_stride: int = Field(4, ge=1, description="maps are consumed at image_size / map_stride")
    embed_dim: int = Field(768, ge=8, le=MAX_WIDTH)
    depth: int = Field(12, ge=1, le=MAX_DEPTH)
    num_heads: int = Field(12, ge=1, le=MAX_WIDTH)
    mlp_ratio: float = Field(4.0, gt=0, le=MAX_MLP_RATIO)
    drop_path: float = Field(0.0, ge=0, lt=1)
    map_embed_dim: int = Field(64, ge=1, le=MAX_WIDTH, description="per-pixel class embedding width of the map "
                               "adapters")
    num_instance_ids: int = Field(16, ge=2, le=255, description="K: background + K-1 largest instances")
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
    def _check(self) -> "ModelConfig":
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


class EncoderArch(_Strict):
    """The encoder's architecture (a pre-training config's model section, without the decoder)."""

    patch_size: int = Field(16, ge=1, le=MAX_PATCH)
    embed_dim: int = Field(768, ge=8, le=MAX_WIDTH)
    depth: int = Field(12, ge=1, le=MAX_DEPTH)
    num_heads: int = Field(12, ge=1, le=MAX_WIDTH)
    mlp_ratio: float = Field(4.0, gt=0, le=MAX_MLP_RATIO)
    map_stride: int = Field(4, ge=1)
    map_embed_dim: int = Field(64, ge=1, le=MAX_WIDTH)
    num_instance_ids: int = Field(16, ge=2, le=255)

    @model_validator(mode="after")
    def _check(self) -> "EncoderArch":
        problem = memory_problem(encoder_parameters(self.embed_dim, self.depth, self.mlp_ratio, self.patch_size))
        if problem:
            raise ValueError(f"the encoder (embed_dim {self.embed_dim}, depth {self.depth}, mlp_ratio "
                             f"{self.mlp_ratio}) {problem}")
        return self

    @classmethod
    def of(cls, model: ModelConfig) -> "EncoderArch":
        return cls(**{k: getattr(model, k) for k in cls.model_fields})


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


class OptimConfig(_Strict):
    base_lr: float = Field(1e-4, gt=0, description="lr = base_lr * effective_batch / 256")
    lr: Optional[float] = Field(None, gt=0, description="absolute lr; overrides the scaling rule")
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = Field(40, ge=0)
    min_lr: float = Field(0.0, ge=0)
    effective_batch: int = Field(2048, ge=1, description="per-device batch x devices x accumulation steps")
    clip_grad: Optional[float] = Field(None, gt=0, description="max gradient norm; null = no clipping")


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
                                                 "model.align": AlignConfig().model_dump(mode="json"),
                                                 "model.decoder.kind": "cfmae",
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
        if self.model.align.enabled and "rgb" not in self.data.modalities:
            raise ValueError("model.align: the teacher reads RGB, which is not in data.modalities")
        return self

    @property
    def tokens_per_modality(self) -> int:
        return (self.data.img_size // self.model.patch_size) ** 2


# Keys that may differ when a run is resumed: they change how the run is carried out, not what it computes.
RESUMABLE_CHANGES = frozenset({"data.num_workers", "train.device", "train.log_every", "train.save_every",
                               "train.keep_last", "train.plot_every", "train.plot_samples", "train.threads",
                               "train.compile", "train.loggers"})


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (``model_dump(mode='json')`` form)."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


# ----------------------------------------------------------------------------------------------------------
# loading


def list_presets(task: str | None = None) -> dict[str, str]:
    """Preset name → its one-line description (only those of ``task``, 'pretrain' or 'finetune', if given)."""
    out = {}
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        if task is None or preset_task(path.stem) == task:
            out[path.stem] = str(raw.get("description", ""))
    return out


def preset_task(name_or_path: str) -> str:
    """The command a preset is for: its ``task`` key ('pretrain' when absent), following ``base``."""
    return str(_preset_dict(name_or_path, keep_task=True).get("task", "pretrain"))


def _preset_dict(name_or_path: str, seen: tuple[str, ...] = (), keep_task: bool = False) -> dict[str, Any]:
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PRESET_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            names = list(list_presets())
            close = difflib.get_close_matches(name_or_path, names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown preset '{name_or_path}'.{hint} Presets: {', '.join(names)} "
                              f"(or a path to a .yaml file).")
    if not path.is_file():
        raise ConfigError(f"{path}: preset file not found.")
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not readable as YAML ({exc}).") from None
    if raw is None:
        raise ConfigError(f"{path}: the preset file is empty; it would silently be the defaults. Give what it changes, "
                          f"e.g. 'base: vitb-400e' and the sections it sets (docs/presets.md).")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a preset must be a mapping of sections (data, model, masking, optim, train).")
    raw.pop("description", None)
    if not keep_task:
        raw.pop("task", None)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if base in seen:
        raise ConfigError(f"{path}: preset 'base' chain loops through '{base}'.")
    return deep_merge(_preset_dict(str(base), seen + (str(base),), keep_task), raw)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``override`` merged in (mappings merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``'optim.lr=3e-4'`` → (['optim', 'lr'], 0.0003). Values are read as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.path=value, e.g. --set optim.base_lr=1.5e-4")
    key, _, text = item.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return parts, value


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_all_keys(ann, prefix + name + "."))
    return keys


def _explain(exc: ValidationError, source: str, schema: type[BaseModel] = Config) -> ConfigError:
    keys = _all_keys(schema)
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc, keys, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            lines.append(f"{loc}: unknown key{hint}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] in ("less_than_equal", "less_than", "greater_than_equal", "greater_than"):
                msg += f", not {err.get('input')!r}"
            lines.append(msg if loc == "" or msg.startswith(loc) else f"{loc}: {msg}")
    return ConfigError(f"invalid configuration ({source}):\n  " + "\n  ".join(lines))


def load_config(preset: str = "demo", overrides: list[str] | tuple[str, ...] = (), schema: type[Any] = Config,
                mode: str | None = None) -> Any:
    """Resolve a preset (name or YAML path) plus ``key=value`` overrides into a validated config of ``schema``
    (:class:`Config` for pre-training). A preset may hold ``modes: {NAME: {…}}``: the section of ``mode`` is
    merged over the preset (before the overrides) and ``mode`` is set to it."""
    task = preset_task(preset)
    if task != schema.TASK:
        raise ConfigError(f"preset '{preset}' is a {task} preset; use it with `cfmae {task}` "
                          f"(presets for `cfmae {schema.TASK}`: {', '.join(list_presets(schema.TASK))}).")
    raw = _preset_dict(preset)
    modes = raw.pop("modes", {}) or {}
    if mode is not None:
        raw = deep_merge(raw, modes.get(mode, {}))
        raw["mode"] = mode
    for item in overrides:
        parts, value = parse_override(item)
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return config_from_dict(raw, f"preset '{preset}'" + (" with --set overrides" if overrides else ""), schema)


def config_from_dict(raw: dict[str, Any], source: str = "config", schema: type[Any] = Config) -> Any:
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise _explain(exc, source, schema) from None


def with_legacy_defaults(raw: dict[str, Any], schema: type[Any] = Config) -> dict[str, Any]:
    """A stored config (a checkpoint's) with each key of ``schema.LEGACY_DEFAULTS`` that it lacks set to the
    value it ran with: a run written before the key existed resumes and is shown as it was made."""
    out = copy.deepcopy(raw)
    for dotted, value in getattr(schema, "LEGACY_DEFAULTS", {}).items():
        *sections, key = dotted.split(".")
        node = out
        for section in sections:
            node = node.setdefault(section, {})
        node.setdefault(key, copy.deepcopy(value))
    return out


def stored_config(raw: dict[str, Any], source: str, schema: type[Any] = Config) -> Any:
    """The validated config of a checkpoint (:func:`with_legacy_defaults` first); an architecture beyond the
    bounds or this machine's memory is refused first, in one line (:func:`check_config_sizes`)."""
    check_config_sizes(raw, source, schema.TASK)
    return config_from_dict(with_legacy_defaults(raw, schema), source, schema)


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (what goes into ``config.yaml`` of a run); a fine-tuning config starts with
    ``task: finetune`` so that the file works as a ``--preset`` of the right command."""
    data = cfg.model_dump(mode="json")
    task = getattr(cfg, "TASK", "pretrain")
    return yaml.safe_dump(data if task == "pretrain" else {"task": task, **data}, sort_keys=False)


def batch_plan(optim: Any, train: Any, world_size: int = 1) -> dict[str, Any]:
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


# ----------------------------------------------------------------------------------------------------------
# architecture sizes: checked before anything is built

_BOUNDS = {  # kind of size → (the bound, its unit, a real model for scale)
    "width": (MAX_WIDTH, "channels", "ViT-22B has 6144"),
    "depth": (MAX_DEPTH, "blocks", "ViT-22B has 48"),
    "mlp_ratio": (MAX_MLP_RATIO, "", "ViT-e's is 8.6"),
    "patch": (MAX_PATCH, "pixels", "ViTs use 8 to 32"),
    "pixels": (MAX_PIXELS, "pixels", "ViTDet reads 1024"),
    "ids": (255, "ids", "instance maps are 8-bit"),
    "classes": (MAX_CLASSES, "classes", "ImageNet-22k has 21,841"),
}


@functools.lru_cache(maxsize=1)
def machine_memory() -> int | None:
    """Bytes of memory this process can have: the machine's physical memory, or a container's smaller limit
    (cgroup v2 ``memory.max`` or v1 ``memory.limit_in_bytes``); None where neither can be read."""
    try:
        total: int | None = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        total = None
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and (total is None or int(text) < total):
            total = int(text)
    return total


def block_parameters(dim: float, mlp_ratio: float) -> float:
    """Parameters of one transformer block (attention, MLP of ``dim * mlp_ratio``, two norms)."""
    hidden = dim * mlp_ratio
    return 4 * dim * dim + 2 * dim * hidden + 9 * dim + hidden


def encoder_parameters(dim: float, depth: float, mlp_ratio: float, patch: float, grid: float = 0) -> float:
    """Parameters of a ViT encoder: its blocks, the patch embedding and (with ``grid``) the position table."""
    return depth * block_parameters(dim, mlp_ratio) + 3 * patch * patch * dim + (grid * grid + 4) * dim


def _map_parameters(model: dict[str, Any], modalities: list[str], semantic_classes: int, head_dim: float = 0
                    ) -> float:
    """The input adapters of the modalities besides the patch embedding and, with ``head_dim`` (the decoder's
    width), their reconstruction heads."""
    dim, patch, stride = model["embed_dim"], model["patch_size"], max(model["map_stride"], 1)
    total = 0.0
    for name in modalities:
        spec = table.TABLE.get(name)
        if spec is None:
            continue
        if spec.kind == "ids":
            classes = table.num_classes(spec, semantic_classes, model["num_instance_ids"])
            side = max(patch // stride, 1)
            total += (classes + 1) * model["map_embed_dim"] + model["map_embed_dim"] * dim * side * side
            total += head_dim * side * side * classes
        else:
            channels = spec.channels or 3
            total += 0 if spec.patch_embedding else channels * patch * patch * dim
            total += head_dim * patch * patch * channels
    return total


def pretrain_parameters(model: dict[str, Any], img_size: int, modalities: list[str], semantic_classes: int = 0
                        ) -> float:
    """About the parameters of a CFMAE (``model``: a pre-training config's model section as a dict): the encoder,
    the map adapters, a decoder task (its first block, the self-attention blocks, the projection from the
    encoder) per modality, and the heads."""
    dim, dec = model["embed_dim"], model["decoder"]
    total = encoder_parameters(dim, model["depth"], model["mlp_ratio"], model["patch_size"],
                               img_size // max(model["patch_size"], 1))
    tasks = [m for m in modalities if m in table.TABLE]
    total += len(tasks) * ((1 + dec["self_blocks"]) * block_parameters(dec["dim"], dec["mlp_ratio"]) +
                           (dim + 2) * dec["dim"])
    return total + _map_parameters(model, tasks, semantic_classes, dec["dim"])


def finetune_parameters(encoder: dict[str, Any], img_size: int, modalities: list[str], kind: str, classes: int,
                        channels: int = 0, semantic_classes: int = 0) -> float:
    """About the parameters of a fine-tuned model: the encoder and its adapters, and the head of ``kind`` (a
    linear classifier; UperNet on a simple pyramid with ``channels``; Mask R-CNN on ViTDet's pyramid with
    ``channels``)."""
    dim = encoder["embed_dim"]
    total = encoder_parameters(dim, encoder["depth"], encoder["mlp_ratio"], encoder["patch_size"],
                               img_size // max(encoder["patch_size"], 1))
    total += _map_parameters(encoder, modalities, semantic_classes)
    c = channels
    if kind == "segmentation":
        return total + 12 * dim * dim + 16 * dim * c + 99 * c * c + c * classes
    if kind == "detection":
        return total + 5 * dim * dim + 3 * dim * c + 85 * c * c + 50176 * c + 2 ** 20 + 5200 * (classes + 1)
    return total + (dim + 1) * classes


def _size(n: float) -> str:
    for step, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= step:
            return f"{n / step:.1f} {prefix}"
    return f"{n:.0f}"


def _bytes(n: float) -> str:
    for power, unit in ((4, "TiB"), (3, "GiB"), (2, "MiB")):
        if n >= 1024 ** power:
            return f"{n / 1024 ** power:.1f} {unit}"
    return f"{n / 1024:.0f} KiB"


def memory_problem(parameters: float) -> str | None:
    """What is wrong with building a model of ``parameters`` here: its float32 weights alone need more than this
    machine's memory (:func:`machine_memory`); None when they fit (or the memory is unknown)."""
    have, need = machine_memory(), parameters * BYTES_PER_PARAMETER
    if have is None or need <= have:
        return None
    return (f"has about {_size(parameters)} parameters: {_bytes(need)} in float32, more than the "
            f"{_bytes(have)} of memory of this machine")


def grid_problem(img_size: float, patch_size: float) -> str | None:
    """What is wrong with the patch grid of ``img_size`` / ``patch_size``: more than ``MAX_GRID`` per side."""
    grid = int(img_size // max(patch_size, 1))
    if grid <= MAX_GRID:
        return None
    return f"is a {grid:,} x {grid:,} patch grid, above the {MAX_GRID} x {MAX_GRID} that cfmae builds"


def _node(raw: Any, dotted: str) -> Any:
    """The entry at ``dotted`` in a stored config (None where it is missing)."""
    node = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _value(raw: Any, dotted: str, default: Any) -> Any:
    """The number at ``dotted`` in a stored config, or ``default`` where it is missing or not a number (the
    config's validation names those)."""
    node = _node(raw, dotted)
    return node if isinstance(node, (int, float)) and not isinstance(node, bool) else default


def check_config_sizes(raw: dict[str, Any], source: str, task: str = "pretrain", semantic_classes: int = 0,
                       classes: int = 0) -> None:
    """Refuse, before anything is built, a stored config (a checkpoint's, ``task`` 'pretrain' or 'finetune')
    whose architecture is beyond the bounds above or whose weights alone would not fit in this machine's
    memory: one :class:`ConfigError` line naming ``source``, the key and its size. ``semantic_classes``,
    ``classes``: the class lists the checkpoint stores (its heads). Keys that are missing or not numbers are
    left to the config's validation."""
    fine = task == "finetune"
    enc = "model.encoder." if fine else "model."
    if fine and not isinstance(_node(raw, "model.encoder"), dict):
        return  # not resolved: nothing to build from (the reader says so)
    arch = {k: _value(raw, enc + k, f.default) for k, f in EncoderArch.model_fields.items()}
    sizes = [(enc + "embed_dim", "width"), (enc + "depth", "depth"), (enc + "mlp_ratio", "mlp_ratio"),
             (enc + "patch_size", "patch"), (enc + "map_embed_dim", "width"), (enc + "num_heads", "width"),
             (enc + "num_instance_ids", "ids"), ("data.img_size", "pixels")]
    if fine:
        sizes += [("model.head_channels", "width"), ("model.fpn_channels", "width"), ("data.num_classes", "classes")]
    else:
        sizes += [("model.decoder.dim", "width"), ("model.decoder.num_heads", "width"),
                  ("model.decoder.self_blocks", "depth"), ("model.decoder.mlp_ratio", "mlp_ratio")]
    sizes_of = dict(sizes)
    counts = {"semantic_classes": semantic_classes} if not fine else {"classes": classes}
    for key, value in [(key, _value(raw, key, 0)) for key in sizes_of] + list(counts.items()):
        _check_bound(source, key, value, sizes_of.get(key, "classes"))
    img = _value(raw, "data.img_size", ImageDataConfig.model_fields["img_size"].default)
    if (problem := grid_problem(img, arch["patch_size"])) is not None:
        raise ConfigError(f"{source}: data.img_size {img} / {enc}patch_size {arch['patch_size']} {problem}; a "
                          f"damaged or foreign config. Nothing was built.")
    arch = {k: max(v, 0) for k, v in arch.items()}
    modalities = _node(raw, "data.modalities")
    if not isinstance(modalities, list):
        modalities = ["rgb"] if fine else list(DataConfig.model_fields["modalities"].default)
    modalities = [m for m in modalities if isinstance(m, str)]
    if fine:
        kind = raw.get("kind") if raw.get("kind") in ("segmentation", "detection") else "classification"
        channels = _value(raw, "model.head_channels" if kind == "segmentation" else "model.fpn_channels", 256)
        params = finetune_parameters(arch, img, modalities, kind, max(classes, _value(raw, "data.num_classes", 0)),
                                     channels)
    else:
        decoder = {k: max(_value(raw, f"model.decoder.{k}", f.default), 0)
                   for k, f in DecoderConfig.model_fields.items() if k in ("dim", "self_blocks", "mlp_ratio")}
        params = pretrain_parameters({**arch, "decoder": decoder}, img, modalities, semantic_classes)
    if (problem := memory_problem(params)) is not None:
        shown = ", ".join(f"{enc}{k} {arch[k]}" for k in ("embed_dim", "depth", "mlp_ratio"))
        raise ConfigError(f"{source}: the model its config describes ({shown}) {problem}. Nothing was built; use a "
                          f"machine with more memory, or check the file.")


def _check_bound(source: str, key: str, value: float, kind: str) -> None:
    limit, unit, scale = _BOUNDS[kind]
    if not value <= limit:  # NaN too
        shown = f"{limit:,}" if isinstance(limit, int) else f"{limit:g}"
        raise ConfigError(f"{source}: {key} {value} is above the {shown}{' ' + unit if unit else ''} that cfmae "
                          f"builds ({scale}); a damaged or foreign config. Nothing was built.")


def check_checkpoint_sizes(ckpt: dict[str, Any], source: str) -> None:
    """:func:`check_config_sizes` of a cfmae checkpoint's top-level dict: its ``config`` with its ``task`` and the
    class lists it stores (``semantic_classes`` of pre-training, ``classes`` of fine-tuning)."""
    config = ckpt.get("config")
    if not isinstance(config, dict):
        return
    counts = {k: len(v) if isinstance(v, (list, tuple)) else 0
              for k in ("semantic_classes", "classes") for v in [ckpt.get(k)]}
    check_config_sizes(config, source, str(ckpt.get("task", "pretrain")), counts["semantic_classes"],
                       counts["classes"])


def check_export_sizes(config: dict[str, Any], source: str) -> None:
    """The bounds and the memory check for a timm ``config.json`` (an export's): ``model_args`` (ViT keys; what
    it lacks is timm's to decide and not checked) and ``num_classes``."""
    args = config.get("model_args") if isinstance(config.get("model_args"), dict) else {}
    sizes = {"embed_dim": "width", "depth": "depth", "num_heads": "width", "mlp_ratio": "mlp_ratio",
             "patch_size": "patch", "img_size": "pixels"}
    for key, kind in sizes.items():
        _check_bound(source, f"model_args.{key}", _value(args, key, 0), kind)
    _check_bound(source, "num_classes", _value(config, "num_classes", 0), "classes")
    size = (config.get("pretrained_cfg") or {}).get("input_size") if isinstance(config.get("pretrained_cfg"),
                                                                                 dict) else None
    img = _value(args, "img_size", size[-1] if isinstance(size, list) and size and
                 isinstance(size[-1], int) else 224)
    _check_bound(source, "pretrained_cfg.input_size", img, "pixels")
    patch = _value(args, "patch_size", 16)
    if (problem := grid_problem(img, patch)) is not None:
        raise ConfigError(f"{source}: image size {img} / model_args.patch_size {patch} {problem}; a damaged or "
                          f"foreign config. Nothing was built.")
    if "embed_dim" in args and "depth" in args:
        dim, depth = max(_value(args, "embed_dim", 0), 0), max(_value(args, "depth", 0), 0)
        ratio = max(_value(args, "mlp_ratio", 4.0), 0)
        params = encoder_parameters(dim, depth, ratio, patch, img // max(patch, 1)) + \
            dim * max(_value(config, "num_classes", 0), 0)
        if (problem := memory_problem(params)) is not None:
            raise ConfigError(f"{source}: the model it describes (model_args.embed_dim {dim}, model_args.depth "
                              f"{depth}, model_args.mlp_ratio {ratio}) {problem}. Nothing was built; use a machine "
                              f"with more memory, or check the file.")


def checkpoint_claims(top: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """What a cfmae checkpoint's config says about the shapes of its tensors: name → (config key, value), for
    :func:`check_tensors_agree`."""
    config = top["config"]
    fine = top.get("task") == "finetune"
    enc = "model.encoder" if fine else "model"
    node = _node(config, enc)
    node = node if isinstance(node, dict) else {}
    fields = ("embed_dim", "patch_size", "depth", "mlp_ratio", "map_embed_dim", "map_stride", "num_instance_ids")
    claims = {k: (f"{enc}.{k}", node[k]) for k in fields if _value(node, k, None) is not None}
    if isinstance(_node(config, "data.img_size"), int):
        claims["img_size"] = ("data.img_size", config["data"]["img_size"])
    decoder = node.get("decoder") if not fine else None
    if isinstance(decoder, dict):
        claims.update({f"decoder.{k}": (f"model.decoder.{k}", decoder[k]) for k in ("dim", "self_blocks")
                       if _value(decoder, k, None) is not None})
    return claims


def export_claims(config: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """What an export's ``config.json`` says about the shapes of its tensors (``model_args``)."""
    args = config.get("model_args") if isinstance(config.get("model_args"), dict) else {}
    return {k: (f"model_args.{k}", args[k]) for k in ("embed_dim", "patch_size", "depth", "mlp_ratio", "img_size")
            if k in args}


def check_tensors_agree(source: str | Path, state: dict[str, Any], claims: dict[str, tuple[str, Any]]) -> None:
    """Refuse a file whose config says other sizes than its tensors have (edited, or put together from two runs),
    before a model is built from the config: width, patch, depth, MLP width, position grid, map adapters and
    the decoder's width and blocks, read off the shapes alone (``state`` in our key names; a detection
    model's ``backbone.`` prefix is looked through)."""
    prefix = next((p for p in ("", "backbone.") if f"{p}encoder.patch_embed.proj.weight" in state), None)
    if prefix is None:
        if "embed_dim" in claims:
            raise ConfigError(f"{source}: its config describes a ViT encoder ({claims['embed_dim'][0]} "
                              f"{claims['embed_dim'][1]}) but it holds no encoder.patch_embed.proj.weight; not a "
                              f"complete checkpoint. Nothing was built.")
        return
    view = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} if prefix else state
    found = _shapes(view)
    values = {name: value for name, (_, value) in claims.items()}
    expect: dict[str, Any] = dict(values)
    if isinstance(values.get("embed_dim"), int) and isinstance(values.get("mlp_ratio"), (int, float)):
        expect["mlp_hidden"] = int(values["embed_dim"] * values["mlp_ratio"])
    if isinstance(values.get("img_size"), int) and isinstance(values.get("patch_size"), int) and values["patch_size"]:
        expect["grid_rows"] = (values["img_size"] // values["patch_size"]) ** 2 + 1
    keys = {name: key for name, (key, _) in claims.items()}
    keys.update(mlp_hidden=keys.get("mlp_ratio"), grid_rows=keys.get("img_size"))
    for name, (value, tensor) in found.items():
        if name in expect and expect[name] != value:
            what = (f"{keys[name]} {values['mlp_ratio']} (an MLP of {expect[name]}) in the config, {value} in {tensor}"
                    if name == "mlp_hidden" else
                    f"{keys[name]} {values['img_size']} (a grid of {expect[name] - 1} patches) in the config, "
                    f"{value - 1} in {tensor}" if name == "grid_rows" else
                    f"{keys[name]} {expect[name]} in the config, {value} in {tensor}")
            raise ConfigError(f"{source}: its config does not describe its tensors ({what}); the file was edited or "
                              f"put together from two runs. Nothing was built.")


def _shapes(state: dict[str, Any]) -> dict[str, tuple[int, str]]:
    """Sizes read off the shapes of a state dict in our key names: name → (value, the tensor that shows it)."""
    out: dict[str, tuple[int, str]] = {}

    def shape(key: str, ndim: int) -> tuple[int, ...] | None:
        found = getattr(state.get(key), "shape", None)
        return tuple(found) if found is not None and len(found) == ndim else None

    def numbered(prefix: str) -> list[int]:  # the N of PREFIX.N.… keys
        return [int(part) for k in state if k.startswith(prefix) and (part := k[len(prefix):].split(".")[0]).isdigit()]

    proj = shape("encoder.patch_embed.proj.weight", 4)
    if proj is None:
        return out
    out["embed_dim"] = (proj[0], "encoder.patch_embed.proj.weight")
    out["patch_size"] = (proj[-1], "encoder.patch_embed.proj.weight")
    if blocks := numbered("encoder.blocks."):
        out["depth"] = (1 + max(blocks), f"encoder.blocks.{max(blocks)}")
    if fc1 := shape("encoder.blocks.0.mlp.fc1.weight", 2):
        out["mlp_hidden"] = (fc1[0], "encoder.blocks.0.mlp.fc1.weight")
    if pos := shape("encoder.pos_embed", 3):
        out["grid_rows"] = (pos[1], "encoder.pos_embed")
    for name, spec in table.TABLE.items():
        embed, conv = shape(f"adapters.{name}.embed.weight", 2), shape(f"adapters.{name}.proj.weight", 4)
        if spec.kind == "ids" and embed is not None and conv is not None and conv[-1]:
            out["map_embed_dim"] = (embed[1], f"adapters.{name}.embed.weight")
            out["map_stride"] = (proj[-1] // conv[-1], f"adapters.{name}.proj.weight")
            if spec.classes == "instance_ids":
                out["num_instance_ids"] = (embed[0] - 1, f"adapters.{name}.embed.weight")
    width = next((k for k in state if k == "decoder.embed.weight" or
                  (k.startswith("decoder.tasks.") and k.endswith(".proj_context.weight"))), None)
    task = next((k.split(".")[2] for k in state if k.startswith("decoder.tasks.")), None)
    if width is not None and shape(width, 2) and task is not None:
        out["decoder.dim"] = (shape(width, 2)[0], width)  # type: ignore[index]
        self_blocks = numbered(f"decoder.tasks.{task}.blocks.")
        out["decoder.self_blocks"] = (1 + max(self_blocks) if self_blocks else 0,
                                      f"decoder.tasks.{task}.blocks" + (f".{max(self_blocks)}" if self_blocks else ""))
    return out


def check_weights_file(path: str | Path) -> None:
    """The checks of a weights file that cost neither torch nor its tensors, for a command to run first: a cfmae
    checkpoint's config (or an export's ``config.json``) against the bounds and this machine's memory
    (:func:`check_config_sizes`) and against its tensors' shapes, read from the file's index
    (:func:`check_tensors_agree`). A file that cannot be looked at so (an old pickle, a foreign file, damage) is
    left to the reader, which runs the same checks before it builds anything."""
    folder = Path(path)
    if folder.is_dir() and (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if not isinstance(config, dict):
            return
        check_export_sizes(config, str(folder / "config.json"))
        shapes = safetensors_shapes(folder / "model.safetensors")
        if shapes is not None:  # timm's keys are the encoder's
            check_tensors_agree(folder / "model.safetensors", {f"encoder.{k}": v for k, v in shapes.items()},
                                export_claims(config))
        return
    file = checkpoint_path(path)
    top = peek_checkpoint(file) if file.is_file() else None
    if top is None or not isinstance(top.get("config"), dict) or "format_version" not in top:
        return
    check_checkpoint_sizes(top, str(file))
    if isinstance(top.get("model"), dict):
        check_tensors_agree(file, top["model"], checkpoint_claims(top))
