"""Classifiers to evaluate: a ``cfmae finetune`` checkpoint, an exported timm folder, or a timm model name with
weights (for baselines), each local or on the hub (``hf-hub:owner/name[@revision]``) — each with the
preprocessing it was trained for."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image
from timm.data import create_transform
from torch import Tensor, nn
from torchvision.transforms import v2

from cfmae_cli import modalities as table
from cfmae_cli.errors import CfmaeError
from cfmae_cli.eval.classifier import load_classifier
from cfmae_cli.hub import is_hub, local_weights, named_by_spec
from cfmae_cli.model.weights import read_state, timm_model

Interp = {"bicubic": v2.InterpolationMode.BICUBIC, "bilinear": v2.InterpolationMode.BILINEAR}


@dataclass
class EvalModel:
    module: nn.Module
    forward: Callable[[Tensor], Tensor]  # (B, 3, S, S) normalised → (B, classes) logits
    img_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: str
    classes: list[str] | None = None  # class names in logit order, when the file says
    num_classes: int | None = None  # outputs of the head, when known before a forward

    def resize_transform(self) -> Callable[[Image.Image], Tensor]:
        """Resize the short side to img_size / crop_pct, centre crop img_size, normalise (timm's eval transform)."""
        return create_transform(self.img_size, is_training=False, crop_pct=self.crop_pct,
                                interpolation=self.interpolation, mean=self.mean, std=self.std)

    def as_is_transform(self) -> Callable[[Image.Image], Tensor]:
        """Normalise only; an image of another size than img_size is resized to it (ImageNet-C is 224 x 224)."""
        size = self.img_size
        norm = v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)])
        resize = v2.Resize((size, size), interpolation=Interp.get(self.interpolation, Interp["bicubic"]),
                           antialias=True)
        return lambda im: norm(im if im.size == (size, size) else resize(im))

    def describe_preprocessing(self) -> str:
        return (f"resize {math.floor(self.img_size / self.crop_pct)} ({self.interpolation}), centre crop {self.img_size}, "
                f"mean {tuple(round(m, 3) for m in self.mean)}, std {tuple(round(s, 3) for s in self.std)}; "
                f"ImageNet-C as is ({self.img_size} x {self.img_size})")


def load_eval_model(checkpoint: str | None, model_name: str | None, device: torch.device) -> EvalModel:
    """The classifier of ``--checkpoint`` (a ``cfmae finetune`` checkpoint or run folder, an exported timm folder,
    or either on the hub as ``hf-hub:owner/name[@revision]``) or of ``--model`` (a timm name with ``--checkpoint``
    its weights, or ``hf-hub:owner/name[@revision]``: a repository in timm's hub format, read from the hub cache
    as ``timm.create_model('hf-hub:…', pretrained=True)`` reads it, through the same checks as a local folder)."""
    if model_name is not None and is_hub(model_name):
        if checkpoint is not None:
            raise CfmaeError(f"--model {model_name}: a hub repository brings its own weights; give no --checkpoint.")
        return _hub_folder(model_name, device)
    if model_name is not None:
        return _timm_by_name(model_name, checkpoint, device)
    if checkpoint is None:
        raise CfmaeError("--checkpoint: give a fine-tuned checkpoint or run folder, an exported timm folder, or "
                         "--model NAME with --checkpoint WEIGHTS.")
    if is_hub(checkpoint):
        return _hub_folder(checkpoint, device) if local_weights(checkpoint).is_dir() else _ours(checkpoint, device)
    path = Path(checkpoint)
    if path.is_dir() and (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return _timm_folder(path, device)
    return _ours(path, device)


def _hub_folder(spec: str, device: torch.device) -> EvalModel:
    """A hub repository in timm's format (its snapshot folder in the hub cache), named by its spec."""
    folder = local_weights(spec)
    if not folder.is_dir():
        raise CfmaeError(f"--model {spec}: the repository holds a weights file but no config.json to name the "
                         f"architecture; give the timm name as --model and {spec} as --checkpoint.")
    with named_by_spec(spec, folder):
        return _timm_folder(folder, device, spec)


def _ours(path: str | Path, device: torch.device) -> EvalModel:
    model, cfg, classes = load_classifier(path, device)
    if table.maps_of(cfg.data.modalities):
        raise CfmaeError(f"{path}: this classifier reads {' + '.join(cfg.data.modalities)}; the ImageNet variants "
                         f"have no instance or semantic maps. Evaluate a classifier fine-tuned on RGB.")
    d = cfg.data
    return EvalModel(model, lambda x: model({"rgb": x}), d.img_size, d.crop_pct, d.interpolation, tuple(d.mean),
                     tuple(d.std), f"cfmae classifier {path} ({cfg.mode}, {len(classes)} classes)", classes,
                     len(classes))


def _from_timm(module: nn.Module, description: str, classes: list[str] | None, device: torch.device) -> EvalModel:
    pc: dict[str, Any] = dict(getattr(module, "pretrained_cfg", {}) or {})
    size = int(pc.get("input_size", (3, 224, 224))[-1])
    module = module.to(device).eval()
    return EvalModel(module, module, size, float(pc.get("crop_pct", 0.875)), str(pc.get("interpolation", "bicubic")),
                     tuple(pc.get("mean", (0.485, 0.456, 0.406))), tuple(pc.get("std", (0.229, 0.224, 0.225))),
                     description, classes, getattr(module, "num_classes", None))


def _timm_folder(path: Path, device: torch.device, name: str | None = None) -> EvalModel:
    """An exported or timm hub-format folder; ``name``: what the user called it (a hub spec), for the messages."""
    _, state, config, _ = read_state(path)  # its config.json's sizes checked before timm builds it
    classes = config.get("num_classes", 0)
    if not isinstance(classes, int) or classes == 0:
        raise CfmaeError(f"{path}: an exported encoder without a classifier head; fine-tune it (`cfmae finetune`) "
                         f"and export the fine-tuned checkpoint.")
    if not isinstance(config.get("architecture"), str) or not isinstance(config.get("model_args", {}), dict):
        raise CfmaeError(f"{path / 'config.json'}: names no timm architecture ('architecture', 'model_args'); not a "
                         f"folder written by `cfmae export` or timm.")
    module = timm_model(config["architecture"], str(path), state, num_classes=classes,
                        pretrained_cfg_overlay={**config.get("pretrained_cfg", {}), "num_classes": classes},
                        **config.get("model_args", {}))
    return _from_timm(module, f"timm {'hub repository' if name else 'folder'} {name or path} "
                      f"({config['architecture']}, {classes} classes)",
                      config.get("label_names"), device)


def _timm_by_name(name: str, weights: str | None, device: torch.device) -> EvalModel:
    if weights is None or not local_weights(weights).is_file():
        raise CfmaeError(f"--model {name}: give its weights with --checkpoint: a local file, or hf-hub:owner/name "
                         f"of a repository holding one (a timm name alone is not downloaded).")
    file, state, _, _ = read_state(weights)
    shown = weights if is_hub(weights) else file
    module = timm_model(name, f"--model {name} --checkpoint {shown}", state)
    return _from_timm(module, f"timm {name} with {weights}", None, device)
