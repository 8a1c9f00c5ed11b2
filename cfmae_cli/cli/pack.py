"""``cfmae pack DATA --out PACKED``: a copy of a dataset that the training reader decodes several times faster."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.progress import Progress

from cfmae_cli.cli.common import console, guarded, is_terminal, logs_to
from cfmae_cli.formats import list_folder, need_folder
from cfmae_cli.ownership import writing


@guarded
def pack(
    data: Path = typer.Argument(..., metavar="DATA", help="a dataset in the layout of docs/dataset-format.md (both "
                                "maps)"),
    out: Path = typer.Option(..., "--out", metavar="FOLDER", help="new or empty folder for the packed copy"),
    size: int = typer.Option(256, "--size", min=32, metavar="N", help="side in pixels, at least 32, of the stored "
                             "square image (short side resized to it, centre-cropped)"),
    map_scale: int = typer.Option(2, "--map-scale", min=1, metavar="N", help="maps are stored at size / map-scale"),
    shard_size: int = typer.Option(4096, "--shard-size", min=1, metavar="N", help="images per shard"),
    quality: int = typer.Option(95, "--quality", min=50, max=100, metavar="N", help="JPEG quality of the stored "
                                "images, 50 to 100"),
    workers: int = typer.Option(os.cpu_count() or 1, "--workers", min=1, metavar="N", show_default="all cores",
                                help="processes, one shard each"),
) -> None:
    """Pack a dataset for fast pre-training reads: small square JPEGs and raw maps in shards.

    Example: cfmae pack /data/in1k-cfmae --out /fast/in1k-packed && cfmae pretrain --data /fast/in1k-packed
    """
    from cfmae_cli.data.packed import pack_dataset

    need_folder(data, "DATA")
    rgb = data / "rgb"
    if rgb.is_dir():
        top = list_folder(rgb)
        shards = -(-(len(top.files) + sum(len(list_folder(rgb / d).files) for d in top.dirs)) // shard_size)
    else:
        shards = None
    with writing(out, "--out"), Progress(console=console, disable=not is_terminal()) as bar, logs_to(console):
        task = bar.add_task("shards", total=shards)
        manifest = pack_dataset(data, out, size, map_scale, shard_size, quality, workers,
                                on_shard=lambda n: bar.update(task, completed=n))
    console.print(f"packed {manifest['images']} images into {len(manifest['shards'])} shard(s) at {size} px "
                  f"(maps {manifest['map_size']} px); {len(manifest['skipped'])} skipped"
                  + (" (listed in cfmae-packed.json)" if manifest["skipped"] else ""), highlight=False)
    console.print(f"Packed data: {out}", highlight=False)
