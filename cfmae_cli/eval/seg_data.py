"""The segmentation data pipeline of mmsegmentation's ADE20K recipe, on tensors.

Training (one sample, every draw from torch's CPU generator, so that the dataset's per-sample seeding
(:class:`~cfmae_cli.data.dataset.SeededDataset`) makes a resumed run identical):

1. resize to ``scale`` (long side cap, short side) times a ratio drawn from ``ratio_range``, keeping the aspect
   (the largest size within both caps); the image bilinearly, the labels by (centre-aligned) nearest neighbour;
2. a random ``crop`` x ``crop`` window whose largest labelled class covers less than ``cat_max_ratio`` of the
   labelled pixels of the window (and which holds two classes or more): up to 10 draws are checked, and when
   all fail a last draw is kept unchecked — mmseg's RandomCrop; the ignore label 255 is not counted;
3. a horizontal flip (``hflip``);
4. photometric distortion (mmseg's PhotoMetricDistortion): brightness ±``brightness_delta``, then contrast
   either here or last (a coin), saturation and hue in HSV, each step with probability 1/2; labels untouched;
5. padding to ``crop`` x ``crop`` at the bottom and right: the image with its mean colour (0 after
   normalisation, as mmseg pads the normalised image with 0), the labels with 255 (ignored).

Evaluation reads each image and its labels as they are; resizing and windows are the task's
(:func:`~cfmae_cli.eval.segmentation.predict`), on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from cfmae_cli.data.maps import resample_map
from cfmae_cli.formats import UNLABELLED

CAT_MAX_TRIES = 10  # mmseg's RandomCrop: checked draws before the next one is kept as it is


def rescale_size(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """(h, w) resized to fit ``scale`` = (long side cap, short side cap) with the aspect kept: mmcv's
    ``imrescale`` (the factor is the smaller of cap / side for the long and for the short side)."""
    long_cap, short_cap = max(scale), min(scale)
    factor = min(long_cap / max(h, w), short_cap / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(()))


def _coin() -> bool:
    return bool(torch.randint(2, ()).item())


def crop_origin(h: int, w: int, crop: int) -> tuple[int, int]:
    """A random top-left corner of a ``crop`` window of an (h, w) image (0 on a side not longer than crop)."""
    top = int(torch.randint(max(h - crop, 0) + 1, ()))
    left = int(torch.randint(max(w - crop, 0) + 1, ()))
    return top, left


def dominated(window: Tensor, cat_max_ratio: float) -> bool:
    """Whether a label window fails mmseg's check: fewer than two labelled classes, or one class covering
    ``cat_max_ratio`` or more of its labelled pixels (255 is not counted)."""
    _, counts = torch.unique(window[window != UNLABELLED], return_counts=True)
    return len(counts) < 2 or counts.max().item() / counts.sum().item() >= cat_max_ratio


def cat_max_crop(label: Tensor, crop: int, cat_max_ratio: float, tries: int = CAT_MAX_TRIES) -> tuple[int, int]:
    """mmseg's RandomCrop with ``cat_max_ratio``: the corner of the first of ``tries`` draws that is not
    :func:`dominated`, else one more draw, kept unchecked. ``cat_max_ratio`` 1 = any window."""
    h, w = label.shape[-2:]
    top, left = crop_origin(h, w, crop)
    if cat_max_ratio < 1:
        for _ in range(tries):
            if not dominated(label[top:top + crop, left:left + crop], cat_max_ratio):
                break
            top, left = crop_origin(h, w, crop)
    return top, left


def rgb_to_hsv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(3, H, W) RGB in [0, 255] → hue in [0, 1) (a turn), saturation in [0, 1], value in [0, 255]."""
    r, g, b = x
    v, _ = x.max(0)
    delta = v - x.min(0).values
    s = torch.where(v > 0, delta / v.clamp(min=1e-6), torch.zeros_like(v))
    d = delta.clamp(min=1e-6)
    h = torch.where(v == r, (g - b) / d, torch.where(v == g, 2 + (b - r) / d, 4 + (r - g) / d))
    h = torch.where(delta > 0, (h / 6) % 1.0, torch.zeros_like(h))
    return h, s, v


def hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """The inverse of :func:`rgb_to_hsv` → (3, H, W) RGB in [0, 255]."""
    h6 = (h % 1.0) * 6
    sector = h6.floor()
    f = h6 - sector
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    sector = sector.long() % 6
    choices = {0: (v, t, p), 1: (q, v, p), 2: (p, v, t), 3: (p, q, v), 4: (t, p, v), 5: (v, p, q)}
    out = torch.zeros(3, *h.shape, dtype=v.dtype)
    for k, channels in choices.items():
        out = torch.where(sector == k, torch.stack(channels), out)
    return out


@dataclass(frozen=True)
class Photometric:
    """mmseg's PhotoMetricDistortion: brightness, contrast, saturation, hue; each applied with probability 1/2."""

    brightness_delta: float = 32
    contrast_range: tuple[float, float] = (0.5, 1.5)
    saturation_range: tuple[float, float] = (0.5, 1.5)
    hue_delta: int = 18  # OpenCV's hue units (half degrees): 18 = 36 degrees

    @staticmethod
    def _convert(x: Tensor, alpha: float = 1.0, beta: float = 0.0) -> Tensor:
        """x · alpha + beta, clipped to [0, 255] and truncated to integers, as mmseg's ``convert`` (uint8)."""
        return (x * alpha + beta).clamp(0, 255).floor()

    def _contrast(self, x: Tensor) -> Tensor:
        return self._convert(x, alpha=_uniform(*self.contrast_range)) if _coin() else x

    def __call__(self, image: Tensor) -> Tensor:
        """(3, H, W) uint8 → (3, H, W) uint8."""
        x = image.float()
        if _coin():
            x = self._convert(x, beta=_uniform(-self.brightness_delta, self.brightness_delta))
        contrast_first = _coin()
        if contrast_first:
            x = self._contrast(x)
        if _coin():  # saturation
            h, s, v = rgb_to_hsv(x)
            s = (s * _uniform(*self.saturation_range)).clamp(0, 1)
            x = hsv_to_rgb(h, s, v).round()
        if _coin():  # hue: an integer shift in [-delta, delta) of OpenCV's 180 units a turn
            h, s, v = rgb_to_hsv(x)
            shift = int(torch.randint(-self.hue_delta, self.hue_delta, ())) if self.hue_delta > 0 else 0
            x = hsv_to_rgb(h + shift / 180, s, v).round()
        if not contrast_first:
            x = self._contrast(x)
        return x.clamp(0, 255).to(torch.uint8)


class SegTrainTransform:
    """(rgb uint8 (3, H, W), {'semantic': (H, W) long}) → rgb uint8 (3, crop, crop) and labels (crop, crop) long,
    by mmseg's ADE20K training pipeline (the module's docstring)."""

    train = True

    def __init__(self, crop: int, scale: tuple[int, int], ratio_range: tuple[float, float], cat_max_ratio: float,
                 hflip: float, photometric: Photometric | None, pad_rgb: tuple[int, int, int]):
        self.crop, self.scale, self.ratio_range = crop, tuple(scale), tuple(ratio_range)
        self.cat_max_ratio, self.hflip, self.photometric = cat_max_ratio, hflip, photometric
        self.pad_rgb = pad_rgb
        self.train = True

    def resize(self, rgb: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        """Step 1: a ratio of ``ratio_range`` times ``scale`` (mmseg rounds the scaled caps down), the aspect
        kept; bilinear image (no antialiasing, as OpenCV's), nearest labels."""
        ratio = _uniform(*self.ratio_range)
        scale = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        size = rescale_size(rgb.shape[-2], rgb.shape[-1], scale)
        rgb = TF.resize(rgb, list(size), interpolation=TF.InterpolationMode.BILINEAR, antialias=False)
        return rgb, resample_map(label, size)

    def __call__(self, rgb: Tensor, maps: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        label = maps["semantic"].long()
        rgb, label = self.resize(rgb, label)
        top, left = cat_max_crop(label, self.crop, self.cat_max_ratio)
        rgb = rgb[:, top:top + self.crop, left:left + self.crop]
        label = label[top:top + self.crop, left:left + self.crop]
        if _uniform(0, 1) < self.hflip:
            rgb, label = rgb.flip(-1), label.flip(-1)
        if self.photometric is not None:
            rgb = self.photometric(rgb)
        ph, pw = self.crop - rgb.shape[-2], self.crop - rgb.shape[-1]
        if ph or pw:
            rgb = torch.stack([F.pad(c, (0, pw, 0, ph), value=v) for c, v in zip(rgb, self.pad_rgb)])
            label = F.pad(label, (0, pw, 0, ph), value=UNLABELLED)
        return rgb.contiguous(), {"semantic": label.contiguous()}


class SegEvalTransform:
    """Evaluation: the image and its labels as they are (the task resizes on the device and scores at the
    annotation's own size, as mmseg does)."""

    train = False

    def __call__(self, rgb: Tensor, maps: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        return rgb, {"semantic": maps["semantic"].long()}
