"""``cfmae export CKPT --out DIR``: the pre-trained encoder as a timm ``VisionTransformer``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cfmae_cli.cli.common import console, guarded
from cfmae_cli.model.export import export_timm


@guarded
def export(
    checkpoint: Path = typer.Argument(..., help="cfmae pre-training or fine-tuning checkpoint, or run folder"),
    out: Path = typer.Option(..., "--out", help="folder for model.safetensors and config.json"),
) -> None:
    """Export the encoder to timm (model.safetensors + config.json); a fine-tuned classifier with its head.

    Example: cfmae export runs/pretrain/vitb-400e --out vitb-cfmae

    Example, a fine-tuned classifier: cfmae export runs/finetune/ft-vitb-400e/checkpoints/best.pt --out vitb-in1k

    The last line printed is the timm.create_model call that loads it (strict keys).
    """
    folder = export_timm(checkpoint, out)
    config = json.loads((folder / "config.json").read_text())
    console.print(f"wrote {folder / 'model.safetensors'} and {folder / 'config.json'}", highlight=False)
    classes = config["num_classes"]
    console.print(f"timm.create_model('{config['architecture']}', pretrained=True, num_classes={classes}, "
                  f"pretrained_cfg_overlay=dict(file='{folder / 'model.safetensors'}', num_classes={classes}), "
                  f"**{config['model_args']})", highlight=False, markup=False)
