"""Stored configs (a checkpoint's, an export's ``config.json``): read back with the value of each key they
predate, compared with a new config when a run resumes, and checked before anything is built: each size
against the bounds of :mod:`cfmae_cli.config_sizes` and this machine's memory, and the config against the
shapes of the tensors it comes with."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from cfmae_cli import modalities as table
from cfmae_cli.checkpoints import checkpoint_path, peek_checkpoint, safetensors_shapes
from cfmae_cli.config_loading import config_from_dict
from cfmae_cli.config_schema import Config, DataConfig, DecoderConfig, EncoderArch, ImageDataConfig
from cfmae_cli.config_sizes import (MAX_CLASSES, MAX_DEPTH, MAX_MLP_RATIO, MAX_PATCH, MAX_PIXELS, MAX_WIDTH,
                                    encoder_parameters, finetune_parameters, grid_problem, memory_problem,
                                    pretrain_parameters)
from cfmae_cli.errors import ConfigError
from cfmae_cli.hub import local_weights, named_by_spec

# Keys that may differ when a run is resumed: they change how the run is carried out, not what it computes.
RESUMABLE_CHANGES = frozenset({"data.num_workers", "train.device", "train.log_every", "train.save_every",
                               "train.keep_last", "train.plot_every", "train.plot_samples", "train.threads",
                               "train.compile", "train.loggers", "model.grad_checkpointing"})


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


_BOUNDS = {  # kind of size → (the bound, its unit, a real model for scale)
    "width": (MAX_WIDTH, "channels", "ViT-22B has 6144"),
    "depth": (MAX_DEPTH, "blocks", "ViT-22B has 48"),
    "mlp_ratio": (MAX_MLP_RATIO, "", "ViT-e's is 8.6"),
    "patch": (MAX_PATCH, "pixels", "ViTs use 8 to 32"),
    "pixels": (MAX_PIXELS, "pixels", "ViTDet reads 1024"),
    "ids": (255, "ids", "instance maps are 8-bit"),
    "classes": (MAX_CLASSES, "classes", "ImageNet-22k has 21,841"),
}


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
        kind = raw["kind"] if raw.get("kind") in ("segmentation", "detection") else "classification"
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
    args = config["model_args"] if isinstance(config.get("model_args"), dict) else {}
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
    args = config["model_args"] if isinstance(config.get("model_args"), dict) else {}
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
    keys: dict[str, str | None] = {name: key for name, (key, _) in claims.items()}
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
    dims = shape(width, 2) if width is not None else None
    if width is not None and dims and task is not None:
        out["decoder.dim"] = (dims[0], width)
        self_blocks = numbered(f"decoder.tasks.{task}.blocks.")
        out["decoder.self_blocks"] = (1 + max(self_blocks) if self_blocks else 0,
                                      f"decoder.tasks.{task}.blocks" + (f".{max(self_blocks)}" if self_blocks else ""))
    return out


def check_weights_file(path: str | Path) -> None:
    """The checks of a weights file that cost neither torch nor its tensors, for a command to run first: a cfmae
    checkpoint's config (or an export's ``config.json``) against the bounds and this machine's memory
    (:func:`check_config_sizes`) and against its tensors' shapes, read from the file's index
    (:func:`check_tensors_agree`). A file that cannot be looked at so (an old pickle, a foreign file, damage) is
    left to the reader, which runs the same checks before it builds anything. A hub spec is resolved to its local
    copy first (downloaded unless cached), and the messages name the spec."""
    local = local_weights(path)
    with named_by_spec(path, local):
        _check_weights_file(local)


def _check_weights_file(path: Path) -> None:
    folder = path
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
