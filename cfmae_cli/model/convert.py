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
from typing import Any, TypedDict

import torch
from torch import Tensor

from cfmae_cli import modalities as table
from cfmae_cli.config import Config, EncoderArch
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
    raise CfmaeError(f"{where}unknown weights format (keys such as {sorted(keys)[:3]}); expected a cfmae, timm, "
                     f"MAE or MultiMAE ViT.")


def to_cfmae(state: dict[str, Tensor], source: str | Path | None = None) -> dict[str, Tensor]:
    """Encoder weights of any supported format under our key names (``encoder.*``; map adapters etc. kept)."""
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
    """timm ``VisionTransformer`` weights (no head) from any supported format."""
    return {k.removeprefix("encoder."): v.contiguous() for k, v in to_cfmae(state).items() if k.startswith("encoder.")}


def timm_model_args(cfg: Config) -> dict[str, Any]:
    """The ``model_args`` of a pre-training run's exported encoder (timm's ``VisionTransformer`` arguments)."""
    return cfg.model.timm_kwargs(cfg.data.img_size)


class _View(TypedDict):
    interpolation: str
    crop_pct: float


#: how cfmae shows a pre-trained encoder an image outside training (the k-NN monitor, reconstruct, attention-map:
#: ``JointTransform(train=False)``): the centred square, resized bilinearly, i.e. timm's crop_pct 1.0
ENCODER_VIEW: _View = {"interpolation": "bilinear", "crop_pct": 1.0}


def pretrained_cfg(size: int, mean: Any, std: Any, interpolation: str, crop_pct: float, classes: int
                   ) -> dict[str, Any]:
    """The ``pretrained_cfg`` of an export, complete as timm's hub configs are (the fields timm's own
    ``save_config_for_hf`` writes for a ViT), so that ``timm.data.resolve_data_config`` on the loaded model gives
    the run's preprocessing instead of the defaults of the architecture it is named after."""
    return {"custom_load": False, "input_size": [3, size, size], "fixed_input_size": True,
            "interpolation": interpolation, "crop_pct": crop_pct, "crop_mode": "center",
            "mean": list(mean), "std": list(std), "num_classes": classes,
            "pool_size": None, "first_conv": "patch_embed.proj", "classifier": "head"}


def timm_config(cfg: Config, source: str) -> dict[str, Any]:
    """``config.json`` of an exported encoder, in timm's hub format; its preprocessing is the run's image size
    and normalisation with cfmae's own view of an image (:data:`ENCODER_VIEW`)."""
    args = timm_model_args(cfg)
    name = timm_name(args["patch_size"], args["embed_dim"], args["depth"], args["num_heads"], args["img_size"])
    return {"architecture": name, "num_classes": 0, "num_features": cfg.model.embed_dim,
            "global_pool": "token", "model_args": args,
            "pretrained_cfg": pretrained_cfg(cfg.data.img_size, cfg.data.mean, cfg.data.std, classes=0,
                                             **ENCODER_VIEW),
            "cfmae": {"source": source, "modalities": list(cfg.data.modalities)}}


def timm_classifier(top: dict[str, Any], state: dict[str, Tensor], path: Path
                    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A ``cfmae finetune`` classifier (its checkpoint's top-level entries: the stored config and class names;
    its weights) as a timm ``VisionTransformer`` with its head: (weights, config.json).

    Average pooling maps to timm's ``global_pool='avg'`` (``fc_norm``, no final ``norm``), the global token to
    ``'token'``. A linear probe's BatchNorm (no affine parameters) is folded into the linear layer. The
    ``pretrained_cfg`` is the fine-tuning's evaluation transform (``data``: img_size, crop_pct, interpolation, mean,
    std). A segmentation or detection model, a classifier that reads maps, and a checkpoint that lacks what the
    export needs are refused in one line naming the file and what to export instead.
    """
    cfg = top["config"] if isinstance(top.get("config"), dict) else {}
    init = cfg["model"].get("init") if isinstance(cfg.get("model"), dict) else None
    instead = (f"export the pre-training checkpoint it was fine-tuned from: cfmae export {init} --out DIR"
               if init and init != "random" else "it was fine-tuned from random weights, so there is no pre-trained "
               "encoder to export")
    kind = cfg.get("kind") or top.get("kind") or "classification"
    if kind != "classification":
        heads = {"segmentation": "UperNet", "detection": "Mask R-CNN"}.get(str(kind), str(kind))
        raise CfmaeError(f"{path}: a {kind} model (the encoder under {heads}, from cfmae finetune); cfmae export "
                         f"writes encoders and image classifiers as timm's VisionTransformer, which has no place for "
                         f"it. Instead, {instead}.")

    def entry(dotted: str) -> Any:
        node: Any = cfg
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise CfmaeError(f"{path}: its config has no {dotted} (written by another version of cfmae, or "
                                 f"edited), which the export needs. Fine-tune again with this version, or {instead}.")
            node = node[part]
        return node

    modalities = entry("data.modalities")
    if table.maps_of(modalities):
        raise CfmaeError(f"{path}: this classifier reads {' + '.join(modalities)}; timm's VisionTransformer takes "
                         f"RGB only. Instead, {instead}.")
    classes = top.get("classes")
    if not isinstance(classes, list) or not classes:
        raise CfmaeError(f"{path}: holds no class names ('classes'), which label the head of the export. Fine-tune "
                         f"again with this version, or {instead}.")
    enc, pool = entry("model.encoder"), entry("model.global_pool")
    size, mode = entry("data.img_size"), entry("mode")
    pretrained = {k: entry(f"data.{k}") for k in ("interpolation", "mean", "std", "crop_pct")}
    dims: dict[str, Any] = {k: enc.get(k) if isinstance(enc, dict) else None for k in EncoderArch.TIMM_FIELDS}
    if any(v is None for v in dims.values()):
        entry("model.encoder." + next(k for k, v in dims.items() if v is None))
    weights = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    weights.update({k: v for k, v in state.items() if k.startswith("fc_norm.")})
    if "head.weight" in state and "head.bias" in state:
        weights.update({"head.weight": state["head.weight"], "head.bias": state["head.bias"]})
    elif all(f"head.{k}" in state for k in ("0.running_mean", "0.running_var", "1.weight", "1.bias")):
        # linear probe: head = BatchNorm1d(affine=False, eps=1e-6) then Linear
        inv = (state["head.0.running_var"].double() + 1e-6).rsqrt()
        w, b = state["head.1.weight"].double(), state["head.1.bias"].double()
        weights["head.weight"] = (w * inv).float()
        weights["head.bias"] = (b - (w * inv) @ state["head.0.running_mean"].double()).float()
    else:
        raise CfmaeError(f"{path}: holds no classifier head (head.weight, or a linear probe's head.1.weight); not "
                         f"an image classifier. Instead, {instead}.")
    if weights["head.weight"].shape[0] != len(classes):
        raise CfmaeError(f"{path}: its head has {weights['head.weight'].shape[0]} outputs but it names "
                         f"{len(classes)} classes; the file was edited or put together from two runs.")
    weights = {k: v.contiguous() for k, v in weights.items()}
    labels, count = [str(c) for c in classes], len(classes)
    args = EncoderArch.model_construct(**dims).timm_kwargs(size, global_pool=pool)  # as stored: not validated again
    name = timm_name(dims["patch_size"], dims["embed_dim"], dims["depth"], dims["num_heads"], size)
    config = {"architecture": name, "num_classes": count, "num_features": dims["embed_dim"],
              "global_pool": pool, "model_args": args, "label_names": labels,
              "pretrained_cfg": pretrained_cfg(size, classes=count, **pretrained),
            "cfmae": {"source": str(path), "task": "finetune", "mode": mode, "init": init}}
    return weights, config
