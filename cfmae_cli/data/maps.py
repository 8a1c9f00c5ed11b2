"""Label maps (instance and semantic ids): the one reader of their files, and their resampling without blending
and without moving them off the image.

Every id map file is read by :func:`read_ids`, whoever reads it (``cfmae pack``, pre-training, fine-tuning, the
figures, the label preview, ``attention-map --stats``), with one decision per PIL mode (:data:`ID_MODES`):
grey values, palette *indices* (never the palette's colours), 16-bit grey values; a file with colour or alpha
channels is refused, naming the file, its mode and what to save instead. A refused file is a
:class:`BadSample`, with the same message wherever it is read.

Every resize of a map goes through :func:`resample_map`: centre-aligned nearest neighbour, each output cell
taking the id under its centre (torchvision's ``NEAREST_EXACT``, PIL's ``NEAREST``). torchvision's
``NEAREST`` (and ``F.interpolate(mode='nearest')``) takes the id at the cell's top-left corner instead, which
shifts a map by half an output cell right and down against an image resized with centred sampling.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from cfmae_cli.formats import UNLABELLED

if TYPE_CHECKING:
    import torch

# How each PIL mode of an id map file gives its ids; any other mode (colour, alpha, floating point) is refused.
ID_MODES: dict[str, str] = {
    "L": "8-bit grey: the values",
    "P": "palette: the indices (as VOC- and ADE-style tools store class ids), never the colours",
    "I;16": "16-bit grey: the values", "I;16B": "16-bit grey: the values", "I;16L": "16-bit grey: the values",
    "I": "grey read by an older Pillow as 32-bit: the values, which must lie in [0, 65535]",
    "1": "1-bit: 0 and 1 (a mask of one object), not 0 and 255",
}
_ALPHA = {"LA", "La", "PA", "RGBA", "RGBa"}
SAVE_IDS = ("save the ids as an 8-bit grey PNG (16-bit grey for ids above 255; cfmae_cli.data.layout.save_map "
            "picks the depth) or as a palette PNG whose indices are the ids")


#: What reading a bad image file raises (not a bug): the one list of the reasons to skip an unreadable file.
UNREADABLE = (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)


class BadSample(Exception):
    """A sample that cannot be used; the message names the file and says why."""


@contextlib.contextmanager
def opened(path: str | Path) -> Iterator[Image.Image]:
    """``Image.open`` of a map; a file that cannot be opened or decoded (inside the block too) is a
    :class:`BadSample` naming it (PIL's own messages often do not)."""
    try:
        with Image.open(path) as im:
            yield im
    except UNREADABLE as exc:
        raise BadSample(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None


def check_size(path: str | Path, size: tuple[int, int], expect: tuple[int, int] | None) -> None:
    """A map has its image's size (W, H), or is a :class:`BadSample`."""
    if expect is not None and tuple(size) != tuple(expect):
        raise BadSample(f"{path}: map size {size[0]}x{size[1]} differs from the image's {expect[0]}x{expect[1]}")


def read_ids(path: str | Path, expect_size: tuple[int, int] | None = None, name: str = "id") -> np.ndarray:
    """The (h, w) int64 ids of an id map file (the ``name`` map), in [0, 65535], as :data:`ID_MODES` says;
    ``expect_size``: the image's (W, H), which the map must have. Anything else is a :class:`BadSample`."""
    with opened(path) as im:
        check_size(path, im.size, expect_size)
        mode = im.mode
        if mode not in ID_MODES:
            why = ("an alpha channel" if mode in _ALPHA else "floating-point values" if mode == "F" else
                   "colour channels" if len(im.getbands()) > 1 else "a pixel format of no ids")
            raise BadSample(f"{path}: a {name} map must hold one id per pixel (PIL mode L, P, I;16 or 1), not "
                            f"mode {mode} ({why}); {SAVE_IDS}")
        ids = np.asarray(im).astype(np.int64)
    if mode == "I" and ids.size and (ids.min() < 0 or ids.max() > 65535):
        raise BadSample(f"{path}: {name} ids {int(ids.min())}..{int(ids.max())} lie outside [0, 65535]; {SAVE_IDS}")
    return ids


def check_class_ids(ids: np.ndarray, path: str | Path, name: str, classes: int) -> None:
    """Ids of the manifest's ``classes`` semantic classes are below it or :data:`UNLABELLED`, or the map is a
    :class:`BadSample`."""
    bad = (ids >= classes) & (ids != UNLABELLED)
    if bad.any():
        raise BadSample(f"{path}: {name} id {int(ids[bad].max())} is not below the {classes} classes of the "
                        f"manifest and is not {UNLABELLED}")


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
