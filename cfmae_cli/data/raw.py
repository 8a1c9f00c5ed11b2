"""The loader's side of ``data.decode: gpu``: workers read bytes, draw the crop, and decode nothing.

A raw reader wraps the dataset of the CPU path (:class:`~cfmae_cli.data.dataset.MultiGranularDataset` or
:class:`~cfmae_cli.data.packed.PackedDataset`) and returns, per sample, the JPEG file's bytes (the packed shard's
slice), the image's size (from the JPEG header: no decode), the crop box and the flip drawn by the same
:meth:`JointTransform.draw <cfmae_cli.data.transforms.JointTransform.draw>` under the same seeded generator as the
CPU path (so the same sample of the same epoch gets the same box), and the id maps as they are stored (uint8
where the ids allow). :mod:`~cfmae_cli.data.device_augment` decodes and crops the batch on the training device.

A file whose header cannot be read, a map that cannot be used: a :class:`~cfmae_cli.data.dataset.Skipped`
record, as on the CPU path. A folder image that is not a JPEG (a PNG) is decoded here, by PIL, and travels as
pixels (``data`` of shape (3, H, W)): the device decodes JPEGs only.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cfmae_cli import modalities as table
from cfmae_cli.data.dataset import MultiGranularDataset, read_maps, SeededDataset, Skipped
from cfmae_cli.data.maps import check_class_ids
from cfmae_cli.data.packed import _ids, PackedDataset
from cfmae_cli.data.transforms import JointTransform, narrow_ids


def raw_item(data: torch.Tensor, hw: tuple[int, int], draw: tuple[int, int, int, int, bool],
             maps: dict[str, torch.Tensor], label: int, file: str) -> dict[str, Any]:
    """One sample of a raw reader: ``data`` (JPEG bytes, uint8 (n,), or pixels uint8 (3, H, W)), ``hw`` (the
    image's H, W), ``box`` (top, left, height, width as float64), ``flip``, the maps, ``label``, ``file``."""
    top, left, ch, cw, flip = draw
    return {"data": data, "hw": torch.tensor(hw, dtype=torch.long),
            "box": torch.tensor([top, left, ch, cw], dtype=torch.float64), "flip": int(flip), **maps,
            "label": label, "file": file}


class RawFolder(SeededDataset):
    """The raw reader of the folder layout (:class:`MultiGranularDataset`'s samples, maps and transform)."""

    def __init__(self, base: MultiGranularDataset):
        if not isinstance(base.transform, JointTransform):
            raise TypeError("data.decode=gpu reads with the joint transform of pre-training")
        self.base, self.seed, self.transform = base, base.seed, base.transform

    def __len__(self) -> int:
        return len(self.base)

    def with_transform(self, train: bool) -> "RawFolder":
        return RawFolder(self.base.with_transform(train))

    def load(self, index: int) -> dict[str, Any]:
        base = self.base
        sample = base.samples[index]
        data = Path(sample.rgb).read_bytes()
        with Image.open(io.BytesIO(data)) as im:  # the header only: the size (and the format)
            size, jpeg = im.size, im.format == "JPEG"
            pixels = None if jpeg else torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
        maps = read_maps(sample, size, base.modalities, base.num_semantic_classes, base.reduce_zero_label)
        maps = {name: narrow_ids(x) if table.get(name).kind == "ids" else x for name, x in maps.items()}
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8) if pixels is None else pixels
        return raw_item(payload, (size[1], size[0]), self.transform.draw(size[1], size[0]), maps, sample.label,
                        str(sample.rgb))

    def skipped(self, index: int, exc: Exception) -> Skipped | None:
        return self.base.skipped(index, exc)


class RawPacked(SeededDataset):
    """The raw reader of a packed folder (:class:`PackedDataset`'s shards): a slice of the shard's bytes and
    two slices of its memory-mapped maps per sample, nothing decoded."""

    def __init__(self, base: PackedDataset):
        self.base, self.seed, self.transform = base, base.seed, base.transform
        from cfmae_cli.data.layout import read_packed_manifest

        self.side = int(read_packed_manifest(base.root)["size"])

    def __len__(self) -> int:
        return len(self.base)

    def with_transform(self, train: bool) -> "RawPacked":
        return RawPacked(self.base.with_transform(train))

    def load(self, i: int) -> dict[str, Any]:
        base = self.base
        k, j = (int(v) for v in base.index[i])
        s = base.shard(k)
        data = torch.from_numpy(np.array(s["bytes"][s["offsets"][j]:s["offsets"][j + 1]]))
        maps = {}
        for name in base.modalities:
            ids = _ids(s[name][j])
            if table.get(name).classes == "manifest":
                check_class_ids(ids, f"{base.root}/shard-{k:05d}.{name}.npy#{j}", name, base.num_semantic_classes)
            maps[name] = torch.from_numpy(ids)
        return raw_item(data, (self.side, self.side), self.transform.draw(self.side, self.side), maps,
                        int(s["labels"][j]), f"{base.root}/shard-{k:05d}#{j}")

    def skipped(self, index: int, exc: Exception) -> Skipped | None:
        return self.base.skipped(index, exc)


def raw_reader(dataset: MultiGranularDataset | PackedDataset) -> RawFolder | RawPacked:
    """The raw reader (``data.decode: gpu``) of the dataset that the CPU path would read."""
    return RawPacked(dataset) if isinstance(dataset, PackedDataset) else RawFolder(dataset)
