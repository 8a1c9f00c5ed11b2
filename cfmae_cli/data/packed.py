"""A packed copy of a dataset for fast reading: ``cfmae pack DATA --out PACKED``.

Each image is resized so that its short side is ``size`` (default 256), centre-cropped to a square and stored
as a JPEG in a shard file of concatenated bytes; its maps are sampled (centre-aligned nearest neighbour) over
the same square at ``size / map_scale`` and stored raw in NumPy arrays. Reading a sample is then one small
JPEG decode (libjpeg-turbo, into a tensor) and two slices of memory-mapped arrays — no full-size JPEG, no PNG.
The training transform (random-resized crop and flip, joint for image and maps) runs on the square as it runs
on the original.

Layout: ``PACKED/cfmae-packed.json`` (format, sizes, classes, shards, what was skipped),
``shard-NNNNN.jpg.bin`` + ``shard-NNNNN.offsets.npy`` (int64, count+1), ``shard-NNNNN.instance.npy`` (uint8, or
uint16 when a shard has an id above 255),
``shard-NNNNN.semantic.npy`` (uint8), ``shard-NNNNN.labels.npy`` (int32). Only the id maps of the table are
packed: an image map (depth) is not (a run with it reads the folder layout, at the map's full precision).

A sample is read as training reads it (``dataset.read_maps``, ``maps.read_ids``) and skipped for the same
reasons, in the same words. A packed folder is checked before anything is sized by it: the manifest's fields
(:func:`read_packed_manifest`), then every shard file's header against them (:func:`check_packed`).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import multiprocessing
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from cfmae_cli import modalities as table
from cfmae_cli.data.dataset import SeededDataset, Skipped, make_item, read_maps, skip_reason
from cfmae_cli.data.layout import (PACKED_FORMAT as FORMAT, PACKED_MANIFEST as MANIFEST, PACKED_VERSION as VERSION,
                                   id_maps, list_samples, pack_again as _again, read_manifest,
                                   read_packed_manifest, Sample)
from cfmae_cli.data.maps import BadSample, check_class_ids, resample_map
from cfmae_cli.data.transforms import JointTransform
from cfmae_cli.errors import DataError
from cfmae_cli.formats import atomic_write, atomic_write_text
from cfmae_cli.ownership import LOCK_NAME
from cfmae_cli.procs import die_with_parent

INCOMPLETE = ".cfmae-pack-incomplete"  # there while `cfmae pack` writes the folder
log = logging.getLogger(__name__)


try:  # libjpeg-turbo straight into a CHW tensor; deprecated in torchvision 0.29 in favour of TorchCodec
    from torchvision.io import decode_jpeg as _decode_jpeg
except ImportError:  # pragma: no cover - a torchvision without image decoding
    _decode_jpeg = None
#: The start of the DeprecationWarning torchvision 0.29 gives at each call of its image decoders.
DEPRECATED = "The image decoding and encoding capabilities of TorchVision are deprecated"


def decode(data: np.ndarray) -> torch.Tensor:
    """JPEG bytes → uint8 (3, H, W)."""
    if _decode_jpeg is not None:
        with warnings.catch_warnings():  # torchvision 0.29's notice that TorchCodec supersedes it (docs/performance.md)
            warnings.filterwarnings("ignore", message=DEPRECATED, category=DeprecationWarning)
            return _decode_jpeg(torch.from_numpy(data))
    with Image.open(io.BytesIO(data.tobytes())) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"))).permute(2, 0, 1).contiguous()


def _ids(stored: np.ndarray) -> np.ndarray:
    """A shard's id map as it is read: uint8 as stored (most shards), uint16 as int32 (torch indexes it)."""
    return np.array(stored, np.uint8 if stored.dtype == np.uint8 else np.int32)


def _square_geometry(w: int, h: int, side: int
                     ) -> tuple[tuple[int, int], tuple[int, int], tuple[float, float, float, float]]:
    """How a (w, h) image becomes its stored square: resized to ``(nw, nh)`` (short side ``side``), cropped
    at ``(left, top)``; and that square as a box (top, left, height, width) in the original's pixels."""
    scale = side / min(w, h)
    nw, nh = max(side, round(w * scale)), max(side, round(h * scale))
    left, top = (nw - side) // 2, (nh - side) // 2
    return (nw, nh), (left, top), (top * h / nh, left * w / nw, side * h / nh, side * w / nw)


def _square(im: Image.Image, side: int, resample: Image.Resampling) -> Image.Image:
    """Resize so that the short side is ``side``, then take the centred ``side`` x ``side`` square."""
    (nw, nh), (left, top), _ = _square_geometry(*im.size, side)
    return im.resize((nw, nh), resample).crop((left, top, left + side, top + side))


def _square_map(ids: np.ndarray, side: int, map_size: int) -> np.ndarray:
    """The map of an image at the image's size → the ``map_size`` map of its stored ``side`` square: the
    same square, sampled at its cells' centres, so that it lies on the stored image exactly."""
    _, _, box = _square_geometry(ids.shape[1], ids.shape[0], side)
    return resample_map(ids, (map_size, map_size), box)


def _pack_shard(job: tuple[Path, int, list[Sample], int, int, int, int]) -> tuple[int, list[tuple[str, str]]]:
    """Write one shard; returns (images written, [(file, why skipped)])."""
    out, k, samples, size, map_size, quality, classes = job
    names = list(samples[0].maps) if samples else []
    blobs: list[bytes] = []
    labels: list[int] = []
    skipped: list[tuple[str, str]] = []
    arrays = {name: np.zeros((len(samples), map_size, map_size), np.uint16) for name in names}
    for sample in samples:
        try:  # read as training reads it: the same samples kept, the same skipped, with the same reasons
            with Image.open(sample.rgb) as im:
                rgb = im.convert("RGB")
            maps = {name: _square_map(ids.numpy(), size, map_size)  # ids in [0, 65535]: they fit the uint16 arrays
                    for name, ids in read_maps(sample, rgb.size, names, classes).items()}
        except Exception as exc:  # noqa: BLE001 - skip_reason decides, a bug is raised
            reason = skip_reason(exc)
            if reason is None:
                raise
            skipped.append((str(sample.rgb), reason))
            continue
        buf = io.BytesIO()
        _square(rgb, size, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=quality)
        n = len(blobs)
        blobs.append(buf.getvalue())
        for name in names:
            arrays[name][n] = maps[name]
        labels.append(sample.label)
    n = len(blobs)
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    stem = out / f"shard-{k:05d}"
    _publish(Path(f"{stem}.jpg.bin"), lambda fh: fh.write(b"".join(blobs)))
    stored = {name: a[:n] if a[:n].max(initial=0) > 255 else a[:n].astype(np.uint8)  # most maps: < 256 ids
              for name, a in arrays.items()}
    for name, array in (("offsets", offsets), *stored.items(), ("labels", np.array(labels, np.int32))):
        _publish(Path(f"{stem}.{name}.npy"), partial(_save_array, array))
    return n, skipped


def _save_array(array: np.ndarray, fh: Any) -> None:
    np.save(fh, array)


def _publish(path: Path, write: Callable[[Any], Any]) -> None:
    """One shard file, atomically; a failure names the file (a write error alone does not)."""
    try:
        atomic_write(path, write, binary=True)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None


def pack_dataset(src: Path, out: Path, size: int = 256, map_scale: int = 2, shard_size: int = 4096,
                 quality: int = 95, workers: int = 1, on_shard: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Pack the dataset at ``src`` (docs/dataset-format.md, with both maps) into ``out``; returns its manifest.
    The manifest is written last: a folder without it is not a packed dataset (an interrupted run)."""
    if size % map_scale:
        raise DataError(f"--size {size} is not divisible by --map-scale {map_scale}.")
    source = read_manifest(src)
    samples, classes = list_samples(src, maps=id_maps())
    unpacked = [m.name for m in table.TABLE.values() if m.kind == "image" and m.is_map and (src / m.name).is_dir()]
    if unpacked:
        log.warning("%s: %s not packed (cfmae pack stores the id maps); a run with %s reads the folder layout",
                    src, ", ".join(f"{m}/" for m in unpacked), " or ".join(unpacked))
    _claim(out)
    c_sem = int(source["num_semantic_classes"])
    jobs = [(out, k, samples[i:i + shard_size], size, size // map_scale, quality, c_sem)
            for k, i in enumerate(range(0, len(samples), shard_size))]
    counts, skipped = [], []
    context = multiprocessing.get_context()
    # the workers die with this process, even when it is killed (SIGKILL): no orphan keeps its memory or writes
    # shards for nobody. A forkserver's workers are its children, not ours: they die with it, and it with us.
    parent = None if context.get_start_method() == "forkserver" else os.getpid()
    try:
        with ProcessPoolExecutor(max_workers=max(workers, 1), mp_context=context, initializer=die_with_parent,
                                 initargs=(parent,)) as pool:
            for n, bad in pool.map(_pack_shard, jobs):
                counts.append(n)
                skipped += bad
                if on_shard is not None:
                    on_shard(len(counts))
        manifest = {"format": FORMAT, "version": VERSION, "images": sum(counts), "size": size,
                    "map_size": size // map_scale, "quality": quality, "class_folders": classes, "maps": id_maps(),
                    "semantic_classes": source["semantic_classes"], "num_semantic_classes": c_sem,
                    "source": str(src.resolve()), "source_manifest": source, "shards": counts,
                    "skipped": [{"file": f, "reason": r} for f, r in skipped]}
        atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    except OSError as exc:  # a full disk, a lost mount: nothing half-made is left to block the rerun
        _clear(out)
        where = exc.filename or out
        raise DataError(f"{where}: could not be written ({exc.strerror or exc}); the partial pack in {out} was "
                        f"removed. Free space (or fix the folder) and run `cfmae pack` again.") from None
    (out / INCOMPLETE).unlink()
    return manifest


def _claim(out: Path) -> None:
    """Make ``out`` the pack's: a new or empty folder, or one that an interrupted pack left (marked by
    :data:`INCOMPLETE`, cleared); with the mark in it until the manifest is written."""
    if out.is_file():
        raise DataError(f"--out {out}: a file, not a folder; choose a new or empty folder.")
    if out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()):  # (the lock `cfmae pack` holds on it)
        if not (out / INCOMPLETE).is_file():
            raise DataError(f"{out}: exists and is not empty; choose an empty or new --out.")
        log.info("%s: clearing what an interrupted `cfmae pack` left", out)
        _clear(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / INCOMPLETE).write_text("cfmae pack is writing this folder; a folder with this file is incomplete\n")


def _clear(out: Path) -> None:
    """Remove what a pack wrote in ``out`` (its shard files, temporaries, manifest, mark)."""
    for path in out.iterdir():
        if path.name.startswith(("shard-", ".shard-")) or path.name in (MANIFEST, INCOMPLETE):
            path.unlink(missing_ok=True)


def check_packed(root: Path, manifest: dict[str, Any], maps: list[str]) -> None:
    """Every shard file the manifest (checked by :func:`read_packed_manifest`) promises is there and agrees with
    it: arrays of the shapes (images + 1 offsets, (images, map_size, map_size) maps, images labels) and dtypes
    (int64, uint8 or uint16, int32) it implies, offsets from 0 non-decreasing to the bytes of the JPEG file,
    labels indexing its class folders. A missing, cut-off or rewritten shard stops here, naming the file, not
    in a loader worker or, worse, not at all. Only headers, offsets and labels are read (memory-mapped)."""
    side, folders = manifest["map_size"], manifest["class_folders"]
    said = f"the manifest {root / MANIFEST} says"
    for k, n in enumerate(manifest["shards"]):
        stem = root / f"shard-{k:05d}"
        blob = Path(f"{stem}.jpg.bin")
        files = {name: Path(f"{stem}.{name}.npy") for name in ("offsets", *maps, "labels")}
        for path in (blob, *files.values()):
            if not path.is_file():
                raise DataError(f"{path}: missing (shard {k} of {len(manifest['shards'])} of the packed data); the "
                                f"pack is incomplete: {_again(manifest)}.")
        want = {"offsets": ((n + 1,), ("int64",), "images + 1"), "labels": ((n,), ("int32",), "images"),
                **{name: ((n, side, side), ("uint8", "uint16"), "images, map_size, map_size") for name in maps}}
        arrays = {}
        for name, path in files.items():
            try:
                arrays[name] = a = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise DataError(f"{path}: not a readable NumPy array ({exc}); the pack is damaged: "
                                f"{_again(manifest)}.") from None
            shape, dtypes, meaning = want[name]
            if a.shape != shape or a.dtype.name not in dtypes:
                raise DataError(f"{path}: {a.dtype.name} of shape {a.shape}; {said} {' or '.join(dtypes)} of shape "
                                f"{shape} ({meaning}, shard {k}); the pack is damaged: {_again(manifest)}.")
        offsets, size = np.asarray(arrays["offsets"]), os.path.getsize(blob)
        falls = bool((np.diff(offsets) < 0).any())
        if falls or offsets[0] != 0 or offsets[-1] != size:
            raise DataError(f"{files['offsets']}: offsets {int(offsets[0]):,} .. {int(offsets[-1]):,}"
                            f"{', decreasing,' if falls else ''} do not run from 0 to the {size:,} bytes of "
                            f"{blob.name}; the pack is damaged: {_again(manifest)}.")
        labels, top = np.asarray(arrays["labels"]), max(len(folders), 1)  # flat data: every label 0
        if n and (labels.min() < 0 or labels.max() >= top):
            bad = int(labels.min() if labels.min() < 0 else labels.max())
            raise DataError(f"{files['labels']}: label {bad} does not index the {len(folders)} class folder(s) of "
                            f"the manifest {root / MANIFEST} (labels lie in 0..{top - 1}); the pack is damaged: "
                            f"{_again(manifest)}.")


class PackedDataset(SeededDataset):
    """The items of :class:`~cfmae_cli.data.dataset.MultiGranularDataset` from a packed folder. Keys are an
    index or ``(epoch, index)`` (the augmentation then comes from a generator seeded by them)."""

    def __init__(self, root: Path, transform: JointTransform, modalities: list[str], seed: int = 0):
        self.root, self.transform, self.modalities, self.seed = Path(root), transform, list(modalities), seed
        manifest = read_packed_manifest(self.root)
        self.packed = list(manifest["maps"])
        lacking = [m for m in self.modalities if m not in self.packed]
        images = [m for m in lacking if table.get(m).kind == "image"]
        if images:
            raise DataError(f"{self.root}: a packed dataset of the maps {', '.join(self.packed)}; data.modalities "
                            f"asks for {', '.join(images)} too: `cfmae pack` stores the id maps only (an image map, "
                            f"such as depth, is read from the folder layout at its full precision); train from the "
                            f"folder layout (--data DATA).")
        if lacking:
            raise DataError(f"{self.root}: a packed dataset of the maps {', '.join(self.packed)}; data.modalities "
                            f"asks for {', '.join(lacking)} too: train from the folder layout, or pack data with "
                            f"those maps.")
        check_packed(self.root, manifest, self.packed)  # before the index is sized by the shards' counts
        self.num_semantic_classes = manifest["num_semantic_classes"]
        self.index = np.array([(k, j) for k, n in enumerate(manifest["shards"]) for j in range(n)], np.int64)
        self._open: dict[int, dict[str, Any]] = {}  # per process: shards are mapped on first use

    def __len__(self) -> int:
        return len(self.index)

    def shard(self, k: int) -> dict[str, Any]:
        if k not in self._open:
            stem = self.root / f"shard-{k:05d}"
            self._open[k] = {"bytes": np.memmap(f"{stem}.jpg.bin", np.uint8, mode="r")
                             if os.path.getsize(f"{stem}.jpg.bin") else np.zeros(0, np.uint8),
                             **{name: np.load(f"{stem}.{name}.npy", mmap_mode="r")
                                for name in ("offsets", *self.packed, "labels")}}
        return self._open[k]

    def with_transform(self, train: bool) -> "PackedDataset":

        t = copy.copy(self.transform)
        t.train = train
        return PackedDataset(self.root, t, self.modalities, self.seed)

    def load(self, i: int) -> dict[str, Any]:
        k, j = (int(v) for v in self.index[i])
        s = self.shard(k)
        rgb = decode(np.array(s["bytes"][s["offsets"][j]:s["offsets"][j + 1]]))
        stored = {name: _ids(s[name][j]) for name in self.modalities}
        for name, ids in stored.items():  # (a cheap check per sample, as the folder's reader makes it)
            if table.get(name).classes == "manifest":
                check_class_ids(ids, f"{self.root}/shard-{k:05d}.{name}.npy#{j}", name, self.num_semantic_classes)
        maps = {name: torch.from_numpy(ids) for name, ids in stored.items()}
        return make_item(*self.transform(rgb, maps), int(s["labels"][j]))

    def skipped(self, index: int, exc: Exception) -> Skipped | None:
        if not isinstance(exc, (RuntimeError, BadSample)):  # a damaged JPEG, an id out of range, in a shard
            return None
        k, j = (int(v) for v in self.index[index])
        return Skipped(f"{self.root}/shard-{k:05d}#{j}", str(exc) if isinstance(exc, BadSample) else
                       f"unreadable: {exc}")
