"""``cfmae export``: a checkpoint's encoder (or fine-tuned classifier) written as a timm ``VisionTransformer``:
``model.safetensors`` + ``config.json`` in timm's hub format, loadable with strict key matching."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from cfmae_cli.errors import CfmaeError
from cfmae_cli.formats import atomic_write, atomic_write_text, list_folder
from cfmae_cli.model.convert import timm_classifier, timm_config, to_timm
from cfmae_cli.model.weights import read_weights

log = logging.getLogger(__name__)


def export_timm(path: Path, out: Path) -> Path:
    """Write ``out/model.safetensors`` + ``out/config.json``: a pre-trained encoder without a head, or a
    fine-tuned classifier with its head."""
    from safetensors.torch import save

    replacing = _claim_export(out, path)
    w = read_weights(path)
    if w.layout == "cfmae-finetune":
        weights, config = timm_classifier(w.top["config"], w.state, w.top["classes"], w.path)
    else:
        cfg = w.pretrain_config()
        if cfg is None:
            raise CfmaeError(f"{path}: holds no cfmae config to describe the architecture; export needs a cfmae "
                             f"checkpoint (convert MAE / MultiMAE weights with `cfmae pretrain --init FILE` first).")
        weights, config = to_timm(w.state), timm_config(cfg, str(path))
    atomic_write(out / "model.safetensors", lambda fh: fh.write(save(weights)), binary=True)
    atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    if replacing:
        log.info("%s: replaced the export that was there (of %s)", out, replacing)
    return out


EXPORT_FILES = ("model.safetensors", "config.json")


def _claim_export(out: Path, source: Path) -> str | None:
    """Check that ``out`` may take an export: a new or empty folder, or a previous export of cfmae's (its
    ``config.json`` has a "cfmae" entry and the folder holds nothing but the export's files), which is then
    replaced: returned is what it was exported from. Anything else is refused, naming the files in the way."""
    if out.exists() and not out.is_dir():
        raise CfmaeError(f"--out {out}: a file, not a folder; give a new folder for the export.")
    if source.exists() and out.exists() and source.resolve().is_relative_to(out.resolve()):
        raise CfmaeError(f"--out {out}: holds the checkpoint {source} itself; export into another folder.")
    names = list_folder(out).files + list_folder(out).dirs if out.is_dir() else []
    if not names:
        return None
    foreign = [n for n in names if n not in EXPORT_FILES]
    previous = None
    if "config.json" in names:
        try:
            previous = json.loads((out / "config.json").read_text(encoding="utf-8")).get("cfmae")
        except (OSError, ValueError, AttributeError):
            previous = None
    if foreign or not isinstance(previous, dict):
        shown = ", ".join((foreign or names)[:5]) + (" …" if len(foreign or names) > 5 else "")
        raise CfmaeError(f"--out {out}: the folder holds files that are not a cfmae export ({shown}); they are not "
                         f"replaced. Export into a new or empty folder.")
    return str(previous.get("source", "?"))
