"""Checkpoint conversion in one place: ours ↔ timm ``VisionTransformer``, and MAE / MultiMAE → ours.

* ours → timm: the encoder's keys without the ``encoder.`` prefix (the layout is timm's already).
* MAE (facebookresearch/mae, ``{'model': …}``): ``cls_token``, ``pos_embed``, ``patch_embed.*``, ``blocks.*``,
  ``norm.*`` are the encoder; ``decoder_*`` and ``mask_token`` are dropped.
* MultiMAE (EPFL-VILAB): ``encoder.{i}.*`` are the blocks, ``input_adapters.rgb.proj.*`` the patch
  embedding, ``global_tokens[:, :1]`` the global token; it has no final encoder norm (left at its init).
  ``input_adapters.rgb.pos_emb`` (1, D, h, w) becomes ``pos_embed`` (1, 1 + h·w, D) with a zero global-token
  row: MultiMAE's table is kept as it is, since its sin-cos halves are in the other order than ours (row
  first, then column) and its blocks were trained with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cfmae_cli import modalities as table
from cfmae_cli.config import Config
from cfmae_cli.errors import CfmaeError
from cfmae_cli.model.encoder import timm_name


def detect_format(state: dict[str, Tensor], source: str | Path | None = None) -> str:
    """'cfmae', 'timm', 'mae' or 'multimae' from the key names; ``source`` names the file in the error."""
    keys = set(state)
    if any(k.startswith("encoder.blocks.") for k in keys):
        return "cfmae"
    if "global_tokens" in keys or any(k.startswith("input_adapters.") for k in keys):
        return "multimae"
    if any(k.startswith("blocks.") for k in keys):
        return "mae" if any(k.startswith("decoder") for k in keys) or "mask_token" in keys else "timm"
    where = f"{source}: " if source is not None else ""
    raise CfmaeError(f"{where}unknown checkpoint layout (keys such as {sorted(keys)[:3]}); expected a cfmae, timm, "
                     f"MAE or MultiMAE ViT.")


def to_cfmae(state: dict[str, Tensor], source: str | Path | None = None) -> dict[str, Tensor]:
    """Encoder weights of any supported layout under our key names (``encoder.*``; map adapters etc. kept)."""
    fmt = detect_format(state, source)
    if fmt == "cfmae":
        return dict(state)
    if fmt in ("mae", "timm"):
        keep = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
        return {f"encoder.{k}": v for k, v in state.items() if k.startswith(keep)}
    out = {}
    for key, value in state.items():
        if key.startswith("encoder."):
            out["encoder.blocks." + key.removeprefix("encoder.")] = value
        elif key.startswith("input_adapters.rgb.proj."):
            out["encoder.patch_embed.proj." + key.removeprefix("input_adapters.rgb.proj.")] = value
        elif key == "input_adapters.rgb.pos_emb":
            out["encoder.pos_embed"] = multimae_pos_table(value)
        elif key == "global_tokens":
            out["encoder.cls_token"] = value[:, :1]
    return out


def multimae_pos_table(pos_emb: Tensor) -> Tensor:
    """MultiMAE's (1, D, h, w) position table as ours: (1, 1 + h·w, D), patches in row-major order (as MultiMAE
    flattens its patch grid), a zero row first for the global token (MultiMAE adds none to its global tokens)."""
    if pos_emb.ndim != 4 or pos_emb.shape[0] != 1:
        raise CfmaeError(f"input_adapters.rgb.pos_emb: expected MultiMAE's (1, D, h, w), got {tuple(pos_emb.shape)}")
    patches = pos_emb.flatten(2).transpose(1, 2)
    return torch.cat([patches.new_zeros(1, 1, patches.shape[2]), patches], dim=1)


def to_timm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm ``VisionTransformer`` weights (no head) from any supported layout."""
    return {k.removeprefix("encoder."): v.contiguous() for k, v in to_cfmae(state).items() if k.startswith("encoder.")}


def timm_model_args(cfg: Config) -> dict[str, Any]:
    m = cfg.model
    return {"img_size": cfg.data.img_size, "patch_size": m.patch_size, "embed_dim": m.embed_dim, "depth": m.depth,
            "num_heads": m.num_heads, "mlp_ratio": m.mlp_ratio}


def timm_config(cfg: Config, source: str) -> dict[str, Any]:
    """``config.json`` of an exported encoder, in timm's hub format."""
    args = timm_model_args(cfg)
    name = timm_name(args["patch_size"], args["embed_dim"], args["depth"], args["num_heads"], args["img_size"])
    return {"architecture": name, "num_classes": 0, "num_features": cfg.model.embed_dim,
            "global_pool": "token", "model_args": args,
            "pretrained_cfg": {"input_size": [3, cfg.data.img_size, cfg.data.img_size], "interpolation": "bicubic",
                               "mean": list(cfg.data.mean), "std": list(cfg.data.std), "num_classes": 0,
                               "first_conv": "patch_embed.proj", "classifier": "head", "crop_pct": 0.875},
            "cfmae": {"source": source, "modalities": list(cfg.data.modalities)}}


def timm_classifier(cfg: dict[str, Any], state: dict[str, Tensor], classes: list[str], path: Path
                    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A ``cfmae finetune`` classifier (its stored config, weights and class names) as a timm
    ``VisionTransformer`` with its head: (weights, config.json).

    Average pooling maps to timm's ``global_pool='avg'`` (``fc_norm``, no final ``norm``), the global token to
    ``'token'``. A linear probe's BatchNorm (no affine parameters) is folded into the linear layer.
    """
    if cfg.get("kind", "classification") != "classification":
        raise CfmaeError(f"{path}: a {cfg['kind']} model; timm's VisionTransformer holds classifiers. Export the "
                         f"encoder of its pre-training checkpoint instead.")
    if table.maps_of(cfg["data"]["modalities"]):
        raise CfmaeError(f"{path}: this classifier reads {' + '.join(cfg['data']['modalities'])}; timm's "
                         f"VisionTransformer takes RGB only. Export its pre-training checkpoint's encoder instead.")
    enc, pool = cfg["model"]["encoder"], cfg["model"]["global_pool"]
    weights = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    weights.update({k: v for k, v in state.items() if k.startswith("fc_norm.")})
    if "head.weight" in state:
        weights.update({"head.weight": state["head.weight"], "head.bias": state["head.bias"]})
    else:  # linear probe: head = BatchNorm1d(affine=False, eps=1e-6) then Linear
        inv = (state["head.0.running_var"].double() + 1e-6).rsqrt()
        w, b = state["head.1.weight"].double(), state["head.1.bias"].double()
        weights["head.weight"] = (w * inv).float()
        weights["head.bias"] = (b - (w * inv) @ state["head.0.running_mean"].double()).float()
    weights = {k: v.contiguous() for k, v in weights.items()}
    size, labels, classes = cfg["data"]["img_size"], list(classes), len(classes)
    args = {"img_size": size, "patch_size": enc["patch_size"], "embed_dim": enc["embed_dim"], "depth": enc["depth"],
            "num_heads": enc["num_heads"], "mlp_ratio": enc["mlp_ratio"], "global_pool": pool}
    name = timm_name(enc["patch_size"], enc["embed_dim"], enc["depth"], enc["num_heads"], size)
    config = {"architecture": name, "num_classes": classes, "num_features": enc["embed_dim"],
              "global_pool": pool, "model_args": args, "label_names": labels,
              "pretrained_cfg": {"input_size": [3, size, size], "interpolation": cfg["data"]["interpolation"],
                                 "mean": list(cfg["data"]["mean"]), "std": list(cfg["data"]["std"]),
                                 "num_classes": classes, "first_conv": "patch_embed.proj", "classifier": "head",
                                 "crop_pct": cfg["data"]["crop_pct"]},
            "cfmae": {"source": str(path), "task": "finetune", "mode": cfg["mode"], "init": cfg["model"]["init"]}}
    return weights, config
