"""One picture from many: a grid of equally sized cells with column titles and row labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from cfmae_cli.data.maps import resample_map
from cfmae_cli.formats import atomic_write, software


def fit(image: np.ndarray, side: int, smooth: bool) -> np.ndarray:
    """Scale an H×W×3 uint8 image to fit a side×side box (aspect kept): bilinear, or with ``smooth=False`` (maps
    drawn in colour) centre-aligned nearest neighbour, so that a map's cells stay on the image's."""
    h, w = image.shape[:2]
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if smooth:
        return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    return np.ascontiguousarray(np.moveaxis(resample_map(np.moveaxis(image, -1, 0), (size[1], size[0])), 0, -1))


def save_image_grid(rows: list[list[np.ndarray]], path: str | Path, columns: list[str], row_labels: list[str],
                    title: str = "", legend: list[tuple[str, tuple[int, int, int]]] | None = None) -> Path:
    """Cells (H×W×3 uint8, any sizes up to the largest) on a white canvas, and an optional legend of colour
    swatches with names under it; written atomically as PNG."""
    cell_h = max(c.shape[0] for row in rows for c in row)
    cell_w = max(c.shape[1] for row in rows for c in row)
    pad, head = 4, 30
    label_w = max(70, 7 * max((len(s) for s in row_labels), default=0) + 2 * pad)
    width = max(label_w + len(columns) * (cell_w + pad) + pad, 6 * len(title) + 2 * pad)
    per_line = max(1, width // 150)
    legend_h = (len(legend or []) + per_line - 1) // per_line * 16 + (8 if legend else 0)
    height = head + len(rows) * (cell_h + pad) + pad + legend_h
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 2), title, fill="black")
    for j, name in enumerate(columns):
        draw.text((label_w + j * (cell_w + pad) + pad, 16), name, fill="black")
    for i, (label, row) in enumerate(zip(row_labels, rows)):
        y = head + i * (cell_h + pad)
        draw.text((pad, y + cell_h // 2 - 5), label, fill="black")
        for j, cell in enumerate(row):
            canvas.paste(Image.fromarray(cell), (label_w + j * (cell_w + pad) + pad, y))
    top = head + len(rows) * (cell_h + pad) + pad
    for i, (name, colour) in enumerate(legend or []):
        x, y = pad + (i % per_line) * 150, top + (i // per_line) * 16
        draw.rectangle([x, y, x + 11, y + 11], fill=tuple(int(c) for c in colour), outline="black")
        draw.text((x + 16, y), name[:20], fill="black")
    return save_png(canvas, path)


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write ``image`` as a PNG atomically, stamped as cfmae's (so a rerun may replace it, nothing else)."""
    info = PngInfo()
    info.add_text("Software", software())
    return atomic_write(path, lambda fh: image.save(fh, format="PNG", pnginfo=info), binary=True)
