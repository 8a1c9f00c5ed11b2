"""The pre-training dataset: samples of the layout (``layout.py``) → augmented tensors; bad files skipped.

A sample that cannot be used (unreadable file, a map that is not one of ids (``maps.read_ids``), map size ≠
image size, semantic id out of range) is not an exception: ``__getitem__`` returns it as a *bad* record, the
collate drops it from the batch and passes the (path, reason) on, and the engine counts, lists and, past
``data.max_bad_fraction``, stops. :func:`skip_reason` words the reason; ``cfmae pack`` skips with the same words.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ContextManager, Protocol, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from cfmae_cli import modalities as table
from cfmae_cli.data.layout import Sample
from cfmae_cli.data.maps import BadSample, check_class_ids, check_size, opened, read_ids, UNREADABLE
from cfmae_cli.formats import UNLABELLED
from cfmae_cli.seeding import sample_rng


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


def skip_reason(exc: Exception) -> str | None:
    """Why a sample that raised ``exc`` is skipped (the same words in training and in ``cfmae pack``); None for
    an error that is a bug and should propagate."""
    if isinstance(exc, BadSample):
        return str(exc)
    if isinstance(exc, UNREADABLE):
        return unreadable_reason(exc)
    return None


def unreadable_reason(exc: Exception) -> str:
    """Why a file that raised one of :data:`UNREADABLE` is skipped."""
    return f"unreadable: {type(exc).__name__}: {exc}"


def read_map(path, expect_size: tuple[int, int], modality: table.Modality) -> Tensor:
    """An image's map of ``modality`` at the image's size: ids (h, w) long (:func:`~cfmae_cli.data.maps.read_ids`,
    the one reader of id maps); or an image (channels, h, w): one channel as float32 in [0, 1] at the file's
    full precision (8-bit grey value / 255, 16-bit grey value / 65535: depth), three channels uint8. A file
    that cannot be used is a :class:`BadSample` naming it."""
    if modality.kind == "ids":
        return torch.from_numpy(read_ids(path, expect_size, modality.name))
    with opened(path) as im:
        check_size(path, im.size, expect_size)
        if modality.pil_modes is not None and im.mode not in modality.pil_modes:
            raise BadSample(f"{path}: a {modality.name} map must be a single-channel 8- or 16-bit PNG, got PIL "
                            f"mode {im.mode}")
        if modality.channels == 1:
            wide = im.mode.startswith("I")  # 16-bit grey (I;16…, or I from an older Pillow)
            grey = np.asarray(im if wide or im.mode == "L" else im.convert("L"))
            top = 65535 if wide else 255
            arr = (np.clip(grey, 0, top).astype(np.float32) / np.float32(top))[None]
            return torch.from_numpy(np.ascontiguousarray(arr))
        arr = np.asarray(im.convert("RGB")).reshape(im.size[1], im.size[0], modality.channels)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def read_maps(sample: Sample, size: tuple[int, int], names: list[str], classes: int,
              reduce_zero_label: bool = False) -> dict[str, Tensor]:
    """The maps ``names`` of a sample whose image is ``size`` (W, H), by :func:`read_map`, semantic ids checked
    against the manifest's ``classes`` (after ``reduce_zero_label``: 0 → unlabelled, k → k-1): what training
    and ``cfmae pack`` read of a sample's maps, so that they keep and skip the same samples."""
    maps = {}
    for name in names:
        spec = table.get(name)
        x = read_map(sample.maps[name], size, spec)
        if spec.classes == "manifest":  # ids of the dataset's semantic classes
            if reduce_zero_label:
                x = torch.where(x == 0, torch.full_like(x, UNLABELLED), x - 1)
            check_class_ids(x.numpy(), sample.maps[name], name, classes)
        maps[name] = x
    return maps


class SeededDataset(Dataset):
    """Keys are an index, or ``(epoch, index)``: then the augmentation is drawn from a generator seeded by
    (seed, epoch, index) (:meth:`rng`), the same whichever process or worker loads the sample, so that a
    resumed run is identical to an unbroken one. A sample that :meth:`skipped` recognises as bad becomes a
    :class:`Skipped` record instead of an error."""

    seed: int

    def load(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def rng(self, epoch: int, index: int) -> ContextManager[None]:
        """The generators seeded for sample ``index`` of ``epoch`` while it loads: torch's CPU generator
        (:func:`~cfmae_cli.seeding.sample_rng`)."""
        return sample_rng(self.seed, epoch, index)

    def skipped(self, index: int, exc: Exception) -> Skipped | None:
        """The record of a bad sample, or None for an error that should propagate."""
        return None

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | Skipped:
        epoch, index = key if isinstance(key, tuple) else (None, key)
        try:
            if epoch is None:
                return self.load(index)
            with self.rng(epoch, index):
                return self.load(index)
        except Exception as exc:
            record = self.skipped(index, exc)
            if record is None:
                raise
            return record


class PairTransform(Protocol):
    """What a :class:`MultiGranularDataset` applies to an image and its maps together: the joint augmentation
    (:class:`~cfmae_cli.data.transforms.JointTransform`) or segmentation's; ``train`` picks training or evaluation."""

    train: bool

    def __call__(self, rgb: Tensor, maps: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]: ...


class MultiGranularDataset(SeededDataset):
    """Items are dicts: ``rgb`` (3, S, S), each map of ``modalities`` (ids (S/s, S/s) uint8 (int16 past 255), a
    one-channel image (1, S, S) float32 in [0, 1], as the table of modalities says), ``label`` (class folder index) — or a
    :class:`Skipped` record. ``reduce_zero_label`` (ADE20K): 0 = 'other' of the manifest-class map becomes
    unlabelled, k becomes k-1."""

    def __init__(self, samples: Sequence[Sample], transform: PairTransform, modalities: list[str],
                 num_semantic_classes: int, seed: int = 0, reduce_zero_label: bool = False):
        self.reduce_zero_label = reduce_zero_label  # ADE20K: 0 = 'other' → unlabelled, k → k-1
        self.seed = seed
        self.samples = samples
        self.transform = transform
        self.modalities = list(modalities)
        self.num_semantic_classes = num_semantic_classes

    def __len__(self) -> int:
        return len(self.samples)

    def with_transform(self, train: bool) -> "MultiGranularDataset":
        """The same samples with the training or the evaluation (centred square) transform."""
        t = copy.copy(self.transform)
        t.train = train
        return MultiGranularDataset(self.samples, t, self.modalities, self.num_semantic_classes, self.seed,
                                    self.reduce_zero_label)

    def load(self, index: int) -> dict[str, Any]:
        """Read and check one sample; raises :class:`BadSample` (or OSError) when it cannot be used."""
        sample = self.samples[index]
        with Image.open(sample.rgb) as im:
            size = im.size
            rgb = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
        maps = read_maps(sample, size, self.modalities, self.num_semantic_classes, self.reduce_zero_label)
        return make_item(*self.transform(rgb, maps), sample.label)

    def skipped(self, index: int, exc: Exception) -> Skipped | None:
        reason = skip_reason(exc)
        return None if reason is None else Skipped(str(self.samples[index].rgb), reason)


def make_item(rgb: Tensor, maps: dict[str, Tensor], label: int) -> dict[str, Any]:
    """A dataset item: rgb, the maps, label."""
    return {"rgb": rgb, **maps, "label": label}


#: Keys whose tensors a batch keeps as a list even when they happen to have one shape (JPEG bytes).
RAGGED = ("data",)


def collate(items: Sequence[dict[str, Any] | Skipped]) -> dict[str, Any]:
    """Stack the good items; ``skipped`` lists the bad ones. Tensors of one shape are stacked in their dtype
    (id maps uint8 — int16 past 255 —, RGB uint8 or float32, a one-channel image map float32 at its full
    precision); tensors of differing shapes (``data.decode=gpu``: each file's JPEG bytes, a folder's maps at
    their image's size) stay a list of tensors, as do strings (file names); integers (``label``, …) become a
    long tensor; ``size`` = count."""
    good = [x for x in items if not isinstance(x, Skipped)]
    out: dict[str, Any] = {"skipped": [x for x in items if isinstance(x, Skipped)], "size": len(good)}
    if good:
        for key in good[0]:
            values = [x[key] for x in good]
            if torch.is_tensor(values[0]):
                same = key not in RAGGED and all(v.shape == values[0].shape for v in values)
                out[key] = torch.stack(values) if same else values
            else:
                out[key] = list(values) if isinstance(values[0], str) else torch.tensor(values, dtype=torch.long)
    return out
