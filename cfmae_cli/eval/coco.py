"""COCO-format detection data: reading annotations (with checks), our dataset layout's instance maps as COCO
annotations, the dataset that feeds Mask R-CNN, and box / mask AP through pycocotools."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from cfmae_cli.data.dataset import SeededDataset, skip_reason, Skipped, unreadable_reason
from cfmae_cli.data.maps import check_class_ids, read_ids, UNREADABLE
from cfmae_cli.data.layout import Sample
from cfmae_cli.errors import DataError
from cfmae_cli.formats import UNLABELLED

log = logging.getLogger(__name__)


def rle(mask: np.ndarray) -> dict[str, Any]:
    """A binary (H, W) mask as COCO's compressed RLE, JSON-ready."""
    code = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    code["counts"] = code["counts"].decode("ascii")
    return code


def coco_from_layout(samples: Sequence[Sample], semantic_classes: list[str], min_area: float = 0.0) -> dict[str, Any]:
    """COCO dict of the dataset layout: each instance id > 0 of an image is an object, its category the most
    frequent semantic class under it (unlabelled pixels aside); objects smaller than ``min_area`` of the image
    are left out."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, sample in enumerate(samples, start=1):
        try:  # the one reader of id maps, as training reads them; a map it would skip is left out, named
            with Image.open(sample.rgb) as im:
                size = im.size
            ids = read_ids(sample.maps["instance"], size, "instance")
            sem = read_ids(sample.maps["semantic"], size, "semantic")
            check_class_ids(sem, sample.maps["semantic"], "semantic", len(semantic_classes))
        except Exception as exc:  # noqa: BLE001 - skip_reason decides; a bug is raised
            reason = skip_reason(exc)
            if reason is None:
                raise
            log.warning("%s: left out of the COCO annotations (%s)", sample.rgb, reason)
            continue
        h, w = ids.shape
        images.append({"id": image_id, "file_name": str(sample.rgb), "height": h, "width": w})
        for k in np.unique(ids):
            m = ids == k
            classes = sem[m][sem[m] != UNLABELLED]
            if k == 0 or m.sum() < min_area * h * w or classes.size == 0:
                continue
            ys, xs = np.nonzero(m)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(np.bincount(classes).argmax()) + 1, "segmentation": rle(m),
                                "area": float(m.sum()), "iscrowd": 0,
                                "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                                         float(ys.max() - ys.min() + 1)]})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(semantic_classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def read_coco(path: Path, image_dir: Path) -> dict[str, Any]:
    """A COCO annotation file with ``file_name`` made absolute, checked by :func:`check_coco` (before any
    training: a malformed entry is one message naming the file and the entry); a clear message for an
    unreadable file."""
    try:
        coco = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable COCO annotation file ({exc}).") from None
    if not isinstance(coco, dict) or not all(k in coco for k in ("images", "annotations", "categories")):
        raise DataError(f"{path}: a COCO file needs 'images', 'annotations' and 'categories'.")
    check_coco(coco, path)
    for image in coco["images"]:
        image["file_name"] = str(image_dir / image["file_name"])
    return coco


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def usable_polygons(segm: list[Any]) -> list[list[float]]:
    """The polygons of a COCO ``segmentation`` list that describe an area: at least 3 points, an even count of
    coordinates (what Detectron2 keeps; pycocotools fails on the others, and reads 4 numbers as a box)."""
    return [p for p in segm if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]


def check_coco(coco: dict[str, Any], path: Path) -> None:
    """Check and complete a COCO annotation dict in place, naming the file and the entry at fault.

    Refused (:class:`DataError`): an image without an integer ``id``, ``file_name`` or positive ``height`` and
    ``width``, two images with one id; a category without ``id``; an annotation without ``id``, ``bbox`` (4
    numbers) or ``segmentation`` (polygons of numbers, or an RLE with ``counts`` and its image's ``size``).
    Left out, with one warning: annotations whose polygons all have fewer than 3 points (a polygon of 2 points
    is a line; Detectron2 drops them too). Completed: ``iscrowd`` 0 and ``area`` (the mask's) where missing,
    as the evaluation needs them."""
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco[key], list):
            raise DataError(f"{path}: '{key}' is not a list.")
    sizes: dict[Any, tuple[int, int]] = {}  # by image id (an annotation may name any value)
    for k, image in enumerate(coco["images"]):
        what = f"{path}: image {image.get('id', f'#{k}') if isinstance(image, dict) else f'#{k}'}"
        if not isinstance(image, dict) or not isinstance(image.get("id"), int):
            raise DataError(f"{what}: no integer 'id'; every image needs id, file_name, height and width.")
        missing = [key for key in ("file_name", "height", "width") if key not in image]
        if missing:
            raise DataError(f"{what}: no {' and no '.join(repr(m) for m in missing)}; every image needs id, "
                            f"file_name, height and width.")
        if not isinstance(image["file_name"], str) or not all(
                isinstance(image[key], int) and image[key] > 0 for key in ("height", "width")):
            raise DataError(f"{what}: file_name must be a text and height, width positive integers (they are "
                            f"{image['file_name']!r}, {image['height']!r}, {image['width']!r}).")
        if image["id"] in sizes:
            raise DataError(f"{what}: two images have this id; image ids must differ.")
        sizes[image["id"]] = (image["height"], image["width"])
    for k, category in enumerate(coco["categories"]):
        if not isinstance(category, dict) or "id" not in category:
            raise DataError(f"{path}: category #{k} has no 'id'.")
    kept, dropped = [], []
    for k, ann in enumerate(coco["annotations"]):
        if not isinstance(ann, dict) or "id" not in ann:
            raise DataError(f"{path}: annotation #{k} has no 'id'; every annotation needs id, image_id, "
                            f"category_id, bbox and segmentation.")
        what = f"{path}: annotation {ann['id']} (image {ann.get('image_id')})"
        bbox = ann.get("bbox")
        if bbox is None:
            raise DataError(f"{what}: no 'bbox'; every annotation needs a box [x, y, width, height].")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_number(v) for v in bbox):
            raise DataError(f"{what}: 'bbox' is {bbox!r}, not 4 numbers [x, y, width, height].")
        segm = ann.get("segmentation")
        if segm is None:
            raise DataError(f"{what}: no 'segmentation'; Mask R-CNN needs each object's mask (polygons or RLE).")
        size = sizes.get(ann.get("image_id"))
        if isinstance(segm, list):
            if not all(isinstance(p, list) and all(_number(v) for v in p) for p in segm):
                raise DataError(f"{what}: 'segmentation' is not a list of polygons [x1, y1, x2, y2, …] of numbers.")
            polygons = usable_polygons(segm)
            if not polygons:
                dropped.append((ann, segm))
                continue
            ann["segmentation"] = polygons
        elif isinstance(segm, dict):
            if "counts" not in segm or not isinstance(segm.get("size"), list) or len(segm["size"]) != 2:
                raise DataError(f"{what}: an RLE 'segmentation' needs 'counts' and 'size' [height, width].")
            if size is not None and tuple(segm["size"]) != size:
                raise DataError(f"{what}: the RLE's size {segm['size']} is not its image's {list(size)} "
                                f"[height, width].")
        else:
            raise DataError(f"{what}: 'segmentation' is {type(segm).__name__}, not polygons or an RLE.")
        ann.setdefault("iscrowd", 0)
        if "area" not in ann and size is not None:
            ann["area"] = float(mask_utils.area(_rle(ann["segmentation"], *size)))
        kept.append(ann)
    if dropped:
        ann, segm = dropped[0]
        log.warning("%s: %d annotation(s) left out: no polygon of at least 3 points (e.g. annotation %s of image %s: "
                    "%s)", path, len(dropped), ann["id"], ann.get("image_id"), json.dumps(segm)[:80])
        coco["annotations"] = kept


def _rle(segm: Any, h: int, w: int) -> dict[str, Any]:
    """One compressed RLE of a COCO segmentation (polygons, uncompressed or compressed RLE) on an h x w image."""
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    if isinstance(segm.get("counts"), list):
        return mask_utils.frPyObjects(segm, h, w)
    return segm


def clip_box(bbox: list[float], h: int, w: int) -> list[float]:
    """COCO's [x, y, width, height] → [x0, y0, x1, y1] inside an image of h x w."""
    x, y, bw, bh = bbox
    return [max(0.0, x), max(0.0, y), min(float(w), x + bw), min(float(h), y + bh)]


class CocoDetection(SeededDataset):
    """Items: {'image': uint8 (3, H, W), 'target': {boxes (N, 4) xyxy, labels (N,) in 1..C, masks (N, H, W)
    uint8, image_id}} or a :class:`Skipped` record. Problems with annotations are counted in ``problems``:
    unknown category ids and degenerate boxes are dropped, boxes are clipped to the image.

    Targets are built as MMDetection builds them: crowd regions (``iscrowd=1``) are not targets (``crowd``
    counts them; the evaluation keeps them, pycocotools ignores detections on them), and in training an
    image with no usable annotation left is skipped (``without_annotations`` counts them).
    """

    def __init__(self, coco: dict[str, Any], train: bool, hflip: float = 0.5, seed: int = 0):
        self.train, self.hflip, self.seed = train, hflip, seed
        self.label_of = {c["id"]: i + 1 for i, c in enumerate(coco["categories"])}
        self.annotations: dict[int, list[dict]] = {im["id"]: [] for im in coco["images"]}
        self.problems = {"unknown_category": 0, "clipped_box": 0, "empty_box": 0, "unknown_image": 0}
        self.crowd = 0
        size = {im["id"]: (im["height"], im["width"]) for im in coco["images"]}
        for ann in coco["annotations"]:  # counted here, once: items are loaded in worker processes
            if ann.get("image_id") not in self.annotations:
                self.problems["unknown_image"] += 1
            elif ann.get("category_id") not in self.label_of:
                self.problems["unknown_category"] += 1
            elif ann.get("iscrowd", 0):
                self.crowd += 1
            else:
                h, w = size[ann["image_id"]]
                x, y, bw, bh = ann["bbox"]
                box = clip_box(ann["bbox"], h, w)
                if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                    self.problems["empty_box"] += 1
                    continue
                if box != [x, y, x + bw, y + bh]:
                    self.problems["clipped_box"] += 1
                self.annotations[ann["image_id"]].append(ann)
        self.images = [im for im in coco["images"] if not train or self.annotations[im["id"]]]
        self.without_annotations = len(coco["images"]) - len(self.images)

    def __len__(self) -> int:
        return len(self.images)

    def target(self, image: dict[str, Any], h: int, w: int) -> dict[str, Tensor]:
        boxes, labels, masks = [], [], []
        for ann in self.annotations[image["id"]]:
            box = clip_box(ann["bbox"], h, w)
            boxes.append(box)
            labels.append(self.label_of[ann["category_id"]])
            masks.append(mask_utils.decode(_rle(ann["segmentation"], h, w)))
        return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(labels, dtype=torch.int64),
                "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, h, w, dtype=torch.uint8),
                "image_id": torch.tensor(image["id"])}

    def load(self, index: int) -> dict[str, Any]:
        image = self.images[index]
        with Image.open(image["file_name"]) as im:
            rgb = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
        target = self.target(image, rgb.shape[1], rgb.shape[2])
        if self.train and bool(torch.rand(()) < self.hflip):
            rgb, w = rgb.flip(-1), rgb.shape[-1]
            target["boxes"] = torch.stack([w - target["boxes"][:, 2], target["boxes"][:, 1],
                                           w - target["boxes"][:, 0], target["boxes"][:, 3]], 1)
            target["masks"] = target["masks"].flip(-1)
        return {"image": rgb, "target": target}

    def skipped(self, index: int, exc: Exception) -> Skipped | None:
        """An image file that cannot be read is skipped; any other error is raised."""
        return Skipped(str(self.images[index]["file_name"]), unreadable_reason(exc)) if isinstance(exc, UNREADABLE) \
            else None


def collate_detection(items: Sequence[dict[str, Any] | Skipped]) -> dict[str, Any]:
    good = [x for x in items if not isinstance(x, Skipped)]
    return {"skipped": [x for x in items if isinstance(x, Skipped)], "size": len(good),
            "images": [x["image"] for x in good], "targets": [x["target"] for x in good]}


def coco_results(outputs: list[dict[str, Tensor]], image_ids: list[int], category_ids: list[int]
                 ) -> list[dict[str, Any]]:
    """torchvision Mask R-CNN outputs → COCO result records (boxes as xywh, masks thresholded at 0.5, RLE)."""
    records = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].float().cpu()
        masks = (out["masks"][:, 0] > 0.5).cpu().numpy() if "masks" in out else None
        for i, (box, score, label) in enumerate(zip(boxes.tolist(), out["scores"].tolist(), out["labels"].tolist())):
            record = {"image_id": image_id, "category_id": category_ids[label - 1], "score": float(score),
                      "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]}
            if masks is not None:
                record["segmentation"] = rle(masks[i])
            records.append(record)
    return records


#: pycocotools' ``stats[0..5]`` under our names: AP at IoU .50:.95, .50, .75, and for small (area < 32²),
#: medium (32²…96²) and large (> 96²) objects; each key ends in ``_box`` or ``_mask``
AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_ap(ground_truth: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, float | None]:
    """Box and mask AP, AP50, AP75, APs, APm, APl (in %, pycocotools' ``stats[0..5]``; keys ``AP_box``,
    ``APs_mask``, …). AP, AP50, AP75 are 0 where there is nothing to score; APs / APm / APl are None where
    the ground truth holds no object of that size (pycocotools' -1)."""

    out: dict[str, float | None] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        gt = COCO()
        gt.dataset = json.loads(json.dumps(ground_truth))
        gt.createIndex()
        for kind, name in (("bbox", "box"), ("segm", "mask")):
            if not results or not ground_truth["annotations"]:
                out.update({f"{k}_{name}": 0.0 if i < 3 else None for i, k in enumerate(AP_KEYS)})
                continue
            ev = COCOeval(gt, gt.loadRes(json.loads(json.dumps(results))), kind)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            for i, key in enumerate(AP_KEYS):  # -1 = no ground truth of that kind (of that size)
                value = float(ev.stats[i])
                out[f"{key}_{name}"] = 100 * max(value, 0.0) if i < 3 or value >= 0 else None
    return out
