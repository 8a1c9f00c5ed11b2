"""The samples of a dataset: one :class:`Sample` (an image, its maps, its label), and :class:`SampleTable`, the
list of a folder-layout dataset kept in a few NumPy arrays.

Why a table: a Python list of ImageNet's 1.28 M samples is ~1.5 GiB of small objects (paths, dicts) per
process, and every DataLoader worker copies the pages it touches, because reading a Python object writes its
reference count (copy-on-read after ``fork``): +0.9 GiB per worker after a quarter of an epoch. The table
holds the file names in one byte array with offsets and the labels in one int32 array; a worker reads them
without writing, so the pages stay shared, and a :class:`Sample` is made only when it is asked for
(``benchmarks/bench_samples.py`` measures the workers' memory both ways).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence, overload

import numpy as np


@dataclass(frozen=True)
class Sample:
    """One image and its maps, by modality (``DATA/<modality>/…``). ``label`` is the index of its class folder (0
    when flat)."""

    rgb: Path
    maps: dict[str, Path]
    label: int


def map_path(root: Path, modality: str, class_dir: str, stem: str) -> Path:
    """Path of an image's map of ``modality`` (``DATA/<modality>/<class>/<stem>.png``)."""
    return root / modality / class_dir / f"{stem}.png"


class SampleTable(Sequence[Sample]):
    """The samples of a folder of images in class folders, ``IMAGES/<class>/<file>`` (or ``IMAGES/<file>``
    without class folders), each with its maps ``ROOT/<modality>/<class>/<stem>.png``: the dataset layout
    (``IMAGES`` = ``ROOT/rgb``) or an ImageFolder (no maps). The file names, as the file system's bytes
    (``os.fsencode``), are in one ``uint8`` array cut by ``offsets`` (int64, one more than the samples), the
    class index of each is in ``labels`` (int32).
    ``table[i]`` makes the :class:`Sample` (the paths ``list_samples`` always gave); ``table[a:b]``,
    :meth:`take` and :meth:`where` give tables, so a subset stays compact."""

    def __init__(self, images: Path, root: Path, maps: Sequence[str], class_dirs: Sequence[str], names: np.ndarray,
                 offsets: np.ndarray, labels: np.ndarray):
        if len(offsets) != len(labels) + 1:
            raise ValueError(f"SampleTable: {len(offsets)} offsets for {len(labels)} samples (need one more)")
        self.images, self.root, self.maps, self.class_dirs = Path(images), Path(root), tuple(maps), tuple(class_dirs)
        self.names, self.offsets, self.labels = names, offsets, labels
        # the folders' paths as text, per class: a sample's paths are one string and one Path each
        dirs = self.class_dirs or ("",)
        self._images = [str(self.images / c) + os.sep for c in dirs]
        self._maps = {m: [str(self.root / m / c) + os.sep for c in dirs] for m in self.maps}

    @classmethod
    def from_folders(cls, images: Path, root: Path, maps: Sequence[str], class_dirs: Sequence[str],
                     files: Iterable[tuple[int, Sequence[str]]]) -> "SampleTable":
        """The table of ``files``: (class index, file names in ``IMAGES/<class>``) per class folder, in order."""
        chunks: list[bytes] = []
        lengths: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        for label, names in files:
            encoded = [os.fsencode(name) for name in names]  # undecodable bytes kept (surrogateescape)
            chunks.append(b"".join(encoded))
            lengths.append(np.fromiter((len(e) for e in encoded), np.int64, len(encoded)))
            labels.append(np.full(len(encoded), label, np.int32))
        blob = np.frombuffer(b"".join(chunks), np.uint8).copy()
        offsets = np.zeros(1 + sum(len(x) for x in lengths), np.int64)
        np.cumsum(np.concatenate(lengths) if lengths else np.zeros(0, np.int64), out=offsets[1:])
        return cls(images, root, maps, class_dirs, blob, offsets,
                   np.concatenate(labels) if labels else np.zeros(0, np.int32))

    def __len__(self) -> int:
        return len(self.labels)

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> "SampleTable": ...

    def __getitem__(self, index: int | slice) -> "Sample | SampleTable":
        if isinstance(index, slice):
            return self.take(np.arange(len(self))[index])
        n = len(self)
        i = int(index)
        if not -n <= i < n:
            raise IndexError(f"sample {index} of {n}")
        i %= n
        name = os.fsdecode(self.names[self.offsets[i]:self.offsets[i + 1]].tobytes())
        label = int(self.labels[i])
        c = label if self.class_dirs else 0
        stem = os.path.splitext(name)[0]
        return Sample(Path(self._images[c] + name), {m: Path(f"{folders[c]}{stem}.png")
                                                     for m, folders in self._maps.items()}, label)

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))

    def take(self, indices: np.ndarray | Sequence[int]) -> "SampleTable":
        """The samples at ``indices`` (in that order), as a table."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        starts, lengths = self.offsets[idx], self.offsets[idx + 1] - self.offsets[idx]
        offsets = np.zeros(len(idx) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # byte k of the new blob comes from starts[j] + (k - offsets[j]) of the old, j the sample holding k
        gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
        return SampleTable(self.images, self.root, self.maps, self.class_dirs, self.names[gather], offsets,
                           self.labels[idx])

    def where(self, keep: Iterable[bool]) -> "SampleTable":
        """The samples for which ``keep`` (one flag per sample, in order) is true."""
        return self.take(np.flatnonzero(np.fromiter(keep, bool, len(self))))
