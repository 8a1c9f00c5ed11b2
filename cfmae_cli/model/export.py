"""``cfmae export``: a checkpoint's encoder (or fine-tuned classifier) written as a timm ``VisionTransformer``:
``model.safetensors`` + ``config.json`` in timm's hub format, loadable with strict key matching."""

from __future__ import annotations

import json
from pathlib import Path

from cfmae_cli.errors import CfmaeError
from cfmae_cli.formats import atomic_write, atomic_write_text
from cfmae_cli.model.convert import timm_classifier, timm_config, to_timm
from cfmae_cli.model.weights import read_weights


def export_timm(path: Path, out: Path) -> Path:
    """Write ``out/model.safetensors`` + ``out/config.json``: a pre-trained encoder without a head, or a
    fine-tuned classifier with its head."""
    from safetensors.torch import save

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
    return out
