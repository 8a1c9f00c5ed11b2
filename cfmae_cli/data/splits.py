"""Labelled splits of an image folder: an ImageFolder (``<class>/<image>``) or the dataset layout, ``train/`` and
``val/`` side by side or a fixed share of each class held out by a hash of its file name (the same split on
every machine, seed and run; it does not shift when files are added)."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from cfmae_cli.data.layout import Sample, SampleTable, list_samples
from cfmae_cli.errors import DataError
from cfmae_cli.formats import IMAGE_EXTENSIONS, list_folder, need_folder


def list_split(folder: Path, maps: list[str]) -> tuple[SampleTable, list[str]]:
    """Samples and class names of one split (the dataset layout, or an ImageFolder for RGB-only input)."""
    if (folder / "rgb").is_dir():
        return list_samples(folder, maps)
    if maps:
        raise DataError(f"{folder}: multi-granular fine-tuning reads {', '.join(maps)} maps, so the split must have "
                        f"the dataset layout (rgb/, instance/, semantic/; docs/dataset-format.md). Label the images "
                        f"with `cfmae label`, or fine-tune on RGB only (--modalities rgb).")
    classes = list_folder(need_folder(folder)).dirs
    samples = SampleTable.from_folders(folder, folder, (), classes, (
        (label, [file for file in list_folder(folder / name).files
                 if os.path.splitext(file)[1].lower() in IMAGE_EXTENSIONS]) for label, name in enumerate(classes)))
    if not len(samples):
        raise DataError(f"{folder}: no images in class folders (expected {folder}/<class>/<image>, extensions "
                        f"{', '.join(IMAGE_EXTENSIONS)}).")
    return samples, classes


def held_out(sample: Sample, fraction: float) -> bool:
    """Whether ``sample`` is in the held-out share ``fraction`` of its class (CRC32 of ``<class>/<stem>``)."""
    key = f"{sample.rgb.parent.name}/{sample.rgb.stem}".encode()
    return zlib.crc32(key) % 10_000 < fraction * 10_000


def spread(samples: SampleTable, count: int) -> SampleTable:
    """At most ``count`` samples, taken evenly from the list (sorted by class, then file: every class keeps its
    share)."""
    if len(samples) <= count:
        return samples
    step = len(samples) / count
    return samples.take([int(i * step) for i in range(count)])


def find_splits(root: Path, val_fraction: float | None, maps: list[str]
                ) -> tuple[SampleTable, SampleTable, list[str], Path]:
    """(train samples, val samples, class names, the folder whose manifest describes the maps)."""
    need_folder(root)
    halves = [name for name in ("train", "val") if (root / name).is_dir()]
    if len(halves) == 1:
        other = "val" if halves == ["train"] else "train"
        raise DataError(f"{root}: has {halves[0]}/ but no {other}/ folder; give both ROOT/train/<class>/<image> and "
                        f"ROOT/val/<class>/<image>, or hold out a share of one folder with --data {root / halves[0]}"
                        f"{'' if val_fraction else ' --set data.val_fraction=0.1'}.")
    if len(halves) == 2:
        train, classes = list_split(root / "train", maps)
        val, val_classes = list_split(root / "val", maps)
        if val_classes != classes:
            only_train = sorted(set(classes) - set(val_classes))
            only_val = sorted(set(val_classes) - set(classes))
            raise DataError(f"{root}: train/ and val/ have different class folders (only in train: "
                            f"{only_train[:5] or 'none'}; only in val: {only_val[:5] or 'none'}).")
        meta = root / "train"
    elif val_fraction:
        samples, classes = list_split(root, maps)
        out = np.fromiter((held_out(s, val_fraction) for s in samples), bool, len(samples))
        val, train = samples.where(out), samples.where(~out)
        meta = root
    else:
        raise DataError(f"{root}: no train/ and val/ folders. Expected ROOT/train/<class>/<image> and "
                        f"ROOT/val/<class>/<image> (or the dataset layout in each), or hold out a share of one folder "
                        f"with --set data.val_fraction=0.1.")
    if len(classes) < 2:
        raise DataError(f"{root}: classification needs at least two class folders, found {len(classes)}.")
    if not train or not val:
        raise DataError(f"{root}: the {'train' if not train else 'val'} split is empty.")
    return train, val, classes, meta
