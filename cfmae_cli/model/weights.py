"""One door for weights: every command that starts from or reads weights comes through here.

:func:`read_weights` reads a file (or a run folder, or an exported folder) safely, tells its format — a cfmae
pre-training or fine-tuning checkpoint, MAE, MultiMAE, a timm ``.pth`` / ``.safetensors`` state dict, or a
folder written by ``cfmae export`` — and converts it to our key names (``convert.to_cfmae``).
:func:`load_weights` puts such a state into a module: the position table is fitted to the module's grid
(one policy, :func:`fit_position_table`), and tensors of the wrong shape stop with a message that names them
and the fix. :meth:`Weights.encoder_arch` reads the encoder's architecture off the file (its config, or the
tensor shapes). :func:`timm_model` builds a timm architecture by name and fills it from a file's state dict
(the baselines of ``eval-robustness`` and ``attention-map --stats``).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import timm
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from cfmae_cli import modalities as table
from cfmae_cli.checkpoints import FORMAT_VERSION, checkpoint_path, read_torch_file
from cfmae_cli.config import (Config, EncoderArch, check_checkpoint_sizes, check_export_sizes, check_tensors_agree,
                              checkpoint_claims, config_from_dict, export_claims, stored_config)
from cfmae_cli.errors import CfmaeError
from cfmae_cli.hub import is_hub, local_weights, named_by_spec
from cfmae_cli.model.convert import detect_format, to_cfmae
from cfmae_cli.model.layers import fit_pos_embed

log = logging.getLogger(__name__)


@dataclass
class Weights:
    """What a weights file holds. ``state``: tensors under our key names; ``raw``: the state dict as stored
    (for foreign architectures, loaded by timm); ``format``: ``cfmae-pretrain``, ``cfmae-finetune``, ``mae``,
    ``multimae``, ``timm`` or ``exported``; ``top``: the file's other entries (``config``, ``task``,
    ``semantic_classes``, ``classes``, …; an exported folder's ``config.json``); ``spec``: the hub spec the
    weights were read from (``path`` is then their copy in the local hub cache), None for a local file."""

    path: Path
    format: str  # which key scheme the file uses (docs/architecture.md, glossary: weights format)
    state: dict[str, Tensor]
    raw: dict[str, Tensor] = field(repr=False)
    top: dict[str, Any] = field(default_factory=dict, repr=False)
    spec: str | None = None

    @property
    def source(self) -> str:
        return f"{self.spec or self.path} ({self.format} format)"

    def pretrain_config(self) -> Config | None:
        """The pre-training config of a ``cfmae pretrain`` checkpoint (None for other files)."""
        if self.format != "cfmae-pretrain":
            return None
        return stored_config(self.top["config"], f"the config in {self.path}")

    def encoder_arch(self) -> tuple[EncoderArch, set[str]]:
        """The encoder's architecture and the names of the fields the file shows: all of them for our checkpoints
        (their configs say), the shape fields for a foreign file (:func:`arch_from_state`)."""
        cfg = self.pretrain_config()
        if cfg is not None:
            return EncoderArch.of(cfg.model), set(EncoderArch.model_fields)
        stored = (self.top.get("config") or {}).get("model", {}).get("encoder")
        if self.format == "cfmae-finetune" and stored:
            arch = config_from_dict(stored, f"model.encoder in the config in {self.path}", EncoderArch)
            return arch, set(EncoderArch.model_fields)
        try:
            return arch_from_state(self.state)
        except CfmaeError as exc:
            raise CfmaeError(f"{self.path}: {exc}") from None


def read_state_file(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(the file, its top-level dict) of a ``torch.save`` file or a ``.safetensors`` file; a run folder means its
    ``checkpoints/last.pt``. Only plain data is read (``weights_only``); anything else stops with a message
    naming the file."""
    path = checkpoint_path(path)
    if not path.is_file():
        raise CfmaeError(f"{path}: checkpoint not found.")
    if path.suffix == ".safetensors":
        try:
            return path, load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CfmaeError(f"{path}: not a readable safetensors file ({exc}).") from None
    raw = read_torch_file(path, mmap=True)  # mapped, not read: nothing is in memory before the checks
    if not isinstance(raw, dict):
        raise CfmaeError(f"{path}: not a checkpoint (a {type(raw).__name__}, not a dict of tensors).")
    return path, raw


def read_state(path: str | Path) -> tuple[Path, dict[str, Tensor], dict[str, Any], bool]:
    """(the file, its state dict as stored, its other top-level entries, whether it is an exported folder) of any
    weights file or folder :func:`read_weights` takes; nothing is converted (for architectures timm builds). A hub
    spec is read from its local copy (:func:`cfmae_cli.hub.local_weights`); its messages name the spec."""
    local = local_weights(path)
    with named_by_spec(path, local):
        return _read_state(local)


def _read_state(folder: Path) -> tuple[Path, dict[str, Tensor], dict[str, Any], bool]:
    path = folder
    if folder.is_dir() and (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        try:
            top = json.loads((folder / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CfmaeError(f"{folder / 'config.json'}: not readable as JSON ({exc}).") from None
        if not isinstance(top, dict):
            raise CfmaeError(f"{folder / 'config.json'}: not a timm config (a JSON {type(top).__name__}).")
        check_export_sizes(top, str(folder / "config.json"))  # before the tensors are read
        file, state = read_state_file(folder / "model.safetensors")
        exported = True
    else:
        file, loaded = read_state_file(path)
        state = loaded.get("model", loaded.get("state_dict", loaded))
        top = {k: v for k, v in loaded.items() if k not in ("model", "state_dict")} if state is not loaded else {}
        exported = False
        if isinstance(top.get("config"), dict) and "format_version" in top:  # written by cfmae's engine
            check_checkpoint_sizes(top, str(file))
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CfmaeError(f"{file}: no state dict of tensors found (looked at 'model', 'state_dict' and the top level).")
    if exported:  # timm's keys are the encoder's
        check_tensors_agree(file, {f"encoder.{k}": v for k, v in state.items()}, export_claims(top))
    elif isinstance(top.get("config"), dict) and "format_version" in top:
        check_tensors_agree(file, state, checkpoint_claims(top))
    return file, state, top, exported


def read_weights(path: str | Path) -> Weights:
    """The weights of a cfmae checkpoint or run folder, an MAE / MultiMAE / timm file, or an exported folder
    (``model.safetensors`` + ``config.json``), or any of these on the hub (``hf-hub:owner/name[@revision]``),
    converted to our key names; clear errors for everything else."""
    local = local_weights(path)
    with named_by_spec(path, local):
        w = _read_weights(local)
    w.spec = str(path) if is_hub(path) else None
    return w


def _read_weights(path: Path) -> Weights:
    file, state, top, exported = _read_state(path)
    kind = "exported" if exported else ""
    if isinstance(top.get("config"), dict) and "format_version" in top:  # written by cfmae's engine
        if top["format_version"] != FORMAT_VERSION:
            raise CfmaeError(f"{file}: a cfmae checkpoint of format version {top['format_version']}; this version "
                             f"reads {FORMAT_VERSION}.")
        return Weights(file, f"cfmae-{top.get('task', 'pretrain')}", dict(state), state, top)
    if not kind:
        fmt = detect_format(state, file)
        kind = "cfmae-state" if fmt == "cfmae" else fmt  # our key names without our config: a bare state dict
    return Weights(file, kind, to_cfmae(state, file), state, top)


def arch_from_state(state: dict[str, Tensor]) -> tuple[EncoderArch, set[str]]:
    """The encoder architecture read off a state dict in our key names (``encoder.*``, ``adapters.*``), and the
    names of the fields the shapes showed.

    The number of heads is not visible in the shapes: it is taken as embed_dim / 64, as in every standard ViT;
    the map fields keep their defaults when the file has no map adapters.
    """
    try:
        proj = state["encoder.patch_embed.proj.weight"]
        fc1 = state["encoder.blocks.0.mlp.fc1.weight"]
    except KeyError as exc:
        raise CfmaeError(f"no ViT encoder weights found (missing {exc.args[0]})") from None
    dim, patch = proj.shape[0], proj.shape[-1]
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.blocks."))
    values = {"patch_size": patch, "embed_dim": dim, "depth": depth, "num_heads": max(dim // 64, 1),
              "mlp_ratio": fc1.shape[0] / dim}
    for name, spec in table.TABLE.items():  # id-map adapters show the map fields
        embed, conv = state.get(f"adapters.{name}.embed.weight"), state.get(f"adapters.{name}.proj.weight")
        if spec.kind == "ids" and embed is not None and conv is not None:
            values.update(map_embed_dim=embed.shape[1], map_stride=patch // conv.shape[-1])
            if spec.classes == "instance_ids":
                values["num_instance_ids"] = embed.shape[0] - 1
    return config_from_dict(values, "the encoder its tensors' shapes show", EncoderArch), set(values) - {"num_heads"}


def fit_position_table(table: Tensor, own: Tensor, source: str | Path) -> Tensor:
    """A file's position table resized to a model's grid (``own``, (1, 1 + N, D)): the patch rows bicubically,
    the global-token row kept (or a zero one put first); logged. A table of another width is returned as it
    is, for the shape check that names it."""
    if table.shape == own.shape or table.ndim != 3 or table.shape[-1] != own.shape[-1]:
        return table
    grid = math.isqrt(own.shape[1] - 1)
    try:
        fitted = fit_pos_embed(table, grid)
    except ValueError as exc:
        raise CfmaeError(f"{source}: encoder.pos_embed of shape {tuple(table.shape)}: {exc}") from None
    log.info("%s: position table of %d rows resized to the %dx%d grid (bicubic)", source, table.shape[1], grid, grid)
    return fitted


@dataclass
class Loaded:
    """What :func:`load_weights` did: the tensors loaded, the module's tensors the file lacks, the file's
    tensors the module has no place for."""

    loaded: list[str]
    missing: list[str]
    unused: list[str]


def load_weights(module: nn.Module, state: dict[str, Tensor], source: str | Path,
                 only: Iterable[str] | None = None, strict: bool = False,
                 fix: str = "weights of another architecture") -> Loaded:
    """Copy the tensors of ``state`` (our key names) that ``module`` has — with ``only``, just those under these
    key prefixes — into ``module``. ``encoder.pos_embed`` is fitted to the module's grid; any other tensor of
    another shape stops with a message naming it and ``fix`` (what to do instead). ``strict``: every tensor of
    the module must come from the file."""
    own = module.state_dict()
    prefixes = tuple(only) if only is not None else ("",)
    keep = {k: v for k, v in state.items() if k.startswith(prefixes) and k in own}
    if "encoder.pos_embed" in keep:
        keep["encoder.pos_embed"] = fit_position_table(keep["encoder.pos_embed"], own["encoder.pos_embed"], source)
    bad = [k for k, v in keep.items() if v.shape != own[k].shape]
    if bad:
        shown = "; ".join(f"{k}: {tuple(keep[k].shape)} in the file, {tuple(own[k].shape)} here" for k in bad[:3])
        raise CfmaeError(f"{source}: {len(bad)} tensor(s) do not match this model's shapes ({shown}). These are "
                         f"{fix}.")
    missing = sorted(k for k in own if k.startswith(prefixes) and k not in keep)
    if strict and missing:
        raise CfmaeError(f"{source}: lacks {len(missing)} tensor(s) of this model (e.g. {missing[0]}); it was not "
                         f"written for it.")
    module.load_state_dict(keep, strict=False)
    unused = sorted(k for k in state if k.startswith(prefixes) and k not in own)
    return Loaded(sorted(keep), missing, unused)


def timm_model(name: str, source: str, state: dict[str, Tensor], extra_ok: bool = False, **kwargs: Any
               ) -> nn.Module:
    """timm's model ``name`` (built by timm, with its default preprocessing unless ``pretrained_cfg`` is given)
    holding ``state`` — read by the one door for weights, adapted by the model's own ``checkpoint_filter_fn``
    as timm does (position tables, key renames), loaded with strict key matching; ``extra_ok``: tensors the
    model has no place for (an MAE file's decoder) are left out, but every tensor of the model must be there."""
    try:
        module = timm.create_model(name, pretrained=False, **kwargs)
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise CfmaeError(f"{source}: timm cannot build {name} ({str(exc).splitlines()[0]})") from None
    filter_fn = getattr(sys.modules[type(module).__module__], "checkpoint_filter_fn", None)
    try:
        state = filter_fn(state, module) if filter_fn is not None else state
        if extra_ok:
            own = module.state_dict()
            state = {k: v for k, v in state.items() if k in own}
        module.load_state_dict(state)
    except RuntimeError as exc:
        differences = state_differences(state, module.state_dict()) or [str(exc).splitlines()[0]]
        raise CfmaeError(f"{source}: not weights of timm's {name} ({'; '.join(differences[:3])}"
                         f"{'; …' if len(differences) > 3 else ''}); give the file of that model, or the name of the "
                         f"model the file holds") from None
    return module


def state_differences(state: dict[str, Tensor], own: dict[str, Tensor]) -> list[str]:
    """How a state dict differs from a model's: tensors of other shapes first (e.g. a head of another class
    count), then missing and unexpected keys."""
    shapes = [f"{k}: the file has {list(state[k].shape)}, the model {list(v.shape)}" for k, v in own.items()
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)]
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    return shapes + ([f"missing {len(missing)} tensor(s), e.g. {missing[0]}"] if missing else []) + \
        ([f"{len(extra)} tensor(s) the model has no place for, e.g. {extra[0]}"] if extra else [])
