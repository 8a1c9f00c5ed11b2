"""Fine-tuning as a task of the engine: the paper's Table 8 recipe, a linear probe, or multi-granular input.

Layer-wise lr decay and weight decay come from timm's ``param_groups_layer_decay`` (the engine applies each
group's ``lr_scale``); mixup / cutmix from timm's ``Mixup`` (its parameters), ``cutmix_bbox_and_lam`` and
``mixup_target``; the loss is timm's ``SoftTargetCrossEntropy``. Every epoch ends with an evaluation on val/;
``best.pt`` follows the best top-1.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable

import torch
from timm.data.mixup import Mixup, cutmix_bbox_and_lam, mixup_target
from timm.loss import SoftTargetCrossEntropy
from timm.optim import Lars, param_groups_layer_decay
from torch import Tensor, nn

from cfmae_cli.config import config_from_dict, load_config
from cfmae_cli.errors import CfmaeError, DataError
from cfmae_cli.eval.classifier import ViTClassifier, arch_from_state, load_encoder_weights
from cfmae_cli.eval.config import AugConfig, EncoderArch, FinetuneConfig, FtOptimConfig
from cfmae_cli.eval.data import build_datasets
from cfmae_cli.eval.evaluate import evaluate, shard_loader
from cfmae_cli.model.convert import detect_format, read_file, to_cfmae, weights_and_config
from cfmae_cli.seeding import seeded
from cfmae_cli.train import distributed
from cfmae_cli.train.engine import Progress, StepContext, Task, run_task
from cfmae_cli.train.setup import dataset_root, resolve_device

log = logging.getLogger(__name__)


def finetune(cfg: FinetuneConfig, *, out: str | Path | None = None, name: str = "run",
             resume: str | Path | None = None, on_progress: Callable[[Progress], None] | None = None
             ) -> dict[str, Any]:
    """Fine-tune into a new run folder (``out`` or ``runs/finetune/<name>[-k]``), or continue ``resume``
    exactly. A new run first reads its initial weights (``model.init``) and their architecture."""
    state, source = None, str(cfg.model.init)
    if resume is None:
        cfg, state, source = initial_weights(cfg)
    if cfg.kind == "segmentation":
        from cfmae_cli.eval.segmentation import SegmentationTask as task_class
    elif cfg.kind == "detection":
        from cfmae_cli.eval.detection import DetectionTask as task_class
    else:
        task_class = FinetuneTask
    return run_task(cfg, lambda info: task_class(cfg, info, state, source), resolve_device(cfg),
                    command="finetune", out=out, name=name, resume=resume, on_progress=on_progress)


def initial_weights(cfg: FinetuneConfig) -> tuple[FinetuneConfig, dict[str, Tensor] | None, str]:
    """(the config with ``model.encoder`` and ``model.init`` filled in, encoder weights or None, their source).

    ``model.init``: a cfmae checkpoint or run folder (architecture from its config), an MAE / MultiMAE / timm
    file (architecture from the tensor shapes), 'random', or null = the newest run under runs/pretrain.
    """
    from cfmae_cli.viz.inference import newest_checkpoint

    init = cfg.model.init or str(newest_checkpoint().resolve())
    if init == "random":
        arch = cfg.model.encoder or EncoderArch.of(load_config(cfg.model.arch).model)
        state, source = None, "random"
    else:
        file, top = read_file(Path(init))
        raw, own = weights_and_config(file, top)
        stored = (top.get("config") or {}).get("model", {}).get("encoder") if top.get("task") == "finetune" else None
        fmt = detect_format(raw)
        try:
            state = to_cfmae(raw)
            if own is not None or stored:  # ours: the architecture is written down
                arch, seen = EncoderArch.of(own.model) if own is not None else EncoderArch(**stored), \
                    set(EncoderArch.model_fields)
            else:
                arch, seen = arch_from_state(state)
        except CfmaeError as exc:
            raise CfmaeError(f"{init}: {exc}") from None
        source = f"{init} ({fmt} format)"
        wanted = cfg.model.encoder
        if wanted is not None:  # what the file does not show (a foreign file's head count, …) the config decides
            arch = wanted.model_copy(update={k: getattr(arch, k) for k in seen})
        if wanted is not None and wanted != arch:
            diffs = [f"{k} {getattr(wanted, k)} in the config, {getattr(arch, k)} in the checkpoint"
                     for k in EncoderArch.model_fields if getattr(wanted, k) != getattr(arch, k)]
            raise CfmaeError(f"{init}: the checkpoint's encoder is not the one model.encoder asks for "
                             f"({'; '.join(diffs)}). Leave model.encoder unset to fine-tune the checkpoint's own "
                             f"architecture.")
    resolved = cfg.model_dump(mode="json")
    resolved["model"].update(encoder=arch.model_dump(mode="json"), init=init)
    return config_from_dict(resolved, f"fine-tuning {init}", FinetuneConfig), state, source


def layer_decay_groups(model: ViTClassifier, optim: FtOptimConfig) -> list[dict[str, Any]]:
    """timm's layer-wise decay groups over the trainable parameters: ``lr_scale`` = decay^(depth+1-layer) with
    the patch embedding, tokens and map adapters at layer 0, block i at i+1, the norms and head at depth+1
    (scale 1); no weight decay on biases, norms and tokens."""
    return param_groups_layer_decay(model, weight_decay=optim.weight_decay,
                                    no_weight_decay_list=model.no_weight_decay(), layer_decay=optim.layer_decay)


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
        other = x.flip(0)
        if box is not None:
            s = 1 if name == "rgb" else self.stride
            yl, yh, xl, xh = (v // s for v in box)
            x = x.clone()
            x[..., yl:yh, xl:xh] = other[..., yl:yh, xl:xh]
            return x
        if name == "rgb":
            return x * lam + other * (1.0 - lam)
        return x if lam >= 0.5 else other


class FinetuneTask(Task):
    command = "finetune"

    def __init__(self, cfg: FinetuneConfig, info: distributed.DistInfo, state: dict[str, Tensor] | None,
                 source: str):
        arch = self.setup(cfg, info, source)
        data = build_datasets(cfg, arch, self.root)
        self.dataset, self.val_dataset, self.classes = data["train"], data["val"], data["classes"]
        c_sem = data["num_semantic_classes"]
        if state is not None and "semantic" in cfg.data.modalities and "adapters.semantic.embed.weight" in state:
            had = state["adapters.semantic.embed.weight"].shape[0] - 1
            if had != c_sem:
                raise DataError(f"{self.root}: its manifest has {c_sem} semantic classes, the checkpoint was "
                                f"pre-trained with {had}; fine-tune on data labelled with the same classes.")
        self.modalities = list(cfg.data.modalities)
        torch.manual_seed(cfg.train.seed)  # the same initial head on every rank
        self.model = ViTClassifier(arch, cfg.data.img_size, len(self.classes), self.modalities, c_sem,
                                   cfg.model.global_pool, cfg.model.drop_path, cfg.mode == "linear",
                                   cfg.model.head_init_std, cfg.model.train_pos_embed)
        if state is not None:
            load_encoder_weights(self.model, state, source)
        self.model.to(self.device)
        self.mixer = Mixer(cfg.aug, len(self.classes), arch.map_stride)
        self.criterion = SoftTargetCrossEntropy()
        self.names = ["loss"]
        self.bf16 = self.device.type == "cuda" and cfg.train.precision in ("auto", "bf16")
        self.val_loader = shard_loader(self.val_dataset, cfg.train.batch_size, cfg.data.num_workers, info)
        self.best: dict[str, Any] = {"top1": -math.inf, "top5": -math.inf, "epoch": 0}
        self.improved = False

    def setup(self, cfg: FinetuneConfig, info: distributed.DistInfo, source: str) -> EncoderArch:
        """What every fine-tuning task starts with: config, process, threads, the data folder (rank 0's
        choice); returns the encoder's architecture."""
        self.cfg, self.info, self.device, self.source = cfg, info, info.device, source
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        assert cfg.model.encoder is not None, "initial_weights() fills model.encoder"
        self.root = Path(distributed.broadcast(str(dataset_root(cfg)) if info.is_main else None, info))
        return cfg.model.encoder

    def build_optimizer(self, lr: float, device: torch.device) -> torch.optim.Optimizer:
        o = self.cfg.optim
        groups = layer_decay_groups(self.model, o)
        if o.name == "lars":
            return Lars(groups, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas), fused=device.type == "cuda")

    def forward(self, net: nn.Module, batch: dict[str, Tensor], ctx: StepContext) -> tuple[Tensor, Tensor]:
        inputs, target = self.mixer({m: batch[m] for m in self.modalities}, batch["label"], ctx.seed)
        loss = self.criterion(net(inputs).float(), target)
        return loss, loss.detach().reshape(1)

    def end_epoch(self, done: int, summary: dict[str, Any]) -> dict[str, Any]:
        metrics, skipped = evaluate(self.model, self.val_loader, self.info, self.bf16)
        bad = sum(distributed.gather(len(skipped), self.info))
        if metrics["val_images"] == 0:
            raise DataError(f"{self.root}: no image of the val split could be read.")
        self.improved = metrics["top1"] > self.best["top1"]
        if self.improved:
            self.best = {"top1": metrics["top1"], "top5": metrics["top5"], "epoch": done}
        return {**metrics, "val_skipped": bad, "best_top1": self.best["top1"], "best_epoch": self.best["epoch"]}

    def extra_checkpoints(self, summary: dict[str, Any]) -> list[str]:
        return ["best.pt"] if self.improved else []

    def summary_line(self, summary: dict[str, Any]) -> str:
        return (f"val top-1 {summary['top1']:.2f} top-5 {summary['top5']:.2f} (best {summary['best_top1']:.2f} "
                f"at epoch {summary['best_epoch']}) ")

    def describe(self, plan: dict[str, Any]) -> list[str]:
        cfg, arch = self.cfg, self.cfg.model.encoder
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return [f"data {self.root}: {len(self.classes)} classes; {len(self.dataset)} train / "
                f"{len(self.val_dataset)} val images; input {' + '.join(self.modalities)}",
                f"model: ViT patch {arch.patch_size}, dim {arch.embed_dim}, depth {arch.depth}, {arch.num_heads} "
                f"heads; {cfg.model.global_pool} pooling; {cfg.mode} ({trainable:,} trainable parameters); "
                f"initial weights: {self.source}",
                f"{self.recipe()}, mixup {cfg.aug.mixup}, cutmix {cfg.aug.cutmix}, label smoothing "
                f"{cfg.aug.label_smoothing}, "
                + (f"RandAugment {cfg.aug.auto_augment}, random erasing {cfg.aug.reprob}" if self.modalities == ["rgb"]
                   else "joint crop + flip of image and maps (no RandAugment, no erasing)")]

    def recipe(self) -> str:
        """The optimizer line of :meth:`describe`, shared by the three kinds of fine-tuning."""
        o = self.cfg.optim
        return (f"recipe: {o.name}, {o.schedule} schedule, layer decay {o.layer_decay}, weight decay "
                f"{o.weight_decay}, drop path {self.cfg.model.drop_path}")

    def state_dict(self) -> dict[str, Any]:
        return {"task": "finetune", "kind": self.cfg.kind, "classes": self.classes, "best": self.best,
                "init": self.source}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.best = dict(ckpt.get("best", self.best))
