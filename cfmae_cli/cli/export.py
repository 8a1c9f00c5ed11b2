"""``cfmae export CKPT --out DIR``: the pre-trained encoder as a timm ``VisionTransformer``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cfmae_cli.cli.common import console, guarded
from cfmae_cli.model.convert import export_timm


@guarded
def export(
    checkpoint: Path = typer.Argument(..., help="cfmae checkpoint or run folder"),
    out: Path = typer.Option(..., "--out", help="folder for model.safetensors and config.json"),
) -> None:
    """Export the encoder to timm (model.safetensors + config.json).

    Example: cfmae export runs/pretrain/vitb-400e --out vitb-cfmae

    Load it with timm.create_model("vit_base_patch16_224", pretrained=True, num_classes=1000,
    pretrained_cfg_overlay=dict(file="vitb-cfmae/model.safetensors"), **config["model_args"]).
    """
    folder = export_timm(checkpoint, out)
    args = json.loads((folder / "config.json").read_text())["model_args"]
    console.print(f"wrote {folder / 'model.safetensors'} and {folder / 'config.json'}", highlight=False)
    console.print(f"timm.create_model('vit_base_patch16_224', pretrained=True, num_classes=0, "
                  f"pretrained_cfg_overlay=dict(file='{folder / 'model.safetensors'}'), "
                  f"**{args})", highlight=False, markup=False)
