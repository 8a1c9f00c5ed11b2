"""The encoders that ``cfmae attention-map --stats`` measures side by side (:mod:`cfmae_cli.viz.attention_stats`):
ours (any weights our encoder reads), a random initialisation of the same architecture, timm's ViTs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, cast

import torch
from timm.layers import PatchEmbed
from torch import Tensor, nn

from cfmae_cli.config import Config, EncoderArch, load_config
from cfmae_cli.errors import CfmaeError
from cfmae_cli.model import CFMAE
from cfmae_cli.model.encoder import ViTEncoder, build_encoder
from cfmae_cli.model.layers import init_weights
from cfmae_cli.model.weights import load_weights, read_state, read_weights, timm_model

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Subject:
    """One encoder to measure: ``run(images)`` (normalised (B, 3, S, S)) runs its ``blocks``; the patch tokens
    follow ``prefix`` tokens, the global token first."""

    name: str
    description: str
    blocks: nn.Sequential | nn.ModuleList
    run: Callable[[Tensor], Any]
    img_size: int
    patch_size: int
    prefix: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


def ours(spec: str | Path, device: torch.device, name: str | None = None) -> tuple[Subject, dict[str, Any]]:
    """A cfmae checkpoint or run folder (pre-training or fine-tuning), an MAE / MultiMAE / timm file or an exported
    folder — read by the one door for weights into our encoder. Returns the subject and what ``random`` copies
    (the architecture, input size, normalisation, and a pre-training config when there is one)."""
    w = read_weights(spec)
    arch, _ = w.encoder_arch()
    config = w.top.get("config")
    stored: dict[str, Any] = config if isinstance(config, dict) else {}
    data = stored.get("data", {}) if w.format.startswith("cfmae") else {}
    pretrained = (w.top.get("pretrained_cfg") or {}) if w.format == "exported" else {}
    pos = w.state.get("encoder.pos_embed")
    side = math.isqrt(pos.shape[1] - 1) * arch.patch_size if pos is not None and pos.ndim == 3 else 224
    img_size = int(data.get("img_size", (pretrained.get("input_size") or (3, side, side))[-1]))
    mean = tuple(data.get("mean", pretrained.get("mean", IMAGENET_MEAN)))
    std = tuple(data.get("std", pretrained.get("std", IMAGENET_STD)))
    holder = nn.Module()
    holder.encoder = encoder = build_encoder(arch, img_size)
    load_weights(holder, w.state, w.source, only=("encoder.",), strict=True, fix="not a ViT encoder of this shape")
    template = {"arch": arch, "img_size": img_size, "mean": mean, "std": std, "config": w.pretrain_config(),
                "classes": len(w.top.get("semantic_classes", []))}
    return _our_subject(name or label_of(spec), w.source, encoder, device, mean, std), template


def random_init(template: dict[str, Any], device: torch.device, seed: int) -> Subject:
    """A randomly initialised encoder of ``template``'s architecture: for a pre-training checkpoint, exactly the
    encoder its run started from with ``train.seed = seed`` (the k-NN monitor's epoch 0)."""

    torch.manual_seed(seed)
    cfg: Config | None = template.get("config")
    if cfg is not None:
        encoder = CFMAE.from_config(cfg, template["classes"]).encoder
    else:
        encoder = build_encoder(template["arch"], template["img_size"])
        init_weights(encoder)
        nn.init.normal_(encoder.cls_token, std=0.02)
    return _our_subject("random", f"random initialisation (seed {seed}) of the same architecture", encoder, device,
                        template["mean"], template["std"])


def demo_template(semantic_classes: int) -> dict[str, Any]:
    """``random`` with no checkpoint to copy: the demo preset's model for data of ``semantic_classes`` classes."""

    cfg = load_config("demo")
    return {"arch": EncoderArch.of(cfg.model), "img_size": cfg.data.img_size, "mean": tuple(cfg.data.mean),
            "std": tuple(cfg.data.std), "config": cfg, "classes": semantic_classes}


def _our_subject(name: str, description: str, encoder: ViTEncoder, device: torch.device, mean: tuple[float, ...],
                 std: tuple[float, ...]) -> Subject:
    encoder = encoder.to(device).eval()
    patch = int(encoder.patch_embed.patch_size[0])
    return Subject(name, description, encoder.blocks, encoder.forward_image, encoder.grid * patch, patch, 1,
                   tuple(mean), tuple(std))


def timm_subject(model: str, weights: Path, device: torch.device) -> Subject:
    """timm's ``model`` with the state dict of ``weights`` (a local file; nothing is downloaded). An exported
    folder (``model.safetensors`` + ``config.json``, timm's hub format, as ``cfmae export`` writes it), or its
    ``model.safetensors``, brings its ``config.json``: the ``model_args`` (the exact shape) and the
    ``pretrained_cfg`` (input size, mean, std) of its ``architecture``, which must be ``model``."""
    weights = Path(weights)
    folder = weights if weights.is_dir() else weights.parent
    exported = (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() and \
        (weights.is_dir() or weights.name == "model.safetensors")
    if not exported and not weights.is_file():
        raise CfmaeError(f"--weights {weights}: file not found (give --model NAME a local weights file, or an "
                         f"exported folder).")
    file, state, config, _ = read_state(folder if exported else weights)
    kwargs: dict[str, Any] = {}
    if exported and "architecture" in config:
        if config["architecture"] != model:
            raise CfmaeError(f"--model {model} --weights {weights}: {folder / 'config.json'} describes timm's "
                             f"{config['architecture']}; give --model {config['architecture']}.")
        kwargs = {**config.get("model_args", {}),
                  "pretrained_cfg_overlay": {**config.get("pretrained_cfg", {}), "num_classes": 0}}
    module = timm_model(model, f"--model {model} --weights {file}", state, extra_ok=True, **{**kwargs,
                                                                                             "num_classes": 0})
    if getattr(module, "cls_token", None) is None or not hasattr(module, "blocks"):
        raise CfmaeError(f"--model {model}: not a ViT with a global (class) token; the statistics read its "
                         f"attention.")
    pc: dict[str, Any] = dict(getattr(module, "pretrained_cfg", {}) or {})
    size = int(pc.get("input_size", (3, 224, 224))[-1])
    patch = int(cast(PatchEmbed, module.patch_embed).patch_size[0])
    module = module.to(device).eval()
    shape = " and its config.json" if kwargs else ""
    blocks = cast("nn.Sequential | nn.ModuleList", module.blocks)  # timm's ViTs keep their blocks in one of these
    run = cast(Callable[[Tensor], Any], module.forward_features)
    return Subject(model, f"timm {model} with {file}{shape}", blocks, run, size, patch,
                   int(getattr(module, "num_prefix_tokens", 1)), tuple(pc.get("mean", IMAGENET_MEAN)),
                   tuple(pc.get("std", IMAGENET_STD)))


def label_of(spec: str | Path) -> str:
    """A short column name: the run folder's name (``run/checkpoints/last.pt`` → ``run``, other files of a run
    ``run/epoch-0010``), else the file's stem."""
    path = Path(spec)
    if path.is_dir():
        return path.name
    if path.parent.name == "checkpoints":
        run = path.parent.parent.name
        return run if path.stem == "last" else f"{run}/{path.stem}"
    return path.stem


def subjects(checkpoints: list[str], models: list[str], weights: list[Path], classes: int | None,
             device: torch.device, seed: int) -> list[Subject]:
    """The columns of ``attention-map --stats``, in order: each of ``checkpoints`` (``random``: a random
    initialisation of the first checkpoint's architecture, else of the demo preset's model for ``classes``),
    then each timm model of ``models`` with its ``weights``; a repeated name becomes ``name (2)``, …"""
    found: list[Subject | None] = []
    template = None
    for spec in checkpoints:
        if spec == "random":
            found.append(None)
            continue
        subject, copied = ours(spec, device)
        template = template or copied
        found.append(subject)
    template = template or demo_template(classes or 0)
    out = [s or random_init(template, device, seed) for s in found]
    out += [timm_subject(name, file, device) for name, file in zip(models, weights)]
    names: list[str] = []
    for subject in out:  # unique column names
        base, k = subject.name, 2
        while subject.name in names:
            subject.name, k = f"{base} ({k})", k + 1
        names.append(subject.name)
    return out
