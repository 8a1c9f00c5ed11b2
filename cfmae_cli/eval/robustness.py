"""ImageNet out-of-distribution robustness, the paper's Table 4: IN-A, IN-R and IN-Sketch top-1, IN-C mCE, Score.

Every image of every dataset is one stream through one DataLoader (workers, one batch in memory at a time);
what is kept are counts per *split* (a dataset, or one corruption at one severity of ImageNet-C).

* IN-A / IN-R: 200-class subsets. A prediction is the arg-max of the 1000-way logits over the 200 ImageNet-1k
  columns of the subset (timm's ``imagenet_{a,r}_indices.txt``); a folder's wnid gives its ImageNet-1k index.
* IN-Sketch: 1000 classes, top-1 and top-5.
* IN-C: ``corruption/severity/wnid/*``, 15 corruptions x 5 severities (+ 4 extra, reported apart); top-1 error
  E_{s,c}; CE_c = sum_s E_{s,c} / sum_s E^AlexNet_{s,c}; mCE = mean of CE over the 15. No resize: the images
  are 224 x 224 already.
* Score = mean of the three accuracies and 100 - mCE (all in %).
"""

from __future__ import annotations

import json
import logging
import os
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from cfmae_cli.data.dataset import collate, Skipped, unreadable_reason
from cfmae_cli.data.maps import UNREADABLE
from cfmae_cli.errors import DataError
from cfmae_cli.eval.models import load_eval_model
from cfmae_cli.eval.suites import DATASETS
from cfmae_cli.formats import atomic_write_text, IMAGE_EXTENSIONS, list_folder, need_folder
from cfmae_cli.train import distributed
from cfmae_cli.train.rundir import attach_log_file, claim_run_dir, mark_finished

log = logging.getLogger(__name__)

NAMES = {"a": "imagenet-a", "r": "imagenet-r", "sketch": "imagenet-sketch", "c": "imagenet-c"}
FOLDERS = {"a": ("imagenet-a", "imagenet_a"), "r": ("imagenet-r", "imagenet_r"),
           "sketch": ("imagenet-sketch", "imagenet_sketch", "sketch"), "c": ("imagenet-c", "imagenet_c")}
CORRUPTIONS = {  # folder → the AlexNet table's row name; the 15 of mCE
    "gaussian_noise": "Gaussian Noise", "shot_noise": "Shot Noise", "impulse_noise": "Impulse Noise",
    "defocus_blur": "Defocus Blur", "glass_blur": "Glass Blur", "motion_blur": "Motion Blur",
    "zoom_blur": "Zoom Blur", "snow": "Snow", "frost": "Frost", "fog": "Fog", "brightness": "Brightness",
    "contrast": "Contrast", "elastic_transform": "Elastic", "pixelate": "Pixelate",
    "jpeg_compression": "JPEG Compression"}
EXTRA_CORRUPTIONS = {"speckle_noise": "Speckle Noise", "gaussian_blur": "Gaussian Blur", "spatter": "Spatter",
                     "saturate": "Saturate"}
SEVERITIES = (1, 2, 3, 4, 5)


def _timm_info(name: str) -> list[str]:
    data = pkgutil.get_data("timm.data", f"_info/{name}")
    assert data is not None, name
    return data.decode("utf-8").split()


def imagenet_synsets() -> list[str]:
    """The 1000 ImageNet-1k wnids in class-index order (sorted)."""
    return _timm_info("imagenet_synsets.txt")


def subset_columns(key: str) -> list[int]:
    """The ImageNet-1k indices of the 200 classes of IN-A ('a') or IN-R ('r')."""
    return [int(i) for i in _timm_info(f"imagenet_{key}_indices.txt")]


def alexnet_errors() -> dict[str, list[float]]:
    """AlexNet's top-1 error per ImageNet-C corruption folder and severity 1..5 (Hendrycks & Dietterich)."""
    rows = json.loads(pkgutil.get_data("cfmae_cli.eval", "imagenet-c-alexnet-errors.json") or b"{}")["rows"]
    by_name = {r["corruption"]: r["severity_1_to_5"] for r in rows}
    return {folder: by_name[name] for folder, name in {**CORRUPTIONS, **EXTRA_CORRUPTIONS}.items()}


@dataclass
class Split:
    """One dataset, or one corruption at one severity. Paths and labels are NumPy arrays (fixed-width bytes,
    int16): a few hundred MB for all of ImageNet-C, shared by the DataLoader workers without copies."""

    dataset: str  # 'a', 'r', 'sketch', 'c'
    name: str  # e.g. 'imagenet-a', 'imagenet-c/fog/3'
    paths: np.ndarray  # (n,) bytes, the image files
    labels: np.ndarray  # (n,) int16, ImageNet-1k indices
    resize: bool = True  # False for ImageNet-C (already 224 x 224)

    @classmethod
    def of(cls, dataset: str, name: str, samples: tuple[list[str], list[int]], resize: bool = True) -> "Split":
        return cls(dataset, name, np.array([os.fsencode(p) for p in samples[0]], dtype=np.bytes_),
                   np.array(samples[1], dtype=np.int16), resize)

    def __len__(self) -> int:
        return len(self.paths)


def find_dataset(root: Path, key: str) -> Path:
    for name in FOLDERS[key]:
        if (root / name).is_dir():
            return root / name
    layout = "corruption/severity/<wnid>/<image>" if key == "c" else "<wnid>/<image>"
    raise DataError(f"{root}: no {NAMES[key]} folder (looked for {', '.join(FOLDERS[key])}; expected "
                    f"{root / FOLDERS[key][0]}/{layout}). Leave it out with --datasets.")


def wnid_samples(folder: Path, allowed: dict[str, int], what: str) -> tuple[list[str], list[int]]:
    """(images, ImageNet-1k indices) of ``folder/<wnid>/<image>``; folders that are not wnids of ``what`` are
    refused."""
    dirs = list_folder(folder).dirs
    if not dirs:
        raise DataError(f"{folder}: no class folders; expected {folder}/<wnid>/<image> with the wnids of {what} "
                        f"(e.g. {next(iter(allowed))}).")
    unknown = [d for d in dirs if d not in allowed]
    if unknown:
        raise DataError(f"{folder}: {len(unknown)} folder(s) are not {what} wnids (e.g. {unknown[0]!r}); expected "
                        f"{folder}/<wnid>/<image>.")
    paths: list[str] = []
    labels: list[int] = []
    for d in dirs:
        for f in list_folder(folder / d).files:
            if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                paths.append(str(folder / d / f))
                labels.append(allowed[d])
    if not paths:
        raise DataError(f"{folder}: no images in its class folders.")
    return paths, labels


def find_splits(root: Path, datasets: list[str], limit: int | None = None) -> list[Split]:
    """Every split of the chosen datasets under ``root``, checked (clear errors for a missing or wrong layout).
    ``limit`` keeps the first N images of each split (a quick look, not the benchmark)."""
    need_folder(root, "--data")
    synsets = imagenet_synsets()
    index = {w: i for i, w in enumerate(synsets)}
    splits: list[Split] = []
    for key in datasets:
        folder = find_dataset(root, key)
        if key in ("a", "r"):
            allowed = {synsets[i]: i for i in subset_columns(key)}
            splits.append(Split.of(key, NAMES[key], wnid_samples(folder, allowed, NAMES[key])))
        elif key == "sketch":
            splits.append(Split.of(key, NAMES[key], wnid_samples(folder, index, "ImageNet-1k")))
        else:
            missing = [f"{c}/{s}" for c in CORRUPTIONS for s in SEVERITIES if not (folder / c / str(s)).is_dir()]
            if missing:
                raise DataError(f"{folder}: ImageNet-C needs the 15 corruptions x 5 severities of mCE as "
                                f"{folder}/<corruption>/<1-5>/<wnid>/<image>; {len(missing)} missing (e.g. "
                                f"{missing[0]}). Corruptions: {', '.join(CORRUPTIONS)}.")
            for corruption in [*CORRUPTIONS, *[c for c in EXTRA_CORRUPTIONS if (folder / c).is_dir()]]:
                for s in SEVERITIES:
                    if (folder / corruption / str(s)).is_dir():
                        splits.append(Split.of(key, f"{NAMES[key]}/{corruption}/{s}",
                                               wnid_samples(folder / corruption / str(s), index, "ImageNet-1k"),
                                               resize=False))
    if limit is not None:
        for split in splits:
            split.paths, split.labels = split.paths[:limit], split.labels[:limit]
    return splits


class SuiteDataset(Dataset):
    """All images of all splits: item = {'rgb', 'label', 'split'} or a :class:`Skipped` record."""

    def __init__(self, splits: list[Split], resize: Callable, no_resize: Callable, rank: int = 0, world: int = 1):
        """This rank's share: every ``world``-th image of the whole suite, starting at ``rank``."""
        self.paths = np.concatenate([s.paths for s in splits])[rank::world]
        self.labels = np.concatenate([s.labels for s in splits])[rank::world]
        self.split_ids = np.concatenate([np.full(len(s), k, np.int16) for k, s in enumerate(splits)])[rank::world]
        self.resize_of = [split.resize for split in splits]
        self.transforms = (no_resize, resize)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any] | Skipped:
        path, label, k = os.fsdecode(self.paths[i]), int(self.labels[i]), int(self.split_ids[i])
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except UNREADABLE as exc:
            return Skipped(str(path), unreadable_reason(exc))
        return {"rgb": self.transforms[self.resize_of[k]](image), "label": label, "split": k}


def column_masks(splits: list[Split], device: torch.device) -> Tensor:
    """(splits, 1000) bool: the columns a split's prediction may take (the 200 of IN-A / IN-R, else all)."""
    masks = torch.ones(len(splits), 1000, dtype=torch.bool)
    for k, split in enumerate(splits):
        if split.dataset in ("a", "r"):
            masks[k] = False
            masks[k, subset_columns(split.dataset)] = True
    return masks.to(device)


@torch.no_grad()
def count_hits(model: Callable[[Tensor], Tensor], splits: list[Split], resize: Callable, no_resize: Callable,
               batch_size: int, workers: int, info: distributed.DistInfo, bf16: bool = False,
               on_batch: Callable[[int], None] | None = None) -> tuple[Tensor, list[Skipped]]:
    """(splits, 3) float64 counts (top-1 hits, top-5 hits, images) summed over every rank, and this rank's
    unreadable files. Each rank takes every world-th image of the whole suite."""
    device = info.device
    dataset = SuiteDataset(splits, resize, no_resize, info.rank, info.world)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                        pin_memory=device.type == "cuda", generator=torch.Generator())
    masks = column_masks(splits, device)
    counts = torch.zeros(len(splits), 3, dtype=torch.float64, device=device)
    skipped: list[Skipped] = []
    for batch in loader:
        skipped += batch["skipped"]
        if batch["size"]:
            x = batch["rgb"].to(device, non_blocking=True)
            labels = batch["label"].to(device)
            split = batch["split"].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)
            if logits.shape[-1] != 1000:
                raise DataError(f"the model gives {logits.shape[-1]} logits; the ImageNet variants need an "
                                f"ImageNet-1k classifier (1000 classes in wnid order).")
            logits = logits.float().masked_fill(~masks[split], float("-inf"))
            hits = logits.topk(5, dim=1).indices.eq(labels[:, None])
            rows = torch.stack([hits[:, 0], hits.any(1), torch.ones_like(hits[:, 0])], 1).double()
            counts.index_add_(0, split, rows)
        if on_batch is not None:
            on_batch(batch["size"] + len(batch["skipped"]))
    if info.distributed:
        dist.all_reduce(counts)
    return counts, skipped


def summarise(splits: list[Split], counts: Tensor, skipped: int) -> dict[str, Any]:
    """Per-dataset metrics (in %), ImageNet-C's CE per corruption and mCE, and the Score when all four ran."""
    counts = counts.cpu()
    by: dict[str, Any] = {}
    for key in dict.fromkeys(s.dataset for s in splits):
        rows = [(s, counts[k]) for k, s in enumerate(splits) if s.dataset == key]
        if key != "c":
            top1, top5, n = rows[0][1].tolist()
            by[NAMES[key]] = {"top1": 100 * top1 / max(n, 1), "top5": 100 * top5 / max(n, 1), "images": int(n)}
            continue
        alex = alexnet_errors()
        errors: dict[str, list[float]] = {}
        reference: dict[str, float] = {}  # AlexNet's errors summed over the severities present
        for split, (top1, _, n) in ((s, c.tolist()) for s, c in rows):
            _, corruption, severity = split.name.split("/")
            errors.setdefault(corruption, []).append(1 - top1 / max(n, 1))
            reference[corruption] = reference.get(corruption, 0.0) + alex[corruption][int(severity) - 1]
        ce = {c: 100 * sum(e) / reference[c] for c, e in errors.items()}
        standard = [c for c in CORRUPTIONS]
        by[NAMES[key]] = {
            "mCE": sum(ce[c] for c in standard) / len(standard),
            "ce": {c: ce[c] for c in standard},
            "extra_ce": {c: ce[c] for c in errors if c in EXTRA_CORRUPTIONS},
            "top1_error": {c: [100 * e for e in errors[c]] for c in errors},
            "top1_mean": 100 * (1 - sum(sum(errors[c]) for c in standard) / (5 * len(standard))),
            "images": int(sum(c[2] for _, c in rows))}
    results: dict[str, Any] = {"datasets": by, "skipped_files": skipped}
    missing = [NAMES[k] for k in DATASETS if NAMES[k] not in by]
    if missing:
        results["score"] = None
        results["score_missing"] = missing
    else:
        results["score"] = (by["imagenet-a"]["top1"] + by["imagenet-r"]["top1"] + by["imagenet-sketch"]["top1"]
                            + 100 - by["imagenet-c"]["mCE"]) / 4
    return results


def as_rows(results: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(dataset, metric, value) rows for the table and results.csv."""
    rows = []
    for name, metrics in results["datasets"].items():
        if name == "imagenet-c":
            rows.append((name, "mCE", metrics["mCE"]))
            rows.append((name, "top-1 (mean of 15 x 5)", metrics["top1_mean"]))
            rows += [(name, f"CE {c}", v) for c, v in metrics["ce"].items()]
            rows += [(name, f"CE {c} (extra)", v) for c, v in metrics["extra_ce"].items()]
        else:
            rows += [(name, "top-1", metrics["top1"]), (name, "top-5", metrics["top5"])]
    if results["score"] is not None:
        rows.append(("all", "Score", results["score"]))
    return rows


def evaluate_suite(model: nn.Module | Callable[[Tensor], Tensor], splits: list[Split], resize: Callable,
                   no_resize: Callable, *, batch_size: int, workers: int, info: distributed.DistInfo,
                   bf16: bool = False, on_batch: Callable[[int], None] | None = None
                   ) -> tuple[dict[str, Any], list[Skipped]]:
    counts, skipped = count_hits(model, splits, resize, no_resize, batch_size, workers, info, bf16, on_batch)
    bad = sum(distributed.gather(len(skipped), info))
    if int(counts[:, 2].sum()) == 0:
        raise DataError("no image of the suite could be read; see bad_files.txt")
    return summarise(splits, counts, bad), skipped


def run_robustness(checkpoint: str | None, model_name: str | None, root: Path, datasets: list[str], *,
                   device: torch.device, batch_size: int = 256, workers: int = 8, out: str | Path | None = None,
                   name: str = "run", limit: int | None = None, preprocessing: dict[str, Any] | None = None,
                   on_start: Callable[[int], None] | None = None, on_batch: Callable[[int], None] | None = None
                   ) -> dict[str, Any]:
    """Evaluate a classifier on the chosen datasets; rank 0 writes ``results.json``, ``results.csv`` (and
    ``bad_files.txt``) into a run folder (``out`` or ``runs/eval-robustness/<name>[-k]``). In a process group
    every rank calls this and takes its share of the images. ``preprocessing`` overrides img_size, crop_pct,
    interpolation of the model's own."""

    info = distributed.init(device)
    handler, claim = None, None
    try:
        model = load_eval_model(checkpoint, model_name, info.device)
        if model.num_classes is not None and model.num_classes != 1000:
            raise DataError(f"{checkpoint or model_name}: a classifier of {model.num_classes} classes; the ImageNet "
                            f"variants need an ImageNet-1k classifier (1000 classes in wnid order).")
        for key, value in (preprocessing or {}).items():
            setattr(model, key, value)
        if model.classes is not None and model.classes != imagenet_synsets():
            raise DataError(f"{checkpoint}: its {len(model.classes)} classes are not the 1000 ImageNet-1k wnids in "
                            f"order (first: {model.classes[:2]}); the ImageNet variants are labelled by wnid.")
        splits = find_splits(root, datasets, limit)
        if info.is_main:  # rank 0 holds the folder until the results are written
            claim = claim_run_dir("eval-robustness", name, out)
        run_dir = Path(distributed.broadcast(str(claim.path) if claim is not None else None, info))
        handler = attach_log_file(run_dir) if info.is_main else None
        total = sum(len(s) for s in splits)
        log.info("model: %s", model.description)
        log.info("preprocessing: %s", model.describe_preprocessing())
        log.info("%d images in %d split(s) of %s under %s; %d process(es)", total, len(splits),
                 ", ".join(NAMES[k] for k in datasets), root, info.world)
        if on_start is not None and info.is_main:
            on_start(total)
        bf16 = distributed.uses_bf16("auto", info.device)
        results, skipped = evaluate_suite(model.forward, splits, model.resize_transform(), model.as_is_transform(),
                                          batch_size=batch_size, workers=workers, info=info, bf16=bf16,
                                          on_batch=on_batch if info.is_main else None)
        bad = [s for part in distributed.gather(skipped, info) for s in part]
        results.update(model=model.description, preprocessing=model.describe_preprocessing(), root=str(root),
                       limit=limit, run_dir=str(run_dir))
        if info.is_main:
            _write_results(run_dir, results, bad)
            mark_finished(run_dir)  # finished: a rerun into it is refused from now on
        return results
    finally:
        if handler is not None:
            logging.getLogger("cfmae_cli").removeHandler(handler)
            handler.close()
        if claim is not None:
            claim.release()
        distributed.shutdown()


def _write_results(run_dir: Path, results: dict[str, Any], bad: list[Skipped]) -> None:

    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(run_dir / "results.csv", "dataset,metric,value\n" + "".join(
        f"{d},{m},{v:.4f}\n" for d, m, v in as_rows(results)))
    if bad:
        atomic_write_text(run_dir / "bad_files.txt", "".join(f"{s.path}\t{s.reason}\n" for s in bad))
