"""``cfmae label --preview N``: RGB | instance | semantic of N labelled images across the classes (paper Fig. 6)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cfmae_cli.data.layout import map_path, read_manifest
from cfmae_cli.formats import MANIFEST_NAME
from cfmae_cli.labeling.pipeline import read_jsonl
from cfmae_cli.viz.grid import fit, save_image_grid
from cfmae_cli.viz.recon import palette

SIDE = 192


def write_preview(data: Path, count: int, path: Path | None = None) -> Path | None:
    """A grid PNG (default ``DATA/preview.png``) of ``count`` labelled images taken across the class folders
    in turn (the first of each class, then the second, …), with a legend of the semantic classes shown."""
    per_class = [read_jsonl(sidecar) for sidecar in sorted((data / "meta").glob("*.jsonl"))]
    records = [c[k] for k in range(max((len(c) for c in per_class), default=0)) for c in per_class if k < len(c)]
    records = records[:count]
    if not records:
        return None
    colours = palette()
    rows, labels, shown = [], [], set()
    with_depth = all(r.get("depth") for r in records)
    for r in records:
        with Image.open(data / "rgb" / r["rgb"]) as im:
            rgb = np.asarray(im.convert("RGB"))
        maps = [np.asarray(Image.open(map_path(data, m, r["class"], r["stem"]))).astype(np.int64)
                for m in ("instance", "semantic")]
        shown |= set(np.unique(maps[1]).tolist())
        cells = [fit(rgb, SIDE, True)] + [fit(colours[np.clip(m, 0, 255)], SIDE, False) for m in maps]
        if with_depth:
            depth = np.asarray(Image.open(map_path(data, "depth", r["class"], r["stem"]))).astype(np.float64)
            grey = np.round(depth / max(float(depth.max()), 1.0) * 255).astype(np.uint8)
            cells.append(fit(np.repeat(grey[..., None], 3, axis=2), SIDE, True))
        rows.append(cells)
        labels.append(f"{r['class']}/{r['stem']}"[-28:])
    names = read_manifest(data)["semantic_classes"] if (data / MANIFEST_NAME).is_file() else []
    legend = [(names[c], tuple(int(x) for x in colours[c])) for c in sorted(shown) if c < len(names)]
    columns = ["rgb", "instance", "semantic", *(["depth"] if with_depth else [])]
    return save_image_grid(rows, path or data / "preview.png", columns, labels,
                           f"{data.name}: {len(records)} labelled image(s)", legend)
