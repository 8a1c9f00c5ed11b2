"""``cfmae export CKPT --out DIR``: the pre-trained encoder as a timm ``VisionTransformer``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from cfmae_cli.cli.common import console, guarded
from cfmae_cli.errors import CfmaeError
from cfmae_cli.formats import temporary_name
from cfmae_cli.ownership import locked


@guarded
def export(
    checkpoint: Optional[Path] = typer.Argument(None, metavar="CKPT", show_default="the -c/--checkpoint value",
                                                help="cfmae pre-training or fine-tuning checkpoint, or run folder "
                                                "(give it here or as -c/--checkpoint)"),
    out: Path = typer.Option(..., "--out", metavar="FOLDER", help="new folder for model.safetensors, config.json "
                             "and README.md"),
    option: Optional[Path] = typer.Option(None, "--checkpoint", "-c", metavar="CKPT", show_default="the CKPT "
                                          "argument", help="the checkpoint, as for the other commands (instead of "
                                          "the argument)"),
) -> None:
    """Export the encoder to timm (model.safetensors + config.json); a fine-tuned classifier with its head.

    Example: cfmae export runs/pretrain/vitb-400e --out vitb-cfmae

    Example, a fine-tuned classifier: cfmae export runs/finetune/ft-vitb-400e/checkpoints/best.pt --out vitb-in1k

    The last line printed is the timm.create_model call that loads it (strict keys) with its preprocessing
    (timm.data.resolve_data_config gives the run's input size, mean, std, interpolation and crop).
    """
    from cfmae_cli.config import check_weights_file

    if (checkpoint is None) == (option is None):
        raise CfmaeError("export: give the checkpoint once, as the argument or as -c/--checkpoint.")
    checkpoint = checkpoint or option
    assert checkpoint is not None  # exactly one of the two was given
    check_weights_file(checkpoint)  # sizes beyond reason refused before torch is imported or a tensor read

    from cfmae_cli.model.export import export_timm, load_line

    out.parent.mkdir(parents=True, exist_ok=True)
    with locked(out, "--out", lock_file=out.parent / temporary_name(out.name, "cfmae-lock")):  # (out is renamed)
        folder = export_timm(checkpoint, out)
    config = json.loads((folder / "config.json").read_text())
    console.print(f"wrote {folder / 'model.safetensors'}, {folder / 'config.json'} and {folder / 'README.md'}",
                  highlight=False)
    console.print(load_line(config, folder), highlight=False)
