"""Loading a config: presets, ``--set`` overrides, validation errors in one message.

A preset (``cfmae_cli/presets/NAME.yaml``) overrides what changes; it may name a ``base`` preset to start
from. ``--set a.b=c`` overrides one key; the value is read as YAML (``[rgb,semantic]``, ``3e-4``, ``true``).
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Protocol

import yaml
from pydantic import BaseModel, ValidationError

from cfmae_cli.config_schema import Config
from cfmae_cli.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"


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


class Dumpable(Protocol):
    """A config as :func:`dump_config` reads it (pre-training's, fine-tuning's, or the engine's view of either)."""

    def model_dump(self, *, mode: str = "python") -> dict[str, Any]: ...


def dump_config(cfg: Dumpable) -> str:
    """The resolved config as YAML (what goes into ``config.yaml`` of a run); a fine-tuning config starts with
    ``task: finetune`` so that the file works as a ``--preset`` of the right command."""
    data = cfg.model_dump(mode="json")
    task = getattr(cfg, "TASK", "pretrain")
    return yaml.safe_dump(data if task == "pretrain" else {"task": task, **data}, sort_keys=False)
