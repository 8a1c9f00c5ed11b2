"""``cfmae label --preview N``: RGB | instance | semantic of the first N labelled images (paper Fig. 6)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cfmae_cli.data.layout import map_path
from cfmae_cli.labeling.pipeline import read_jsonl
from cfmae_cli.viz.grid import fit, save_image_grid
from cfmae_cli.viz.recon import palette

SIDE = 192


def write_preview(data: Path, count: int, path: Path | None = None) -> Path | None:
    """A grid PNG (default ``DATA/preview.png``) of the first ``count`` images of the sorted sidecars."""
    records = []
    for sidecar in sorted((data / "meta").glob("*.jsonl")):
        records += read_jsonl(sidecar)
        if len(records) >= count:
            break
    records = records[:count]
    if not records:
        return None
    colours = palette()
    rows, labels = [], []
    for r in records:
        with Image.open(data / "rgb" / r["rgb"]) as im:
            rgb = np.asarray(im.convert("RGB"))
        maps = [np.asarray(Image.open(map_path(data, m, r["class"], r["stem"]))).astype(np.int64)
                for m in ("instance", "semantic")]
        cells = [fit(rgb, SIDE, True)] + [fit(colours[np.clip(m, 0, 255)], SIDE, False) for m in maps]
        rows.append(cells)
        labels.append(f"{r['class']}/{r['stem']}"[-28:])
    return save_image_grid(rows, path or data / "preview.png", ["rgb", "instance", "semantic"], labels,
                           f"{data.name}: {len(records)} labelled image(s)")
