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

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cfmae_cli.config import Config
from cfmae_cli.errors import CfmaeError
from cfmae_cli.model.layers import fit_pos_embed

log = logging.getLogger(__name__)


def detect_format(state: dict[str, Tensor]) -> str:
    """'cfmae', 'timm', 'mae' or 'multimae' from the key names."""
    keys = set(state)
    if any(k.startswith("encoder.blocks.") for k in keys):
        return "cfmae"
    if "global_tokens" in keys or any(k.startswith("input_adapters.") for k in keys):
        return "multimae"
    if any(k.startswith("blocks.") for k in keys):
        return "mae" if any(k.startswith("decoder") for k in keys) or "mask_token" in keys else "timm"
    raise CfmaeError(f"unknown checkpoint layout (keys such as {sorted(keys)[:3]}); expected a cfmae, timm, MAE or "
                     f"MultiMAE ViT.")


def to_cfmae(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Encoder weights of any supported layout under our key names (``encoder.*``; map adapters etc. kept)."""
    fmt = detect_format(state)
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


def fit_position_table(table: Tensor, own: Tensor, source: str | Path) -> Tensor:
    """A checkpoint's position table resized to a model's grid (``own``, (1, 1 + N, D)); the resize is
    logged. A table of another width is returned as it is, for the shape check that names it."""
    if table.shape == own.shape or table.ndim != 3 or table.shape[-1] != own.shape[-1]:
        return table
    grid = math.isqrt(own.shape[1] - 1)
    try:
        fitted = fit_pos_embed(table, grid)
    except ValueError as exc:
        raise CfmaeError(f"{source}: encoder.pos_embed of shape {tuple(table.shape)}: {exc}") from None
    log.info("%s: position table of %d rows resized to the %dx%d grid (bicubic)", source, table.shape[1], grid, grid)
    return fitted


def to_timm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm ``VisionTransformer`` weights (no head) from any supported layout."""
    return {k.removeprefix("encoder."): v.contiguous() for k, v in to_cfmae(state).items() if k.startswith("encoder.")}


def timm_model_args(cfg: Config) -> dict[str, Any]:
    m = cfg.model
    return {"img_size": cfg.data.img_size, "patch_size": m.patch_size, "embed_dim": m.embed_dim, "depth": m.depth,
            "num_heads": m.num_heads, "mlp_ratio": m.mlp_ratio}


def timm_config(cfg: Config, source: str) -> dict[str, Any]:
    """``config.json`` of an exported encoder, in timm's hub format."""
    return {"architecture": "vit_base_patch16_224", "num_classes": 0, "num_features": cfg.model.embed_dim,
            "global_pool": "token", "model_args": timm_model_args(cfg),
            "pretrained_cfg": {"input_size": [3, cfg.data.img_size, cfg.data.img_size], "interpolation": "bicubic",
                               "mean": list(cfg.data.mean), "std": list(cfg.data.std), "num_classes": 0,
                               "first_conv": "patch_embed.proj", "classifier": "head", "crop_pct": 0.875},
            "cfmae": {"source": source, "modalities": list(cfg.data.modalities)}}


def read_file(path: Path) -> tuple[Path, dict[str, Any]]:
    """(the file, its top-level dict) of a checkpoint, a run folder or a state-dict file; clear errors."""
    from cfmae_cli.checkpoints import checkpoint_path

    path = checkpoint_path(path)
    if not path.is_file():
        raise CfmaeError(f"{path}: checkpoint not found.")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling failures of any kind
        raise CfmaeError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
                         f"Files holding Python objects besides tensors are refused; re-save the state dict with "
                         f"torch.save(ckpt['model'], 'weights.pt').") from None
    if not isinstance(raw, dict):
        raise CfmaeError(f"{path}: not a checkpoint (a {type(raw).__name__}, not a dict of tensors).")
    return path, raw


def load_any(path: Path) -> tuple[dict[str, Tensor], Config | None]:
    """Weights (and our pre-training config when there is one) from a cfmae checkpoint, a run folder, or an MAE
    / MultiMAE / timm state-dict file; clear errors for everything else."""
    return weights_and_config(*read_file(path))


def weights_and_config(path: Path, raw: dict[str, Any]) -> tuple[dict[str, Tensor], Config | None]:
    """The state dict of a file's top-level dict (``read_file``), and our pre-training config when it has one."""
    from cfmae_cli.config import stored_config

    state = raw.get("model", raw.get("state_dict", raw))
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CfmaeError(f"{path}: no state dict of tensors found (looked at 'model', 'state_dict' and the top level).")
    pretraining = isinstance(raw.get("config"), dict) and raw.get("task", "pretrain") == "pretrain"
    cfg = stored_config(raw["config"], f"the config in {path}") if pretraining else None
    return state, cfg


def timm_classifier(raw: dict[str, Any], path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A ``cfmae finetune`` checkpoint as a timm ``VisionTransformer`` with its head: (weights, config.json).

    Average pooling maps to timm's ``global_pool='avg'`` (``fc_norm``, no final ``norm``), the global token to
    ``'token'``. A linear probe's BatchNorm (no affine parameters) is folded into the linear layer.
    """
    cfg = raw["config"]
    if cfg.get("kind", "classification") != "classification":
        raise CfmaeError(f"{path}: a {cfg['kind']} model; timm's VisionTransformer holds classifiers. Export the "
                         f"encoder of its pre-training checkpoint instead.")
    if cfg["data"]["modalities"] != ["rgb"]:
        raise CfmaeError(f"{path}: this classifier reads {' + '.join(cfg['data']['modalities'])}; timm's "
                         f"VisionTransformer takes RGB only. Export its pre-training checkpoint's encoder instead.")
    state, enc, pool = raw["model"], cfg["model"]["encoder"], cfg["model"]["global_pool"]
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
    size, classes = cfg["data"]["img_size"], len(raw["classes"])
    args = {"img_size": size, "patch_size": enc["patch_size"], "embed_dim": enc["embed_dim"], "depth": enc["depth"],
            "num_heads": enc["num_heads"], "mlp_ratio": enc["mlp_ratio"], "global_pool": pool}
    config = {"architecture": "vit_base_patch16_224", "num_classes": classes, "num_features": enc["embed_dim"],
              "global_pool": pool, "model_args": args, "label_names": list(raw["classes"]),
              "pretrained_cfg": {"input_size": [3, size, size], "interpolation": cfg["data"]["interpolation"],
                                 "mean": list(cfg["data"]["mean"]), "std": list(cfg["data"]["std"]),
                                 "num_classes": classes, "first_conv": "patch_embed.proj", "classifier": "head",
                                 "crop_pct": cfg["data"]["crop_pct"]},
            "cfmae": {"source": str(path), "task": "finetune", "mode": cfg["mode"], "init": cfg["model"]["init"]}}
    return weights, config


def export_timm(path: Path, out: Path, cfg: Config | None = None) -> Path:
    """Write ``out/model.safetensors`` + ``out/config.json`` (timm layout): a pre-trained encoder without a
    head, or a fine-tuned classifier with its head."""
    from safetensors.torch import save_file

    file, raw = read_file(path)
    if raw.get("task") == "finetune":
        weights, config = timm_classifier(raw, file)
    else:
        state, own = load_any(file)
        cfg = cfg or own
        if cfg is None:
            raise CfmaeError(f"{path}: holds no cfmae config to describe the architecture; export needs a cfmae "
                             f"checkpoint (convert MAE / MultiMAE weights with `cfmae pretrain --init FILE` first).")
        weights, config = to_timm(state), timm_config(cfg, str(path))
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
