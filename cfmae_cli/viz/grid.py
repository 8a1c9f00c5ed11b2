"""One picture from many: a grid of equally sized cells with column titles and row labels."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from cfmae_cli.data.maps import resample_map  # noqa: E402
from cfmae_cli.formats import atomic_write, png_stamp  # noqa: E402


def fit(image: np.ndarray, side: int, smooth: bool) -> np.ndarray:
    """Scale an H×W×3 uint8 image to fit a side×side box (aspect kept): bilinear, or with ``smooth=False`` (maps
    drawn in colour) centre-aligned nearest neighbour, so that a map's cells stay on the image's."""
    h, w = image.shape[:2]
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if smooth:
        return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    return np.ascontiguousarray(np.moveaxis(resample_map(np.moveaxis(image, -1, 0), (size[1], size[0])), 0, -1))


def save_image_grid(rows: list[list[np.ndarray]], path: str | Path, columns: list[str], row_labels: list[str],
                    title: str = "", legend: list[tuple[str, tuple[int, int, int]]] | None = None,
                    colorbar: tuple[str, str] | None = None, command: str | None = None,
                    legend_title: str = "semantic classes") -> Path:
    """A figure of cells (H×W×3 uint8) drawn with matplotlib: column titles, row labels, a title, an optional
    legend of colour swatches titled ``legend_title`` (e.g. the semantic classes shown) and an optional colour bar ``(colormap,
    label)`` for cells that are heat maps of values in [0, 1]; written atomically as a PNG stamped with the
    ``command`` that drew it (:func:`cfmae_cli.formats.png_stamp`)."""
    cell_h = max(c.shape[0] for row in rows for c in row)
    cell_w = max(c.shape[1] for row in rows for c in row)
    side = 1.9  # inches of a cell's longer side
    w, h = side * cell_w / max(cell_h, cell_w), side * cell_h / max(cell_h, cell_w)
    label_in = 0.12 + 0.075 * max((len(s) for s in row_labels), default=0)
    legend_rows = -(-len(legend or []) // 5)
    fig = plt.figure(figsize=(label_in + len(columns) * (w + 0.1) + (0.9 if colorbar else 0.2),
                              0.75 + len(rows) * (h + 0.1) + 0.28 * legend_rows), layout="constrained")
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(len(columns)):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(row):
                ax.imshow(row[j], interpolation="nearest")
            else:
                ax.set_axis_off()
            if i == 0:
                ax.set_title(columns[j], fontsize=10)
            if j == 0:
                ax.set_ylabel(row_labels[i], fontsize=9, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=10)
    if legend:
        handles = [Patch(facecolor=(colour[0] / 255, colour[1] / 255, colour[2] / 255), edgecolor="black", label=name)
                   for name, colour in legend]
        fig.legend(handles=handles, loc="outside lower center", ncol=min(5, len(handles)), fontsize=8,
                   frameon=False, title=legend_title, title_fontsize=8)
    if colorbar:
        cmap, label = colorbar
        fig.colorbar(ScalarMappable(Normalize(0, 1), matplotlib.colormaps[cmap]), ax=axes, shrink=0.8,
                     label=label)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", pad_inches=0.1,
                metadata=png_stamp(command))
    plt.close(fig)
    return atomic_write(path, lambda fh: fh.write(buffer.getvalue()), binary=True)
