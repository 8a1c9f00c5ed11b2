"""Label maps (instance and semantic ids) resampled without blending and without moving them off the image.

Every resize of a map goes through :func:`resample_map`: centre-aligned nearest neighbour, each output cell
taking the id under its centre (torchvision's ``NEAREST_EXACT``, PIL's ``NEAREST``). torchvision's
``NEAREST`` (and ``F.interpolate(mode='nearest')``) takes the id at the cell's top-left corner instead, which
shifts a map by half an output cell right and down against an image resized with centred sampling.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:
    import torch

Map = TypeVar("Map", np.ndarray, "torch.Tensor")


def _centres(start: float, length: float, out: int, limit: int) -> np.ndarray:
    """Source indices ⌊start + (i + ½)·length/out⌋ of ``out`` cells, clipped to ``[0, limit)``."""
    idx = np.floor(start + (np.arange(out, dtype=np.float64) + 0.5) * (length / out)).astype(np.int64)
    return np.clip(idx, 0, limit - 1)


def resample_map(ids: Map, size: tuple[int, int] | list[int],
                 box: tuple[float, float, float, float] | None = None) -> Map:
    """(…, h, w) ids → (…, H, W): the region ``box`` = (top, left, height, width) of the map, in its own
    pixels (fractions allowed: a crop box of an image scaled to a smaller map), resampled to ``size``; the
    whole map by default. Cell (i, j) reads row ⌊top + (i + ½)·height/H⌋ and column ⌊left + (j + ½)·width/W⌋,
    so the output lines up with an image resized from the same box by any centred filter (bilinear,
    bicubic, antialiased). NumPy arrays and tensors (on any device) alike; ids are never mixed."""
    h, w = ids.shape[-2:]
    out_h, out_w = int(size[0]), int(size[1])
    top, left, height, width = (0.0, 0.0, float(h), float(w)) if box is None else box
    if (top, left, height, width, out_h, out_w) == (0, 0, h, w, h, w):
        return ids
    rows, cols = _centres(top, height, out_h, h), _centres(left, width, out_w, w)
    if isinstance(ids, np.ndarray):
        return ids[..., rows[:, None], cols[None, :]]
    import torch  # a tensor: index on its device

    rows_t, cols_t = torch.from_numpy(rows).to(ids.device), torch.from_numpy(cols).to(ids.device)
    return ids[..., rows_t[:, None], cols_t[None, :]]


def to_uint16(depth: np.ndarray) -> np.ndarray:
    """Min-max scale a float map to 0..65535, as depth maps are stored (a constant or non-finite map: all 0)."""
    low, high = float(np.min(depth)), float(np.max(depth))
    if not np.isfinite(low) or not np.isfinite(high) or high <= low:
        return np.zeros(depth.shape, np.uint16)
    return np.round((depth - low) / (high - low) * 65535).astype(np.uint16)
