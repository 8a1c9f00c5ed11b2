"""A classical labeller: instance and semantic maps from colour and texture, with no learned weights.

It makes the maps CFMAE trains on when no segmentation model is at hand (the built-in demo dataset,
and the classical backend of a future labelling command). The maps are rough but deterministic and consistent across
images: the same colour gets the same semantic class in every photo.

* **Instances** — a coarse graph-based segmentation (Felzenszwalb & Huttenlocher) of the image.
  Segments that cover much of the image border, or most of the image, are background (id 0); segments
  smaller than ``min_instance_frac`` of the image are dropped (id 0); the rest, largest first, become
  instances ``1..n`` (at most ``max_instances``).
* **Semantic** — a finer graph-based segmentation into regions; each region gets one class of
  :data:`SEMANTIC_CLASSES` from its mean colour in HSV (hue bins for saturated colours, dark / bright /
  gray for unsaturated ones) and, for unsaturated regions, its texture (mean local standard deviation).
  Every pixel gets a class; id 255 (unlabelled) is never produced.
* **Depth** (:meth:`ClassicalLabeller.depth`, only when asked) — a monocular depth *cue*, not a measurement:
  nearness = 0.4 · height in the image (lower = nearer, the ground-plane prior) + 0.3 · local detail (rank of
  the smoothed gradient energy: sharp = in focus = nearer) + 0.3 · figure (on an instance = nearer than the
  background), the last two averaged over each semantic region (a surface keeps one value, the ground plane
  still slopes), lightly smoothed and scaled to 0..65535 per image; larger = nearer, as Depth Anything's
  inverse depth.

The work happens on a copy of the image scaled so that its longer side is at most ``work_size``
pixels (so the parameters mean the same thing at any resolution and large photos stay fast); the maps
are scaled back to the input's exact height and width with centre-aligned nearest-neighbour sampling
(:func:`cfmae_cli.data.maps.resample_map`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.color import rgb2hsv
from skimage.segmentation import felzenszwalb

from cfmae_cli.data.maps import resample_map, to_uint16

logger = logging.getLogger(__name__)

#: Semantic class names; the index is the id written in semantic maps.
SEMANTIC_CLASSES: list[str] = [
    "dark",            # 0: value below ``dark_value``
    "bright",          # 1: unsaturated and value above ``bright_value`` (white, light gray)
    "gray",            # 2: unsaturated, mid value, smooth
    "textured",        # 3: unsaturated, mid value, high local contrast (gravel, foliage in shade, hair)
    "red",             # 4: hue [345°, 15°)
    "orange-brown",    # 5: hue [15°, 40°)  (skin, wood, brown)
    "yellow",          # 6: hue [40°, 70°)
    "green",           # 7: hue [70°, 160°)
    "cyan",            # 8: hue [160°, 200°)
    "blue",            # 9: hue [200°, 260°)
    "purple-magenta",  # 10: hue [260°, 345°)
]

# Upper hue bound (degrees) of each chromatic class, in order around the colour wheel from red.
_HUE_BINS: tuple[tuple[float, int], ...] = (
    (15.0, 4), (40.0, 5), (70.0, 6), (160.0, 7), (200.0, 8), (260.0, 9), (345.0, 10), (360.1, 4),
)
_DARK, _BRIGHT, _GRAY, _TEXTURED = 0, 1, 2, 3


@dataclass
class ClassicalLabeller:
    """Instance and semantic maps from a colour photograph, by graph-based segmentation.

    Parameters (the segmentation ones are in pixels of the ``work_size`` image):

    * ``work_size`` — the longer side of the working copy (larger images are scaled down first).
    * ``instance_scale``, ``instance_sigma``, ``instance_min_size`` — Felzenszwalb parameters of the
      coarse instance segmentation.
    * ``min_instance_frac`` — segments below this fraction of the image area are not instances.
    * ``max_instance_frac`` — segments above this fraction of the image area are background.
    * ``border_frac`` — segments covering at least this fraction of the image border are background.
    * ``min_fill`` — segments filling less than this fraction of their bounding box (thin edges,
      rings, fragments) are not instances.
    * ``max_instances`` — keep at most this many instances (the largest).
    * ``region_scale``, ``region_sigma``, ``region_min_size`` — Felzenszwalb parameters of the finer
      regions that get one semantic class each.
    * ``dark_value``, ``bright_value``, ``min_saturation``, ``texture_std`` — colour thresholds (HSV
      value and saturation in [0, 1]; gray-level local standard deviation in [0, 1]).
    """

    work_size: int = 128
    instance_scale: float = 400.0
    instance_sigma: float = 0.8
    instance_min_size: int = 40
    min_instance_frac: float = 0.01
    max_instance_frac: float = 0.6
    border_frac: float = 0.15
    min_fill: float = 0.25
    max_instances: int = 15
    region_scale: float = 60.0
    region_sigma: float = 0.5
    region_min_size: int = 15
    dark_value: float = 0.18
    bright_value: float = 0.82
    min_saturation: float = 0.22
    texture_std: float = 0.07

    def __post_init__(self) -> None:
        if self.work_size < 16:
            raise ValueError(f"work_size must be at least 16, got {self.work_size}")
        if not 1 <= self.max_instances <= 65535:
            raise ValueError(f"max_instances must lie in [1, 65535], got {self.max_instances}")
        if not 0.0 <= self.min_instance_frac < self.max_instance_frac <= 1.0:
            raise ValueError("need 0 <= min_instance_frac < max_instance_frac <= 1")

    @property
    def instance_dtype(self) -> str:
        """``"uint8"`` when ``max_instances`` fits in a byte, else ``"uint16"``."""
        return "uint8" if self.max_instances <= 255 else "uint16"

    def describe(self) -> dict[str, Any]:
        """The method and its parameters, JSON-serialisable, for the manifest's ``labelling`` entry."""
        return {
            "name": "classical",
            "instance_method": "skimage.segmentation.felzenszwalb; border-heavy/large segments = background",
            "semantic_method": "skimage.segmentation.felzenszwalb regions; mean HSV colour + local std texture",
            "depth_method": "a cue, not a measurement: 0.4 height in image + 0.3 detail rank + 0.3 on an instance, "
                            "the last two averaged per semantic region; uint16 per image, larger = nearer "
                            "(written when asked)",
            "semantic_classes": list(SEMANTIC_CLASSES),
            "params": asdict(self),
        }

    def label(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Label one image.

        Args:
            rgb: ``(H, W, 3)`` uint8 colour image (``(H, W)`` gray and ``(H, W, 4)`` RGBA are accepted
                and converted).

        Returns:
            ``(instance, semantic)``: ``instance`` is ``(H, W)`` uint8 (uint16 when ``max_instances`` >
            255) with 0 = background and ``1..n`` instances, largest first; ``semantic`` is ``(H, W)``
            uint8 with ids ``< len(SEMANTIC_CLASSES)`` at every pixel.
        """
        image = _as_rgb_uint8(rgb)
        height, width = image.shape[:2]
        work = _downscale(image, self.work_size)
        instance_small = self._instances(work)
        semantic_small = self._semantic(work)
        instance = resample_map(instance_small, (height, width)).astype(self.instance_dtype)
        semantic = resample_map(semantic_small, (height, width)).astype(np.uint8)
        return instance, semantic

    def depth(self, rgb: np.ndarray) -> np.ndarray:
        """The classical depth cue of one image (module docstring): ``(H, W)`` uint16, larger = nearer."""
        image = _as_rgb_uint8(rgb)
        height, width = image.shape[:2]
        work = _downscale(image, self.work_size)
        h, w = work.shape[:2]
        rows = np.broadcast_to(np.linspace(0.0, 1.0, h)[:, None], (h, w))
        gray = work.astype(np.float64).mean(axis=2) / 255.0
        energy = ndimage.gaussian_filter(np.hypot(ndimage.sobel(gray, 0), ndimage.sobel(gray, 1)) ** 2,
                                         sigma=max(h, w) / 32)
        detail = np.argsort(np.argsort(energy, axis=None), axis=None).reshape(h, w) / max(h * w - 1, 1)
        figure = (self._instances(work) > 0).astype(np.float64)
        regions = self._regions(work)
        counts = np.maximum(np.bincount(regions.ravel()), 1)
        surface = np.bincount(regions.ravel(), weights=(0.3 * detail + 0.3 * figure).ravel()) / counts
        near = ndimage.gaussian_filter(0.4 * rows + surface[regions], sigma=1.0)
        full = Image.fromarray(near.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR)
        return to_uint16(np.asarray(full))

    # ------------------------------------------------------------------ instances
    def _instances(self, work: np.ndarray) -> np.ndarray:
        """``(h, w)`` int instance ids of the working image (0 = background)."""
        segments = felzenszwalb(work, scale=self.instance_scale, sigma=self.instance_sigma,
                                min_size=self.instance_min_size)
        n_seg = int(segments.max()) + 1
        total = segments.size
        areas = np.bincount(segments.ravel(), minlength=n_seg)
        border = np.concatenate([segments[0, :], segments[-1, :], segments[1:-1, 0], segments[1:-1, -1]])
        border_counts = np.bincount(border, minlength=n_seg)
        area_frac = areas / total
        border_share = border_counts / max(border.size, 1)
        fill = np.zeros(n_seg)
        for seg_id, box in enumerate(ndimage.find_objects(segments + 1)):
            if box is not None:
                fill[seg_id] = areas[seg_id] / ((box[0].stop - box[0].start) * (box[1].stop - box[1].start))
        keep = ((area_frac >= self.min_instance_frac) & (area_frac <= self.max_instance_frac)
                & (border_share < self.border_frac) & (fill >= self.min_fill))
        candidates = np.flatnonzero(keep)
        # Largest first; ties broken by segment id so the order is deterministic.
        order = candidates[np.lexsort((candidates, -areas[candidates]))][: self.max_instances]
        lut = np.zeros(n_seg, dtype=np.int64)
        lut[order] = np.arange(1, len(order) + 1)
        return lut[segments]

    # ------------------------------------------------------------------ semantic
    def _regions(self, work: np.ndarray) -> np.ndarray:
        """``(h, w)`` int ids of the fine regions that get one semantic class (and one depth value) each."""
        return felzenszwalb(work, scale=self.region_scale, sigma=self.region_sigma, min_size=self.region_min_size)

    def _semantic(self, work: np.ndarray) -> np.ndarray:
        """``(h, w)`` uint8 semantic ids of the working image."""
        regions = self._regions(work)
        n_reg = int(regions.max()) + 1
        flat = regions.ravel()
        counts = np.maximum(np.bincount(flat, minlength=n_reg), 1).astype(np.float64)
        pixels = work.reshape(-1, 3).astype(np.float64) / 255.0
        # float64 (bincount with weights; numpy's stubs say an int array)
        means: np.ndarray = np.stack([np.bincount(flat, weights=pixels[:, c], minlength=n_reg) for c in range(3)], 1)
        means /= counts[:, None]
        gray = work.astype(np.float64).mean(axis=2) / 255.0
        local_mean = ndimage.uniform_filter(gray, size=5, mode="reflect")
        local_sq = ndimage.uniform_filter(gray * gray, size=5, mode="reflect")
        local_std = np.sqrt(np.clip(local_sq - local_mean * local_mean, 0.0, None))
        texture = np.bincount(flat, weights=local_std.ravel(), minlength=n_reg) / counts
        classes = classify_colours(means, texture, dark_value=self.dark_value, bright_value=self.bright_value,
                                   min_saturation=self.min_saturation, texture_std=self.texture_std)
        return classes[regions]


class ClassicalDepth:
    """``cfmae label --depth classical``: :meth:`ClassicalLabeller.depth` as a depth backend of the pipeline."""

    name = "classical"

    def __init__(self, labeller: ClassicalLabeller | None = None):
        self.labeller = labeller if labeller is not None else ClassicalLabeller()

    def label_depth(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """(H, W) uint16 depth cue for each image, at the image's size."""
        return [self.labeller.depth(image) for image in images]

    def describe(self) -> dict[str, Any]:
        """JSON-ready provenance for the dataset manifest."""
        return {"backend": self.name, "method": self.labeller.describe()["depth_method"],
                "params": asdict(self.labeller),
                "stored": "uint16 PNG, min-max scaled per image (a cue of relative nearness, larger = nearer)"}


def classify_colours(means: np.ndarray, texture: np.ndarray, *, dark_value: float = 0.18,
                     bright_value: float = 0.82, min_saturation: float = 0.22,
                     texture_std: float = 0.07) -> np.ndarray:
    """Semantic class ids of region colours.

    Args:
        means: ``(k, 3)`` float mean RGB of each region, in [0, 1].
        texture: ``(k,)`` float mean local gray-level standard deviation of each region, in [0, 1].

    Returns:
        ``(k,)`` uint8 ids into :data:`SEMANTIC_CLASSES`.
    """
    means = np.clip(np.asarray(means, dtype=np.float64), 0.0, 1.0)
    hsv = rgb2hsv(means.reshape(-1, 1, 3)).reshape(-1, 3)
    hue, sat, val = hsv[:, 0] * 360.0, hsv[:, 1], hsv[:, 2]
    out = np.full(len(means), _GRAY, dtype=np.uint8)
    chromatic = (sat >= min_saturation) & (val >= dark_value)
    for upper, cls in reversed(_HUE_BINS):  # smallest bound applied last wins
        out[chromatic & (hue < upper)] = cls
    achromatic = ~chromatic
    out[achromatic & (np.asarray(texture) >= texture_std)] = _TEXTURED
    out[achromatic & (val >= bright_value) & (np.asarray(texture) < texture_std)] = _BRIGHT
    out[val < dark_value] = _DARK
    return out


def _as_rgb_uint8(rgb: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 from an RGB, RGBA or gray array; raise ``ValueError`` otherwise."""
    image = np.asarray(rgb)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    image = image[:, :, :3]
    if image.dtype == np.bool_:
        image = image.astype(np.uint8) * 255
    elif image.dtype.kind == "f":  # floats in [0, 1] (skimage convention) or [0, 255]
        scale = 255.0 if image.max(initial=0.0) <= 1.0 else 1.0
        image = np.clip(np.rint(image * scale), 0, 255).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)


def _downscale(image: np.ndarray, max_side: int) -> np.ndarray:
    """Scale ``(H, W, 3)`` uint8 so its longer side is at most ``max_side`` (area-preserving filter)."""
    height, width = image.shape[:2]
    longer = max(height, width)
    if longer <= max_side:
        return image
    new_h = max(1, round(height * max_side / longer))
    new_w = max(1, round(width * max_side / longer))
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BOX))

