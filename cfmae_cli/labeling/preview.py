"""``cfmae label --preview N``: RGB | instance | semantic of N labelled images across the classes (paper Fig. 6)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from cfmae_cli import modalities as table
from cfmae_cli.data.dataset import read_map, skip_reason
from cfmae_cli.data.layout import map_path, read_manifest
from cfmae_cli.formats import MANIFEST_NAME
from cfmae_cli.labeling.pipeline import read_jsonl
from cfmae_cli.viz.grid import fit, save_image_grid
from cfmae_cli.viz.recon import legend_title
from cfmae_cli.viz.palette import instance_palette, legend_entries, semantic_palette

SIDE = 192
log = logging.getLogger(__name__)


def write_preview(data: Path, count: int, path: Path | None = None) -> Path | None:
    """A grid PNG (default ``DATA/preview.png``) of ``count`` labelled images taken across the class folders
    in turn (the first of each class, then the second, …), with a legend of the semantic classes shown. The
    maps are read as training reads them (:func:`~cfmae_cli.data.dataset.read_map`); an image whose maps
    training would skip is left out with a warning naming the file."""
    per_class = [read_jsonl(sidecar) for sidecar in sorted((data / "meta").glob("*.jsonl"))]
    records = [c[k] for k in range(max((len(c) for c in per_class), default=0)) for c in per_class if k < len(c)]
    with_depth = bool(records[:count]) and all(r.get("depth") for r in records[:count])
    classes = read_manifest(data)["semantic_classes"] if (data / MANIFEST_NAME).is_file() else []
    semantic, instance = semantic_palette(classes), instance_palette()
    rows: list[list[np.ndarray]] = []
    labels: list[str] = []
    shown: set[int] = set()
    for r in records:
        if len(rows) == count:
            break
        names = ["instance", "semantic", *(["depth"] if with_depth else [])]
        try:
            with Image.open(data / "rgb" / r["rgb"]) as im:
                rgb = np.asarray(im.convert("RGB"))
            maps = [read_map(map_path(data, m, r["class"], r["stem"]), (rgb.shape[1], rgb.shape[0]), table.get(m))
                    .numpy() for m in names]
        except Exception as exc:  # noqa: BLE001 - skip_reason decides, a bug is raised
            reason = skip_reason(exc)
            if reason is None:
                raise
            log.warning("preview: %s left out (%s)", data / "rgb" / r["rgb"], reason)
            continue
        shown |= set(np.unique(maps[1]).tolist())
        cells = [fit(rgb, SIDE, True)] + [fit(colours[np.clip(m, 0, 255)], SIDE, False)
                                          for colours, m in zip((instance, semantic), maps[:2])]
        if with_depth:
            depth = maps[2][0]  # in [0, 1] at the file's precision, stretched to its largest value
            grey = np.round(depth / depth.max() * 255 if depth.max() > 0 else depth).astype(np.uint8)
            cells.append(fit(np.repeat(grey[..., None], 3, axis=2), SIDE, True))
        rows.append(cells)
        labels.append(f"{r['class']}/{r['stem']}"[-28:])
    if not rows:
        return None
    columns = ["rgb", "instance", "semantic", *(["depth"] if with_depth else [])]
    return save_image_grid(rows, path or data / "preview.png", columns, labels,
                           f"{data.name}: {len(rows)} labelled image(s)", legend_entries(classes, shown),
                           legend_title=legend_title(["instance", "semantic"]))
