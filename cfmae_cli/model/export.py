"""``cfmae export``: a checkpoint's encoder (or fine-tuned classifier) written as a timm ``VisionTransformer``:
``model.safetensors`` + ``config.json`` in timm's hub format, loadable with strict key matching."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cfmae_cli.errors import CfmaeError
from cfmae_cli.formats import atomic_write, atomic_write_text, list_folder
from cfmae_cli.model.convert import timm_classifier, timm_config, to_timm
from cfmae_cli.model.weights import read_weights

log = logging.getLogger(__name__)


def export_timm(path: Path, out: Path) -> Path:
    """Write ``out/model.safetensors`` + ``out/config.json`` + a model card ``out/README.md``: a pre-trained
    encoder without a head, or a fine-tuned classifier with its head."""
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
    atomic_write_text(out / "README.md", model_card(config, w.top, out))
    if replacing:
        log.info("%s: replaced the export that was there (of %s)", out, replacing)
    return out


EXPORT_FILES = ("model.safetensors", "config.json", "README.md")


def _claim_export(out: Path, source: Path) -> str | None:
    """Check that ``out`` may take an export: a new or empty folder, or a previous export of cfmae's (its
    ``config.json`` has a "cfmae" entry and the folder holds nothing but the export's files), which is then
    replaced: returned is what it was exported from. Anything else is refused, naming the files in the way."""
    if out.exists() and not out.is_dir():
        raise CfmaeError(f"--out {out}: a file, not a folder; give a new folder for the export.")
    if source.exists() and out.exists() and source.resolve().is_relative_to(out.resolve()):
        raise CfmaeError(f"--out {out}: holds the checkpoint {source} itself; export into another folder.")
    names = list_folder(out).names if out.is_dir() else []
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


def load_line(config: dict[str, Any], folder: Path) -> str:
    """The ``timm.create_model`` call that loads the export in ``folder`` with strict key matching."""
    classes = config["num_classes"]
    return (f"timm.create_model('{config['architecture']}', pretrained=True, num_classes={classes}, "
            f"pretrained_cfg_overlay=dict(file='{folder / 'model.safetensors'}', num_classes={classes}), "
            f"**{config['model_args']})")


def model_card(config: dict[str, Any], top: dict[str, Any], folder: Path) -> str:
    """README.md of an export: what the weights are, the run they come from, its data, and how to load them."""
    from cfmae_cli.formats import software

    run = top.get("config") or {}
    ours = config.get("cfmae", {})
    finetuned = ours.get("task") == "finetune"
    data = (run.get("data") or {}).get("root") or "the built-in demo data (scikit-image's sample photographs)"
    args = ", ".join(f"{k} {v}" for k, v in config["model_args"].items())
    lines = [f"# {folder.name}", "",
             ("A ViT classifier fine-tuned by cfmae" if finetuned else
              "A ViT encoder pre-trained with CFMAE (coarse-to-fine masked autoencoding of semantic maps, instance "
              "maps and RGB), exported by") + f" {software()} in timm's format.", "",
             "## Architecture", "",
             f"- timm `{config['architecture']}` with {args}",
             f"- {'a head of ' + str(config['num_classes']) + ' classes' if config['num_classes'] else 'no head'}; "
             f"features {config.get('num_features')}, pooling `{config.get('global_pool')}`",
             f"- input {config['pretrained_cfg']['input_size'][1]} px, mean {config['pretrained_cfg']['mean']}, std "
             f"{config['pretrained_cfg']['std']}", "",
             "## Source", "",
             f"- checkpoint `{ours.get('source')}` (epoch {top.get('epoch', '?')}, step {top.get('step', '?')})",
             f"- data: {data}"]
    if not finetuned:
        lines.append(f"- modalities: {', '.join(ours.get('modalities', []))}; decoder order "
                     f"{' → '.join((run.get('model') or {}).get('decoder', {}).get('order', []))}")
        lines.append(f"- {(run.get('train') or {}).get('epochs', '?')} epochs, effective batch "
                     f"{(run.get('optim') or {}).get('effective_batch', '?')}, base lr "
                     f"{(run.get('optim') or {}).get('base_lr', '?')}")
    else:
        lines.append(f"- mode {ours.get('mode')}, initial weights {ours.get('init')}")
    last = top.get("metrics") or {}
    if "loss" in last:
        lines.append(f"- last epoch loss {last['loss']:.4f}")
    lines += ["", "## Load", "", "```python", "import timm", load_line(config, folder), "```", "",
              "The full config of the run is in its `config.yaml`; `config.json` here is timm's.", ""]
    return "\n".join(lines)
