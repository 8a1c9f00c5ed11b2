"""``cfmae export CKPT --out DIR [--push-to-hub OWNER/NAME]``: the pre-trained encoder as a timm
``VisionTransformer``, in a folder and, if asked, on the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cfmae_cli.cli.common import Printed, console, guarded
from cfmae_cli.errors import CfmaeError


@guarded
def export(
    checkpoint: Optional[Path] = typer.Argument(None, metavar="CKPT", show_default="the -c/--checkpoint value",
                                                help="cfmae pre-training or fine-tuning checkpoint, or run folder, "
                                                "or hf-hub:owner/name of one (give it here or as -c/--checkpoint)"),
    out: Path = typer.Option(..., "--out", metavar="FOLDER", help="new folder for model.safetensors, config.json "
                             "and README.md"),
    option: Optional[Path] = typer.Option(None, "--checkpoint", "-c", metavar="CKPT", show_default="the CKPT "
                                          "argument", help="the checkpoint, as for the other commands (instead of "
                                          "the argument)"),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", metavar="REPO", show_default="no upload",
                                              help="then upload the export to this Hugging Face Hub repository, "
                                              "owner/name (made if missing; needs a token: hf auth login or HF_TOKEN)"),
    private: bool = typer.Option(False, "--private", help="with --push-to-hub: a new repository is private"),
) -> None:
    """Export the encoder to timm (model.safetensors + config.json); a fine-tuned classifier with its head.

    Example: cfmae export runs/pretrain/vitb-400e --out vitb-cfmae

    Example, a fine-tuned classifier: cfmae export runs/finetune/ft-vitb-400e/checkpoints/best.pt --out vitb-in1k

    Example, and upload it to the Hugging Face Hub: cfmae export runs/pretrain/vitb-400e --out vitb-cfmae
    --push-to-hub me/vitb-cfmae --private

    The last line printed is the timm.create_model call that loads it (strict keys) with its preprocessing
    (timm.data.resolve_data_config gives the run's input size, mean, std, interpolation and crop).
    """
    from cfmae_cli import api

    if (checkpoint is None) == (option is None):
        raise CfmaeError("export: give the checkpoint once, as the argument or as -c/--checkpoint.")
    result = api.export(checkpoint or option, out, push_to_hub=push_to_hub, private=private,  # type: ignore[arg-type]
                        report=Printed())
    console.print(result["load_line"], highlight=False)
