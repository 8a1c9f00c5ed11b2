"""Instance maps with Grounded SAM (paper App. B): Grounding DINO boxes from a text prompt, SAM-HQ masks.

1. **Detect** — Grounding DINO on a batch with one prompt per image (the class name, ``"tench ."``). The
   processor's ``post_process_grounded_object_detection`` gives boxes and scores but no NMS: we add a
   class-agnostic ``torchvision.ops.nms`` and the paper's *adaptive threshold*: start high
   (``box_threshold``); when fewer than ``min_masks`` boxes survive, lower it by ``threshold_step`` down to
   ``threshold_floor``. One detector forward per batch; only the scores are re-filtered.
2. **Segment** — SAM-HQ (or plain SAM, whichever the folder holds) with the boxes as prompts, one mask per
   box, post-processed to the image size. Masks below ``min_mask_area`` of the image are dropped; the
   ``max_instances`` best-scoring ones are kept and painted largest first (id 1 = largest), so smaller
   instances stay visible on top.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torchvision.ops import nms

from cfmae_cli.errors import CfmaeError
from cfmae_cli.labeling.hf_utils import (as_rgb_array, chunks, inference_context, load_config_checked, load_or_fail,
                                         normalize_prompt, resolve_model, transformers_module)

logger = logging.getLogger(__name__)

DETECTOR_OPTION = "--detector-model"
SEGMENTER_OPTION = "--segmenter-model"


def select_boxes(boxes: torch.Tensor, scores: torch.Tensor, *, start: float, floor: float, step: float,
                 min_count: int, nms_iou: float) -> tuple[torch.Tensor, float]:
    """Class-agnostic NMS plus the adaptive confidence threshold.

    Args:
        boxes: (n, 4) xyxy; scores: (n,) — candidates (any score).
    Returns:
        ``(keep, threshold)``: indices into ``boxes`` (highest score first) of the boxes with
        ``score > threshold`` that survive NMS at IoU ``nms_iou``, and the threshold used — ``start``, or
        lowered by ``step`` (never below ``floor``) until at least ``min_count`` boxes survive.

    Greedy NMS keeps a box only against higher-scoring ones, so NMS over all candidates followed by the
    score cut equals NMS after the cut: one NMS serves every threshold tried.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device), float(start)
    kept = nms(boxes.float(), scores.float(), float(nms_iou))  # sorted by decreasing score
    kept_scores = scores[kept]
    threshold = float(start)
    while True:
        n = int((kept_scores > threshold).sum())
        if n >= min_count or threshold <= floor + 1e-9:
            break
        threshold = max(float(floor), round(threshold - float(step), 6))
    return kept[kept_scores > threshold], threshold


def paint_instances(masks: torch.Tensor, scores: torch.Tensor, *, min_area: float,
                    max_instances: int) -> tuple[torch.Tensor, list[int]]:
    """Id map from binary masks.

    Args:
        masks: (n, H, W) bool; scores: (n,) detection scores.
    Returns:
        ``(ids, order)``: (H, W) int32 map — 0 background, ``k`` the k-th largest kept mask — and the indices
        (into ``masks``) of the kept masks in id order. A mask is kept when its area is at least
        ``min_area`` x H x W (and > 0); of those, the ``max_instances`` best-scoring ones. Largest first, so
        a smaller instance overlapping a larger one stays visible.
    """
    h, w = masks.shape[-2:]
    ids = torch.zeros((h, w), dtype=torch.int32, device=masks.device)
    if masks.shape[0] == 0:
        return ids, []
    areas = masks.flatten(1).view(torch.uint8).sum(1, dtype=torch.int64)  # far faster than a bool sum
    valid = (areas >= max(1.0, min_area * h * w)).nonzero().flatten()
    if valid.numel() == 0:
        return ids, []
    best = valid[scores[valid].argsort(descending=True, stable=True)[:max_instances]]
    order = best[areas[best].argsort(descending=True, stable=True)].tolist()
    for k, i in enumerate(order, start=1):
        ids[masks[i]] = k
    return ids, order


class GroundedSamBackend:
    """Grounding DINO + SAM-HQ instance labeller (hub ids or local folders for both models)."""

    name = "grounded-sam"

    def __init__(self, detector_model: str, segmenter_model: str, device: torch.device, *,
                 box_threshold: float = 0.45, threshold_floor: float = 0.2, threshold_step: float = 0.05,
                 text_threshold: float = 0.25, min_masks: int = 1, nms_iou: float = 0.5,
                 min_mask_area: float = 0.001, max_instances: int = 15, batch_size: int = 8,
                 bf16: bool = False) -> None:
        if not 0.0 <= threshold_floor <= box_threshold <= 1.0:
            raise CfmaeError(f"grounded-sam thresholds: need 0 <= threshold_floor ({threshold_floor}) <= "
                             f"box_threshold ({box_threshold}) <= 1")
        if threshold_step <= 0:
            raise CfmaeError(f"grounded-sam threshold_step must be > 0, got {threshold_step}")
        if max_instances < 1 or min_masks < 0 or batch_size < 1:
            raise CfmaeError("grounded-sam: max_instances and batch_size must be >= 1, min_masks >= 0")
        self.device = torch.device(device)
        self.box_threshold, self.threshold_floor = float(box_threshold), float(threshold_floor)
        self.threshold_step, self.text_threshold = float(threshold_step), float(text_threshold)
        self.min_masks, self.nms_iou = int(min_masks), float(nms_iou)
        self.min_mask_area, self.max_instances = float(min_mask_area), int(max_instances)
        self.batch_size, self.bf16 = int(batch_size), bool(bf16)
        self.max_prompts = 3 * self.max_instances  # boxes per image sent to SAM (best scores first)
        self.detector_spec = resolve_model(detector_model, DETECTOR_OPTION)
        self.segmenter_spec = resolve_model(segmenter_model, SEGMENTER_OPTION)
        self._load_detector()
        self._load_segmenter()

    # -- loading -------------------------------------------------------------------------------------
    def _load_detector(self) -> None:
        spec, tf = self.detector_spec, transformers_module(DETECTOR_OPTION)
        load_config_checked(DETECTOR_OPTION, spec, ("grounding-dino",))
        self.detector = load_or_fail(DETECTOR_OPTION, spec, "Grounding DINO model",
                                     lambda: tf.GroundingDinoForObjectDetection.from_pretrained(spec))
        self.det_processor = load_or_fail(DETECTOR_OPTION, spec, "Grounding DINO processor",
                                          lambda: tf.AutoProcessor.from_pretrained(spec))
        self.detector.eval().to(self.device)

    def _load_segmenter(self) -> None:
        spec, tf = self.segmenter_spec, transformers_module(SEGMENTER_OPTION)
        config = load_config_checked(SEGMENTER_OPTION, spec, ("sam_hq", "sam"))
        self.is_hq = config.model_type == "sam_hq"
        cls = tf.SamHQModel if self.is_hq else tf.SamModel
        self.segmenter = load_or_fail(SEGMENTER_OPTION, spec, cls.__name__, lambda: cls.from_pretrained(spec))
        self.seg_processor = load_or_fail(SEGMENTER_OPTION, spec, "SAM processor",
                                          lambda: tf.AutoProcessor.from_pretrained(spec))
        self.segmenter.eval().to(self.device)

    # -- detection -----------------------------------------------------------------------------------
    def detect(self, images: list[np.ndarray], prompts: list[str]) -> list[dict]:
        """Grounding DINO boxes for each image.

        Args:
            images: HxWx3 uint8 RGB arrays (any sizes); prompts: one text per image (normalised to
                lowercase ending with ``.``).
        Returns:
            per image ``{'boxes': (n, 4) float32 xyxy in image pixels, 'scores': (n,) float32,
            'threshold': float}``, highest score first, after NMS and the adaptive threshold.
        """
        if len(images) != len(prompts):
            raise ValueError(f"detect: {len(images)} images but {len(prompts)} prompts")
        images = [as_rgb_array(im) for im in images]
        results: list[dict] = []
        for idx in chunks(len(images), self.batch_size):
            results.extend(self._detect_batch([images[i] for i in idx], [prompts[i] for i in idx]))
        return results

    def _detect_batch(self, images: list[np.ndarray], prompts: list[str]) -> list[dict]:
        sizes = [(int(im.shape[0]), int(im.shape[1])) for im in images]
        texts = [normalize_prompt(p) for p in prompts]
        inputs = self.det_processor(images=list(images), text=texts, return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        with inference_context(self.device, self.bf16):
            outputs = self.detector(**inputs)
        outputs.logits = outputs.logits.float()
        outputs.pred_boxes = outputs.pred_boxes.float()
        raw = self.det_processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=self.threshold_floor, text_threshold=self.text_threshold,
            target_sizes=sizes)
        out = []
        for res, (h, w) in zip(raw, sizes):
            boxes, scores = res["boxes"].float(), res["scores"].float()
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            keep, threshold = select_boxes(boxes, scores, start=self.box_threshold, floor=self.threshold_floor,
                                           step=self.threshold_step, min_count=self.min_masks,
                                           nms_iou=self.nms_iou)
            out.append({"boxes": boxes[keep].cpu().numpy().astype(np.float32),
                        "scores": scores[keep].cpu().numpy().astype(np.float32), "threshold": threshold})
        return out

    # -- segmentation --------------------------------------------------------------------------------
    def segment(self, images: list[np.ndarray], detections: list[dict]) -> list[np.ndarray]:
        """One SAM mask per box → (H, W) uint16 id map per image (0 background, 1 = largest instance)."""
        return [ids for ids, _ in self._segment(images, detections)]

    def _segment(self, images: list[np.ndarray], detections: list[dict]) -> list[tuple[np.ndarray, list[int]]]:
        """Like :meth:`segment`, also returning the indices (into each detection) of the painted boxes."""
        if len(images) != len(detections):
            raise ValueError(f"segment: {len(images)} images but {len(detections)} detections")
        images = [as_rgb_array(im) for im in images]
        out: list[tuple[np.ndarray, list[int]]] = []
        for idx in chunks(len(images), self.batch_size):
            out.extend(self._segment_batch([images[i] for i in idx], [detections[i] for i in idx]))
        return out

    def _segment_batch(self, images: list[np.ndarray], detections: list[dict]) -> list[tuple[np.ndarray, list[int]]]:
        results: list[tuple[np.ndarray, list[int]]] = [
            (np.zeros(im.shape[:2], np.uint16), []) for im in images]
        todo = [i for i, d in enumerate(detections) if len(d["boxes"]) > 0]
        if not todo:
            return results
        inputs = self.seg_processor(images=[images[i] for i in todo], return_tensors="pt")
        original = inputs["original_sizes"].tolist()
        reshaped = inputs["reshaped_input_sizes"].tolist()
        counts = [min(len(detections[i]["boxes"]), self.max_prompts) for i in todo]
        n_max = max(counts)
        # (B, n_max, 4) box prompts in the resized frame; short lists padded with a dummy box whose masks
        # are thrown away (each box is an independent prompt, so padding does not change the others).
        prompts = torch.zeros((len(todo), n_max, 4), dtype=torch.float32)
        prompts[..., 2:] = 1.0
        for b, (i, n) in enumerate(zip(todo, counts)):
            (oh, ow), (rh, rw) = original[b], reshaped[b]
            scale = torch.tensor([rw / ow, rh / oh, rw / ow, rh / oh])
            prompts[b, :n] = torch.as_tensor(detections[i]["boxes"][:n], dtype=torch.float32) * scale
        pixel_values = inputs["pixel_values"].to(self.device)
        with inference_context(self.device, self.bf16):
            if self.is_hq:
                emb, inter = self.segmenter.get_image_embeddings(pixel_values)
                extra = {"intermediate_embeddings": inter}
            else:
                emb, extra = self.segmenter.get_image_embeddings(pixel_values), {}
            pred = self.segmenter(image_embeddings=emb, input_boxes=prompts.to(self.device),
                                  multimask_output=False, **extra).pred_masks  # (B, n_max, 1, h, w)
        pred = pred.float()
        masks = self.seg_processor.post_process_masks([pred[b, :n] for b, n in enumerate(counts)],
                                                      original, reshaped)  # [(n, 1, H, W) bool]
        for b, (i, n) in enumerate(zip(todo, counts)):
            scores = torch.as_tensor(detections[i]["scores"][:n], dtype=torch.float32, device=masks[b].device)
            ids, order = paint_instances(masks[b][:, 0], scores, min_area=self.min_mask_area,
                                         max_instances=self.max_instances)
            results[i] = (ids.cpu().numpy().astype(np.uint16), order)
        return results

    # -- both ----------------------------------------------------------------------------------------
    def label_instances(self, images: list[np.ndarray], prompts: list[str]) -> list[tuple[np.ndarray, dict]]:
        """Detect + segment. Returns per image ``(ids, meta)``: ids (H, W) uint16, meta =
        ``{'boxes': [[x0, y0, x1, y1], ...], 'scores': [...], 'threshold': t, 'prompt': p,
        'instances': n, 'detections': m}`` where box/score k belongs to instance id k + 1 and ``m`` counts
        the boxes found before the mask-area and ``max_instances`` cuts (JSON-ready, 4 decimals)."""
        detections = self.detect(images, prompts)
        out = []
        for (ids, order), det, prompt in zip(self._segment(images, detections), detections, prompts):
            meta = {"boxes": [[round(float(v), 4) for v in det["boxes"][k]] for k in order],
                    "scores": [round(float(det["scores"][k]), 4) for k in order],
                    "threshold": round(float(det["threshold"]), 4), "prompt": normalize_prompt(prompt),
                    "instances": len(order), "detections": int(len(det["boxes"]))}
            out.append((ids, meta))
        return out

    def describe(self) -> dict[str, Any]:
        """JSON-ready provenance for the dataset manifest."""
        return {"backend": self.name, "detector_model": self.detector_spec,
                "segmenter_model": self.segmenter_spec,
                "segmenter_type": "sam_hq" if self.is_hq else "sam",
                "box_threshold": self.box_threshold, "threshold_floor": self.threshold_floor,
                "threshold_step": self.threshold_step, "text_threshold": self.text_threshold,
                "min_masks": self.min_masks, "nms_iou": self.nms_iou, "min_mask_area": self.min_mask_area,
                "max_instances": self.max_instances, "bf16": self.bf16}
