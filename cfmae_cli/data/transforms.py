"""Joint augmentation of RGB + instance + semantic maps, and canonical instance ids (docs/design.md §4.1).

One random-resized-crop and one flip draw apply to all three; the image is resized bilinearly (antialiased,
torchvision ``transforms.v2``) to ``img_size``, the maps from the same crop box with centre-aligned nearest
neighbour (:func:`~cfmae_cli.data.maps.resample_map`) to ``img_size / map_stride``, so that a map cell holds the
id under its centre and the maps stay on the image. An image map (depth) is resampled like the image, in
float32 when it was read so (a 16-bit depth map keeps its precision).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from cfmae_cli import modalities as table
from cfmae_cli.data.maps import resample_map
from cfmae_cli.formats import UNLABELLED


def canonical_instance_ids(ids: Tensor, num_ids: int) -> Tensor:
    """Re-number an instance map by area: 0 stays background, the largest instance becomes 1, the next 2, …
    up to ``num_ids − 1``; smaller instances become 255 (unlabelled). Ties go to the lower original id.

    ids: (h, w) integer tensor → (h, w) long.
    """
    ids = ids.long()
    values, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)  # values sorted
    counts = torch.where(values == 0, torch.full_like(counts, -1), counts)  # background ranks last
    order = torch.argsort(-counts, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    new = torch.where(rank + 1 < num_ids, rank + 1, torch.full_like(rank, UNLABELLED))
    new = torch.where(values == 0, torch.zeros_like(new), new)
    return new[inverse]


def narrow_ids(ids: Tensor) -> Tensor:
    """Id maps as they travel through the loader: uint8 when every id is ≤ 255 (canonical instance ids are below
    ``num_instance_ids`` ≤ 255 or 255 = unlabelled; the semantic ids of up to 255 classes), else int16 (ids up to
    32767), else int32; :func:`inputs_on_device` makes them long where the model reads them. ``torch.stack``
    promotes a batch of mixed widths to the widest."""
    top = int(ids.max()) if ids.numel() else 0
    return ids.to(torch.uint8 if top <= 255 else torch.int16 if top <= 32767 else torch.int32)


def _scaled_box(top: int, left: int, height: int, width: int, h: int, w: int, size: torch.Size
                ) -> tuple[float, float, float, float]:
    """A crop box of an (h, w) image in the pixels of a map of ``size``: the same box when the map has the
    image's size, scaled (fractions kept) when it is smaller (packed data keeps its maps at a fraction)."""
    fy, fx = size[0] / h, size[1] / w
    return top * fy, left * fx, height * fy, width * fx


class JointTransform:
    """(rgb uint8 (3, H, W), {modality: map}) → augmented, resized tensors, the same crop and flip for all.

    Returns rgb float (3, S, S) normalised with ``mean``/``std`` — or, with ``normalise=False``, uint8 (3, S, S)
    for :func:`normalise_on_device` (a quarter of the bytes through the loader and to the GPU) — and the maps
    as the table of modalities says: id maps (S/s, S/s) at the cells' centres, canonical ids where the
    entry asks (instance); image maps (C, S', S') resampled like the image (bilinear, antialiased) in their
    own dtype: uint8 stays uint8, a float map (depth, read at its full precision) stays float32 and is not
    quantised. Id maps leave as uint8 (int16 / int32 past 255: :func:`narrow_ids`), a quarter or an eighth of
    int64's bytes through the loader; they become long on the device (:func:`inputs_on_device`).
    """

    def __init__(self, img_size: int, map_stride: int, num_instance_ids: int, scale: tuple[float, float],
                 ratio: tuple[float, float], hflip: float, mean: tuple[float, ...], std: tuple[float, ...],
                 train: bool = True, normalise: bool = True, whole: bool = False):
        self.normalise = normalise
        self.whole = whole  # evaluation: the whole image resized to a square (segmentation), not its centre
        self.img_size = img_size
        self.map_size = img_size // map_stride
        self.num_instance_ids = num_instance_ids
        self.scale, self.ratio, self.hflip, self.train = scale, ratio, hflip, train
        self.mean, self.std = list(mean), list(std)

    def draw(self, h: int, w: int) -> tuple[int, int, int, int, bool]:
        """The crop box (top, left, height, width) of an (h, w) image and the flip: torchvision's
        ``RandomResizedCrop.get_params`` then one ``torch.rand`` under the caller's generator (training), or
        the fixed box (evaluation). The one draw of the CPU path and of the device path (``data.decode=gpu``:
        the workers draw it without decoding, :mod:`~cfmae_cli.data.device_augment`), so both crop alike."""
        if self.train:  # get_params reads only the size: a stand-in of no memory
            top, left, ch, cw = RandomResizedCrop.get_params(torch.empty(()).expand(1, h, w), list(self.scale),
                                                             list(self.ratio))
        elif self.whole:
            top, left, ch, cw = 0, 0, h, w
        else:
            top, left, ch, cw = (h - min(h, w)) // 2, (w - min(h, w)) // 2, min(h, w), min(h, w)
        return top, left, ch, cw, self.train and bool(torch.rand(()) < self.hflip)

    def __call__(self, rgb: Tensor, maps: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        image = tv_tensors.Image(rgb)
        h, w = rgb.shape[-2:]
        top, left, ch, cw, flip = self.draw(h, w)
        image = TF.resized_crop(image, top, left, ch, cw, [self.img_size] * 2, antialias=True)
        out = {}
        for name, x in maps.items():
            spec = table.get(name)
            side = self.map_size if spec.at_map_stride else self.img_size
            if spec.kind == "ids":
                x = resample_map(x, (side, side), _scaled_box(top, left, ch, cw, h, w, x.shape[-2:]))
            else:  # an image of the image's size: the image's own resampling
                x = TF.resized_crop(tv_tensors.Image(x), top, left, ch, cw, [side] * 2,
                                    antialias=True).as_subclass(Tensor)
            out[name] = x.flip(-1) if flip else x
            if spec.canonical:
                out[name] = canonical_instance_ids(out[name], self.num_instance_ids)
            if spec.kind == "ids":
                out[name] = narrow_ids(out[name])
        if flip:
            image = TF.horizontal_flip(image)
        if self.normalise:
            image = TF.normalize(TF.to_dtype(image, torch.float32, scale=True), self.mean, self.std)
        return image.as_subclass(Tensor), out


def device_constant(values: Sequence[float], device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """A small tensor of ``values`` made on ``device`` by fills, never copied from the host (a copy of host data
    to a GPU waits for the GPU: a sync in every step), and kept for the next call with the same values."""
    key = (tuple(values), str(device), dtype)
    found = _CONSTANTS.get(key)
    if found is None:
        found = _CONSTANTS[key] = torch.stack([torch.full((), v, dtype=dtype, device=device) for v in values])
    return found


_CONSTANTS: dict[tuple[tuple[float, ...], str, torch.dtype], Tensor] = {}


def normalise_on_device(rgb: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 (B, 3, S, S) → float32 normalised with ``mean``/``std``, where the tensor is (the GPU); a float
    tensor is returned as it is (already normalised). No host sync: the constants are made on the device."""
    if rgb.dtype != torch.uint8:
        return rgb
    m = device_constant(mean, rgb.device).view(1, 3, 1, 1) * 255
    s = device_constant(std, rgb.device).view(1, 3, 1, 1) * 255
    return (rgb.float() - m) / s


def inputs_on_device(batch: dict[str, Tensor], modalities: list[str], mean: tuple[float, ...],
                     std: tuple[float, ...], targets: Mapping[str, str] | None = None) -> dict[str, Tensor]:
    """The batch's modalities as the model reads them: images as float32 (normalised with ``mean`` / ``std``
    where the table of modalities says, else uint8 scaled to [0, 1] and float maps as they are, e.g. depth at
    its full precision), then standardised per image (MultiMAE's truncated standardisation,
    :func:`~cfmae_cli.modalities.standardise_per_image`) where the modality's target is ``standardise`` (the
    entry's, unless ``targets`` — ``model.image_targets`` — names it); id maps as long (they travel as uint8,
    :func:`narrow_ids`)."""
    out = {}
    for name in modalities:
        x, spec = batch[name], table.get(name)
        if spec.kind == "image":
            if spec.normalise:
                x = normalise_on_device(x, mean, std)
            else:
                x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
            if table.target_of(spec, targets) == "standardise":
                x = table.standardise_per_image(x)
        else:
            x = x.long()
        out[name] = x
    return out
