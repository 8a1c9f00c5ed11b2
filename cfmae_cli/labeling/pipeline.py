"""``cfmae label``: any image folder → the dataset layout (docs/design.md §5.1), resumable and shardable.

Per image: read (converting CMYK / 16-bit / grey / alpha), label in batches on the device, then writer
threads save the RGB file (copy, link, or PNG when converted), the two maps and one line of metadata in the
class folder's sidecar ``DATA/meta/<class>.jsonl`` — in that order, each file under a temporary name then
renamed. An image is done when its sidecar line exists and its files do; a rerun skips done images and
redoes the rest, so a kill loses at most the images in flight. At the end the sidecars are sorted and
de-duplicated and the manifest is written, so an interrupted-then-finished run equals an unbroken one.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch.utils.data import DataLoader

from cfmae_cli import __version__
from cfmae_cli.data.layout import map_path, save_map, save_rgb, write_manifest
from cfmae_cli.errors import CfmaeError
from cfmae_cli.formats import (atomic_write, atomic_write_text, list_folder, MANIFEST_NAME, name_target,
                               temporary_name)
from cfmae_cli.labeling.base import InstanceBackend, SemanticBackend, label_batch
from cfmae_cli.labeling.sources import collate_sources, list_sources, SourceImage, Sources
from cfmae_cli.ownership import LOCK_NAME

log = logging.getLogger(__name__)
ERRORS_NAME = "label-errors.jsonl"
FLAT = "_flat"  # sidecar name for images without a class folder


def sidecar_path(data: Path, class_dir: str) -> Path:
    return data / "meta" / f"{class_dir or FLAT}.jsonl"


def rgb_target(data: Path, image: SourceImage, converted: bool) -> Path:
    ext = ".png" if converted else image.path.suffix
    return data / "rgb" / image.class_dir / f"{image.stem}{ext}"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file; a line cut by a kill (not valid JSON) is left out."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _complete(data: Path, record: dict[str, Any]) -> bool:
    cls, stem = record.get("class", ""), record.get("stem", "")
    needed = ["instance", "semantic", *(["depth"] if record.get("depth") else [])]
    return (data / "rgb" / record.get("rgb", "\0")).exists() and all(
        map_path(data, m, cls, stem).exists() for m in needed)


def done_images(data: Path, images: list[SourceImage]) -> set[tuple[str, str]]:
    """(class, stem) of the images whose sidecar line and files all exist."""
    done = set()
    for class_dir in sorted({im.class_dir for im in images}):
        for record in read_jsonl(sidecar_path(data, class_dir)):
            if _complete(data, record):
                done.add((record["class"], record["stem"]))
    return done


class OutputWriteError(CfmaeError):
    """A file of the dataset could not be written (a full disk, a quota, a read-only or failing disk): labelling
    stops, unlike for a source that cannot be read, which is listed and skipped."""


class Writer:
    """Saves a labelled image's files on background threads; sidecar lines are appended last, under a lock.

    The first write that fails stops the writer: images not yet written are dropped (a rerun labels them), the
    failed image's temporary files are removed, and :meth:`submit` and :meth:`close` raise
    :class:`OutputWriteError` naming the file and its disk."""

    def __init__(self, data: Path, rgb_mode: str, threads: int = 4):
        self.data, self.rgb_mode = data, rgb_mode
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cfmae-writer")
        self.lock = threading.Lock()
        self.futures: list[Future] = []
        self.failed: OutputWriteError | None = None
        self.sidecars_checked: set[Path] = set()

    def submit(self, image: SourceImage, pixels: np.ndarray, converted: bool, instance: np.ndarray,
               semantic: np.ndarray, meta: dict[str, Any], depth: np.ndarray | None = None,
               raw: bytes | None = None) -> None:
        if self.failed is not None:
            raise self.failed
        self.futures.append(self.pool.submit(self._write, image, pixels, converted, instance, semantic, meta,
                                             depth, raw))
        if len(self.futures) > 256:
            self.drain(keep=64)

    def _write(self, image: SourceImage, pixels: np.ndarray, converted: bool, instance: np.ndarray,
               semantic: np.ndarray, meta: dict[str, Any], depth: np.ndarray | None = None,
               raw: bytes | None = None) -> None:
        if self.failed is not None:
            return
        target = rgb_target(self.data, image, converted)
        try:
            if converted:
                save_rgb(target, pixels)
            else:
                _place(image.path, target, self.rgb_mode, raw)
            save_map(map_path(self.data, "instance", image.class_dir, image.stem), instance)
            save_map(map_path(self.data, "semantic", image.class_dir, image.stem), semantic)
            if depth is not None:
                save_map(map_path(self.data, "depth", image.class_dir, image.stem), depth)  # uint16 grey
            h, w = instance.shape
            record = {"class": image.class_dir, "stem": image.stem,
                      "rgb": str(target.relative_to(self.data / "rgb")), "source": str(image.path.resolve()),
                      "width": w, "height": h, **meta, **({"depth": True} if depth is not None else {})}
            with self.lock:
                self._append(sidecar_path(self.data, image.class_dir), json.dumps(record) + "\n")
        except OSError as exc:  # the first failure is kept; submit, drain and close raise it
            with self.lock:
                if self.failed is None:
                    self.failed = OutputWriteError(output_error_line(exc, self.data))
                    self.failed.__cause__ = exc

    def _append(self, path: Path, line: str) -> None:
        """Append one sidecar line (under the lock). A line cut by an earlier kill or a full disk is ended first,
        so that the new line stays readable; a failed append is cut back to where it started."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a+b") as fh:  # read too: the last byte is checked
            start = fh.seek(0, os.SEEK_END)
            try:
                if path not in self.sidecars_checked:
                    if start and os.pread(fh.fileno(), 1, start - 1) != b"\n":
                        fh.write(b"\n")
                    self.sidecars_checked.add(path)
                fh.write(line.encode())
                fh.flush()
            except OSError as exc:
                try:
                    os.truncate(path, start)
                except OSError:
                    pass
                raise name_target(exc, path)

    def drain(self, keep: int = 0) -> None:
        """Wait until at most ``keep`` writes are pending; a failed write (disk full …) is raised here."""
        while len(self.futures) > keep:
            self.futures.pop(0).result()
        if self.failed is not None:
            raise self.failed

    def close(self) -> None:
        """Wait for the writes; after a failed one, drop those not started and raise the failure."""
        try:
            self.drain()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=self.failed is not None)


def output_error_line(exc: OSError, data: Path) -> str:
    """The message of a dataset file that could not be written: the file, the reason, the disk (with its free
    space when it is full) and what to do."""
    path = exc.filename if isinstance(exc.filename, str) else str(data)
    reason = exc.strerror or str(exc)
    disk = data.resolve()
    while not os.path.ismount(disk) and disk != disk.parent:
        disk = disk.parent
    try:
        free = f", {shutil.disk_usage(data).free / 2**20:,.0f} MiB free"
    except OSError:
        free = ""
    fixes: dict[int | None, str] = {
        errno.ENOSPC: "free space on that disk", errno.EDQUOT: "free space within your quota on that disk",
        errno.EROFS: "make it writable, or label into a --out on another disk",
        errno.EACCES: f"make {data} writable for you", errno.EPERM: f"make {data} writable for you",
        errno.EIO: "check the disk (e.g. `dmesg`)"}
    fix = fixes.get(exc.errno, "fix the cause")
    return (f"{path}: could not be written ({reason}; the disk of {data} is mounted at {disk}{free}). Labelling "
            f"stopped; the images labelled so far are kept and no temporary file is left: {fix}, then run the same "
            f"command again: it resumes.")


def _place(source: Path, target: Path, mode: str, raw: bytes | None = None) -> None:
    """Copy (or link) the original file into DATA/rgb through a temporary name; a copy writes ``raw`` (the
    source's bytes, read with the image) when given."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if mode in ("symlink", "hardlink"):
        tmp = target.with_name(temporary_name(target.name, f"tmp-{os.getpid()}-{threading.get_ident()}"))
        tmp.unlink(missing_ok=True)
        try:
            if mode == "symlink":
                tmp.symlink_to(source.resolve())
            else:
                os.link(source, tmp)
            os.replace(tmp, target)
            return
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if mode == "symlink" or exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise name_target(exc, target, tmp)
            # a hard link is not possible here (another file system, a file system without them): copy instead
    data = raw if raw is not None else source.read_bytes()
    atomic_write(target, lambda fh: fh.write(data), binary=True)


RUN_NAME = "meta/labelling.json"  # the source and settings of the run that made the folder, written first
DATASET_ENTRIES = {"rgb", "instance", "semantic", "depth", "meta", ERRORS_NAME, MANIFEST_NAME, "preview.png",
                   LOCK_NAME}  # the lock of `cfmae label` (cli/label.py holds it while the folder is claimed)


def claim_dataset(src: Path, data: Path, settings: dict[str, Any]) -> bool:
    """Check that ``cfmae label SRC --out DATA`` with ``settings`` (the source and every option that changes
    the labels) may write into ``data`` before anything is written: a new or empty folder, or a folder of an
    earlier run of the same source and settings (then it resumes; returns True). Refused, with the difference
    named: another source or other settings, a folder with files that are not a dataset's, and ``data`` inside
    the source (it would be read as images). The settings are recorded (``DATA/meta/labelling.json``) by
    :func:`label_folder`, before its first image.
    """
    src_abs, data_abs = src.resolve(), data.resolve()
    if data_abs == src_abs or data_abs.is_relative_to(src_abs):
        raise CfmaeError(f"--out {data}: inside the source folder {src}; the dataset would be read back as images. "
                         f"Write it beside the source, e.g. --out {src_abs.parent / (src_abs.name + '-cfmae')}.")
    if data.exists() and not data.is_dir():
        raise CfmaeError(f"--out {data}: a file, not a folder.")
    entries = list_folder(data).names if data.is_dir() else []
    recorded = _recorded_settings(data)
    if recorded is None and entries:
        foreign = sorted(set(entries) - DATASET_ENTRIES)
        if foreign or (data / MANIFEST_NAME).exists():
            what = f"files that are not a cfmae dataset's ({', '.join(foreign[:5])})" if foreign else \
                "a dataset whose source and settings were not recorded (made by an older cfmae)"
            raise CfmaeError(f"--out {data}: holds {what}; nothing is written there. Label into a new or empty "
                             f"folder.")
    if recorded is not None:
        changed = [f"{key} {recorded.get(key)!r} → {settings.get(key)!r}" for key in sorted(set(recorded) |
                   set(settings)) if recorded.get(key) != settings.get(key)]
        if changed:
            raise CfmaeError(f"--out {data}: a dataset labelled from another source or with other settings "
                             f"({'; '.join(changed)}); a rerun only resumes the same labelling. Label into a "
                             f"new folder, or rerun with the recorded settings.")
    return recorded is not None


def _recorded_settings(data: Path) -> dict[str, Any] | None:
    """The settings of the run that made ``data`` (its ``meta/labelling.json``, else the manifest's copy)."""
    for path, get in ((data / RUN_NAME, lambda d: d), (data / MANIFEST_NAME, lambda d: d["labelling"]["settings"])):
        if path.is_file():
            try:
                return dict(get(json.loads(path.read_text(encoding="utf-8"))))
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return None


def append_errors(data: Path, errors: list[dict[str, str]]) -> None:
    """Add the unreadable sources to ``DATA/label-errors.jsonl``; a failure to write it stops labelling, like
    any other file of the dataset (:class:`OutputWriteError`)."""
    if errors:
        path = data / ERRORS_NAME
        try:
            with path.open("a") as fh:
                fh.write("".join(json.dumps(e) + "\n" for e in errors))
        except OSError as exc:
            raise OutputWriteError(output_error_line(name_target(exc, path), data)) from exc


def finalize(data: Path, images: list[SourceImage], instance: InstanceBackend, semantic: SemanticBackend,
             src: Path, settings: dict[str, Any] | None = None, depth: Any = None) -> dict[str, Any]:
    """Sort and de-duplicate the sidecars and the error list, then write the manifest (rank 0, at the end)."""
    labelled: set[str] = set()
    for class_dir in sorted({im.class_dir for im in images}):
        path = sidecar_path(data, class_dir)
        records = {r["stem"]: r for r in read_jsonl(path) if "stem" in r and _complete(data, r)}
        labelled |= {r["source"] for r in records.values()}
        atomic_write_text(path, "".join(json.dumps(records[s]) + "\n" for s in sorted(records)))
    errors = {e["path"]: e for e in read_jsonl(data / ERRORS_NAME) if e.get("path") not in labelled}
    if (data / ERRORS_NAME).exists():
        atomic_write_text(data / ERRORS_NAME, "".join(json.dumps(errors[p]) + "\n" for p in sorted(errors)))
    classes = sorted({im.class_dir for im in images} - {""})
    write_manifest(data, semantic.classes,
                   labelling={"instance": instance.describe(), "semantic": semantic.describe(),
                              **({"depth": depth.describe()} if depth is not None else {}),
                              "source": str(src.resolve()), "tool": f"cfmae {__version__}",
                              "sidecars": "meta/<class>.jsonl", "settings": settings or _recorded_settings(data)},
                   counts={"images": len(labelled), "classes": len(classes), "errors": len(errors)})
    return {"images": len(labelled), "errors": len(errors), "classes": len(classes)}


@dataclass
class LabelProgress:
    done: int = 0
    total: int = 0
    errors: int = 0
    images_per_s: float = 0.0


def label_folder(src: Path, data: Path, instance: InstanceBackend, semantic: SemanticBackend, *,
                 prompt_for: Callable[[str | None], str], batch_size: int = 8, workers: int = 4,
                 limit: int | None = None, rgb_mode: str = "copy", rank: int = 0, world: int = 1,
                 on_progress: Callable[[LabelProgress], None] | None = None,
                 settings: dict[str, Any] | None = None, depth: Any = None) -> dict[str, Any]:
    """Label this rank's share (every ``world``-th image) of ``src`` into ``data``; returns counts. ``settings``
    (checked by :func:`claim_dataset`) are recorded first, by rank 0, unless the folder has them.

    The caller runs :func:`finalize` on rank 0 once every rank has returned.
    """
    images, problems = list_sources(src, limit)
    data.mkdir(parents=True, exist_ok=True)
    if settings is not None and rank == 0 and _recorded_settings(data) is None:
        atomic_write_text(data / RUN_NAME, json.dumps(settings, indent=2) + "\n")
    if (data / MANIFEST_NAME).exists() and rank == 0:
        (data / MANIFEST_NAME).unlink()  # the manifest comes back when the run is complete again
    mine = images[rank::world]
    done = done_images(data, mine)
    todo = [im for im in mine if (im.class_dir, im.stem) not in done]
    if rank == 0:
        append_errors(data, problems)
    log.info("%d image(s) in %s; %d of this process's %d already labelled; %d to do", len(images), src,
             len(mine) - len(todo), len(mine), len(todo))
    progress = LabelProgress(total=len(todo))
    loader = DataLoader(Sources(todo, raw=rgb_mode != "symlink"), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_sources)
    writer = Writer(data, rgb_mode)
    start = time.perf_counter()
    try:
        for batch in loader:
            bad = [{"path": str(todo[x["index"]].path.resolve()), "error": x["error"]} for x in batch if x["error"]]
            append_errors(data, bad)
            good = [x for x in batch if not x["error"]]
            if good:
                prompts = [prompt_for(todo[x["index"]].class_dir or None) for x in good]
                results = label_batch(instance, semantic, [x["image"] for x in good], prompts)
                depths = depth.label_depth([x["image"] for x in good]) if depth is not None else [None] * len(good)
                for item, (ins, sem, meta), dmap in zip(good, results, depths):
                    writer.submit(todo[item["index"]], item["image"], item["converted"], ins, sem, meta, dmap,
                                  item["raw"])
            progress.done += len(batch)
            progress.errors += len(bad)
            progress.images_per_s = progress.done / max(time.perf_counter() - start, 1e-9)
            if on_progress is not None:
                on_progress(progress)
    finally:
        writer.close()
    return {"labelled": progress.done - progress.errors, "errors": progress.errors, "skipped_done": len(done),
            "images": images}
