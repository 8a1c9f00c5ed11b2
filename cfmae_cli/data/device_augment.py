"""The device's side of ``data.decode: gpu``: decode a batch of JPEGs and crop, resize and flip it and its maps,
batched, on the training device (the GPU; the CPU when training on it). The workers (:mod:`~cfmae_cli.data.raw`)
have read the bytes and drawn each sample's crop box and flip exactly as the CPU path draws them.

Decoder: ``torchvision.io.decode_jpeg`` (libjpeg-turbo on the CPU, nvJPEG batched on a GPU), its torchvision 0.29
deprecation warning filtered at the call (docs/performance.md says why not TorchCodec yet).

Resampling, batched, one pair of matrices per sample: the images are cut to their crop boxes, padded in groups
of similar size (:data:`PAD_BYTES`) and each output is ``Wy · image · Wxᵀ``, where the rows of ``Wy`` / ``Wx`` hold the weights of PyTorch's antialiased
bilinear filter (``F.interpolate(antialias=True)``, what torchvision's ``resized_crop`` runs) over the sample's
crop box, zero outside it, the flip a reversal of ``Wx``'s rows. So the maths is the CPU path's: the same
triangle filter widened by the downscale factor, not ``grid_sample`` (no antialiasing: aliased where a crop is
shrunk). The CPU path's uint8 kernel rounds its weights to fixed point and its horizontal pass to uint8; this
one works in float32 and rounds once: RGB differs by at most one grey level (tests/test_device_augment.py).
Id maps: the cell-centre rule of :func:`~cfmae_cli.data.maps.resample_map` (row ⌊top + (i + ½)·height/H⌋,
in float64 as it computes it) gathered batched, then canonical instance ids ranked per sample, batched.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from typing import Any, Iterator

import torch
from torch import Tensor

from cfmae_cli import modalities as table
from cfmae_cli.data.dataset import Skipped
from cfmae_cli.data.packed import DEPRECATED
from cfmae_cli.errors import DataError
from cfmae_cli.formats import UNLABELLED

log = logging.getLogger(__name__)

try:
    from torchvision.io import decode_jpeg as _decode_jpeg, ImageReadMode
except ImportError:  # pragma: no cover - a torchvision without image decoding
    _decode_jpeg = None



def _decode(data: list[Tensor], device: torch.device) -> list[Tensor]:
    if _decode_jpeg is None:  # pragma: no cover
        raise DataError("data.decode=gpu needs torchvision's decode_jpeg; set data.decode=cpu")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=DEPRECATED, category=DeprecationWarning)
        out = _decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return list(out)


def decode_batch(data: list[Tensor], files: list[str], device: torch.device
                 ) -> tuple[list[Tensor | None], list[tuple[str, str]]]:
    """JPEG bytes (or pixels (3, H, W) a worker decoded) → uint8 (3, H, W) on ``device``, batched; a batch that
    fails is decoded one by one: each JPEG that fails is None, with (file, reason)."""
    out: list[Tensor | None] = [None] * len(data)
    jpegs = [i for i, x in enumerate(data) if x.dim() == 1]
    for i, x in enumerate(data):
        if x.dim() == 3:
            out[i] = x.to(device, non_blocking=True)
    bad: list[tuple[str, str]] = []
    if jpegs:
        source = [data[i].cpu() for i in jpegs]
        try:
            for i, image in zip(jpegs, _decode(source, device)):
                out[i] = image
        except RuntimeError:  # find the file(s)
            for i, x in zip(jpegs, source):
                try:
                    out[i] = _decode([x], device)[0]
                except RuntimeError as exc:
                    bad.append((files[i], f"unreadable: JPEG decode on {device.type}: {str(exc).splitlines()[-1]}"))
    return out, bad


def aa_weights(start: Tensor, length: Tensor, out: int, size: int) -> Tensor:
    """(B, out, size) float32: row i of sample b holds the weights of PyTorch's antialiased bilinear filter for
    output i of the crop [start, start + length) of an axis of ``size`` pixels (zero outside the crop)."""
    start, length = start.double()[:, None, None], length.double()[:, None, None]
    scale = length / out
    inv = torch.where(scale >= 1, 1 / scale, torch.ones_like(scale))
    centre = scale * (torch.arange(out, device=start.device, dtype=torch.float64)[None, :, None] + 0.5)
    j = torch.arange(size, device=start.device, dtype=torch.float64)[None, None, :] - start  # crop coordinates
    w = (1 - (j + 0.5 - centre).abs() * inv).clamp(min=0) * ((j >= 0) & (j < length))
    return (w / w.sum(-1, keepdim=True)).float()


def _pad(images: list[Tensor]) -> Tensor:
    """(…, h, w) tensors → one (B, …, H, W) of the largest H and W, zero padded at the bottom and right."""
    h, w = max(x.shape[-2] for x in images), max(x.shape[-1] for x in images)
    dtype = functools.reduce(torch.promote_types, [x.dtype for x in images])
    out = images[0].new_zeros((len(images), *images[0].shape[:-2], h, w), dtype=dtype)
    for k, x in enumerate(images):
        out[k, ..., :x.shape[-2], :x.shape[-1]] = x
    return out


def resize_images(images: Tensor, box: Tensor, flip: Tensor, side: int) -> Tensor:
    """(B, C, H, W) padded images → (B, C, side, side): each sample's ``box`` (top, left, height, width)
    resized with antialiased bilinear weights, flipped where ``flip``; uint8 rounded back to uint8."""
    wy = aa_weights(box[:, 0], box[:, 2], side, images.shape[-2])
    wx = aa_weights(box[:, 1], box[:, 3], side, images.shape[-1])
    wx = torch.where(flip.bool()[:, None, None], wx.flip(1), wx)
    out = wy[:, None] @ images.float() @ wx.transpose(1, 2)[:, None]
    return out.round().clamp(0, 255).to(torch.uint8) if images.dtype == torch.uint8 else out


def centres(start: Tensor, length: Tensor, out: int, limit: Tensor) -> Tensor:
    """(B, out) source indices ⌊start + (i + ½)·(length/out)⌋ clipped to [0, limit): resample_map's rule, in
    float64 with its order of operations (so the same index, bit for bit)."""
    i = torch.arange(out, device=start.device, dtype=torch.float64)[None]
    idx = torch.floor(start.double()[:, None] + (i + 0.5) * (length.double() / out)[:, None]).long()
    return torch.minimum(idx.clamp(min=0), limit[:, None] - 1)


def resample_ids(maps: list[Tensor], box: Tensor, hw: Tensor, flip: Tensor, side: int) -> Tensor:
    """Id maps (each at its stored size, a fraction of its image's ``hw`` or the same) → (B, side, side) long
    at the cells' centres of each sample's crop box (scaled to the map as the CPU path scales it), flipped.
    One gather from the maps laid end to end (no padding: a batch's memory is its maps', whatever their sizes)."""
    sizes = torch.tensor([list(m.shape[-2:]) for m in maps], dtype=torch.long).to(box.device, non_blocking=True)
    fy, fx = sizes[:, 0] / hw[:, 0].double(), sizes[:, 1] / hw[:, 1].double()
    rows = centres(box[:, 0] * fy, box[:, 2] * fy, side, sizes[:, 0])
    cols = centres(box[:, 1] * fx, box[:, 3] * fx, side, sizes[:, 1])
    cols = torch.where(flip.bool()[:, None], cols.flip(1), cols)
    flat = torch.cat([m.reshape(-1) for m in maps])
    areas = sizes[:, 0] * sizes[:, 1]
    start = torch.cumsum(areas, 0) - areas  # where each map begins in ``flat``
    index = start[:, None, None] + rows[:, :, None] * sizes[:, 1, None, None] + cols[:, None, :]
    return flat[index].long()


PAD_BYTES = 1 << 30  # the padded float32 copy of a group of crops is held to this (one large photo is alone)


def resize_batch(images: list[Tensor], box: Tensor, box_host: Tensor, flip: Tensor, side: int) -> Tensor:
    """(C, h, w) images → (B, C, side, side) by :func:`resize_images`, each cut to its crop box first (the
    filter reads nothing outside it) and padded in groups of similar size whose float32 copy stays under
    :data:`PAD_BYTES`: a batch holding one 4000 × 3000 photo costs that photo, not the batch × its size."""
    cut, rel = [], []
    for x, (top, left, height, width) in zip(images, box_host.tolist()):
        t0, l0 = int(top), int(left)  # floor (boxes are ≥ 0)
        t1, l1 = -int(-(top + height) // 1), -int(-(left + width) // 1)  # ceil
        cut.append(x[..., t0:t1, l0:l1])
        rel.append((t0, l0))
    rel_box = box - torch.tensor([[t, left, 0, 0] for t, left in rel], dtype=box.dtype).to(box.device)
    order = sorted(range(len(cut)), key=lambda k: cut[k].shape[-2] * cut[k].shape[-1])
    out: list[Tensor | None] = [None] * len(cut)
    group: list[int] = []

    def flush() -> None:
        if group:
            idx = torch.tensor(group, device=box.device)
            for k, y in zip(group, resize_images(_pad([cut[k] for k in group]), rel_box[idx], flip[idx], side)):
                out[k] = y
            group.clear()

    for k in order:
        h, w = cut[k].shape[-2:]  # the largest so far (sorted by area; the padded sides can grow)
        hh = max([h, *(cut[j].shape[-2] for j in group)])
        ww = max([w, *(cut[j].shape[-1] for j in group)])
        if group and (len(group) + 1) * cut[k].shape[0] * hh * ww * 4 > PAD_BYTES:
            flush()
        group.append(k)
    flush()
    return torch.stack([y for y in out if y is not None])


def canonical_ids_batched(ids: Tensor, num_ids: int) -> Tensor:
    """:func:`~cfmae_cli.data.transforms.canonical_instance_ids` of each map of (B, h, w), in one pass: ids are
    ranked by area within their sample (background first as 0, then 1 … num_ids − 1, the rest 255)."""
    span = 1 << 16  # ids lie in [0, 65535] (maps.read_ids): no host sync to find the largest
    b = torch.arange(ids.shape[0], device=ids.device).view(-1, 1, 1)
    values, inverse, counts = torch.unique(ids + b * span, return_inverse=True, return_counts=True)
    sample, orig = values // span, values % span
    counts = torch.where(orig == 0, torch.full_like(counts, -1), counts)  # background ranks last
    order = torch.argsort(-counts, stable=True)
    order = order[torch.argsort(sample[order], stable=True)]  # by sample, then area, then id
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order), device=ids.device)
    first = torch.searchsorted(sample, sample)  # values are sorted: a sample's first value
    rank = position - first
    new = torch.where(rank + 1 < num_ids, rank + 1, torch.full_like(rank, UNLABELLED))
    new = torch.where(orig == 0, torch.zeros_like(new), new)
    return new[inverse]


@contextlib.contextmanager
def _full_float32() -> Iterator[None]:
    """float32 matmuls in full precision inside (not TF32, which fp32 training turns on: a 10-bit mantissa
    would move RGB by more than the grey level the CPU path's rounding allows)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def take_skipped(augment: "DeviceAugment") -> list[Skipped]:
    """The samples ``augment`` dropped since the last call (for the engine's ledger of bad files)."""
    out, augment.dropped = augment.dropped, []
    return out


class DeviceAugment:
    """A raw batch (:func:`~cfmae_cli.data.dataset.collate` of :mod:`~cfmae_cli.data.raw` items, tensors on the
    device) → the batch of the CPU path: ``rgb`` uint8 (B, 3, S, S), id maps long (B, S/s, S/s), image maps
    resampled like the image, ``label``. A JPEG that fails to decode on the device drops its sample, logged
    once naming the file (:attr:`failed` keeps them); a batch of which none decodes stops with a
    :class:`~cfmae_cli.errors.DataError` naming its files."""

    def __init__(self, img_size: int, map_stride: int, num_instance_ids: int, modalities: list[str]):
        self.img_size, self.map_size = img_size, img_size // map_stride
        self.num_instance_ids, self.modalities = num_instance_ids, list(modalities)
        self.failed: dict[str, str] = {}
        self.dropped: list[Skipped] = []  # since the last take_skipped()

    def __call__(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        # outside the step's autocast and TF32: the resampling's matmuls in full float32, as the CPU path's
        with torch.autocast(device.type, enabled=False), _full_float32():
            return self._augment(batch, device)

    def _augment(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        images, bad = decode_batch(batch["data"], batch["file"], device)
        for file, why in bad:
            if file not in self.failed:
                log.warning("skipped %s: %s", file, why)
                self.failed[file] = why
            self.dropped.append(Skipped(file, why))
        keep = [i for i, x in enumerate(images) if x is not None]
        decoded = [x for x in images if x is not None]
        if not keep:
            raise DataError(f"no image of a batch decodes on {device.type}: "
                            f"{'; '.join(f'{f}: {w}' for f, w in bad)}; fix or remove the files, or set "
                            f"data.decode=cpu (which skips unreadable files)")

        def pick(x: Any) -> Any:
            if torch.is_tensor(x):
                x = x.to(device, non_blocking=True)
                return x if len(keep) == len(images) else x[torch.tensor(keep, device=device)]
            return [x[i] for i in keep]

        box, hw, flip = pick(batch["box"]), pick(batch["hw"]), pick(batch["flip"])
        box_host = box.cpu()  # to cut each image to its box (the decode has waited for the device already)
        out: dict[str, Any] = {"rgb": resize_batch(decoded, box, box_host, flip, self.img_size),
                               "label": pick(batch["label"]), "size": len(keep)}
        for name in self.modalities:
            spec = table.get(name)
            if not spec.is_map:  # the image itself: done above
                continue
            side = self.map_size if spec.at_map_stride else self.img_size
            value = pick(batch[name])
            maps = [m.to(device, non_blocking=True) for m in value] if isinstance(value, list) else list(value)
            if spec.kind == "ids":
                x = resample_ids(maps, box, hw, flip, side)
                out[name] = canonical_ids_batched(x, self.num_instance_ids) if spec.canonical else x
            else:  # an image map of the image's size: the image's resampling, in its dtype
                out[name] = resize_batch(maps, box, box_host, flip, side)
        return out
