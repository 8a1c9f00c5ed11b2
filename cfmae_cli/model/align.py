"""Feature alignment to a frozen teacher (``model.align``; the paper's future work, docs/modalities.md).

A teacher from timm (a model name with a weights file, or a folder written by ``cfmae export``; either of them
local or on the hub as ``hf-hub:owner/name[@revision]``) sees the RGB image, unmasked; its patch features are
resized to our grid of patches. A small projection of our features
(the first decoder stage's F¹, or the encoder's tokens averaged per patch position) is trained to match them:
L_F = mean over the chosen patches of 1 − cos(P(f), t), or of smooth L1 to the teacher's features normalised
per patch. The total loss gains λ_F · L_F. The teacher is not part of the model: it has no gradient, is not
saved in checkpoints, and runs under ``no_grad`` (in bf16 on a GPU).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cfmae_cli.config import AlignConfig
from cfmae_cli.errors import CfmaeError
from cfmae_cli.hub import is_hub, local_weights
from cfmae_cli.model.losses import _masked_mean
from cfmae_cli.model.weights import read_state, timm_model

#: timm's default normalisation, for a teacher whose pretrained_cfg does not say.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Teacher:
    """The frozen teacher of ``cfg`` on ``device``: ``teacher(rgb, grid)`` → (B, grid², C) features.

    ``rgb`` is the model's input (normalised with the data's ``mean`` / ``std``); it is brought to the teacher's
    own normalisation (one affine map, made once) and input size (bicubic) first. Token outputs (ViTs) lose
    their prefix tokens and are laid out on their square grid; feature maps (ConvNets) are used as they are;
    both are resized to ``grid`` × ``grid`` (bilinear, antialiased when shrinking)."""

    def __init__(self, cfg: AlignConfig, device: torch.device, bf16: bool = False,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        self.cfg, self.device, self.bf16 = cfg, torch.device(device), bool(bf16)
        self.module, self.description = build_teacher(cfg)
        pc: dict[str, Any] = dict(getattr(self.module, "pretrained_cfg", {}) or {})
        self.size = int(cfg.img_size or pc.get("input_size", (3, 224, 224))[-1])
        embed = getattr(self.module, "patch_embed", None)
        own = getattr(embed, "img_size", None)
        if own is not None and tuple(own) != (self.size, self.size):  # a ViT built for another input size
            self.module, self.description = build_teacher(cfg, img_size=self.size)
        own_mean, own_std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in
                             (pc.get("mean", IMAGENET_MEAN), pc.get("std", IMAGENET_STD)))
        data_mean, data_std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in (mean, std))
        # x_teacher = (x · data_std + data_mean − own_mean) / own_std = x · scale + shift
        self.scale = (data_std / own_std).float().to(self.device)
        self.shift = ((data_mean - own_mean) / own_std).float().to(self.device)
        self.module = self.module.to(self.device).eval().requires_grad_(False)
        self.prefix = int(getattr(self.module, "num_prefix_tokens", 0) or 0)
        self.channels_last = getattr(self.module, "output_fmt", "NCHW") == "NHWC"
        probe = self.features(torch.zeros(1, 3, self.size, self.size, device=self.device))
        self.dim, self.side = int(probe.shape[1]), int(probe.shape[-1])

    def features(self, x: Tensor) -> Tensor:
        """The teacher's (B, C, h, w) feature map of an image in its own normalisation and size."""
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = cast(Any, self.module).forward_features(x)  # a timm model (or our encoder)
        if isinstance(out, (list, tuple)):
            out = out[-1]
        if out.ndim == 3:  # tokens (B, T, C)
            tokens = out[:, self.prefix:]
            side = math.isqrt(tokens.shape[1])
            if side * side != tokens.shape[1]:
                raise CfmaeError(f"model.align.teacher {self.cfg.teacher}: {tokens.shape[1]} patch tokens after "
                                 f"{self.prefix} prefix token(s) are not a square grid; use a ViT or a ConvNet")
            return tokens.transpose(1, 2).reshape(out.shape[0], out.shape[2], side, side)
        if out.ndim == 4:
            return out.permute(0, 3, 1, 2) if self.channels_last else out
        raise CfmaeError(f"model.align.teacher {self.cfg.teacher}: forward_features gives a {out.ndim}-D output; "
                         f"use a ViT (tokens) or a ConvNet (a feature map)")

    def __call__(self, rgb: Tensor, grid: int) -> Tensor:
        with torch.no_grad():
            x = rgb.float() * self.scale + self.shift
            if x.shape[-1] != self.size or x.shape[-2] != self.size:
                x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False,
                                  antialias=x.shape[-1] > self.size)
            feats = self.features(x).float()
            if feats.shape[-1] != grid or feats.shape[-2] != grid:
                feats = F.interpolate(feats, size=(grid, grid), mode="bilinear", align_corners=False,
                                      antialias=feats.shape[-1] > grid)
            return feats.flatten(2).transpose(1, 2).contiguous()

    def describe(self) -> str:
        return (f"alignment: teacher {self.description}, input {self.size} px, {self.side}x{self.side} features of "
                f"width {self.dim} resized to our grid; {self.cfg.stage} features, {self.cfg.loss} loss on "
                f"{self.cfg.patches} patches, weight {self.cfg.weight:g}")


def build_teacher(cfg: AlignConfig, **kwargs: Any) -> tuple[nn.Module, str]:
    """The teacher's timm module and a description; clear errors (exit 2) for a name timm does not know, a
    missing file, or weights of another model."""

    spec = str(cfg.teacher)
    hub = is_hub(spec)
    folder = local_weights(spec) if hub else Path(spec).expanduser()  # a hub spec: its copy in the hub cache
    if hub and not folder.is_dir():
        raise CfmaeError(f"model.align.teacher {spec}: the repository holds a weights file but no config.json to "
                         f"name the architecture; give the timm name as model.align.teacher and {spec} as "
                         f"model.align.weights")
    if folder.is_dir():
        if not ((folder / "config.json").is_file() and (folder / "model.safetensors").is_file()):
            raise CfmaeError(f"model.align.teacher {spec}: a folder, but not an export (config.json + "
                             f"model.safetensors, as `cfmae export` or timm's hub format write)")
        named = spec if hub else folder
        _, state, config, _ = read_state(named)
        if "architecture" not in config:
            raise CfmaeError(f"{named}: its config.json names no 'architecture' (the timm name of the model)")
        overlay = {**config.get("pretrained_cfg", {}), "num_classes": 0}
        module = timm_model(config["architecture"], f"model.align.teacher {named}", state, extra_ok=True,
                            num_classes=0, pretrained_cfg_overlay=overlay, **{**config.get("model_args", {}),
                                                                              **kwargs})
        return module, f"{config['architecture']} from {named}"
    if cfg.weights is None:
        raise CfmaeError(f"model.align.teacher {spec}: give its local weights file with model.align.weights (or "
                         f"hf-hub:owner/name of a repository holding one), or an exported folder (local or "
                         f"hf-hub:owner/name) as the teacher")
    weights: str | Path = cfg.weights if is_hub(cfg.weights) else Path(cfg.weights).expanduser()
    if not local_weights(weights).is_file():
        raise CfmaeError(f"model.align.weights {cfg.weights}: file not found")
    file, state, _, _ = read_state(weights)
    shown = cfg.weights if is_hub(cfg.weights) else file
    module = timm_model(spec, f"model.align.teacher {spec} with weights {shown}", state, extra_ok=True,
                        num_classes=0, **kwargs)
    return module, f"timm {spec} with {shown}"


class AlignHead(nn.Module):
    """The projection P: LayerNorm → Linear → GELU → Linear, from our width to the teacher's."""

    def __init__(self, dim: int, teacher_dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or teacher_dim
        self.net = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, teacher_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def pooled_encoder_tokens(encoded: Tensor, ids_keep: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The encoder's visible tokens (B, 1+V, D) averaged per patch position over the modalities seen there:
    (B, n, D), and (B, n) bool, True where at least one modality is visible."""
    x = encoded[:, 1:].float()
    pos = ids_keep % n
    total = x.new_zeros(x.shape[0], n, x.shape[2]).scatter_add_(1, pos.unsqueeze(-1).expand_as(x), x)
    count = x.new_zeros(x.shape[0], n).scatter_add_(1, pos, torch.ones_like(pos, dtype=x.dtype))
    return total / count.clamp_min(1).unsqueeze(-1), count > 0


def align_loss(pred: Tensor, target: Tensor, select: Tensor | None, kind: str) -> Tensor:
    """L_F of (B, N, C) projections and teacher features over the patches ``select`` (B, N) bool (None: all):
    ``cosine`` 1 − cos; ``smooth_l1`` smooth L1 (β 1) to the teacher's features normalised per patch."""
    pred, target = pred.float(), target.float()
    if kind == "cosine":
        per = 1 - F.cosine_similarity(pred, target, dim=-1, eps=1e-6)
    else:
        normed = F.layer_norm(target, target.shape[-1:], eps=1e-6)
        per = F.smooth_l1_loss(pred, normed, reduction="none", beta=1.0).mean(-1)
    return per.mean() if select is None else _masked_mean(per, select.float())
